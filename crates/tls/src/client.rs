//! Internal gRPC channels over mutual TLS.

use std::{sync::Arc, time::Duration};

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::{InternalChannel, ReloadableTls, service_dns_name};

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("bad service address {0:?}")]
    BadAddress(String),
}

/// A lazily connecting channel to the internal service `identity` at `addr`
/// (`host:port`). The server must present a certificate for
/// `<identity>.chipsite.internal` from the internal CA; this side presents its
/// own certificate. Reconnects use the TLS material current at that moment.
/// When that service runs in this process, calls skip TCP and TLS but not
/// their checks ([`crate::local`]).
pub fn connect_lazy(
    addr: &str,
    identity: &str,
    tls: Arc<ReloadableTls>,
) -> Result<InternalChannel, ChannelError> {
    Ok(InternalChannel::new(
        connect_tls_lazy(addr, identity, tls.clone())?,
        addr,
        identity,
        tls,
    ))
}

/// [`connect_lazy`] over mutual TLS always, even to a server in this process.
pub fn connect_tls_lazy(
    addr: &str,
    identity: &str,
    tls: Arc<ReloadableTls>,
) -> Result<Channel, ChannelError> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|_| ChannelError::BadAddress(addr.to_owned()))?
        .connect_timeout(Duration::from_secs(5))
        // No call to another service may hang a caller: a deadline per call,
        // and keepalives to notice a peer that vanished without a word.
        .timeout(Duration::from_secs(15))
        .http2_keep_alive_interval(Duration::from_secs(15))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    let server_name = ServerName::try_from(service_dns_name(identity))
        .map_err(|_| ChannelError::BadAddress(identity.to_owned()))?;
    let connector = tower::service_fn(move |uri: Uri| {
        let tls = tls.clone();
        let server_name = server_name.clone();
        async move {
            let authority = uri
                .authority()
                .map(|a| a.as_str().to_owned())
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no authority"))?;
            let tcp = TcpStream::connect(authority).await?;
            tcp.set_nodelay(true)?;
            let stream = TlsConnector::from(tls.client_config())
                .connect(server_name, tcp)
                .await?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(connector))
}
