//! The console's certificate door: HTTPS on its own port, where the TLS
//! handshake itself demands a client certificate from the site's internal
//! CA (the same mutual TLS as the internal services). A connection that
//! presents the `admin-client` certificate may sign in with one click; any
//! other identity sees only the ticket sign-in. The pages and sessions are
//! the same as on the plain port.

use std::{net::SocketAddr, pin::Pin, sync::Arc};

use axum::{
    extract::{ConnectInfo, Request, connect_info::Connected},
    middleware::Next,
    response::Response,
    serve::{IncomingStream, Listener},
};
use chipsite_tls::{Admitted, ReloadableTls};
use futures::{Stream, StreamExt};
use tokio::net::TcpListener;

use crate::Console;

/// Who is on the other end of an HTTPS connection.
#[derive(Clone, Debug)]
pub struct CertPeer {
    pub addr: SocketAddr,
    /// The internal identity the client certificate names.
    pub identity: Option<String>,
}

impl Connected<IncomingStream<'_, CertListener>> for CertPeer {
    fn connect_info(stream: IncomingStream<'_, CertListener>) -> Self {
        stream.remote_addr().clone()
    }
}

/// The identity of the client certificate, for handlers.
#[derive(Clone, Debug)]
pub(crate) struct ClientIdentity(pub String);

type Incoming = Pin<Box<dyn Stream<Item = std::io::Result<Admitted>> + Send>>;

/// An HTTPS connection, closed when idle.
pub type Io = chipsite_tls::IdleTimeout<Admitted>;

/// Mutual-TLS connections whose handshakes succeeded (done concurrently,
/// with a timeout, by [`chipsite_tls::tls_incoming`]).
pub struct CertListener {
    incoming: Incoming,
    local: SocketAddr,
    idle: std::time::Duration,
}

impl CertListener {
    pub fn new(
        listener: TcpListener,
        tls: Arc<ReloadableTls>,
        options: &crate::Options,
    ) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        Ok(Self {
            incoming: Box::pin(chipsite_tls::tls_incoming(
                listener,
                tls,
                chipsite_tls::Admission::new(options.admission),
            )),
            local,
            idle: options.idle,
        })
    }
}

impl Listener for CertListener {
    type Io = Io;
    type Addr = CertPeer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.incoming.next().await {
                Some(Ok(stream)) => {
                    let (tcp, conn) = stream.get_ref().get_ref();
                    let Ok(addr) = tcp.peer_addr() else { continue };
                    let identity = conn
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(|c| chipsite_tls::identity_of(c.as_ref()));
                    return (
                        chipsite_tls::IdleTimeout::new(stream, self.idle),
                        CertPeer { addr, identity },
                    );
                }
                Some(Err(_)) => {}
                // The accept loop ended: nothing more will come.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(CertPeer {
            addr: self.local,
            identity: None,
        })
    }
}

/// Give the shared handlers the peer address (as on the plain port) and the
/// certificate's identity.
async fn peer_info(ConnectInfo(peer): ConnectInfo<CertPeer>, mut req: Request, next: Next) -> Response {
    req.extensions_mut().insert(ConnectInfo(peer.addr));
    if let Some(id) = peer.identity {
        req.extensions_mut().insert(ClientIdentity(id));
    }
    next.run(req).await
}

/// Serve the console over HTTPS with required client certificates on
/// `listener` until `shutdown`.
pub async fn serve_https(
    console: Arc<Console>,
    listener: TcpListener,
    tls: Arc<ReloadableTls>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = CertListener::new(listener, tls, console.options())?;
    let app = crate::router(console).layer(axum::middleware::from_fn(peer_info));
    crate::conn::serve(listener, app, shutdown).await
}
