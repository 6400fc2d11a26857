//! A peer site's client certificate chain: `[leaf, site certificate]`, the
//! leaf signed by the site key, exactly what the site's gateways present as
//! servers (docs/protocol.md sections 7 and 14). The peer gateway asks every
//! connecting site for one: on a ticket connection any site key is accepted
//! in the handshake and compared afterwards with the key the introduction
//! names; on a session only the keys learned for the claimed user are.

use std::sync::Arc;

use rustls::{
    DigitallySignedStruct, DistinguishedName, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    crypto::{WebPkiSupportedAlgorithms, verify_tls13_signature},
    pki_types::{CertificateDer, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::PinnedSiteKey;

/// The site key (SPKI DER) a peer's chain is certified by, once checked:
/// the second certificate's key signed the leaf, and the leaf is valid now.
pub fn site_key_of_chain(chain: &[CertificateDer<'_>], now: UnixTime) -> Result<Vec<u8>, String> {
    let [leaf, site, ..] = chain else {
        return Err("a peer site presents [leaf, site certificate]".into());
    };
    let (rest, site) = X509Certificate::from_der(site).map_err(|e| format!("bad site certificate: {e}"))?;
    if !rest.is_empty() {
        return Err("trailing bytes after the site certificate".into());
    }
    let key = site.public_key().raw.to_vec();
    PinnedSiteKey::new(&key)
        .map_err(|e| e.to_string())?
        .check_leaf(leaf, now)?;
    Ok(key)
}

/// Requires a client chain certified by a site key: any site key
/// (`expecting(None)`, ticket connections) or one of the given ones
/// (sessions: the keys learned for the user the initiator acts for).
#[derive(Debug)]
pub struct SiteChainVerifier {
    expected: Option<Vec<Vec<u8>>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SiteChainVerifier {
    pub fn expecting(keys: Option<Vec<Vec<u8>>>) -> Arc<Self> {
        Arc::new(Self {
            expected: keys,
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        })
    }
}

impl ClientCertVerifier for SiteChainVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let mut chain = vec![end_entity.clone()];
        chain.extend(intermediates.iter().cloned());
        let key = site_key_of_chain(&chain, now).map_err(rustls::Error::General)?;
        match &self.expected {
            Some(keys) if !keys.contains(&key) => Err(rustls::Error::General(
                "the peer's site key is not the one learned for this user".into(),
            )),
            _ => Ok(ClientCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.3 only".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ECDSA_NISTP256_SHA256]
    }
}
