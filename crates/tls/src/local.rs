//! In-process calls between services that share a process (`chipsite dev`,
//! the tests, a combined container): no TCP and no TLS records, but the same
//! checks.
//!
//! Every internal server registers its service stack (authorization policy
//! included) under the address it listens on, with its TLS material. An
//! [`InternalChannel`] to that address calls the stack directly when both
//! sides' certificates pass the checks a handshake would make: the server's
//! chain verifies under the caller's trust roots for the server's DNS name,
//! and the caller's chain verifies under the server's roots. The caller's
//! identity (its certificate's SPIFFE ID) then travels in a request extension
//! that only this crate can create, and the server's [`crate::AuthzLayer`]
//! checks it exactly as it checks a handshake's certificate. Anything else
//! (no server here, material that does not verify, the site's
//! `internal_tcp` setting)
//! takes the mutual-TLS channel.

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, LazyLock, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use rustls::{
    client::{WebPkiServerVerifier, danger::ServerCertVerifier},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::danger::ClientCertVerifier,
};
use tonic::{body::Body, transport::Channel};
use tower::{Service, ServiceExt, util::BoxCloneService};

use crate::{ReloadableTls, service_dns_name};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A server's service stack, callable in-process.
pub type LocalService = BoxCloneService<http::Request<Body>, http::Response<Body>, BoxError>;

/// The same per-call deadline as the mutual-TLS channel's.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a verified pair of certificates is trusted before it is checked
/// again (so that an expiring certificate is noticed as a handshake would).
const REVERIFY: Duration = Duration::from_secs(60);

/// One side's certificate chain, its identity, and verifiers for the other
/// side's chain built from this side's trust roots.
pub(crate) struct Credentials {
    pub(crate) identity: Option<String>,
    pub(crate) chain: Vec<CertificateDer<'static>>,
    pub(crate) clients: Arc<dyn ClientCertVerifier>,
    pub(crate) servers: Arc<WebPkiServerVerifier>,
}

/// The internal identity of an in-process caller, verified as above. Only
/// this crate can make one, so no other code can claim an identity.
#[derive(Debug, Clone)]
pub(crate) struct LocalCaller(pub(crate) String);

struct Entry {
    serial: u64,
    tls: Arc<ReloadableTls>,
    service: LocalService,
}

static SERVERS: LazyLock<Mutex<HashMap<SocketAddr, Entry>>> = LazyLock::new(Default::default);
static SERIAL: AtomicU64 = AtomicU64::new(0);

static ENABLED: AtomicBool = AtomicBool::new(true);

/// After [`set_enabled`]`(false)` (the site's `internal_tcp` setting) every
/// internal call takes TCP and TLS.
fn disabled() -> bool {
    !ENABLED.load(Ordering::Relaxed)
}

/// Allow or forbid in-process calls in this process from now on (a test of
/// the TCP path; benchmarks comparing the two).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

fn servers() -> std::sync::MutexGuard<'static, HashMap<SocketAddr, Entry>> {
    SERVERS.lock().unwrap_or_else(|e| e.into_inner())
}

/// A server's place in the registry; dropping it (when the server starts
/// draining) sends later calls to the TCP port, which is closing too.
#[derive(Debug)]
pub struct Registration {
    addr: SocketAddr,
    serial: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut servers = servers();
        if servers.get(&self.addr).is_some_and(|e| e.serial == self.serial) {
            servers.remove(&self.addr);
        }
    }
}

/// Offer `service` (a server's whole stack, authorization included) to
/// in-process callers of `addr`, presenting `tls`'s certificate.
pub fn register<S>(addr: SocketAddr, tls: Arc<ReloadableTls>, service: S) -> Option<Registration>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    if disabled() {
        return None;
    }
    let serial = SERIAL.fetch_add(1, Ordering::Relaxed);
    let service = BoxCloneService::new(service.map_err(|e: Infallible| -> BoxError { match e {} }));
    servers().insert(addr, Entry { serial, tls, service });
    Some(Registration { addr, serial })
}

/// The server registered for `addr` (or for its port on every address, when
/// `addr` is a loopback one).
fn lookup(addr: SocketAddr) -> Option<(u64, Arc<ReloadableTls>, LocalService)> {
    if disabled() {
        return None;
    }
    let servers = servers();
    let any = match addr.ip() {
        IpAddr::V4(ip) if ip.is_loopback() => Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        IpAddr::V6(ip) if ip.is_loopback() => Some(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
        _ => None,
    };
    servers
        .get(&addr)
        .or_else(|| any.and_then(|ip| servers.get(&SocketAddr::new(ip, addr.port()))))
        .map(|e| (e.serial, e.tls.clone(), e.service.clone()))
}

/// The caller's identity if each side's chain verifies under the other's
/// roots, the server's for `server_identity`'s DNS name.
fn verify(caller: &Credentials, server: &Credentials, server_identity: &str) -> Option<String> {
    let now = UnixTime::now();
    let name = ServerName::try_from(service_dns_name(server_identity)).ok()?;
    let (leaf, rest) = server.chain.split_first()?;
    caller
        .servers
        .verify_server_cert(leaf, rest, &name, &[], now)
        .ok()?;
    let (leaf, rest) = caller.chain.split_first()?;
    server.clients.verify_client_cert(leaf, rest, now).ok()?;
    caller.identity.clone()
}

struct Verified {
    caller: Arc<Credentials>,
    server: Arc<Credentials>,
    serial: u64,
    at: Instant,
    identity: Option<String>,
}

/// A channel to another internal service: in-process when that service runs
/// in this process and the certificates check out, mutual TLS otherwise.
#[derive(Clone)]
pub struct InternalChannel {
    tcp: Channel,
    addr: Option<SocketAddr>,
    identity: Arc<str>,
    tls: Option<Arc<ReloadableTls>>,
    verified: Arc<Mutex<Option<Verified>>>,
    local_calls: Arc<AtomicU64>,
}

impl std::fmt::Debug for InternalChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InternalChannel")
            .field("addr", &self.addr)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl InternalChannel {
    pub(crate) fn new(tcp: Channel, addr: &str, identity: &str, tls: Arc<ReloadableTls>) -> Self {
        Self {
            tcp,
            addr: addr.parse().ok(),
            identity: identity.into(),
            tls: Some(tls),
            verified: Arc::default(),
            local_calls: Arc::default(),
        }
    }

    /// A channel that always takes `tcp` (tests, and clients outside the site).
    pub fn tcp_only(tcp: Channel) -> Self {
        Self {
            tcp,
            addr: None,
            identity: "".into(),
            tls: None,
            verified: Arc::default(),
            local_calls: Arc::default(),
        }
    }

    /// How many calls through this channel (and its clones) were made in-process.
    pub fn local_calls(&self) -> u64 {
        self.local_calls.load(Ordering::Relaxed)
    }

    /// The in-process server to call, with the caller's verified identity.
    fn local(&self) -> Option<(LocalService, String)> {
        let (serial, server_tls, service) = lookup(self.addr?)?;
        let caller = self.tls.as_ref()?.credentials();
        let server = server_tls.credentials();
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = verified.as_ref().is_some_and(|v| {
            v.serial == serial
                && Arc::ptr_eq(&v.caller, &caller)
                && Arc::ptr_eq(&v.server, &server)
                && v.at.elapsed() < REVERIFY
        });
        if !fresh {
            let identity = verify(&caller, &server, &self.identity);
            if identity.is_none() {
                tracing::debug!(addr = ?self.addr, server = %self.identity, "in-process call not verified; using TLS");
            }
            *verified = Some(Verified {
                caller,
                server,
                serial,
                at: Instant::now(),
                identity,
            });
        }
        let identity = verified.as_ref()?.identity.clone()?;
        Some((service, identity))
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl Service<http::Request<Body>> for InternalChannel {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Each call drives its own path (a clone of either) to readiness.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        match self.local() {
            Some((service, caller)) => {
                request.extensions_mut().insert(LocalCaller(caller));
                self.local_calls.fetch_add(1, Ordering::Relaxed);
                Box::pin(async move {
                    match tokio::time::timeout(CALL_TIMEOUT, service.oneshot(request)).await {
                        Ok(result) => result,
                        Err(_) => Err(tonic::Status::deadline_exceeded("internal call timed out").into()),
                    }
                })
            }
            None => {
                let tcp = self.tcp.clone();
                Box::pin(async move { tcp.oneshot(request).await.map_err(Into::into) })
            }
        }
    }
}
