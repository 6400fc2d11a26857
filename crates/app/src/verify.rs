//! The check a client makes of the site before it sends anything: the
//! gateway's certificate must be signed by the site key the ticket pinned.
//! It lives in `chipsite-external-tls`, shared with the gateways.

pub use chipsite_external_tls::PinnedSiteKey;
