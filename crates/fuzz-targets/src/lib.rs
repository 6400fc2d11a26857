//! The fuzz targets, as plain functions: `fuzz/` (cargo-fuzz, libFuzzer)
//! calls them with generated inputs, and `tests/fuzz_corpus.rs` replays the
//! seed corpora in `fuzz/corpus/<target>/` through them on every CI run.
//! Each must return, whatever the bytes: a panic is a finding.

use std::{sync::OnceLock, time::Duration};

use chipsite_wire::{FrameReader, Limits, rpc};

/// One fuzz target: any bytes in, nothing out; a panic is a finding.
pub type Target = fn(&[u8]);

/// Every target by name, as `fuzz/fuzz_targets/<name>.rs` and
/// `fuzz/corpus/<name>/` call it.
pub const TARGETS: [(&str, Target); 9] = [
    ("frames", frames),
    ("jsonrpc", jsonrpc),
    ("ticket", ticket),
    ("user_dump", user_dump),
    ("app_certificate", app_certificate),
    ("console_form", console_form),
    ("peer_chain", peer_chain),
    ("session_name", session_name),
    ("signed", signed),
];

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap_or_else(|e| panic!("a runtime for the frame target: {e}"))
    })
}

/// The frame reader (sessions and enrollments read with it) over the bytes
/// as they arrive, with a small frame limit; then each frame as JSON-RPC.
pub fn frames(data: &[u8]) {
    let limits = Limits {
        max_frame: 256,
        idle: Duration::from_secs(1),
        frame: Duration::from_secs(1),
    };
    runtime().block_on(async {
        let mut reader = FrameReader::new(data, limits);
        while let Ok(Some(frame)) = reader.next_frame().await {
            let _ = rpc::parse(&frame);
        }
    });
}

/// A frame's text as a request (server side) and as an answer (client side).
pub fn jsonrpc(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(rpc::Incoming::Request(r)) = rpc::parse(&text) {
        // What the server echoes must be a frame it could read back.
        let reply = rpc::Response::result(r.id, r.params).to_frame();
        assert!(rpc::parse_from_server(&reply).is_ok(), "{reply}");
    }
    let _ = rpc::parse_from_server(&text);
}

/// Published tickets: URI and JSON; whatever parses renders and parses back
/// to the same ticket.
pub fn ticket(data: &[u8]) {
    use chipsite_model::PublishedTicket;
    let text = String::from_utf8_lossy(data);
    if let Ok(t) = PublishedTicket::from_uri(&text) {
        let again = PublishedTicket::from_uri(&t.to_uri());
        assert_eq!(again.as_ref().ok(), Some(&t), "URI round trip");
    }
    if let Ok(t) = PublishedTicket::from_json(&text) {
        let again = PublishedTicket::from_json(&t.to_json());
        assert_eq!(again.as_ref().ok(), Some(&t), "JSON round trip");
    }
}

/// A user dump, as `chipsctl user load` and the console's upload read it.
pub fn user_dump(data: &[u8]) {
    let _ = chipsite_admin::Admin::parse_dump(&String::from_utf8_lossy(data));
}

/// A session's client certificate (DER), as the gateway reads it.
pub fn app_certificate(data: &[u8]) {
    let _ = chipsite_external_tls::ClaimedIdentity::parse(data);
}

/// The console's forms and query strings: the first byte picks which.
pub fn console_form(data: &[u8]) {
    if let Some((which, body)) = data.split_first() {
        chipsite_console::decode_form_for_fuzzing(*which, body);
    }
}

/// A peer site's client chain (DER certificates), as the peer gateway
/// checks it: the first two bytes (big-endian) are the first
/// certificate's length, the rest the two certificates.
pub fn peer_chain(data: &[u8]) {
    use rustls::pki_types::{CertificateDer, UnixTime};
    if let [hi, lo, rest @ ..] = data {
        let at = usize::from(u16::from_be_bytes([*hi, *lo])).min(rest.len());
        let (leaf, site) = rest.split_at(at);
        let chain = [CertificateDer::from(leaf), CertificateDer::from(site)];
        let _ = chipsite_external_tls::site_key_of_chain(&chain, UnixTime::now());
    }
}

/// A peer session's server name: whatever names a user names it the one
/// way (docs/protocol.md section 14.3).
pub fn session_name(data: &[u8]) {
    use chipsite_model::chip_id::{chip_id_of_session_name, session_name};
    let text = String::from_utf8_lossy(data);
    if let Some(chip_id) = chip_id_of_session_name(&text) {
        assert_eq!(session_name(&chip_id), text.to_ascii_lowercase(), "round trip");
    }
}

/// A document to sign: its canonical form is canonical again once parsed,
/// and a signature check never panics.
pub fn signed(data: &[u8]) {
    use chipsite_model::signed;
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    if let Ok(bytes) = signed::canonical(&doc) {
        let again: serde_json::Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("the canonical form does not parse: {e}"));
        assert_eq!(signed::canonical(&again).ok(), Some(bytes), "canonical twice");
    }
    let text = String::from_utf8_lossy(data);
    let _ = signed::verify(&doc, &text, data);
}
