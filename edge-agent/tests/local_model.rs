//! The local model tier end to end: the real llama.cpp server (llama-cpp-python, `ci/peers.sh
//! llama-cpp`) loading a tiny GGUF model the test writes itself, the real `agentplane dev`, and the
//! real agent with `--local-model`. Private intents run on the device and no byte of them reaches the
//! gateway; regulated ones follow the policy the device got at enrollment; a local model that is down
//! keeps the intent (across a SIGKILL too) until it answers.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{
    Proc, edge_cli, enroll, free_port, llama, require_agentplane, spawn_until, start_edge,
};
use reqwest_edge as reqwest;
use serde_json::{Value, json};

/// `agentplane dev` with `--edge-regulated`, when given.
fn start_dev(bin: &Path, data: &Path, token: &str, regulated: Option<&str>) -> Proc {
    let mut cmd = Command::new(bin);
    cmd.args(["dev", "--listen", "127.0.0.1:0", "--join-token", token])
        .args(["--log-format", "text"])
        .arg("--data-dir")
        .arg(data);
    if let Some(r) = regulated {
        cmd.args(["--edge-regulated", r]);
    }
    spawn_until(
        cmd,
        "agentplane dev listening on ",
        &data.with_extension("log"),
    )
}

async fn submit(http: &reqwest::Client, agent: &str, body: Value) -> (u16, Value) {
    let r = http
        .post(format!("{agent}/api/intents"))
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn get_json(http: &reqwest::Client, url: String) -> Value {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

/// The agent with `--local-model` at `model` (fast status polls, short answers).
fn start_local_edge(data: &Path, model: &str, extra: &[&str]) -> Proc {
    let mut args = vec![
        "--poll-ms",
        "100",
        "--local-model",
        model,
        "--local-model-max-tokens",
        "24",
    ];
    args.extend_from_slice(extra);
    start_edge(data, &args)
}

/// Polls the agent's API until the intent is done.
async fn wait_done(http: &reqwest::Client, agent: &str, id: &str, secs: u64) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let v = get_json(http, format!("{agent}/api/intents/{id}")).await;
        if v["state"] == "done" {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "not done: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The sum of a gateway metric's samples whose labels contain `label`.
async fn metric(gw: &str, name: &str, label: &str) -> u64 {
    let text = reqwest::get(format!("{gw}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Whether `needle` occurs in any file under `dir` (the gateway's database, its WAL, everything).
fn occurs_under(dir: &Path, needle: &[u8]) -> bool {
    std::fs::read_dir(dir).unwrap().any(|e| {
        let p = e.unwrap().path();
        if p.is_dir() {
            occurs_under(&p, needle)
        } else {
            std::fs::read(&p)
                .map(|b| b.windows(needle.len()).any(|w| w == needle))
                .unwrap_or(false)
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_intents_run_on_the_device_and_never_reach_the_gateway() {
    let bin = require_agentplane();
    let python = llama::python();
    let dir = tempfile::tempdir().unwrap();
    let model = llama::make_model(&python, dir.path());
    let server = llama::start(&python, &model, free_port(), &dir.path().join("llama.log"));
    let gw_dir = dir.path().join("gw");
    let gw = start_dev(&bin, &gw_dir, "tok-local", None);
    let data = dir.path().join("edge");
    enroll(&data, &gw.addr, "tok-local", "kiosk-local");
    let agent = start_local_edge(&data, &server.addr, &[]);
    let posts_before = metric(&gw.addr, "agentplane_http_requests_total", "\"POST\"").await;

    let http = reqwest::Client::new();
    let private_marker = "zq-private-7f3a9c-payroll";
    let public_marker = "zq-public-51bd02-weather";
    let (st, private) = submit(
        &http,
        &agent.addr,
        json!({"type": "summarize", "prompt": format!("the {private_marker} numbers"), "privacyLevel": "private"}),
    )
    .await;
    assert_eq!(st, 201, "{private}");
    assert_eq!(private["runsOn"], "device", "{private}");
    let (st, public) = submit(
        &http,
        &agent.addr,
        json!({"type": "summarize", "prompt": format!("the {public_marker} report")}),
    )
    .await;
    assert_eq!(st, 201, "{public}");
    assert_eq!(public["runsOn"], "cloud");

    let p = wait_done(&http, &agent.addr, private["taskId"].as_str().unwrap(), 120).await;
    let c = wait_done(&http, &agent.addr, public["taskId"].as_str().unwrap(), 60).await;
    eprintln!("private intent: {p}\npublic intent: {c}");
    assert_eq!(p["phase"], "Succeeded", "{p}");
    assert_eq!(p["runsOn"], "device");
    let answer = p["result"].as_str().unwrap();
    assert!(!answer.is_empty(), "the local model wrote nothing: {p}");
    // The builtin cloud tier echoes the prompt; the local model's random weights do not.
    assert!(!answer.contains(private_marker), "{p}");
    assert_eq!(c["phase"], "Succeeded");
    assert_eq!(c["runsOn"], "cloud");
    assert!(c["result"].as_str().unwrap().contains(public_marker), "{c}");

    // The gateway saw one submission (the public one) and nothing of the private prompt: not in its
    // request count, its admissions, its database, its WAL or its log. The public marker found there
    // shows the search would find it.
    let posts_after = metric(&gw.addr, "agentplane_http_requests_total", "\"POST\"").await;
    assert_eq!(posts_after - posts_before, 1, "POSTs at the gateway");
    assert_eq!(
        metric(&gw.addr, "agentplane_intents_total", "\"accepted\"").await,
        1
    );
    agent.terminate();
    gw.terminate();
    assert!(occurs_under(&gw_dir, public_marker.as_bytes()));
    assert!(!occurs_under(&gw_dir, private_marker.as_bytes()));
    let gw_log = std::fs::read_to_string(gw_dir.with_extension("log")).unwrap();
    assert!(!gw_log.contains(private_marker));

    // The CLI shows where each ran.
    let out = edge_cli(&data, &["status"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(" device ") && stdout.contains(" cloud "),
        "{stdout}"
    );
    server.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regulated_intents_follow_the_enrollment_policy() {
    let bin = require_agentplane();
    let python = llama::python();
    let dir = tempfile::tempdir().unwrap();
    let model = llama::make_model(&python, dir.path());
    let server = llama::start(&python, &model, free_port(), &dir.path().join("llama.log"));
    let http = reqwest::Client::new();
    for route in ["local", "cloud", "refuse"] {
        let gw_dir = dir.path().join(format!("gw-{route}"));
        let token = format!("tok-{route}");
        let gw = start_dev(&bin, &gw_dir, &token, Some(route));
        let data = dir.path().join(format!("edge-{route}"));
        enroll(&data, &gw.addr, &token, &format!("kiosk-{route}"));
        let state: Value =
            serde_json::from_slice(&std::fs::read(data.join("agent.json")).unwrap()).unwrap();
        assert_eq!(state["edgePolicy"]["regulated"], route, "{state}");
        let agent = start_local_edge(&data, &server.addr, &[]);
        let marker = format!("zq-regulated-{route}-e41");
        let (st, v) = submit(
            &http,
            &agent.addr,
            json!({"type": "summarize", "prompt": format!("the {marker} file"), "privacyLevel": "regulated"}),
        )
        .await;
        match route {
            "refuse" => {
                assert_eq!(st, 403, "{v}");
                assert_eq!(v["error"]["code"], "regulated_refused");
                let counts = &get_json(&http, format!("{}/api/state", agent.addr)).await["counts"];
                assert_eq!(counts["pending"], 0, "nothing stored: {counts}");
                assert_eq!(counts["local"], 0);
            }
            _ => {
                assert_eq!(st, 201, "{v}");
                let e = wait_done(&http, &agent.addr, v["taskId"].as_str().unwrap(), 120).await;
                assert_eq!(e["phase"], "Succeeded", "{e}");
                let expect = if route == "local" { "device" } else { "cloud" };
                assert_eq!(e["runsOn"], expect, "{e}");
                assert_eq!(
                    e["result"].as_str().unwrap().contains(&marker),
                    route == "cloud",
                    "only the cloud's echo tier repeats the prompt: {e}"
                );
            }
        }
        agent.terminate();
        gw.terminate();
        assert_eq!(
            occurs_under(&gw_dir, marker.as_bytes()),
            route == "cloud",
            "the gateway holds the {route} intent's prompt only when the policy sends it"
        );
    }
    server.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_model_that_is_down_keeps_the_intent_through_a_sigkill() {
    let python = llama::python();
    let dir = tempfile::tempdir().unwrap();
    let model = llama::make_model(&python, dir.path());
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/v1");
    let data = dir.path().join("edge");
    // Not enrolled, no gateway: the local tier needs neither.
    let agent = start_local_edge(&data, &url, &["--backoff-max-ms", "300"]);
    let http = reqwest::Client::new();
    let (st, v) = submit(
        &http,
        &agent.addr,
        json!({"type": "summarize", "prompt": "while the model is down", "privacyLevel": "private"}),
    )
    .await;
    assert_eq!(st, 201, "{v}");
    let id = v["taskId"].as_str().unwrap().to_owned();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let waiting = loop {
        let e = get_json(&http, format!("{}/api/intents/{id}", agent.addr)).await;
        if e["attempts"].as_u64().unwrap_or(0) >= 2 {
            break e;
        }
        assert!(tokio::time::Instant::now() < deadline, "{e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(waiting["state"], "local", "{waiting}");
    let err = waiting["lastError"].as_str().unwrap();
    assert!(
        err.contains("unreachable") && err.contains(&port.to_string()),
        "{err}"
    );
    // A crash while it waits loses nothing.
    agent.sigkill();
    let server = llama::start(&python, &model, port, &dir.path().join("llama.log"));
    let agent = start_local_edge(&data, &url, &["--backoff-max-ms", "300"]);
    let e = wait_done(&http, &agent.addr, &id, 120).await;
    assert_eq!(e["phase"], "Succeeded", "{e}");
    assert_eq!(e["runsOn"], "device");
    assert!(e["lastError"].is_null(), "{e}");
    agent.terminate();
    server.terminate();
}

#[test]
fn without_a_local_model_private_intents_get_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = edge_cli(
        dir.path(),
        &["submit", "--prompt", "secret", "--privacy", "private"],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("private") && stderr.contains("--local-model"),
        "{stderr}"
    );
    let out = edge_cli(dir.path(), &["status", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["recent"], json!([]), "nothing stored: {v}");
    // A far address is refused at startup: private prompts only go to this machine.
    let out = edge_cli(
        dir.path(),
        &[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--local-model",
            "http://192.0.2.7:8080/v1",
        ],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not on this device"), "{stderr}");
}
