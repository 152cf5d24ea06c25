//! The stack stops exactly what it started: on drop, and through the watchdog
//! when the owning process dies without cleaning up.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use agentplane_testsupport::{Stack, repo_root};

/// (name, pid) of the peers in a stack's pids file.
fn peer_pids(dir: &Path) -> Vec<(String, u32)> {
    let text = fs::read_to_string(dir.join("pids")).expect("pids file");
    text.lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            Some((parts.next()?.to_owned(), parts.next()?.parse().ok()?))
        })
        .collect()
}

fn alive(pid: u32) -> bool {
    // A zombie still has /proc/<pid>, but it has stopped running.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn wait_all_dead(pids: &[(String, u32)], within: Duration) {
    let deadline = Instant::now() + within;
    while pids.iter().any(|(_, p)| alive(*p)) && Instant::now() < deadline {
        sleep(Duration::from_millis(100));
    }
    let left: Vec<_> = pids.iter().filter(|(_, p)| alive(*p)).collect();
    assert!(left.is_empty(), "still running: {left:?}");
}

#[test]
fn drop_stops_every_peer_and_removes_state() {
    let stack = Stack::start().unwrap_or_else(|e| panic!("{e}"));
    let dir = stack.dir().to_path_buf();
    let pids = peer_pids(&dir);
    let names: Vec<_> = pids.iter().map(|(n, _)| n.as_str()).collect();
    for peer in ["moto", "etcd", "kube-apiserver", "watchdog"] {
        assert!(names.contains(&peer), "{peer} not in {names:?}");
    }
    assert!(pids.iter().all(|(_, p)| alive(*p)), "{pids:?}");

    drop(stack);
    wait_all_dead(&pids, Duration::from_secs(5));
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[test]
fn watchdog_stops_the_stack_when_its_owner_dies() {
    let mut owner = Command::new("sleep")
        .arg("600")
        .spawn()
        .expect("spawn owner");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new("bash")
        .arg(repo_root().join("ci/stack.sh"))
        .args(["up", "--dir"])
        .arg(dir.path())
        .args(["--owner-pid", &owner.id().to_string()])
        .stdin(Stdio::null())
        .output()
        .expect("run stack.sh up");
    assert!(
        out.status.success(),
        "stack.sh up failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pids = peer_pids(dir.path());
    assert_eq!(pids.len(), 4, "{pids:?}");
    assert!(pids.iter().all(|(_, p)| alive(*p)), "{pids:?}");

    owner.kill().expect("kill owner");
    owner.wait().expect("reap owner");
    wait_all_dead(&pids, Duration::from_secs(30));
    assert!(!dir.path().join("pids").exists());
}
