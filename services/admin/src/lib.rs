//! admin: the site's users, configuration defaults, lockdown, peer-server
//! desired state, first launch (init scripts), and AdminService — every
//! administration command of the seed design note.

mod alarms;
pub mod events;
mod events_grpc;
mod grpc;
pub mod notify;
mod settings;
pub mod store;

use std::{collections::BTreeMap, path::Path};

use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, Condition, ConnectionTrait, DatabaseConnection,
    DbBackend, EntityTrait, FromQueryResult, Order, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect,
    Statement, sea_query::OnConflict,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use alarms::NewAlarm;
use chipsite_proto::status::ErrorCode;
use chipsite_store::{is_unique_violation, now_ms};
pub use events::Hub;
pub use events_grpc::UserEventsGrpc;
pub use grpc::{AdminGrpc, policy};
pub use notify::Notifier;
use store::{audit, init_script, setting, user};

/// `http(s)://host:port` (no path) → host, port.
pub fn parse_http_url(url: &str) -> Option<(String, u16)> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))?
        .trim_end_matches('/');
    let (host, port) = rest.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p > 0)?;
    let ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-[]:".contains(c));
    ok.then(|| {
        (
            host.trim_start_matches('[').trim_end_matches(']').to_owned(),
            port,
        )
    })
}

/// The dump format name.
pub const DUMP_FORMAT: &str = "chipsite.user.v1";

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("user {0:?} not found")]
    UserNotFound(String),
    #[error("user {0:?} already exists")]
    UserExists(String),
    #[error("bad user dump: {0}")]
    BadDump(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("init script {name}: {message}")]
    InitScript { name: String, message: String },
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("database: {0}")]
    Store(#[from] sea_orm::DbErr),
}

impl AdminError {
    /// The site-wide code of this error (carried across gRPC).
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidArgument(_) | Self::BadDump(_) => ErrorCode::InvalidArgument,
            Self::UserNotFound(_) | Self::NotFound(_) => ErrorCode::NotFound,
            Self::Unavailable(_) => ErrorCode::Unavailable,
            Self::UserExists(_) => ErrorCode::AlreadyExists,
            Self::FailedPrecondition(_) => ErrorCode::FailedPrecondition,
            Self::InitScript { .. } | Self::Store(_) => ErrorCode::Internal,
        }
    }
}

impl From<AdminError> for tonic::Status {
    fn from(e: AdminError) -> Self {
        match e.code() {
            ErrorCode::Internal => chipsite_proto::status::internal(&e),
            code => chipsite_proto::status::status(code, e.to_string()),
        }
    }
}

/// A user's editable data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserData {
    pub name: String,
    pub address: String,
    pub email: String,
    pub phone: String,
}

/// Changes to a user; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct UserChanges {
    pub name: Option<String>,
    pub address: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub status: Option<String>,
}

/// A user as dumped to and loaded from JSON (format "chipsite.user.v1").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserDump {
    pub format: String,
    pub chip_id: String,
    pub name: String,
    pub address: String,
    pub contact: DumpContact,
    pub status: String,
    pub locked: bool,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// base64url SPKI DER of the user's registered key, if any.
    pub public_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DumpContact {
    pub email: String,
    pub phone: String,
}

pub fn validate_chip_id(chip_id: &str) -> Result<(), AdminError> {
    chipsite_model::ChipId::parse(chip_id)
        .map(|_| ())
        .map_err(|e| AdminError::InvalidArgument(e.to_string()))
}

fn validate_data(d: &UserData) -> Result<(), AdminError> {
    let bad = |m: &str| Err(AdminError::InvalidArgument(m.to_owned()));
    if d.name.trim().is_empty() || d.name.chars().count() > 200 {
        return bad("name must have 1 to 200 characters");
    }
    if d.address.chars().count() > 1000 {
        return bad("address may have at most 1000 characters");
    }
    if !d.email.is_empty()
        && (d.email.len() > 254 || !d.email.contains('@') || d.email.chars().any(|c| c.is_whitespace()))
    {
        return bad("email must look like name@domain");
    }
    if d.phone.len() > 32 || !d.phone.chars().all(|c| c.is_ascii_digit() || "+-() ".contains(c)) {
        return bad("phone may hold digits, spaces and + - ( ), at most 32 characters");
    }
    Ok(())
}

/// Whether a user may not connect: locked down, or an account that is not
/// active (suspended or closed). Gateways see both as a lockdown.
pub fn is_barred(u: &user::Model) -> bool {
    barred(u.locked, &u.status)
}

fn barred(locked: bool, status: &str) -> bool {
    locked || chipsite_model::AccountStatus::parse(status) != Some(chipsite_model::AccountStatus::Active)
}

/// Which users a list shows and in what order (see `ListUsersRequest`).
#[derive(Debug, Default, Clone, Copy)]
pub struct UserList<'a> {
    /// Substring of CHIP ID or name; empty: all.
    pub query: &'a str,
    /// Only this status; empty: any.
    pub status: &'a str,
    pub locked: Option<bool>,
    /// `chip_id` (or empty), `name`, `status` or `created`; `-` first reverses.
    pub sort: &'a str,
    /// The previous page's `next_page_token`; empty: the first page.
    pub page_token: &'a str,
}

/// One page of a user list.
#[derive(Debug)]
pub struct UserPage {
    pub users: Vec<user::Model>,
    /// How many match on all pages.
    pub total: u64,
    /// Empty on the last page.
    pub next_page_token: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SortKey {
    ChipId,
    Name,
    Status,
    Created,
}

impl SortKey {
    fn column(self) -> user::Column {
        match self {
            Self::ChipId => user::Column::ChipId,
            Self::Name => user::Column::Name,
            Self::Status => user::Column::Status,
            Self::Created => user::Column::CreatedAtMs,
        }
    }
}

/// A user list's order: a key, then CHIP ID, both the same direction.
/// Pages are keyset pages: a token holds the last row's key and CHIP ID,
/// so rows written between pages neither repeat nor vanish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct UserSort {
    key: SortKey,
    descending: bool,
}

impl UserSort {
    fn parse(s: &str) -> Result<Self, AdminError> {
        let (descending, name) = match s.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let key = match name {
            "" | "chip_id" => SortKey::ChipId,
            "name" => SortKey::Name,
            "status" => SortKey::Status,
            "created" => SortKey::Created,
            _ => {
                return Err(AdminError::InvalidArgument(
                    "sort must be chip_id, name, status or created, with an optional leading -".into(),
                ));
            }
        };
        Ok(Self { key, descending })
    }

    fn name(self) -> String {
        let key = match self.key {
            SortKey::ChipId => "chip_id",
            SortKey::Name => "name",
            SortKey::Status => "status",
            SortKey::Created => "created",
        };
        format!("{}{key}", if self.descending { "-" } else { "" })
    }

    /// The token of the page after `last`. Sorted by CHIP ID ascending it
    /// is the CHIP ID alone, as it always was; otherwise
    /// `<sort>:<chip_id>:<key value>` (a CHIP ID holds no `:`).
    fn token(self, last: &user::Model) -> String {
        let value = match self.key {
            SortKey::ChipId if !self.descending => return last.chip_id.clone(),
            SortKey::ChipId => last.chip_id.clone(),
            SortKey::Name => last.name.clone(),
            SortKey::Status => last.status.clone(),
            SortKey::Created => last.created_at_ms.to_string(),
        };
        format!("{}:{}:{value}", self.name(), last.chip_id)
    }

    /// The rows after the page `token` ends, or `None` for the first page.
    fn cursor(self, token: &str) -> Result<Option<Condition>, AdminError> {
        if token.is_empty() {
            return Ok(None);
        }
        let stale = || AdminError::InvalidArgument("page_token does not belong to this list's sort".into());
        let (chip_id, value) = if self.key == SortKey::ChipId && !self.descending && !token.contains(':') {
            (token, sea_orm::Value::from(token))
        } else {
            let mut parts = token.splitn(3, ':');
            let (Some(sort), Some(chip_id), Some(value)) = (parts.next(), parts.next(), parts.next()) else {
                return Err(stale());
            };
            if sort != self.name() {
                return Err(stale());
            }
            let value = match self.key {
                SortKey::Created => sea_orm::Value::from(value.parse::<i64>().map_err(|_| stale())?),
                _ => sea_orm::Value::from(value),
            };
            (chip_id, value)
        };
        let beyond = |col: user::Column, v: sea_orm::Value| {
            if self.descending { col.lt(v) } else { col.gt(v) }
        };
        Ok(Some(if self.key == SortKey::ChipId {
            Condition::all().add(beyond(user::Column::ChipId, chip_id.into()))
        } else {
            let col = self.key.column();
            Condition::any().add(beyond(col, value.clone())).add(
                Condition::all()
                    .add(col.eq(value))
                    .add(beyond(user::Column::ChipId, chip_id.into())),
            )
        }))
    }
}

fn validate_status(s: &str) -> Result<(), AdminError> {
    use chipsite_model::AccountStatus;
    match AccountStatus::parse(s) {
        Some(_) => Ok(()),
        None => Err(AdminError::InvalidArgument(format!(
            "status must be one of {}",
            AccountStatus::ALL.map(AccountStatus::as_str).join(", ")
        ))),
    }
}

/// Site configuration keys, their defaults, and what values they take.
pub fn config_defaults() -> BTreeMap<&'static str, &'static str> {
    BTreeMap::from([
        ("site.name", "chipsite"),
        ("ticket.ttl_seconds", "86400"),
        ("user_gateway.host", "127.0.0.1"),
        ("user_gateway.port", "44301"),
        ("peer_gateway.host", "127.0.0.1"),
        ("peer_gateway.port", "44302"),
        ("alarm.email_from", "chipsite@localhost"),
        ("alarm.sms_webhook", ""),
        ("alarm.smtp_url", ""),
        ("console.url", "http://127.0.0.1:44303"),
    ])
}

fn validate_config(key: &str, value: &str) -> Result<(), AdminError> {
    let bad = |m: String| Err(AdminError::InvalidArgument(m));
    if !config_defaults().contains_key(key) {
        return bad(format!(
            "unknown configuration key {key:?}; known keys: {}",
            config_defaults().keys().copied().collect::<Vec<_>>().join(", ")
        ));
    }
    match key {
        "ticket.ttl_seconds" => match value.parse::<u32>() {
            Ok(n) if (60..=30 * 86400).contains(&n) => Ok(()),
            _ => bad("ticket.ttl_seconds must be a whole number from 60 to 2592000".into()),
        },
        k if k.ends_with(".port") => match value.parse::<u16>() {
            Ok(n) if n > 0 => Ok(()),
            _ => bad(format!("{k} must be a port number from 1 to 65535")),
        },
        k if k.ends_with(".host") => {
            if !value.is_empty()
                && value.len() <= 255
                && value
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-:".contains(c))
            {
                Ok(())
            } else {
                bad(format!("{k} must be a host name or IP address"))
            }
        }
        "site.name" if value.trim().is_empty() || value.len() > 100 => {
            bad("site.name must have 1 to 100 characters".into())
        }
        "alarm.sms_webhook" if !(value.is_empty() || value.starts_with("http://")) => {
            bad("alarm.sms_webhook must be empty or an http:// URL".into())
        }
        "console.url" if parse_http_url(value).is_none() => {
            bad("console.url must be http(s)://host:port".into())
        }
        "alarm.smtp_url" if !(value.is_empty() || notify::parse_smtp_url(value).is_some()) => {
            bad("alarm.smtp_url must be empty or smtp://host:port".into())
        }
        _ if value.len() > 1000 => bad(format!("{key} is too long")),
        _ => Ok(()),
    }
}

/// A user dump that does not parse, in an operator's words: where (the
/// line, and the field when there is one) and what is wrong, rather than the
/// parser's wording ("line 3: `chip_id` must be a string, not integer `7`").
fn dump_error_words(e: &serde_path_to_error::Error<serde_json::Error>) -> String {
    use serde_json::error::Category;
    let inner = e.inner();
    let line = inner.line();
    let text = inner.to_string();
    // serde_json appends " at line L column C"; the line is said first instead.
    let what = text.rsplit_once(" at line ").map_or(text.as_str(), |(w, _)| w);
    match inner.classify() {
        Category::Eof => format!("the file ends too soon, on line {line}: it is not one whole JSON object"),
        Category::Syntax => format!(
            "line {line}, column {}: this is not JSON ({what})",
            inner.column()
        ),
        Category::Data | Category::Io => {
            let said = if let Some(rest) = what.strip_prefix("invalid type: ") {
                match rest.split_once(", expected ") {
                    Some((found, wanted)) => format!("must be {wanted}, not {found}"),
                    None => what.to_owned(),
                }
            } else if let Some(rest) = what.strip_prefix("invalid value: ") {
                match rest.split_once(", expected ") {
                    Some((found, wanted)) => format!("must be {wanted}, not {found}"),
                    None => what.to_owned(),
                }
            } else if let Some(rest) = what.strip_prefix("missing field ") {
                return format!("line {line}: the field {rest} is missing");
            } else if let Some(rest) = what.strip_prefix("unknown field ") {
                let field = rest.split_once(", expected").map_or(rest, |(f, _)| f);
                return format!("line {line}: {field} is not a field of a user dump");
            } else {
                what.to_owned()
            };
            match e.path().to_string().as_str() {
                "." | "" => format!("line {line}: {said}"),
                path => format!("line {line}: `{path}` {said}"),
            }
        }
    }
}

/// What stands for a secret in a value shown to a caller.
pub const MASK: &str = "****";

/// A configuration value as callers see it: a password or token inside a URL
/// (`scheme://user:secret@host`, `scheme://token@host`, `?token=…`) replaced
/// by [`MASK`]. The stored value is kept, and setting a key to its masked form
/// leaves it unchanged.
pub fn masked(value: &str) -> String {
    let Some((scheme, rest)) = value.split_once("://") else {
        return value.to_owned();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:{MASK}@{host}"),
            None => format!("{MASK}@{host}"),
        },
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let (query, fragment) = query.split_once('#').map_or((query, None), |(q, f)| (q, Some(f)));
            let pairs: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((k, _)) if names_a_secret(k) => format!("{k}={MASK}"),
                    _ => pair.to_owned(),
                })
                .collect();
            let mut t = format!("{path}?{}", pairs.join("&"));
            if let Some(f) = fragment {
                t.push('#');
                t.push_str(f);
            }
            t
        }
        None => tail.to_owned(),
    };
    format!("{scheme}://{authority}{tail}")
}

/// Whether a query parameter's name says it carries a secret.
fn names_a_secret(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["pass", "secret", "token", "key", "auth", "sig", "credential"]
        .iter()
        .any(|s| name.contains(s))
}

pub(crate) const CONFIG: &str = "config";
const STATE: &str = "state";

pub struct Admin {
    db: DatabaseConnection,
    hub: Hub,
    settings: std::sync::Arc<settings::SettingsCache>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").finish_non_exhaustive()
    }
}

impl Admin {
    /// Admin's database connection (a pool handle), for readiness checks.
    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Open admin's store, building its tables on first launch.
    pub async fn open(db: DatabaseConnection) -> Result<Self, AdminError> {
        chipsite_store::migrate::<store::Migrator>(&db).await?;
        Ok(Self {
            db,
            hub: Hub::local(),
            settings: Default::default(),
        })
    }

    /// Publish user events through `hub` (see [`Hub::for_database`]).
    pub fn with_hub(mut self, hub: Hub) -> Self {
        self.hub = hub;
        self
    }

    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// Tell every gateway that a user's registered key is now `public_key`.
    pub async fn publish_key_changed(&self, chip_id: &str, public_key: Vec<u8>) -> Result<(), AdminError> {
        use chipsite_proto::events::v1::{KeyChange, UserEvent, user_event::Event};
        self.hub
            .publish(vec![UserEvent {
                event: Some(Event::KeyChanged(KeyChange {
                    chip_id: chip_id.to_owned(),
                    public_key,
                })),
            }])
            .await
    }

    /// Announce a lockdown change inside the transaction that writes it
    /// (see [`Hub::publish_in`]); call `done()` on the result after commit.
    async fn publish_lockdown_in(
        &self,
        txn: &impl ConnectionTrait,
        chip_id: &str,
        locked: bool,
    ) -> Result<events::AfterCommit, AdminError> {
        use chipsite_proto::events::v1::{Lockdown, UserEvent, user_event::Event};
        self.hub
            .publish_in(
                txn,
                vec![UserEvent {
                    event: Some(Event::Lockdown(Lockdown {
                        chip_id: chip_id.to_owned(),
                        locked,
                    })),
                }],
            )
            .await
    }

    /// Run every `*.sql` file in `dir` (in name order) that has not run
    /// before, each in one transaction with the record that it ran.
    /// Returns the names of the scripts that ran now.
    pub async fn run_init_scripts(&self, dir: &Path) -> Result<Vec<String>, AdminError> {
        let mut names = match std::fs::read_dir(dir) {
            Ok(entries) => entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".sql"))
                .collect::<Vec<_>>(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => {
                return Err(AdminError::InitScript {
                    name: dir.display().to_string(),
                    message: e.to_string(),
                });
            }
        };
        names.sort();
        let mut ran = vec![];
        for name in names {
            let sql = std::fs::read_to_string(dir.join(&name)).map_err(|e| AdminError::InitScript {
                name: name.clone(),
                message: e.to_string(),
            })?;
            let digest = hex(&Sha256::digest(sql.as_bytes()));
            if let Some(done) = init_script::Entity::find_by_id(name.clone())
                .one(&self.db)
                .await?
            {
                if done.sha256 != digest {
                    tracing::warn!(script = %name, "init script changed since it ran; it is not run again");
                }
                continue;
            }
            let txn = chipsite_store::begin_write(&self.db).await?;
            txn.execute_unprepared(&sql)
                .await
                .map_err(|e| AdminError::InitScript {
                    name: name.clone(),
                    message: e.to_string(),
                })?;
            init_script::ActiveModel {
                name: Set(name.clone()),
                sha256: Set(digest),
                ran_at_ms: Set(now_ms()),
            }
            .insert(&txn)
            .await?;
            let committed = txn.commit().await;
            // A script may set configuration.
            self.settings.changed();
            committed?;
            tracing::info!(script = %name, "init script ran");
            ran.push(name);
        }
        Ok(ran)
    }

    /// Create a user and record `actor`'s `create_user` in the audit log
    /// (outcome `ok`) in one commit: on PostgreSQL one statement, on SQLite
    /// one transaction. Returns the user and the audit row's id, so that a
    /// step that undoes the creation can say so ([`Admin::set_audit_outcome`]).
    /// A refusal (a bad CHIP ID, an existing user) writes nothing: the caller
    /// audits it.
    pub async fn create_user(
        &self,
        actor: &str,
        chip_id: &str,
        data: UserData,
    ) -> Result<(user::Model, i64), AdminError> {
        validate_chip_id(chip_id)?;
        validate_data(&data)?;
        let now = now_ms();
        let actor: String = actor.chars().take(64).collect();
        let exists = |e: sea_orm::DbErr| {
            if is_unique_violation(&e) {
                AdminError::UserExists(chip_id.to_owned())
            } else {
                AdminError::Store(e)
            }
        };
        if self.db.get_database_backend() == DbBackend::Postgres {
            let stmt = Statement::from_sql_and_values(
                DbBackend::Postgres,
                "WITH created AS (INSERT INTO admin_users (chip_id, name, address, email, phone, \
                 status, locked, created_at_ms, updated_at_ms) \
                 VALUES ($1, $2, $3, $4, $5, 'active', false, $6, $6) RETURNING *), \
                 audited AS (INSERT INTO admin_audit (at_ms, actor, action, subject, outcome) \
                 SELECT $6, $7, 'create_user', chip_id, 'ok' FROM created RETURNING id) \
                 SELECT created.*, audited.id AS audit_id FROM created, audited",
                [
                    chip_id.into(),
                    data.name.into(),
                    data.address.into(),
                    data.email.into(),
                    data.phone.into(),
                    now.into(),
                    actor.into(),
                ],
            );
            let row = self
                .db
                .query_one_raw(stmt)
                .await
                .map_err(exists)?
                .ok_or_else(|| AdminError::Store(sea_orm::DbErr::RecordNotInserted))?;
            let u = user::Model::from_query_result(&row, "")?;
            let id: i64 = row.try_get("", "audit_id")?;
            return Ok((u, id));
        }
        let txn = chipsite_store::begin_write(&self.db).await?;
        let u = user::ActiveModel::from(user::Model {
            chip_id: chip_id.to_owned(),
            name: data.name,
            address: data.address,
            email: data.email,
            phone: data.phone,
            status: "active".to_owned(),
            locked: false,
            created_at_ms: now,
            updated_at_ms: now,
        })
        .insert(&txn)
        .await
        .map_err(exists)?;
        let a = audit::ActiveModel {
            at_ms: Set(now),
            actor: Set(actor),
            action: Set("create_user".to_owned()),
            subject: Set(u.chip_id.clone()),
            outcome: Set("ok".to_owned()),
            ..Default::default()
        }
        .insert(&txn)
        .await?;
        txn.commit().await?;
        Ok((u, a.id))
    }

    /// Change the outcome of audit record `id` (an action undone after it
    /// was recorded as done).
    pub async fn set_audit_outcome(&self, id: i64, outcome: &str) -> Result<(), AdminError> {
        audit::Entity::update_many()
            .col_expr(
                audit::Column::Outcome,
                sea_orm::sea_query::Expr::value(outcome.chars().take(255).collect::<String>()),
            )
            .filter(audit::Column::Id.eq(id))
            .exec(&self.db)
            .await?;
        Ok(())
    }

    async fn insert_user(&self, u: user::Model) -> Result<user::Model, AdminError> {
        let chip_id = u.chip_id.clone();
        let row: user::ActiveModel = u.into();
        row.insert(&self.db).await.map_err(|e| {
            if is_unique_violation(&e) {
                AdminError::UserExists(chip_id)
            } else {
                AdminError::Store(e)
            }
        })
    }

    pub async fn user(&self, chip_id: &str) -> Result<user::Model, AdminError> {
        user::Entity::find_by_id(chip_id.to_owned())
            .one(&self.db)
            .await?
            .ok_or_else(|| AdminError::UserNotFound(chip_id.to_owned()))
    }

    /// A page of users: those matching `list`, in its order, after its
    /// cursor; with the count of all that match.
    pub async fn list_users(&self, list: &UserList<'_>, size: u64) -> Result<UserPage, AdminError> {
        let sort = UserSort::parse(list.sort)?;
        let after = sort.cursor(list.page_token)?;
        let mut q = user::Entity::find();
        if !list.query.is_empty() {
            q = q.filter(
                Condition::any()
                    .add(user::Column::ChipId.contains(list.query))
                    .add(user::Column::Name.contains(list.query)),
            );
        }
        if !list.status.is_empty() {
            validate_status(list.status)?;
            q = q.filter(user::Column::Status.eq(list.status));
        }
        if let Some(locked) = list.locked {
            q = q.filter(user::Column::Locked.eq(locked));
        }
        let total = q.clone().count(&self.db).await?;
        if let Some(after) = after {
            q = q.filter(after);
        }
        let order = if sort.descending { Order::Desc } else { Order::Asc };
        if sort.key != SortKey::ChipId {
            q = q.order_by(sort.key.column(), order.clone());
        }
        let size = size.clamp(1, 1000);
        let mut users = q
            .order_by(user::Column::ChipId, order)
            .limit(size + 1)
            .all(&self.db)
            .await?;
        let more = users.len() as u64 > size;
        users.truncate(size as usize);
        let next_page_token = match users.last() {
            Some(last) if more => sort.token(last),
            _ => String::new(),
        };
        Ok(UserPage {
            users,
            total,
            next_page_token,
        })
    }

    pub async fn update_user(&self, chip_id: &str, changes: UserChanges) -> Result<user::Model, AdminError> {
        let current = self.user(chip_id).await?;
        let data = UserData {
            name: changes.name.unwrap_or(current.name.clone()),
            address: changes.address.unwrap_or(current.address.clone()),
            email: changes.email.unwrap_or(current.email.clone()),
            phone: changes.phone.unwrap_or(current.phone.clone()),
        };
        validate_data(&data)?;
        let status = changes.status.unwrap_or(current.status.clone());
        validate_status(&status)?;
        let current_status = current.status.clone();
        let mut row: user::ActiveModel = current.into();
        row.name = Set(data.name);
        row.address = Set(data.address);
        row.email = Set(data.email);
        row.phone = Set(data.phone);
        let status_changed = status != current_status;
        row.status = Set(status);
        row.updated_at_ms = Set(now_ms());
        let txn = chipsite_store::begin_write(&self.db).await?;
        let u = row.update(&txn).await?;
        // Gateways treat a user who is not active as locked down: their
        // sessions close, and none opens until the user is active again.
        let announced = if status_changed {
            Some(self.publish_lockdown_in(&txn, chip_id, is_barred(&u)).await?)
        } else {
            None
        };
        txn.commit().await?;
        if let Some(a) = announced {
            a.done();
        }
        Ok(u)
    }

    pub fn dump_of(u: &user::Model, public_key: Option<String>) -> UserDump {
        UserDump {
            format: DUMP_FORMAT.to_owned(),
            chip_id: u.chip_id.clone(),
            name: u.name.clone(),
            address: u.address.clone(),
            contact: DumpContact {
                email: u.email.clone(),
                phone: u.phone.clone(),
            },
            status: u.status.clone(),
            locked: u.locked,
            created_at_ms: u.created_at_ms,
            updated_at_ms: u.updated_at_ms,
            public_key,
        }
    }

    /// Parse and check a dump without writing anything.
    pub fn parse_dump(json: &str) -> Result<UserDump, AdminError> {
        if json.len() > 1 << 20 {
            return Err(AdminError::BadDump("larger than 1 MiB".into()));
        }
        if json.trim().is_empty() {
            return Err(AdminError::BadDump("the file is empty".into()));
        }
        let dump: UserDump = serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(json))
            .map_err(|e| AdminError::BadDump(dump_error_words(&e)))?;
        if dump.format != DUMP_FORMAT {
            return Err(AdminError::BadDump(format!(
                "format must be {DUMP_FORMAT:?}, not {:?}",
                dump.format
            )));
        }
        let wrap = |e: AdminError| AdminError::BadDump(e.to_string());
        validate_chip_id(&dump.chip_id).map_err(wrap)?;
        validate_data(&UserData {
            name: dump.name.clone(),
            address: dump.address.clone(),
            email: dump.contact.email.clone(),
            phone: dump.contact.phone.clone(),
        })
        .map_err(wrap)?;
        validate_status(&dump.status).map_err(wrap)?;
        if dump.created_at_ms < 0 || dump.updated_at_ms < dump.created_at_ms {
            return Err(AdminError::BadDump("timestamps are out of order".into()));
        }
        if let Some(k) = &dump.public_key {
            use base64::Engine;
            let der = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(k)
                .map_err(|_| AdminError::BadDump("public_key must be base64url SPKI DER".into()))?;
            if der.is_empty() || der.len() > 512 {
                return Err(AdminError::BadDump(
                    "public_key must be base64url SPKI DER".into(),
                ));
            }
        }
        Ok(dump)
    }

    /// Insert a user exactly as dumped. The caller registers the key.
    /// Insert the dumped user; returns it and whether this call inserted it.
    /// Loading the same dump again (a retry after a failure further on)
    /// finds the same user and is not an error; a different user of that
    /// CHIP ID is.
    pub async fn load_user(&self, dump: &UserDump) -> Result<(user::Model, bool), AdminError> {
        if let Some(u) = user::Entity::find_by_id(dump.chip_id.clone())
            .one(&self.db)
            .await?
        {
            let same = u.name == dump.name
                && u.address == dump.address
                && u.email == dump.contact.email
                && u.phone == dump.contact.phone
                && u.status == dump.status
                && u.locked == dump.locked
                && u.created_at_ms == dump.created_at_ms;
            return if same {
                Ok((u, false))
            } else {
                Err(AdminError::UserExists(dump.chip_id.clone()))
            };
        }
        self.insert_user(user::Model {
            chip_id: dump.chip_id.clone(),
            name: dump.name.clone(),
            address: dump.address.clone(),
            email: dump.contact.email.clone(),
            phone: dump.contact.phone.clone(),
            status: dump.status.clone(),
            locked: dump.locked,
            created_at_ms: dump.created_at_ms,
            updated_at_ms: dump.updated_at_ms,
        })
        .await
        .map(|u| (u, true))
    }

    /// Undo [`Admin::load_user`] when a later step of loading fails.
    pub async fn unload_user(&self, chip_id: &str) -> Result<(), AdminError> {
        user::Entity::delete_by_id(chip_id.to_owned())
            .exec(&self.db)
            .await?;
        Ok(())
    }

    pub async fn set_user_locked(&self, chip_id: &str, locked: bool) -> Result<user::Model, AdminError> {
        let mut row: user::ActiveModel = self.user(chip_id).await?.into();
        row.locked = Set(locked);
        row.updated_at_ms = Set(now_ms());
        let txn = chipsite_store::begin_write(&self.db).await?;
        let u = row.update(&txn).await?;
        let announced = self.publish_lockdown_in(&txn, chip_id, is_barred(&u)).await?;
        txn.commit().await?;
        announced.done();
        Ok(u)
    }

    async fn setting(&self, scope: &str, key: &str) -> Result<Option<setting::Model>, AdminError> {
        Ok(setting::Entity::find_by_id((scope.to_owned(), key.to_owned()))
            .one(&self.db)
            .await?)
    }

    async fn put_setting(&self, scope: &str, key: &str, value: &str) -> Result<setting::Model, AdminError> {
        let written = self.put_setting_in(&self.db, scope, key, value).await;
        self.settings.changed();
        written
    }

    async fn put_setting_in(
        &self,
        db: &impl ConnectionTrait,
        scope: &str,
        key: &str,
        value: &str,
    ) -> Result<setting::Model, AdminError> {
        let row = setting::ActiveModel {
            scope: Set(scope.to_owned()),
            key: Set(key.to_owned()),
            value: Set(value.to_owned()),
            changed_at_ms: Set(now_ms()),
        };
        setting::Entity::insert(row)
            .on_conflict(
                OnConflict::columns([setting::Column::Scope, setting::Column::Key])
                    .update_columns([setting::Column::Value, setting::Column::ChangedAtMs])
                    .to_owned(),
            )
            .exec(db)
            .await?;
        setting::Entity::find_by_id((scope.to_owned(), key.to_owned()))
            .one(db)
            .await?
            .ok_or_else(|| AdminError::FailedPrecondition(format!("setting {scope}/{key} vanished")))
    }

    /// Whether the user may not connect (see [`is_barred`]) and whether the
    /// site is locked down: one statement, read fresh.
    pub async fn lockdown(&self, chip_id: &str) -> Result<(bool, bool), AdminError> {
        use sea_orm::sea_query::{Expr, ExprTrait, Query};
        let site = Query::select()
            .column(setting::Column::Value)
            .from(setting::Entity)
            .and_where(Expr::col(setting::Column::Scope).eq(STATE))
            .and_where(Expr::col(setting::Column::Key).eq("site_locked"))
            .to_owned();
        let row: Option<(bool, String, Option<String>)> = user::Entity::find_by_id(chip_id.to_owned())
            .select_only()
            .columns([user::Column::Locked, user::Column::Status])
            .column_as(Expr::SubQuery(None, Box::new(site.into())), "site_locked")
            .into_tuple()
            .one(&self.db)
            .await?;
        let (locked, status, site) = row.ok_or_else(|| AdminError::UserNotFound(chip_id.to_owned()))?;
        Ok((barred(locked, &status), site.as_deref() == Some("true")))
    }

    pub async fn site_locked(&self) -> Result<bool, AdminError> {
        Ok(self
            .setting(STATE, "site_locked")
            .await?
            .is_some_and(|s| s.value == "true"))
    }

    pub async fn set_site_locked(&self, locked: bool) -> Result<(), AdminError> {
        let txn = chipsite_store::begin_write(&self.db).await?;
        self.put_setting_in(&txn, STATE, "site_locked", if locked { "true" } else { "false" })
            .await?;
        let announced = self.publish_lockdown_in(&txn, "", locked).await?;
        let committed = txn.commit().await;
        self.settings.changed();
        committed?;
        announced.done();
        Ok(())
    }

    /// The peer server's desired state ("running"/"stopped") and when it changed.
    pub async fn peer_server(&self) -> Result<(String, i64), AdminError> {
        Ok(match self.setting(STATE, "peer_server").await? {
            Some(s) => (s.value, s.changed_at_ms),
            None => ("stopped".to_owned(), 0),
        })
    }

    pub async fn set_peer_server(&self, running: bool) -> Result<(String, i64), AdminError> {
        let s = self
            .put_setting(STATE, "peer_server", if running { "running" } else { "stopped" })
            .await?;
        Ok((s.value, s.changed_at_ms))
    }

    /// Effective site configuration: defaults overlaid with what was set.
    pub async fn config(&self) -> Result<BTreeMap<String, String>, AdminError> {
        let mut values: BTreeMap<String, String> = config_defaults()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        for s in self.settings.rows(&self.db).await?.iter() {
            values.insert(s.key.clone(), s.value.clone());
        }
        Ok(values)
    }

    /// Set and reset configuration keys; all are validated before any is written.
    pub async fn update_config(
        &self,
        set: &BTreeMap<String, String>,
        reset: &[String],
    ) -> Result<BTreeMap<String, String>, AdminError> {
        // A value sent back as it was shown (masked, see [`masked`]) means
        // "unchanged": the console's form and `config show | config set`
        // round trips keep the secret instead of storing the mask.
        let current = self.config().await?;
        let set: BTreeMap<String, String> = set
            .iter()
            .filter(|(k, v)| {
                !current
                    .get(k.as_str())
                    .is_some_and(|now| now != *v && masked(now) == **v)
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let set = &set;
        for (k, v) in set {
            validate_config(k, v)?;
        }
        for k in reset {
            if !config_defaults().contains_key(k.as_str()) {
                return Err(AdminError::InvalidArgument(format!(
                    "unknown configuration key {k:?}"
                )));
            }
        }
        let txn = chipsite_store::begin_write(&self.db).await?;
        for k in reset {
            setting::Entity::delete_by_id((CONFIG.to_owned(), k.clone()))
                .exec(&txn)
                .await?;
        }
        for (k, v) in set {
            setting::Entity::delete_by_id((CONFIG.to_owned(), k.clone()))
                .exec(&txn)
                .await?;
            setting::ActiveModel {
                scope: Set(CONFIG.to_owned()),
                key: Set(k.clone()),
                value: Set(v.clone()),
                changed_at_ms: Set(now_ms()),
            }
            .insert(&txn)
            .await?;
        }
        let committed = txn.commit().await;
        self.settings.changed();
        committed?;
        self.config().await
    }

    /// Record one admin action. The subject and outcome never hold secrets.
    pub async fn audit(
        &self,
        actor: &str,
        action: &str,
        subject: &str,
        outcome: &str,
    ) -> Result<(), AdminError> {
        audit::ActiveModel {
            at_ms: Set(now_ms()),
            actor: Set(actor.chars().take(64).collect()),
            action: Set(action.to_owned()),
            subject: Set(subject.chars().take(255).collect()),
            outcome: Set(outcome.chars().take(255).collect()),
            ..Default::default()
        }
        .insert(&self.db)
        .await?;
        Ok(())
    }

    /// The newest `limit` records, those with `contains` (any case) in a
    /// field when it is not empty.
    /// The newest audit rows (by id) with `contains` somewhere, older than
    /// `before_id` when it is not 0.
    pub async fn audit_log(
        &self,
        limit: u64,
        contains: &str,
        before_id: i64,
    ) -> Result<Vec<audit::Model>, AdminError> {
        let mut q = audit::Entity::find();
        if before_id != 0 {
            q = q.filter(audit::Column::Id.lt(before_id));
        }
        if !contains.is_empty() {
            q = q.filter(chipsite_store::contains_any(
                &[
                    audit::Column::Actor,
                    audit::Column::Action,
                    audit::Column::Subject,
                    audit::Column::Outcome,
                ],
                contains,
            ));
        }
        Ok(q.order_by_desc(audit::Column::Id)
            .limit(limit.clamp(1, 10_000))
            .all(&self.db)
            .await?)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The services admin calls.
#[derive(Debug, Clone)]
pub struct Calls {
    pub key_vault: chipsite_tls::InternalChannel,
    pub tickets: chipsite_tls::InternalChannel,
    /// The peer gateway (the peer sites operators see).
    pub peer_gateway: chipsite_tls::InternalChannel,
    /// The tally service (users' tallies operators see).
    pub tally: chipsite_tls::InternalChannel,
}

/// Serve admin (AdminService and UserEvents) on an already-bound `listener`
/// over internal mutual TLS (`tls`) until `shutdown`, calling key-vault, the
/// ticket service and the peer gateway on the channels given (`calls`), with the alarm sweeper beside
/// it: the entry point of the same shape every service crate has. Each
/// handler runs to completion even if its caller goes away.
pub async fn serve(
    admin: std::sync::Arc<Admin>,
    calls: Calls,
    listener: tokio::net::TcpListener,
    tls: std::sync::Arc<chipsite_tls::ReloadableTls>,
    bench: bool,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), chipsite_grpc_server::ServeError> {
    use chipsite_proto::{
        admin::v1::admin_service_server::AdminServiceServer, events::v1::user_events_server::UserEventsServer,
    };
    type S = AdminServiceServer<AdminGrpc>;
    type E = UserEventsServer<UserEventsGrpc>;
    let hub = admin.hub().clone();
    let notifier = Notifier::new(admin.clone(), notify::DELIVERY_WINDOW);
    let mut sweeper = notifier.spawn_sweeper();
    let events = E::new(UserEventsGrpc::new(admin.clone(), notifier));
    let svc = S::new(AdminGrpc::new(admin, calls));
    let served = async {
        chipsite_grpc_server::serve_with!(
            [svc => S, events => E],
            policy(bench),
            true,
            listener,
            tls,
            shutdown
        )
    };
    // The alarm sweeper never ends by itself: if it does, admin stops
    // rather than leave alarms undelivered unnoticed.
    let result = tokio::select! {
        served = served => served,
        ended = &mut sweeper => Err(chipsite_grpc_server::ServeError::TaskEnded(format!(
            "admin: the alarm sweeper ended: {ended:?}"
        ))),
        () = hub.ended() => Err(chipsite_grpc_server::ServeError::TaskEnded(
            "admin: the user-event listener ended".into(),
        )),
    };
    sweeper.abort();
    result
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn console_urls_are_http_host_and_port() {
        assert_eq!(
            parse_http_url("http://127.0.0.1:44303"),
            Some(("127.0.0.1".into(), 44303))
        );
        assert_eq!(parse_http_url("https://[::1]:8443/"), Some(("::1".into(), 8443)));
        for bad in [
            "",
            "ftp://x:1",
            "http://x",
            "http://x:0",
            "http://x:99999",
            "http://<x>:1",
            "http://:1",
        ] {
            assert_eq!(parse_http_url(bad), None, "{bad}");
        }
    }

    /// A dump that does not parse says where and what, in an operator's
    /// words; an empty file says it is empty.
    #[test]
    fn bad_dumps_are_told_in_words() {
        let good = r#"{"format":"chipsite.user.v1","chip_id":"alice","name":"A","address":"",
"contact":{"email":"","phone":""},"status":"active","locked":false,"created_at_ms":1,"updated_at_ms":1,"public_key":null}"#;
        assert!(Admin::parse_dump(good).is_ok());
        let told = |json: &str| Admin::parse_dump(json).unwrap_err().to_string();
        for (json, says) in [
            ("", "bad user dump: the file is empty"),
            ("  \n", "bad user dump: the file is empty"),
            ("not json", "line 1, column 2: this is not JSON"),
            ("{\"format\":", "the file ends too soon, on line 1"),
            (
                &good.replace("\"chip_id\":\"alice\"", "\"chip_id\":7"),
                "line 1: `chip_id` must be a string, not integer `7`",
            ),
            (
                &good.replace("\"email\":\"\"", "\"email\":false"),
                "line 2: `contact.email` must be a string, not boolean `false`",
            ),
            (
                &good.replace("\"name\":\"A\",", ""),
                "the field `name` is missing",
            ),
            (
                &good.replace("\"name\":", "\"was\":\"x\",\"name\":"),
                "`was` is not a field of a user dump",
            ),
        ] {
            let e = told(json);
            assert!(e.contains(says), "{json:?}: {e}");
            assert!(!e.contains(" at line "), "the parser's wording: {e}");
        }
    }

    /// Secrets inside URL values are masked for every caller, and what is
    /// not a secret is left as it was.
    #[test]
    fn secrets_in_values_are_masked() {
        for (stored, shown) in [
            ("smtp://relay:25", "smtp://relay:25"),
            ("smtp://mailer:hunter2@relay:25", "smtp://mailer:****@relay:25"),
            ("http://tok3n@sms.example/send", "http://****@sms.example/send"),
            (
                "http://sms.example/send?to=x&api_key=abc&Token=def#frag",
                "http://sms.example/send?to=x&api_key=****&Token=****#frag",
            ),
            ("http://sms.example/a@b?x=1", "http://sms.example/a@b?x=1"),
            ("chipsite", "chipsite"),
            ("", ""),
        ] {
            assert_eq!(masked(stored), shown, "{stored}");
        }
    }

    #[test]
    fn settings_are_checked_by_key() {
        assert!(validate_config("ticket.ttl_seconds", "3600").is_ok());
        for (key, bad) in [
            ("ticket.ttl_seconds", "59"),
            ("ticket.ttl_seconds", "many"),
            ("user_gateway.port", "0"),
            ("user_gateway.port", "65536"),
            ("site.name", " "),
            ("alarm.sms_webhook", "https://hooks.example/sms"),
            ("console.url", "127.0.0.1:44303"),
        ] {
            let e = validate_config(key, bad).unwrap_err();
            assert_eq!(e.code(), ErrorCode::InvalidArgument, "{key}={bad}");
        }
    }

    #[test]
    fn users_are_checked_once_by_the_shared_rules() {
        assert!(validate_chip_id("alice").is_ok());
        let e = validate_chip_id("Alice").unwrap_err();
        assert!(e.to_string().contains("invalid CHIP ID"), "{e}");
        assert!(validate_status("suspended").is_ok());
        let e = validate_status("gone").unwrap_err();
        assert!(e.to_string().contains("active, suspended, closed"), "{e}");
        let phone = UserData {
            phone: "call me".into(),
            ..UserData::default()
        };
        assert!(validate_data(&phone).is_err());
    }

    #[test]
    fn internal_errors_keep_their_detail_to_the_log() {
        let e = AdminError::InitScript {
            name: "010-seed.sql".into(),
            message: "relation \"secret_table\" does not exist".into(),
        };
        let status = tonic::Status::from(e);
        assert_eq!(status.message(), "internal error");
        assert_eq!(chipsite_proto::status::code_of(&status), ErrorCode::Internal);
        let e = AdminError::UserExists("bob".into());
        let status = tonic::Status::from(e);
        assert_eq!(chipsite_proto::status::code_of(&status), ErrorCode::AlreadyExists);
        assert!(status.message().contains("bob"));
    }
}
