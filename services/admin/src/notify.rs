//! Alarms for users with no open session: e-mail (SMTP to a relay) and/or
//! text (an HTTP webhook of an SMS gateway), per the user's contact data and
//! the site configuration (`alarm.smtp_url`, `alarm.email_from`,
//! `alarm.sms_webhook`).
//!
//! An alarm that no gateway reported delivered within the delivery window
//! is claimed (one conditional UPDATE: exactly one claimant, and never one
//! a gateway delivered) and sent once. If every channel tried failed, the
//! claim is given back and the sweeper retries later; so nothing is lost
//! and nothing is sent twice, short of a crash between sending and
//! recording (then it is not resent: at most once).

use std::{sync::Arc, time::Duration};

use chipsite_store::now_ms;
use http_body_util::Full;
use hyper::body::Bytes;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor, message::header::ContentType};
use serde_json::json;

use crate::{Admin, store::alarm};

/// How long a raised alarm waits for a gateway to report it delivered to an
/// open session before it goes out by e-mail or text.
pub const DELIVERY_WINDOW: Duration = Duration::from_secs(2);
/// How often undelivered alarms are looked for (alarms whose raising
/// replica stopped, or whose sending failed).
pub const SWEEP_EVERY: Duration = Duration::from_secs(15);
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct Notifier {
    admin: Arc<Admin>,
    window: Duration,
}

impl Notifier {
    pub fn new(admin: Arc<Admin>, window: Duration) -> Arc<Self> {
        Arc::new(Self { admin, window })
    }

    /// After the delivery window, send what no session received.
    pub fn after_raise(self: &Arc<Self>, ids: Vec<i64>) {
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(this.window).await;
            if let Err(e) = this.notify_undelivered(Some(&ids)).await {
                tracing::warn!(error = %e, "sending undelivered alarms failed; the sweeper retries");
            }
        });
    }

    /// Look for undelivered alarms every [`SWEEP_EVERY`], for as long as
    /// the returned task runs.
    pub fn spawn_sweeper(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(SWEEP_EVERY).await;
                if let Err(e) = this.notify_undelivered(None).await {
                    tracing::warn!(error = %e, "alarm sweep failed");
                }
            }
        })
    }

    /// Send every alarm (among `ids`, if given) older than the window that
    /// no session received. Returns how many went out.
    pub async fn notify_undelivered(&self, ids: Option<&[i64]>) -> Result<usize, crate::AdminError> {
        let before = now_ms() - i64::try_from(self.window.as_millis()).unwrap_or(0);
        let mut sent = 0;
        for a in self.admin.undelivered_alarms(ids, before).await? {
            if !self.admin.claim_alarm_notification(a.id).await? {
                continue;
            }
            let how = self.send(&a).await;
            if how.is_some() {
                sent += 1;
            }
            self.admin.finish_alarm_notification(a.id, how.as_deref()).await?;
        }
        Ok(sent)
    }

    /// Send one alarm by every channel the user and the site have. `None`
    /// when channels were tried and all failed (retry later).
    async fn send(&self, a: &alarm::Model) -> Option<String> {
        let (user, config) = match (self.admin.user(&a.chip_id).await, self.admin.config().await) {
            (Ok(u), Ok(c)) => (u, c),
            (Err(crate::AdminError::UserNotFound(_)), _) => return Some("none".into()),
            _ => return None,
        };
        let get = |k: &str| config.get(k).cloned().unwrap_or_default();
        let (smtp, from, webhook) = (
            get("alarm.smtp_url"),
            get("alarm.email_from"),
            get("alarm.sms_webhook"),
        );
        let mut tried = false;
        let mut ok = vec![];
        if !user.email.is_empty() && !smtp.is_empty() {
            tried = true;
            match send_email(&smtp, &from, &user.email, a).await {
                Ok(()) => {
                    delivered("email");
                    ok.push("email");
                }
                Err(e) => tracing::warn!(alarm = a.id, error = %e, "alarm e-mail failed"),
            }
        }
        if !user.phone.is_empty() && !webhook.is_empty() {
            tried = true;
            match post_webhook(&webhook, &user.phone, a).await {
                Ok(()) => {
                    delivered("sms");
                    ok.push("sms");
                }
                Err(e) => tracing::warn!(alarm = a.id, error = %e, "alarm text failed"),
            }
        }
        match (tried, ok.is_empty()) {
            (false, _) => Some("none".into()),
            (true, true) => None,
            (true, false) => Some(ok.join("+")),
        }
    }
}

/// `smtp://host:port` → host, port.
pub fn parse_smtp_url(url: &str) -> Option<(String, u16)> {
    let rest = url.strip_prefix("smtp://")?;
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().ok()?),
        None => (rest, 25),
    };
    (!host.is_empty()).then(|| (host.to_owned(), port))
}

async fn send_email(smtp: &str, from: &str, to: &str, a: &alarm::Model) -> Result<(), String> {
    let (host, port) = parse_smtp_url(smtp).ok_or("alarm.smtp_url is not smtp://host:port")?;
    let message = Message::builder()
        .from(from.parse().map_err(|e| format!("alarm.email_from: {e}"))?)
        .to(to.parse().map_err(|e| format!("user e-mail: {e}"))?)
        .subject(format!("chipsite alarm: {}", a.kind))
        .header(ContentType::TEXT_PLAIN)
        .body(format!(
            "{}\n\nOpen your chipsite app to see your status.\n(alarm {} for {})\n",
            a.text, a.id, a.chip_id
        ))
        .map_err(|e| e.to_string())?;
    // Plain SMTP to a relay (a local MTA or sidecar), which carries it on.
    let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
        .port(port)
        .timeout(Some(SEND_TIMEOUT))
        .build();
    transport
        .send(message)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

async fn post_webhook(url: &str, phone: &str, a: &alarm::Model) -> Result<(), String> {
    let uri: hyper::Uri = url.parse().map_err(|_| "alarm.sms_webhook is not a URL")?;
    if uri.scheme_str() != Some("http") {
        return Err(
            "alarm.sms_webhook must be an http:// URL (put a relay in front of an https gateway)".into(),
        );
    }
    let host = uri.host().ok_or("alarm.sms_webhook has no host")?.to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let body = json!({"to": phone, "text": a.text, "chip_id": a.chip_id, "alarm_id": a.id, "kind": a.kind})
        .to_string();
    let work = async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let request = hyper::Request::post(uri.clone())
            .header(
                hyper::header::HOST,
                uri.authority().map_or(host.clone(), |a| a.to_string()),
            )
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
        // The status says it all; the body is not read (a gateway that
        // answers with an endless one cannot hold the sender or its memory).
        let status = response.status();
        drop(response);
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("the SMS gateway answered {status}"))
        }
    };
    tokio::time::timeout(SEND_TIMEOUT, work)
        .await
        .map_err(|_| "the SMS gateway did not answer in time".to_owned())?
}

/// Count one alarm delivered through `channel` (`chipsite_alarm_deliveries_total`).
pub(crate) fn delivered(channel: &'static str) {
    use chipsite_telemetry::metrics::{ChannelLabels, metrics};
    metrics()
        .alarm_deliveries
        .get_or_create(&ChannelLabels { channel })
        .inc();
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An SMS gateway that answers 200 and then a body without end: the
    /// delivery is done at the status line, nothing of the body is kept.
    #[tokio::test]
    async fn a_webhook_answer_with_an_endless_body_is_not_read() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut c, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 4096];
            let _ = c.read(&mut request).await;
            let _ = c
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000000\r\n\r\n")
                .await;
            let chunk = vec![b'x'; 64 * 1024];
            while c.write_all(&chunk).await.is_ok() {}
        });
        let alarm = alarm::Model {
            id: 1,
            chip_id: "alice".into(),
            kind: "notice".into(),
            text: "hello".into(),
            created_at_ms: 0,
            acked_at_ms: 0,
            delivered_at_ms: 0,
            notified_at_ms: 0,
            delivered_by: String::new(),
        };
        post_webhook(&format!("http://{addr}/sms"), "+15550100", &alarm)
            .await
            .unwrap();
    }
}
