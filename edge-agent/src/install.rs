//! `install` / `uninstall`: a hardened systemd service in one command.
//!
//! Everything is written under a configurable root (`/` on a device, a temp dir in tests): the unit file,
//! an environment file with the agent's settings (never the join token), the binary, and the data
//! directory with the key. A manifest records what was created so `uninstall` removes exactly that; the
//! data directory (key and outbox: intents not yet delivered) is kept unless `--purge` is given.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::config::Paths;
use crate::enroll::{self, EnrollError, EnrollOptions};
use crate::identity::{FileKeySource, IdentityError, KeySource as _, create_private_dir};
use crate::outbox::{Outbox, OutboxConfig, OutboxError};

pub const UNIT_NAME: &str = "agentplane-edge.service";
const UNIT_PATH: &str = "etc/systemd/system/agentplane-edge.service";
const ENV_PATH: &str = "etc/agentplane-edge/edge.env";
const MANIFEST_PATH: &str = "etc/agentplane-edge/installed.json";
const DATA_DIR: &str = "var/lib/agentplane-edge";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot remove {path}: {source}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error(transparent)]
    Enroll(#[from] EnrollError),
    #[error("`{command}` failed: {detail}")]
    Systemctl { command: String, detail: String },
    #[error("{0}")]
    Invalid(String),
}

#[derive(Clone, Debug)]
pub struct InstallOptions {
    /// Filesystem root everything is written under.
    pub root: PathBuf,
    /// Where the binary lives on the target system (the unit's ExecStart).
    pub bin_path: PathBuf,
    /// The binary to copy there; `None` leaves it (e.g. a .deb already put it in place).
    pub bin_source: Option<PathBuf>,
    pub gateway: Option<String>,
    pub token: Option<String>,
    pub device_id: Option<String>,
    pub owner: Option<String>,
    pub listen: String,
    /// Run under this existing account instead of a systemd DynamicUser.
    pub user: Option<String>,
    /// Call systemctl (daemon-reload, enable --now). Off when the root is not `/`.
    pub systemctl: bool,
}

#[derive(Serialize, Deserialize, Default, Debug)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    files: Vec<PathBuf>,
}

/// The unit file. Hardened: no new privileges, read-only system, private /tmp and devices, no
/// capabilities, only inet and unix sockets, a syscall filter, and writes only to its state directory.
pub fn unit_file(bin_path: &Path, user: Option<&str>) -> String {
    let identity = match user {
        Some(u) => format!("User={u}\nGroup={u}\n"),
        None => "DynamicUser=yes\n".to_owned(),
    };
    format!(
        "[Unit]
Description=agentplane edge agent (local UI, signed intents, durable outbox)
Documentation=https://github.com/agentplane/agentplane/blob/main/docs/edge-agent.md
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
ExecStart={bin} run
EnvironmentFile=-/etc/agentplane-edge/edge.env
Environment=AGENTPLANE_EDGE_DATA_DIR=/var/lib/agentplane-edge
Environment=AGENTPLANE_EDGE_LOG_FORMAT=json
{identity}StateDirectory=agentplane-edge
StateDirectoryMode=0700
UMask=0077
Restart=on-failure
RestartSec=5
# 78: the outbox is damaged. Restarting cannot fix it; the operator decides (see --reset-outbox).
RestartPreventExitStatus=78
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
CapabilityBoundingSet=
AmbientCapabilities=
MemoryMax=128M

[Install]
WantedBy=multi-user.target
",
        bin = bin_path.display(),
    )
}

fn env_file(opts: &InstallOptions) -> String {
    let mut s = String::from(
        "# agentplane-edge settings (see `agentplane-edge run --help`). No secrets here.\n",
    );
    s.push_str(&format!("AGENTPLANE_EDGE_LISTEN={}\n", opts.listen));
    if let Some(g) = &opts.gateway {
        s.push_str(&format!("AGENTPLANE_GATEWAY={g}\n"));
    }
    s
}

fn under(root: &Path, rel: impl AsRef<Path>) -> PathBuf {
    let rel = rel.as_ref();
    root.join(rel.strip_prefix("/").unwrap_or(rel))
}

fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    use std::os::unix::fs::PermissionsExt as _;
    let err = |source| InstallError::Write {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).map_err(err)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

fn systemctl(args: &[&str]) -> Result<(), InstallError> {
    let command = format!("systemctl {}", args.join(" "));
    let out =
        Command::new("systemctl")
            .args(args)
            .output()
            .map_err(|e| InstallError::Systemctl {
                command: command.clone(),
                detail: e.to_string(),
            })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(InstallError::Systemctl {
            command,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Installs (or re-installs: every step is idempotent) the service. Returns what it wrote.
pub async fn install(opts: &InstallOptions) -> Result<Vec<PathBuf>, InstallError> {
    if !opts.bin_path.is_absolute() {
        return Err(InstallError::Invalid(format!(
            "--bin-path must be absolute, got {}",
            opts.bin_path.display()
        )));
    }
    if opts.token.is_some() != opts.gateway.is_some() {
        return Err(InstallError::Invalid(
            "--gateway and --token go together (or leave both out and enroll later)".into(),
        ));
    }
    let mut written = Vec::new();
    if let Some(src) = &opts.bin_source {
        let dst = under(&opts.root, &opts.bin_path);
        let same = std::fs::canonicalize(src).ok() == std::fs::canonicalize(&dst).ok();
        if !same {
            let bytes = std::fs::read(src).map_err(|source| InstallError::Write {
                path: src.clone(),
                source,
            })?;
            write(&dst, &bytes, 0o755)?;
            written.push(opts.bin_path.clone());
        }
    }
    write(
        &under(&opts.root, UNIT_PATH),
        unit_file(&opts.bin_path, opts.user.as_deref()).as_bytes(),
        0o644,
    )?;
    written.push(PathBuf::from("/").join(UNIT_PATH));
    write(
        &under(&opts.root, ENV_PATH),
        env_file(opts).as_bytes(),
        0o644,
    )?;
    written.push(PathBuf::from("/").join(ENV_PATH));

    // The key is created now so the device can be enrolled before the service first starts.
    let data = under(&opts.root, DATA_DIR);
    create_private_dir(&data).map_err(|source| InstallError::Write {
        path: data.clone(),
        source,
    })?;
    let paths = Paths::new(&data, None);
    let keys = FileKeySource::new(&paths.key_file);
    keys.load_or_create()?;
    if let (Some(gateway), Some(token)) = (&opts.gateway, &opts.token) {
        let outbox = Outbox::open(OutboxConfig::new(&paths.outbox))?;
        enroll::enroll(
            &paths,
            &keys,
            &outbox,
            EnrollOptions {
                gateway: Some(gateway.clone()),
                token: token.clone(),
                device_id: opts.device_id.clone(),
                owner: opts.owner.clone(),
            },
        )
        .await?;
    }
    // Keep files already recorded by an earlier install (e.g. the binary copied then).
    let manifest_path = under(&opts.root, MANIFEST_PATH);
    let mut manifest: Manifest = std::fs::read(&manifest_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    for f in &written {
        if !manifest.files.contains(f) {
            manifest.files.push(f.clone());
        }
    }
    write(
        &manifest_path,
        &serde_json::to_vec_pretty(&manifest).unwrap_or_default(),
        0o644,
    )?;
    if opts.systemctl {
        systemctl(&["daemon-reload"])?;
        systemctl(&["enable", "--now", UNIT_NAME])?;
    }
    Ok(written)
}

/// Reverses `install`. The data directory (key, undelivered intents) is removed only with `purge`.
pub fn uninstall(
    root: &Path,
    purge: bool,
    use_systemctl: bool,
) -> Result<Vec<PathBuf>, InstallError> {
    if use_systemctl {
        // Stopping a service that is not there is not an error worth failing an uninstall for.
        if let Err(e) = systemctl(&["disable", "--now", UNIT_NAME]) {
            tracing::warn!(error = %e, "could not stop the service");
        }
    }
    let manifest_path = under(root, MANIFEST_PATH);
    let manifest: Manifest = std::fs::read(&manifest_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| Manifest {
            files: vec![
                PathBuf::from("/").join(UNIT_PATH),
                PathBuf::from("/").join(ENV_PATH),
            ],
        });
    let mut removed = Vec::new();
    let remove = |p: &Path| -> Result<bool, InstallError> {
        match std::fs::remove_file(p) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(InstallError::Remove {
                path: p.to_owned(),
                source,
            }),
        }
    };
    for f in manifest
        .files
        .iter()
        .chain(std::iter::once(&PathBuf::from("/").join(MANIFEST_PATH)))
    {
        if remove(&under(root, f))? {
            removed.push(f.clone());
        }
    }
    let _ = std::fs::remove_dir(under(root, "etc/agentplane-edge"));
    if purge {
        let data = under(root, DATA_DIR);
        match std::fs::remove_dir_all(&data) {
            Ok(()) => removed.push(PathBuf::from("/").join(DATA_DIR)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(InstallError::Remove { path: data, source }),
        }
    }
    if use_systemctl {
        systemctl(&["daemon-reload"])?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(root: &Path) -> InstallOptions {
        InstallOptions {
            root: root.to_owned(),
            bin_path: "/usr/local/bin/agentplane-edge".into(),
            bin_source: Some(std::env::current_exe().unwrap()),
            gateway: None,
            token: None,
            device_id: None,
            owner: None,
            listen: "127.0.0.1:7420".into(),
            user: None,
            systemctl: false,
        }
    }

    #[tokio::test]
    async fn install_then_uninstall_in_a_temp_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let written = install(&opts(root)).await.unwrap();
        assert_eq!(written.len(), 3);
        let unit = std::fs::read_to_string(root.join(UNIT_PATH)).unwrap();
        for must in [
            "DynamicUser=yes",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "RestartPreventExitStatus=78",
            "ExecStart=/usr/local/bin/agentplane-edge run",
        ] {
            assert!(unit.contains(must), "unit lacks {must}");
        }
        assert!(root.join("usr/local/bin/agentplane-edge").exists());
        assert!(root.join(DATA_DIR).join("device.key").exists());
        // Installing again is harmless and keeps the key.
        let key = std::fs::read(root.join(DATA_DIR).join("device.key")).unwrap();
        install(&opts(root)).await.unwrap();
        assert_eq!(
            std::fs::read(root.join(DATA_DIR).join("device.key")).unwrap(),
            key
        );

        let removed = uninstall(root, false, false).unwrap();
        assert!(removed.len() >= 3, "{removed:?}");
        assert!(!root.join(UNIT_PATH).exists());
        assert!(!root.join("usr/local/bin/agentplane-edge").exists());
        assert!(
            root.join(DATA_DIR).join("device.key").exists(),
            "data kept without --purge"
        );
        uninstall(root, true, false).unwrap();
        assert!(!root.join(DATA_DIR).exists());
    }

    #[tokio::test]
    async fn token_without_gateway_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(dir.path());
        o.token = Some("t".into());
        assert!(matches!(install(&o).await, Err(InstallError::Invalid(_))));
    }

    #[test]
    fn unit_passes_systemd_analyze_verify() {
        // systemd's own checker is the real peer for a unit file; without it this test cannot judge.
        let out = Command::new("systemd-analyze")
            .arg("--version")
            .output()
            .expect("systemd-analyze is needed to verify the unit (Debian package `systemd`)");
        assert!(
            out.status.success(),
            "systemd-analyze --version failed: {out:?}"
        );
        let dir = tempfile::tempdir().unwrap();
        // verify checks that ExecStart exists, so point it at a binary that does.
        let unit = dir.path().join(UNIT_NAME);
        std::fs::write(&unit, unit_file(&std::env::current_exe().unwrap(), None)).unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&unit)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert!(
            !stderr.contains(UNIT_NAME),
            "systemd-analyze complains about the unit: {stderr}"
        );
    }

    #[test]
    fn dedicated_user_variant() {
        let unit = unit_file(Path::new("/usr/bin/agentplane-edge"), Some("agentplane"));
        assert!(unit.contains("User=agentplane") && !unit.contains("DynamicUser"));
    }
}
