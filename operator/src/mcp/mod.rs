//! Tools over MCP: one client session per declared server (`AgentPolicy.spec.mcpServers`), over a
//! stdio child process or streamable HTTP, with the `rmcp` SDK.
//!
//! Every call is bounded: connecting and listing by `callTimeoutSeconds`, the listing by `maxTools`
//! (a server listing more is refused as misbehaving), each call by `callTimeoutSeconds` and its
//! result by `maxResultBytes`. Secrets named by `env[].secretRef` / `headers[].secretRef` are read
//! through the runtime's [`SecretSource`] (the KMS-sealed Secrets) when connecting; they go into the
//! child's environment or the request headers and nowhere else: errors name the server and the
//! variable or header, never a value. The child gets only the declared environment (plus `PATH`, so a
//! bare command name resolves), not the worker's own.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use agentplane_api::policy::{McpServer, NamedValue};
use rmcp::model::{CallToolRequestParams, MetaObject, PaginatedRequestParams, RequestMetaObject};
use rmcp::service::{RoleClient, RunningService, ServiceError, ServiceExt as _};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use serde_json::{Map, Value};

use crate::secrets::SecretSource;

mod stdio;

/// Largest single message read from a server, on either transport. It bounds the memory one answer
/// may take before `maxResultBytes` is applied to its text, and is well above that cap (at most
/// 16 MiB) because the text travels JSON-escaped and, from SDKs that fill `structuredContent`,
/// twice.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// The `_meta` key carrying the step's idempotency key on every `tools/call`.
pub const IDEMPOTENCY_META_KEY: &str = "dev.agentplane/idempotencyKey";

/// Why talking to an MCP server failed. Every variant names the server (and the tool or request);
/// none carries a secret: values resolved from `secretRef` are cut out of any text a server or the
/// transport supplied before it lands in an error, and server output is never quoted.
///
/// What the plan loop does with one is [`McpError::is_transient`]: retry the attempt (the task's
/// message is redelivered, a fresh session is connected) or fail the task with this error as its
/// reason. [`McpError::code`] is a stable short name for metrics and status reasons.
#[derive(Debug, thiserror::Error)]
pub enum McpError {
    #[error("MCP server {server}: {name} needs its secret: {reason}")]
    Secret {
        server: String,
        name: String,
        reason: String,
    },
    #[error("MCP server {server}: could not connect: {reason}")]
    Connect { server: String, reason: String },
    #[error("MCP server {server}: {what} timed out after {seconds} s")]
    Timeout {
        server: String,
        what: String,
        seconds: u32,
    },
    #[error("MCP server {server} lists more than {max} tools; refusing it as misbehaving")]
    TooManyTools { server: String, max: u32 },
    #[error("MCP server {server}: tool {tool} returned {bytes} bytes, over the {max}-byte limit")]
    ResultTooLarge {
        server: String,
        tool: String,
        bytes: usize,
        max: u64,
    },
    /// The server broke the protocol: a malformed JSON-RPC message (the session is closed at the
    /// first one), or an answer of the wrong shape.
    #[error("MCP server {server}: {what} failed: {reason}")]
    Protocol {
        server: String,
        what: String,
        reason: String,
    },
    /// The server answered `what` with one message over [`MAX_MESSAGE_BYTES`] (stdio; over HTTP the
    /// transport ends the connection, seen as [`McpError::Crashed`]). The session is closed.
    #[error(
        "MCP server {server}: the answer to {what} is over the {max}-byte message limit; session closed"
    )]
    MessageTooLarge {
        server: String,
        what: String,
        max: usize,
    },
    /// The server went away during `what`: its process exited (stdio) or the connection was lost
    /// (HTTP). The session is closed; a new one must be connected.
    #[error("MCP server {server}: {what} failed: the server went away ({reason})")]
    Crashed {
        server: String,
        what: String,
        reason: String,
    },
    /// The server answered `what` with a JSON-RPC error (an unknown tool, invalid arguments): the
    /// session is fine, the request was refused.
    #[error("MCP server {server}: {what} was refused: {message} (JSON-RPC error {code})")]
    Refused {
        server: String,
        what: String,
        code: i32,
        message: String,
    },
}

impl McpError {
    /// Whether trying the same work again later may succeed: the server crashed, the connection
    /// failed or a call timed out (the plan loop retries the attempt with a fresh session, bounded
    /// by the queue's `maxReceiveCount`). `false` for what will fail the same way every time: a
    /// missing secret, a result over `maxResultBytes`, a listing over `maxTools`, a protocol
    /// violation, a request the server refused. The task then fails with this error as its reason.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            McpError::Connect { .. } | McpError::Timeout { .. } | McpError::Crashed { .. }
        )
    }

    /// A stable short name of the failure (`mcp_timeout`, `mcp_crashed`, ...).
    pub fn code(&self) -> &'static str {
        match self {
            McpError::Secret { .. } => "mcp_secret",
            McpError::Connect { .. } => "mcp_connect",
            McpError::Timeout { .. } => "mcp_timeout",
            McpError::TooManyTools { .. } => "mcp_too_many_tools",
            McpError::ResultTooLarge { .. } | McpError::MessageTooLarge { .. } => {
                "mcp_result_too_large"
            }
            McpError::Protocol { .. } => "mcp_protocol",
            McpError::Crashed { .. } => "mcp_crashed",
            McpError::Refused { .. } => "mcp_refused",
        }
    }
}

/// A tool as the server lists it.
#[derive(Clone, Debug, PartialEq)]
pub struct ListedTool {
    pub name: String,
    pub description: String,
    pub input_schema: Map<String, Value>,
}

/// A tool call's result as fed back to the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolOutput {
    /// The text blocks of the result, joined (other content kinds are summarised by kind).
    pub text: String,
    /// The server marked the result as an error (`isError`): the model sees it as one.
    pub is_error: bool,
}

/// A connected server.
pub struct McpSession {
    server: McpServer,
    service: RunningService<RoleClient, ()>,
    /// The stdio child (killed with its process group on close or drop); `None` over HTTP.
    child: Option<stdio::ChildGuard>,
    /// The first malformed message the stdio server wrote, if any.
    violation: stdio::Violation,
    /// The secret values sent to the server, cut out of any error text (see [`McpError`]).
    redact: Redactor,
}

/// Cuts known secret values out of text that came from a server or a transport.
#[derive(Default)]
struct Redactor(Vec<String>);

impl Redactor {
    fn add(&mut self, value: &str) {
        // A secret of a character or two would redact half of every message and reveal itself.
        if value.len() >= 4 {
            self.0.push(value.to_owned());
        }
    }

    fn clean(&self, text: impl Into<String>) -> String {
        let mut text = text.into();
        for s in &self.0 {
            if text.contains(s.as_str()) {
                text = text.replace(s.as_str(), "[redacted]");
            }
        }
        text
    }
}

/// What became of a stdio server whose request failed: it broke the protocol (the stream was ended
/// at its first malformed line) or its process exited. `wait` gives an exit a moment to be seen
/// when the transport closed (stdout's EOF can come before the exit status).
async fn stdio_failure(
    server: &str,
    what: &str,
    violation: &stdio::Violation,
    child: Option<&stdio::ChildGuard>,
    wait: bool,
) -> Option<McpError> {
    match violation.get() {
        Some(stdio::Broken::Malformed(why)) => {
            return Some(McpError::Protocol {
                server: server.to_owned(),
                what: what.to_owned(),
                reason: format!("malformed JSON-RPC from the server, session closed: {why}"),
            });
        }
        Some(stdio::Broken::Oversized { max }) => {
            return Some(McpError::MessageTooLarge {
                server: server.to_owned(),
                what: what.to_owned(),
                max: *max,
            });
        }
        None => {}
    }
    let child = child?;
    let mut status = child.exit_status();
    for _ in 0..if wait { 50 } else { 0 } {
        if status.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        status = child.exit_status();
    }
    status.map(|status| McpError::Crashed {
        server: server.to_owned(),
        what: what.to_owned(),
        reason: format!("its process exited, {status}"),
    })
}

fn timeout_of(server: &McpServer) -> Duration {
    Duration::from_secs(u64::from(server.call_timeout_seconds.max(1)))
}

async fn resolve(
    server: &str,
    v: &NamedValue,
    secrets: Option<&dyn SecretSource>,
) -> Result<String, McpError> {
    let secret_err = |reason: String| McpError::Secret {
        server: server.to_owned(),
        name: v.name.clone(),
        reason,
    };
    match (&v.value, &v.secret_ref) {
        (Some(value), _) => Ok(value.clone()),
        (None, Some(r)) => {
            let secrets =
                secrets.ok_or_else(|| secret_err("this runtime has no secret source".into()))?;
            let value = secrets
                .get(r)
                .await
                .map_err(|e| secret_err(e.to_string()))?;
            value
                .expose_str()
                .map(str::to_owned)
                .ok_or_else(|| secret_err("the secret is not UTF-8".into()))
        }
        (None, None) => Err(secret_err("neither value nor secretRef is set".into())),
    }
}

impl McpSession {
    /// Connects to `server` and completes the MCP initialisation, within `callTimeoutSeconds`.
    pub async fn connect(
        server: &McpServer,
        secrets: Option<&dyn SecretSource>,
    ) -> Result<McpSession, McpError> {
        let name = server.name.clone();
        let connect_err = |reason: String| McpError::Connect {
            server: name.clone(),
            reason,
        };
        let violation = stdio::Violation::default();
        let mut redact = Redactor::default();
        let mut child = None;
        let connecting = async {
            if let Some(stdio) = &server.stdio {
                let mut cmd = tokio::process::Command::new(&stdio.command);
                cmd.args(&stdio.args)
                    .env_clear()
                    .kill_on_drop(true)
                    .process_group(0)
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::null());
                if let Some(path) = std::env::var_os("PATH") {
                    cmd.env("PATH", path);
                }
                for v in &stdio.env {
                    let value = resolve(&name, v, secrets).await?;
                    if v.secret_ref.is_some() {
                        redact.add(&value);
                    }
                    cmd.env(&v.name, value);
                }
                let mut spawned = cmd
                    .spawn()
                    .map_err(|e| connect_err(format!("starting {:?}: {e}", stdio.command)))?;
                let (Some(stdout), Some(stdin)) = (spawned.stdout.take(), spawned.stdin.take())
                else {
                    return Err(connect_err("the child has no stdio pipes".into()));
                };
                let guard = child.insert(stdio::ChildGuard::new(spawned));
                let reader = stdio::StrictLines::new(stdout, MAX_MESSAGE_BYTES, violation.clone());
                let transport =
                    rmcp::transport::async_rw::AsyncRwTransport::<RoleClient, _, _>::new(
                        reader, stdin,
                    )
                    .with_max_line_length(MAX_MESSAGE_BYTES);
                match ().serve(transport).await {
                    Ok(service) => Ok(service),
                    Err(e) => Err(
                        match stdio_failure(&name, "initialize", &violation, Some(guard), true)
                            .await
                        {
                            Some(err) => err,
                            None => connect_err(redact.clean(e.to_string())),
                        },
                    ),
                }
            } else if let Some(http) = &server.http {
                let mut headers = HashMap::new();
                for v in &http.headers {
                    let value = resolve(&name, v, secrets).await?;
                    if v.secret_ref.is_some() {
                        redact.add(&value);
                    }
                    let header_name = reqwest::header::HeaderName::from_bytes(v.name.as_bytes())
                        .map_err(|_| connect_err(format!("bad header name {:?}", v.name)))?;
                    let mut header_value = reqwest::header::HeaderValue::from_str(&value)
                        .map_err(|_| connect_err(format!("header {} has a bad value", v.name)))?;
                    header_value.set_sensitive(true);
                    headers.insert(header_name, header_value);
                }
                let mut config = StreamableHttpClientTransportConfig::with_uri(http.url.as_str());
                config.custom_headers = headers;
                config.max_sse_event_size = MAX_MESSAGE_BYTES;
                config.max_json_response_size = MAX_MESSAGE_BYTES;
                let transport = StreamableHttpClientTransport::with_client(
                    reqwest::Client::builder()
                        .redirect(reqwest::redirect::Policy::none())
                        .build()
                        .map_err(|e| connect_err(e.to_string()))?,
                    config,
                );
                ().serve(transport)
                    .await
                    .map_err(|e| connect_err(redact.clean(e.to_string())))
            } else {
                Err(connect_err("no transport (stdio or http) is set".into()))
            }
        };
        let outcome = tokio::time::timeout(timeout_of(server), connecting).await;
        let service = match outcome {
            Ok(Ok(service)) => service,
            Ok(Err(e)) => {
                if let Some(c) = &child {
                    c.shutdown(Duration::ZERO).await;
                }
                return Err(e);
            }
            Err(_) => {
                if let Some(c) = &child {
                    c.shutdown(Duration::ZERO).await;
                }
                return Err(McpError::Timeout {
                    server: name.clone(),
                    what: "connecting".into(),
                    seconds: server.call_timeout_seconds,
                });
            }
        };
        Ok(McpSession {
            server: server.clone(),
            service,
            child,
            violation,
            redact,
        })
    }

    /// The stdio server's process id (`None` over HTTP): for diagnostics and for tests that check
    /// the process is gone after [`McpSession::close`].
    pub fn server_pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(stdio::ChildGuard::pid)
    }

    /// Whether the session can no longer carry requests (the server went away or broke the
    /// protocol): a caller holding it for later steps should connect a new one.
    pub fn is_closed(&self) -> bool {
        self.service.is_transport_closed() || self.violation.get().is_some()
    }

    /// Turns a failed request into the error that says what happened to the server.
    async fn request_failed(&self, what: String, e: ServiceError) -> McpError {
        let server = self.server.name.clone();
        let closed = matches!(
            e,
            ServiceError::TransportClosed | ServiceError::TransportSend(_)
        );
        if let Some(err) =
            stdio_failure(&server, &what, &self.violation, self.child.as_ref(), closed).await
        {
            return err;
        }
        match e {
            ServiceError::McpError(data) => McpError::Refused {
                server,
                what,
                code: data.code.0,
                message: self.redact.clean(data.message.into_owned()),
            },
            ServiceError::TransportClosed | ServiceError::TransportSend(_) => McpError::Crashed {
                server,
                what,
                reason: self.redact.clean(match self.child {
                    Some(_) => "the server closed its stdout".to_owned(),
                    None => format!(
                        "connection lost: {e}; an answer over the {MAX_MESSAGE_BYTES}-byte message \
                         limit ends it too"
                    ),
                }),
            },
            other => McpError::Protocol {
                server,
                what,
                reason: self.redact.clean(other.to_string()),
            },
        }
    }

    /// Every tool the server lists, page by page, refusing a server that lists more than `maxTools`.
    pub async fn list_tools(&self) -> Result<Vec<ListedTool>, McpError> {
        let server = &self.server;
        let listing = async {
            let mut tools = Vec::new();
            let mut cursor = None;
            loop {
                let params = cursor
                    .take()
                    .map(|c| PaginatedRequestParams::default().with_cursor(Some(c)));
                let page = match self.service.list_tools(params).await {
                    Ok(page) => page,
                    Err(e) => return Err(self.request_failed("tools/list".into(), e).await),
                };
                for t in page.tools {
                    if tools.len() >= server.max_tools as usize {
                        return Err(McpError::TooManyTools {
                            server: server.name.clone(),
                            max: server.max_tools,
                        });
                    }
                    tools.push(ListedTool {
                        name: t.name.into_owned(),
                        description: t.description.map(|d| d.into_owned()).unwrap_or_default(),
                        input_schema: Map::clone(&t.input_schema),
                    });
                }
                match page.next_cursor {
                    Some(c) => cursor = Some(c),
                    None => return Ok(tools),
                }
            }
        };
        tokio::time::timeout(timeout_of(server), listing)
            .await
            .map_err(|_| McpError::Timeout {
                server: server.name.clone(),
                what: "tools/list".into(),
                seconds: server.call_timeout_seconds,
            })?
    }

    /// Calls `tool` with `arguments`, carrying `idempotency_key` in `_meta`.
    pub async fn call(
        &self,
        tool: &str,
        arguments: Map<String, Value>,
        idempotency_key: &str,
    ) -> Result<ToolOutput, McpError> {
        let server = &self.server;
        let mut meta = Map::new();
        meta.insert(IDEMPOTENCY_META_KEY.into(), idempotency_key.into());
        let mut params = CallToolRequestParams::new(tool.to_owned()).with_arguments(arguments);
        params.meta = Some(RequestMetaObject(MetaObject(meta)));
        let span =
            tracing::info_span!("mcp.tool_call", otel.kind = "client", server = %server.name, tool);
        let call = tracing::Instrument::instrument(self.service.call_tool(params), span);
        let result = match tokio::time::timeout(timeout_of(server), call).await {
            Err(_) => {
                return Err(McpError::Timeout {
                    server: server.name.clone(),
                    what: format!("tool {tool}"),
                    seconds: server.call_timeout_seconds,
                });
            }
            Ok(Err(e)) => return Err(self.request_failed(format!("tool {tool}"), e).await),
            Ok(Ok(result)) => result,
        };
        let mut text = String::new();
        for block in &result.content {
            match block.as_text() {
                Some(t) => text.push_str(&t.text),
                None => text.push_str("[non-text content]"),
            }
        }
        if text.is_empty()
            && let Some(structured) = &result.structured_content
        {
            text = structured.to_string();
        }
        if text.len() as u64 > server.max_result_bytes {
            return Err(McpError::ResultTooLarge {
                server: server.name.clone(),
                tool: tool.to_owned(),
                bytes: text.len(),
                max: server.max_result_bytes,
            });
        }
        Ok(ToolOutput {
            text,
            is_error: result.is_error.unwrap_or(false),
        })
    }

    /// Ends the session (the stdio child is killed with it).
    ///
    /// A stdio server gets a moment to exit once its stdin is closed, then its process group is
    /// killed; dropping a session without `close` kills the group at once.
    pub async fn close(self) {
        let _ = self.service.cancel().await;
        if let Some(child) = &self.child {
            child.shutdown(Duration::from_secs(2)).await;
        }
    }
}

/// Sessions shared by a worker's plans, one per server name.
pub type SharedSession = Arc<McpSession>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crashes_timeouts_and_connects_are_retried_everything_else_fails_the_task() {
        let s = || "srv".to_owned();
        let w = || "tool x".to_owned();
        let retried = [
            McpError::Connect {
                server: s(),
                reason: "refused".into(),
            },
            McpError::Timeout {
                server: s(),
                what: w(),
                seconds: 1,
            },
            McpError::Crashed {
                server: s(),
                what: w(),
                reason: "exited".into(),
            },
        ];
        let failed = [
            McpError::TooManyTools {
                server: s(),
                max: 1,
            },
            McpError::ResultTooLarge {
                server: s(),
                tool: "x".into(),
                bytes: 2,
                max: 1,
            },
            McpError::MessageTooLarge {
                server: s(),
                what: w(),
                max: 1,
            },
            McpError::Protocol {
                server: s(),
                what: w(),
                reason: "bad".into(),
            },
            McpError::Refused {
                server: s(),
                what: w(),
                code: -32602,
                message: "bad arguments".into(),
            },
            McpError::Secret {
                server: s(),
                name: "TOKEN".into(),
                reason: "missing".into(),
            },
        ];
        for e in &retried {
            assert!(e.is_transient(), "{e}");
        }
        for e in &failed {
            assert!(!e.is_transient(), "{e}");
            assert!(e.to_string().starts_with("MCP server srv"), "{e}");
        }
    }

    #[test]
    fn the_redactor_cuts_secret_values_but_not_tiny_ones() {
        let mut r = Redactor::default();
        r.add("s3cret-value");
        r.add("ab");
        assert_eq!(
            r.clean("got s3cret-value twice: s3cret-value, ab"),
            "got [redacted] twice: [redacted], ab"
        );
    }
}
