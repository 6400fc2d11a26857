//! What `chipsite dev` keeps in its data directory: the internal CA and a
//! certificate per identity (`pki/`), and a generated site key pass phrase.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use base64::Engine;
use chipsite_tls::{CertPaths, CertificateAuthority, identity};

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
    let dir = pki_dir(data_dir);
    chipsite_model::files::private_dir(&dir).map_err(io_err(&dir))?;
    let (ca_cert, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let (ca, fresh) = if ca_cert.exists() && ca_key.exists() {
        let cert = std::fs::read_to_string(&ca_cert).map_err(io_err(&ca_cert))?;
        let key = read_own(&ca_key)?;
        (CertificateAuthority::from_pem(&cert, &key)?, false)
    } else {
        let ca = CertificateAuthority::generate(site_name)?;
        write_private(&ca_key, ca.key_pem().as_bytes())?;
        std::fs::write(&ca_cert, ca.cert_pem()).map_err(io_err(&ca_cert))?;
        (ca, true)
    };
    for id in identity::ALL {
        let paths = cert_paths(data_dir, id);
        if fresh || !paths.cert.exists() || !paths.key.exists() {
            let issued = ca.issue(id, &[], DEV_CERT_VALIDITY)?;
            write_private(&paths.key, issued.key_pem.as_bytes())?;
            std::fs::write(&paths.cert, &issued.cert_pem).map_err(io_err(&paths.cert))?;
        }
    }
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
