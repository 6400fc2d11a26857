//! ticket: one-time, expiring invitations to connect without key material.
//!
//! * A token is 256 random bits, shown once (in the issue response) and kept
//!   only as its SHA-256.
//! * The first redemption attempt of any kind burns the ticket: one
//!   conditional `UPDATE … WHERE token_hash = ? AND closed_at_ms IS NULL
//!   RETURNING …` claims it, so of any number of concurrent attempts exactly
//!   one sees the row; only then are kind, expiry and CHIP ID judged.
//! * Expiry is judged at redemption; there is no clean-up job.
//! * Every refusal looks the same from outside (`PERMISSION_DENIED`, "ticket
//!   refused"); the audit log keeps the reason, never the token.
//! * Failed attempts are throttled per source.

mod grpc;
pub mod render;
pub mod store;

use std::time::Duration;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend,
    EntityTrait, QueryFilter, QueryOrder, QuerySelect, Statement, sea_query::Expr,
};
use sha2::{Digest, Sha256};

use chipsite_proto::status::ErrorCode;
use chipsite_store::Clock;
pub use chipsite_tls::Throttle;
pub use grpc::{TicketsGrpc, policy};
use store::{audit, ticket};

/// Lifetime of a ticket when the issuer names none.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest lifetime a ticket may have.
pub const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Longest token accepted for hashing (tokens we issue are 43 characters).
const MAX_TOKEN_LEN: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum TicketError {
    /// The one answer to every failed redemption.
    #[error("ticket refused")]
    Refused,
    #[error("{0}")]
    InvalidArgument(String),
    #[error("ticket {0} not found")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("database: {0}")]
    Store(#[from] sea_orm::DbErr),
    #[error("random number generator: {0}")]
    Random(String),
}

impl TicketError {
    /// The site-wide code of this error (carried across gRPC).
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Refused => ErrorCode::Refused,
            Self::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::FailedPrecondition(_) => ErrorCode::FailedPrecondition,
            Self::Store(_) | Self::Random(_) => ErrorCode::Internal,
        }
    }
}

impl From<TicketError> for tonic::Status {
    fn from(e: TicketError) -> Self {
        match e.code() {
            ErrorCode::Internal => chipsite_proto::status::internal(&e),
            code => chipsite_proto::status::status(code, e.to_string()),
        }
    }
}

pub use chipsite_model::ticket::CONSOLE_SUBJECT;

/// What a ticket is for (the shared domain type).
pub use chipsite_model::TicketKind as Kind;

/// What the issuer gets back: the only time the token exists in the clear.
pub struct Issued {
    pub ticket: ticket::Model,
    pub token: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("ticket", &self.ticket.id)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// The state a ticket shows in listings: outstanding tickets past their
/// expiry show as "expired".
pub fn visible_state(t: &ticket::Model, now: i64) -> &str {
    if t.state == "outstanding" && t.expires_at_ms <= now {
        "expired"
    } else {
        &t.state
    }
}

pub struct Tickets {
    db: DatabaseConnection,
    throttle: Throttle,
    clock: Clock,
    retention: Duration,
}

/// How long closed tickets and audit records are kept unless configured.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(90 * 86_400);
/// How often the retention sweep runs.
const SWEEP_EVERY: Duration = Duration::from_secs(3600);

impl std::fmt::Debug for Tickets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tickets").finish_non_exhaustive()
    }
}

fn random_bytes<const N: usize>() -> Result<[u8; N], TicketError> {
    let mut buf = [0u8; N];
    getrandom::fill(&mut buf).map_err(|e| TicketError::Random(e.to_string()))?;
    Ok(buf)
}

fn hash_token(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

impl Tickets {
    pub async fn open(db: DatabaseConnection) -> Result<Self, TicketError> {
        chipsite_store::migrate::<store::Migrator>(&db).await?;
        Ok(Self {
            db,
            throttle: Throttle::default(),
            clock: Clock::default(),
            retention: DEFAULT_RETENTION,
        })
    }

    /// Keep closed tickets and audit records this long.
    pub fn with_retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// Sweep by the configured retention every hour, for ever; a failed
    /// sweep is logged and retried at the next.
    pub async fn sweep_forever(&self) {
        let mut every = tokio::time::interval(SWEEP_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            if let Err(e) = self.sweep(self.retention).await {
                tracing::warn!(error = %e, "ticket retention sweep failed; retrying in an hour");
            }
        }
    }

    /// Judge issue and expiry times by `clock` (tests move it forward).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Now, by this service's clock (Unix milliseconds).
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    pub async fn issue(
        &self,
        kind: Kind,
        chip_id: &str,
        ttl: Duration,
        host: &str,
        port: u16,
        issued_by: &str,
    ) -> Result<Issued, TicketError> {
        if !is_chip_id(chip_id) {
            return Err(TicketError::InvalidArgument(
                "chip_id must be 1-64 of a-z, 0-9, '.', '_', '-', starting with a letter or digit".into(),
            ));
        }
        let hostlike = host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c));
        if host.is_empty() || host.len() > 255 || !hostlike || port == 0 {
            return Err(TicketError::InvalidArgument(
                "a ticket needs the host and port to connect to".into(),
            ));
        }
        let ttl = if ttl.is_zero() { DEFAULT_TTL } else { ttl };
        if ttl > MAX_TTL {
            return Err(TicketError::InvalidArgument(format!(
                "ttl may be at most {} days",
                MAX_TTL.as_secs() / 86400
            )));
        }
        let token = URL_SAFE_NO_PAD.encode(random_bytes::<32>()?);
        let id = format!("tkt_{}", hex(&random_bytes::<10>()?));
        let now = self.clock.now_ms();
        // The row is the record of issuance; attempts are what the audit log counts.
        let row = ticket::ActiveModel {
            id: Set(id),
            kind: Set(kind.as_str().to_owned()),
            chip_id: Set(chip_id.to_owned()),
            host: Set(host.to_owned()),
            port: Set(i32::from(port)),
            token_hash: Set(hash_token(&token)),
            created_at_ms: Set(now),
            expires_at_ms: Set(now + ttl.as_millis() as i64),
            state: Set("outstanding".to_owned()),
            closed_at_ms: Set(None),
            issued_by: Set(issued_by.chars().filter(|c| !c.is_control()).take(80).collect()),
        }
        .insert(&self.db)
        .await?;
        Ok(Issued { ticket: row, token })
    }

    /// Redeem a ticket. The first attempt that is not throttled burns it;
    /// only a valid, unexpired ticket of the right kind for the right CHIP
    /// ID, with no `refusal` from the redeemer, succeeds. A throttled source
    /// claims nothing.
    pub async fn redeem(
        &self,
        kind: Kind,
        token: &str,
        chip_id: &str,
        source: &str,
        refusal: Option<&str>,
    ) -> Result<ticket::Model, TicketError> {
        let refusal = refusal.unwrap_or("");
        if refusal.len() > 16 || !refusal.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
            return Err(TicketError::InvalidArgument(
                "a refusal is 1-16 of a-z and '_'".into(),
            ));
        }
        // Whatever arrives must reach the database as valid text (PostgreSQL
        // refuses NUL), so that every attempt burns and leaves its record.
        let source: String = source.chars().filter(|c| !c.is_control()).take(128).collect();
        let chip_id = if is_chip_id(chip_id) { chip_id } else { "" };
        // Checked and charged in one step before anything else, refunded on
        // success (an attempt whose caller goes away mid-call still counts).
        // A throttled attempt claims nothing: the ticket it names stays good
        // for its owner, whoever else shares the address.
        let Some(charged) = self.throttle.begin(&source) else {
            self.record_refusal(None, "throttled", &source).await?;
            tracing::info!(source = %source, "ticket attempt throttled (nothing claimed)");
            return Err(TicketError::Refused);
        };
        let hash = hash_token(if token.len() > MAX_TOKEN_LEN { "" } else { token });
        let attempt = Attempt {
            refusal,
            kind: kind.as_str(),
            now: self.clock.now_ms(),
            chip_id,
            hash: &hash,
            source: &source,
        };
        let claimed = match self.db.get_database_backend() {
            DbBackend::Postgres => self.claim_postgres(&attempt).await?,
            _ => self.claim_in_transaction(&attempt).await?,
        };
        match claimed {
            Some(t) if t.state == "redeemed" => {
                charged.succeeded();
                Ok(t)
            }
            Some(t) => {
                // Burned; the audit row with the reason is already written.
                tracing::info!(ticket = %t.id, source = %source, "ticket refused");
                Err(TicketError::Refused)
            }
            None => {
                // Nothing to claim: used, revoked or unknown.
                let known = ticket::Entity::find()
                    .filter(ticket::Column::TokenHash.eq(hash.clone()))
                    .one(&self.db)
                    .await?;
                let outcome = match &known {
                    None => "refused_unknown",
                    Some(t) if t.state == "revoked" => "refused_revoked",
                    Some(_) => "refused_used",
                };
                self.record_refusal(known.as_ref().map(|t| t.id.as_str()), outcome, &source)
                    .await?;
                tracing::info!(source = %source, outcome, "ticket refused (nothing to claim)");
                Err(TicketError::Refused)
            }
        }
    }

    /// Audit a refusal that claimed nothing. Repeats from one source (same
    /// outcome, same ticket or none) within [`COLLAPSE_WINDOW_MS`] of the last
    /// one add to that record's `count` instead of adding rows, so a flood
    /// costs one row per source and minute, not one per attempt.
    async fn record_refusal(
        &self,
        ticket_id: Option<&str>,
        outcome: &str,
        source: &str,
    ) -> Result<(), TicketError> {
        let now = self.clock.now_ms();
        let collapsed = self
            .execute(
                "UPDATE ticket_audit SET count = count + 1, at_ms = $1 WHERE id = \
                 (SELECT id FROM ticket_audit WHERE source = $2 AND outcome = $3 \
                  AND COALESCE(ticket_id, '') = $4 AND at_ms > $5 ORDER BY id DESC LIMIT 1)",
                vec![
                    now.into(),
                    source.into(),
                    outcome.into(),
                    ticket_id.unwrap_or("").into(),
                    (now - COLLAPSE_WINDOW_MS).into(),
                ],
            )
            .await?;
        if collapsed == 0 {
            self.audit(&self.db, ticket_id, outcome, source).await?;
        }
        Ok(())
    }

    /// One statement with `$N` parameters, on either engine; the rows it changed.
    async fn execute(&self, sql: &str, values: Vec<sea_orm::Value>) -> Result<u64, TicketError> {
        let backend = self.db.get_database_backend();
        let sql = if backend == DbBackend::Postgres {
            sql.to_owned()
        } else {
            sql.replace('$', "?")
        };
        Ok(self
            .db
            .execute_raw(Statement::from_sql_and_values(backend, sql, values))
            .await?
            .rows_affected())
    }

    /// Delete tickets closed (or expired) and audit records older than
    /// `retention`. Returns how many of each went.
    pub async fn sweep(&self, retention: Duration) -> Result<(u64, u64), TicketError> {
        let cutoff = self.clock.now_ms() - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        let tickets = ticket::Entity::delete_many()
            .filter(
                sea_orm::Condition::any()
                    .add(ticket::Column::ClosedAtMs.lt(cutoff))
                    .add(
                        sea_orm::Condition::all()
                            .add(ticket::Column::ClosedAtMs.is_null())
                            .add(ticket::Column::ExpiresAtMs.lt(cutoff)),
                    ),
            )
            .exec(&self.db)
            .await?
            .rows_affected;
        let audits = audit::Entity::delete_many()
            .filter(audit::Column::AtMs.lt(cutoff))
            .exec(&self.db)
            .await?
            .rows_affected;
        if tickets + audits > 0 {
            tracing::info!(tickets, audit_records = audits, "retention sweep");
        }
        Ok((tickets, audits))
    }

    /// PostgreSQL: claim, decide and audit in one statement (one round trip).
    async fn claim_postgres(&self, a: &Attempt<'_>) -> Result<Option<ticket::Model>, TicketError> {
        let sql = format!(
            "WITH claimed AS ({CLAIM} RETURNING {COLUMNS}), \
             audited AS (INSERT INTO ticket_audit (ticket_id, outcome, source, at_ms, count) \
                         SELECT id, {OUTCOME}, $5, $2, 1 FROM claimed) \
             SELECT * FROM claimed"
        );
        let stmt = Statement::from_sql_and_values(DbBackend::Postgres, sql, a.values());
        Ok(ticket::Entity::find().from_raw_sql(stmt).one(&self.db).await?)
    }

    /// SQLite (no data-modifying CTEs): the same statements in one transaction.
    async fn claim_in_transaction(&self, a: &Attempt<'_>) -> Result<Option<ticket::Model>, TicketError> {
        let backend = self.db.get_database_backend();
        let numbered = |sql: String| sql.replace('$', "?");
        let txn = chipsite_store::begin_write(&self.db).await?;
        let claim = Statement::from_sql_and_values(
            backend,
            numbered(format!("{CLAIM} RETURNING {COLUMNS}")),
            a.values(),
        );
        let Some(t) = ticket::Entity::find().from_raw_sql(claim).one(&txn).await? else {
            txn.rollback().await?;
            return Ok(None);
        };
        let mut values = a.values();
        values.push(t.id.clone().into());
        let audit = numbered(format!(
            "INSERT INTO ticket_audit (ticket_id, outcome, source, at_ms, count) \
             SELECT id, {OUTCOME}, $5, $2, 1 FROM ticket_tickets WHERE id = $7"
        ));
        txn.execute_raw(Statement::from_sql_and_values(backend, audit, values))
            .await?;
        txn.commit().await?;
        Ok(Some(t))
    }

    async fn audit(
        &self,
        db: &impl ConnectionTrait,
        ticket_id: Option<&str>,
        outcome: &str,
        source: &str,
    ) -> Result<(), TicketError> {
        audit::ActiveModel {
            ticket_id: Set(ticket_id.map(str::to_owned)),
            outcome: Set(outcome.to_owned()),
            source: Set(source.to_owned()),
            at_ms: Set(self.clock.now_ms()),
            count: Set(1),
            ..Default::default()
        }
        .insert(db)
        .await?;
        Ok(())
    }

    pub async fn list(
        &self,
        chip_id: Option<&str>,
        include_closed: bool,
        limit: u64,
    ) -> Result<Vec<ticket::Model>, TicketError> {
        let mut q = ticket::Entity::find().order_by_desc(ticket::Column::CreatedAtMs);
        if let Some(c) = chip_id {
            q = q.filter(ticket::Column::ChipId.eq(c));
        }
        if !include_closed {
            q = q
                .filter(ticket::Column::ClosedAtMs.is_null())
                .filter(ticket::Column::ExpiresAtMs.gt(self.clock.now_ms()));
        }
        Ok(q.limit(limit.clamp(1, 1000)).all(&self.db).await?)
    }

    /// Revoke an outstanding ticket. Revoking a closed ticket is an error.
    pub async fn revoke(&self, id: &str) -> Result<ticket::Model, TicketError> {
        let now = self.clock.now_ms();
        let txn = chipsite_store::begin_write(&self.db).await?;
        let closed = ticket::Entity::update_many()
            .col_expr(ticket::Column::State, Expr::value("revoked"))
            .col_expr(ticket::Column::ClosedAtMs, Expr::value(now))
            .filter(ticket::Column::Id.eq(id))
            .filter(ticket::Column::ClosedAtMs.is_null())
            .exec_with_returning(&txn)
            .await?;
        match closed.into_iter().next() {
            Some(t) => {
                self.audit(&txn, Some(id), "revoked", "").await?;
                txn.commit().await?;
                Ok(t)
            }
            None => match ticket::Entity::find_by_id(id.to_owned()).one(&self.db).await? {
                Some(t) => Err(TicketError::FailedPrecondition(format!(
                    "ticket {id} is already {}",
                    t.state
                ))),
                None => Err(TicketError::NotFound(id.to_owned())),
            },
        }
    }

    pub async fn audit_log(
        &self,
        ticket_id: Option<&str>,
        limit: u64,
        contains: &str,
        before_id: i64,
    ) -> Result<Vec<audit::Model>, TicketError> {
        let mut q = audit::Entity::find().order_by_desc(audit::Column::Id);
        if before_id != 0 {
            q = q.filter(audit::Column::Id.lt(before_id));
        }
        if let Some(t) = ticket_id {
            q = q.filter(audit::Column::TicketId.eq(t));
        }
        if !contains.is_empty() {
            q = q.filter(chipsite_store::contains_any(
                &[
                    audit::Column::TicketId,
                    audit::Column::Outcome,
                    audit::Column::Source,
                ],
                contains,
            ));
        }
        Ok(q.limit(limit.clamp(1, 10_000)).all(&self.db).await?)
    }
}

/// One redemption attempt, as the parameters of [`CLAIM`] and [`OUTCOME`].
struct Attempt<'a> {
    /// The redeemer's own reason to refuse ("" for none).
    refusal: &'a str,
    kind: &'a str,
    now: i64,
    chip_id: &'a str,
    hash: &'a [u8],
    source: &'a str,
}

impl Attempt<'_> {
    /// `$1` kind, `$2` now, `$3` CHIP ID, `$4` token hash, `$5` source,
    /// `$6` the redeemer's refusal.
    fn values(&self) -> Vec<sea_orm::Value> {
        vec![
            self.kind.into(),
            self.now.into(),
            self.chip_id.into(),
            self.hash.to_vec().into(),
            self.source.into(),
            self.refusal.into(),
        ]
    }
}

/// Claims the ticket a token names, if it is still open, and decides in the
/// same step whether it is redeemed or burned. Of any number of concurrent
/// attempts exactly one sees the row (PostgreSQL re-checks the `WHERE` after
/// the row lock; SQLite serializes writers).
const CLAIM: &str = "UPDATE ticket_tickets SET \
     state = CASE WHEN kind = $1 AND expires_at_ms > $2 AND chip_id = $3 AND $6 = '' \
                  THEN 'redeemed' ELSE 'burned' END, \
     closed_at_ms = $2 \
     WHERE token_hash = $4 AND closed_at_ms IS NULL";

/// The ticket columns a claim returns, named: with `RETURNING *`, an SQLite
/// connection opened before a migration added a column prepares the
/// statement against the old schema, re-prepares it when it runs, and the
/// driver (sqlx 0.9) panics on the extra column.
const COLUMNS: &str = "id, kind, chip_id, host, port, token_hash, created_at_ms, expires_at_ms, state, \
     closed_at_ms, issued_by";

/// Why, for the audit record: the same judgement as [`CLAIM`], spelled out.
const OUTCOME: &str = "CASE WHEN kind <> $1 THEN 'refused_kind' \
     WHEN expires_at_ms <= $2 THEN 'refused_expired' \
     WHEN chip_id <> $3 THEN 'refused_chip_id' \
     WHEN $6 <> '' THEN 'refused_' || $6 \
     ELSE 'redeemed' END";

/// Repeated refusals from one source within this window share one audit record.
pub const COLLAPSE_WINDOW_MS: i64 = 60_000;

pub use chipsite_model::is_chip_id;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Serve the ticket service on an already-bound `listener` over internal
/// mutual TLS (`tls`) until `shutdown`, asking key-vault (`key_vault`) for
/// the site key: the entry point of the same shape every service crate has.
pub async fn serve(
    tickets: std::sync::Arc<Tickets>,
    key_vault: chipsite_tls::InternalChannel,
    listener: tokio::net::TcpListener,
    tls: std::sync::Arc<chipsite_tls::ReloadableTls>,
    bench: bool,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), chipsite_grpc_server::ServeError> {
    type S = chipsite_proto::ticket::v1::tickets_server::TicketsServer<TicketsGrpc>;
    let sweeper = tickets.clone();
    let svc = S::new(TicketsGrpc::new(tickets, key_vault, bench));
    // Every ticket operation is a single atomic statement (or transaction), so
    // a call cut short leaves nothing half done: no extra task per call on
    // this hot path.
    let served = async {
        chipsite_grpc_server::serve_with!([svc => S], policy(bench), false, listener, tls, shutdown)
    };
    // The sweeper never ends by itself; the server's end ends it.
    tokio::select! {
        served = served => served,
        () = sweeper.sweep_forever() => Err(chipsite_grpc_server::ServeError::TaskEnded(
            "ticket: the retention sweeper ended".into(),
        )),
    }
}
