//! The traits a provider, resource or data source implements. Adding a resource means adding
//! one file under `src/resources/` that implements [`Resource`] and listing it in the
//! provider's `resources()`.

use std::sync::Arc;

use async_trait::async_trait;

use super::diag::Diagnostics;
use super::schema::Schema;
use super::value::Value;

/// A managed resource type. `D` is the provider's configured data (clients, settings).
#[async_trait]
pub trait Resource<D: Send + Sync>: Send + Sync {
    fn type_name(&self) -> &'static str;
    fn schema(&self) -> Schema;

    /// Cross-attribute checks beyond the schema validators. Must not call any API.
    fn validate(&self, _config: &Value, _diags: &mut Diagnostics) {}

    /// Adjusts the generic plan (e.g. mark an output unknown because an update changes it).
    fn modify_plan(
        &self,
        _prior: &Value,
        _planned: &mut Value,
        _config: &Value,
        _diags: &mut Diagnostics,
    ) {
    }

    /// Creates the object; returns the new state (the planned state with unknowns filled).
    async fn create(&self, data: &D, planned: &Value) -> Result<Value, Diagnostics>;
    /// Reads the object; `None` means it no longer exists.
    async fn read(&self, data: &D, state: &Value) -> Result<Option<Value>, Diagnostics>;
    async fn update(&self, data: &D, prior: &Value, planned: &Value) -> Result<Value, Diagnostics>;
    async fn delete(&self, data: &D, state: &Value) -> Result<(), Diagnostics>;

    /// A minimal state for `terraform import <addr> <id>`; Terraform reads it right after.
    fn import_state(&self, id: &str) -> Result<Value, Diagnostics>;

    /// Upgrades stored state (as JSON) written with schema version `from` to the current one.
    fn upgrade_state(
        &self,
        _from: i64,
        state: serde_json::Value,
    ) -> Result<serde_json::Value, Diagnostics> {
        Ok(state)
    }
}

/// A data source type.
#[async_trait]
pub trait DataSource<D: Send + Sync>: Send + Sync {
    fn type_name(&self) -> &'static str;
    fn schema(&self) -> Schema;
    fn validate(&self, _config: &Value, _diags: &mut Diagnostics) {}
    async fn read(&self, data: &D, config: &Value) -> Result<Value, Diagnostics>;
}

/// The provider itself: its configuration schema and the types it offers.
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    type Data: Send + Sync + 'static;
    fn schema(&self) -> Schema;
    fn validate(&self, _config: &Value, _diags: &mut Diagnostics) {}
    /// Turns a wholly known configuration into provider data. Must be cheap: API clients are
    /// built lazily on first use so that plans of unrelated workspaces do not pay for them.
    async fn configure(&self, config: &Value) -> Result<Self::Data, Diagnostics>;
    fn resources(&self) -> Vec<Arc<dyn Resource<Self::Data>>>;
    fn data_sources(&self) -> Vec<Arc<dyn DataSource<Self::Data>>>;
}
