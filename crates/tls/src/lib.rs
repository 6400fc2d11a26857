//! Internal PKI and mutual TLS for chipsite's services.
//!
//! Every internal service and admin client holds a certificate from the site's
//! internal CA. Its identity is the URI SAN `spiffe://chipsite.internal/<name>`;
//! servers also carry the DNS SAN `<name>.chipsite.internal`, which clients
//! verify, so a caller always knows which service answered. Which identity may
//! call which RPC is a [`Policy`] enforced by [`AuthzLayer`] before any handler
//! runs.

pub mod admission;
mod authz;
mod client;
mod idle;
pub mod local;
mod material;
mod pki;
mod serve;
mod throttle;

pub use admission::{Admission, AdmissionLimits, ConnPermit, Shed};
pub use authz::{AuthzLayer, Caller, Policy};
/// Private files: 0600, whole or not at all, never through a symlink.
pub use chipsite_model::files::write_private;
pub use client::{ChannelError, connect_lazy, connect_tls_lazy};
pub use idle::IdleTimeout;
pub use local::InternalChannel;
pub use material::{CertPaths, ReloadableTls, TlsMaterial};
pub use pki::{CertificateAuthority, IssuedCertificate, identity_of, pin_of_spki};
pub use serve::{Admitted, HANDSHAKE_TIMEOUT, tls_incoming};
pub use throttle::{Attempt, Throttle};

/// Acknowledge at once what the peer sent last (`TCP_QUICKACK`): called by
/// every server when its TLS handshake completes. A client that leaves
/// Nagle's algorithm on (the default of Python's and Java's sockets) holds
/// its first request until its last handshake flight is acknowledged, and a
/// server with nothing to send delays that acknowledgement by up to 40 ms.
pub fn ack_now(tcp: &tokio::net::TcpStream) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let _ = socket2::SockRef::from(tcp).set_tcp_quickack(true);
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = tcp;
}

/// The trust domain of internal identities.
pub const TRUST_DOMAIN: &str = "chipsite.internal";

/// Internal identities: services and the clients that may call them.
pub mod identity {
    pub const ADMIN: &str = "admin";
    pub const KEY_VAULT: &str = "key-vault";
    pub const TICKET: &str = "ticket";
    pub const USER_GATEWAY: &str = "user-gateway";
    pub const PEER_GATEWAY: &str = "peer-gateway";
    pub const TALLY: &str = "tally";
    /// The operator: `chipsctl`, grpcurl.
    pub const ADMIN_CLIENT: &str = "admin-client";
    /// The admin web console.
    pub const CONSOLE: &str = "console";
    /// The benchmark driver (dev sites only).
    pub const BENCH: &str = "bench";

    /// Every identity the site's CA issues certificates for in dev mode.
    pub const ALL: &[&str] = &[
        ADMIN,
        KEY_VAULT,
        TICKET,
        USER_GATEWAY,
        PEER_GATEWAY,
        TALLY,
        ADMIN_CLIENT,
        CONSOLE,
        BENCH,
    ];
}

/// The URI SAN naming an internal identity.
pub fn spiffe_uri(identity: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/{identity}")
}

/// The DNS name a service's server certificate carries and clients verify.
pub fn service_dns_name(identity: &str) -> String {
    format!("{identity}.{TRUST_DOMAIN}")
}

/// Install ring as the process-wide rustls provider. Idempotent; call at the
/// top of every binary and test before any TLS configuration is built.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("no certificate in {0}")]
    NoCertificate(String),
    #[error("no private key in {0}")]
    NoPrivateKey(String),
    #[error("bad PEM: {0}")]
    Pem(String),
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}
