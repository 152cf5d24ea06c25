//! The UI driven in headless Chromium against the real `agentplane dev`: type an intent, click submit,
//! wait for Succeeded, assert the result text; the screenshot is kept under
//! `target/test-artifacts/edge-ui.png`. A private intent on a device with a local model (the real
//! llama.cpp server) is shown as run on the device (`edge-ui-device.png`). Debian chromium and playwright-core are peers installed by
//! `ci/peers.sh`; without them the test fails with the reason.

mod common;

use std::path::PathBuf;

use common::{edge_cli, require_agentplane, start_dev, start_edge};

fn ui_test_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("ui-test")
}

#[test]
fn the_ui_in_headless_chromium_reaches_succeeded() {
    let bin = require_agentplane();
    let dir = tempfile::tempdir().unwrap();
    let gw = start_dev(&bin, &dir.path().join("gw"), "127.0.0.1:0", "tok-ui");
    let data = dir.path().join("edge");
    let out = edge_cli(
        &data,
        &[
            "enroll",
            "--gateway",
            &gw.addr,
            "--token",
            "tok-ui",
            "--device-id",
            "kiosk-ui",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let agent = start_edge(&data, &["--poll-ms", "200"]);

    let artifacts = common::edge_bin()
        .parent()
        .and_then(|p| p.parent())
        .map(|t| t.join("test-artifacts"))
        .unwrap();
    std::fs::create_dir_all(&artifacts).unwrap();
    drive(&agent.addr, "succeeded", &artifacts.join("edge-ui.png"));

    // A second device whose gateway is down: the page says the intent is saved and waiting.
    let offline_data = dir.path().join("edge-offline");
    let dead = format!("http://127.0.0.1:{}", common::free_port());
    let offline = start_edge(
        &offline_data,
        &["--gateway", &dead, "--backoff-max-ms", "1000"],
    );
    drive(
        &offline.addr,
        "offline",
        &artifacts.join("edge-ui-offline.png"),
    );
    offline.terminate();

    // A third device with a local model (the real llama.cpp server): a private intent runs there and
    // the page says so.
    let python = common::llama::python();
    let model = common::llama::make_model(&python, dir.path());
    let server = common::llama::start(
        &python,
        &model,
        common::free_port(),
        &dir.path().join("llama.log"),
    );
    let local = start_edge(
        &dir.path().join("edge-local"),
        &[
            "--local-model",
            &server.addr,
            "--local-model-max-tokens",
            "16",
        ],
    );
    drive(&local.addr, "device", &artifacts.join("edge-ui-device.png"));
    local.terminate();
    server.terminate();
    agent.terminate();
    gw.terminate();
}

/// Runs the Playwright script against the agent's UI and checks it said it was content.
fn drive(url: &str, expect: &str, shot: &std::path::Path) {
    let _ = std::fs::remove_file(shot);
    let stdout = agentplane_testsupport::run_playwright(
        &ui_test_dir().join("ui.test.mjs"),
        &[
            ("EDGE_URL", url.as_ref()),
            ("EXPECT", expect.as_ref()),
            ("SCREENSHOT", shot.as_os_str()),
        ],
        "UI OK",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(shot.exists(), "no screenshot at {}", shot.display());
    eprintln!("{stdout}");
}
