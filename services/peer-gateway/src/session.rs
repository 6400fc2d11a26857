//! Peer sessions (docs/protocol.md section 14.3), both sides. The initiator
//! names the user it acts for in the TLS server name; the responder reads the
//! ClientHello, looks up the site keys it learned for that user and only then
//! completes a handshake that accepts nothing but a chain certified by one of
//! them. Then JSON-RPC requests from the initiator, answered in order.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use chipsite_proto::keyvault::v1 as kv;
use chipsite_tls::ConnPermit;
use chipsite_wire::{
    ErrorCode, FrameError, FrameReader, Incoming, Response, RpcError, close, rpc, write_frame, write_frames,
};
use futures::FutureExt;
use rustls::pki_types::ServerName;
use serde_json::{Value, json};
use tokio::{net::TcpStream, time::Instant};
use tokio_rustls::{StartHandshake, TlsConnector, client::TlsStream};

use crate::{Inner, PeerError, store::link};

pub(crate) use chipsite_model::chip_id::{
    PEER_SESSION_SUFFIX as SUFFIX, chip_id_of_session_name as chip_id_of, session_name,
};

// ------------------------------------------------------------ responding side

/// A session's handshake and its requests. Before the handshake: the named
/// user must have learned keys and this site must take peer work, else the
/// connection is dropped (the handshake fails); a chain of another key fails
/// the handshake in rustls.
pub(crate) async fn answer(
    inner: Arc<Inner>,
    start: StartHandshake<TcpStream>,
    chip_id: String,
    mut permit: ConnPermit,
    deadline: Instant,
    peer: SocketAddr,
) {
    let Some(certified) = inner.certified.load_full() else {
        return;
    };
    let handshake = async {
        match inner.refuses_peers(false).await {
            Ok(None) => {}
            Ok(Some(why)) => return Err(why.to_owned()),
            Err(e) => return Err(e.to_string()),
        }
        let config = session_config(&inner, &certified, &chip_id).await?;
        start.into_stream(config).await.map_err(|e| e.to_string())
    };
    let tls = tokio::time::timeout_at(deadline, handshake).await;
    permit.handshake_done();
    let tls = match tls {
        Ok(Ok(tls)) => {
            chipsite_tls::ack_now(tls.get_ref().0);
            tls
        }
        Ok(Err(why)) => {
            tracing::info!(%peer, chip_id, why, "peer session refused in its handshake");
            return;
        }
        Err(_) => return,
    };
    tracing::debug!(%peer, chip_id, "peer session open");
    // The handshake checked the chain against the keys learned for
    // `chip_id`; which of them it was names the other site.
    let Some(Ok(key)) = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| chipsite_external_tls::site_key_of_chain(c, rustls::pki_types::UnixTime::now()))
    else {
        return;
    };
    inner.contact(&key, "ok");
    let from = Caller {
        chip_id,
        site_pin: chipsite_model::pin_of_spki(&key),
    };
    let _counted = inner.count_session(&from.site_pin, false);
    let mut reader = FrameReader::new(tls, inner.settings.limits);
    let within = inner.settings.write_timeout;
    loop {
        let first = match reader.next_frame().await {
            Ok(Some(frame)) => frame,
            end => {
                framing_end(&mut reader, end, within).await;
                break;
            }
        };
        // The requests that came with it (already read, or readable now)
        // are answered with it: steps among them in one batch.
        let mut bytes = first.len();
        let mut frames = vec![first];
        let mut end = None;
        while frames.len() < BATCH && bytes < BATCH_BYTES {
            match reader.next_frame().now_or_never() {
                None => break,
                Some(Ok(Some(frame))) => {
                    bytes += frame.len();
                    frames.push(frame);
                }
                Some(other) => {
                    end = Some(other);
                    break;
                }
            }
        }
        let replies = answer_frames(&inner, &from, frames).await;
        if !replies.is_empty() && write_frames(reader.get_mut(), &replies, within).await.is_err() {
            return;
        }
        if let Some(end) = end {
            framing_end(&mut reader, end, within).await;
            break;
        }
    }
    close(reader.get_mut(), within).await;
}

/// Requests answered together at most, and their bytes (the internal call
/// that applies a batch of steps stays far below gRPC's 4 MiB).
const BATCH: usize = 64;
const BATCH_BYTES: usize = 1 << 20;

/// The end of a session's requests: an oversized or non-UTF-8 frame gets
/// one error (section 2); a clean close, a timeout or a broken stream none.
async fn framing_end(
    reader: &mut FrameReader<tokio_rustls::server::TlsStream<TcpStream>>,
    end: Result<Option<String>, FrameError>,
    within: Duration,
) {
    let (code, e) = match end {
        Err(e @ FrameError::NotUtf8) => (ErrorCode::ParseError, e),
        Err(e @ FrameError::TooLong(_)) => (ErrorCode::InvalidRequest, e),
        _ => return,
    };
    let reply = Response::error(Value::Null, RpcError::new(code, e.to_string()));
    let _ = write_frame(reader.get_mut(), &reply.to_frame(), within).await;
}

/// The answers to requests that arrived together, in their order. Runs of
/// `tally.step` are taken as one batch ([`crate::outbox::receive_many`]);
/// any other request after the steps before it.
async fn answer_frames(inner: &Arc<Inner>, from: &Caller, frames: Vec<String>) -> Vec<String> {
    let mut replies: Vec<Option<Response>> = Vec::with_capacity(frames.len());
    let mut steps: Vec<(usize, Value, Value)> = Vec::new();
    for frame in frames {
        match rpc::parse(&frame) {
            Err(reply) => replies.push(Some(reply)),
            Ok(Incoming::Notification(_)) => replies.push(None),
            Ok(Incoming::Request(req)) if req.method == "tally.step" => {
                steps.push((replies.len(), req.id, req.params));
                replies.push(None);
            }
            Ok(Incoming::Request(req)) => {
                take_steps(inner, from, &mut steps, &mut replies).await;
                replies.push(Some(match call(&req.method, req.params) {
                    Ok(result) => Response::result(req.id, result),
                    Err(e) => Response::error(req.id, e),
                }));
            }
        }
    }
    take_steps(inner, from, &mut steps, &mut replies).await;
    replies.into_iter().flatten().map(|r| r.to_frame()).collect()
}

/// Apply the steps waiting in `steps` and put their answers in their places.
async fn take_steps(
    inner: &Arc<Inner>,
    from: &Caller,
    steps: &mut Vec<(usize, Value, Value)>,
    replies: &mut [Option<Response>],
) {
    if steps.is_empty() {
        return;
    }
    let (places, params): (Vec<(usize, Value)>, Vec<Value>) =
        steps.drain(..).map(|(i, id, params)| ((i, id), params)).unzip();
    let answers = crate::outbox::receive_many(inner, from, params).await;
    for ((i, id), answer) in places.into_iter().zip(answers) {
        if let Some(place) = replies.get_mut(i) {
            *place = Some(match answer {
                Ok(result) => Response::result(id, result),
                Err(e) => Response::error(id, e),
            });
        }
    }
}

/// The server configuration for a session naming `chip_id`: this site's
/// chain, and a client verifier that accepts the keys learned for that user.
/// Reused for [`crate::STATE_TTL`] (and only with the same certificate).
async fn session_config(
    inner: &Inner,
    certified: &Arc<crate::Certified>,
    chip_id: &str,
) -> Result<Arc<rustls::ServerConfig>, String> {
    if let Ok(cache) = inner.session_configs.lock()
        && let Some((at, for_cert, config)) = cache.get(chip_id)
        && at.elapsed() < crate::STATE_TTL
        && Arc::ptr_eq(for_cert, certified)
    {
        return Ok(config.clone());
    }
    let keys: Vec<Vec<u8>> = inner
        .vault
        .clone()
        .list_peer_keys(kv::ListPeerKeysRequest {
            peer_chip_id: chip_id.to_owned(),
        })
        .await
        .map_err(|e| e.message().to_owned())?
        .into_inner()
        .keys
        .into_iter()
        .map(|k| k.public_key)
        .collect();
    if keys.is_empty() {
        return Err("no site key learned for this user".to_owned());
    }
    let config = Arc::new(
        chipsite_external_tls::server_config(
            certified.chain.clone(),
            certified.pkcs8.clone(),
            chipsite_external_tls::SiteChainVerifier::expecting(Some(keys)),
        )
        .map_err(|e| e.to_string())?,
    );
    if let Ok(mut cache) = inner.session_configs.lock() {
        if cache.len() >= 10_000 {
            cache.clear();
        }
        cache.insert(
            chip_id.to_owned(),
            (std::time::Instant::now(), certified.clone(), config.clone()),
        );
    }
    Ok(config)
}

/// Who a session's requests come from: the user its initiator named, on
/// the site whose key certified the initiator's chain.
pub(crate) struct Caller {
    pub(crate) chip_id: String,
    pub(crate) site_pin: String,
}

/// A peer session's methods other than `tally.step` (which
/// [`answer_frames`] takes in batches).
fn call(method: &str, params: Value) -> Result<Value, RpcError> {
    match method {
        "ping" => {
            if params.as_object().is_some_and(|o| !o.is_empty()) || params.is_array() {
                return Err(RpcError::new(
                    ErrorCode::InvalidParams,
                    "invalid params: ping takes none",
                ));
            }
            Ok(json!({"pong": true}))
        }
        other => Err(RpcError::new(
            ErrorCode::MethodNotFound,
            format!("method not found: {}", other.chars().take(64).collect::<String>()),
        )),
    }
}

// ------------------------------------------------------------ initiating side

/// A peer session this site opened, acting for one of its users.
pub(crate) struct PeerSession {
    reader: FrameReader<TlsStream<TcpStream>>,
    _counted: crate::SessionCount,
    next_id: u64,
    write_timeout: Duration,
}

/// Open a session to the site of `link`, acting for `link.chip_id`: the
/// other site's chain must be certified by the key learned for the link.
pub(crate) async fn dial(inner: &Inner, link: &link::Model) -> Result<PeerSession, PeerError> {
    if let Some(why) = inner.refuses_peers(false).await? {
        return Err(PeerError::NotNow(format!(
            "this site cannot reach peer sites now: {why}"
        )));
    }
    let Some(certified) = inner.certified.load_full() else {
        return Err(PeerError::NotNow("the peer gateway is not certified yet".into()));
    };
    let config = certified
        .dialing(&link.peer_site_key)
        .map_err(|e| PeerError::Upstream(e.to_string()))?;
    let name = ServerName::try_from(session_name(&link.chip_id))
        .map_err(|_| PeerError::InvalidArgument("a CHIP ID that makes no server name".into()))?;
    let port = u16::try_from(link.peer_port).unwrap_or(0);
    let connect = async {
        let tcp = TcpStream::connect((link.peer_host.as_str(), port))
            .await
            .map_err(|e| PeerError::Unreachable(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| PeerError::Unreachable(format!("TLS with the other site failed: {e}")))
    };
    let tls = tokio::time::timeout(inner.settings.dial_timeout, connect)
        .await
        .map_err(|_| PeerError::Unreachable("no connection within the dial timeout".into()))
        .and_then(|r| r);
    inner.contact(
        &link.peer_site_key,
        match &tls {
            Ok(_) => "ok",
            Err(e) => match e {
                PeerError::Unreachable(why) => why,
                _ => "failed",
            },
        },
    );
    let tls = tls?;
    Ok(PeerSession {
        reader: FrameReader::new(tls, inner.settings.limits),
        _counted: inner.count_session(&link.peer_site_pin, true),
        next_id: 1,
        write_timeout: inner.settings.write_timeout,
    })
}

impl PeerSession {
    /// Send one request and wait for its answer (within `within`).
    pub(crate) async fn call(
        &mut self,
        method: &str,
        params: Value,
        within: Duration,
    ) -> Result<Value, PeerError> {
        self.call_many(method, vec![params], within)
            .await
            .pop()
            .unwrap_or(Err(PeerError::Refused))
    }

    /// Several requests sent at once (one write), their answers read as
    /// they come (the responder answers in order), all within `within`.
    /// A request left unanswered when the session ends gets the reason
    /// (the first of them exactly as [`Self::call`] would say it).
    pub(crate) async fn call_many(
        &mut self,
        method: &str,
        params: Vec<Value>,
        within: Duration,
    ) -> Vec<Result<Value, PeerError>> {
        let n = params.len();
        let first = self.next_id;
        self.next_id += n as u64;
        let frames: Vec<String> = params
            .into_iter()
            .zip(first..)
            .map(|(params, id)| {
                json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string()
            })
            .collect();
        let mut answers: Vec<Option<Result<Value, PeerError>>> = (0..n).map(|_| None).collect();
        let mut failure = match write_frames(self.reader.get_mut(), &frames, self.write_timeout).await {
            Err(e) => Some(PeerError::Unreachable(e.to_string())),
            Ok(()) => {
                let reader = &mut self.reader;
                let answers = &mut answers;
                let read = async move {
                    let mut left = n;
                    while left > 0 {
                        let frame = match reader.next_frame().await {
                            Ok(Some(frame)) => frame,
                            // The handshake's refusal surfaces here in TLS 1.3.
                            Ok(None) | Err(_) => return Err(PeerError::Refused),
                        };
                        match rpc::parse_from_server(&frame) {
                            Ok(Ok(r)) => {
                                let place =
                                    r.id.as_u64()
                                        .and_then(|id| id.checked_sub(first))
                                        .and_then(|k| usize::try_from(k).ok())
                                        .and_then(|k| answers.get_mut(k))
                                        .filter(|a| a.is_none());
                                if let Some(place) = place {
                                    *place = Some(r.outcome.map_err(|e| PeerError::Answered {
                                        code: e.code,
                                        message: e.message.chars().take(300).collect(),
                                    }));
                                    left -= 1;
                                }
                            }
                            Ok(_) => continue,
                            Err(e) => {
                                return Err(PeerError::Upstream(format!(
                                    "a bad answer from the other site: {}",
                                    e.message
                                )));
                            }
                        }
                    }
                    Ok(())
                };
                match tokio::time::timeout(within, read).await {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e),
                    Err(_) => Some(PeerError::Unreachable("no answer in time".into())),
                }
            }
        };
        let why = failure.as_ref().map(|e| e.to_string()).unwrap_or_default();
        answers
            .into_iter()
            .map(|a| {
                a.unwrap_or_else(|| {
                    Err(failure
                        .take()
                        .unwrap_or_else(|| PeerError::Unreachable(why.clone())))
                })
            })
            .collect()
    }

    pub(crate) async fn close(mut self) {
        close(self.reader.get_mut(), self.write_timeout).await;
    }
}
