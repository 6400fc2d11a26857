//! Property tests for what faces the network: the frame reader and the
//! JSON-RPC parser take anything without panicking and keep their limits.

#![allow(clippy::unwrap_used)]

use std::{
    collections::VecDeque,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use chipsite_wire::{FrameError, FrameReader, Limits, rpc, rpc::ErrorCode};
use proptest::prelude::*;
use tokio::io::{AsyncRead, ReadBuf};

/// A stream that delivers the given chunks, one per read.
struct Chunks(VecDeque<Vec<u8>>);

impl AsyncRead for Chunks {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(mut chunk) = self.0.pop_front() {
            let n = chunk.len().min(buf.remaining());
            buf.put_slice(&chunk[..n]);
            if n < chunk.len() {
                self.0.push_front(chunk.split_off(n));
            }
        }
        Poll::Ready(Ok(()))
    }
}

fn chunked(data: &[u8], cuts: &[usize]) -> Chunks {
    let mut chunks = VecDeque::new();
    let mut rest = data;
    for &c in cuts {
        if rest.is_empty() {
            break;
        }
        let (head, tail) = rest.split_at(c.min(rest.len()).max(1));
        chunks.push_back(head.to_vec());
        rest = tail;
    }
    if !rest.is_empty() {
        chunks.push_back(rest.to_vec());
    }
    Chunks(chunks)
}

const LIMITS: Limits = Limits {
    max_frame: 256,
    idle: Duration::from_secs(5),
    frame: Duration::from_secs(5),
};

async fn all_frames(reader: &mut FrameReader<Chunks>) -> (Vec<String>, Option<FrameError>) {
    let mut frames = vec![];
    loop {
        match reader.next_frame().await {
            Ok(Some(f)) => frames.push(f),
            Ok(None) => return (frames, None),
            Err(e) => return (frames, Some(e)),
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #[test]
    fn any_bytes_any_chunking_never_break_the_limits(data in proptest::collection::vec(any::<u8>(), 0..2000),
                                                      cuts in proptest::collection::vec(1usize..300, 0..20)) {
        let (frames, _) = runtime().block_on(all_frames(&mut FrameReader::new(chunked(&data, &cuts), LIMITS)));
        for f in frames {
            prop_assert!(f.len() <= LIMITS.max_frame);
            prop_assert!(!f.contains('\n'));
        }
    }

    #[test]
    fn lines_come_back_exactly_however_they_are_split(lines in proptest::collection::vec("[^\r\n]{0,200}", 1..10),
                                                        cuts in proptest::collection::vec(1usize..64, 0..40),
                                                        crlf in any::<bool>()) {
        let end = if crlf { "\r\n" } else { "\n" };
        let data: String = lines.iter().map(|l| format!("{l}{end}")).collect();
        let (frames, error) = runtime().block_on(all_frames(&mut FrameReader::new(chunked(data.as_bytes(), &cuts), LIMITS)));
        let fitting: Vec<&String> = lines.iter().take_while(|l| l.len() <= LIMITS.max_frame).collect();
        prop_assert_eq!(frames.iter().collect::<Vec<_>>(), fitting.clone());
        prop_assert_eq!(error.is_some(), fitting.len() < lines.len());
    }

    #[test]
    fn any_text_is_a_message_or_an_error_response(s in "\\PC{0,200}") {
        let is_json = serde_json::from_str::<serde_json::Value>(&s).is_ok();
        match rpc::parse(&s) {
            Ok(rpc::Incoming::Request(r)) => {
                prop_assert!(is_json);
                prop_assert_eq!(rpc::parse(&r.to_frame()).unwrap(), rpc::Incoming::Request(r));
            }
            Ok(rpc::Incoming::Notification(_)) => prop_assert!(is_json),
            Err(response) => {
                let echoed: serde_json::Value = serde_json::from_str(&response.to_frame()).unwrap();
                prop_assert_eq!(&echoed["jsonrpc"], "2.0");
                // Not JSON: a parse error; JSON but not a request: an invalid request.
                let expected = if is_json { ErrorCode::InvalidRequest } else { ErrorCode::ParseError };
                prop_assert_eq!(echoed["error"]["code"].as_i64(), Some(expected.code()));
            }
        }
        match rpc::parse_from_server(&s) {
            Ok(_) => prop_assert!(is_json),
            Err(e) => prop_assert_eq!(e.code, ErrorCode::ParseError.code()),
        }
    }

    #[test]
    fn json_shaped_noise_never_panics(v in prop_oneof![
        Just(serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "status"})),
        Just(serde_json::json!([1, 2])),
        Just(serde_json::Value::Null)],
        key in "[a-z]{1,8}", val in prop_oneof![any::<i64>().prop_map(serde_json::Value::from), "\\PC{0,20}".prop_map(serde_json::Value::from), Just(serde_json::Value::Bool(true))]) {
        let mut v = v;
        let is_object = v.is_object();
        let known = ["jsonrpc", "id", "method", "params"].contains(&key.as_str());
        if let Some(m) = v.as_object_mut() { m.insert(key, val); }
        let frame = v.to_string();
        match rpc::parse(&frame) {
            // Only a request object whose added member is one of its own can still be valid.
            Ok(_) => prop_assert!(is_object && known, "{frame}"),
            Err(response) => prop_assert_eq!(
                response.outcome.map_err(|e| e.code),
                Err(ErrorCode::InvalidRequest.code()),
                "{}", frame
            ),
        }
        if let Err(e) = rpc::parse_from_server(&frame) {
            prop_assert_eq!(e.code, ErrorCode::ParseError.code());
        }
    }
}
