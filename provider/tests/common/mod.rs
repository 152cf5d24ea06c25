//! Shared by the tests that drive the provider through the real clients (OpenTofu and
//! Terraform 1.5.7), in two layers:
//!
//! - building blocks for any client run: the provider installed into a directory the way users
//!   install it ([`install_provider`]), the environment every client run gets ([`client_env`])
//!   and the `terraform` block requiring the provider ([`required_providers`]). `hangs.rs` uses
//!   only these: its endpoints are silent listeners, not the real-peer stack.
//! - [`Workspace`]: a working directory on those blocks whose provider talks to moto (and, through
//!   extra provider settings, to kube-apiserver) from the shared real-peer stack, with a per-test
//!   prefix for every name it creates (`e2e.rs`, `drift.rs`, `eks_resources.rs`,
//!   `kube_resources.rs`).
//!
//! The provider is installed as an unpacked filesystem mirror holding the built binary
//! (symlinked). dev_overrides would skip `init`, which Terraform 1.5.7 refuses to run under
//! overrides ("Skip terraform init when using provider development overrides").

// Each test binary compiles its own copy of this module and uses a different subset of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use agentplane_testsupport::{Stack, TEST_ACCESS_KEY_ID, TEST_REGION, TEST_SECRET_ACCESS_KEY};

/// The provider binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_terraform-provider-agentplane");

/// The source address the test configurations require.
pub const SOURCE: &str = "registry.terraform.io/agentplane/agentplane";

/// Installs the built provider into `dir` as an unpacked filesystem mirror (the binary,
/// symlinked) and writes `dir/cli.tfrc` pointing the client at it.
pub fn install_provider(dir: &Path) {
    let version = env!("CARGO_PKG_VERSION");
    let mirror = dir.join("mirror");
    let pkg = mirror.join(format!("{SOURCE}/{version}/linux_amd64"));
    std::fs::create_dir_all(&pkg).unwrap();
    std::os::unix::fs::symlink(
        BIN,
        pkg.join(format!("terraform-provider-agentplane_v{version}")),
    )
    .unwrap();
    std::fs::write(
        dir.join("cli.tfrc"),
        format!(
            "provider_installation {{\n  filesystem_mirror {{\n    path    = \"{}\"\n    include = [\"{SOURCE}\"]\n  }}\n}}\n",
            mirror.display()
        ),
    )
    .unwrap();
}

/// The environment of one client run in workspace `dir`: the mirror's CLI config, no
/// checkpoint calls, the provider's log in `dir/client.log`, and `protocol` 5 or 6.
pub fn client_env(cmd: &mut Command, dir: &Path, protocol: u32) {
    cmd.current_dir(dir)
        .env("TF_CLI_CONFIG_FILE", dir.join("cli.tfrc"))
        .env("TF_IN_AUTOMATION", "1")
        .env("CHECKPOINT_DISABLE", "1")
        .env("TF_LOG_PROVIDER", "INFO")
        .env("TF_LOG_PATH", dir.join("client.log"))
        .env("HOME", dir);
    if protocol == 5 {
        cmd.env("AGENTPLANE_PLUGIN_PROTOCOL", "5");
    }
}

/// The `terraform` block every test configuration starts with: the provider from the mirror.
pub fn required_providers() -> String {
    format!(
        r#"terraform {{
  required_providers {{
    agentplane = {{ source = "{SOURCE}" }}
  }}
}}
"#
    )
}

pub struct Workspace {
    pub client: &'static str,
    pub protocol: u32,
    pub dir: tempfile::TempDir,
    pub stack: &'static Stack,
    /// Unique per test tag, client, protocol and test process: every AWS name (and Kubernetes
    /// namespace) a test creates starts with it.
    pub prefix: String,
}

impl Workspace {
    /// A workspace for `client` (`tofu` or `terraform`) speaking plugin `protocol` (5 or 6);
    /// `tag` tells apart workspaces of different tests in one process. The prefix is a valid
    /// Kubernetes namespace name as long as `tag` is lowercase.
    pub fn new(client: &'static str, protocol: u32, tag: &str) -> Workspace {
        let stack = Stack::shared().unwrap_or_else(|e| panic!("real-peer stack unavailable: {e}"));
        agentplane_testsupport::peer_path(client).unwrap_or_else(|e| panic!("{client}: {e}"));
        let dir = tempfile::Builder::new()
            .prefix(&format!("agentplane-{tag}-{client}-{protocol}."))
            .tempdir()
            .unwrap();
        install_provider(dir.path());
        let prefix = format!("{tag}-{client}-p{protocol}-{}", std::process::id());
        Workspace {
            client,
            protocol,
            dir,
            stack,
            prefix,
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// The `terraform` block and the provider block with every AWS service pointed at moto;
    /// `settings` (whole lines, e.g. timeouts or a `kubernetes` block) are spliced into the
    /// provider block.
    pub fn provider_config(&self, settings: &str) -> String {
        let ep = self.stack.aws_endpoint();
        format!(
            r#"{terraform}
provider "agentplane" {{
  region     = "{TEST_REGION}"
  access_key = "{TEST_ACCESS_KEY_ID}"
  secret_key = "{TEST_SECRET_ACCESS_KEY}"
  endpoints {{
    sqs = "{ep}"
    kms = "{ep}"
    eks = "{ep}"
  }}
{settings}}}
"#,
            terraform = required_providers(),
        )
    }

    /// Writes main.tf: the provider block of [`Self::provider_config`] with `settings`, then `body`.
    pub fn write_config_with(&self, settings: &str, body: &str) {
        let tf = format!("{}\n{body}", self.provider_config(settings));
        std::fs::write(self.dir.path().join("main.tf"), tf).unwrap();
    }

    /// Writes main.tf: the provider with every AWS service pointed at moto, followed by `body`.
    pub fn write_config(&self, body: &str) {
        self.write_config_with("", body);
    }

    pub fn run(&self, args: &[&str]) -> Output {
        let mut cmd = self.stack.command(self.client).unwrap();
        client_env(&mut cmd, self.dir.path(), self.protocol);
        cmd.args(args)
            .output()
            .unwrap_or_else(|e| panic!("running {} {args:?}: {e}", self.client))
    }

    /// Runs a command that must succeed; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{} {args:?} failed ({}):\n{stdout}\n{}",
            self.client,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// Runs a command that must fail; returns stdout and stderr together.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !out.status.success(),
            "{} {args:?} succeeded but should have failed:\n{text}",
            self.client
        );
        text
    }

    pub fn init(&self) {
        self.ok(&["init", "-no-color", "-input=false"]);
    }

    /// `plan -detailed-exitcode` with `extra` flags: 0 = no changes, 2 = changes.
    pub fn plan_with(&self, extra: &[&str]) -> (i32, String) {
        let mut args = vec!["plan", "-no-color", "-input=false", "-detailed-exitcode"];
        args.extend_from_slice(extra);
        let out = self.run(&args);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let code = out.status.code().unwrap_or(-1);
        assert!(
            code == 0 || code == 2,
            "plan failed ({code}):\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (code, stdout)
    }

    /// `plan -detailed-exitcode`: 0 = no changes, 2 = changes. Returns (code, stdout).
    pub fn plan(&self) -> (i32, String) {
        self.plan_with(&[])
    }

    pub fn assert_empty_plan(&self, after: &str) {
        let (code, out) = self.plan();
        assert_eq!(code, 0, "plan after {after} is not empty:\n{out}");
        assert!(out.contains("No changes"), "{out}");
    }

    pub fn apply(&self) -> String {
        self.ok(&["apply", "-no-color", "-input=false", "-auto-approve"])
    }

    pub fn destroy(&self) -> String {
        self.ok(&["destroy", "-no-color", "-input=false", "-auto-approve"])
    }

    pub fn output(&self, name: &str) -> String {
        self.ok(&["output", "-raw", name])
    }

    /// An SQS client for moto, for changes made out of band.
    pub async fn sqs(&self) -> aws_sdk_sqs::Client {
        aws_sdk_sqs::Client::new(&self.stack.aws_sdk_config().await)
    }

    /// Asserts moto holds no queue whose name starts with this workspace's prefix.
    pub async fn assert_no_queues_left(&self) {
        let left = self
            .sqs()
            .await
            .list_queues()
            .queue_name_prefix(&self.prefix)
            .send()
            .await
            .unwrap();
        assert!(
            left.queue_urls().is_empty(),
            "queues left after destroy: {:?}",
            left.queue_urls()
        );
    }
}
