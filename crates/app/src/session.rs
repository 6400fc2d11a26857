//! Enrollment and sessions over the external protocol.

use std::{
    collections::HashMap,
    net::IpAddr,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chipsite_model::PublishedTicket;
use chipsite_wire::{FrameError, FrameReader, Limits, Notification, rpc};
use rustls::pki_types::ServerName;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf},
    net::TcpStream,
    sync::{mpsc, oneshot},
    task::JoinHandle,
};
use tokio_rustls::{TlsConnector, client::TlsStream};

use crate::{AppError, AppKey};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

type Stream = TlsStream<TcpStream>;

/// How an app's connections are made.
#[derive(Debug, Clone, Copy, Default)]
pub struct Dial {
    /// The local address to connect from (the default: the system's choice).
    pub source: Option<IpAddr>,
    /// Leave Nagle's algorithm on, as many platforms' sockets do by
    /// default (this client turns it off): to check how a site serves such
    /// clients (`chipsite bench-enroll`).
    pub nagle: bool,
}

/// Open TLS 1.3 to `host:port`, trusting only a gateway certified by
/// `site_key` (SPKI DER); present `identity` when given.
async fn connect(
    host: &str,
    port: u16,
    site_key: &[u8],
    identity: Option<(&AppKey, &str)>,
    dial: Dial,
) -> Result<Stream, AppError> {
    let addr = format!("{host}:{port}");
    let identity = match identity {
        None => None,
        Some((key, chip_id)) => Some(key.client_identity(chip_id)?),
    };
    let config = chipsite_external_tls::client_config(site_key, identity).map_err(|e| match e {
        chipsite_external_tls::ExternalTlsError::NotP256 => AppError::Ticket(e.to_string()),
        other => AppError::Key(other.to_string()),
    })?;
    let name = ServerName::try_from(host.to_owned()).map_err(|_| AppError::Connect {
        addr: addr.clone(),
        message: "not a host name or IP address".into(),
    })?;
    let connecting = async {
        let Some(source) = dial.source else {
            return TcpStream::connect(&addr).await;
        };
        let target = tokio::net::lookup_host(&addr)
            .await?
            .next()
            .ok_or_else(|| std::io::Error::other("no address"))?;
        let socket = if target.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.bind(std::net::SocketAddr::new(source, 0))?;
        socket.connect(target).await
    };
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| AppError::Timeout)?
        .map_err(|e| AppError::Connect {
            addr: addr.clone(),
            message: e.to_string(),
        })?;
    let _ = tcp.set_nodelay(!dial.nagle);
    tokio::time::timeout(
        CONNECT_TIMEOUT,
        TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .map_err(|_| AppError::Timeout)?
    .map_err(|e| AppError::Handshake {
        addr,
        message: e.to_string(),
    })
}

async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &str) -> Result<(), AppError> {
    let mut line = Vec::with_capacity(frame.len() + 1);
    line.extend_from_slice(frame.as_bytes());
    line.push(b'\n');
    w.write_all(&line).await?;
    w.flush().await?;
    Ok(())
}

fn client_limits() -> Limits {
    Limits {
        idle: Duration::from_secs(24 * 3600),
        ..Limits::default()
    }
}

fn site_key_of(ticket: &PublishedTicket) -> Result<Vec<u8>, AppError> {
    URL_SAFE_NO_PAD
        .decode(&ticket.site_key)
        .map_err(|_| AppError::Ticket("the site key is not base64url".into()))
}

/// Enroll `key` for `chip_id` with a user ticket. On success the site has
/// registered the key; on any refusal the site closes without a word
/// ([`AppError::Refused`]). The token is used up either way, unless the
/// site failed the pin check (then nothing was sent).
pub async fn enroll(ticket: &PublishedTicket, chip_id: &str, key: &AppKey) -> Result<(), AppError> {
    enroll_from(ticket, chip_id, key, None).await
}

/// [`enroll`] from a chosen local address.
pub async fn enroll_from(
    ticket: &PublishedTicket,
    chip_id: &str,
    key: &AppKey,
    source: Option<IpAddr>,
) -> Result<(), AppError> {
    enroll_with(ticket, chip_id, key, Dial { source, nagle: false }).await
}

/// [`enroll`] over a connection made as `dial` says.
pub async fn enroll_with(
    ticket: &PublishedTicket,
    chip_id: &str,
    key: &AppKey,
    dial: Dial,
) -> Result<(), AppError> {
    if ticket.kind != "user" {
        return Err(AppError::Ticket(format!(
            "a {} ticket cannot enroll an app",
            ticket.kind
        )));
    }
    let site_key = site_key_of(ticket)?;
    let stream = connect(&ticket.host, ticket.port, &site_key, None, dial).await?;
    let (read, mut write) = tokio::io::split(stream);
    let request = rpc::Request {
        id: json!(1),
        method: "enroll".into(),
        params: json!({
            "token": ticket.token,
            "chip_id": chip_id,
            "public_key": URL_SAFE_NO_PAD.encode(key.spki_der()),
        }),
    };
    write_frame(&mut write, &request.to_frame()).await?;
    let mut reader = FrameReader::new(read, client_limits());
    let frame = match tokio::time::timeout(CALL_TIMEOUT, reader.next_frame()).await {
        Err(_) => return Err(AppError::Timeout),
        Ok(Ok(Some(frame))) => frame,
        // A close without a word (or a reset) is the refusal.
        Ok(Ok(None) | Err(FrameError::Truncated | FrameError::Io(_))) => return Err(AppError::Refused),
        Ok(Err(e)) => return Err(AppError::Protocol(e.to_string())),
    };
    match rpc::parse_from_server(&frame) {
        Ok(Ok(response)) => response.outcome.map(|_| ()).map_err(|e| AppError::Rpc {
            code: e.code,
            message: e.message,
        }),
        Ok(Err(_)) => Err(AppError::Protocol("unexpected notification".into())),
        Err(e) => Err(AppError::Protocol(e.message)),
    }
}

/// Calls waiting for their answers; `None` once the connection has ended,
/// so a call made after the end fails at once instead of waiting.
type Pending = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<Result<Value, AppError>>>>>>;

/// An open mutual-TLS session with the user gateway.
#[derive(Debug)]
pub struct Session {
    write: tokio::sync::Mutex<WriteHalf<Stream>>,
    pending: Pending,
    next_id: AtomicU64,
    notifications: tokio::sync::Mutex<mpsc::UnboundedReceiver<Notification>>,
    reader: JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Session {
    /// Connect to the gateway at `host:port` (which must be certified by
    /// `site_key`, SPKI DER) presenting `key` for `chip_id`.
    pub async fn connect(
        host: &str,
        port: u16,
        site_key: &[u8],
        chip_id: &str,
        key: &AppKey,
    ) -> Result<Self, AppError> {
        Self::connect_from(host, port, site_key, chip_id, key, None).await
    }

    /// [`Session::connect`] from a chosen local address.
    pub async fn connect_from(
        host: &str,
        port: u16,
        site_key: &[u8],
        chip_id: &str,
        key: &AppKey,
        source: Option<IpAddr>,
    ) -> Result<Self, AppError> {
        Self::connect_with(host, port, site_key, chip_id, key, Dial { source, nagle: false }).await
    }

    /// [`Session::connect`] over a connection made as `dial` says.
    pub async fn connect_with(
        host: &str,
        port: u16,
        site_key: &[u8],
        chip_id: &str,
        key: &AppKey,
        dial: Dial,
    ) -> Result<Self, AppError> {
        let stream = connect(host, port, site_key, Some((key, chip_id)), dial).await?;
        let (read, write) = tokio::io::split(stream);
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let (tx, rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(read_loop(read, pending.clone(), tx));
        Ok(Self {
            write: tokio::sync::Mutex::new(write),
            pending,
            next_id: AtomicU64::new(1),
            notifications: tokio::sync::Mutex::new(rx),
            reader,
        })
    }

    /// Connect with the state an enrolled app keeps.
    pub async fn open(state: &AppState) -> Result<Self, AppError> {
        let key = AppKey::from_pem(&state.key_pem)?;
        let site_key = URL_SAFE_NO_PAD
            .decode(&state.site_key)
            .map_err(|_| AppError::Ticket("the saved site key is not base64url".into()))?;
        Self::connect(&state.host, state.port, &site_key, &state.chip_id, &key).await
    }

    /// Call `method` and wait for its result.
    pub async fn call(&self, method: &str, params: Value) -> Result<Value, AppError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        match self.pending.lock().as_deref_mut() {
            Ok(Some(p)) => {
                p.insert(id, tx);
            }
            _ => return Err(AppError::Closed("the connection ended".into())),
        }
        let request = rpc::Request {
            id: json!(id),
            method: method.to_owned(),
            params,
        };
        self.send_raw(format!("{}\n", request.to_frame()).as_bytes())
            .await?;
        match tokio::time::timeout(CALL_TIMEOUT, rx).await {
            Err(_) => Err(AppError::Timeout),
            Ok(Err(_)) => Err(AppError::Closed("the connection ended".into())),
            Ok(Ok(result)) => result,
        }
    }

    /// Hand in another site's tally ticket (its URI or JSON): `tally.redeem`.
    /// The result names the linked user and their site
    /// (`{"linked":{"chip_id","host","port","site_pin"}}`).
    pub async fn redeem_tally_ticket(&self, ticket: &str) -> Result<Value, AppError> {
        self.call("tally.redeem", json!({"ticket": ticket})).await
    }

    /// Send bytes as they are (for testing what the site does with bad input).
    pub async fn send_raw(&self, bytes: &[u8]) -> Result<(), AppError> {
        let mut w = self.write.lock().await;
        w.write_all(bytes).await?;
        w.flush().await?;
        Ok(())
    }

    /// The next notification from the site (alarms, and `closed` before the
    /// site ends the session), or `None` once the session has ended.
    pub async fn next_notification(&self) -> Option<Notification> {
        self.notifications.lock().await.recv().await
    }

    /// Close the session cleanly.
    pub async fn close(self) {
        let mut w = self.write.lock().await;
        let _ = w.shutdown().await;
    }
}

async fn read_loop(read: ReadHalf<Stream>, pending: Pending, notes: mpsc::UnboundedSender<Notification>) {
    let mut reader = FrameReader::new(read, client_limits());
    let why = loop {
        let frame = match reader.next_frame().await {
            Ok(Some(f)) => f,
            Ok(None) => break "the site closed the connection".to_owned(),
            Err(e) => break e.to_string(),
        };
        match rpc::parse_from_server(&frame) {
            Ok(Ok(response)) => {
                let waiter = response
                    .id
                    .as_u64()
                    .and_then(|id| pending.lock().ok()?.as_mut()?.remove(&id));
                let result = response.outcome.map_err(|e| AppError::Rpc {
                    code: e.code,
                    message: e.message,
                });
                match waiter {
                    Some(w) => {
                        let _ = w.send(result);
                    }
                    // An error for a request the site could not read (id null).
                    None => {
                        if let Err(AppError::Rpc { code, message }) = result {
                            let _ = notes.send(Notification {
                                method: "error".into(),
                                params: json!({"code": code, "message": message}),
                            });
                        }
                    }
                }
            }
            Ok(Err(note)) => {
                let _ = notes.send(note);
            }
            Err(e) => break e.message,
        }
    };
    let waiting = pending.lock().ok().and_then(|mut p| p.take());
    if let Some(waiting) = waiting {
        for (_, w) in waiting {
            let _ = w.send(Err(AppError::Closed(why.clone())));
        }
    }
}

/// What an enrolled app keeps: who it is, where its site is, the site key
/// it pinned, and its own private key.
#[derive(Clone, Serialize, Deserialize)]
pub struct AppState {
    pub chip_id: String,
    pub host: String,
    pub port: u16,
    /// base64url SPKI DER of the site key.
    pub site_key: String,
    /// PKCS#8 PEM.
    pub key_pem: String,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("chip_id", &self.chip_id)
            .field("host", &self.host)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl AppState {
    pub fn new(ticket: &PublishedTicket, chip_id: &str, key: &AppKey) -> Self {
        Self {
            chip_id: chip_id.to_owned(),
            host: ticket.host.clone(),
            port: ticket.port,
            site_key: ticket.site_key.clone(),
            key_pem: key.to_pem(),
        }
    }

    pub fn load(path: &Path) -> Result<Self, AppError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| AppError::Key(format!("{}: {e}", path.display())))?;
        serde_json::from_str(&text).map_err(|e| AppError::Key(format!("{}: {e}", path.display())))
    }

    /// Write the state (it holds the private key) readable by its owner only.
    pub fn save(&self, path: &Path) -> Result<(), AppError> {
        let json = serde_json::to_string_pretty(self).map_err(|e| AppError::Key(e.to_string()))?;
        // 0600, whole or not at all, never through a symlink.
        chipsite_model::files::write_private(path, json.as_bytes())?;
        Ok(())
    }
}
