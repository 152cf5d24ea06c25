//! The binary's subcommands as scripts use them, and its behaviour on a damaged outbox.

mod common;

use common::{edge_cli, start_edge};
use serde_json::Value;

fn status_json(dir: &std::path::Path) -> Value {
    let out = edge_cli(dir, &["status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn offline_submit_persists_with_monotonic_seq_across_processes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("edge");
    for i in 1..=3u64 {
        let out = edge_cli(&data, &["submit", "--prompt", &format!("p{i}")]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = String::from_utf8(out.stdout).unwrap();
        assert!(line.trim_end().ends_with(&format!("seq={i}")), "{line}");
    }
    let s = status_json(&data);
    assert_eq!(s["counts"]["pending"], 3);
    assert_eq!(s["nextSeq"], 4);
    assert_eq!(s["recent"][0]["seq"], 3);
    // Not enrolled, but the device id the intents were signed for is pinned, and enrolling under another
    // name is refused (before any network call) while they wait.
    let pinned = s["deviceId"].as_str().unwrap().to_owned();
    assert!(pinned.starts_with("edge-"), "{pinned}");
    assert!(s["gateway"].is_null());
    let out = edge_cli(
        &data,
        &[
            "enroll",
            "--gateway",
            "http://127.0.0.1:9",
            "--token",
            "t",
            "--device-id",
            "other-name",
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("strand") && err.contains(&pinned), "{err}");

    // The key was created once, owner-only.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(data.join("device.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // Private intents are refused by the default local policy, and nothing is stored.
    let out = edge_cli(
        &data,
        &["submit", "--prompt", "secret", "--privacy", "private"],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("private"));
    assert_eq!(status_json(&data)["counts"]["pending"], 3);

    // A prompt from stdin.
    let mut child = std::process::Command::new(common::edge_bin())
        .arg("--data-dir")
        .arg(&data)
        .args(["submit", "--prompt", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"from stdin")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let id = String::from_utf8(out.stdout).unwrap();
    let id = id.split_whitespace().next().unwrap();
    let one: Value =
        serde_json::from_slice(&edge_cli(&data, &["status", id, "--json"]).stdout).unwrap();
    assert_eq!(one["prompt"], "from stdin");
    assert_eq!(one["seq"], 4);
}

#[test]
fn damaged_outbox_is_a_clear_error_then_an_explicit_reset() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("edge");
    assert!(
        edge_cli(&data, &["submit", "--prompt", "x"])
            .status
            .success()
    );
    std::fs::write(data.join("outbox.db"), vec![0x42u8; 16384]).unwrap();
    let _ = std::fs::remove_file(data.join("outbox.db-wal"));
    let _ = std::fs::remove_file(data.join("outbox.db-shm"));

    // Every command says what is wrong and how to recover, with the exit status systemd will not restart.
    for args in [
        &["status"][..],
        &["submit", "--prompt", "y"][..],
        &["run", "--listen", "127.0.0.1:0"][..],
    ] {
        let out = edge_cli(&data, args);
        assert_eq!(out.status.code(), Some(78), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("damaged") && err.contains("--reset-outbox"),
            "{args:?}: {err}"
        );
    }
    // The damaged file is untouched until the operator asks.
    assert_eq!(
        std::fs::read(data.join("outbox.db")).unwrap(),
        vec![0x42u8; 16384]
    );

    let agent = start_edge(&data, &["--reset-outbox"]);
    agent.sigkill();
    let aside: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("outbox.db.corrupt-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "the damaged file is kept for inspection");
    assert_eq!(std::fs::read(aside[0].path()).unwrap(), vec![0x42u8; 16384]);
    let s = status_json(&data);
    assert_eq!(s["counts"]["pending"], 0);
    // Sequence numbers restart above anything the lost outbox can have used (the gateway remembers them).
    assert!(s["nextSeq"].as_u64().unwrap() > 1_000_000_000_000, "{s}");
    assert!(
        edge_cli(&data, &["submit", "--prompt", "after"])
            .status
            .success()
    );
}

#[test]
fn refuses_a_non_loopback_listener() {
    let dir = tempfile::tempdir().unwrap();
    let out = edge_cli(dir.path(), &["run", "--listen", "0.0.0.0:0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("non-loopback"));
}

#[test]
fn an_out_of_range_max_in_flight_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("edge");
    for bad in ["0", "65"] {
        let out = edge_cli(&data, &["run", "--max-in-flight", bad]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains("1..=64"), "{err}");
    }
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("agent.json"), br#"{"maxInFlight": 100}"#).unwrap();
    let out = edge_cli(&data, &["run", "--listen", "127.0.0.1:0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("agent.json") && err.contains("maxInFlight 100 is out of range"),
        "{err}"
    );
}
