//! Property tests for the published-ticket parsers: whatever arrives (a
//! scanned QR code, a pasted URI, a JSON file), the answer is a ticket or an
//! error, never a panic; and every ticket we publish reads back as itself.

#![allow(clippy::unwrap_used)]

use chipsite_model::{
    TicketKind as Kind,
    ticket::{ParseError, PublishedTicket},
};
use proptest::prelude::*;

fn ticket() -> impl Strategy<Value = PublishedTicket> {
    (
        prop_oneof![Just(Kind::User), Just(Kind::Tally)],
        "[a-z0-9][a-z0-9._-]{0,20}",
        prop_oneof![
            "[a-z0-9.-]{1,30}",
            "127\\.0\\.0\\.[0-9]{1,3}",
            Just("[::1]".to_owned())
        ],
        1u16..,
        proptest::collection::vec(any::<u8>(), 16..48),
        proptest::collection::vec(any::<u8>(), 1..120),
        0i64..4_000_000_000_000,
    )
        .prop_map(|(kind, chip, host, port, token, key, expires)| {
            use base64::Engine;
            let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token);
            PublishedTicket::new(kind, &chip, &host, port, &token, &key, expires)
        })
}

proptest! {
    #[test]
    fn published_tickets_read_back_as_themselves(t in ticket()) {
        prop_assert_eq!(PublishedTicket::from_uri(&t.to_uri()).unwrap(), t.clone());
        prop_assert_eq!(PublishedTicket::from_json(&t.to_json()).unwrap(), t);
    }

    #[test]
    fn any_string_is_a_ticket_or_an_error(s in "\\PC{0,300}") {
        // Whatever parses is a whole, consistent ticket that reads back as
        // itself; anything else is refused with the reason's kind.
        match PublishedTicket::from_uri(&s) {
            Ok(t) => {
                prop_assert!(t.validate().is_ok());
                prop_assert_eq!(PublishedTicket::from_uri(&t.to_uri()).unwrap(), t);
            }
            Err(e) => prop_assert!(!matches!(e, ParseError::Json(_)), "a URI is never judged as JSON: {e}"),
        }
        match PublishedTicket::from_json(&s) {
            Ok(t) => {
                prop_assert!(t.validate().is_ok());
                prop_assert_eq!(PublishedTicket::from_json(&t.to_json()).unwrap(), t);
            }
            Err(e) => prop_assert!(!matches!(e, ParseError::Scheme), "JSON has no scheme: {e}"),
        }
    }

    #[test]
    fn mutated_uris_never_panic(t in ticket(), at in any::<prop::sample::Index>(), junk in "\\PC{0,8}", cut in any::<bool>()) {
        let uri = t.to_uri();
        let mut i = at.index(uri.len() + 1);
        while !uri.is_char_boundary(i) { i -= 1; }
        let mutated = if cut { uri[..i].to_owned() } else { format!("{}{}{}", &uri[..i], junk, &uri[i..]) };
        if let Ok(parsed) = PublishedTicket::from_uri(&mutated) {
            // Whatever parses is internally consistent: the pin matches the key.
            prop_assert!(parsed.validate().is_ok());
        }
    }

    #[test]
    fn mutated_json_never_panics(t in ticket(), key in "[a-z_]{1,10}", value in prop_oneof![
        Just(serde_json::Value::Null), any::<i64>().prop_map(serde_json::Value::from),
        "\\PC{0,40}".prop_map(serde_json::Value::from), Just(serde_json::json!([1, {"a": []}]))]) {
        let mut v: serde_json::Value = serde_json::from_str(&t.to_json()).unwrap();
        v[key.as_str()] = value;
        if let Ok(parsed) = PublishedTicket::from_json(&v.to_string()) {
            prop_assert!(parsed.validate().is_ok());
        }
    }
}
