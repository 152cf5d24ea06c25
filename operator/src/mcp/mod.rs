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
use rmcp::service::{RoleClient, RunningService, ServiceExt as _};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess};
use serde_json::{Map, Value};

use crate::secrets::SecretSource;

/// The `_meta` key carrying the step's idempotency key on every `tools/call`.
pub const IDEMPOTENCY_META_KEY: &str = "dev.agentplane/idempotencyKey";

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
    #[error("MCP server {server}: {what} failed: {reason}")]
    Protocol {
        server: String,
        what: String,
        reason: String,
    },
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
        let connecting = async {
            if let Some(stdio) = &server.stdio {
                let mut cmd = tokio::process::Command::new(&stdio.command);
                cmd.args(&stdio.args).env_clear().kill_on_drop(true);
                if let Some(path) = std::env::var_os("PATH") {
                    cmd.env("PATH", path);
                }
                for v in &stdio.env {
                    cmd.env(&v.name, resolve(&name, v, secrets).await?);
                }
                let (transport, _stderr) = TokioChildProcess::builder(cmd)
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .map_err(|e| connect_err(format!("starting {:?}: {e}", stdio.command)))?;
                ().serve(transport)
                    .await
                    .map_err(|e| connect_err(e.to_string()))
            } else if let Some(http) = &server.http {
                let mut headers = HashMap::new();
                for v in &http.headers {
                    let value = resolve(&name, v, secrets).await?;
                    let header_name = reqwest::header::HeaderName::from_bytes(v.name.as_bytes())
                        .map_err(|_| connect_err(format!("bad header name {:?}", v.name)))?;
                    let mut header_value = reqwest::header::HeaderValue::from_str(&value)
                        .map_err(|_| connect_err(format!("header {} has a bad value", v.name)))?;
                    header_value.set_sensitive(true);
                    headers.insert(header_name, header_value);
                }
                let mut config = StreamableHttpClientTransportConfig::with_uri(http.url.as_str());
                config.custom_headers = headers;
                let transport = StreamableHttpClientTransport::with_client(
                    reqwest::Client::builder()
                        .redirect(reqwest::redirect::Policy::none())
                        .build()
                        .map_err(|e| connect_err(e.to_string()))?,
                    config,
                );
                ().serve(transport)
                    .await
                    .map_err(|e| connect_err(e.to_string()))
            } else {
                Err(connect_err("no transport (stdio or http) is set".into()))
            }
        };
        let service = tokio::time::timeout(timeout_of(server), connecting)
            .await
            .map_err(|_| McpError::Timeout {
                server: name.clone(),
                what: "connecting".into(),
                seconds: server.call_timeout_seconds,
            })??;
        Ok(McpSession {
            server: server.clone(),
            service,
        })
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
                let page =
                    self.service
                        .list_tools(params)
                        .await
                        .map_err(|e| McpError::Protocol {
                            server: server.name.clone(),
                            what: "tools/list".into(),
                            reason: e.to_string(),
                        })?;
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
        let result = tokio::time::timeout(timeout_of(server), call)
            .await
            .map_err(|_| McpError::Timeout {
                server: server.name.clone(),
                what: format!("tool {tool}"),
                seconds: server.call_timeout_seconds,
            })?
            .map_err(|e| McpError::Protocol {
                server: server.name.clone(),
                what: format!("tool {tool}"),
                reason: e.to_string(),
            })?;
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
    pub async fn close(self) {
        let _ = self.service.cancel().await;
    }
}

/// Sessions shared by a worker's plans, one per server name.
pub type SharedSession = Arc<McpSession>;
