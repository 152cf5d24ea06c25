//! The MCP peers the operator's tests run: the reference server-everything (npm, `ci/peers.sh
//! mcp-everything`) and our servers on the Python SDK in `ci/mcp/` (`ci/peers.sh mcp-python`).
// Each test crate that includes this module uses a different part of it.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use agentplane_api::policy::{McpServer, StdioTransport, ToolRule};
use serde_json::Value;

/// The reference server's command.
pub fn everything() -> String {
    agentplane_testsupport::peer_path("mcp-everything")
        .expect("the MCP reference server is a required peer: run ci/peers.sh mcp-everything")
        .to_string_lossy()
        .into_owned()
}

/// Starts the reference server's streamable HTTP transport on a free port.
pub async fn http_everything() -> (tokio::process::Child, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = tokio::process::Command::new(everything())
        .arg("streamableHttp")
        .env("PORT", port.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return (child, port);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the MCP reference server did not listen on {port}");
}

/// The Python interpreter of the SDK's venv (the peer's entry is a wrapper that runs it).
pub fn python() -> String {
    agentplane_testsupport::peer_path("mcp-python")
        .expect("the Python MCP SDK is a required peer: run ci/peers.sh mcp-python")
        .to_string_lossy()
        .into_owned()
}

/// One of our tool servers in `ci/mcp/` (`recorder.py`, `misbehave.py`).
pub fn script(name: &str) -> String {
    agentplane_testsupport::repo_root()
        .join("ci/mcp")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

// ---------------------------------------------------------------------------------------------
// Policy pieces and the recorder's log (`ci/mcp/recorder.py`).

/// A stdio MCP server entry for the policy.
pub fn server(name: &str, command: String, args: Vec<String>) -> McpServer {
    McpServer {
        name: name.into(),
        stdio: Some(StdioTransport {
            command,
            args,
            env: vec![],
        }),
        http: None,
        call_timeout_seconds: 30,
        max_result_bytes: 1 << 20,
        max_tools: 256,
    }
}

pub fn recorder_server(log: &Path) -> McpServer {
    server(
        "rec",
        python(),
        vec![script("recorder.py"), log.to_string_lossy().into_owned()],
    )
}

pub fn tool(server: &str, name: &str, requires_approval: bool) -> ToolRule {
    ToolRule {
        server: server.into(),
        name: name.into(),
        requires_approval,
        rate_limits: vec![],
    }
}

/// One recorded call.
#[derive(Debug, Clone)]
pub struct Call {
    pub tool: String,
    pub arguments: Value,
    pub key: String,
    pub duplicate: bool,
    /// The recorder process that received it.
    pub pid: u32,
    /// SHA-256 (hex) of the `RECORDER_TOKEN` the server was started with, if any.
    pub token_sha256: Option<String>,
}

pub fn recorded(log: &Path) -> Vec<Call> {
    let Ok(text) = std::fs::read_to_string(log) else {
        return Vec::new();
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            Call {
                tool: v["tool"].as_str().unwrap().to_owned(),
                arguments: v["arguments"].clone(),
                key: v["idempotencyKey"].as_str().unwrap_or("").to_owned(),
                duplicate: v["duplicate"].as_bool().unwrap(),
                pid: v["pid"].as_u64().unwrap() as u32,
                token_sha256: v["tokenSha256"].as_str().map(str::to_owned),
            }
        })
        .collect()
}

/// Waits for the recorder to have seen `n` calls.
pub async fn wait_for_calls(log: &Path, n: usize) -> Vec<Call> {
    for _ in 0..600 {
        let calls = recorded(log);
        if calls.len() >= n {
            return calls;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the recorder saw {:?}, not {n} calls", recorded(log));
}

/// Polls until the process is gone (reaped, or at least dead: a zombie no longer runs); panics
/// if it still runs after 5 s.
pub async fn assert_gone(pid: u32) {
    for _ in 0..250 {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return,
            Ok(stat)
                if stat
                    .rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z') =>
            {
                return;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    panic!("the MCP server process {pid} is still running 5 s later");
}
