//! How tools find a running dev site: its data directory, the
//! `endpoints.json` it writes there, and the certificate files of each
//! internal identity under `pki/`. `chipsctl` and the benchmarks read these
//! without depending on the site itself.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Certificate, key and internal CA files of one identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl CertPaths {
    /// An identity's files in a dev data directory (`pki/<identity>.pem`,
    /// `.key`, and `pki/ca.pem`).
    pub fn in_data_dir(data_dir: &Path, identity: &str) -> Self {
        let dir = data_dir.join("pki");
        Self {
            cert: dir.join(format!("{identity}.pem")),
            key: dir.join(format!("{identity}.key")),
            ca: dir.join("ca.pem"),
        }
    }
}

/// Where a running dev site listens and how to reach it; written to
/// `<data_dir>/endpoints.json` for `chipsctl` and scripts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Endpoints {
    pub admin: String,
    pub key_vault: String,
    pub ticket: String,
    /// The user gateway's external port (apps connect here).
    pub user_gateway: String,
    /// The peer gateway's internal gRPC port.
    #[serde(default)]
    pub peer_gateway: String,
    /// The peer gateway's external port (peer sites connect here).
    #[serde(default)]
    pub peer: String,
    /// The tally service's internal gRPC port.
    #[serde(default)]
    pub tally: String,
    /// The admin web console (`http://…`).
    pub console: String,
    /// The console's HTTPS port for the admin client certificate
    /// (`https://…`; empty when none).
    #[serde(default)]
    pub console_https: String,
    /// The ops port (`http://…`: `/livez`, `/readyz`, `/metrics`; empty when none).
    #[serde(default)]
    pub ops: String,
    pub ca: PathBuf,
    pub admin_client_cert: PathBuf,
    pub admin_client_key: PathBuf,
    pub data_dir: PathBuf,
    pub pid: u32,
}

/// No dev site found where one was looked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoSite(pub String);

impl std::fmt::Display for NoSite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "no dev site found: {}", self.0)
    }
}

impl std::error::Error for NoSite {}

impl Endpoints {
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join("endpoints.json")
    }

    pub fn read(data_dir: &Path) -> Result<Self, NoSite> {
        let path = Self::path(data_dir);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            NoSite(format!(
                "{}: {e} (start one with `chipsite dev`, or pass --data-dir)",
                path.display()
            ))
        })?;
        serde_json::from_str(&text).map_err(|e| NoSite(format!("{}: {e}", path.display())))
    }

    /// Certificate files of an identity in this site's data directory.
    pub fn cert_paths(&self, identity: &str) -> CertPaths {
        CertPaths::in_data_dir(&self.data_dir, identity)
    }
}

/// `$CHIPSITE_DATA_DIR`, else `$XDG_DATA_HOME/chipsite/dev`, else
/// `~/.local/share/chipsite/dev`, else `./.chipsite`.
pub fn default_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CHIPSITE_DATA_DIR") {
        return d.into();
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(x).join("chipsite/dev");
    }
    if let Some(h) = std::env::var_os("HOME") {
        return PathBuf::from(h).join(".local/share/chipsite/dev");
    }
    PathBuf::from(".chipsite")
}
