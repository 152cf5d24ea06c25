//! Shared by the tests that drive the provider through the real clients (OpenTofu and
//! Terraform 1.5.7): the provider installed into a workspace the way users install it, and the
//! environment every client run gets.

use std::path::Path;
use std::process::Command;

/// The provider binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_terraform-provider-agentplane");

/// The source address the test configurations require.
pub const SOURCE: &str = "registry.terraform.io/agentplane/agentplane";

/// Installs the built provider into `dir` as an unpacked filesystem mirror (the binary,
/// symlinked) and writes `dir/cli.tfrc` pointing the client at it. dev_overrides would skip
/// `init`, which Terraform 1.5.7 refuses to run under overrides ("Skip terraform init when
/// using provider development overrides").
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
