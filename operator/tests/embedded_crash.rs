//! `agentplane dev` killed with SIGKILL under load and restarted: every accepted task reaches a terminal
//! phase, and no task that had finished runs again.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use agentplane::client::{ClientError, DeviceIdentity, GatewayClient};
use agentplane::runtime::default_policy;
use agentplane::store::TaskStore;
use agentplane::store::sqlite::{Db, SqliteStore};
use agentplane_api::TaskPhase;
use agentplane_api::policy::{EndpointKind, ModelTier};

const DEVICES: usize = 6;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The runtime process; killed if the test ends early, so a failing test leaves nothing running.
struct Runtime(Option<Child>);

impl Runtime {
    fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("the process is still owned")
    }

    fn take(&mut self) -> Child {
        self.0.take().expect("the process is still owned")
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn start(dir: &std::path::Path, port: u16) -> Runtime {
    Runtime(Some(
        Command::new(env!("CARGO_BIN_EXE_agentplane"))
            .args([
                "dev",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--approver",
                "admin=secret",
            ])
            .args(["--join-token", "j0,j1,j2,j3,j4,j5"])
            .arg("--data-dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    ))
}

async fn healthy(base: &str) {
    for _ in 0..200 {
        if let Ok(r) = reqwest::get(format!("{base}/healthz")).await
            && r.status().is_success()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("agentplane dev did not become healthy");
}

async fn store(dir: &std::path::Path) -> Arc<SqliteStore> {
    SqliteStore::new(Db::open(&dir.join("agentplane.sqlite")).unwrap(), "default")
}

async fn model_calls(base: &str) -> u64 {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with("agentplane_model_calls_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_nothing_and_reruns_nothing_finished() {
    let dir = tempfile::tempdir().unwrap();
    // Seed a policy whose model takes a little while, so work is in flight when the kill lands.
    {
        let s = store(dir.path()).await;
        let mut policy = default_policy();
        policy.models = vec![ModelTier {
            name: "builtin".into(),
            endpoint_kind: EndpointKind::Builtin,
            endpoint: "builtin:sleep".into(),
            model: None,
            price_per_1k_input_micros: 1,
            price_per_1k_output_micros: 1,
            privacy_levels: vec![],
            gpu: false,
            secret_ref: None,
        }];
        s.put_policy(policy).await.unwrap();
    }
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut child = start(dir.path(), port);
    healthy(&base).await;

    let client = Arc::new(GatewayClient::new(&base));
    let mut devices = Vec::new();
    for i in 0..DEVICES {
        let d = DeviceIdentity::generate(&format!("device-{i}")).unwrap();
        client.enroll(&format!("j{i}"), &d, "owner").await.unwrap();
        devices.push(Arc::new(d));
    }

    // Each device submits its outbox in seq order until the runtime dies.
    let mut submitters = tokio::task::JoinSet::new();
    for d in &devices {
        let (d, client) = (d.clone(), client.clone());
        submitters.spawn(async move {
            let mut accepted = Vec::new();
            for seq in 1..=10_000u64 {
                let mut p = d.intent(seq, "summarize", &format!("task {seq}"));
                p.intent.params.insert("sleepMs".into(), 20.into());
                match client.submit(&d.sign(&p).unwrap()).await {
                    Ok(r) => accepted.push((r.task_id, seq)),
                    Err(ClientError::Http(_)) => break, // the runtime is gone
                    Err(e) => panic!("unexpected refusal: {e}"),
                }
            }
            (d, accepted)
        });
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    child.child().kill().unwrap(); // SIGKILL
    child.child().wait().unwrap();
    let mut accepted = Vec::new();
    while let Some(r) = submitters.join_next().await {
        accepted.push(r.unwrap());
    }
    let total: usize = accepted.iter().map(|(_, a)| a.len()).sum();
    assert!(total > 0, "nothing was accepted before the kill");

    // What the kill left behind.
    let unfinished = {
        let s = store(dir.path()).await;
        s.list_unfinished().await.unwrap().len() as u64
    };

    let mut child = start(dir.path(), port);
    healthy(&base).await;
    for (d, tasks) in &accepted {
        for (id, seq) in tasks {
            let mut last = None;
            for _ in 0..400 {
                let v = client.task(d, id).await.unwrap();
                if v.phase.is_terminal() {
                    last = Some(v);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            let v = last.unwrap_or_else(|| panic!("task {id} never finished after the restart"));
            assert_eq!(v.phase, TaskPhase::Succeeded, "{v:?}");
            assert_eq!(
                v.result.as_deref(),
                Some(format!("echo: task {seq}").as_str())
            );
        }
    }
    // Only the work that was unfinished at the kill ran again.
    let calls = model_calls(&base).await;
    assert!(
        calls <= unfinished,
        "{calls} model calls after restart, but only {unfinished} tasks were unfinished"
    );

    // Graceful stop, then nothing is left unfinished (including tasks whose 202 was lost in the kill).
    let _ = Command::new("kill")
        .args(["-TERM", &child.child().id().to_string()])
        .status();
    let mut child = child.take();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "dev exited with {status}");
    let s = store(dir.path()).await;
    let left = s.list_unfinished().await.unwrap();
    assert!(
        left.is_empty(),
        "unfinished after restart: {:?}",
        left.iter().map(|t| (&t.id, t.phase())).collect::<Vec<_>>()
    );
    eprintln!(
        "accepted {total} tasks before SIGKILL; {unfinished} were unfinished; {calls} model calls after restart"
    );
}
