//! Shared helpers of the composition tests: the real functions as local processes,
//! `crossplane render`, the simulated reconcile loop, golden files, and installing upstream
//! CRDs into the real kube-apiserver of `agentplane-testsupport` for server-side dry runs.
//!
//! Nothing is skipped: a missing peer or a missing CRD folder is a test failure naming the cause.
#![allow(dead_code)] // Each test binary uses a different subset.

use std::collections::BTreeMap;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
    ValidationDirective,
};
use serde::Deserialize;
use serde_json::{Value, json};

pub type Error = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub const FIELD_MANAGER: &str = "agentplane-compositions-test";

/// `compositions/`.
pub fn comp_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The upstream CRDs: `$AGENTPLANE_CRDS` (relative paths are taken from the repository root),
/// else `../shared/crds` next to the repository.
pub fn crds_dir() -> PathBuf {
    let root = agentplane_testsupport::repo_root();
    let dir = match std::env::var_os("AGENTPLANE_CRDS") {
        Some(d) if !d.is_empty() => {
            let d = PathBuf::from(d);
            if d.is_absolute() { d } else { root.join(d) }
        }
        _ => root.join("../shared/crds"),
    };
    assert!(
        dir.join("SOURCES.md").is_file(),
        "the upstream CRD folder {} is missing (set AGENTPLANE_CRDS to a copy of shared/crds)",
        dir.display()
    );
    dir
}

pub fn read_text(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()).into())
}

/// Every non-empty YAML document of `text`, as JSON values.
pub fn yaml_docs(text: &str) -> Result<Vec<Value>> {
    let mut docs = Vec::new();
    for de in serde_yaml::Deserializer::from_str(text) {
        let v = Value::deserialize(de)?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

pub fn read_yaml_docs(path: &Path) -> Result<Vec<Value>> {
    yaml_docs(&read_text(path)?).map_err(|e| format!("{}: {e}", path.display()).into())
}

/// The single YAML document in `path`.
pub fn read_yaml(path: &Path) -> Result<Value> {
    let mut docs = read_yaml_docs(path)?;
    if docs.len() != 1 {
        return Err(format!(
            "{}: expected one YAML document, found {}",
            path.display(),
            docs.len()
        )
        .into());
    }
    Ok(docs.remove(0))
}

pub fn to_yaml_docs(docs: &[Value]) -> Result<String> {
    let mut out = String::new();
    for d in docs {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(d)?);
    }
    Ok(out)
}

/// Sets `value` at a `/`-separated path, creating objects on the way.
pub fn set_path(root: &mut Value, path: &str, value: Value) {
    let mut cur = root;
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    for (i, p) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        if let Ok(idx) = p.parse::<usize>() {
            let arr = cur.as_array_mut().expect("path goes through an array");
            if last {
                arr[idx] = value;
                return;
            }
            cur = &mut arr[idx];
        } else {
            if !cur.is_object() {
                *cur = json!({});
            }
            let obj = cur.as_object_mut().expect("object");
            if last {
                obj.insert((*p).to_owned(), value);
                return;
            }
            cur = obj.entry((*p).to_owned()).or_insert_with(|| json!({}));
        }
    }
}

pub fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| {
            panic!(
                "no string at {pointer} in {}",
                serde_json::to_string(v).unwrap_or_default()
            )
        })
}

// ---------------------------------------------------------------------------------------------
// The functions, as local processes

/// Both composition functions running with `--insecure` on free 127.0.0.1 ports; killed on drop.
pub struct Functions {
    procs: Vec<(String, u16, Child)>,
    dir: tempfile::TempDir,
}

/// Function name in functions.yaml and the Composition, and its testsupport peer name.
const FUNCTIONS: &[&str] = &["function-patch-and-transform", "function-auto-ready"];

fn free_port() -> Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(l.local_addr()?.port())
}

impl Functions {
    pub fn start() -> Result<Functions> {
        let dir = tempfile::Builder::new()
            .prefix("agentplane-fns.")
            .tempdir()?;
        let mut fns = Functions {
            procs: Vec::new(),
            dir,
        };
        for name in FUNCTIONS {
            let bin = agentplane_testsupport::peer_path(name)?;
            let port = free_port()?;
            let log = fs::File::create(fns.dir.path().join(format!("{name}.log")))?;
            let child = Command::new(&bin)
                .arg("--insecure")
                .arg(format!("--address=127.0.0.1:{port}"))
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
            fns.procs.push(((*name).to_owned(), port, child));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for i in 0..fns.procs.len() {
            let port = fns.procs[i].1;
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            loop {
                let name = fns.procs[i].0.clone();
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    // The port answers; make sure it is our process (the port was free a moment
                    // ago, but another process could have taken it in between).
                    std::thread::sleep(Duration::from_millis(100));
                    if let Some(status) = fns.procs[i].2.try_wait()? {
                        return Err(format!("{name} exited ({status}): {}", fns.log(&name)).into());
                    }
                    break;
                }
                if let Some(status) = fns.procs[i].2.try_wait()? {
                    return Err(format!(
                        "{name} exited ({status}) before listening: {}",
                        fns.log(&name)
                    )
                    .into());
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "{name} is not listening on {addr} after 30s: {}",
                        fns.log(&name)
                    )
                    .into());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(fns)
    }

    fn log(&self, name: &str) -> String {
        fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// compositions/functions.yaml with each development target pointed at the running process.
    pub fn functions_file(&self) -> Result<PathBuf> {
        let mut docs = read_yaml_docs(&comp_dir().join("functions.yaml"))?;
        for d in &mut docs {
            let name = str_at(d, "/metadata/name").to_owned();
            let port = self
                .procs
                .iter()
                .find(|(n, _, _)| *n == name)
                .map(|(_, p, _)| *p)
                .ok_or_else(|| format!("functions.yaml names an unknown function {name}"))?;
            let ann = d
                .pointer_mut("/metadata/annotations")
                .and_then(Value::as_object_mut)
                .ok_or("functions.yaml: a Function without annotations")?;
            if ann
                .get("render.crossplane.io/runtime")
                .and_then(Value::as_str)
                != Some("Development")
            {
                return Err(format!(
                    "functions.yaml: {name} is not annotated for the Development runtime"
                )
                .into());
            }
            ann.insert(
                "render.crossplane.io/runtime-development-target".into(),
                Value::String(format!("127.0.0.1:{port}")),
            );
        }
        let path = self.dir.path().join("functions.yaml");
        fs::write(&path, to_yaml_docs(&docs)?)?;
        Ok(path)
    }
}

impl Drop for Functions {
    fn drop(&mut self) {
        for (_, _, child) in &mut self.procs {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Rendering

/// The two flavours: the claim's composite on the v1 XRD, and the namespaced v2 XR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    V1,
    V2,
}

impl Variant {
    pub fn label(self) -> &'static str {
        match self {
            Variant::V1 => "v1",
            Variant::V2 => "v2",
        }
    }
    pub fn composition(self) -> PathBuf {
        comp_dir().join(self.label()).join("composition.yaml")
    }
    pub fn xrd(self) -> PathBuf {
        comp_dir().join(self.label()).join("xrd.yaml")
    }
    /// The XR to render. For v1 the composite Crossplane makes of examples/claim.yaml; for v2
    /// examples/xr-v2.yaml with the uid the API server would have assigned.
    pub fn xr(self) -> Result<Value> {
        match self {
            Variant::V1 => read_yaml(&comp_dir().join("tests/fixtures/xagentplatform.yaml")),
            Variant::V2 => {
                let mut xr = read_yaml(&comp_dir().join("examples/xr-v2.yaml"))?;
                set_path(
                    &mut xr,
                    "/metadata/uid",
                    json!("0b7f6a9e-3c1d-4f2b-8e5a-7d9c1b2a3f40"),
                );
                Ok(xr)
            }
        }
    }
}

/// Runs `crossplane render` for `xr` with `observed` composed resources; returns stdout.
pub fn render(fns: &Functions, variant: Variant, xr: &Value, observed: &[Value]) -> Result<String> {
    let dir = tempfile::Builder::new()
        .prefix("agentplane-render.")
        .tempdir()?;
    let xr_path = dir.path().join("xr.yaml");
    fs::write(&xr_path, serde_yaml::to_string(xr)?)?;
    let mut cmd = agentplane_testsupport::peer_command("crossplane")?;
    cmd.arg("render")
        .arg(&xr_path)
        .arg(variant.composition())
        .arg(fns.functions_file()?)
        .arg(format!("--xrd={}", variant.xrd().display()))
        .arg("--include-full-xr")
        .arg("--include-function-results")
        .arg("--timeout=2m");
    if !observed.is_empty() {
        let odir = dir.path().join("observed");
        fs::create_dir(&odir)?;
        for (i, o) in observed.iter().enumerate() {
            fs::write(odir.join(format!("{i:02}.yaml")), serde_yaml::to_string(o)?)?;
        }
        cmd.arg(format!("--observed-resources={}", odir.display()));
    }
    let out = cmd.stdin(Stdio::null()).output()?;
    if !out.status.success() {
        return Err(format!(
            "crossplane render ({}) failed ({}):\n{}",
            variant.label(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(String::from_utf8(out.stdout)?)
}

pub const RESOURCE_NAME: &str = "crossplane.io/composition-resource-name";

pub fn resource_name(doc: &Value) -> Option<&str> {
    doc.pointer("/metadata/annotations")
        .and_then(|a| a.get(RESOURCE_NAME))
        .and_then(Value::as_str)
}

/// The composed resources of a render output (not the XR, not the Results).
pub fn composed(docs: &[Value]) -> Vec<&Value> {
    docs.iter()
        .skip(1)
        .filter(|d| resource_name(d).is_some())
        .collect()
}

pub fn find<'a>(docs: &'a [Value], name: &str) -> Option<&'a Value> {
    composed(docs)
        .into_iter()
        .find(|d| resource_name(d) == Some(name))
}

/// One simulated reconcile: what went into `crossplane render` and what came out.
pub struct Pass {
    pub xr: Value,
    pub observed: Vec<Value>,
    pub output: String,
    pub docs: Vec<Value>,
}

pub fn ready_condition() -> Value {
    json!([
        {"type": "Ready", "status": "True", "reason": "Available", "lastTransitionTime": "2026-11-24T00:00:00Z"},
        {"type": "Synced", "status": "True", "reason": "ReconcileSuccess", "lastTransitionTime": "2026-11-24T00:00:00Z"}
    ])
}

/// What the API server and the providers would hold for a rendered resource once Crossplane
/// applied it: a name in place of generateName, and the provider's status from
/// tests/fixtures/provider-status.yaml.
pub fn observe(desired: &Value, table: &Value, xr_name: &str, fifo: bool) -> Value {
    let mut o = desired.clone();
    let rname = resource_name(desired)
        .expect("composed resource")
        .to_owned();
    let meta = o["metadata"].as_object_mut().expect("metadata");
    if meta
        .get("name")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        let prefix = meta
            .get("generateName")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        meta.insert("name".into(), Value::String(format!("{prefix}{rname}")));
    }
    meta.remove("generateName");
    let name = meta["name"].as_str().unwrap_or_default().to_owned();
    if let Some(status) = table.get(&rname) {
        let text = serde_json::to_string(status)
            .expect("json")
            .replace("{xr}", xr_name)
            .replace("{name}", &name)
            .replace("{fifo}", if fifo { ".fifo" } else { "" });
        let mut status: Value = serde_json::from_str(&text).expect("json");
        status["conditions"] = ready_condition();
        o["status"] = status;
    }
    o
}

pub fn provider_status_table() -> Result<Value> {
    read_yaml(&comp_dir().join("tests/fixtures/provider-status.yaml"))
}

/// Simulates Crossplane's reconcile loop with `crossplane render`: each pass renders the XR
/// (carrying the status the previous pass produced) against the observed copies of the previous
/// pass's composed resources, until the output no longer changes.
pub fn converge(fns: &Functions, variant: Variant) -> Result<Vec<Pass>> {
    let table = provider_status_table()?;
    let mut xr = variant.xr()?;
    let xr_name = str_at(&xr, "/metadata/name").to_owned();
    let fifo = xr
        .pointer("/spec/queue/fifo")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let mut observed: Vec<Value> = Vec::new();
    let mut passes: Vec<Pass> = Vec::new();
    for _ in 0..10 {
        let output = render(fns, variant, &xr, &observed)?;
        let docs = yaml_docs(&output)?;
        let same = passes.last().is_some_and(|p| p.output == output);
        let next_status = docs[0].get("status").cloned().unwrap_or(Value::Null);
        let next_observed: Vec<Value> = composed(&docs)
            .into_iter()
            .map(|d| observe(d, &table, &xr_name, fifo))
            .collect();
        passes.push(Pass {
            xr: xr.clone(),
            observed,
            output,
            docs,
        });
        if same {
            return Ok(passes);
        }
        xr["status"] = next_status;
        observed = next_observed;
    }
    Err(format!("{}: render did not converge in 10 passes", variant.label()).into())
}

// ---------------------------------------------------------------------------------------------
// Golden files

/// Compares `actual` with tests/golden/`name`; `UPDATE_GOLDEN=1` rewrites the file instead.
pub fn check_golden(name: &str, actual: &str) {
    let path = comp_dir().join("tests/golden").join(name);
    if std::env::var("UPDATE_GOLDEN").is_ok_and(|v| v == "1") {
        fs::write(&path, actual).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        return;
    }
    let expected = fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "golden file {}: {e}; run with UPDATE_GOLDEN=1 and review the diff",
            path.display()
        )
    });
    if expected == actual {
        return;
    }
    let (e, a): (Vec<&str>, Vec<&str>) = (expected.lines().collect(), actual.lines().collect());
    let first = e
        .iter()
        .zip(&a)
        .position(|(x, y)| x != y)
        .unwrap_or(e.len().min(a.len()));
    let from = first.saturating_sub(3);
    let show = |lines: &[&str]| {
        lines
            .iter()
            .enumerate()
            .skip(from)
            .take(10)
            .map(|(i, l)| format!("{:5} {l}\n", i + 1))
            .collect::<String>()
    };
    panic!(
        "rendered output differs from {} at line {} ({} lines expected, {} rendered)\n--- expected\n{}--- rendered\n{}\
         If the change is intended, run `UPDATE_GOLDEN=1 cargo test -p agentplane-compositions` and review the diff.",
        path.display(),
        first + 1,
        e.len(),
        a.len(),
        show(&e),
        show(&a)
    );
}

// ---------------------------------------------------------------------------------------------
// kube-apiserver

fn crd_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("apiextensions.k8s.io", "v1", "CustomResourceDefinition"),
        "customresourcedefinitions",
    )
}

/// Where each installed kind is served: (group, kind) -> (plural, namespaced).
#[derive(Default, Clone)]
pub struct CrdIndex(BTreeMap<(String, String), (String, bool)>);

impl CrdIndex {
    pub fn add_crd(&mut self, crd: &Value) {
        let group = str_at(crd, "/spec/group").to_owned();
        let kind = str_at(crd, "/spec/names/kind").to_owned();
        let plural = str_at(crd, "/spec/names/plural").to_owned();
        let namespaced = str_at(crd, "/spec/scope") == "Namespaced";
        self.0.insert((group, kind), (plural, namespaced));
    }

    pub fn plural(&self, group: &str, kind: &str) -> Option<&str> {
        self.0
            .get(&(group.to_owned(), kind.to_owned()))
            .map(|(p, _)| p.as_str())
    }

    /// The Api for `obj`'s kind, and the namespace it goes to (`default_ns` if it names none).
    pub fn api_for(
        &self,
        client: &kube::Client,
        obj: &Value,
        default_ns: &str,
    ) -> Result<Api<DynamicObject>> {
        let api_version = str_at(obj, "/apiVersion");
        let kind = str_at(obj, "/kind");
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let (plural, namespaced) = self
            .0
            .get(&(group.to_owned(), kind.to_owned()))
            .ok_or_else(|| format!("no CRD installed for {kind}.{group}"))?;
        let ar =
            ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
        Ok(if *namespaced {
            let ns = obj
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or(default_ns);
            Api::namespaced_with(client.clone(), ns, &ar)
        } else {
            Api::all_with(client.clone(), &ar)
        })
    }
}

/// Server-side applies every CustomResourceDefinition in `files` (client-side apply's
/// last-applied annotation would overflow on the large upjet CRDs) and waits until each is
/// Established.
pub async fn install_crds(client: &kube::Client, files: &[PathBuf]) -> Result<CrdIndex> {
    let mut crds = Vec::new();
    for f in files {
        for mut d in read_yaml_docs(f)? {
            if d.get("kind").and_then(Value::as_str) != Some("CustomResourceDefinition") {
                continue;
            }
            // A provider package's conversion webhook names no service: Crossplane's package
            // manager fills in the provider's webhook Service at install time. No provider runs
            // here, so conversion is off; objects are validated in the version they are written.
            let webhook_without_service = d.pointer("/spec/conversion/strategy")
                == Some(&json!("Webhook"))
                && d.pointer("/spec/conversion/webhook/clientConfig/service/name")
                    .is_none();
            if webhook_without_service {
                d["spec"]["conversion"] = json!({"strategy": "None"});
            }
            crds.push(d);
        }
    }
    install_crd_values(client, &crds).await
}

pub async fn install_crd_values(client: &kube::Client, crds: &[Value]) -> Result<CrdIndex> {
    agentplane_testsupport::apply_crds(client, crds, FIELD_MANAGER).await?;
    let mut index = CrdIndex::default();
    for crd in crds {
        index.add_crd(crd);
    }
    Ok(index)
}

pub async fn ensure_namespace(client: &kube::Client, name: &str) -> Result<()> {
    use k8s_openapi::api::core::v1::Namespace;
    let api: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}}))?;
    match api.create(&PostParams::default(), &ns).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(format!("creating namespace {name}: {e}").into()),
    }
}

/// The API server's answer to a dry-run create of `obj`: the object as it would be stored
/// (defaults applied), or the rejection's message.
///
/// This is a server-side apply with `dryRun=All` and `fieldValidation=Strict`: unlike a plain
/// create (whose default is `Warn`), unknown or duplicate fields are errors. An object with only
/// `generateName` gets the name Crossplane would generate a stand-in for.
pub async fn dry_run_create(
    client: &kube::Client,
    index: &CrdIndex,
    obj: &Value,
    default_ns: &str,
) -> Result<Value, String> {
    let api = index
        .api_for(client, obj, default_ns)
        .map_err(|e| e.to_string())?;
    let mut obj = obj.clone();
    let meta = obj
        .get_mut("metadata")
        .and_then(Value::as_object_mut)
        .ok_or("no metadata")?;
    if meta
        .get("name")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        let prefix = meta
            .remove("generateName")
            .and_then(|v| v.as_str().map(str::to_owned));
        let prefix = prefix.ok_or("neither name nor generateName")?;
        let suffix = resource_name_of_meta(&Value::Object(meta.clone()))
            .unwrap_or("generated")
            .to_owned();
        meta.insert("name".into(), Value::String(format!("{prefix}{suffix}")));
    }
    // A uid in a render input stands in for the server's; the server assigns its own.
    meta.remove("uid");
    let name = meta["name"].as_str().unwrap_or_default().to_owned();
    let pp = PatchParams {
        dry_run: true,
        force: true,
        field_manager: Some(FIELD_MANAGER.into()),
        field_validation: Some(ValidationDirective::Strict),
    };
    match api.patch(&name, &pp, &Patch::Apply(&obj)).await {
        Ok(created) => serde_json::to_value(created).map_err(|e| e.to_string()),
        Err(kube::Error::Api(s)) => Err(format!("{} {}: {}", s.code, s.reason, s.message)),
        Err(e) => Err(e.to_string()),
    }
}

/// A plain dry-run create (`kubectl create --dry-run=server`), as a user creating a claim or an
/// XR does: the server's 422 with every OpenAPI and CEL violation, or Ok.
pub async fn dry_run_post(
    client: &kube::Client,
    index: &CrdIndex,
    obj: &Value,
    default_ns: &str,
) -> Result<Value, String> {
    let api = index
        .api_for(client, obj, default_ns)
        .map_err(|e| e.to_string())?;
    let mut obj = obj.clone();
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("uid");
    }
    let dynobj: DynamicObject = serde_json::from_value(obj).map_err(|e| e.to_string())?;
    let pp = PostParams {
        dry_run: true,
        field_manager: Some(FIELD_MANAGER.into()),
    };
    match api.create(&pp, &dynobj).await {
        Ok(created) => serde_json::to_value(created).map_err(|e| e.to_string()),
        Err(kube::Error::Api(s)) => Err(format!("{} {}: {}", s.code, s.reason, s.message)),
        Err(e) => Err(e.to_string()),
    }
}

/// The resource name annotation as seen from `metadata` alone.
fn resource_name_of_meta(meta: &Value) -> Option<&str> {
    meta.get("annotations")
        .and_then(|a| a.get(RESOURCE_NAME))
        .and_then(Value::as_str)
}

/// A short description of an object for error lists.
pub fn describe(obj: &Value) -> String {
    let name = obj
        .pointer("/metadata/name")
        .or_else(|| obj.pointer("/metadata/generateName"))
        .and_then(Value::as_str)
        .unwrap_or("?");
    let rname = resource_name(obj)
        .map(|r| format!(" [{r}]"))
        .unwrap_or_default();
    format!(
        "{} {} {name}{rname}",
        obj.get("apiVersion").and_then(Value::as_str).unwrap_or("?"),
        obj.get("kind").and_then(Value::as_str).unwrap_or("?")
    )
}
