//! A client's self-signed certificate: the CHIP ID it claims (subject
//! common name) and its P-256 key. The server accepts any such certificate
//! in the handshake and then compares the key with the one it knows for that
//! CHIP ID: apps on the user gateway, peer sites on the peer gateway.

use std::sync::Arc;

use rustls::{
    DigitallySignedStruct, DistinguishedName, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    crypto::{WebPkiSupportedAlgorithms, verify_tls13_signature},
    pki_types::{CertificateDer, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};
use x509_parser::prelude::{FromDer, X509Certificate};

/// What a session's client certificate says: the CHIP ID it claims (its
/// subject common name) and its public key (SPKI DER).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedIdentity {
    pub chip_id: String,
    pub spki: Vec<u8>,
}

impl ClaimedIdentity {
    pub fn parse(der: &[u8]) -> Result<Self, String> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("bad certificate: {e}"))?;
        let chip_id = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .ok_or("the certificate names no CHIP ID (subject common name)")?
            .to_owned();
        if !chipsite_model::is_chip_id(&chip_id) {
            return Err("the certificate's common name is not a CHIP ID".into());
        }
        let spki = cert.public_key().raw.to_vec();
        use p256::pkcs8::DecodePublicKey;
        p256::PublicKey::from_public_key_der(&spki).map_err(|_| "the certificate's key is not P-256")?;
        Ok(Self { chip_id, spki })
    }
}

/// Accepts a client certificate if it carries a P-256 key and a CHIP ID; the
/// session then compares the key with the one registered for that CHIP ID.
/// Enrollment connections present no certificate.
#[derive(Debug)]
pub struct ClaimedIdentityVerifier {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClaimedIdentityVerifier {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        })
    }
}

impl ClientCertVerifier for ClaimedIdentityVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        ClaimedIdentity::parse(end_entity)
            .map(|_| ClientCertVerified::assertion())
            .map_err(rustls::Error::General)
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
