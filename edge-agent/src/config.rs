//! Where the agent keeps its files, and the small state file `enroll` writes (gateway, device id, owner).
//! Flags and environment variables override what the file says; the file remembers what `enroll` learned
//! so `run`, `submit` and `status` need no flags on a device.

use std::path::{Path, PathBuf};

use agentplane_api::device::SEQ_WINDOW;
use serde::{Deserialize, Serialize};

use crate::identity::write_private_file;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid agent state JSON ({source}); fix or delete it and enroll again")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "maxInFlight {0} is out of range: it must be 1 to {SEQ_WINDOW} (the gateway's replay window)"
    )]
    MaxInFlight(u64),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The agent's files under one data directory.
#[derive(Clone, Debug)]
pub struct Paths {
    pub data_dir: PathBuf,
    pub key_file: PathBuf,
    pub outbox: PathBuf,
    pub state_file: PathBuf,
}

impl Paths {
    pub fn new(data_dir: impl Into<PathBuf>, key_file: Option<PathBuf>) -> Self {
        let data_dir = data_dir.into();
        Paths {
            key_file: key_file.unwrap_or_else(|| data_dir.join("device.key")),
            outbox: data_dir.join("outbox.db"),
            state_file: data_dir.join("agent.json"),
            data_dir,
        }
    }
}

/// `/var/lib/agentplane-edge` for root (the systemd service), else the user's XDG data directory.
pub fn default_data_dir() -> PathBuf {
    use std::os::unix::fs::MetadataExt as _;
    let is_root = std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false);
    if is_root {
        return PathBuf::from("/var/lib/agentplane-edge");
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("agentplane-edge");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(h).join(".local/share/agentplane-edge");
    }
    PathBuf::from("agentplane-edge")
}

/// What enrollment established.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AgentState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Key ids the gateway has registered for this device, newest last.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub enrolled_keys: Vec<String>,
    /// Submissions in flight at once (`run --max-in-flight` and its environment variable override it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u64>,
    /// The namespace policy's rules for this device, as the gateway answered the last enrollment
    /// (absent: the defaults, regulated intents go to the cloud).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edge_policy: Option<agentplane_api::policy::EdgePolicy>,
}

impl AgentState {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| ConfigError::Parse {
                path: path.into(),
                source,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(AgentState::default()),
            Err(source) => Err(ConfigError::Read {
                path: path.into(),
                source,
            }),
        }
    }

    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        let mut bytes = serde_json::to_vec_pretty(self).unwrap_or_default();
        bytes.push(b'\n');
        write_private_file(path, &bytes).map_err(|source| ConfigError::Write {
            path: path.into(),
            source,
        })
    }

    /// `maxInFlight`, checked: 1 up to the gateway's replay window.
    pub fn max_in_flight(&self) -> Result<Option<usize>, ConfigError> {
        match self.max_in_flight {
            None => Ok(None),
            Some(n) if (1..=SEQ_WINDOW).contains(&n) => Ok(Some(n as usize)),
            Some(n) => Err(ConfigError::MaxInFlight(n)),
        }
    }

    pub fn is_enrolled_with(&self, key_id: &str) -> bool {
        self.enrolled_keys.iter().any(|k| k == key_id)
    }
}

/// A device id derived from the key when none was configured: stable, and a valid DNS-1123 label.
pub fn derived_device_id(key_id: &str) -> String {
    let tail: String = key_id
        .trim_start_matches("ed25519-")
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .take(12)
        .collect();
    format!("edge-{}", tail.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_missing_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.json");
        assert_eq!(AgentState::load(&p).unwrap(), AgentState::default());
        let s = AgentState {
            device_id: Some("kiosk-1".into()),
            gateway: Some("http://127.0.0.1:8787".into()),
            enrolled_keys: vec!["ed25519-00".into()],
            ..Default::default()
        };
        s.save(&p).unwrap();
        assert_eq!(AgentState::load(&p).unwrap(), s);
        std::fs::write(&p, b"{nope").unwrap();
        assert!(matches!(
            AgentState::load(&p),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn max_in_flight_from_the_file_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.json");
        std::fs::write(&p, br#"{"deviceId": "kiosk-1", "maxInFlight": 8}"#).unwrap();
        assert_eq!(
            AgentState::load(&p).unwrap().max_in_flight().unwrap(),
            Some(8)
        );
        for bad in [0, SEQ_WINDOW + 1] {
            std::fs::write(&p, format!(r#"{{"maxInFlight": {bad}}}"#)).unwrap();
            let err = AgentState::load(&p).unwrap().max_in_flight().unwrap_err();
            assert!(err.to_string().contains("1 to 64"), "{err}");
        }
        assert_eq!(AgentState::default().max_in_flight().unwrap(), None);
    }

    #[test]
    fn derived_ids_are_dns_labels() {
        let id = derived_device_id("ed25519-0a1b2c3d4e5f6071");
        assert_eq!(id, "edge-0a1b2c3d4e5f");
        agentplane_api::intent::check_dns_label("deviceId", &id).unwrap();
    }
}
