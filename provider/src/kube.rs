//! Kubernetes access for the cluster-side resources (`agentplane_platform`,
//! `agentplane_keda_scaler`, `agentplane_edge_device`, `agentplane_agent_policy`).
//!
//! - The client is built from the provider's `kubernetes` block: `host` (+ `token`,
//!   `cluster_ca_certificate`), or `config_path` (+ `config_context`), or else the usual
//!   inference (`KUBECONFIG`, `~/.kube/config`, in-cluster).
//! - Every object is written by server-side apply under [`FIELD_MANAGER`] with strict field
//!   validation, so a typo in a manifest is an error rather than a silently dropped field, and
//!   a field another manager owns is a conflict rather than a silent overwrite (unless the
//!   resource sets `force = true`).
//! - Drift is measured by a server-side dry-run apply of our intent: if the API server says
//!   applying it again would change the live object, the object drifted.
//! - Every failure becomes a diagnostic naming the Terraform resource and the API endpoint.
//! - Every call is bounded: the client's connect/read/write timeouts and, around each call,
//!   the provider's `operation_timeout` (see [`crate::timeouts`]), so a server that accepts
//!   connections and never answers fails the call instead of hanging the run.

use std::future::Future;

use base64::Engine as _;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value as Json, json};

use crate::config::KubeSettings;
use crate::framework::{Diagnostics, Value};
use crate::timeouts::{self, Timeouts};

/// The field manager every object of ours is applied under.
pub const FIELD_MANAGER: &str = "agentplane-terraform";

/// Where settings from `host`/`token`/`cluster_ca_certificate` come from, in messages.
const INLINE: &str = "(the provider's kubernetes block)";

/// Problems with the provider's Kubernetes settings themselves (before any request).
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error(
        "cluster_ca_certificate is neither a PEM certificate nor base64 of one (it must start with \"-----BEGIN CERTIFICATE-----\")"
    )]
    BadCa,
    #[error("host {0:?} is not an http(s) URL")]
    BadHost(String),
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("no Kubernetes access configured and none could be inferred: {0}")]
    Infer(#[source] kube::config::InferConfigError),
    #[error("building the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// A connected client and the endpoint it talks to (named in every diagnostic).
#[derive(Clone)]
pub struct Kube {
    client: kube::Client,
    endpoint: String,
    timeouts: Timeouts,
}

/// Turns the provider's `cluster_ca_certificate` (PEM, or base64 of PEM as EKS reports it)
/// into the base64 PEM a kubeconfig's `certificate-authority-data` holds.
pub fn ca_data(ca: &str) -> Result<String, SettingsError> {
    const PEM: &str = "-----BEGIN CERTIFICATE-----";
    let b64 = base64::engine::general_purpose::STANDARD;
    let trimmed = ca.trim();
    if trimmed.starts_with(PEM) {
        return Ok(b64.encode(trimmed.as_bytes()));
    }
    let compact: String = trimmed.split_whitespace().collect();
    match b64.decode(compact.as_bytes()) {
        Ok(bytes) if bytes.starts_with(PEM.as_bytes()) => Ok(compact),
        _ => Err(SettingsError::BadCa),
    }
}

/// A kubeconfig holding exactly the provider's `host`/`token`/`cluster_ca_certificate`, so
/// kube's own kubeconfig code (PEM parsing, TLS setup) handles them.
fn inline_kubeconfig(
    host: &str,
    token: Option<&str>,
    ca: Option<&str>,
) -> Result<kube::config::Kubeconfig, SettingsError> {
    if !(host.starts_with("https://") || host.starts_with("http://")) {
        return Err(SettingsError::BadHost(host.to_string()));
    }
    let mut cluster = json!({ "server": host });
    if let Some(ca) = ca {
        cluster["certificate-authority-data"] = Json::String(ca_data(ca)?);
    }
    let mut user = json!({});
    if let Some(t) = token {
        user["token"] = Json::String(t.to_string());
    }
    let kc = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{ "name": "terraform", "cluster": cluster }],
        "users": [{ "name": "terraform", "user": user }],
        "contexts": [{ "name": "terraform", "context": { "cluster": "terraform", "user": "terraform" } }],
        "current-context": "terraform",
    });
    // JSON is YAML, and going through kube's own parser keeps its defaults and checks.
    kube::config::Kubeconfig::from_yaml(&kc.to_string()).map_err(|source| {
        SettingsError::Kubeconfig {
            path: INLINE.into(),
            source,
        }
    })
}

/// `~/x` as the user's home directory, as kubectl and the other Kubernetes providers read it.
fn expand_home(path: &str) -> String {
    match (path.strip_prefix("~/"), std::env::var("HOME")) {
        (Some(rest), Ok(home)) if !home.is_empty() => format!("{home}/{rest}"),
        _ => path.to_string(),
    }
}

async fn config_for(settings: &KubeSettings) -> Result<kube::Config, SettingsError> {
    let mut config = if let Some(host) = &settings.host {
        let kc = inline_kubeconfig(
            host,
            settings.token.as_deref(),
            settings.cluster_ca_certificate.as_deref(),
        )?;
        kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .map_err(|source| SettingsError::Kubeconfig {
                path: INLINE.into(),
                source,
            })?
    } else if let Some(path) = &settings.config_path {
        let path = &expand_home(path);
        let kc = kube::config::Kubeconfig::read_from(path).map_err(|source| {
            SettingsError::Kubeconfig {
                path: path.clone(),
                source,
            }
        })?;
        let opts = kube::config::KubeConfigOptions {
            context: settings.config_context.clone(),
            ..Default::default()
        };
        kube::Config::from_custom_kubeconfig(kc, &opts)
            .await
            .map_err(|source| SettingsError::Kubeconfig {
                path: path.clone(),
                source,
            })?
    } else {
        kube::Config::infer().await.map_err(SettingsError::Infer)?
    };
    // A token given next to a kubeconfig wins over the kubeconfig's user.
    if settings.host.is_none()
        && let Some(t) = &settings.token
    {
        config.auth_info.token = Some(t.clone().into());
    }
    settings.timeouts.apply_to_kube(&mut config);
    Ok(config)
}

impl Kube {
    /// Builds a client from the provider settings. No request is made yet: an unreachable
    /// server shows up on the first call, with the endpoint named.
    pub async fn connect(settings: &KubeSettings, what: &str) -> Result<Kube, Diagnostics> {
        // The workspace links rustls with both ring and aws-lc-rs; with two providers compiled
        // in, rustls will not pick one itself and kube's TLS setup would fail.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let fail = |e: SettingsError| {
            Diagnostics::single(
                format!("Invalid Kubernetes settings for {what}"),
                format!("{e}\nCheck the provider's `kubernetes` block."),
            )
        };
        let config = config_for(settings).await.map_err(fail)?;
        let endpoint = config.cluster_url.to_string();
        let client = kube::Client::try_from(config)
            .map_err(SettingsError::Client)
            .map_err(fail)?;
        Ok(Kube {
            client,
            endpoint,
            timeouts: settings.timeouts,
        })
    }

    /// Runs one API call under the provider's `operation_timeout`. The outer error is the
    /// timeout; the inner result is the call's own, for the caller to classify.
    async fn bounded<T>(
        &self,
        what: &str,
        action: &str,
        call: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<Result<T, kube::Error>, Diagnostics> {
        let limit = self.timeouts.operation;
        tokio::time::timeout(limit, call).await.map_err(|_| {
            Diagnostics::single(
                format!("Kubernetes API timed out for {what}"),
                format!(
                    "{action} at {} got no answer within {} = {limit:?}.\nCheck that the API server is up and reachable, or raise `{}` (and `{}`) in the provider block.",
                    self.endpoint,
                    timeouts::OPERATION,
                    timeouts::OPERATION,
                    timeouts::READ,
                ),
            )
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn client(&self) -> &kube::Client {
        &self.client
    }

    fn api(&self, r: &ObjRef) -> Api<DynamicObject> {
        match &r.namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &r.ar),
            None => Api::all_with(self.client.clone(), &r.ar),
        }
    }

    /// Reads one object; `None` when it does not exist.
    pub async fn get(&self, what: &str, r: &ObjRef) -> Result<Option<Json>, Diagnostics> {
        let action = format!("get {r}");
        match self
            .bounded(what, &action, self.api(r).get_opt(&r.name))
            .await?
        {
            Ok(Some(o)) => Ok(Some(to_json(&o))),
            Ok(None) => Ok(None),
            Err(e) => Err(self.diag(&e, what, &action)),
        }
    }

    /// Server-side applies `manifest` under our field manager with strict field validation.
    /// Returns the object as stored.
    pub async fn apply(
        &self,
        what: &str,
        manifest: &Json,
        force: bool,
    ) -> Result<Json, Diagnostics> {
        let r = ObjRef::of(manifest).map_err(|e| bad_manifest(what, &e))?;
        let mut params = PatchParams::apply(FIELD_MANAGER).validation_strict();
        if force {
            params = params.force();
        }
        let action = format!("apply {r}");
        let patch = Patch::Apply(manifest);
        self.bounded(what, &action, self.api(&r).patch(&r.name, &params, &patch))
            .await?
            .map(|o| to_json(&o))
            .map_err(|e| self.diag(&e, what, &action))
    }

    /// Applies every manifest in order.
    pub async fn apply_all(
        &self,
        what: &str,
        manifests: &[Json],
        force: bool,
    ) -> Result<(), Diagnostics> {
        for m in manifests {
            self.apply(what, m, force).await?;
        }
        Ok(())
    }

    /// Deletes one object (in the background); an object already gone is not an error.
    pub async fn delete(&self, what: &str, r: &ObjRef) -> Result<(), Diagnostics> {
        let action = format!("delete {r}");
        let params = DeleteParams::background();
        match self
            .bounded(what, &action, self.api(r).delete(&r.name, &params))
            .await?
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(self.diag(&e, what, &action)),
        }
    }

    /// How the live object differs from our intent, as one line for the `drift` attribute, or
    /// `None` when applying `manifest` again would change nothing.
    pub async fn drift(
        &self,
        what: &str,
        manifest: &Json,
        force: bool,
    ) -> Result<Option<String>, Diagnostics> {
        let r = ObjRef::of(manifest).map_err(|e| bad_manifest(what, &e))?;
        let Some(live) = self.get(what, &r).await? else {
            return Ok(Some(format!("{r}: deleted outside Terraform")));
        };
        let mut params = PatchParams::apply(FIELD_MANAGER)
            .validation_strict()
            .dry_run();
        if force {
            params = params.force();
        }
        let action = format!("dry-run apply {r}");
        let patch = Patch::Apply(manifest);
        let would_be = match self
            .bounded(what, &action, self.api(&r).patch(&r.name, &params, &patch))
            .await?
        {
            Ok(o) => to_json(&o),
            Err(kube::Error::Api(s)) if !conflicts(&s).is_empty() => {
                let list = conflicts(&s)
                    .iter()
                    .map(|c| format!("{} (now owned by {:?})", c.field, c.manager))
                    .collect::<Vec<_>>()
                    .join(", ");
                return Ok(Some(format!("{r}: {list}")));
            }
            Err(e) => return Err(self.diag(&e, what, &action)),
        };
        let mut paths = Vec::new();
        diff_paths(&comparable(&live), &comparable(&would_be), "", &mut paths);
        if paths.is_empty() {
            return Ok(None);
        }
        Ok(Some(format!(
            "{r}: changed outside Terraform ({})",
            paths.join(", ")
        )))
    }

    /// A diagnostic for a failed call: names the resource, the action, the endpoint, and for
    /// a field manager conflict each field and the manager that owns it.
    pub fn diag(&self, err: &kube::Error, what: &str, action: &str) -> Diagnostics {
        classify_error(err, what, action, &self.endpoint)
    }
}

/// One field another manager owns, from a 409 on apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub field: String,
    pub manager: String,
}

/// The field manager conflicts a 409 carries (empty for any other error).
pub fn conflicts(s: &kube::core::Status) -> Vec<Conflict> {
    if s.code != 409 {
        return Vec::new();
    }
    s.details
        .iter()
        .flat_map(|d| &d.causes)
        .filter(|c| c.reason == "FieldManagerConflict")
        .map(|c| Conflict {
            field: c.field.clone(),
            // `conflict with "intruder" using agentplane.dev/v1alpha1`
            manager: c
                .message
                .split('"')
                .nth(1)
                .unwrap_or(&c.message)
                .to_string(),
        })
        .collect()
}

/// The error classification behind [`Kube::diag`], separate so it can be tested alone.
pub fn classify_error(err: &kube::Error, what: &str, action: &str, endpoint: &str) -> Diagnostics {
    match err {
        kube::Error::Api(s) if s.code == 401 => Diagnostics::single(
            format!("Kubernetes API rejected the credentials for {what}"),
            format!(
                "{endpoint} answered 401 Unauthorized to {action}: {}\nCheck the token or kubeconfig in the provider's `kubernetes` block.",
                s.message
            ),
        ),
        kube::Error::Api(s) if s.code == 403 => Diagnostics::single(
            format!("Access denied to {what}"),
            format!(
                "{endpoint} refused {action}: {}\nGrant the provider's Kubernetes identity this permission.",
                s.message
            ),
        ),
        kube::Error::Api(s) if !conflicts(s).is_empty() => {
            let fields = conflicts(s)
                .iter()
                .map(|c| format!("  {} is owned by field manager {:?}", c.field, c.manager))
                .collect::<Vec<_>>()
                .join("\n");
            Diagnostics::single(
                format!("Field manager conflict on {what}"),
                format!(
                    "{action} at {endpoint}: fields this resource sets are owned by another field manager:\n{fields}\nSet `force = true` on the resource to take them over as {FIELD_MANAGER:?}, or make both sides agree."
                ),
            )
        }
        kube::Error::Api(s) => Diagnostics::single(
            format!("Kubernetes refused {action} for {what}"),
            format!("{endpoint} answered {} {}: {}", s.code, s.reason, s.message),
        ),
        kube::Error::HyperError(_) | kube::Error::Service(_) => Diagnostics::single(
            format!("Cannot reach the Kubernetes API for {what}"),
            format!(
                "{action} at {endpoint} failed: {}\nCheck `host` (or the kubeconfig) and `cluster_ca_certificate` in the provider's `kubernetes` block, and that the API server is running and answers within the provider's `connect_timeout`/`read_timeout`.",
                chain(err)
            ),
        ),
        kube::Error::Auth(_) => Diagnostics::single(
            format!("Kubernetes credentials unusable for {what}"),
            format!("{action} at {endpoint}: {}", chain(err)),
        ),
        _ => Diagnostics::single(
            format!("{action} failed for {what}"),
            format!("{endpoint}: {}", chain(err)),
        ),
    }
}

/// The error and every source, so "connection refused" deep inside hyper reaches the user.
fn chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let m = e.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = e.source();
    }
    s
}

fn bad_manifest(what: &str, e: &str) -> Diagnostics {
    Diagnostics::single(
        format!("Internal error building a manifest for {what}"),
        e.to_string(),
    )
}

fn to_json(o: &DynamicObject) -> Json {
    serde_json::to_value(o).unwrap_or(Json::Null)
}

/// The object without the bookkeeping that changes on every write, for comparisons.
fn comparable(o: &Json) -> Json {
    let mut o = o.clone();
    if let Some(m) = o.get_mut("metadata").and_then(Json::as_object_mut) {
        for k in ["managedFields", "resourceVersion", "generation"] {
            m.remove(k);
        }
    }
    if let Some(m) = o.as_object_mut() {
        m.remove("status");
    }
    o
}

/// JSON paths where `a` and `b` differ (at most a handful, for a readable message).
fn diff_paths(a: &Json, b: &Json, path: &str, out: &mut Vec<String>) {
    const MAX: usize = 5;
    if out.len() >= MAX || a == b {
        return;
    }
    match (a, b) {
        (Json::Object(x), Json::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let (va, vb) = (
                    x.get(k).unwrap_or(&Json::Null),
                    y.get(k).unwrap_or(&Json::Null),
                );
                diff_paths(va, vb, &format!("{path}.{k}"), out);
            }
        }
        (Json::Array(x), Json::Array(y)) if x.len() == y.len() => {
            for (i, (va, vb)) in x.iter().zip(y).enumerate() {
                diff_paths(va, vb, &format!("{path}[{i}]"), out);
            }
        }
        _ => out.push(if path.is_empty() {
            ".".into()
        } else {
            path.to_string()
        }),
    }
}

/// Which object a manifest is: API resource (with plural), namespace, name.
#[derive(Debug, Clone)]
pub struct ObjRef {
    pub ar: ApiResource,
    pub namespace: Option<String>,
    pub name: String,
}

impl ObjRef {
    /// A reference for `kind` `name` in `api_version` (`v1`, `apps/v1`...).
    pub fn new(api_version: &str, kind: &str, namespace: Option<&str>, name: &str) -> ObjRef {
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let gvk = GroupVersionKind::gvk(group, version, kind);
        ObjRef {
            ar: ApiResource::from_gvk_with_plural(&gvk, &plural(kind)),
            namespace: namespace.map(str::to_string),
            name: name.to_string(),
        }
    }

    pub fn of(manifest: &Json) -> Result<ObjRef, String> {
        let s = |p: &str| manifest.pointer(p).and_then(Json::as_str);
        let (Some(api_version), Some(kind), Some(name)) =
            (s("/apiVersion"), s("/kind"), s("/metadata/name"))
        else {
            return Err(format!("manifest without apiVersion/kind/name: {manifest}"));
        };
        Ok(ObjRef::new(
            api_version,
            kind,
            s("/metadata/namespace"),
            name,
        ))
    }

    /// `Kind name` or `Kind namespace/name`, as listed in `objects` and drift messages.
    pub fn label(&self) -> String {
        self.to_string()
    }
}

impl std::fmt::Display for ObjRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.ar.kind, self.name),
            None => write!(f, "{} {}", self.ar.kind, self.name),
        }
    }
}

/// The resource name of a kind (English plural rules suffice for every kind we write).
pub fn plural(kind: &str) -> String {
    let k = kind.to_ascii_lowercase();
    if let Some(stem) = k.strip_suffix('y') {
        format!("{stem}ies")
    } else if k.ends_with('s') {
        format!("{k}es")
    } else {
        format!("{k}s")
    }
}

/// Whether our field manager has written any field of `obj`.
pub fn managed_by_us(obj: &Json) -> bool {
    obj.pointer("/metadata/managedFields")
        .and_then(Json::as_array)
        .is_some_and(|mf| mf.iter().any(|e| e["manager"] == FIELD_MANAGER))
}

/// Whether our field manager owns the field at `path` (managedFields' `f:` keys, e.g.
/// `["spec", "replicas"]`).
pub fn owns_field(obj: &Json, path: &[&str]) -> bool {
    obj.pointer("/metadata/managedFields")
        .and_then(Json::as_array)
        .is_some_and(|mf| {
            mf.iter().any(|e| {
                if e["manager"] != FIELD_MANAGER {
                    return false;
                }
                let mut cur = &e["fieldsV1"];
                for p in path {
                    cur = &cur[format!("f:{p}")];
                }
                !cur.is_null()
            })
        })
}

/// `true` once the CRD's `Established` condition is `True`.
pub fn crd_established(crd: &Json) -> bool {
    crd.pointer("/status/conditions")
        .and_then(Json::as_array)
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Established" && c["status"] == "True")
        })
}

/// Whether a namespace is being deleted (it then refuses new objects).
pub fn terminating(ns: &Json) -> bool {
    !ns.pointer("/metadata/deletionTimestamp")
        .unwrap_or(&Json::Null)
        .is_null()
}

// ---- Terraform value helpers shared by the Kubernetes resources ----

/// `namespace/name` from an import id, with a diagnostic naming the expected form.
pub fn split_import_id(type_name: &str, id: &str) -> Result<(String, String), Diagnostics> {
    match id.split_once('/') {
        Some((ns, name)) if is_dns_label(ns) && is_dns_subdomain(name) => {
            Ok((ns.to_string(), name.to_string()))
        }
        _ => Err(Diagnostics::single(
            "Invalid import ID",
            format!("{type_name} is imported as \"<namespace>/<name>\", got {id:?}."),
        )),
    }
}

/// RFC 1123 label: what a namespace name must be.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 subdomain: what most object names must be.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// A Kubernetes quantity as an exact fraction `numerator / denominator` of its base unit, so
/// that two spellings of one amount (`1Gi`, `1024Mi`; `0.5G`, `500M`) compare equal: the API
/// server stores quantities in its own canonical spelling.
#[derive(Debug, Clone, Copy)]
pub struct Quantity {
    numerator: u128,
    denominator: u128,
}

impl PartialEq for Quantity {
    fn eq(&self, other: &Self) -> bool {
        // a/b == c/d  <=>  a*d == c*b; an overflow only happens for amounts no volume has.
        match (
            self.numerator.checked_mul(other.denominator),
            other.numerator.checked_mul(self.denominator),
        ) {
            (Some(x), Some(y)) => x == y,
            _ => false,
        }
    }
}

/// Parses `<digits>[.<digits>][suffix]` with a binary (`Ki`..`Ei`) or decimal (`m`, `k`..`E`)
/// suffix, the forms a storage size is written in and the API server writes back. `None` for
/// anything else (signs, exponents, empty, or more than 32 characters).
pub fn parse_quantity(s: &str) -> Option<Quantity> {
    const SUFFIXES: [(&str, u128, u128); 14] = [
        ("Ki", 1 << 10, 1),
        ("Mi", 1 << 20, 1),
        ("Gi", 1 << 30, 1),
        ("Ti", 1 << 40, 1),
        ("Pi", 1 << 50, 1),
        ("Ei", 1 << 60, 1),
        ("m", 1, 1000),
        ("k", 1_000, 1),
        ("M", 1_000_000, 1),
        ("G", 1_000_000_000, 1),
        ("T", 1_000_000_000_000, 1),
        ("P", 1_000_000_000_000_000, 1),
        ("E", 1_000_000_000_000_000_000, 1),
        ("", 1, 1),
    ];
    if s.is_empty() || s.len() > 32 {
        return None;
    }
    let (number, multiplier, divisor) = SUFFIXES
        .iter()
        .find_map(|(suffix, mul, div)| s.strip_suffix(suffix).map(|n| (n, *mul, *div)))?;
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits_only = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits_only(whole) || !digits_only(fraction) {
        return None;
    }
    if number.contains('.') && fraction.is_empty() {
        return None;
    }
    let mantissa: u128 = format!("{whole}{fraction}").parse().ok()?;
    let scale = 10u128.checked_pow(u32::try_from(fraction.len()).ok()?)?;
    Some(Quantity {
        numerator: mantissa.checked_mul(multiplier)?,
        denominator: scale.checked_mul(divisor)?,
    })
}

/// Whether two quantity strings are the same amount (both must parse).
pub fn same_quantity(a: &str, b: &str) -> bool {
    matches!((parse_quantity(a), parse_quantity(b)), (Some(x), Some(y)) if x == y)
}

/// A list of strings read from the API, in the form the prior state used when empty (`null`
/// or `[]`), so an unset optional list does not plan a `[] -> null` diff.
pub fn string_list(items: &[String], prior: &Value) -> Value {
    if items.is_empty() {
        return match prior {
            Value::List(v) if v.is_empty() => prior.clone(),
            _ => Value::Null,
        };
    }
    Value::List(items.iter().map(|s| Value::string(s.as_str())).collect())
}

/// Strings of a list(string) value (unknown and null elements skipped).
pub fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::List(items) | Value::Set(items) => items
            .iter()
            .filter_map(|i| i.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    }
}

/// Items of a list-of-blocks value.
pub fn items(v: &Value) -> &[Value] {
    match v {
        Value::List(items) | Value::Set(items) => items,
        _ => &[],
    }
}

/// `Some(s)` for a non-empty known string.
pub fn opt_str(v: &Value) -> Option<String> {
    v.as_str().filter(|s| !s.is_empty()).map(str::to_string)
}

/// The `force` setting (null counts as false).
pub fn force(v: &Value) -> bool {
    v.get("force").as_bool() == Some(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_compare_by_amount() {
        assert!(same_quantity("1Gi", "1024Mi"));
        assert!(same_quantity("1.5Gi", "1536Mi"));
        assert!(same_quantity("0.5G", "500M"));
        assert!(same_quantity("1.5", "1500m"));
        assert!(same_quantity("2k", "2000"));
        assert!(!same_quantity("1G", "1Gi"));
        assert!(!same_quantity("1Gi", "2Gi"));
        for bad in [
            "",
            "lots",
            "1.",
            ".5",
            "-1Gi",
            "1e3",
            "1 Gi",
            "1GiB",
            "Gi",
            "1.5.2",
            "99999999999999999999999999999999Ei",
        ] {
            assert!(parse_quantity(bad).is_none(), "{bad:?}");
            assert!(!same_quantity(bad, bad), "{bad:?}");
        }
    }

    #[test]
    fn plurals() {
        assert_eq!(plural("AgentPolicy"), "agentpolicies");
        assert_eq!(plural("Deployment"), "deployments");
        assert_eq!(plural("Namespace"), "namespaces");
        assert_eq!(
            plural("CustomResourceDefinition"),
            "customresourcedefinitions"
        );
        assert_eq!(plural("Ingress"), "ingresses");
    }

    #[test]
    fn ca_forms() {
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let b64 = base64::engine::general_purpose::STANDARD;
        let direct = ca_data(pem).unwrap();
        assert_eq!(b64.decode(&direct).unwrap(), pem.trim().as_bytes());
        // EKS reports the CA as base64 of the PEM.
        let encoded = b64.encode(pem);
        assert_eq!(ca_data(&encoded).unwrap(), encoded);
        assert!(matches!(ca_data("not a cert"), Err(SettingsError::BadCa)));
    }

    #[test]
    fn home_is_expanded_in_config_path() {
        let home = std::env::var("HOME").unwrap_or_default();
        if !home.is_empty() {
            assert_eq!(
                expand_home("~/.kube/config"),
                format!("{home}/.kube/config")
            );
        }
        assert_eq!(expand_home("/etc/kubeconfig"), "/etc/kubeconfig");
        assert_eq!(expand_home("~user/x"), "~user/x");
    }

    #[test]
    fn import_ids() {
        assert_eq!(
            split_import_id("t", "team-a/default").unwrap(),
            ("team-a".to_string(), "default".to_string())
        );
        assert!(split_import_id("t", "default").is_err());
        assert!(split_import_id("t", "Team/x").is_err());
        assert!(split_import_id("t", "a/").is_err());
    }

    fn status(code: u16, causes: Json) -> kube::core::Status {
        serde_json::from_value(json!({
            "status": "Failure", "code": code, "reason": "Conflict",
            "message": "Apply failed with 1 conflict",
            "details": { "causes": causes }
        }))
        .unwrap()
    }

    #[test]
    fn conflicts_name_field_and_manager() {
        let s = status(
            409,
            json!([{ "reason": "FieldManagerConflict",
                     "message": "conflict with \"intruder\" using agentplane.dev/v1alpha1",
                     "field": ".spec.suspend" }]),
        );
        assert_eq!(
            conflicts(&s),
            vec![Conflict {
                field: ".spec.suspend".into(),
                manager: "intruder".into()
            }]
        );
        let d = classify_error(
            &kube::Error::Api(Box::new(s)),
            "agentplane_agent_policy \"p\"",
            "apply AgentPolicy a/default",
            "https://127.0.0.1:6443/",
        );
        let text = d.to_string();
        assert!(text.contains("agentplane_agent_policy \"p\""), "{text}");
        assert!(text.contains(".spec.suspend"), "{text}");
        assert!(text.contains("\"intruder\""), "{text}");
        assert!(text.contains("force = true"), "{text}");
    }

    #[test]
    fn unauthorised_names_endpoint() {
        let s: kube::core::Status = serde_json::from_value(
            json!({ "status": "Failure", "code": 401, "reason": "Unauthorized", "message": "Unauthorized" }),
        )
        .unwrap();
        let d = classify_error(
            &kube::Error::Api(Box::new(s)),
            "agentplane_edge_device \"d\"",
            "get EdgeDevice a/d",
            "https://127.0.0.1:6443/",
        );
        assert!(d.0[0].summary.contains("agentplane_edge_device"));
        assert!(d.0[0].detail.contains("https://127.0.0.1:6443/"));
    }

    #[test]
    fn diff_paths_lists_changed_fields() {
        let a = json!({"spec": {"replicas": 2, "x": [1, 2]}, "metadata": {"name": "a"}});
        let b = json!({"spec": {"replicas": 3, "x": [1, 5]}, "metadata": {"name": "a"}});
        let mut out = Vec::new();
        diff_paths(&a, &b, "", &mut out);
        assert_eq!(out, vec![".spec.replicas", ".spec.x[1]"]);
    }

    #[test]
    fn field_ownership() {
        let obj = json!({"metadata": {"managedFields": [
            {"manager": FIELD_MANAGER, "fieldsV1": {"f:spec": {"f:replicas": {}}}},
            {"manager": "kubectl", "fieldsV1": {"f:spec": {"f:paused": {}}}}
        ]}});
        assert!(managed_by_us(&obj));
        assert!(owns_field(&obj, &["spec", "replicas"]));
        assert!(!owns_field(&obj, &["spec", "paused"]));
    }

    #[test]
    fn empty_lists_follow_prior_form() {
        assert_eq!(string_list(&[], &Value::Null), Value::Null);
        let empty = Value::List(vec![]);
        assert_eq!(string_list(&[], &empty), empty);
        assert_eq!(
            string_list(&["a".into()], &Value::Null),
            Value::List(vec![Value::string("a")])
        );
    }
}
