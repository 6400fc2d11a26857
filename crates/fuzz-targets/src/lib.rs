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
pub const TARGETS: [(&str, Target); 6] = [
    ("frames", frames),
    ("jsonrpc", jsonrpc),
    ("ticket", ticket),
    ("user_dump", user_dump),
    ("app_certificate", app_certificate),
    ("console_form", console_form),
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
