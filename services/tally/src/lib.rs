//! tally: the ledger (ADR 0010). It owns the tallies between a local user
//! and a user on another site, every signed step of each, and the outbox of
//! the local users' steps on their way to the other site.
//!
//! * **Steps are users' signatures, not the site's word.** Every step is a
//!   document its user signed ([`chipsite_model::tally`]). A local user's
//!   step must be signed with the key key-vault holds for that user; a peer
//!   user's step with the key its site sends along, over a peer session
//!   that site's key authenticates. A forged or altered step is refused and
//!   nothing is recorded.
//! * **One transaction per step.** The step, the tally's new state and, for
//!   a local step, its outbox message are written together; the tally's
//!   state changes only from the state the step was checked against (a
//!   compare-and-set), so two steps at once cannot both win.
//! * **Exactly once.** A step is identified by its site, tally and number
//!   (`<site pin>/<tally>/<seq>`, the idempotency key). The same step again
//!   is answered as the first time; a different step under the same key is
//!   refused.
//! * **The outbox** is delivered by the peer gateway: `NextOutgoing` leases
//!   the oldest pending message of each tally (so steps of a tally go in
//!   order), `Settle` records how it went (delivered, retry with capped
//!   exponential backoff and full jitter, or refused).

mod grpc;
pub mod store;

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use chipsite_model::{
    ErrorCode,
    tally::{Kind, Step, StepError, parse_step},
};
use chipsite_proto::keyvault::v1::{self as kv, key_vault_client::KeyVaultClient};
use chipsite_store::{begin_write, is_unique_violation, now_ms};
use chipsite_telemetry::{TracedChannel, traced};
use chipsite_tls::InternalChannel as Channel;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
    TransactionTrait, sea_query::Expr,
};
use tokio::sync::Notify;

pub use grpc::{TalliesGrpc, policy, serve};
use store::{outbox, step, tally};

#[derive(Debug, thiserror::Error)]
pub enum TallyError {
    #[error("{0}")]
    InvalidArgument(String),
    /// A signature that does not hold, or a key that is not the signer's.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    /// The step does not fit the tally as it is.
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("database: {0}")]
    Store(#[from] sea_orm::DbErr),
}

impl TallyError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Self::Forbidden(_) => ErrorCode::Forbidden,
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::Conflict(_) => ErrorCode::FailedPrecondition,
            Self::Unavailable(_) => ErrorCode::Unavailable,
            Self::Store(_) => ErrorCode::Internal,
        }
    }

    /// The same error for another item of a batch that failed as a whole.
    fn again(&self) -> Self {
        match self {
            Self::InvalidArgument(m) => Self::InvalidArgument(m.clone()),
            Self::Forbidden(m) => Self::Forbidden(m.clone()),
            Self::NotFound(m) => Self::NotFound(m.clone()),
            Self::Conflict(m) => Self::Conflict(m.clone()),
            Self::Unavailable(m) => Self::Unavailable(m.clone()),
            Self::Store(e) => Self::Store(sea_orm::DbErr::Custom(e.to_string())),
        }
    }
}

/// A step from the other site, as its session carried it.
#[derive(Debug, Clone, Copy)]
pub struct Received<'a> {
    pub peer_site_pin: &'a str,
    pub peer_chip_id: &'a str,
    pub idempotency_key: &'a str,
    pub step: &'a str,
}

/// A peer's step, checked before it meets the store: signed (the signature
/// holds) by the user the session names, on the site that authenticated
/// it, under the step's own idempotency key, for this site (`own` pin).
fn received(
    peer_site_pin: &str,
    peer_chip_id: &str,
    idempotency_key: &str,
    text: &str,
    own: &str,
) -> Result<Step, TallyError> {
    let step = parse_step(text)?;
    if step.from.site != peer_site_pin || step.from.chip_id != peer_chip_id {
        return Err(TallyError::Forbidden(
            "the step is not signed by the user this session acts for, on its site".into(),
        ));
    }
    if step.idempotency_key() != idempotency_key {
        return Err(TallyError::InvalidArgument(
            "the idempotency key is not the step's own (<from.site>/<tally>/<seq>)".into(),
        ));
    }
    if step.to.site != own {
        return Err(TallyError::InvalidArgument(
            "doc.to.site is not this site's key pin".into(),
        ));
    }
    Ok(step)
}

impl From<StepError> for TallyError {
    fn from(e: StepError) -> Self {
        match e {
            StepError::Malformed(_) => Self::InvalidArgument(e.to_string()),
            StepError::Signature(_) => Self::Forbidden(e.to_string()),
        }
    }
}

impl From<TallyError> for tonic::Status {
    fn from(e: TallyError) -> Self {
        match e.code() {
            ErrorCode::Internal => chipsite_proto::status::internal(&e),
            code => chipsite_proto::status::status(code, e.to_string()),
        }
    }
}

/// How long a message handed out by [`Tallies::next_outgoing`] is left to
/// its deliverer before another may take it (a dial and a call, each
/// bounded by 10 s, fit in it).
pub const LEASE: Duration = Duration::from_secs(30);
/// The longest wait between two attempts to deliver a message.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How long this site's key pin read from key-vault is reused.
const PIN_TTL: Duration = Duration::from_secs(1);

/// A tally with its steps, oldest first.
#[derive(Debug, Clone)]
pub struct TallyView {
    pub tally: tally::Model,
    pub steps: Vec<step::Model>,
}

/// Whose step: this site's user (submitted) or the other site's (received).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Local,
    Peer,
}

/// What applying a step did.
#[derive(Debug)]
pub struct Applied {
    pub tally_id: String,
    /// The tally with its steps, when asked for.
    pub view: Option<TallyView>,
    /// False when the step had been applied before.
    pub fresh: bool,
    pub seq: u32,
    pub state: String,
}

/// How a delivery went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    Retry,
    Refused,
}

pub struct Tallies {
    db: DatabaseConnection,
    vault: KeyVaultClient<TracedChannel>,
    own_pin: Mutex<Option<(Instant, String)>>,
    /// Woken when a message enters the outbox.
    wake: Notify,
    /// One lease at a time: two deliverers never get the same message.
    leasing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Tallies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tallies").finish_non_exhaustive()
    }
}

impl Tallies {
    /// Open the store (running its migrations). Leases of a previous run
    /// are let go: whoever held them is gone, and a message delivered twice
    /// is applied once.
    pub async fn open(db: DatabaseConnection, key_vault: Channel) -> Result<Self, TallyError> {
        chipsite_store::migrate::<store::Migrator>(&db).await?;
        outbox::Entity::update_many()
            .col_expr(outbox::Column::NextAtMs, Expr::value(0_i64))
            .filter(outbox::Column::State.eq("pending"))
            .filter(outbox::Column::NextAtMs.gt(now_ms()))
            .filter(outbox::Column::LastError.eq(LEASED))
            .exec(&db)
            .await?;
        Ok(Self {
            db,
            vault: KeyVaultClient::new(traced(key_vault)),
            own_pin: Mutex::new(None),
            wake: Notify::new(),
            leasing: tokio::sync::Mutex::new(()),
        })
    }

    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// This site's key pin (key-vault's), reused for a second.
    async fn own_pin(&self) -> Result<String, TallyError> {
        if let Ok(known) = self.own_pin.lock()
            && let Some((at, pin)) = known.as_ref()
            && at.elapsed() < PIN_TTL
        {
            return Ok(pin.clone());
        }
        let status = self
            .vault
            .clone()
            .get_status(kv::GetStatusRequest {})
            .await
            .map_err(|e| TallyError::Unavailable(format!("key-vault: {}", e.message())))?
            .into_inner();
        if !status.has_key {
            return Err(TallyError::Unavailable("this site has no key yet".into()));
        }
        if let Ok(mut known) = self.own_pin.lock() {
            *known = Some((Instant::now(), status.site_key_pin.clone()));
        }
        Ok(status.site_key_pin)
    }

    /// A local user's signed step (`Submit`).
    pub async fn submit(&self, chip_id: &str, text: &str) -> Result<Applied, TallyError> {
        let step = parse_step(text)?;
        if step.from.chip_id != chip_id {
            return Err(TallyError::InvalidArgument(
                "doc.from.chip_id is not the user of this session".into(),
            ));
        }
        let own = self.own_pin().await?;
        if step.from.site != own {
            return Err(TallyError::InvalidArgument(format!(
                "doc.from.site is not this site's key pin ({own})"
            )));
        }
        let key = self
            .vault
            .clone()
            .get_user_key(kv::GetUserKeyRequest {
                chip_id: chip_id.to_owned(),
            })
            .await
            .map_err(|e| match chipsite_proto::status::code_of(&e) {
                ErrorCode::NotFound => TallyError::Forbidden("the user has no registered key".into()),
                _ => TallyError::Unavailable(format!("key-vault: {}", e.message())),
            })?
            .into_inner()
            .public_key;
        if key != step.signer_key {
            return Err(TallyError::Forbidden(
                "the step is not signed with the user's registered key".into(),
            ));
        }
        let applied = self.apply(&step, Side::Local, true).await?;
        if applied.fresh {
            self.wake.notify_waiters();
        }
        Ok(applied)
    }

    /// Steps from the other site as one session carried them
    /// (`ReceiveMany`): each signed by the user the session names, on the
    /// site whose key authenticated it ([`received`]), then applied in order in one transaction, each in a savepoint of its own
    /// (a refused step leaves nothing, and the next still applies).
    pub async fn receive_many(&self, items: &[Received<'_>]) -> Vec<Result<Applied, TallyError>> {
        let own = match self.own_pin().await {
            Ok(own) => own,
            Err(e) => return items.iter().map(|_| Err(e.again())).collect(),
        };
        let checked: Vec<Result<Step, TallyError>> = items
            .iter()
            .map(|r| received(r.peer_site_pin, r.peer_chip_id, r.idempotency_key, r.step, &own))
            .collect();
        let now = now_ms();
        let txn = match begin_write(&self.db).await {
            Ok(t) => t,
            Err(e) => {
                let e = TallyError::from(e);
                return items.iter().map(|_| Err(e.again())).collect();
            }
        };
        let mut results = Vec::with_capacity(items.len());
        for step in checked {
            let step = match step {
                Ok(s) => s,
                Err(e) => {
                    results.push(Err(e));
                    continue;
                }
            };
            let applied = async {
                let point = txn.begin().await?;
                match self.apply_in(&point, &step, Side::Peer, now).await {
                    Ok(done) => {
                        point.commit().await?;
                        Ok(done)
                    }
                    Err(e) => {
                        point.rollback().await?;
                        Err(e)
                    }
                }
            };
            results.push(applied.await.map(|(fresh, state)| Applied {
                tally_id: step.tally.clone(),
                view: None,
                fresh,
                seq: step.seq,
                state,
            }));
        }
        if let Err(e) = txn.commit().await {
            // Nothing of it was recorded: the other site sends them again.
            let e = TallyError::from(e);
            for r in &mut results {
                if r.is_ok() {
                    *r = Err(e.again());
                }
            }
        }
        results
    }

    /// Check `step` against its tally and record it, in one transaction.
    async fn apply(&self, s: &Step, side: Side, want_view: bool) -> Result<Applied, TallyError> {
        let txn = begin_write(&self.db).await?;
        let (fresh, state) = match self.apply_in(&txn, s, side, now_ms()).await {
            Ok(done) => done,
            Err(e) => {
                let _ = txn.rollback().await;
                return Err(e);
            }
        };
        txn.commit().await?;
        let view = if want_view {
            Some(self.view(&s.tally).await?)
        } else {
            None
        };
        Ok(Applied {
            tally_id: s.tally.clone(),
            view,
            fresh,
            seq: s.seq,
            state,
        })
    }

    /// [`Self::apply`]'s checks and writes in `txn`: whether the step is
    /// new, and the state it left the tally in.
    async fn apply_in(
        &self,
        txn: &impl sea_orm::ConnectionTrait,
        s: &Step,
        side: Side,
        now: i64,
    ) -> Result<(bool, String), TallyError> {
        let (local, peer) = match side {
            Side::Local => (&s.from, &s.to),
            Side::Peer => (&s.to, &s.from),
        };
        let seq = i32::try_from(s.seq).unwrap_or(i32::MAX);
        // The same step again: the first answer. Another step in its place: no.
        if let Some(known) = step::Entity::find_by_id((s.tally.clone(), seq, s.from.site.clone()))
            .one(txn)
            .await?
        {
            if known.hash != s.hash {
                return Err(TallyError::Conflict(format!(
                    "another step {} of tally {} from this site was recorded before",
                    s.seq, s.tally
                )));
            }
            let t = tally::Entity::find_by_id(s.tally.clone())
                .one(txn)
                .await?
                .ok_or_else(|| TallyError::NotFound(format!("no tally {}", s.tally)))?;
            self.check_party(&t, local.chip_id.as_str(), side)?;
            return Ok((false, known.state_after));
        }
        let existing = tally::Entity::find_by_id(s.tally.clone()).one(txn).await?;
        let state_after = s.kind.state_after();
        match (&existing, s.kind) {
            (None, Kind::Offer) => {
                tally::Entity::insert(tally::ActiveModel {
                    id: Set(s.tally.clone()),
                    chip_id: Set(local.chip_id.clone()),
                    peer_chip_id: Set(peer.chip_id.clone()),
                    peer_site_pin: Set(peer.site.clone()),
                    role: Set(if side == Side::Local {
                        "offerer"
                    } else {
                        "recipient"
                    }
                    .to_owned()),
                    state: Set(state_after.to_owned()),
                    terms: Set(s.terms.clone().unwrap_or_else(|| "{}".to_owned())),
                    delivery: Set(if side == Side::Local { "pending" } else { "" }.to_owned()),
                    created_at_ms: Set(now),
                    updated_at_ms: Set(now),
                })
                .exec(txn)
                .await
                .map_err(|e| taken(e, &s.tally))?;
            }
            (Some(_), Kind::Offer) => {
                return Err(TallyError::Conflict(format!("tally {} exists already", s.tally)));
            }
            (None, _) => return Err(TallyError::NotFound(format!("no tally {}", s.tally))),
            (Some(t), kind) => {
                self.check_party(t, &local.chip_id, side)?;
                if t.peer_chip_id != peer.chip_id || t.peer_site_pin != peer.site {
                    return Err(TallyError::InvalidArgument(
                        "the step names another party than the tally's".into(),
                    ));
                }
                // Who may take this step, from which state, after which step.
                let signer_offered = (t.role == "offerer") == (side == Side::Local);
                let (from_states, after_seq): (&[&str], i32) = match kind {
                    Kind::Accept | Kind::Reject if signer_offered => {
                        return Err(TallyError::Conflict(
                            "only the user the tally was offered to accepts or rejects it".into(),
                        ));
                    }
                    Kind::Accept | Kind::Reject => (&["offered"], 1),
                    // Both users closing at once is one close, signed twice.
                    Kind::Close => (&["open", "closed"], 2),
                    Kind::Offer => (&[], 0),
                };
                if !from_states.contains(&t.state.as_str()) {
                    return Err(TallyError::Conflict(format!(
                        "tally {} is {}: a {} does not apply",
                        t.id,
                        t.state,
                        kind.as_str()
                    )));
                }
                let before = step::Entity::find()
                    .filter(step::Column::TallyId.eq(&t.id))
                    .filter(step::Column::Seq.eq(after_seq))
                    .one(txn)
                    .await?
                    .ok_or_else(|| TallyError::Conflict(format!("tally {} has no step {after_seq}", t.id)))?;
                if s.prev.as_deref() != Some(before.hash.as_str()) {
                    return Err(TallyError::Conflict(format!(
                        "doc.prev is not the hash of step {after_seq} of tally {}",
                        t.id
                    )));
                }
                let mut update = tally::Entity::update_many()
                    .col_expr(tally::Column::State, Expr::value(state_after))
                    .col_expr(tally::Column::UpdatedAtMs, Expr::value(now));
                if side == Side::Local {
                    update = update.col_expr(tally::Column::Delivery, Expr::value("pending"));
                }
                let changed = update
                    .filter(tally::Column::Id.eq(&t.id))
                    .filter(tally::Column::State.eq(&t.state))
                    .exec(txn)
                    .await?;
                if changed.rows_affected != 1 {
                    return Err(TallyError::Conflict(format!(
                        "tally {} changed meanwhile; try again",
                        t.id
                    )));
                }
            }
        }
        step::Entity::insert(step::ActiveModel {
            tally_id: Set(s.tally.clone()),
            seq: Set(seq),
            signer_site_pin: Set(s.from.site.clone()),
            signer_chip_id: Set(s.from.chip_id.clone()),
            kind: Set(s.kind.as_str().to_owned()),
            doc: Set(s.canonical.clone()),
            sig: Set(s.sig.clone()),
            signer_key: Set(s.signer_key.clone()),
            hash: Set(s.hash.clone()),
            state_after: Set(state_after.to_owned()),
            recorded_at_ms: Set(now),
        })
        .exec(txn)
        .await
        .map_err(|e| taken(e, &s.tally))?;
        if side == Side::Local {
            outbox::Entity::insert(outbox::ActiveModel {
                idempotency_key: Set(s.idempotency_key()),
                tally_id: Set(s.tally.clone()),
                seq: Set(seq),
                chip_id: Set(local.chip_id.clone()),
                peer_chip_id: Set(peer.chip_id.clone()),
                peer_site_pin: Set(peer.site.clone()),
                step: Set(s.envelope().to_string()),
                state: Set("pending".to_owned()),
                attempts: Set(0),
                next_at_ms: Set(0),
                last_error: Set(String::new()),
                created_at_ms: Set(now),
                settled_at_ms: Set(None),
                ..Default::default()
            })
            .exec(txn)
            .await
            .map_err(|e| taken(e, &s.tally))?;
        }
        Ok((true, state_after.to_owned()))
    }

    /// A tally of another local user is not this user's to see or change.
    fn check_party(&self, t: &tally::Model, local_chip_id: &str, side: Side) -> Result<(), TallyError> {
        if t.chip_id != local_chip_id {
            return Err(match side {
                Side::Local => TallyError::NotFound(format!("no tally {}", t.id)),
                Side::Peer => {
                    TallyError::InvalidArgument("the step names another party than the tally's".into())
                }
            });
        }
        Ok(())
    }

    async fn view(&self, id: &str) -> Result<TallyView, TallyError> {
        let tally = tally::Entity::find_by_id(id.to_owned())
            .one(&self.db)
            .await?
            .ok_or_else(|| TallyError::NotFound(format!("no tally {id}")))?;
        let steps = step::Entity::find()
            .filter(step::Column::TallyId.eq(id))
            .order_by_asc(step::Column::Seq)
            .order_by_asc(step::Column::RecordedAtMs)
            .all(&self.db)
            .await?;
        Ok(TallyView { tally, steps })
    }

    /// A local user's tallies, newest first, with their steps.
    pub async fn list(&self, chip_id: &str, limit: u64) -> Result<Vec<TallyView>, TallyError> {
        let tallies = tally::Entity::find()
            .filter(tally::Column::ChipId.eq(chip_id))
            .order_by_desc(tally::Column::CreatedAtMs)
            .order_by_desc(tally::Column::Id)
            .limit(limit)
            .all(&self.db)
            .await?;
        let ids: Vec<String> = tallies.iter().map(|t| t.id.clone()).collect();
        let mut steps: HashMap<String, Vec<step::Model>> = HashMap::new();
        if !ids.is_empty() {
            for s in step::Entity::find()
                .filter(step::Column::TallyId.is_in(ids))
                .order_by_asc(step::Column::Seq)
                .order_by_asc(step::Column::RecordedAtMs)
                .all(&self.db)
                .await?
            {
                steps.entry(s.tally_id.clone()).or_default().push(s);
            }
        }
        Ok(tallies
            .into_iter()
            .map(|t| TallyView {
                steps: steps.remove(&t.id).unwrap_or_default(),
                tally: t,
            })
            .collect())
    }

    /// Up to `max` messages due now, the oldest pending one of each tally,
    /// each leased for [`LEASE`]; waits up to `wait` for one.
    pub async fn next_outgoing(&self, max: usize, wait: Duration) -> Result<Vec<outbox::Model>, TallyError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (due, earliest) = {
                let _one = self.leasing.lock().await;
                self.lease(max).await?
            };
            if !due.is_empty() {
                return Ok(due);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(vec![]);
            }
            let until = earliest
                .map(|at| {
                    let ms = u64::try_from(at.saturating_sub(now_ms())).unwrap_or(0);
                    (now + Duration::from_millis(ms)).min(deadline)
                })
                .unwrap_or(deadline);
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(until) => {}
            }
        }
    }

    /// Lease what is due; also say when the next pending message falls due.
    ///
    /// Only the head of each tally's queue (its oldest pending message) may
    /// go; the database picks the heads (`NOT EXISTS` an older pending
    /// message of the same tally), so a long queue costs nothing here.
    async fn lease(&self, max: usize) -> Result<(Vec<outbox::Model>, Option<i64>), TallyError> {
        let now = now_ms();
        // The head of each tally's queue: its oldest pending message. A
        // scalar subquery per candidate, which the index on (tally, state,
        // id) answers and no planner turns into a join: a NOT EXISTS (or an
        // IN over a grouping) was planned, on a fresh table or as a generic
        // plan, as a nested scan, seconds per call at 10,000 waiting.
        let head = Expr::cust(
            r#""tally_outbox"."id" = (SELECT min("o"."id") FROM "tally_outbox" AS "o" WHERE "o"."tally_id" = "tally_outbox"."tally_id" AND "o"."state" = 'pending')"#,
        );
        let limit = u64::try_from(max).unwrap_or(64);
        let due: Vec<i64> = outbox::Entity::find()
            .select_only()
            .column(outbox::Column::Id)
            .filter(outbox::Column::State.eq("pending"))
            .filter(outbox::Column::NextAtMs.lte(now))
            .filter(head.clone())
            .order_by_asc(outbox::Column::Id)
            .limit(limit)
            .into_tuple()
            .all(&self.db)
            .await?;
        if due.is_empty() {
            let earliest: Option<Option<i64>> = outbox::Entity::find()
                .select_only()
                .column_as(outbox::Column::NextAtMs.min(), "earliest")
                .filter(outbox::Column::State.eq("pending"))
                .filter(head)
                .into_tuple()
                .one(&self.db)
                .await?;
            return Ok((vec![], earliest.flatten()));
        }
        let until = now + i64::try_from(LEASE.as_millis()).unwrap_or(i64::MAX);
        outbox::Entity::update_many()
            .col_expr(outbox::Column::NextAtMs, Expr::value(until))
            .col_expr(outbox::Column::LastError, Expr::value(LEASED))
            .filter(outbox::Column::Id.is_in(due.iter().copied()))
            .exec(&self.db)
            .await?;
        let messages = outbox::Entity::find()
            .filter(outbox::Column::Id.is_in(due))
            .order_by_asc(outbox::Column::Id)
            .all(&self.db)
            .await?;
        Ok((messages, None))
    }

    /// How the deliveries of these messages went, in one transaction. A
    /// message no longer pending (settled before, by a deliverer whose
    /// lease had ended) is left as it is.
    pub async fn settle(&self, settled: &[(i64, Outcome, String)]) -> Result<(), TallyError> {
        if settled.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = settled.iter().map(|s| s.0).collect();
        let found: Vec<(i64, i64, i32, String)> = outbox::Entity::find()
            .select_only()
            .column(outbox::Column::Id)
            .column(outbox::Column::NextAtMs)
            .column(outbox::Column::Attempts)
            .column(outbox::Column::TallyId)
            .filter(outbox::Column::Id.is_in(ids))
            .filter(outbox::Column::State.eq("pending"))
            .into_tuple()
            .all(&self.db)
            .await?;
        let pending: HashMap<i64, (i64, i32, String)> =
            found.into_iter().map(|(id, at, n, t)| (id, (at, n, t))).collect();
        let now = now_ms();
        let txn = begin_write(&self.db).await?;
        // Delivered, the common case: two statements for all of them.
        let delivered: Vec<(i64, &str)> = settled
            .iter()
            .filter(|(id, o, _)| *o == Outcome::Delivered && pending.contains_key(id))
            .filter_map(|(id, _, _)| pending.get(id).map(|p| (*id, p.2.as_str())))
            .collect();
        if !delivered.is_empty() {
            outbox::Entity::update_many()
                .col_expr(outbox::Column::State, Expr::value("delivered"))
                .col_expr(
                    outbox::Column::Attempts,
                    sea_orm::sea_query::ExprTrait::add(Expr::col(outbox::Column::Attempts), 1),
                )
                .col_expr(outbox::Column::LastError, Expr::value(""))
                .col_expr(outbox::Column::SettledAtMs, Expr::value(Some(now)))
                .filter(outbox::Column::Id.is_in(delivered.iter().map(|d| d.0)))
                .filter(outbox::Column::State.eq("pending"))
                .exec(&txn)
                .await?;
            tally::Entity::update_many()
                .col_expr(tally::Column::Delivery, Expr::value("delivered"))
                .filter(tally::Column::Id.is_in(delivered.iter().map(|d| d.1)))
                .exec(&txn)
                .await?;
        }
        for (id, outcome, error) in settled.iter().filter(|s| s.1 != Outcome::Delivered) {
            let Some((next_at_ms, attempts, tally_id)) = pending.get(id) else {
                continue;
            };
            let error: String = error.chars().take(200).collect();
            let (state, next_at, delivery) = match outcome {
                Outcome::Retry => (
                    "pending",
                    now + backoff_ms(*attempts),
                    format!("retrying: {error}"),
                ),
                _ => ("refused", *next_at_ms, format!("refused: {error}")),
            };
            outbox::Entity::update_many()
                .col_expr(outbox::Column::State, Expr::value(state))
                .col_expr(outbox::Column::NextAtMs, Expr::value(next_at))
                .col_expr(outbox::Column::Attempts, Expr::value(attempts.saturating_add(1)))
                .col_expr(outbox::Column::LastError, Expr::value(error))
                .col_expr(
                    outbox::Column::SettledAtMs,
                    Expr::value((state != "pending").then_some(now)),
                )
                .filter(outbox::Column::Id.eq(*id))
                .filter(outbox::Column::State.eq("pending"))
                .exec(&txn)
                .await?;
            tally::Entity::update_many()
                .col_expr(tally::Column::Delivery, Expr::value(delivery))
                .filter(tally::Column::Id.eq(tally_id))
                .exec(&txn)
                .await?;
        }
        txn.commit().await?;
        // The tallies' next messages, if any, are now the heads of their queues.
        self.wake.notify_waiters();
        Ok(())
    }

    /// Pending messages per peer site (by its key's pin).
    pub async fn outbox_depth(&self) -> Result<HashMap<String, u32>, TallyError> {
        let counts: Vec<(String, i64)> = outbox::Entity::find()
            .select_only()
            .column(outbox::Column::PeerSitePin)
            .column_as(outbox::Column::Id.count(), "n")
            .filter(outbox::Column::State.eq("pending"))
            .group_by(outbox::Column::PeerSitePin)
            .into_tuple()
            .all(&self.db)
            .await?;
        Ok(counts
            .into_iter()
            .map(|(pin, n)| (pin, u32::try_from(n).unwrap_or(u32::MAX)))
            .collect())
    }
}

/// The note a leased message carries until it is settled.
const LEASED: &str = "leased";

/// The wait before the next attempt after `attempts` failed ones: full
/// jitter over 1 s doubling up to [`MAX_BACKOFF`], never under 100 ms.
fn backoff_ms(attempts: i32) -> i64 {
    let cap = i64::try_from(MAX_BACKOFF.as_millis()).unwrap_or(300_000);
    let exp = 1000_i64.saturating_mul(1_i64 << attempts.clamp(0, 20)).min(cap);
    let mut r = [0u8; 8];
    let random = if getrandom::fill(&mut r).is_ok() {
        u64::from_le_bytes(r)
    } else {
        0
    };
    let jitter = i64::try_from(random % u64::try_from(exp).unwrap_or(1).max(1)).unwrap_or(0);
    jitter.max(100)
}

/// A uniqueness violation while recording: another step got there first.
fn taken(e: sea_orm::DbErr, tally: &str) -> TallyError {
    if is_unique_violation(&e) {
        TallyError::Conflict(format!("tally {tally} changed meanwhile; try again"))
    } else {
        TallyError::Store(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_and_never_zero() {
        for attempts in [0, 1, 5, 12, 40, -3] {
            for _ in 0..50 {
                let ms = backoff_ms(attempts);
                assert!((100..=300_000).contains(&ms), "{attempts}: {ms}");
            }
        }
        // Early attempts stay within their window.
        assert!((0..50).all(|_| backoff_ms(0) <= 1000));
    }
}
