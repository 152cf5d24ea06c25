//! go-plugin's side services: controller (Shutdown), stdio and gRPC health.

use std::pin::Pin;

use futures::{Stream, StreamExt, stream};
use tfplugin_protocol::health::{self, HealthCheckRequest, HealthCheckResponse};
use tfplugin_protocol::plugin::{self, StdioData};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

/// The boxed stream type the generated streaming methods return.
type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Name go-plugin clients health-check.
pub const HEALTH_SERVICE: &str = "plugin";

/// Fires once when the client asks the plugin to shut down.
#[derive(Clone)]
pub struct ShutdownSignal {
    tx: watch::Sender<bool>,
}

impl ShutdownSignal {
    pub fn new() -> Self {
        ShutdownSignal {
            tx: watch::channel(false).0,
        }
    }
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }
    /// Resolves once shutdown was requested (immediately if it already was).
    pub async fn wait(&self) {
        let mut rx = self.tx.subscribe();
        // An error means the sender is gone, which only happens at process exit.
        let _ = rx.wait_for(|v| *v).await;
    }
}

impl Default for ShutdownSignal {
    fn default() -> Self {
        Self::new()
    }
}

/// A stream that yields nothing and ends at shutdown, so long-lived streaming calls do not
/// hold up graceful shutdown.
fn until_shutdown<T: Send + 'static>(sig: ShutdownSignal) -> BoxStream<T> {
    Box::pin(stream::once(async move { sig.wait().await }).filter_map(|()| async { None }))
}

pub struct Controller {
    pub shutdown: ShutdownSignal,
}

#[tonic::async_trait]
impl plugin::grpc_controller_server::GrpcController for Controller {
    async fn shutdown(&self, _: Request<plugin::Empty>) -> Result<Response<plugin::Empty>, Status> {
        tracing::debug!("controller shutdown requested");
        self.shutdown.trigger();
        Ok(Response::new(plugin::Empty {}))
    }
}

pub struct Stdio {
    pub shutdown: ShutdownSignal,
}

#[tonic::async_trait]
impl plugin::grpc_stdio_server::GrpcStdio for Stdio {
    /// The provider never writes to stdout or stderr outside the handshake line and its
    /// structured logs (which go-plugin reads from the stderr pipe), so there is nothing to
    /// forward; the stream stays open until shutdown as the client expects.
    async fn stream_stdio(&self, _: Request<()>) -> Result<Response<BoxStream<StdioData>>, Status> {
        Ok(Response::new(until_shutdown(self.shutdown.clone())))
    }
}

pub struct Health {
    pub shutdown: ShutdownSignal,
}

fn status_for(service: &str) -> health::health_check_response::ServingStatus {
    use health::health_check_response::ServingStatus;
    if service.is_empty() || service == HEALTH_SERVICE {
        ServingStatus::Serving
    } else {
        ServingStatus::ServiceUnknown
    }
}

#[tonic::async_trait]
impl health::health_server::Health for Health {
    async fn check(
        &self,
        req: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let status = status_for(&req.get_ref().service);
        if status == health::health_check_response::ServingStatus::ServiceUnknown {
            return Err(Status::not_found(format!(
                "unknown service {:?}",
                req.get_ref().service
            )));
        }
        Ok(Response::new(HealthCheckResponse {
            status: status as i32,
        }))
    }

    async fn watch(
        &self,
        req: Request<HealthCheckRequest>,
    ) -> Result<Response<BoxStream<HealthCheckResponse>>, Status> {
        let first = HealthCheckResponse {
            status: status_for(&req.get_ref().service) as i32,
        };
        let s = stream::once(async move { Ok(first) }).chain(until_shutdown(self.shutdown.clone()));
        Ok(Response::new(Box::pin(s)))
    }
}
