//! The MCP client against the real MCP reference server (`@modelcontextprotocol/server-everything`,
//! pinned in ci/peers.sh) over stdio and over streamable HTTP: listing, calls, secrets injected as
//! env and headers, and the limits (result size, tool count, per-call timeout).

mod mcp_peers;

use agentplane::mcp::{McpError, McpSession};
use agentplane::secrets::FileSecrets;
use agentplane_api::policy::{HttpTransport, McpServer, NamedValue, SecretKeyRef, StdioTransport};
use mcp_peers::{everything, http_everything};
use serde_json::{Map, Value, json};

fn args(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

fn stdio_server(env: Vec<NamedValue>) -> McpServer {
    McpServer {
        name: "everything".into(),
        stdio: Some(StdioTransport {
            command: everything(),
            args: vec!["stdio".into()],
            env,
        }),
        http: None,
        call_timeout_seconds: 20,
        max_result_bytes: 1 << 20,
        max_tools: 256,
    }
}

fn secrets() -> (tempfile::TempDir, FileSecrets) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("mcp")).unwrap();
    std::fs::write(dir.path().join("mcp/token"), "s3cret-value\n").unwrap();
    let s = FileSecrets::new(dir.path());
    (dir, s)
}

fn secret_env() -> Vec<NamedValue> {
    vec![NamedValue {
        name: "API_TOKEN".into(),
        value: None,
        secret_ref: Some(SecretKeyRef {
            name: "mcp".into(),
            key: "token".into(),
        }),
    }]
}

#[tokio::test]
async fn stdio_lists_calls_and_injects_only_the_declared_environment() {
    let (_dir, secrets) = secrets();
    let session = McpSession::connect(&stdio_server(secret_env()), Some(&secrets))
        .await
        .unwrap();
    let tools = session.list_tools().await.unwrap();
    let names: Vec<&str> = tools.iter().map(|t| t.name.as_str()).collect();
    assert!(
        names.contains(&"echo") && names.contains(&"get-sum"),
        "{names:?}"
    );
    let sum = tools.iter().find(|t| t.name == "get-sum").unwrap();
    assert_eq!(sum.input_schema["type"], "object");

    let out = session
        .call("get-sum", args(json!({"a": 2, "b": 40})), "t1/tool/2")
        .await
        .unwrap();
    assert!(out.text.contains("42"), "{}", out.text);
    assert!(!out.is_error);

    let env = session
        .call("get-env", Map::new(), "t1/tool/3")
        .await
        .unwrap();
    assert!(
        env.text.contains("s3cret-value"),
        "the secret reaches the child's env"
    );
    assert!(
        !env.text.contains("CARGO_MANIFEST_DIR"),
        "the worker's own environment is not passed on: {}",
        env.text
    );
    session.close().await;
}

#[tokio::test]
async fn a_missing_secret_fails_the_connect_and_names_the_variable_not_a_value() {
    let (_dir, secrets) = secrets();
    let mut env = secret_env();
    env[0].secret_ref.as_mut().unwrap().key = "absent".into();
    let Err(e) = McpSession::connect(&stdio_server(env), Some(&secrets)).await else {
        panic!("connect must fail without its secret");
    };
    assert!(matches!(e, McpError::Secret { .. }), "{e}");
    assert!(e.to_string().contains("API_TOKEN"), "{e}");
}

#[tokio::test]
async fn limits_refuse_large_results_long_listings_and_slow_calls() {
    let (_dir, secrets) = secrets();
    let mut server = stdio_server(secret_env());
    server.max_result_bytes = 64;
    server.max_tools = 3;
    server.call_timeout_seconds = 2;
    let session = McpSession::connect(&server, Some(&secrets)).await.unwrap();
    let e = session.list_tools().await.unwrap_err();
    assert!(matches!(e, McpError::TooManyTools { max: 3, .. }), "{e}");

    let e = session
        .call("get-env", Map::new(), "t2/tool/1")
        .await
        .unwrap_err();
    assert!(matches!(e, McpError::ResultTooLarge { max: 64, .. }), "{e}");
    assert!(
        !e.to_string().contains("s3cret"),
        "errors never carry results: {e}"
    );

    let e = session
        .call(
            "trigger-long-running-operation",
            args(json!({"duration": 30, "steps": 3})),
            "t2/tool/2",
        )
        .await
        .unwrap_err();
    assert!(matches!(e, McpError::Timeout { seconds: 2, .. }), "{e}");
    // The session still serves other calls after a timed-out one.
    let ok = session
        .call("echo", args(json!({"message": "still here"})), "t2/tool/3")
        .await
        .unwrap();
    assert!(ok.text.contains("still here"), "{}", ok.text);
    session.close().await;
}

#[tokio::test]
async fn streamable_http_calls_with_headers_from_secrets() {
    let (_dir, secrets) = secrets();
    let (_child, port) = http_everything().await;
    let server = McpServer {
        name: "everything-http".into(),
        stdio: None,
        http: Some(HttpTransport {
            url: format!("http://127.0.0.1:{port}/mcp"),
            headers: vec![NamedValue {
                name: "Authorization".into(),
                value: None,
                secret_ref: Some(SecretKeyRef {
                    name: "mcp".into(),
                    key: "token".into(),
                }),
            }],
        }),
        call_timeout_seconds: 20,
        max_result_bytes: 1 << 20,
        max_tools: 256,
    };
    let session = McpSession::connect(&server, Some(&secrets)).await.unwrap();
    let tools = session.list_tools().await.unwrap();
    assert!(tools.iter().any(|t| t.name == "echo"));
    let out = session
        .call("echo", args(json!({"message": "over http"})), "t3/tool/1")
        .await
        .unwrap();
    assert_eq!(out.text, "Echo: over http");
    session.close().await;
}
