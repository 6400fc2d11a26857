//! A client of the user gateway, as a mobile app would be (see
//! `docs/protocol.md`): enroll a key with a user ticket, then open mutual-TLS
//! sessions, call methods and receive alarms. The tests and the `chipapp`
//! CLI are built on it.

mod key;
mod session;
mod tally;
mod verify;

pub use key::AppKey;
pub use session::{AppState, Dial, Session, enroll, enroll_from, enroll_with};
pub use tally::new_tally_id;
pub use verify::PinnedSiteKey;

/// What can go wrong for a client.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot connect to {addr}: {message}")]
    Connect { addr: String, message: String },
    /// The TLS handshake failed; a wrong site key (a man in the middle)
    /// ends here, before anything is sent.
    #[error("TLS handshake with {addr} failed: {message}")]
    Handshake { addr: String, message: String },
    /// The site closed the enrollment without a word: the ticket was not
    /// valid for this CHIP ID (or the site or user is locked down). The
    /// ticket is used up either way.
    #[error("the site refused the enrollment (the ticket is used up; ask for a new one)")]
    Refused,
    /// The site answered a call with a JSON-RPC error.
    #[error("{message} (code {code})")]
    Rpc { code: i64, message: String },
    /// The session ended (the site closed it, or the connection broke).
    #[error("the session ended: {0}")]
    Closed(String),
    #[error("bad message from the site: {0}")]
    Protocol(String),
    #[error("ticket: {0}")]
    Ticket(String),
    #[error("key: {0}")]
    Key(String),
    #[error("timed out waiting for the site")]
    Timeout,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl AppError {
    /// The JSON-RPC error code, when the site answered with one.
    pub fn rpc_code(&self) -> Option<i64> {
        match self {
            Self::Rpc { code, .. } => Some(*code),
            _ => None,
        }
    }
}
