//! Published tickets: what a user or peer site receives, as JSON, as a
//! compact URI (for QR codes), and as a QR code (terminal or SVG).
//!
//! A user connection ticket publishes where to connect, the token and the
//! site public key; never its expiry or CHIP ID (the site keeps those). A
//! tally ticket also names the user (CHIP ID) and its expiry, as the seed says.
//!
//! URI forms (every value is URL-safe as issued, so nothing is escaped):
//! `chipsite:user?h=<host>&p=<port>&t=<token>&k=<site key>` and
//! `chipsite:tally?c=<chip id>&h=<host>&p=<port>&t=<token>&k=<site key>&e=<expiry, unix s>`,
//! where the site key is the base64url (unpadded) SPKI DER.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};

use crate::{is_chip_id, pin_of_spki};

/// The CHIP ID field of console sign-in tickets (they name no user).
pub const CONSOLE_SUBJECT: &str = "console";

/// What a ticket is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TicketKind {
    /// A user's connection ticket: enroll an app key.
    User,
    /// A tally ticket: a user on another site opens a tally with the issuer.
    Tally,
    /// An operator's one-time sign-in to the admin web console.
    Console,
}

impl TicketKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Tally => "tally",
            Self::Console => "console",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "user" => Some(Self::User),
            "tally" => Some(Self::Tally),
            "console" => Some(Self::Console),
            _ => None,
        }
    }
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedTicket {
    /// "user" or "tally".
    pub kind: String,
    /// Tally tickets only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chip_id: Option<String>,
    pub host: String,
    pub port: u16,
    pub token: String,
    /// base64url SPKI DER of the site public key.
    pub site_key: String,
    /// `sha256//<base64 SHA-256 of the SPKI>`, as curl's --pinnedpubkey takes it.
    /// Optional in JSON (docs/protocol.md section 6): computed from the key
    /// when absent, checked against it when present.
    #[serde(default)]
    pub pin: String,
    /// Tally tickets only: unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<i64>,
}

impl std::fmt::Debug for PublishedTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublishedTicket")
            .field("kind", &self.kind)
            .field("chip_id", &self.chip_id)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("token", &"<redacted>")
            .field("pin", &self.pin)
            .field("expires", &self.expires)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("not a chipsite ticket URI")]
    Scheme,
    #[error("ticket field {0:?} is missing")]
    Missing(&'static str),
    #[error("ticket field {0:?} is malformed")]
    Malformed(&'static str),
    #[error("ticket JSON: {0}")]
    Json(String),
}

impl PublishedTicket {
    pub fn new(
        kind: TicketKind,
        chip_id: &str,
        host: &str,
        port: u16,
        token: &str,
        site_key_spki: &[u8],
        expires_at_ms: i64,
    ) -> Self {
        let tally = kind == TicketKind::Tally;
        Self {
            kind: kind.as_str().to_owned(),
            chip_id: tally.then(|| chip_id.to_owned()),
            host: host.to_owned(),
            port,
            token: token.to_owned(),
            site_key: URL_SAFE_NO_PAD.encode(site_key_spki),
            pin: pin_of_spki(site_key_spki),
            expires: tally.then_some(expires_at_ms / 1000),
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    pub fn from_json(s: &str) -> Result<Self, ParseError> {
        let mut t: Self = serde_json::from_str(s).map_err(|e| ParseError::Json(e.to_string()))?;
        if t.pin.is_empty()
            && let Ok(spki) = URL_SAFE_NO_PAD.decode(&t.site_key)
        {
            t.pin = pin_of_spki(&spki);
        }
        t.validate()?;
        Ok(t)
    }

    pub fn to_uri(&self) -> String {
        match (&self.chip_id, self.expires) {
            (Some(c), Some(e)) if self.kind == "tally" => format!(
                "chipsite:tally?c={c}&h={}&p={}&t={}&k={}&e={e}",
                self.host, self.port, self.token, self.site_key
            ),
            _ => format!(
                "chipsite:user?h={}&p={}&t={}&k={}",
                self.host, self.port, self.token, self.site_key
            ),
        }
    }

    pub fn from_uri(uri: &str) -> Result<Self, ParseError> {
        if uri.len() > 4096 {
            return Err(ParseError::Malformed("uri"));
        }
        let rest = uri.strip_prefix("chipsite:").ok_or(ParseError::Scheme)?;
        let (kind, query) = rest.split_once('?').ok_or(ParseError::Scheme)?;
        let kind = TicketKind::parse(kind).ok_or(ParseError::Scheme)?;
        let field = |name: &'static str| -> Result<String, ParseError> {
            let mut found = query
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .filter(|(k, _)| *k == name);
            let (_, v) = found.next().ok_or(ParseError::Missing(name))?;
            if found.next().is_some() {
                return Err(ParseError::Malformed(name));
            }
            Ok(v.to_owned())
        };
        let host = field("h")?;
        let port = field("p")?.parse().map_err(|_| ParseError::Malformed("port"))?;
        let token = field("t")?;
        let site_key = field("k")?;
        let (chip_id, expires) = match kind {
            TicketKind::Tally => (
                Some(field("c")?),
                Some(
                    field("e")?
                        .parse()
                        .map_err(|_| ParseError::Malformed("expires"))?,
                ),
            ),
            TicketKind::User => (None, None),
            TicketKind::Console => return Err(ParseError::Scheme),
        };
        let spki = URL_SAFE_NO_PAD
            .decode(&site_key)
            .map_err(|_| ParseError::Malformed("site_key"))?;
        let t = Self {
            kind: kind.as_str().to_owned(),
            chip_id,
            host,
            port,
            token,
            pin: pin_of_spki(&spki),
            site_key,
            expires,
        };
        t.validate()?;
        Ok(t)
    }

    /// Check every field's shape, and that the pin matches the site key.
    pub fn validate(&self) -> Result<(), ParseError> {
        let kind = TicketKind::parse(&self.kind)
            .filter(|k| *k != TicketKind::Console)
            .ok_or(ParseError::Malformed("kind"))?;
        let hostlike = |s: &str| {
            !s.is_empty()
                && s.len() <= 255
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c))
        };
        if !hostlike(&self.host) {
            return Err(ParseError::Malformed("host"));
        }
        if self.port == 0 {
            return Err(ParseError::Malformed("port"));
        }
        let b64 = |s: &str| !s.is_empty() && s.len() <= 512 && URL_SAFE_NO_PAD.decode(s).is_ok();
        if !b64(&self.token) {
            return Err(ParseError::Malformed("token"));
        }
        let spki = URL_SAFE_NO_PAD
            .decode(&self.site_key)
            .map_err(|_| ParseError::Malformed("site_key"))?;
        if spki.is_empty() || spki.len() > 512 {
            return Err(ParseError::Malformed("site_key"));
        }
        if self.pin != pin_of_spki(&spki) {
            return Err(ParseError::Malformed("pin"));
        }
        if kind == TicketKind::Tally {
            let chip = self.chip_id.as_deref().ok_or(ParseError::Missing("chip_id"))?;
            if !is_chip_id(chip) {
                return Err(ParseError::Malformed("chip_id"));
            }
            self.expires.ok_or(ParseError::Missing("expires"))?;
        }
        Ok(())
    }

    /// The URI as a QR code drawn with Unicode half blocks, for a terminal.
    pub fn qr_terminal(&self) -> Option<String> {
        qr_terminal(&self.to_uri())
    }

    /// The URI as a QR code in SVG.
    pub fn qr_svg(&self) -> Option<String> {
        qr_svg(&self.to_uri())
    }
}

/// A published ticket's URI (as the site issues it) as a QR code drawn with
/// Unicode half blocks, for a terminal; `None` if it is too long for one.
pub fn qr_terminal(uri: &str) -> Option<String> {
    let code = qrcode::QrCode::new(uri.as_bytes()).ok()?;
    Some(
        code.render::<qrcode::render::unicode::Dense1x2>()
            .dark_color(qrcode::render::unicode::Dense1x2::Light)
            .light_color(qrcode::render::unicode::Dense1x2::Dark)
            .quiet_zone(true)
            .build(),
    )
}

/// A published ticket's URI as a QR code in SVG.
pub fn qr_svg(uri: &str) -> Option<String> {
    let code = qrcode::QrCode::new(uri.as_bytes()).ok()?;
    Some(
        code.render::<qrcode::render::svg::Color<'_>>()
            .min_dimensions(320, 320)
            .quiet_zone(true)
            .build(),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sample(kind: TicketKind) -> PublishedTicket {
        PublishedTicket::new(
            kind,
            "alice",
            "127.0.0.1",
            4443,
            "dG9rZW4tdG9rZW4",
            &[48, 89, 1, 2, 3],
            1_800_000_000_000,
        )
    }

    #[test]
    fn uri_and_json_round_trip() {
        for kind in [TicketKind::User, TicketKind::Tally] {
            let t = sample(kind);
            assert_eq!(PublishedTicket::from_uri(&t.to_uri()), Ok(t.clone()));
            assert_eq!(PublishedTicket::from_json(&t.to_json()), Ok(t.clone()));
        }
        assert!(
            !sample(TicketKind::User).to_json().contains("alice"),
            "user tickets do not publish the CHIP ID"
        );
        assert!(
            !sample(TicketKind::User).to_json().contains("expires"),
            "user tickets do not publish the expiry"
        );
    }

    #[test]
    fn bad_uris_are_errors_not_panics() {
        for bad in [
            "",
            "chipsite:",
            "chipsite:user",
            "chipsite:user?",
            "chipsite:user?h=x&p=99999&t=a&k=b",
            "chipsite:user?h=x&p=1&t=a&k=!!",
            "chipsite:tally?h=x&p=1&t=a&k=MFkB",
            "http://example",
            "chipsite:user?h=<script>&p=1&t=a&k=MFkB",
        ] {
            assert!(PublishedTicket::from_uri(bad).is_err(), "{bad}");
        }
        let mut t = sample(TicketKind::User);
        t.pin = "sha256//AAAA".into();
        assert_eq!(
            PublishedTicket::from_json(&t.to_json()),
            Err(ParseError::Malformed("pin"))
        );
    }

    #[test]
    fn the_json_pin_is_optional_and_checked_when_present() {
        let t = sample(TicketKind::User);
        let mut v: serde_json::Value = serde_json::from_str(&t.to_json()).unwrap();
        v.as_object_mut().unwrap().remove("pin");
        assert_eq!(PublishedTicket::from_json(&v.to_string()), Ok(t.clone()));
        v["pin"] = "sha256//AAAA".into();
        assert_eq!(
            PublishedTicket::from_json(&v.to_string()),
            Err(ParseError::Malformed("pin"))
        );
    }

    #[test]
    fn qr_codes_render() {
        let t = sample(TicketKind::User);
        assert!(t.qr_svg().is_some_and(|s| s.contains("<svg")));
        assert!(t.qr_terminal().is_some_and(|s| s.lines().count() > 10));
    }
}
