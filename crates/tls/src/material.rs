//! TLS material (certificate chain, key, internal CA) and rustls
//! configurations that can be swapped while the process runs.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tokio::task::JoinHandle;

use crate::TlsError;

/// A certificate chain, its key, and the CA certificates to trust.
pub struct TlsMaterial {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Vec<CertificateDer<'static>>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl TlsMaterial {
    pub fn from_pem(cert_pem: &str, key_pem: &str, ca_pem: &str) -> Result<Self, TlsError> {
        let chain = certs_from_pem(cert_pem, "certificate")?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|_| TlsError::NoPrivateKey("private key".into()))?;
        let roots = certs_from_pem(ca_pem, "CA certificate")?;
        Ok(Self { chain, key, roots })
    }

    pub fn from_files(paths: &CertPaths) -> Result<Self, TlsError> {
        Self::from_pem(&read(&paths.cert)?, &read(&paths.key)?, &read(&paths.ca)?)
    }

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn root_store(&self) -> Result<RootCertStore, TlsError> {
        let mut roots = RootCertStore::empty();
        for ca in &self.roots {
            roots.add(ca.clone())?;
        }
        Ok(roots)
    }

    /// A TLS 1.3 server that requires a client certificate from the internal CA.
    pub fn server_config(&self) -> Result<ServerConfig, TlsError> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(self.root_store()?), Self::provider())
                .build()?;
        let mut config = ServerConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }

    /// What an in-process call checks in place of a handshake (see
    /// [`crate::local`]): this side's chain and identity, and verifiers for
    /// the other side's chain built from this side's trust roots.
    pub(crate) fn credentials(&self) -> Result<crate::local::Credentials, TlsError> {
        let roots = Arc::new(self.root_store()?);
        Ok(crate::local::Credentials {
            identity: self.chain.first().and_then(|leaf| crate::identity_of(leaf)),
            chain: self.chain.clone(),
            clients: WebPkiClientVerifier::builder_with_provider(roots.clone(), Self::provider()).build()?,
            servers: rustls::client::WebPkiServerVerifier::builder_with_provider(roots, Self::provider())
                .build()
                .map_err(|e| TlsError::Pem(format!("server verifier: {e}")))?,
        })
    }

    /// A TLS 1.3 client that trusts only the internal CA and presents this certificate.
    pub fn client_config(&self) -> Result<ClientConfig, TlsError> {
        let mut config = ClientConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.root_store()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

fn certs_from_pem(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(format!("{what}: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(what.to_owned()));
    }
    Ok(certs)
}

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Where a service's certificate, key and CA bundle live.
pub use chipsite_model::endpoints::CertPaths;

/// When each of the three files last changed.
fn modified(paths: &CertPaths) -> Option<[SystemTime; 3]> {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some([m(&paths.cert)?, m(&paths.key)?, m(&paths.ca)?])
}

/// Server and client configurations that are swapped atomically when the
/// files behind them change; connections made after a reload use the new
/// material, open ones keep theirs.
pub struct ReloadableTls {
    server: ArcSwap<ServerConfig>,
    client: ArcSwap<ClientConfig>,
    credentials: ArcSwap<crate::local::Credentials>,
    paths: Option<CertPaths>,
    stamp: std::sync::Mutex<Option<[SystemTime; 3]>>,
}

impl std::fmt::Debug for ReloadableTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadableTls")
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
}

impl ReloadableTls {
    pub fn from_material(material: &TlsMaterial) -> Result<Arc<Self>, TlsError> {
        Ok(Arc::new(Self {
            server: ArcSwap::from_pointee(material.server_config()?),
            client: ArcSwap::from_pointee(material.client_config()?),
            credentials: ArcSwap::from_pointee(material.credentials()?),
            paths: None,
            stamp: std::sync::Mutex::new(None),
        }))
    }

    pub fn from_files(paths: CertPaths) -> Result<Arc<Self>, TlsError> {
        let stamp = modified(&paths);
        let material = TlsMaterial::from_files(&paths)?;
        Ok(Arc::new(Self {
            server: ArcSwap::from_pointee(material.server_config()?),
            client: ArcSwap::from_pointee(material.client_config()?),
            credentials: ArcSwap::from_pointee(material.credentials()?),
            paths: Some(paths),
            stamp: std::sync::Mutex::new(stamp),
        }))
    }

    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.load_full()
    }

    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.client.load_full()
    }

    /// This side's current credentials for in-process calls.
    pub(crate) fn credentials(&self) -> Arc<crate::local::Credentials> {
        self.credentials.load_full()
    }

    /// The identity of this side's current certificate.
    pub fn identity(&self) -> Option<String> {
        self.credentials.load().identity.clone()
    }

    /// Swap in new material.
    pub fn replace(&self, material: &TlsMaterial) -> Result<(), TlsError> {
        let server = material.server_config()?;
        let client = material.client_config()?;
        let credentials = material.credentials()?;
        self.server.store(Arc::new(server));
        self.client.store(Arc::new(client));
        self.credentials.store(Arc::new(credentials));
        Ok(())
    }

    /// Reload from the files if any of them changed. A file set that does not
    /// load (for example half-replaced) keeps the old material and is retried.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let Some(paths) = &self.paths else {
            return Ok(false);
        };
        let now = modified(paths);
        let mut stamp = self.stamp.lock().unwrap_or_else(|e| e.into_inner());
        if now.is_none() || now == *stamp {
            return Ok(false);
        }
        self.replace(&TlsMaterial::from_files(paths)?)?;
        *stamp = now;
        Ok(true)
    }

    /// Poll the files every `interval` and reload on change.
    pub fn spawn_watcher(self: &Arc<Self>, interval: Duration) -> Option<JoinHandle<()>> {
        self.paths.as_ref()?;
        let this = Arc::downgrade(self);
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            loop {
                tick.tick().await;
                let Some(tls) = this.upgrade() else { return };
                match tls.reload_if_changed() {
                    Ok(true) => tracing::info!(paths = ?tls.paths, "reloaded TLS certificates"),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "TLS certificate files changed but do not load; keeping the old ones")
                    }
                }
            }
        }))
    }
}
