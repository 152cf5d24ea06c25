//! The real llama.cpp server (llama-cpp-python's, `ci/peers.sh llama-cpp`) with a tiny model the test
//! writes itself (tests/fixtures/make_tiny_gguf.py, random weights).

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::Proc;

/// The peer venv's interpreter; a missing peer fails the test naming `ci/peers.sh llama-cpp`.
pub fn python() -> PathBuf {
    agentplane_testsupport::peer_path("llama-cpp").unwrap_or_else(|e| panic!("{e}"))
}

/// Writes the tiny model into `dir` with the venv's `gguf` package.
pub fn make_model(python: &Path, dir: &Path) -> PathBuf {
    let out = dir.join("tiny.gguf");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/make_tiny_gguf.py");
    let st = Command::new(python)
        .arg(&script)
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "make_tiny_gguf.py failed: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    out
}

/// Starts the OpenAI-compatible server on 127.0.0.1:`port` and waits until `/v1/models` answers 200.
/// `addr` is the `/v1` base URL the agent's `--local-model` takes.
pub fn start(python: &Path, model: &Path, port: u16, log: &Path) -> Proc {
    let log_file = std::fs::File::create(log).unwrap();
    let child = Command::new(python)
        .args(["-m", "llama_cpp.server", "--model"])
        .arg(model)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--n_ctx", "512", "--n_threads", "1", "--seed", "7"])
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .unwrap();
    let proc = Proc {
        child,
        addr: format!("http://127.0.0.1:{port}/v1"),
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while !models_ok(port) {
        assert!(
            Instant::now() < deadline,
            "llama-cpp-python's server did not come up; log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    proc
}

/// One plain HTTP/1.0 GET of `/v1/models`: whether it answers 200.
fn models_ok(port: u16) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"GET /v1/models HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.ends_with(b"200")
}
