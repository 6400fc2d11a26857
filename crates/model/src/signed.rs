//! Documents users sign (tally steps, next chits): the canonical form and
//! the signature every site checks (docs/protocol.md section 14.4).
//!
//! * **Canonical form:** RFC 8785 (JSON Canonicalization Scheme): members
//!   sorted by their UTF-16 code units, no insignificant white space,
//!   numbers as ECMAScript prints them, strings with the minimal escapes.
//! * **Signature:** ECDSA over P-256 with SHA-256 of the canonical bytes,
//!   written as base64url (no padding) of the 64-byte `r || s` (the IEEE
//!   P1363 form JWS ES256 and WebCrypto use). Signing here is deterministic
//!   (RFC 6979), so a fixed key and document give a fixed signature: the
//!   test vector of section 14.4.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey, signature::Signer};
use p256::pkcs8::DecodePublicKey;
use serde_json::Value;

/// Why a document or a signature does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignedError {
    #[error("the document cannot be put in canonical form: {0}")]
    Canonical(String),
    #[error("the public key is not a P-256 SubjectPublicKeyInfo")]
    Key,
    #[error("the signature is not base64url of 64 bytes (r || s)")]
    Malformed,
    #[error("the signature does not verify")]
    Forged,
}

/// The RFC 8785 canonical bytes of `doc`.
pub fn canonical(doc: &Value) -> Result<Vec<u8>, SignedError> {
    serde_json_canonicalizer::to_vec(doc).map_err(|e| SignedError::Canonical(e.to_string()))
}

/// Sign `doc` with `key` (the app's side): base64url of `r || s`.
pub fn sign(doc: &Value, key: &SigningKey) -> Result<String, SignedError> {
    let signature: Signature = key.sign(&canonical(doc)?);
    Ok(URL_SAFE_NO_PAD.encode(signature.to_bytes()))
}

/// The DER prefix of a P-256 SubjectPublicKeyInfo holding an uncompressed
/// point (id-ecPublicKey, prime256v1, a 66-byte bit string).
const SPKI_P256_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86,
    0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// Check that `signature` is `public_key`'s (SPKI DER) over `doc`.
///
/// Verified with ring (several times faster than the pure-Rust curve, and
/// every site checks every step); the key's point, uncompressed, is what
/// ring takes. A compressed point is decompressed first.
pub fn verify(doc: &Value, signature: &str, public_key: &[u8]) -> Result<(), SignedError> {
    let point = match public_key.strip_prefix(&SPKI_P256_PREFIX[..]) {
        Some(point) if point.len() == 65 && point[0] == 4 => point.to_vec(),
        _ => {
            let key = VerifyingKey::from_public_key_der(public_key).map_err(|_| SignedError::Key)?;
            key.to_sec1_point(false).as_bytes().to_vec()
        }
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(signature.as_bytes())
        .map_err(|_| SignedError::Malformed)?;
    // Also checks that r and s are in range.
    Signature::from_slice(&bytes).map_err(|_| SignedError::Malformed)?;
    let key = ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, point);
    key.verify(&canonical(doc)?, &bytes).map_err(|_| {
        // ring does not say why: a point off the curve is a bad key.
        match VerifyingKey::from_sec1_bytes(key.as_ref()) {
            Ok(_) => SignedError::Forged,
            Err(_) => SignedError::Key,
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use p256::pkcs8::EncodePublicKey;
    use serde_json::json;

    /// The test vector of docs/protocol.md section 14.4: the P-256 key of
    /// RFC 6979 appendix A.2.5, a tally offer, its canonical bytes and its
    /// signature. A change here is a change of the protocol.
    pub(crate) const VECTOR_PRIVATE_KEY_HEX: &str =
        "c9afa9d845ba75166b5c215767b1d6934e50c3db36e89b127b8a622b120f6721";

    fn vector_key() -> SigningKey {
        let bytes: Vec<u8> = (0..VECTOR_PRIVATE_KEY_HEX.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&VECTOR_PRIVATE_KEY_HEX[i..i + 2], 16).unwrap())
            .collect();
        SigningKey::from_slice(&bytes).unwrap()
    }

    fn vector_doc() -> Value {
        json!({
            "type": "tally.offer",
            "tally": "tly_00000000000000000001",
            "seq": 1,
            "from": {"chip_id": "alice", "site": "sha256//rcIpLAdF7OaPy855fra5qldHft46M3FeSpMiWq2SLlA="},
            "to": {"chip_id": "bob", "site": "sha256//b4fXk2yLbqOvfVgD8vEulvXFrBKvdEYfKKL9Wy8fv+k="},
            "terms": {"limit": 100000, "units": "mCHIP", "note": "Gr\u{fc}\u{df}e, caf\u{e9} \u{20ac}"},
            "at_ms": 1764547200000_i64
        })
    }

    const VECTOR_CANONICAL: &str = "{\"at_ms\":1764547200000,\"from\":{\"chip_id\":\"alice\",\"site\":\"sha256//rcIpLAdF7OaPy855fra5qldHft46M3FeSpMiWq2SLlA=\"},\"seq\":1,\"tally\":\"tly_00000000000000000001\",\"terms\":{\"limit\":100000,\"note\":\"Gr\u{fc}\u{df}e, caf\u{e9} \u{20ac}\",\"units\":\"mCHIP\"},\"to\":{\"chip_id\":\"bob\",\"site\":\"sha256//b4fXk2yLbqOvfVgD8vEulvXFrBKvdEYfKKL9Wy8fv+k=\"},\"type\":\"tally.offer\"}";

    #[test]
    fn the_documented_test_vector_holds() {
        let key = vector_key();
        let doc = vector_doc();
        let bytes = canonical(&doc).unwrap();
        assert_eq!(String::from_utf8(bytes).unwrap(), VECTOR_CANONICAL);
        let spki = key.verifying_key().to_public_key_der().unwrap();
        let signature = sign(&doc, &key).unwrap();
        println!(
            "public key (SPKI, base64url): {}",
            URL_SAFE_NO_PAD.encode(spki.as_bytes())
        );
        println!("signature: {signature}");
        assert_eq!(signature, VECTOR_SIGNATURE);
        verify(&doc, &signature, spki.as_bytes()).unwrap();
        // The same document written another way has the same canonical form.
        let reordered: Value = serde_json::from_str(
            "{ \"type\" : \"tally.offer\", \"at_ms\": 1.7645472E12, \"seq\": 1.0, \"tally\": \"tly_00000000000000000001\", \"to\": {\"site\": \"sha256//b4fXk2yLbqOvfVgD8vEulvXFrBKvdEYfKKL9Wy8fv+k=\", \"chip_id\": \"bob\"}, \"from\": {\"site\": \"sha256//rcIpLAdF7OaPy855fra5qldHft46M3FeSpMiWq2SLlA=\", \"chip_id\": \"alice\"}, \"terms\": {\"units\": \"mCHIP\", \"note\": \"Gr\\u00fc\\u00dfe, caf\\u00e9 \\u20ac\", \"limit\": 1e5}}",
        )
        .unwrap();
        verify(&reordered, &signature, spki.as_bytes()).unwrap();
    }

    const VECTOR_SIGNATURE: &str =
        "dgo9hiUJNJ1rI9v7AcWy3MqFJ3bOUwPK7gKS4D2wUtwseuPq4cqz2x3dbyyYDUTLOBh2E-C2l26DHqrY5m2cLw";

    #[test]
    fn a_changed_document_or_signature_is_refused() {
        let key = vector_key();
        let spki = key.verifying_key().to_public_key_der().unwrap();
        let doc = vector_doc();
        let signature = sign(&doc, &key).unwrap();
        let mut altered = doc.clone();
        altered["terms"]["limit"] = json!(100001);
        assert_eq!(
            verify(&altered, &signature, spki.as_bytes()),
            Err(SignedError::Forged)
        );
        let mut bytes = URL_SAFE_NO_PAD.decode(&signature).unwrap();
        bytes[10] ^= 1;
        assert_eq!(
            verify(&doc, &URL_SAFE_NO_PAD.encode(&bytes), spki.as_bytes()),
            Err(SignedError::Forged)
        );
        assert_eq!(
            verify(&doc, "not base64!", spki.as_bytes()),
            Err(SignedError::Malformed)
        );
        assert_eq!(
            verify(&doc, &signature[..40], spki.as_bytes()),
            Err(SignedError::Malformed)
        );
        assert_eq!(verify(&doc, &signature, b"junk"), Err(SignedError::Key));
        let other = SigningKey::from_slice(&[7u8; 32]).unwrap();
        let other_spki = other.verifying_key().to_public_key_der().unwrap();
        assert_eq!(
            verify(&doc, &signature, other_spki.as_bytes()),
            Err(SignedError::Forged)
        );
    }
}
