//! End to end against the real `agentplane dev` over HTTP: enroll, submit from the UI's API, see the
//! result; offline durability through SIGKILLs; a device clock far off. A missing `agentplane` binary
//! fails the tests with the reason (`cargo test --workspace` builds it).

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use agentplane_api::{Consent, Intent, IntentPayload, PrivacyLevel, RequiredResources, TaskPhase};
use agentplane_edge::capture::sign;
use agentplane_edge::gateway::GatewayClient;
use agentplane_edge::identity::{DeviceSigner as _, SoftKey};
use agentplane_edge::outbox::{EntryState, Outbox, OutboxConfig};
use common::{
    edge_cli, enroll, free_port, random_u64, require_agentplane, start_dev, start_edge, wait_for,
};
use reqwest_edge as reqwest;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_submit_from_the_ui_api_and_see_the_result() {
    let bin = require_agentplane();
    let dir = tempfile::tempdir().unwrap();
    let gw = start_dev(&bin, &dir.path().join("gw"), "127.0.0.1:0", "tok-e2e-1");
    let data = dir.path().join("edge");
    assert!(enroll(&data, &gw.addr, "tok-e2e-1", "kiosk-e2e").starts_with("enrolled:"));
    // Idempotent: the same device and key again is harmless.
    assert!(enroll(&data, &gw.addr, "tok-e2e-1", "kiosk-e2e").starts_with("already enrolled:"));

    let agent = start_edge(&data, &["--poll-ms", "100"]);
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/api/intents", agent.addr))
        .json(&json!({"type": "summarize", "prompt": "hello from the kiosk"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["taskId"]
        .as_str()
        .unwrap()
        .to_owned();

    let mut seen: Vec<String> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let last = loop {
        let v: Value = http
            .get(format!("{}/api/intents/{id}", agent.addr))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let label = format!(
            "{}/{}",
            v["state"].as_str().unwrap_or(""),
            v["phase"].as_str().unwrap_or("-")
        );
        if seen.last() != Some(&label) {
            seen.push(label);
        }
        if v["state"] == "done" {
            break v;
        }
        assert!(tokio::time::Instant::now() < deadline, "not done: {seen:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(last["phase"], "Succeeded", "{last}");
    assert!(
        last["result"]
            .as_str()
            .unwrap()
            .contains("hello from the kiosk"),
        "{last}"
    );
    eprintln!("phases seen by the UI API: {seen:?}");
    let state: Value = http
        .get(format!("{}/api/state", agent.addr))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(state["link"]["online"], true, "{state}");
    assert_eq!(state["deviceId"], "kiosk-e2e");

    // Scripts: `submit --wait` beside the running agent prints the result.
    let out = edge_cli(
        &data,
        &[
            "submit",
            "--prompt",
            "from a script",
            "--wait",
            "--timeout-secs",
            "60",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("Succeeded") && stdout.contains("from a script"),
        "{stdout}"
    );
    let out = edge_cli(&data, &["status"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("done 2"));
    agent.terminate();
    gw.terminate();
}

/// Submits through the agent's API from several clients until `stop`; returns the acknowledged ids.
async fn hammer(base: String, stop: Arc<AtomicBool>, target: usize) -> Vec<String> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut set = tokio::task::JoinSet::new();
    for c in 0..8 {
        let (http, base, stop, acked) = (http.clone(), base.clone(), stop.clone(), acked.clone());
        set.spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) && acked.lock().unwrap().len() < target {
                i += 1;
                let r = http
                    .post(format!("{base}/api/intents"))
                    .json(&json!({"type": "summarize", "prompt": format!("client {c} intent {i}")}))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 201 => {
                        let v: Value = match r.json().await {
                            Ok(v) => v,
                            Err(_) => break,
                        };
                        acked
                            .lock()
                            .unwrap()
                            .push(v["taskId"].as_str().unwrap().to_owned());
                    }
                    // The agent was killed under us: whatever was not acknowledged may or may not be kept.
                    _ => break,
                }
            }
        });
    }
    while set.join_next().await.is_some() {}
    acked.lock().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_500_intents_survive_three_sigkills_and_are_delivered_once() {
    let bin = require_agentplane();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let gw_dir = dir.path().join("gw");
    let data = dir.path().join("edge");

    // Enroll while the gateway is up, then take it down.
    let gw = start_dev(&bin, &gw_dir, &listen, "tok-kill");
    enroll(&data, &gw.addr, "tok-kill", "kiosk-kill");
    gw.terminate();

    const TOTAL: usize = 500;
    let mut acked: Vec<String> = Vec::new();
    for round in 0..3 {
        let agent = start_edge(&data, &["--backoff-max-ms", "500"]);
        let stop = Arc::new(AtomicBool::new(false));
        let h = tokio::spawn(hammer(
            agent.addr.clone(),
            stop.clone(),
            TOTAL.saturating_sub(acked.len()),
        ));
        // A random point while captures are in flight (the agent acknowledges a few hundred a second).
        tokio::time::sleep(Duration::from_millis(20 + random_u64() % 200)).await;
        agent.sigkill();
        stop.store(true, Ordering::SeqCst);
        let got = h.await.unwrap();
        eprintln!("round {round}: {} acknowledged before SIGKILL", got.len());
        acked.extend(got);
    }
    // Top up to TOTAL acknowledged intents, still offline.
    let agent = start_edge(&data, &["--backoff-max-ms", "500"]);
    if acked.len() < TOTAL {
        let more = hammer(
            agent.addr.clone(),
            Arc::new(AtomicBool::new(false)),
            TOTAL - acked.len(),
        )
        .await;
        acked.extend(more);
    }
    assert!(acked.len() >= TOTAL);
    let unique: HashSet<&String> = acked.iter().collect();
    assert_eq!(
        unique.len(),
        acked.len(),
        "each acknowledgement names a distinct task"
    );

    // Nothing acknowledged was lost, and the sequence has no gaps or repeats.
    let outbox = Outbox::open(OutboxConfig::new(data.join("outbox.db"))).unwrap();
    let stored = outbox.all().await.unwrap();
    let ids: HashSet<&str> = stored.iter().map(|e| e.task_id.as_str()).collect();
    for id in &acked {
        assert!(ids.contains(id.as_str()), "acknowledged intent {id} lost");
    }
    let seqs: Vec<u64> = stored.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=stored.len() as u64).collect::<Vec<_>>());
    assert!(
        stored.iter().all(|e| e.state == EntryState::Pending),
        "gateway is down"
    );
    let n = stored.len();

    // Gateway back (same data, same port): everything is delivered, each once.
    let gw = start_dev(&bin, &gw_dir, &listen, "tok-kill");
    wait_for("all delivered and finished", 180, || {
        let outbox = outbox.clone();
        async move { outbox.counts().await.unwrap().done as usize == n }
    })
    .await;
    let stored = outbox.all().await.unwrap();
    assert!(
        stored
            .iter()
            .all(|e| e.phase.as_deref() == Some("Succeeded"))
    );
    // The gateway refuses a seq already taken or below its replay window, so "no rejection" means the
    // sender kept its window inside the gateway's; its metrics count one acceptance per intent.
    assert_eq!(outbox.counts().await.unwrap().rejected, 0);
    let metrics = reqwest::get(format!("{}/metrics", gw.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let accepted: u64 = metrics
        .lines()
        .find(|l| l.starts_with("agentplane_intents_total") && l.contains("\"accepted\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    eprintln!(
        "gateway accepted {accepted} new intents, the outbox held {n}; metrics:\n{}",
        metrics
            .lines()
            .filter(|l| l.starts_with("agentplane_intents_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(accepted as usize, n, "each intent admitted exactly once");
    agent.terminate();
    gw.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_clock_far_off_still_submits_and_reads() {
    let bin = require_agentplane();
    let dir = tempfile::tempdir().unwrap();
    let gw = start_dev(&bin, &dir.path().join("gw"), "127.0.0.1:0", "tok-clock");
    let client = GatewayClient::new(&gw.addr).unwrap();
    let key = SoftKey::generate().unwrap();
    client
        .enroll(&agentplane_api::wire::EnrollRequest {
            join_token: "tok-clock".into(),
            device_id: "kiosk-clock".into(),
            owner: "alice".into(),
            public_key: agentplane_api::PublicKey {
                id: key.key_id().into(),
                alg: agentplane_api::KeyAlgorithm::Ed25519,
                key: agentplane_api::envelope::encode_public_key(&key.public_key()),
                not_after: None,
            },
        })
        .await
        .unwrap();
    // Intents captured with the clock years off are still accepted (replay protection is task id + seq).
    let mut ids = Vec::new();
    for (seq, when) in [(1u64, "2001-01-01T00:00:00Z"), (2, "2090-01-01T00:00:00Z")] {
        let t: jiff::Timestamp = when.parse().unwrap();
        let payload = IntentPayload {
            v: 1,
            task_id: uuid::Uuid::now_v7().to_string(),
            device_id: "kiosk-clock".into(),
            user_id: "alice".into(),
            seq,
            created_at: t,
            consent: Consent {
                granted_at: t,
                scopes: vec!["process".into()],
            },
            intent: Intent {
                kind: "summarize".into(),
                prompt: format!("at {when}"),
                params: Default::default(),
            },
            privacy_level: PrivacyLevel::Public,
            required_resources: RequiredResources::default(),
        };
        let env = sign(&payload, &key).unwrap();
        let r = client
            .submit(
                &env,
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )
            .await
            .unwrap();
        assert_eq!(r.phase, TaskPhase::Pending);
        ids.push(payload.task_id);
    }
    // Signed reads from a clock a year fast (then a year slow) correct themselves from the 401's serverTime.
    for offset in [365 * 86_400, -365 * 86_400] {
        client.set_clock_offset_secs(offset);
        let view = client.task(&ids[0], "kiosk-clock", &key).await.unwrap();
        assert_eq!(view.task_id, ids[0]);
        assert!(
            client.clock_offset_secs().abs() < 60,
            "offset corrected to {}",
            client.clock_offset_secs()
        );
    }
    gw.terminate();
}

#[test]
fn install_into_a_temp_root_enrolls_against_the_real_gateway() {
    let bin = require_agentplane();
    let dir = tempfile::tempdir().unwrap();
    let gw = start_dev(&bin, &dir.path().join("gw"), "127.0.0.1:0", "tok-install");
    let root = dir.path().join("root");
    let install = |extra: &[&str]| {
        let out = std::process::Command::new(common::edge_bin())
            .args(["install", "--root"])
            .arg(&root)
            .args([
                "--gateway",
                &gw.addr,
                "--token",
                "tok-install",
                "--device-id",
                "kiosk-inst",
            ])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    install(&[]);
    install(&[]); // idempotent: the same key enrolls again harmlessly
    let state: Value = serde_json::from_slice(
        &std::fs::read(root.join("var/lib/agentplane-edge/agent.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["deviceId"], "kiosk-inst");
    assert_eq!(state["gateway"], gw.addr.as_str());
    let env = std::fs::read_to_string(root.join("etc/agentplane-edge/edge.env")).unwrap();
    assert!(
        env.contains(&gw.addr) && !env.contains("tok-install"),
        "no secret in the env file: {env}"
    );
    let out = std::process::Command::new(common::edge_bin())
        .args(["uninstall", "--root"])
        .arg(&root)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(
        !root
            .join("etc/systemd/system/agentplane-edge.service")
            .exists()
    );
    assert!(root.join("var/lib/agentplane-edge/device.key").exists());
    gw.terminate();
}

/// Key rotation against the real gateway: `rotate-key` registers the new key (signed by the old
/// one and by the new one), keeps the old key file as `.prev`, and an intent signed afterwards is
/// accepted under the new key id; the old key is retired at the gateway when asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_registers_the_new_key_and_intents_use_it() {
    let bin = require_agentplane();
    let dir = tempfile::tempdir().unwrap();
    let gw = start_dev(&bin, &dir.path().join("gw"), "127.0.0.1:0", "tok-rot");
    let data = dir.path().join("edge");
    enroll(&data, &gw.addr, "tok-rot", "kiosk-rot");
    let key_before = std::fs::read(data.join("device.key")).unwrap();
    let out = edge_cli(&data, &["rotate-key", "--retire-old-after", "3600"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("rotated: ed25519-"), "{stdout}");
    assert_ne!(std::fs::read(data.join("device.key")).unwrap(), key_before);
    assert_eq!(
        std::fs::read(data.join("device.key.prev")).unwrap(),
        key_before
    );
    // Rotating again is harmless: a fresh key is staged and registered the same way.
    let again = edge_cli(&data, &["rotate-key"]);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    // An intent captured now is signed by the new key and delivered by a running agent.
    let out = edge_cli(&data, &["submit", "--prompt", "after rotation"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let agent = start_edge(&data, &["--poll-ms", "100"]);
    let http = reqwest::Client::new();
    wait_for("the rotated-key intent to succeed", 60, || {
        let (http, url) = (http.clone(), format!("{}/api/intents", agent.addr));
        async move {
            let Ok(resp) = http.get(&url).send().await else {
                return false;
            };
            let list: Value = resp.json().await.unwrap_or(Value::Null);
            list.as_array()
                .or_else(|| list["intents"].as_array())
                .is_some_and(|a| a.iter().any(|e| e["phase"] == "Succeeded"))
        }
    })
    .await;
    agent.terminate();
    gw.terminate();
}

/// Over HTTPS (`agentplane dev --tls-cert/--tls-key`, a throwaway self-signed certificate from the
/// openssl CLI): an untrusted certificate is refused; trusted through SSL_CERT_FILE, enrollment works.
#[test]
fn https_gateway_is_verified() {
    let bin = require_agentplane();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
        ])
        .args([
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output();
    assert!(
        matches!(&made, Ok(o) if o.status.success()),
        "openssl could not make the test certificate: {made:?}"
    );
    let mut cmd = std::process::Command::new(&bin);
    cmd.args([
        "dev",
        "--listen",
        "127.0.0.1:0",
        "--join-token",
        "tok-tls",
        "--log-format",
        "text",
    ])
    .arg("--data-dir")
    .arg(dir.path().join("gw"))
    .arg("--tls-cert")
    .arg(&cert)
    .arg("--tls-key")
    .arg(&key);
    let gw = common::spawn_until(
        cmd,
        "agentplane dev listening on ",
        &dir.path().join("gw.log"),
    );
    assert!(gw.addr.starts_with("https://"), "{}", gw.addr);
    let data = dir.path().join("edge");
    let enroll_with = |ca: Option<&Path>| {
        let mut c = std::process::Command::new(common::edge_bin());
        c.arg("--data-dir").arg(&data);
        c.args([
            "enroll",
            "--gateway",
            &gw.addr,
            "--token",
            "tok-tls",
            "--device-id",
            "kiosk-tls",
        ]);
        if let Some(ca) = ca {
            c.env("SSL_CERT_FILE", ca);
        }
        c.output().unwrap()
    };
    let refused = enroll_with(None);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("UnknownIssuer") || err.contains("certificate"),
        "{err}"
    );
    let ok = enroll_with(Some(&cert));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).starts_with("enrolled:"));
    gw.terminate();
}
