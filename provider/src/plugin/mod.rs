//! The go-plugin server: handshake, AutoMTLS, the provider service and go-plugin's side
//! services, and orderly shutdown.

pub mod conn;
pub mod handshake;
pub mod log;
pub mod parent;
pub mod services;
pub mod tls;

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tfplugin_protocol::{health, plugin, tfplugin5, tfplugin6};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

use crate::framework::resource::Provider;
use crate::framework::server::Server;
use crate::framework::v5::V5;
use conn::Conn;
use services::ShutdownSignal;

/// Provider address printed in debug mode's TF_REATTACH_PROVIDERS.
pub const PROVIDER_ADDRESS: &str = "registry.terraform.io/agentplane/agentplane";
/// After Shutdown, in-flight calls get this long before the process exits regardless
/// (go-plugin kills the process after 2 s).
const SHUTDOWN_GRACE: Duration = Duration::from_millis(1500);
/// Largest message accepted; state and schema for hundreds of resources stay far below.
const MAX_MESSAGE: usize = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Handshake(#[from] handshake::HandshakeError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot listen on 127.0.0.1: {0}")]
    Listen(std::io::Error),
    #[error("writing the handshake line to stdout failed: {0}")]
    Stdout(std::io::Error),
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// How the process was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Started by Terraform/OpenTofu through go-plugin.
    Plugin,
    /// Started by a person for a debugger; prints TF_REATTACH_PROVIDERS.
    Debug,
}

/// Serves `provider` until the client shuts it down.
pub async fn serve<P: Provider>(provider: P, mode: Mode) -> Result<(), ServeError> {
    let env = |k: &str| std::env::var(k).ok();
    let (proto, mtls) = match mode {
        Mode::Plugin => {
            handshake::check_cookie(env(handshake::MAGIC_COOKIE_KEY).as_deref())?;
            let proto = handshake::negotiate(
                env("PLUGIN_PROTOCOL_VERSIONS").as_deref(),
                env(handshake::PIN_PROTOCOL_ENV).as_deref(),
            )?;
            let mtls = match env("PLUGIN_CLIENT_CERT").filter(|c| !c.is_empty()) {
                Some(pem) => Some(tls::auto_mtls(&pem)?),
                None => None,
            };
            (proto, mtls)
        }
        // Reattach configurations carry no certificate, so debug mode is plaintext on loopback.
        Mode::Debug => (6, None),
    };

    let listener = bind(env("PLUGIN_MIN_PORT"), env("PLUGIN_MAX_PORT")).await?;
    let addr = listener.local_addr().map_err(ServeError::Listen)?;
    let shutdown = ShutdownSignal::new();
    let incoming = accept_loop(listener, mtls.as_ref().map(|m| m.config.clone()));

    let server = Arc::new(Server::new(provider));
    // Shutdown, like StopProvider, cancels in-flight calls so they end well inside the grace.
    let stop = server.stop_token();
    let s = shutdown.clone();
    tokio::spawn(async move {
        s.wait().await;
        stop.cancel();
    });
    let (v6, v5) = if proto == 6 {
        let s = tfplugin6::provider_server::ProviderServer::from_arc(server)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        (Some(s), None)
    } else {
        let s = tfplugin5::provider_server::ProviderServer::new(V5::new(server))
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        (None, Some(s))
    };
    let router = tonic::transport::Server::builder()
        .add_service(health::health_server::HealthServer::new(services::Health {
            shutdown: shutdown.clone(),
        }))
        .add_service(plugin::grpc_controller_server::GrpcControllerServer::new(
            services::Controller {
                shutdown: shutdown.clone(),
            },
        ))
        .add_service(plugin::grpc_stdio_server::GrpcStdioServer::new(
            services::Stdio {
                shutdown: shutdown.clone(),
            },
        ))
        .add_optional_service(v6)
        .add_optional_service(v5);

    match mode {
        Mode::Plugin => {
            let line = handshake::line(
                proto,
                addr,
                mtls.as_ref().map(|m| m.server_cert_der.as_slice()),
            );
            let mut out = std::io::stdout().lock();
            writeln!(out, "{line}")
                .and_then(|()| out.flush())
                .map_err(ServeError::Stdout)?;
            tokio::spawn(ignore_interrupts(shutdown.clone()));
            // A client that dies (even by SIGKILL) never sends Shutdown: stop on our own.
            let s = shutdown.clone();
            tokio::spawn(async move {
                parent::gone().await;
                s.trigger();
            });
        }
        Mode::Debug => {
            print_reattach(addr);
            let s = shutdown.clone();
            tokio::spawn(async move {
                let _ = tokio::signal::ctrl_c().await;
                s.trigger();
            });
        }
    }
    info!(protocol = proto, %addr, tls = mtls.is_some(), "provider serving");

    // Once shutdown starts, the process ends within the grace period even if a call hangs.
    let s = shutdown.clone();
    tokio::spawn(async move {
        s.wait().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
        warn!("in-flight calls did not finish within the shutdown grace period; exiting");
        std::process::exit(0);
    });

    router
        .serve_with_incoming_shutdown(incoming, shutdown.wait())
        .await?;
    debug!("provider stopped");
    Ok(())
}

async fn bind(min: Option<String>, max: Option<String>) -> Result<TcpListener, ServeError> {
    let min: u16 = min.and_then(|v| v.parse().ok()).unwrap_or(0);
    let max: u16 = max.and_then(|v| v.parse().ok()).unwrap_or(0);
    if min == 0 || max < min {
        return TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(ServeError::Listen);
    }
    let mut last = None;
    for port in min..=max {
        match TcpListener::bind(("127.0.0.1", port)).await {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(ServeError::Listen(last.unwrap_or_else(|| {
        std::io::Error::other("empty port range")
    })))
}

/// Accepts TCP connections and, under AutoMTLS, completes the TLS handshake before handing the
/// connection to tonic. A client with the wrong certificate is logged and dropped.
fn accept_loop(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> ReceiverStream<std::io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            match &tls {
                None => {
                    if tx.send(Ok(Conn::Plain(tcp))).await.is_err() {
                        return;
                    }
                }
                Some(cfg) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(cfg.clone());
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
                            .await
                        {
                            Ok(Ok(s)) => {
                                let _ = tx.send(Ok(Conn::Tls(Box::new(s)))).await;
                            }
                            Ok(Err(e)) => {
                                warn!(%peer, error = %e, "rejected TLS client (AutoMTLS certificate mismatch?)")
                            }
                            Err(_) => warn!(%peer, "TLS handshake timed out"),
                        }
                    });
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

/// Terraform forwards Ctrl-C to its plugins' process group but stops them through the
/// protocol; like every go-plugin server we ignore SIGINT and exit on Shutdown or SIGTERM.
async fn ignore_interrupts(shutdown: ShutdownSignal) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return;
    };
    loop {
        tokio::select! {
            _ = int.recv() => debug!("ignoring SIGINT; Terraform stops plugins through the protocol"),
            _ = term.recv() => {
                shutdown.trigger();
                return;
            }
        }
    }
}

fn print_reattach(addr: SocketAddr) {
    let v = serde_json::json!({
        PROVIDER_ADDRESS: {
            "Protocol": "grpc",
            "ProtocolVersion": 6,
            "Pid": std::process::id(),
            "Test": true,
            "Addr": { "Network": "tcp", "String": addr.to_string() },
        }
    });
    println!(
        "Provider started in debug mode. To attach Terraform or OpenTofu, set:\n\n\tTF_REATTACH_PROVIDERS='{v}'\n\nPress Ctrl-C to stop."
    );
}
