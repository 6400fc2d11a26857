//! Published tickets: their home is the shared domain crate
//! (`chipsite_model::ticket`), so that clients read them without this service.

pub use chipsite_model::ticket::{ParseError, PublishedTicket};
