//! Helpers shared by the integration tests: starting the agent binary and the real `agentplane dev`.
#![allow(dead_code)]

pub mod llama;

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn edge_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_agentplane-edge"))
}

/// The real gateway binary: `$AGENTPLANE_BIN`, else `agentplane` beside our binary in the target dir
/// (`cargo test --workspace` builds it). A missing binary fails the test with the reason: it is a peer
/// of these tests, not an optional extra.
pub fn require_agentplane() -> PathBuf {
    // Every test that talks to the gateway builds HTTP clients; they need rustls's provider first.
    agentplane_edge::gateway::install_crypto_provider();
    let path = match std::env::var_os("AGENTPLANE_BIN") {
        Some(p) => PathBuf::from(p),
        None => edge_bin().with_file_name("agentplane"),
    };
    assert!(
        path.exists(),
        "the gateway binary {} is missing: run `cargo build -p agentplane` (or `cargo test --workspace`), or set AGENTPLANE_BIN",
        path.display()
    );
    path
}

/// A child process killed (SIGKILL) when dropped.
pub struct Proc {
    pub child: Child,
    pub addr: String,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn sigkill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for the exit.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return self.child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `cmd` and waits for a stdout line starting with `prefix`; returns the rest of that line.
pub fn spawn_until(mut cmd: Command, prefix: &str, log: &Path) -> Proc {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(log_file)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let wanted = prefix.to_owned();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if !sent && let Some(rest) = line.strip_prefix(&wanted) {
                let _ = tx.send(rest.trim().to_owned());
                sent = true;
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(addr) => Proc { child, addr },
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} did not print {prefix:?}; log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            )
        }
    }
}

/// Starts `agentplane-edge run` on a free loopback port; `addr` is its base URL.
pub fn start_edge(data_dir: &Path, extra: &[&str]) -> Proc {
    let mut cmd = Command::new(edge_bin());
    cmd.arg("--data-dir")
        .arg(data_dir)
        .args(["run", "--listen", "127.0.0.1:0"])
        .args(extra)
        .env("RUST_LOG", "info");
    spawn_until(
        cmd,
        "agentplane-edge listening on ",
        &data_dir.with_extension("log"),
    )
}

/// Starts the real `agentplane dev` on `listen` with a known join token.
pub fn start_dev(bin: &Path, data_dir: &Path, listen: &str, token: &str) -> Proc {
    let mut cmd = Command::new(bin);
    cmd.args([
        "dev",
        "--listen",
        listen,
        "--join-token",
        token,
        "--log-format",
        "text",
    ])
    .arg("--data-dir")
    .arg(data_dir);
    spawn_until(
        cmd,
        "agentplane dev listening on ",
        &data_dir.with_extension("log"),
    )
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs the agent CLI to completion.
pub fn edge_cli(data_dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(edge_bin())
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .output()
        .unwrap()
}

pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).unwrap();
    u64::from_le_bytes(b)
}

/// `agentplane-edge enroll` as device `device`, owner alice; returns its output.
pub fn enroll(data: &Path, gateway: &str, token: &str, device: &str) -> String {
    let out = edge_cli(
        data,
        &[
            "enroll",
            "--gateway",
            gateway,
            "--token",
            token,
            "--device-id",
            device,
            "--owner",
            "alice",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Polls `check` every 100 ms until it holds; fails after `secs`.
pub async fn wait_for<F, Fut>(what: &str, secs: u64, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
