//! What `chipsite dev` keeps in its data directory: the internal CA and a
//! certificate per identity (`pki/`), and a generated site key pass phrase.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use base64::Engine;
use chipsite_tls::{CertPaths, identity};

use crate::SiteError;

const DEV_CERT_VALIDITY: Duration = Duration::from_secs(5 * 365 * 24 * 3600);

pub fn pki_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("pki")
}

/// The certificate files of an internal identity in a dev data directory.
pub fn cert_paths(data_dir: &Path, id: &str) -> CertPaths {
    CertPaths::in_data_dir(data_dir, id)
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SiteError + '_ {
    move |e| SiteError::Io(format!("{}: {e}", path.display()))
}

/// Write a file readable only by its owner, atomically (see [`chipsite_tls::write_private`]).
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), SiteError> {
    chipsite_tls::write_private(path, contents).map_err(|e| SiteError::Io(format!("{}: {e}", path.display())))
}

/// Read one of the dev site's own private files: refused if it is a
/// symlink or anyone but its owner may read or change it.
fn read_own(path: &Path) -> Result<String, SiteError> {
    let bytes = chipsite_model::files::read_private(path, chipsite_model::files::Strictness::Own)
        .map_err(io_err(path))?;
    String::from_utf8(bytes).map_err(|_| SiteError::Io(format!("{}: not UTF-8", path.display())))
}

/// Create the dev CA and every identity's certificate unless present.
pub fn ensure_pki(data_dir: &Path, site_name: &str) -> Result<(), SiteError> {
    crate::pki::ensure(
        &crate::pki::Layout::dev(data_dir),
        site_name,
        identity::ALL,
        DEV_CERT_VALIDITY,
        false,
    )?;
    Ok(())
}

/// The dev site's generated pass phrase file.
pub fn passphrase_path(data_dir: &Path) -> PathBuf {
    data_dir.join("site-key.passphrase")
}

/// Read the dev pass phrase, generating it on first launch. Only dev mode
/// does this; it says so loudly at every start.
pub fn ensure_passphrase(data_dir: &Path) -> Result<String, SiteError> {
    let path = passphrase_path(data_dir);
    if std::fs::symlink_metadata(&path).is_ok() {
        return Ok(read_own(&path)?.trim().to_owned());
    }
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).map_err(|e| SiteError::Io(format!("random: {e}")))?;
    let p = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    write_private(&path, p.as_bytes())?;
    Ok(p)
}
