//! Serving the console's connections with hyper directly (not
//! `axum::serve`), so that HTTP/1 has a header-read deadline: a client that
//! trickles its request headers is closed after [`HEADER_READ_TIMEOUT`],
//! whatever its pace. Idle connections are closed by the listeners'
//! [`chipsite_tls::IdleTimeout`]; caps come from their admission.

use std::{future::Future, time::Duration};

use axum::{Router, extract::ConnectInfo, serve::Listener};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto::Builder,
    service::TowerToHyperService,
};

/// How long a client may take to send a request's headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long open connections may finish once the console stops.
const DRAIN: Duration = Duration::from_secs(5);

/// Accept on `listener` until `shutdown`, each connection served by `app`
/// with its address as `ConnectInfo<L::Addr>`.
pub(crate) async fn serve<L>(
    mut listener: L,
    app: Router,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()>
where
    L: Listener,
    L::Addr: Clone + Send + Sync + 'static,
{
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (io, addr) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
            // Reap finished connections as they end.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let service = TowerToHyperService::new(app.clone().layer(axum::Extension(ConnectInfo(addr))));
        connections.spawn(async move {
            let mut builder = Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            if let Err(e) = builder
                .serve_connection_with_upgrades(TokioIo::new(io), service)
                .await
            {
                tracing::debug!(error = %e, "console connection ended");
            }
        });
    }
    // Stopping: give open requests a moment, then drop what is left.
    let drained = tokio::time::timeout(DRAIN, async { while connections.join_next().await.is_some() {} });
    if drained.await.is_err() {
        connections.abort_all();
    }
    Ok(())
}
