//! The check a client makes of the site before it sends anything: the
//! gateway's certificate must be signed by the site key the ticket pinned.
//!
//! The gateway presents `[gateway leaf, site certificate]`. The leaf is a
//! short-lived certificate for the gateway's own TLS key; the site key never
//! leaves key-vault. So the client verifies, in this order:
//! 1. the leaf is signed (ECDSA P-256, SHA-256) by the pinned site key;
//! 2. the leaf is within its validity period;
//! 3. (rustls, in the handshake) the server proved it holds the leaf's key.
//!
//! The host name is not checked: the pin, not a name, is what the app trusts.

use std::sync::Arc;

use p256::{
    ecdsa::{DerSignature, VerifyingKey, signature::Verifier},
    pkcs8::DecodePublicKey,
};
use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms, verify_tls13_signature},
    pki_types::{CertificateDer, ServerName, UnixTime},
};
use x509_parser::{oid_registry::OID_SIG_ECDSA_WITH_SHA256, prelude::*};

use crate::ExternalTlsError;

/// A [`ServerCertVerifier`] that trusts exactly one site key.
#[derive(Debug)]
pub struct PinnedSiteKey {
    site_key: VerifyingKey,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PinnedSiteKey {
    /// `site_key_spki`: the site public key (SPKI DER) from the ticket.
    pub fn new(site_key_spki: &[u8]) -> Result<Arc<Self>, ExternalTlsError> {
        let site_key =
            VerifyingKey::from_public_key_der(site_key_spki).map_err(|_| ExternalTlsError::NotP256)?;
        Ok(Arc::new(Self {
            site_key,
            algorithms: provider().signature_verification_algorithms,
        }))
    }

    /// Whether `leaf` is a certificate signed by the pinned key and valid at `now`.
    pub fn check_leaf(&self, leaf: &[u8], now: UnixTime) -> Result<(), String> {
        let (rest, cert) = X509Certificate::from_der(leaf).map_err(|e| format!("bad certificate: {e}"))?;
        if !rest.is_empty() {
            return Err("trailing bytes after the certificate".into());
        }
        if cert.signature_algorithm.algorithm != OID_SIG_ECDSA_WITH_SHA256 {
            return Err("the certificate is not signed with ECDSA-SHA256".into());
        }
        let signature = DerSignature::from_bytes(&cert.signature_value.data)
            .map_err(|_| "malformed certificate signature".to_owned())?;
        self.site_key
            .verify(cert.tbs_certificate.as_ref(), &signature)
            .map_err(|_| "the certificate is not signed by the pinned site key".to_owned())?;
        let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        let validity = cert.validity();
        if now < validity.not_before.timestamp() || now > validity.not_after.timestamp() {
            return Err("the certificate is outside its validity period".into());
        }
        Ok(())
    }
}

fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

impl ServerCertVerifier for PinnedSiteKey {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check_leaf(end_entity, now)
            .map(|()| ServerCertVerified::assertion())
            .map_err(rustls::Error::General)
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("the site speaks TLS 1.3 only".into()))
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
        self.algorithms.supported_schemes()
    }
}
