//! The site's internal PKI on disk: the CA and one certificate per
//! internal identity. `chipsite dev` keeps it in `<data dir>/pki/`;
//! `chipsite pki init DIR` makes the same set for containers (compose
//! secrets, a Kubernetes Secret), with the CA key in a subfolder so that
//! `kubectl create secret generic … --from-file=DIR` leaves it out.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use chipsite_tls::{CertificateAuthority, identity};

use crate::SiteError;

/// Where the CA and the identities' files go.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The CA certificate (`ca.pem`), which every service trusts.
    pub ca_cert: PathBuf,
    /// The CA private key, needed only to issue.
    pub ca_key: PathBuf,
    /// `<identity>.pem` and `<identity>.key` are written here.
    pub dir: PathBuf,
}

impl Layout {
    /// `chipsite dev`'s layout: everything in `<data dir>/pki/`.
    pub fn dev(data_dir: &Path) -> Self {
        let dir = data_dir.join("pki");
        Self {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            dir,
        }
    }

    /// `chipsite pki init DIR`'s layout: the CA key in `DIR/ca/`, out of
    /// what a `--from-file=DIR` Secret takes (it skips subfolders).
    pub fn deploy(dir: &Path) -> Self {
        Self {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca").join("ca.key"),
            dir: dir.to_owned(),
        }
    }

    pub fn cert(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.pem"))
    }

    pub fn key(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.key"))
    }
}

/// The identities a deployed site needs: every service, the console and the
/// operators' `admin-client`; not the benchmark's.
pub fn deploy_identities() -> Vec<&'static str> {
    identity::ALL
        .iter()
        .copied()
        .filter(|id| *id != identity::BENCH)
        .collect()
}

/// What [`ensure`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Made {
    pub created_ca: bool,
    /// Identities whose certificate was (re)issued.
    pub issued: Vec<String>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SiteError + '_ {
    move |e| SiteError::Io(format!("{}: {e}", path.display()))
}

/// Make the CA unless present, and a certificate for each identity that has
/// none (every identity when `renew`, from the same CA: the services pick
/// the new files up without a restart). Keys are written owner-only (0600),
/// atomically; folders 0700.
pub fn ensure(
    layout: &Layout,
    site_name: &str,
    identities: &[&str],
    validity: Duration,
    renew: bool,
) -> Result<Made, SiteError> {
    chipsite_model::files::private_dir(&layout.dir).map_err(io_err(&layout.dir))?;
    if let Some(parent) = layout.ca_key.parent() {
        chipsite_model::files::private_dir(parent).map_err(io_err(parent))?;
    }
    let mut made = Made::default();
    let ca = match (layout.ca_cert.exists(), layout.ca_key.exists()) {
        (true, true) => {
            let cert = std::fs::read_to_string(&layout.ca_cert).map_err(io_err(&layout.ca_cert))?;
            let key =
                chipsite_model::files::read_private(&layout.ca_key, chipsite_model::files::Strictness::Own)
                    .map_err(io_err(&layout.ca_key))?;
            let key = String::from_utf8(key)
                .map_err(|_| SiteError::Io(format!("{}: not UTF-8", layout.ca_key.display())))?;
            CertificateAuthority::from_pem(&cert, &key)?
        }
        (false, false) => {
            let ca = CertificateAuthority::generate(site_name)?;
            chipsite_tls::write_private(&layout.ca_key, ca.key_pem().as_bytes())
                .map_err(io_err(&layout.ca_key))?;
            std::fs::write(&layout.ca_cert, ca.cert_pem()).map_err(io_err(&layout.ca_cert))?;
            made.created_ca = true;
            ca
        }
        // Half a CA: making a new one would orphan every certificate the
        // other half signed. The operator decides.
        (has_cert, _) => {
            let (there, missing) = if has_cert {
                (&layout.ca_cert, &layout.ca_key)
            } else {
                (&layout.ca_key, &layout.ca_cert)
            };
            return Err(SiteError::Config(format!(
                "{} is there but {} is missing: restore it, or remove both to make a new CA",
                there.display(),
                missing.display()
            )));
        }
    };
    for id in identities {
        let (cert, key) = (layout.cert(id), layout.key(id));
        if made.created_ca || renew || !cert.exists() || !key.exists() {
            let issued = ca.issue(id, &[], validity)?;
            chipsite_tls::write_private(&key, issued.key_pem.as_bytes()).map_err(io_err(&key))?;
            std::fs::write(&cert, &issued.cert_pem).map_err(io_err(&cert))?;
            made.issued.push((*id).to_owned());
        }
    }
    Ok(made)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// `pki init` makes a CA and every deployed identity; a second run keeps
    /// them; `--renew` reissues from the same CA; the CA key sits where a
    /// `--from-file` Secret does not take it; half a CA is refused.
    #[test]
    fn pki_init_makes_keeps_and_renews() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::deploy(&tmp.path().join("pki"));
        let ids = deploy_identities();
        assert!(!ids.contains(&identity::BENCH));
        let day = Duration::from_secs(86_400);
        let first = ensure(&layout, "test", &ids, day, false).unwrap();
        assert!(first.created_ca);
        assert_eq!(first.issued.len(), ids.len());
        let ca = std::fs::read_to_string(&layout.ca_cert).unwrap();
        let admin = std::fs::read_to_string(layout.cert("admin")).unwrap();
        // The CA key is not a file of the folder itself.
        let top: Vec<String> = std::fs::read_dir(&layout.dir)
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_type().unwrap().is_file())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!top.iter().any(|n| n.contains("ca.key")), "{top:?}");
        assert!(top.contains(&"admin-client.key".to_owned()), "{top:?}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&layout.key("admin")), 0o600);
            assert_eq!(mode(&layout.ca_key), 0o600);
        }
        let again = ensure(&layout, "test", &ids, day, false).unwrap();
        assert_eq!(again, Made::default());
        assert_eq!(std::fs::read_to_string(layout.cert("admin")).unwrap(), admin);
        let renewed = ensure(&layout, "test", &ids, day, true).unwrap();
        assert!(!renewed.created_ca);
        assert_eq!(renewed.issued.len(), ids.len());
        assert_eq!(std::fs::read_to_string(&layout.ca_cert).unwrap(), ca);
        let new_admin = std::fs::read_to_string(layout.cert("admin")).unwrap();
        assert_ne!(new_admin, admin);
        // The renewed certificate still makes a working identity under the CA.
        chipsite_tls::TlsMaterial::from_files(&chipsite_tls::CertPaths {
            cert: layout.cert("admin"),
            key: layout.key("admin"),
            ca: layout.ca_cert.clone(),
        })
        .unwrap();
        std::fs::remove_file(&layout.ca_key).unwrap();
        let e = ensure(&layout, "test", &ids, day, false).unwrap_err().to_string();
        assert!(e.contains("is missing"), "{e}");
        assert_eq!(std::fs::read_to_string(&layout.ca_cert).unwrap(), ca);
    }
}
