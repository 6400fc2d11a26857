//! The app's key pair and the self-signed certificate that presents it.

use rcgen::{CertificateParams, DnType, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::AppError;

/// A P-256 key pair held by the app. Its public half is registered with the
/// site at enrollment; sessions present it in a self-signed certificate
/// whose subject common name is the user's CHIP ID.
pub struct AppKey(KeyPair);

impl std::fmt::Debug for AppKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppKey").finish_non_exhaustive()
    }
}

fn key_err(e: impl std::fmt::Display) -> AppError {
    AppError::Key(e.to_string())
}

impl AppKey {
    pub fn generate() -> Result<Self, AppError> {
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map(Self)
            .map_err(key_err)
    }

    /// PKCS#8 PEM of the private key (keep it in a file only you can read).
    pub fn to_pem(&self) -> String {
        self.0.serialize_pem()
    }

    pub fn from_pem(pem: &str) -> Result<Self, AppError> {
        let key = KeyPair::from_pem(pem).map_err(key_err)?;
        if !key.is_compatible(&PKCS_ECDSA_P256_SHA256) {
            return Err(AppError::Key("the key is not a P-256 key".into()));
        }
        Ok(Self(key))
    }

    /// The private key as PKCS#8 DER (for signing documents).
    pub(crate) fn pkcs8_der(&self) -> Vec<u8> {
        self.0.serialize_der()
    }

    /// The public key as SubjectPublicKeyInfo DER.
    pub fn spki_der(&self) -> Vec<u8> {
        rcgen::PublicKeyData::subject_public_key_info(&self.0)
    }

    /// A self-signed certificate for this key naming `chip_id` as its
    /// subject common name, and the private key, for a TLS client.
    pub fn client_identity(
        &self,
        chip_id: &str,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), AppError> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(key_err)?;
        params.distinguished_name.push(DnType::CommonName, chip_id);
        let cert = params.self_signed(&self.0).map_err(key_err)?;
        Ok((
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.0.serialize_der())),
        ))
    }
}
