//! The site's shared domain vocabulary: what several services and clients
//! pass around, given one home and one meaning. It depends on nothing of
//! the site, so clients (the reference app, chipsctl) use it without
//! pulling in a service.

pub mod audit;
pub mod chip_id;
pub mod endpoints;
mod error;
pub mod files;
pub mod operator;
pub mod signed;
pub mod tally;
pub mod ticket;

pub use chip_id::{AccountStatus, BadChipId, ChipId, is_chip_id};
pub use error::{CODE_METADATA, ErrorCode};
pub use ticket::{ParseError, PublishedTicket, TicketKind};

use base64::Engine;
use sha2::{Digest, Sha256};

/// The pin of a public key (SPKI DER): `sha256//<base64 SHA-256>`, as
/// curl's `--pinnedpubkey` takes it. Tickets carry the site key's pin.
pub fn pin_of_spki(spki_der: &[u8]) -> String {
    let digest = Sha256::digest(spki_der);
    format!(
        "sha256//{}",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}
