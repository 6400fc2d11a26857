//! The console's plain-HTTP door: connections admitted under the same caps
//! as every other port (per source and in total; over a cap, closed at
//! once) and closed when idle, so neither a flood of connections nor a
//! trickle of slow ones can keep the operator out.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::serve::Listener;
use chipsite_tls::{Admission, ConnPermit, IdleTimeout};
use tokio::net::{TcpListener, TcpStream};

use crate::Options;

pub struct GuardedListener {
    inner: TcpListener,
    admission: Arc<Admission>,
    idle: Duration,
}

impl GuardedListener {
    pub fn new(inner: TcpListener, options: &Options) -> Self {
        Self {
            inner,
            admission: Admission::new(options.admission),
            idle: options.idle,
        }
    }
}

/// An admitted connection: its permit lives as long as it does.
pub struct Guarded {
    io: IdleTimeout<TcpStream>,
    _permit: ConnPermit,
}

impl Listener for GuardedListener {
    type Io = Guarded;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (tcp, peer) = match self.inner.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors, most likely: let some close.
                    tracing::warn!(error = %e, "console accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            match self.admission.admit(peer.ip()) {
                Ok(mut permit) => {
                    permit.handshake_done();
                    let _ = tcp.set_nodelay(true);
                    return (
                        Guarded {
                            io: IdleTimeout::new(tcp, self.idle),
                            _permit: permit,
                        },
                        peer,
                    );
                }
                Err(why) => tracing::debug!(%peer, cap = why.label(), "console connection shed"),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

impl tokio::io::AsyncRead for Guarded {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Guarded {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
