//! The MCP client against servers that misbehave: `ci/mcp/misbehave.py`, a real MCP server written
//! with the Python `mcp` SDK (2.3.0, `ci/peers.sh mcp-python`), over stdio and streamable HTTP. Each
//! case must end in a typed error naming the server, the tool and the limit, within bounds set by the
//! per-call timeout; the server process must be gone after close or drop; a secret sent as env or
//! header must not appear in any error; and other sessions must keep working.
//!
//! Elapsed times are asserted against generous bounds (a crash is seen long before the timeout, a
//! hang ends at the timeout); they are not benchmarks.

use std::time::{Duration, Instant};

mod mcp_peers;

use agentplane::mcp::{McpError, McpSession};
use agentplane::secrets::FileSecrets;
use agentplane_api::policy::{HttpTransport, McpServer, NamedValue, SecretKeyRef, StdioTransport};
use mcp_peers::{assert_gone, python, script};
use serde_json::{Map, Value, json};

const SECRET: &str = "s3cret-token-value";

/// The SDK venv's interpreter. The peer entry is a symlink into the venv (`venv/bin/python`);
/// Python finds its venv from the path it was started by, so the link is followed one step to a
/// path inside the venv (following it all the way would leave the venv).
fn args(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

fn secrets() -> (tempfile::TempDir, FileSecrets) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("mcp")).unwrap();
    std::fs::write(dir.path().join("mcp/token"), format!("{SECRET}\n")).unwrap();
    let s = FileSecrets::new(dir.path());
    (dir, s)
}

fn secret_ref(name: &str) -> NamedValue {
    NamedValue {
        name: name.into(),
        value: None,
        secret_ref: Some(SecretKeyRef {
            name: "mcp".into(),
            key: "token".into(),
        }),
    }
}

/// `misbehave.py MODE` over stdio, with the secret as `API_TOKEN`.
fn stdio_server(name: &str, mode: &str, timeout_s: u32) -> McpServer {
    McpServer {
        name: name.into(),
        stdio: Some(StdioTransport {
            command: python(),
            args: vec![script("misbehave.py"), mode.into()],
            env: vec![secret_ref("API_TOKEN")],
        }),
        http: None,
        call_timeout_seconds: timeout_s,
        max_result_bytes: 1 << 20,
        max_tools: 4096,
    }
}

fn assert_clean(e: &McpError, server: &str) {
    let text = e.to_string();
    assert!(
        text.contains(&format!("MCP server {server}")),
        "names the server: {text}"
    );
    assert!(!text.contains(SECRET), "no secret in errors: {text}");
    assert!(!format!("{e:?}").contains(SECRET), "nor in Debug: {e:?}");
}

/// A fresh session to a well-behaved server still works: the misbehaviour broke nothing else.
async fn other_server_works(secrets: &FileSecrets) {
    let session = McpSession::connect(&stdio_server("healthy", "tools", 20), Some(secrets))
        .await
        .unwrap();
    let out = session
        .call("echo", args(json!({"message": "fine"})), "t/ok/1")
        .await
        .unwrap();
    assert_eq!(out.text, "echo: fine");
    session.close().await;
}

#[tokio::test]
async fn a_stdio_server_that_crashes_mid_call_fails_the_call_at_once_as_transient() {
    let (_dir, secrets) = secrets();
    let session = McpSession::connect(&stdio_server("crashy", "tools", 20), Some(&secrets))
        .await
        .unwrap();
    let pid = session.server_pid().expect("a stdio session has a pid");
    assert!(session.list_tools().await.unwrap().len() >= 5);

    let started = Instant::now();
    let e = session
        .call("crash", Map::new(), "t1/tool/1")
        .await
        .unwrap_err();
    let elapsed = started.elapsed();
    assert!(matches!(e, McpError::Crashed { .. }), "{e}");
    assert!(e.to_string().contains("tool crash"), "{e}");
    assert!(e.to_string().contains("exit status: 3"), "{e}");
    assert!(e.is_transient(), "a crash is retried with a new session");
    assert_eq!(e.code(), "mcp_crashed");
    assert_clean(&e, "crashy");
    assert!(
        elapsed < Duration::from_secs(10),
        "seen as the process exits, not at the 20 s timeout: {elapsed:?}"
    );
    assert!(session.is_closed());

    // The dead session answers further calls with the same kind of error, without waiting.
    let started = Instant::now();
    let again = session
        .call("echo", args(json!({"message": "x"})), "t1/tool/2")
        .await
        .unwrap_err();
    assert!(matches!(again, McpError::Crashed { .. }), "{again}");
    assert!(started.elapsed() < Duration::from_secs(10));

    session.close().await;
    assert_gone(pid).await;
    other_server_works(&secrets).await;
}

#[tokio::test]
async fn a_stdio_tool_that_hangs_ends_at_the_per_call_timeout_and_the_session_lives_on() {
    let (_dir, secrets) = secrets();
    // The per-call timeout also bounds connecting, which includes the interpreter's start: 6 s
    // leaves room for a loaded machine.
    let session = McpSession::connect(&stdio_server("hangs", "tools", 6), Some(&secrets))
        .await
        .unwrap();
    let pid = session.server_pid().unwrap();

    let started = Instant::now();
    let e = session
        .call("hang", Map::new(), "t2/tool/1")
        .await
        .unwrap_err();
    let elapsed = started.elapsed();
    assert!(matches!(e, McpError::Timeout { seconds: 6, .. }), "{e}");
    assert!(
        e.to_string().contains("tool hang timed out after 6 s"),
        "{e}"
    );
    assert!(e.is_transient());
    assert_clean(&e, "hangs");
    assert!(
        elapsed >= Duration::from_millis(5900) && elapsed < Duration::from_secs(20),
        "bounded by the 6 s per-call timeout: {elapsed:?}"
    );

    // The same session serves the next call.
    let ok = session
        .call("echo", args(json!({"message": "after"})), "t2/tool/2")
        .await
        .unwrap();
    assert_eq!(ok.text, "echo: after");
    assert!(!session.is_closed());
    session.close().await;
    assert_gone(pid).await;
    other_server_works(&secrets).await;
}

#[tokio::test]
async fn ten_megabytes_over_stdio_are_refused_by_the_result_cap_and_the_session_lives_on() {
    let (_dir, secrets) = secrets();
    let session = McpSession::connect(&stdio_server("huge", "tools", 30), Some(&secrets))
        .await
        .unwrap();
    let pid = session.server_pid().unwrap();
    let e = session
        .call("huge", args(json!({"megabytes": 10})), "t3/tool/1")
        .await
        .unwrap_err();
    match &e {
        McpError::ResultTooLarge {
            tool, bytes, max, ..
        } => {
            assert_eq!(tool, "huge");
            assert_eq!(*bytes, 10 << 20);
            assert_eq!(*max, 1 << 20);
        }
        other => panic!("expected ResultTooLarge, got {other}"),
    }
    assert!(!e.is_transient(), "the same call would be as large again");
    assert!(e.to_string().contains("over the 1048576-byte limit"), "{e}");
    assert_clean(&e, "huge");

    let ok = session
        .call("echo", args(json!({"message": "small"})), "t3/tool/2")
        .await
        .unwrap();
    assert_eq!(ok.text, "echo: small");
    session.close().await;
    assert_gone(pid).await;
    other_server_works(&secrets).await;
}

#[tokio::test]
async fn an_answer_over_the_message_limit_closes_the_stdio_session_with_its_own_error() {
    let (_dir, secrets) = secrets();
    let session = McpSession::connect(&stdio_server("giant", "tools", 60), Some(&secrets))
        .await
        .unwrap();
    let pid = session.server_pid().unwrap();
    // 40 MB of text, sent by the SDK as text and again as structured content: over 64 MiB.
    let started = Instant::now();
    let e = session
        .call("huge", args(json!({"megabytes": 40})), "t3b/tool/1")
        .await
        .unwrap_err();
    assert!(
        matches!(e, McpError::MessageTooLarge { max, .. } if max == agentplane::mcp::MAX_MESSAGE_BYTES),
        "{e}"
    );
    assert!(e.to_string().contains("tool huge"), "{e}");
    assert!(!e.is_transient());
    assert_eq!(e.code(), "mcp_result_too_large");
    assert_clean(&e, "giant");
    assert!(
        started.elapsed() < Duration::from_secs(50),
        "refused as the limit is crossed, not at the timeout: {:?}",
        started.elapsed()
    );
    assert!(session.is_closed());
    session.close().await;
    assert_gone(pid).await;
    other_server_works(&secrets).await;
}

#[tokio::test]
async fn a_server_listing_ten_thousand_tools_is_refused_at_max_tools() {
    let (_dir, secrets) = secrets();
    let session = McpSession::connect(&stdio_server("many", "many-tools", 30), Some(&secrets))
        .await
        .unwrap();
    let pid = session.server_pid().unwrap();
    let e = session.list_tools().await.unwrap_err();
    assert!(matches!(e, McpError::TooManyTools { max: 4096, .. }), "{e}");
    assert!(e.to_string().contains("more than 4096 tools"), "{e}");
    assert!(!e.is_transient());
    assert_clean(&e, "many");
    // Refusing the listing does not break the session.
    let ok = session
        .call("echo-9999", args(json!({"message": "last"})), "t4/tool/1")
        .await
        .unwrap();
    assert_eq!(ok.text, "echo: last");
    session.close().await;
    assert_gone(pid).await;
    other_server_works(&secrets).await;
}

#[tokio::test]
async fn malformed_json_rpc_on_stdout_closes_the_session_with_a_protocol_error_at_once() {
    let (_dir, secrets) = secrets();
    let session = McpSession::connect(&stdio_server("garbled", "garbage", 20), Some(&secrets))
        .await
        .unwrap();
    let pid = session.server_pid().unwrap();

    let started = Instant::now();
    let e = session.list_tools().await.unwrap_err();
    let elapsed = started.elapsed();
    assert!(matches!(e, McpError::Protocol { .. }), "{e}");
    let text = e.to_string();
    assert!(text.contains("tools/list"), "{text}");
    assert!(text.contains("malformed JSON-RPC"), "{text}");
    assert!(text.contains("stdout line 2"), "names the line: {text}");
    assert!(
        !e.is_transient(),
        "a server that writes garbage fails the task"
    );
    assert_eq!(e.code(), "mcp_protocol");
    // The garbage line carries the secret the server got in its environment: never quoted.
    assert_clean(&e, "garbled");
    assert!(
        elapsed < Duration::from_secs(10),
        "ended at the bad line, not at the 20 s timeout: {elapsed:?}"
    );
    assert!(session.is_closed());

    let again = session
        .call("echo", args(json!({"message": "x"})), "t5/tool/1")
        .await
        .unwrap_err();
    assert!(matches!(again, McpError::Protocol { .. }), "{again}");
    assert_clean(&again, "garbled");

    session.close().await;
    assert_gone(pid).await;
    other_server_works(&secrets).await;
}

#[tokio::test]
async fn a_session_dropped_without_close_kills_its_server() {
    let (_dir, secrets) = secrets();
    let session = McpSession::connect(&stdio_server("dropped", "tools", 20), Some(&secrets))
        .await
        .unwrap();
    let pid = session.server_pid().unwrap();
    // A hanging call in flight when the plan is abandoned.
    let _ = tokio::time::timeout(
        Duration::from_millis(300),
        session.call("hang", Map::new(), "t6/tool/1"),
    )
    .await;
    drop(session);
    assert_gone(pid).await;
}

/// `misbehave.py --http PORT tools` on a free port.
async fn http_misbehave() -> (tokio::process::Child, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = tokio::process::Command::new(python())
        .args([
            script("misbehave.py"),
            "--http".into(),
            port.to_string(),
            "tools".into(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return (child, port);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("misbehave.py did not listen on {port}");
}

#[tokio::test]
async fn over_streamable_http_huge_hang_and_crash_end_in_clear_errors() {
    let (_dir, secrets) = secrets();
    let (mut child, port) = http_misbehave().await;
    let server = McpServer {
        name: "http-bad".into(),
        stdio: None,
        http: Some(HttpTransport {
            url: format!("http://127.0.0.1:{port}/mcp"),
            headers: vec![secret_ref("Authorization")],
        }),
        call_timeout_seconds: 3,
        max_result_bytes: 1 << 20,
        max_tools: 4096,
    };
    let session = McpSession::connect(&server, Some(&secrets)).await.unwrap();
    assert!(session.server_pid().is_none());

    let e = session
        .call("huge", args(json!({"megabytes": 10})), "t7/tool/1")
        .await
        .unwrap_err();
    assert!(
        matches!(e, McpError::ResultTooLarge { bytes, max, .. } if bytes == 10 << 20 && max == 1 << 20),
        "{e}"
    );
    assert_clean(&e, "http-bad");

    let started = Instant::now();
    let e = session
        .call("hang", Map::new(), "t7/tool/2")
        .await
        .unwrap_err();
    let elapsed = started.elapsed();
    assert!(matches!(e, McpError::Timeout { seconds: 3, .. }), "{e}");
    assert!(
        elapsed >= Duration::from_millis(2900) && elapsed < Duration::from_secs(20),
        "bounded by the 3 s per-call timeout: {elapsed:?}"
    );
    assert_clean(&e, "http-bad");
    let ok = session
        .call("echo", args(json!({"message": "still"})), "t7/tool/3")
        .await
        .unwrap();
    assert_eq!(ok.text, "echo: still");

    let started = Instant::now();
    let e = session
        .call("crash", Map::new(), "t7/tool/4")
        .await
        .unwrap_err();
    assert!(matches!(e, McpError::Crashed { .. }), "{e}");
    assert!(e.is_transient());
    assert!(e.to_string().contains("tool crash"), "{e}");
    assert_clean(&e, "http-bad");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("the crashed server exited")
        .unwrap();
    assert_eq!(status.code(), Some(3));

    // Calls on the dead connection fail, as crashes, within the timeout.
    let e = session
        .call("echo", args(json!({"message": "x"})), "t7/tool/5")
        .await
        .unwrap_err();
    assert!(
        matches!(e, McpError::Crashed { .. } | McpError::Timeout { .. }),
        "{e}"
    );
    assert!(e.is_transient());
    assert_clean(&e, "http-bad");
    session.close().await;
    other_server_works(&secrets).await;
}
