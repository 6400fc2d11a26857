//! The external protocol that mobile apps and peer sites speak to the
//! gateways (see `docs/protocol.md`): one UTF-8 JSON object per line over
//! TLS 1.3, shaped as JSON-RPC 2.0.
//!
//! * [`frame`]: reading lines with a hard size limit and timeouts, so a
//!   hostile peer can neither exhaust memory nor hold a connection forever.
//! * [`rpc`]: requests, responses, notifications and the error codes.

pub mod frame;
pub mod rpc;

pub use frame::{FrameError, FrameReader, Limits, close, write_frame, write_frames};
pub use rpc::{ErrorCode, Incoming, Notification, Request, Response, RpcError};
