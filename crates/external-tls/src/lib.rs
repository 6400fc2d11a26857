//! TLS with the outside world (apps, peer sites), where no CA is trusted:
//! a client trusts exactly the site key a ticket pinned ([`PinnedSiteKey`]),
//! and a server takes a self-signed certificate as a claim to a CHIP ID,
//! then checks the claimed key against the one it knows
//! ([`ClaimedIdentity`]). TLS 1.3 only, P-256 keys, no resumption. Shared by
//! the reference app, the user gateway and the peer gateway, both of whose
//! sides it serves (docs/protocol.md section 7).

mod claimed;
mod pinned;
mod site_chain;

use std::sync::Arc;

pub use claimed::{ClaimedIdentity, ClaimedIdentityVerifier};
pub use pinned::PinnedSiteKey;
use rustls::{
    ClientConfig, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    server::{NoServerSessionStorage, danger::ClientCertVerifier},
};
pub use site_chain::{SiteChainVerifier, site_key_of_chain};

#[derive(Debug, thiserror::Error)]
pub enum ExternalTlsError {
    #[error("the site key is not a P-256 public key")]
    NotP256,
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client configuration that trusts only the certificate chains signed by
/// `site_key_spki` (SPKI DER), presenting `identity` (certificate chain and
/// PKCS#8 key) when given.
pub fn client_config(
    site_key_spki: &[u8],
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<ClientConfig, ExternalTlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(PinnedSiteKey::new(site_key_spki)?);
    Ok(match identity {
        None => builder.with_no_client_auth(),
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
    })
}

/// A server configuration presenting `chain` (leaf first) with its PKCS#8
/// key, judging client certificates with `clients`; no session tickets or
/// resumption (every session proves its key afresh, and a refused
/// connection gets not a single byte after the handshake).
pub fn server_config(
    chain: Vec<Vec<u8>>,
    pkcs8_key: Vec<u8>,
    clients: Arc<dyn ClientCertVerifier>,
) -> Result<ServerConfig, ExternalTlsError> {
    let chain = chain.into_iter().map(CertificateDer::from).collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8_key));
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(clients)
        .with_single_cert(chain, key)?;
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(NoServerSessionStorage {});
    Ok(config)
}
