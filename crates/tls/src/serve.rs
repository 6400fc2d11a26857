//! Accepting internal mutual-TLS connections for a tonic server.

use std::{sync::Arc, time::Duration};

use futures::Stream;
use tokio::{net::TcpListener, net::TcpStream, sync::mpsc};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;

use crate::{Admission, ReloadableTls};

/// How long a TLS handshake may take on an internal port.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Accept TCP connections on `listener` and yield those whose mutual-TLS
/// handshake succeeds, for `Server::serve_with_incoming_shutdown`.
/// Handshakes run concurrently so a slow client cannot stall the others; a
/// failed or slow handshake is logged and dropped. `admission` caps
/// connections and handshakes, in total and per source: a connection over a
/// cap is closed at once and the loop goes on accepting (it never waits for
/// a slot). Each connection uses the TLS configuration current when it
/// arrives. The accept loop ends when the stream is dropped.
pub fn tls_incoming(
    listener: TcpListener,
    tls: Arc<ReloadableTls>,
    admission: Arc<Admission>,
) -> impl Stream<Item = Result<Admitted, std::io::Error>> + Send + 'static {
    let (tx, rx) = mpsc::channel(128);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = tx.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors, most likely: let some close.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let mut permit = match admission.admit(peer.ip()) {
                Ok(p) => p,
                Err(why) => {
                    tracing::debug!(%peer, cap = why.label(), "connection shed");
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(tls.server_config());
            let tx = tx.clone();
            tokio::spawn(async move {
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                permit.handshake_done();
                match handshake {
                    Ok(Ok(stream)) => {
                        crate::ack_now(stream.get_ref().0);
                        let _ = tx
                            .send(Ok(Admitted {
                                stream,
                                _permit: permit,
                            }))
                            .await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "internal TLS handshake refused"),
                    Err(_) => tracing::debug!(%peer, "internal TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// A connection whose handshake succeeded, with the permit it holds for
/// its whole life. It reads and writes as its TLS stream.
#[derive(Debug)]
pub struct Admitted {
    pub stream: TlsStream<TcpStream>,
    _permit: crate::ConnPermit,
}

impl Admitted {
    pub fn get_ref(&self) -> &TlsStream<TcpStream> {
        &self.stream
    }
}

impl tokio::io::AsyncRead for Admitted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Admitted {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The peer's certificates reach tonic's handlers (and the policy layer)
/// exactly as from the bare TLS stream.
impl tonic::transport::server::Connected for Admitted {
    type ConnectInfo = <TlsStream<TcpStream> as tonic::transport::server::Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}
