//! The MCP peers the operator's tests run: the reference server-everything (npm, `ci/peers.sh
//! mcp-everything`) and our servers on the Python SDK in `ci/mcp/` (`ci/peers.sh mcp-python`).
// Each test crate that includes this module uses a different part of it.
#![allow(dead_code)]

use std::time::Duration;

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
