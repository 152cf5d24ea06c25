//! The protocol-6 gRPC service, driving a [`Provider`] definition. Protocol 5 is served by
//! [`super::v5`], which forwards to this implementation.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, RwLock};

use tfplugin_protocol::tfplugin6 as pb;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use super::diag::Diagnostics;
use super::plan;
use super::proto::{decode_error, tfplugin6 as conv};
use super::resource::{DataSource, Provider, Resource};
use super::schema::Schema;
use super::types::Type;
use super::value::Value;

struct Managed<D> {
    imp: Arc<dyn Resource<D>>,
    schema: Schema,
    ty: Type,
}

struct Data<D> {
    imp: Arc<dyn DataSource<D>>,
    schema: Schema,
    ty: Type,
}

/// One provider definition served over gRPC.
pub struct Server<P: Provider> {
    provider: P,
    provider_schema: Schema,
    provider_ty: Type,
    resources: HashMap<&'static str, Managed<P::Data>>,
    data_sources: HashMap<&'static str, Data<P::Data>>,
    configured: RwLock<Option<Arc<P::Data>>>,
    /// Cancelled by StopProvider (the client's Ctrl-C), by controller Shutdown and when the
    /// client process dies. One-shot, like the stop context of Terraform's own SDKs: a stopped
    /// provider is never asked to work again.
    stop: CancellationToken,
}

/// Summary of the diagnostic every call cut short by StopProvider returns.
pub const CANCELLED: &str = "Cancelled by the client";

type Rpc<T> = Result<Response<T>, Status>;

impl<P: Provider> Server<P> {
    pub fn new(provider: P) -> Self {
        let provider_schema = provider.schema();
        let provider_ty = provider_schema.block.ty();
        let resources = provider
            .resources()
            .into_iter()
            .map(|imp| {
                let schema = imp.schema();
                let ty = schema.block.ty();
                (imp.type_name(), Managed { imp, schema, ty })
            })
            .collect();
        let data_sources = provider
            .data_sources()
            .into_iter()
            .map(|imp| {
                let schema = imp.schema();
                let ty = schema.block.ty();
                (imp.type_name(), Data { imp, schema, ty })
            })
            .collect();
        Server {
            provider,
            provider_schema,
            provider_ty,
            resources,
            data_sources,
            configured: RwLock::new(None),
            stop: CancellationToken::new(),
        }
    }

    /// The token StopProvider cancels; the plugin server also cancels it on Shutdown and when
    /// the client process is gone.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Runs a resource or data source call until it finishes or the client stops the provider,
    /// whichever comes first. Dropping the call drops its in-flight HTTP requests.
    async fn until_stopped<T>(
        &self,
        what: &str,
        call: impl Future<Output = Result<T, Diagnostics>>,
    ) -> Result<T, Diagnostics> {
        tokio::select! {
            biased;
            () = self.stop.cancelled() => {
                info!(%what, "call cancelled by StopProvider");
                Err(Diagnostics::single(
                    CANCELLED,
                    format!("{what} was cancelled by the client (interrupt) before it finished."),
                ))
            }
            r = call => r,
        }
    }

    pub fn provider_schema(&self) -> &Schema {
        &self.provider_schema
    }
    pub fn resource_schemas(&self) -> impl Iterator<Item = (&'static str, &Schema)> {
        self.resources.iter().map(|(k, v)| (*k, &v.schema))
    }
    pub fn data_source_schemas(&self) -> impl Iterator<Item = (&'static str, &Schema)> {
        self.data_sources.iter().map(|(k, v)| (*k, &v.schema))
    }

    fn resource(&self, name: &str) -> Result<&Managed<P::Data>, Diagnostics> {
        self.resources.get(name).ok_or_else(|| {
            Diagnostics::single(
                "Unknown resource type",
                format!("This provider has no resource type {name:?}."),
            )
        })
    }
    fn data_source(&self, name: &str) -> Result<&Data<P::Data>, Diagnostics> {
        self.data_sources.get(name).ok_or_else(|| {
            Diagnostics::single(
                "Unknown data source",
                format!("This provider has no data source {name:?}."),
            )
        })
    }

    fn data(&self) -> Result<Arc<P::Data>, Diagnostics> {
        // A poisoned lock only means a panic elsewhere; the stored value is still valid.
        let guard = self.configured.read().unwrap_or_else(|e| e.into_inner());
        guard.clone().ok_or_else(|| {
            Diagnostics::single(
                "Provider not configured",
                "Terraform called the provider before ConfigureProvider; this is a bug in the client.",
            )
        })
    }

    fn capabilities() -> pb::ServerCapabilities {
        pb::ServerCapabilities {
            plan_destroy: true,
            get_provider_schema_optional: true,
            move_resource_state: false,
            generate_resource_config: false,
        }
    }
}

/// Shortcut: decode a DynamicValue or produce the `Err` diagnostics.
fn decode(dv: Option<&pb::DynamicValue>, ty: &Type, what: &str) -> Result<Value, Diagnostics> {
    conv::decode(dv, ty).map_err(|e| decode_error(what, &e))
}

#[tonic::async_trait]
impl<P: Provider> pb::provider_server::Provider for Server<P> {
    async fn get_metadata(
        &self,
        _: Request<pb::get_metadata::Request>,
    ) -> Rpc<pb::get_metadata::Response> {
        Ok(Response::new(pb::get_metadata::Response {
            server_capabilities: Some(Self::capabilities()),
            resources: self
                .resources
                .keys()
                .map(|t| pb::get_metadata::ResourceMetadata {
                    type_name: t.to_string(),
                })
                .collect(),
            data_sources: self
                .data_sources
                .keys()
                .map(|t| pb::get_metadata::DataSourceMetadata {
                    type_name: t.to_string(),
                })
                .collect(),
            ..Default::default()
        }))
    }

    async fn get_provider_schema(
        &self,
        _: Request<pb::get_provider_schema::Request>,
    ) -> Rpc<pb::get_provider_schema::Response> {
        Ok(Response::new(pb::get_provider_schema::Response {
            provider: Some(conv::schema(&self.provider_schema)),
            resource_schemas: self
                .resource_schemas()
                .map(|(k, s)| (k.to_string(), conv::schema(s)))
                .collect(),
            data_source_schemas: self
                .data_source_schemas()
                .map(|(k, s)| (k.to_string(), conv::schema(s)))
                .collect(),
            server_capabilities: Some(Self::capabilities()),
            ..Default::default()
        }))
    }

    async fn get_resource_identity_schemas(
        &self,
        _: Request<pb::get_resource_identity_schemas::Request>,
    ) -> Rpc<pb::get_resource_identity_schemas::Response> {
        // No resource declares an identity yet; an empty answer is valid for every client.
        Ok(Response::new(Default::default()))
    }

    async fn get_functions(
        &self,
        _: Request<pb::get_functions::Request>,
    ) -> Rpc<pb::get_functions::Response> {
        Ok(Response::new(Default::default()))
    }

    async fn validate_provider_config(
        &self,
        req: Request<pb::validate_provider_config::Request>,
    ) -> Rpc<pb::validate_provider_config::Response> {
        let req = req.into_inner();
        let mut diags = Diagnostics::new();
        match decode(
            req.config.as_ref(),
            &self.provider_ty,
            "provider configuration",
        ) {
            Ok(cfg) => {
                self.provider_schema
                    .block
                    .validate_config(&cfg, &Default::default(), &mut diags);
                self.provider.validate(&cfg, &mut diags);
            }
            Err(d) => diags = d,
        }
        Ok(Response::new(pb::validate_provider_config::Response {
            diagnostics: conv::diags(&diags),
        }))
    }

    async fn validate_resource_config(
        &self,
        req: Request<pb::validate_resource_config::Request>,
    ) -> Rpc<pb::validate_resource_config::Response> {
        let req = req.into_inner();
        let diags = (|| {
            let r = self.resource(&req.type_name)?;
            let cfg = decode(req.config.as_ref(), &r.ty, "resource configuration")?;
            let mut diags = Diagnostics::new();
            r.schema
                .block
                .validate_config(&cfg, &Default::default(), &mut diags);
            r.imp.validate(&cfg, &mut diags);
            Ok::<_, Diagnostics>(diags)
        })()
        .unwrap_or_else(|d| d);
        Ok(Response::new(pb::validate_resource_config::Response {
            diagnostics: conv::diags(&diags),
        }))
    }

    async fn validate_data_resource_config(
        &self,
        req: Request<pb::validate_data_resource_config::Request>,
    ) -> Rpc<pb::validate_data_resource_config::Response> {
        let req = req.into_inner();
        let diags = (|| {
            let ds = self.data_source(&req.type_name)?;
            let cfg = decode(req.config.as_ref(), &ds.ty, "data source configuration")?;
            let mut diags = Diagnostics::new();
            ds.schema
                .block
                .validate_config(&cfg, &Default::default(), &mut diags);
            ds.imp.validate(&cfg, &mut diags);
            Ok::<_, Diagnostics>(diags)
        })()
        .unwrap_or_else(|d| d);
        Ok(Response::new(pb::validate_data_resource_config::Response {
            diagnostics: conv::diags(&diags),
        }))
    }

    async fn upgrade_resource_state(
        &self,
        req: Request<pb::upgrade_resource_state::Request>,
    ) -> Rpc<pb::upgrade_resource_state::Response> {
        let req = req.into_inner();
        let result = (|| {
            let r = self.resource(&req.type_name)?;
            let raw = req.raw_state.unwrap_or_default();
            if raw.json.is_empty() {
                if !raw.flatmap.is_empty() {
                    return Err(Diagnostics::single(
                        "Unsupported state format",
                        "This state was written in the legacy flatmap format, which this provider never produced.",
                    ));
                }
                return Ok(conv::encode(&Value::Null, &r.ty));
            }
            let json: serde_json::Value = serde_json::from_slice(&raw.json).map_err(|e| {
                Diagnostics::single(
                    "Invalid stored state",
                    format!("The stored state is not valid JSON: {e}."),
                )
            })?;
            if req.version > r.schema.version {
                return Err(Diagnostics::single(
                    "State from a newer provider",
                    format!(
                        "The state was written by schema version {} but this provider only knows up to {}; upgrade the provider.",
                        req.version, r.schema.version
                    ),
                ));
            }
            let json = if req.version < r.schema.version {
                r.imp.upgrade_state(req.version, json)?
            } else {
                json
            };
            let v = super::codec::from_json(&json, &r.ty, &Default::default(), 0)
                .map_err(|e| decode_error("stored state", &e))?;
            Ok(conv::encode(&v, &r.ty))
        })();
        Ok(Response::new(match result {
            Ok(upgraded_state) => pb::upgrade_resource_state::Response {
                upgraded_state,
                diagnostics: vec![],
            },
            Err(d) => pb::upgrade_resource_state::Response {
                upgraded_state: None,
                diagnostics: conv::diags(&d),
            },
        }))
    }

    async fn configure_provider(
        &self,
        req: Request<pb::configure_provider::Request>,
    ) -> Rpc<pb::configure_provider::Response> {
        let req = req.into_inner();
        debug!(terraform_version = %req.terraform_version, "configure provider");
        let result = async {
            let cfg = decode(req.config.as_ref(), &self.provider_ty, "provider configuration")?;
            if !cfg.is_wholly_known() {
                return Err(Diagnostics::single(
                    "Provider configuration is not known yet",
                    "The agentplane provider configuration refers to values that are only known after apply \
                     (for example an attribute of a resource that does not exist yet). Make those values known \
                     at plan time, or apply the resources they depend on first with -target.",
                ));
            }
            let data = self.provider.configure(&cfg).await?;
            *self.configured.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(data));
            Ok(())
        }
        .await;
        let diags = result.err().unwrap_or_default();
        Ok(Response::new(pb::configure_provider::Response {
            diagnostics: conv::diags(&diags),
        }))
    }

    async fn read_resource(
        &self,
        req: Request<pb::read_resource::Request>,
    ) -> Rpc<pb::read_resource::Response> {
        let req = req.into_inner();
        let r = match self.resource(&req.type_name) {
            Ok(r) => r,
            Err(d) => {
                return Ok(Response::new(pb::read_resource::Response {
                    diagnostics: conv::diags(&d),
                    ..Default::default()
                }));
            }
        };
        let result = self
            .until_stopped(&format!("Reading {}", req.type_name), async {
                let state = decode(req.current_state.as_ref(), &r.ty, "current state")?;
                if state.is_null() {
                    return Ok(Value::Null);
                }
                let data = self.data()?;
                Ok(r.imp.read(&data, &state).await?.unwrap_or(Value::Null))
            })
            .await;
        Ok(Response::new(match result {
            Ok(v) => {
                if v.is_null() {
                    debug!(type_name = %req.type_name, "object no longer exists; removing it from state");
                }
                pb::read_resource::Response {
                    new_state: conv::encode(&v, &r.ty),
                    private: req.private,
                    ..Default::default()
                }
            }
            // On failure Terraform keeps what it sent; echo it back unchanged.
            Err(d) => pb::read_resource::Response {
                new_state: req.current_state,
                private: req.private,
                diagnostics: conv::diags(&d),
                ..Default::default()
            },
        }))
    }

    async fn plan_resource_change(
        &self,
        req: Request<pb::plan_resource_change::Request>,
    ) -> Rpc<pb::plan_resource_change::Response> {
        let req = req.into_inner();
        let result = (|| {
            let r = self.resource(&req.type_name)?;
            let prior = decode(req.prior_state.as_ref(), &r.ty, "prior state")?;
            let proposed = decode(req.proposed_new_state.as_ref(), &r.ty, "proposed new state")?;
            let config = decode(req.config.as_ref(), &r.ty, "configuration")?;
            let mut planned = plan::plan(&r.schema.block, &prior, &proposed, &config);
            let mut diags = Diagnostics::new();
            if !planned.state.is_null() {
                r.imp
                    .modify_plan(&prior, &mut planned.state, &config, &mut diags);
            }
            Ok::<_, Diagnostics>((r, planned, diags))
        })();
        Ok(Response::new(match result {
            Ok((r, planned, diags)) => pb::plan_resource_change::Response {
                planned_state: conv::encode(&planned.state, &r.ty),
                requires_replace: planned.requires_replace.iter().map(conv::path).collect(),
                planned_private: req.prior_private,
                diagnostics: conv::diags(&diags),
                ..Default::default()
            },
            Err(d) => pb::plan_resource_change::Response {
                diagnostics: conv::diags(&d),
                ..Default::default()
            },
        }))
    }

    async fn apply_resource_change(
        &self,
        req: Request<pb::apply_resource_change::Request>,
    ) -> Rpc<pb::apply_resource_change::Response> {
        let req = req.into_inner();
        let r = match self.resource(&req.type_name) {
            Ok(r) => r,
            Err(d) => {
                return Ok(Response::new(pb::apply_resource_change::Response {
                    diagnostics: conv::diags(&d),
                    ..Default::default()
                }));
            }
        };
        let prior = decode(req.prior_state.as_ref(), &r.ty, "prior state");
        let planned = decode(req.planned_state.as_ref(), &r.ty, "planned state");
        let (prior, planned) = match (prior, planned) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(d), _) | (_, Err(d)) => {
                return Ok(Response::new(pb::apply_resource_change::Response {
                    new_state: req.prior_state,
                    diagnostics: conv::diags(&d),
                    ..Default::default()
                }));
            }
        };
        // A cancelled create may still have reached the API; what it made is then unknown to
        // Terraform, as with the SDKs' stop context (see docs/architecture.md).
        let result = self
            .until_stopped(&format!("Applying {}", req.type_name), async {
                let data = self.data()?;
                if planned.is_null() {
                    r.imp.delete(&data, &prior).await.map(|()| Value::Null)
                } else if prior.is_null() {
                    r.imp.create(&data, &planned).await
                } else {
                    r.imp.update(&data, &prior, &planned).await
                }
            })
            .await;
        Ok(Response::new(match result {
            Ok(v) => pb::apply_resource_change::Response {
                new_state: conv::encode(&v, &r.ty),
                private: req.planned_private,
                ..Default::default()
            },
            Err(d) => {
                warn!(type_name = %req.type_name, "apply failed: {}", d.to_string().trim_end());
                // Keep whatever existed before: nothing on a failed create, the prior object
                // on a failed update or delete.
                pb::apply_resource_change::Response {
                    new_state: conv::encode(&prior, &r.ty),
                    diagnostics: conv::diags(&d),
                    ..Default::default()
                }
            }
        }))
    }

    async fn import_resource_state(
        &self,
        req: Request<pb::import_resource_state::Request>,
    ) -> Rpc<pb::import_resource_state::Response> {
        let req = req.into_inner();
        let result = (|| {
            let r = self.resource(&req.type_name)?;
            let state = r.imp.import_state(&req.id)?;
            Ok::<_, Diagnostics>(pb::import_resource_state::ImportedResource {
                type_name: req.type_name.clone(),
                state: conv::encode(&state, &r.ty),
                ..Default::default()
            })
        })();
        Ok(Response::new(match result {
            Ok(imported) => pb::import_resource_state::Response {
                imported_resources: vec![imported],
                ..Default::default()
            },
            Err(d) => pb::import_resource_state::Response {
                diagnostics: conv::diags(&d),
                ..Default::default()
            },
        }))
    }

    async fn read_data_source(
        &self,
        req: Request<pb::read_data_source::Request>,
    ) -> Rpc<pb::read_data_source::Response> {
        let req = req.into_inner();
        let result = self
            .until_stopped(&format!("Reading data source {}", req.type_name), async {
                let ds = self.data_source(&req.type_name)?;
                let cfg = decode(req.config.as_ref(), &ds.ty, "data source configuration")?;
                let data = self.data()?;
                let v = ds.imp.read(&data, &cfg).await?;
                Ok::<_, Diagnostics>(conv::encode(&v, &ds.ty))
            })
            .await;
        Ok(Response::new(match result {
            Ok(state) => pb::read_data_source::Response {
                state,
                ..Default::default()
            },
            Err(d) => pb::read_data_source::Response {
                diagnostics: conv::diags(&d),
                ..Default::default()
            },
        }))
    }

    async fn stop_provider(
        &self,
        _: Request<pb::stop_provider::Request>,
    ) -> Rpc<pb::stop_provider::Response> {
        // Ctrl-C: every in-flight call returns "cancelled" now instead of waiting out its
        // timeouts; the process exits when go-plugin's controller Shutdown arrives.
        info!("StopProvider: cancelling in-flight calls");
        self.stop.cancel();
        Ok(Response::new(pb::stop_provider::Response {
            error: String::new(),
        }))
    }
}
