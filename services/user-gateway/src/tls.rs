//! The gateway's external TLS: TLS 1.3 only, a short-lived key certified by
//! the site key through key-vault, and optional client certificates (apps
//! present a self-signed certificate of their registered key; enrollments
//! present none).

pub use chipsite_external_tls::ClaimedIdentity as AppCertificate;
use chipsite_external_tls::ClaimedIdentityVerifier;
use rustls::ServerConfig;

/// The external server configuration for a certified key (TLS 1.3 only, no
/// resumption): apps present a self-signed certificate naming their CHIP ID,
/// enrollments none.
pub fn server_config(chain: Vec<Vec<u8>>, pkcs8_key: Vec<u8>) -> Result<ServerConfig, rustls::Error> {
    chipsite_external_tls::server_config(chain, pkcs8_key, ClaimedIdentityVerifier::new()).map_err(
        |e| match e {
            chipsite_external_tls::ExternalTlsError::Tls(e) => e,
            other => rustls::Error::General(other.to_string()),
        },
    )
}
