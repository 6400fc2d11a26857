//! The site's shared domain vocabulary: what several services and clients
//! pass around, given one home and one meaning. It depends on nothing of
//! the site, so clients (the reference app, chipsctl) can use it without
//! pulling in a service.

mod error;

pub use error::{CODE_METADATA, ErrorCode};
