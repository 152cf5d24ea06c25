//! Protocol 5, served by the same provider definition as protocol 6.
//!
//! Apart from the schema messages (where tfplugin6 inserted `nested_type` and renumbered two
//! attribute fields) every tfplugin5 request/response we handle has the same field numbers and
//! types as its tfplugin6 counterpart. So each call is re-encoded as the tfplugin6 message,
//! handled once by [`Server`], and the answer re-encoded back. The schema is built natively.

use std::sync::Arc;

use prost::Message;
use tfplugin_protocol::tfplugin5 as pb5;
use tfplugin_protocol::tfplugin6 as pb6;
use tfplugin_protocol::tfplugin6::provider_server::Provider as _;
use tonic::{Request, Response, Status};

use super::proto::tfplugin5 as conv;
use super::resource::Provider;
use super::server::Server;

pub struct V5<P: Provider> {
    inner: Arc<Server<P>>,
}

impl<P: Provider> V5<P> {
    pub fn new(inner: Arc<Server<P>>) -> Self {
        V5 { inner }
    }
}

/// Re-encodes a message as its wire-compatible twin.
fn tx<A: Message, B: Message + Default>(a: &A) -> Result<B, Status> {
    B::decode(a.encode_to_vec().as_slice())
        .map_err(|e| Status::internal(format!("protocol 5/6 translation failed: {e}")))
}

macro_rules! forward {
    ($self:ident, $req:ident, $m6:ident) => {{
        let r6 = tx($req.get_ref())?;
        let resp = $self.inner.$m6(Request::new(r6)).await?;
        Ok(Response::new(tx(resp.get_ref())?))
    }};
}

type Rpc<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl<P: Provider> pb5::provider_server::Provider for V5<P> {
    async fn get_metadata(
        &self,
        req: Request<pb5::get_metadata::Request>,
    ) -> Rpc<pb5::get_metadata::Response> {
        forward!(self, req, get_metadata)
    }

    async fn get_schema(
        &self,
        _: Request<pb5::get_provider_schema::Request>,
    ) -> Rpc<pb5::get_provider_schema::Response> {
        let s = &self.inner;
        Ok(Response::new(pb5::get_provider_schema::Response {
            provider: Some(conv::schema(s.provider_schema())),
            resource_schemas: s
                .resource_schemas()
                .map(|(k, v)| (k.to_string(), conv::schema(v)))
                .collect(),
            data_source_schemas: s
                .data_source_schemas()
                .map(|(k, v)| (k.to_string(), conv::schema(v)))
                .collect(),
            server_capabilities: Some(pb5::ServerCapabilities {
                plan_destroy: true,
                get_provider_schema_optional: true,
                move_resource_state: false,
                generate_resource_config: false,
            }),
            ..Default::default()
        }))
    }

    async fn get_resource_identity_schemas(
        &self,
        req: Request<pb5::get_resource_identity_schemas::Request>,
    ) -> Rpc<pb5::get_resource_identity_schemas::Response> {
        forward!(self, req, get_resource_identity_schemas)
    }

    async fn get_functions(
        &self,
        req: Request<pb5::get_functions::Request>,
    ) -> Rpc<pb5::get_functions::Response> {
        forward!(self, req, get_functions)
    }

    async fn prepare_provider_config(
        &self,
        req: Request<pb5::prepare_provider_config::Request>,
    ) -> Rpc<pb5::prepare_provider_config::Response> {
        let config = req.get_ref().config.clone();
        let r6: pb6::validate_provider_config::Request = tx(req.get_ref())?;
        let resp = self
            .inner
            .validate_provider_config(Request::new(r6))
            .await?;
        let mut out: pb5::prepare_provider_config::Response = tx(resp.get_ref())?;
        // Protocol 5 lets a provider rewrite its config here; ours is used as written.
        out.prepared_config = config;
        Ok(Response::new(out))
    }

    async fn validate_resource_type_config(
        &self,
        req: Request<pb5::validate_resource_type_config::Request>,
    ) -> Rpc<pb5::validate_resource_type_config::Response> {
        forward!(self, req, validate_resource_config)
    }

    async fn validate_data_source_config(
        &self,
        req: Request<pb5::validate_data_source_config::Request>,
    ) -> Rpc<pb5::validate_data_source_config::Response> {
        forward!(self, req, validate_data_resource_config)
    }

    async fn upgrade_resource_state(
        &self,
        req: Request<pb5::upgrade_resource_state::Request>,
    ) -> Rpc<pb5::upgrade_resource_state::Response> {
        forward!(self, req, upgrade_resource_state)
    }

    async fn configure(
        &self,
        req: Request<pb5::configure::Request>,
    ) -> Rpc<pb5::configure::Response> {
        forward!(self, req, configure_provider)
    }

    async fn read_resource(
        &self,
        req: Request<pb5::read_resource::Request>,
    ) -> Rpc<pb5::read_resource::Response> {
        forward!(self, req, read_resource)
    }

    async fn plan_resource_change(
        &self,
        req: Request<pb5::plan_resource_change::Request>,
    ) -> Rpc<pb5::plan_resource_change::Response> {
        forward!(self, req, plan_resource_change)
    }

    async fn apply_resource_change(
        &self,
        req: Request<pb5::apply_resource_change::Request>,
    ) -> Rpc<pb5::apply_resource_change::Response> {
        forward!(self, req, apply_resource_change)
    }

    async fn import_resource_state(
        &self,
        req: Request<pb5::import_resource_state::Request>,
    ) -> Rpc<pb5::import_resource_state::Response> {
        forward!(self, req, import_resource_state)
    }

    async fn read_data_source(
        &self,
        req: Request<pb5::read_data_source::Request>,
    ) -> Rpc<pb5::read_data_source::Response> {
        forward!(self, req, read_data_source)
    }

    async fn stop(&self, req: Request<pb5::stop::Request>) -> Rpc<pb5::stop::Response> {
        forward!(self, req, stop_provider)
    }
}
