//! Tallies from the app's side (docs/protocol.md sections 9 and 14.5): the
//! app builds each step's document, signs it with the user's key, and hands
//! it to its site. The site can record and forward only what the user signed.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chipsite_model::tally::{self, Kind, Party};
use p256::{ecdsa::SigningKey, pkcs8::DecodePrivateKey};
use serde_json::{Value, json};

use crate::{AppError, AppKey, AppState, Session};

impl AppKey {
    /// Sign `doc` (its RFC 8785 canonical form): base64url `r || s`.
    pub fn sign_doc(&self, doc: &Value) -> Result<String, AppError> {
        let key = SigningKey::from_pkcs8_der(&self.pkcs8_der()).map_err(|e| AppError::Key(e.to_string()))?;
        chipsite_model::signed::sign(doc, &key).map_err(|e| AppError::Key(e.to_string()))
    }

    /// `doc` signed: the envelope a step travels in.
    pub fn signed_step(&self, doc: &Value) -> Result<Value, AppError> {
        Ok(tally::envelope(doc, &self.sign_doc(doc)?, &self.spki_der()))
    }
}

impl AppState {
    /// This user as a tally party: the CHIP ID and the pin of the site key.
    pub fn party(&self) -> Result<Party, AppError> {
        let key = URL_SAFE_NO_PAD
            .decode(&self.site_key)
            .map_err(|_| AppError::Ticket("the saved site key is not base64url".into()))?;
        Ok(Party {
            chip_id: self.chip_id.clone(),
            site: chipsite_model::pin_of_spki(&key),
        })
    }
}

/// A fresh tally id: `tly_` and 22 characters of 16 random bytes.
pub fn new_tally_id() -> Result<String, AppError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| AppError::Key(e.to_string()))?;
    Ok(format!("tly_{}", URL_SAFE_NO_PAD.encode(bytes)))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(0))
        .unwrap_or(0)
}

impl Session {
    /// The user's tallies with their steps, newest first (`tally.list`).
    pub async fn tallies(&self) -> Result<Vec<Value>, AppError> {
        let r = self.call("tally.list", json!({})).await?;
        Ok(r.get("tallies")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default())
    }

    /// Offer a tally to `to` (a user this one is linked with) on `terms`,
    /// signed by `key` for `me`: the tally as the site recorded it.
    pub async fn offer_tally(
        &self,
        me: &Party,
        to: &Party,
        terms: &Value,
        key: &AppKey,
    ) -> Result<Value, AppError> {
        let doc = tally::doc(Kind::Offer, &new_tally_id()?, me, to, None, Some(terms), now_ms());
        self.submit_step(Kind::Offer, &key.signed_step(&doc)?).await
    }

    /// Accept, reject or close tally `id`: the next step after the ones the
    /// site lists, signed by `key` for `me`.
    pub async fn answer_tally(
        &self,
        id: &str,
        kind: Kind,
        me: &Party,
        key: &AppKey,
    ) -> Result<Value, AppError> {
        let tallies = self.tallies().await?;
        let t = tallies
            .iter()
            .find(|t| t.get("id").and_then(Value::as_str) == Some(id))
            .ok_or_else(|| AppError::Protocol(format!("no tally {id}")))?;
        let peer = Party {
            chip_id: t
                .pointer("/peer/chip_id")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            site: t
                .pointer("/peer/site_pin")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
        };
        let before = kind.seq().saturating_sub(1);
        let prev = t
            .get("steps")
            .and_then(Value::as_array)
            .and_then(|s| {
                s.iter()
                    .find(|s| s.get("seq").and_then(Value::as_u64) == Some(u64::from(before)))
            })
            .and_then(|s| s.get("hash").and_then(Value::as_str))
            .ok_or_else(|| AppError::Protocol(format!("tally {id} has no step {before}")))?;
        let doc = tally::doc(kind, id, me, &peer, Some(prev), None, now_ms());
        self.submit_step(kind, &key.signed_step(&doc)?).await
    }

    /// Hand a signed step to the site (`tally.offer` and the others).
    pub async fn submit_step(&self, kind: Kind, step: &Value) -> Result<Value, AppError> {
        let r = self
            .call(&format!("tally.{}", kind.as_str()), json!({"step": step}))
            .await?;
        Ok(r.get("tally").cloned().unwrap_or(Value::Null))
    }
}
