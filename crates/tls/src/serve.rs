//! Accepting internal mutual-TLS connections for a tonic server.

use std::{sync::Arc, time::Duration};

use futures::Stream;
use tokio::{net::TcpListener, net::TcpStream, sync::mpsc};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;

use crate::ReloadableTls;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at most; more connections wait to be accepted,
/// so unauthenticated peers cannot exhaust file descriptors or memory.
const MAX_HANDSHAKES: usize = 512;

/// Accept TCP connections on `listener` and yield those whose mutual-TLS
/// handshake succeeds, for `Server::serve_with_incoming_shutdown`.
/// Handshakes run concurrently so a slow client cannot stall the others;
/// a failed or slow handshake is logged and dropped. Each connection uses the
/// TLS configuration current when it arrives. The accept loop ends when the
/// stream is dropped.
pub fn tls_incoming(
    listener: TcpListener,
    tls: Arc<ReloadableTls>,
) -> impl Stream<Item = Result<TlsStream<TcpStream>, std::io::Error>> + Send + 'static {
    let (tx, rx) = mpsc::channel(128);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = handshakes.clone().acquire_owned().await else {
                return;
            };
            let accepted = tokio::select! {
                _ = tx.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(tls.server_config());
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "internal TLS handshake refused"),
                    Err(_) => tracing::debug!(%peer, "internal TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
