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

/// ring's TLS 1.3 suites, the SHA-256 ones first. Every connection here is
/// short-lived and its handshake is most of its cost: the key schedule is a
/// few dozen HMACs, which run on the SHA extensions of current x86 and ARM
/// CPUs for SHA-256 but not for SHA-384 (the default first suite's hash was
/// 2% of the user gateway's CPU in `chipsite bench-enroll`).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::CipherSuite::{TLS13_AES_128_GCM_SHA256, TLS13_CHACHA20_POLY1305_SHA256};
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.sort_by_key(|s| match s.suite() {
        TLS13_AES_128_GCM_SHA256 => 0,
        TLS13_CHACHA20_POLY1305_SHA256 => 1,
        _ => 2,
    });
    Arc::new(provider)
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
    // The server's order of suites, not the client's: most TLS libraries
    // (OpenSSL, ring's defaults) offer AES-256-GCM-SHA384 first.
    config.ignore_client_order = true;
    Ok(config)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use rustls::{
        CipherSuite::{TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384},
        ClientConnection, ServerConnection,
        server::WebPkiClientVerifier,
    };

    use super::*;

    /// A site key and a server presenting a certificate it signed itself.
    fn server() -> (ServerConfig, Vec<u8>) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["site".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let config = server_config(
            vec![cert.der().to_vec()],
            key.serialize_der(),
            WebPkiClientVerifier::no_client_auth(),
        )
        .unwrap();
        (config, rcgen::PublicKeyData::subject_public_key_info(&key))
    }

    /// A client offering those of ring's suites `offer` ranks, in its order.
    fn client(site_key: &[u8], offer: impl Fn(rustls::CipherSuite) -> Option<u8>) -> ClientConfig {
        let mut provider = rustls::crypto::ring::default_provider();
        provider.cipher_suites.retain(|s| offer(s.suite()).is_some());
        provider.cipher_suites.sort_by_key(|s| offer(s.suite()));
        ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(PinnedSiteKey::new(site_key).unwrap())
            .with_no_client_auth()
    }

    /// The suite a handshake between the two settles on, in memory.
    fn negotiated(client: ClientConfig, server: ServerConfig) -> rustls::CipherSuite {
        let mut c = ClientConnection::new(Arc::new(client), "site".try_into().unwrap()).unwrap();
        let mut s = ServerConnection::new(Arc::new(server)).unwrap();
        for _ in 0..10 {
            let mut bytes = Vec::new();
            c.write_tls(&mut bytes).unwrap();
            s.read_tls(&mut bytes.as_slice()).unwrap();
            s.process_new_packets().unwrap();
            let mut bytes = Vec::new();
            s.write_tls(&mut bytes).unwrap();
            c.read_tls(&mut bytes.as_slice()).unwrap();
            c.process_new_packets().unwrap();
            if !c.is_handshaking() && !s.is_handshaking() {
                return s.negotiated_cipher_suite().unwrap().suite();
            }
        }
        panic!("the handshake did not finish");
    }

    #[test]
    fn the_server_picks_sha256_suites_first_and_takes_whatever_else_is_offered() {
        let (server, site_key) = server();
        // OpenSSL's order: AES-256-GCM-SHA384 first.
        let prefers_384 = client(&site_key, |s| match s {
            TLS13_AES_256_GCM_SHA384 => Some(0),
            _ => Some(1),
        });
        assert_eq!(negotiated(prefers_384, server.clone()), TLS13_AES_128_GCM_SHA256);
        // Our own client (the reference app, the peer gateway).
        let ours = client_config(&site_key, None).unwrap();
        assert_eq!(negotiated(ours, server.clone()), TLS13_AES_128_GCM_SHA256);
        // A client with nothing else still connects.
        let only_384 = client(&site_key, |s| (s == TLS13_AES_256_GCM_SHA384).then_some(0));
        assert_eq!(negotiated(only_384, server), TLS13_AES_256_GCM_SHA384);
    }
}
