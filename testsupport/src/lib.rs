//! Brings the local real-peer stack up and down for integration tests.
//!
//! The stack (etcd, kube-apiserver, moto) is started by `ci/stack.sh` from the
//! binaries `ci/peers.sh` caches; nothing here fakes a peer. A missing peer is
//! an error naming `make peers`, never a skipped test.
//!
//! ```no_run
//! # async fn demo() -> Result<(), agentplane_testsupport::Error> {
//! let stack = agentplane_testsupport::Stack::shared()?;
//! let client = stack.kube_client().await?;
//! let aws = stack.aws_sdk_config().await;
//! # let _ = (client, aws);
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

/// Credentials moto accepts; they only ever reach the local emulator.
pub const TEST_ACCESS_KEY_ID: &str = "testing";
pub const TEST_SECRET_ACCESS_KEY: &str = "testing";
pub const TEST_REGION: &str = "us-east-1";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("peer `{peer}` is not available: {detail}; run `make peers` (ci/peers.sh) first")]
    PeerMissing { peer: String, detail: String },
    #[error("unknown peer `{0}` (known: {known})", known = known_peers())]
    UnknownPeer(String),
    #[error("cannot run {command}: {source}")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("`ci/stack.sh {action}` failed ({status}):\n{stderr}")]
    Script {
        action: &'static str,
        status: String,
        stderr: String,
    },
    #[error("{path}: {reason}")]
    StackEnv { path: PathBuf, reason: String },
    #[error("cannot create the stack directory: {0}")]
    TempDir(#[source] io::Error),
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("building the kube client: {0}")]
    KubeClient(#[from] kube::Error),
    #[error("the shared stack failed to start: {0}")]
    Shared(String),
    #[error("CRD {name}: {reason}")]
    Crd { name: String, reason: String },
    #[error("browser script {} failed ({status}):\n{output}", script.display())]
    Playwright {
        script: PathBuf,
        status: String,
        output: String,
    },
}

/// Peer name as tests say it, and the variable `ci/peers.sh` writes for it.
const PEERS: &[(&str, &str)] = &[
    ("moto_server", "AGENTPLANE_MOTO_SERVER"),
    ("schemathesis", "AGENTPLANE_SCHEMATHESIS"),
    ("chromium", "AGENTPLANE_CHROMIUM"),
    ("playwright-core", "AGENTPLANE_PLAYWRIGHT_CORE"),
    ("mcp-everything", "AGENTPLANE_MCP_EVERYTHING"),
    ("etcd", "AGENTPLANE_ETCD"),
    ("kube-apiserver", "AGENTPLANE_KUBE_APISERVER"),
    ("tofu", "AGENTPLANE_TOFU"),
    ("terraform", "AGENTPLANE_TERRAFORM"),
    ("crossplane", "AGENTPLANE_CROSSPLANE"),
    (
        "function-patch-and-transform",
        "AGENTPLANE_FN_PATCH_AND_TRANSFORM",
    ),
    ("function-auto-ready", "AGENTPLANE_FN_AUTO_READY"),
    ("helm", "AGENTPLANE_HELM"),
    ("cargo-deb", "AGENTPLANE_CARGO_DEB"),
    ("registry", "AGENTPLANE_REGISTRY"),
    ("crane", "AGENTPLANE_CRANE"),
    ("mcp-python", "AGENTPLANE_MCP_PYTHON"),
    ("opa", "AGENTPLANE_OPA"),
    ("llama-cpp", "AGENTPLANE_LLAMA_PYTHON"),
];

fn known_peers() -> String {
    PEERS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
}

/// The repository root, found from this crate's manifest directory so tests of
/// any crate resolve the same `ci/` scripts.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testsupport lives one level below the repository root")
        .to_path_buf()
}

/// `$AGENTPLANE_CACHE/peers/peers.env`, as written by `ci/peers.sh`.
pub fn peers_env_path() -> PathBuf {
    let cache = std::env::var_os("AGENTPLANE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap_or_default();
            Path::new(&home).join(".cache/agentplane")
        });
    cache.join("peers/peers.env")
}

/// Absolute path of a peer binary, e.g. `peer_path("tofu")`.
///
/// An `AGENTPLANE_*` variable already in the environment wins over
/// `peers.env`, so a developer can point a test at another build.
pub fn peer_path(peer: &str) -> Result<PathBuf, Error> {
    let var = PEERS
        .iter()
        .find(|(name, var)| *name == peer || *var == peer)
        .map(|(_, var)| *var)
        .ok_or_else(|| Error::UnknownPeer(peer.to_owned()))?;
    resolve_peer(peer, var, std::env::var_os(var), &peers_env_path())
}

fn resolve_peer(
    peer: &str,
    var: &str,
    overridden: Option<std::ffi::OsString>,
    env_file: &Path,
) -> Result<PathBuf, Error> {
    let missing = |detail: String| Error::PeerMissing {
        peer: peer.to_owned(),
        detail,
    };
    let path =
        match overridden {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => {
                let text = fs::read_to_string(env_file)
                    .map_err(|e| missing(format!("cannot read {}: {e}", env_file.display())))?;
                let vars = parse_env(&text);
                PathBuf::from(vars.get(var).ok_or_else(|| {
                    missing(format!("{var} is not set in {}", env_file.display()))
                })?)
            }
        };
    if !is_executable(&path) {
        return Err(missing(format!(
            "{var}={} is not an executable file",
            path.display()
        )));
    }
    Ok(path)
}

/// Picks rustls' process-wide crypto provider. The workspace builds rustls with both ring (the
/// provider's and edge agent's choice) and aws-lc-rs (the gateway's), and with two compiled in rustls
/// refuses to guess, so kube's client would fail to build its TLS config. Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Server-side applies each CustomResourceDefinition under `field_manager` (client-side apply's
/// last-applied annotation overflows on large upstream CRDs) and waits until every one is
/// Established, so objects of those kinds can be created right after.
pub async fn apply_crds(
    client: &kube::Client,
    crds: &[serde_json::Value],
    field_manager: &str,
) -> Result<(), Error> {
    use kube::api::{Api, DynamicObject, Patch, PatchParams};
    use kube::core::{ApiResource, GroupVersionKind};

    let crd_kind = GroupVersionKind::gvk("apiextensions.k8s.io", "v1", "CustomResourceDefinition");
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &ApiResource::from_gvk(&crd_kind));
    let params = PatchParams::apply(field_manager).force();
    let crd_error = |name: &str, reason: String| Error::Crd {
        name: name.to_owned(),
        reason,
    };
    let mut names = Vec::with_capacity(crds.len());
    for crd in crds {
        let name = crd["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        api.patch(&name, &params, &Patch::Apply(crd))
            .await
            .map_err(|e| crd_error(&name, format!("applying: {e}")))?;
        names.push(name);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    for name in names {
        loop {
            let got = api
                .get(&name)
                .await
                .map_err(|e| crd_error(&name, format!("reading back: {e}")))?;
            let established = got.data["status"]["conditions"]
                .as_array()
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c["type"] == "Established" && c["status"] == "True")
                });
            if established {
                break;
            }
            if std::time::Instant::now() > deadline {
                return Err(crd_error(
                    &name,
                    format!("not Established after 60 s: {}", got.data["status"]),
                ));
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Runs a Playwright script (`node script`) against the chromium and playwright-core peers: the
/// script is copied into a scratch directory whose `node_modules` is the peer's (so ESM resolution
/// finds playwright-core without installing anything into the source tree), with `CHROMIUM` set to
/// the browser and `env` added. It passed if it exited 0 and printed `marker`; its stdout is
/// returned. A missing peer is an error naming it; a failed run, one carrying its whole output.
pub fn run_playwright(
    script: &Path,
    env: &[(&str, &OsStr)],
    marker: &str,
) -> Result<String, Error> {
    let chromium = peer_path("chromium")?;
    let node_modules = peer_path("playwright-core")?.with_file_name("node_modules");
    let scratch = tempfile::tempdir().map_err(Error::TempDir)?;
    let name = script.file_name().unwrap_or(script.as_os_str());
    let spawn = |source| Error::Spawn {
        command: format!("node {}", script.display()),
        source,
    };
    fs::copy(script, scratch.path().join(name)).map_err(spawn)?;
    std::os::unix::fs::symlink(node_modules, scratch.path().join("node_modules")).map_err(spawn)?;
    let mut cmd = Command::new("node");
    cmd.arg(name)
        .current_dir(scratch.path())
        .env("CHROMIUM", chromium);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().map_err(spawn)?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() || !stdout.contains(marker) {
        return Err(Error::Playwright {
            script: script.to_path_buf(),
            status: out.status.to_string(),
            output: format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr)),
        });
    }
    Ok(stdout)
}

/// A `Command` for a peer's CLI (e.g. `tofu`, `crossplane`, `helm`).
pub fn peer_command(peer: &str) -> Result<Command, Error> {
    Ok(Command::new(peer_path(peer)?))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Parses the `export KEY=VALUE` lines the ci scripts write.
fn parse_env(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let l = l.strip_prefix("export ").unwrap_or(l);
            let (k, v) = l.split_once('=')?;
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            Some((k.trim().to_owned(), v.to_owned()))
        })
        .collect()
}

/// A running stack of real peers; stopped (every process it started) on drop.
pub struct Stack {
    dir: PathBuf,
    env: BTreeMap<String, String>,
    stopped: bool,
    // Held so the directory outlives the stack; `down` removes it first.
    _tmp: tempfile::TempDir,
}

impl fmt::Debug for Stack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The env holds the admin token; keep it out of test output.
        f.debug_struct("Stack").field("dir", &self.dir).finish()
    }
}

impl Stack {
    /// Starts a fresh stack owned by this test process: if the process dies
    /// without dropping it, the stack's watchdog stops the peers.
    pub fn start() -> Result<Stack, Error> {
        for peer in ["etcd", "kube-apiserver", "moto_server"] {
            peer_path(peer)?;
        }
        let tmp = tempfile::Builder::new()
            .prefix("agentplane-stack.")
            .tempdir()
            .map_err(Error::TempDir)?;
        let dir = tmp.path().to_path_buf();
        let pid = std::process::id().to_string();
        let dir_arg = dir.to_string_lossy().into_owned();
        run_script("up", &["--dir", &dir_arg, "--owner-pid", &pid])?;
        let env_file = dir.join("stack.env");
        let text = fs::read_to_string(&env_file).map_err(|e| Error::StackEnv {
            path: env_file.clone(),
            reason: e.to_string(),
        })?;
        let env = parse_env(&text);
        let stack = Stack {
            dir,
            env,
            stopped: false,
            _tmp: tmp,
        };
        for key in ["KUBECONFIG", "AWS_ENDPOINT_URL"] {
            if !stack.env.contains_key(key) {
                return Err(Error::StackEnv {
                    path: env_file,
                    reason: format!("{key} is missing"),
                });
            }
        }
        Ok(stack)
    }

    /// One stack per test process, started on first use. Tests sharing it
    /// must isolate themselves (unique namespaces, queue names, key aliases).
    ///
    /// Statics are never dropped, so this stack is stopped by its watchdog
    /// when the test process exits.
    pub fn shared() -> Result<&'static Stack, Error> {
        static SHARED: OnceLock<Result<Stack, String>> = OnceLock::new();
        SHARED
            .get_or_init(|| Stack::start().map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| Error::Shared(e.clone()))
    }

    /// The directory holding the stack's state, logs, kubeconfig and stack.env.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Everything in stack.env (KUBECONFIG, AWS_*, AGENTPLANE_*).
    pub fn env(&self) -> &BTreeMap<String, String> {
        &self.env
    }

    pub fn kubeconfig_path(&self) -> PathBuf {
        PathBuf::from(&self.env["KUBECONFIG"])
    }

    /// moto's endpoint, e.g. `http://127.0.0.1:41234`.
    pub fn aws_endpoint(&self) -> &str {
        &self.env["AWS_ENDPOINT_URL"]
    }

    /// A kube client authenticated as a `system:masters` member.
    pub async fn kube_client(&self) -> Result<kube::Client, Error> {
        install_crypto_provider();
        let path = self.kubeconfig_path();
        let kubeconfig =
            kube::config::Kubeconfig::read_from(&path).map_err(|source| Error::Kubeconfig {
                path: path.clone(),
                source,
            })?;
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .map_err(|source| Error::Kubeconfig { path, source })?;
        Ok(kube::Client::try_from(config)?)
    }

    /// An AWS SDK config pointed at moto with the test credentials. Region,
    /// endpoint and credentials are set explicitly, so a developer's own AWS
    /// profile or environment cannot point a test at a real account.
    pub async fn aws_sdk_config(&self) -> aws_config::SdkConfig {
        let creds = aws_credential_types::Credentials::new(
            TEST_ACCESS_KEY_ID,
            TEST_SECRET_ACCESS_KEY,
            None,
            None,
            "agentplane-stack",
        );
        aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(TEST_REGION))
            .endpoint_url(self.aws_endpoint())
            .credentials_provider(creds)
            .load()
            .await
    }

    /// A `Command` for a peer's CLI with the stack's environment applied
    /// (KUBECONFIG, AWS endpoint and test credentials).
    pub fn command(&self, peer: &str) -> Result<Command, Error> {
        let mut cmd = peer_command(peer)?;
        cmd.envs(&self.env);
        Ok(cmd)
    }

    /// Stops the stack now, reporting failure (drop does the same silently).
    pub fn stop(mut self) -> Result<(), Error> {
        self.stopped = true;
        self.down()
    }

    fn down(&self) -> Result<(), Error> {
        let dir = self.dir.to_string_lossy().into_owned();
        run_script("down", &["--dir", &dir]).map(|_| ())
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        if let Err(e) = self.down() {
            eprintln!("agentplane-testsupport: stopping the stack failed: {e}");
        }
    }
}

fn run_script(action: &'static str, args: &[&str]) -> Result<Output, Error> {
    let script = repo_root().join("ci/stack.sh");
    // The script's children write only to their own log files, so these
    // pipes close as soon as the script itself exits.
    let output = Command::new("bash")
        .arg(&script)
        .arg(action)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Error::Spawn {
            command: format!("bash {} {action}", script.display()),
            source,
        })?;
    if !output.status.success() {
        return Err(Error::Script {
            action,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    Ok(output)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_env_lines() {
        let vars =
            parse_env("# comment\nexport A=1\nB=\"two words\"\n\nexport C='x=y'\nnot a pair\n");
        assert_eq!(vars.get("A").map(String::as_str), Some("1"));
        assert_eq!(vars.get("B").map(String::as_str), Some("two words"));
        assert_eq!(vars.get("C").map(String::as_str), Some("x=y"));
        assert_eq!(vars.len(), 3);
    }

    #[test]
    fn unknown_peer_is_an_error() {
        let err = peer_path("no-such-peer").unwrap_err();
        assert!(matches!(err, Error::UnknownPeer(_)), "{err}");
    }

    #[test]
    fn missing_peer_names_make_peers() {
        let dir = tempfile::tempdir().unwrap();
        let env_file = dir.path().join("peers.env");
        fs::write(&env_file, "export AGENTPLANE_HELM=/nonexistent/helm\n").unwrap();
        let err = resolve_peer("helm", "AGENTPLANE_HELM", None, &env_file).unwrap_err();
        assert!(matches!(err, Error::PeerMissing { .. }), "{err}");
        assert!(err.to_string().contains("make peers"), "{err}");

        let absent = dir.path().join("absent.env");
        let err = resolve_peer("helm", "AGENTPLANE_HELM", None, &absent).unwrap_err();
        assert!(err.to_string().contains("make peers"), "{err}");
    }

    #[test]
    fn peer_found_through_peers_env() {
        let dir = tempfile::tempdir().unwrap();
        let env_file = dir.path().join("peers.env");
        fs::write(&env_file, "export AGENTPLANE_HELM=/bin/sh\n").unwrap();
        let path = resolve_peer("helm", "AGENTPLANE_HELM", None, &env_file).unwrap();
        assert_eq!(path, PathBuf::from("/bin/sh"));
        let path =
            resolve_peer("helm", "AGENTPLANE_HELM", Some("/bin/ls".into()), &env_file).unwrap();
        assert_eq!(path, PathBuf::from("/bin/ls"));
    }
}
