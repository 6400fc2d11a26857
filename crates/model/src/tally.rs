//! Tally steps: the documents users sign to offer, accept, reject and close
//! a tally with a user on another site (docs/protocol.md section 14.5).
//!
//! A step travels as an envelope `{"doc": {...}, "sig": "...",
//! "signer_key": "..."}`: the document, the signer's signature over its
//! RFC 8785 canonical form ([`crate::signed`]) and the signer's public key
//! (base64url SPKI DER). Steps are numbered per tally: the offer is 1, the
//! answer (accept or reject) 2, a close 3; each later step names the hash
//! of the one before (`prev`), so a site cannot slip in or swap a step.
//! Everything here is pure: parsing, checking the signature and the
//! shape, and building documents for the app to sign.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::signed::{self, SignedError};

/// The largest step envelope a site accepts, in bytes of JSON.
pub const MAX_STEP_BYTES: usize = 8192;
/// The largest `terms` object, in bytes of its canonical form.
pub const MAX_TERMS_BYTES: usize = 4096;

/// What a step does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Offer,
    Accept,
    Reject,
    Close,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Offer, Kind::Accept, Kind::Reject, Kind::Close];

    /// `offer`, `accept`, `reject`, `close`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Offer => "offer",
            Self::Accept => "accept",
            Self::Reject => "reject",
            Self::Close => "close",
        }
    }

    /// The document's `type`: `tally.offer` and so on.
    pub fn doc_type(self) -> &'static str {
        match self {
            Self::Offer => "tally.offer",
            Self::Accept => "tally.accept",
            Self::Reject => "tally.reject",
            Self::Close => "tally.close",
        }
    }

    /// The step's number in its tally.
    pub fn seq(self) -> u32 {
        match self {
            Self::Offer => 1,
            Self::Accept | Self::Reject => 2,
            Self::Close => 3,
        }
    }

    /// The state a tally is in after this step.
    pub fn state_after(self) -> &'static str {
        match self {
            Self::Offer => "offered",
            Self::Accept => "open",
            Self::Reject => "rejected",
            Self::Close => "closed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    fn of_doc_type(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.doc_type() == s)
    }
}

/// One side of a tally: a user and the pin of their site's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Party {
    pub chip_id: String,
    pub site: String,
}

impl Party {
    fn to_json(&self) -> Value {
        json!({"chip_id": self.chip_id, "site": self.site})
    }
}

/// A checked step: the document's fields, its canonical form and hash,
/// the signature and the signer's key. Only [`parse_step`] makes one, and
/// only when the signature holds.
#[derive(Debug, Clone)]
pub struct Step {
    pub kind: Kind,
    pub tally: String,
    pub seq: u32,
    pub from: Party,
    pub to: Party,
    /// The hash of the step before (none for the offer).
    pub prev: Option<String>,
    /// The offer's terms, canonical JSON (none for other steps).
    pub terms: Option<String>,
    pub at_ms: i64,
    /// The document in canonical form.
    pub canonical: String,
    /// base64url SHA-256 of [`Self::canonical`].
    pub hash: String,
    pub sig: String,
    pub signer_key: Vec<u8>,
}

impl Step {
    /// The idempotency key of this step: `<from.site>/<tally>/<seq>`.
    pub fn idempotency_key(&self) -> String {
        idempotency_key(&self.from.site, &self.tally, self.seq)
    }

    /// The envelope as it travels (canonical document, signature, key).
    pub fn envelope(&self) -> Value {
        let doc: Value = serde_json::from_str(&self.canonical).unwrap_or(Value::Null);
        envelope(&doc, &self.sig, &self.signer_key)
    }
}

/// `<sending site pin>/<tally id>/<seq>`.
pub fn idempotency_key(site: &str, tally: &str, seq: u32) -> String {
    format!("{site}/{tally}/{seq}")
}

/// Why a step is refused. Every message is safe to show the sender.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    #[error("the step is not valid: {0}")]
    Malformed(String),
    #[error("the step's signature: {0}")]
    Signature(#[from] SignedError),
}

fn bad(why: impl Into<String>) -> StepError {
    StepError::Malformed(why.into())
}

/// base64url (no padding) of the SHA-256 of `bytes`.
pub fn hash_of(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(bytes))
}

/// Whether `s` is a tally id: `tly_` and 1 to 60 of `A-Z a-z 0-9 _ -`.
pub fn is_tally_id(s: &str) -> bool {
    s.strip_prefix("tly_").is_some_and(|rest| {
        (1..=60).contains(&rest.len())
            && rest
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    })
}

/// Whether `s` is a key pin as tickets carry it: `sha256//` and the
/// standard base64 of 32 bytes.
pub fn is_pin(s: &str) -> bool {
    s.strip_prefix("sha256//").is_some_and(|b64| {
        b64.len() == 44
            && base64::engine::general_purpose::STANDARD
                .decode(b64)
                .is_ok_and(|d| d.len() == 32)
    })
}

/// Parse an envelope, check its document's shape and its signature against
/// the key it names. What the key stands for (the local user's registered
/// key, or the key a peer site vouches for) is the caller's to check.
pub fn parse_step(text: &str) -> Result<Step, StepError> {
    if text.len() > MAX_STEP_BYTES {
        return Err(bad(format!("a step is at most {MAX_STEP_BYTES} bytes")));
    }
    let value: Value = serde_json::from_str(text).map_err(|_| bad("a step is a JSON object"))?;
    parse_envelope(&value)
}

/// [`parse_step`] of a value already parsed.
pub fn parse_envelope(value: &Value) -> Result<Step, StepError> {
    let env = value.as_object().ok_or_else(|| bad("a step is a JSON object"))?;
    only(env, &["doc", "sig", "signer_key"], &[], "the step")?;
    let doc = env.get("doc").ok_or_else(|| bad("the step has no doc"))?;
    let sig = env
        .get("sig")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("sig must be a string"))?;
    let signer_key = env
        .get("signer_key")
        .and_then(Value::as_str)
        .and_then(|k| URL_SAFE_NO_PAD.decode(k).ok())
        .ok_or_else(|| bad("signer_key must be base64url (no padding) of an SPKI"))?;
    let d = doc.as_object().ok_or_else(|| bad("doc must be an object"))?;
    let kind = d
        .get("type")
        .and_then(Value::as_str)
        .and_then(Kind::of_doc_type)
        .ok_or_else(|| bad("doc.type must be tally.offer, tally.accept, tally.reject or tally.close"))?;
    let (required, optional): (&[&str], &[&str]) = match kind {
        Kind::Offer => (&["type", "tally", "seq", "from", "to", "terms", "at_ms"], &[]),
        _ => (&["type", "tally", "seq", "from", "to", "prev", "at_ms"], &[]),
    };
    only(d, required, optional, "doc")?;
    let tally = d
        .get("tally")
        .and_then(Value::as_str)
        .filter(|t| is_tally_id(t))
        .ok_or_else(|| bad("doc.tally must be tly_ and 1 to 60 of A-Z a-z 0-9 _ -"))?
        .to_owned();
    let seq = d
        .get("seq")
        .and_then(whole)
        .and_then(|s| u32::try_from(s).ok())
        .ok_or_else(|| bad("doc.seq must be a whole number"))?;
    if seq != kind.seq() {
        return Err(bad(format!("doc.seq of a {} is {}", kind.doc_type(), kind.seq())));
    }
    let from = party(d.get("from"), "doc.from")?;
    let to = party(d.get("to"), "doc.to")?;
    if from.site == to.site {
        return Err(bad("doc.from and doc.to are on the same site"));
    }
    let at_ms = d
        .get("at_ms")
        .and_then(whole)
        .filter(|t| (0..=(1_i64 << 53)).contains(t))
        .ok_or_else(|| bad("doc.at_ms must be a whole number of milliseconds"))?;
    let prev = match d.get("prev") {
        None => None,
        Some(p) => Some(
            p.as_str()
                .filter(|p| p.len() == 43 && URL_SAFE_NO_PAD.decode(p).is_ok())
                .ok_or_else(|| bad("doc.prev must be base64url of a SHA-256"))?
                .to_owned(),
        ),
    };
    let terms = match d.get("terms") {
        None => None,
        Some(t) if t.is_object() => {
            let bytes = signed::canonical(t)?;
            if bytes.len() > MAX_TERMS_BYTES {
                return Err(bad(format!("doc.terms is at most {MAX_TERMS_BYTES} bytes")));
            }
            Some(String::from_utf8(bytes).map_err(|_| bad("doc.terms is not UTF-8"))?)
        }
        Some(_) => return Err(bad("doc.terms must be an object")),
    };
    signed::verify(doc, sig, &signer_key)?;
    let canonical = signed::canonical(doc)?;
    Ok(Step {
        kind,
        tally,
        seq,
        from,
        to,
        prev,
        terms,
        at_ms,
        hash: hash_of(&canonical),
        canonical: String::from_utf8(canonical).map_err(|_| bad("the document is not UTF-8"))?,
        sig: sig.to_owned(),
        signer_key,
    })
}

/// A whole number however it is written (`1`, `1.0`, `1e0`: the same in
/// canonical form), within ±2^53.
fn whole(v: &Value) -> Option<i64> {
    if let Some(i) = v.as_i64() {
        return Some(i);
    }
    let f = v.as_f64()?;
    let limit = 9_007_199_254_740_992.0_f64;
    // Exact: the value is whole and within ±2^53, where f64 is exact.
    #[allow(clippy::cast_possible_truncation)]
    (f.fract() == 0.0 && f.abs() <= limit).then_some(f as i64)
}

/// Refuse members other than `required` (all present) and `optional`.
fn only(o: &Map<String, Value>, required: &[&str], optional: &[&str], what: &str) -> Result<(), StepError> {
    if let Some(k) = o
        .keys()
        .find(|k| !required.contains(&k.as_str()) && !optional.contains(&k.as_str()))
    {
        return Err(bad(format!(
            "{what} has an unknown member {:?}",
            k.chars().take(32).collect::<String>()
        )));
    }
    if let Some(k) = required.iter().find(|k| !o.contains_key(**k)) {
        return Err(bad(format!("{what} has no {k}")));
    }
    Ok(())
}

fn party(v: Option<&Value>, what: &str) -> Result<Party, StepError> {
    let o = v
        .and_then(Value::as_object)
        .ok_or_else(|| bad(format!("{what} must be an object")))?;
    only(o, &["chip_id", "site"], &[], what)?;
    let chip_id = o
        .get("chip_id")
        .and_then(Value::as_str)
        .filter(|c| crate::is_chip_id(c))
        .ok_or_else(|| bad(format!("{what}.chip_id must be a CHIP ID")))?;
    let site = o
        .get("site")
        .and_then(Value::as_str)
        .filter(|s| is_pin(s))
        .ok_or_else(|| bad(format!("{what}.site must be a key pin (sha256//...)")))?;
    Ok(Party {
        chip_id: chip_id.to_owned(),
        site: site.to_owned(),
    })
}

/// A step's document, for the app to sign. `prev` is the hash of the step
/// before (none for an offer); `terms` the offer's (an object).
pub fn doc(
    kind: Kind,
    tally: &str,
    from: &Party,
    to: &Party,
    prev: Option<&str>,
    terms: Option<&Value>,
    at_ms: i64,
) -> Value {
    let mut d = json!({
        "type": kind.doc_type(),
        "tally": tally,
        "seq": kind.seq(),
        "from": from.to_json(),
        "to": to.to_json(),
        "at_ms": at_ms,
    });
    if let Some(p) = prev {
        d["prev"] = json!(p);
    }
    if let Some(t) = terms {
        d["terms"] = t.clone();
    }
    d
}

/// The envelope of a signed document.
pub fn envelope(doc: &Value, sig: &str, signer_key: &[u8]) -> Value {
    json!({"doc": doc, "sig": sig, "signer_key": URL_SAFE_NO_PAD.encode(signer_key)})
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use p256::ecdsa::SigningKey;
    use p256::pkcs8::EncodePublicKey;

    const A: &str = "sha256//rcIpLAdF7OaPy855fra5qldHft46M3FeSpMiWq2SLlA=";
    const B: &str = "sha256//b4fXk2yLbqOvfVgD8vEulvXFrBKvdEYfKKL9Wy8fv+k=";

    fn signed(doc: &Value, key: &SigningKey) -> String {
        let spki = key.verifying_key().to_public_key_der().unwrap();
        envelope(doc, &signed::sign(doc, key).unwrap(), spki.as_bytes()).to_string()
    }

    fn parties() -> (Party, Party) {
        (
            Party {
                chip_id: "alice".into(),
                site: A.into(),
            },
            Party {
                chip_id: "bob".into(),
                site: B.into(),
            },
        )
    }

    #[test]
    fn a_signed_offer_and_its_answer_parse_and_chain() {
        let key = SigningKey::from_slice(&[3u8; 32]).unwrap();
        let (alice, bob) = parties();
        let offer = doc(
            Kind::Offer,
            "tly_x1",
            &alice,
            &bob,
            None,
            Some(&json!({"limit": 5})),
            1,
        );
        let step = parse_step(&signed(&offer, &key)).unwrap();
        assert_eq!(
            (step.kind, step.seq, step.idempotency_key()),
            (Kind::Offer, 1, format!("{A}/tly_x1/1"))
        );
        assert_eq!(step.terms.as_deref(), Some("{\"limit\":5}"));
        let accept = doc(Kind::Accept, "tly_x1", &bob, &alice, Some(&step.hash), None, 2);
        let answer = parse_step(&signed(&accept, &key)).unwrap();
        assert_eq!(answer.prev.as_deref(), Some(step.hash.as_str()));
        // The envelope it travels in parses to the same step.
        let again = parse_step(&step.envelope().to_string()).unwrap();
        assert_eq!(again.hash, step.hash);
    }

    /// The document of the test vector (protocol.md 14.4), written with
    /// `1.0` and `1e5`, is a valid offer; its hash is the one documented.
    #[test]
    fn the_test_vector_is_an_offer() {
        let text = r#"{"doc": { "type": "tally.offer", "at_ms": 1.7645472E12, "seq": 1.0, "tally": "tly_00000000000000000001",
            "to": {"site": "sha256//b4fXk2yLbqOvfVgD8vEulvXFrBKvdEYfKKL9Wy8fv+k=", "chip_id": "bob"},
            "from": {"site": "sha256//rcIpLAdF7OaPy855fra5qldHft46M3FeSpMiWq2SLlA=", "chip_id": "alice"},
            "terms": {"units": "mCHIP", "note": "Gr\u00fc\u00dfe, caf\u00e9 \u20ac", "limit": 1e5} },
            "sig": "dgo9hiUJNJ1rI9v7AcWy3MqFJ3bOUwPK7gKS4D2wUtwseuPq4cqz2x3dbyyYDUTLOBh2E-C2l26DHqrY5m2cLw",
            "signer_key": "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEYP7UuiVanTHJYet0xjVtaMBJuJI7Yfps5mliLmDyn7Z5A_4QCLi8maQa6elWKLxk8vGyDC1-n1F3o8KU1EYimQ"}"#;
        let step = parse_step(text).unwrap();
        assert_eq!(
            (step.kind, step.seq, step.at_ms),
            (Kind::Offer, 1, 1_764_547_200_000)
        );
        println!("hash: {}", step.hash);
        assert_eq!(step.hash, VECTOR_HASH);
        assert_eq!(
            step.idempotency_key(),
            "sha256//rcIpLAdF7OaPy855fra5qldHft46M3FeSpMiWq2SLlA=/tly_00000000000000000001/1"
        );
    }

    const VECTOR_HASH: &str = "VRbqZlbLEuDamLSITF3meT2rWEvZwlR6JfhM_aV_QYY";

    #[test]
    fn bad_steps_are_refused_by_what_is_wrong() {
        let key = SigningKey::from_slice(&[3u8; 32]).unwrap();
        let (alice, bob) = parties();
        let good = doc(Kind::Offer, "tly_x1", &alice, &bob, None, Some(&json!({})), 1);
        let cases: Vec<(Value, &str)> = vec![
            (
                {
                    let mut d = good.clone();
                    d["seq"] = json!(2);
                    d
                },
                "doc.seq",
            ),
            (
                {
                    let mut d = good.clone();
                    d["tally"] = json!("x1");
                    d
                },
                "doc.tally",
            ),
            (
                {
                    let mut d = good.clone();
                    d["extra"] = json!(1);
                    d
                },
                "unknown member",
            ),
            (
                {
                    let mut d = good.clone();
                    d["to"]["site"] = json!(A);
                    d
                },
                "same site",
            ),
            (
                {
                    let mut d = good.clone();
                    d["from"]["chip_id"] = json!("no spaces");
                    d
                },
                "CHIP ID",
            ),
            (
                {
                    let mut d = good.clone();
                    d["terms"] = json!([1]);
                    d
                },
                "terms",
            ),
            (
                {
                    let mut d = good.clone();
                    d.as_object_mut().unwrap().remove("terms");
                    d
                },
                "no terms",
            ),
            (
                {
                    let mut d = good.clone();
                    d["type"] = json!("tally.pay");
                    d
                },
                "doc.type",
            ),
        ];
        for (d, want) in cases {
            let e = parse_step(&signed(&d, &key)).unwrap_err().to_string();
            assert!(e.contains(want), "{e} (wanted {want})");
        }
        // Altered after signing.
        let mut env: Value = serde_json::from_str(&signed(&good, &key)).unwrap();
        env["doc"]["terms"] = json!({"limit": 1});
        assert!(matches!(
            parse_step(&env.to_string()),
            Err(StepError::Signature(SignedError::Forged))
        ));
        assert!(parse_step("[]").is_err());
        assert!(parse_step(&"x".repeat(MAX_STEP_BYTES + 1)).is_err());
        assert!(parse_step("{\"doc\":{},\"sig\":\"\",\"signer_key\":\"\"}").is_err());
    }
}
