//! Database connections for chipsite's services: PostgreSQL in production,
//! embedded SQLite for `chipsite dev`, both through sea-orm. Each service
//! owns its tables and runs its own migrations (with its own migration
//! table), so services can share one database or use one each.

use std::{path::Path, time::Duration};

use sea_orm::{ConnectOptions, Database};
pub use sea_orm::{DatabaseConnection, DbErr};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database URL must start with postgres://, postgresql:// or sqlite:// (got {0:?})")]
    BadUrl(String),
    #[error("the database directory or file {path}: {source}")]
    Dir { path: String, source: std::io::Error },
    #[error("cannot connect to the database: {0}")]
    Connect(DbErr),
    #[error(
        "another {0} process already runs against this database, and {0} must run alone: stop it, or give this one another database"
    )]
    Taken(String),
    #[error("the connection holding {0}'s single-instance lock was lost: {1}")]
    LockLost(String, String),
}

/// Which engine a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Postgres,
    Sqlite,
}

impl Engine {
    pub fn of_url(url: &str) -> Result<Self, StoreError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Self::Postgres)
        } else if url.starts_with("sqlite:") {
            Ok(Self::Sqlite)
        } else {
            Err(StoreError::BadUrl(redact_url(url)))
        }
    }
}

/// The URL of an SQLite file, created if absent.
pub fn sqlite_url(path: &Path) -> String {
    format!("sqlite://{}?mode=rwc", path.display())
}

/// Connect to a database. SQLite gets WAL, a busy timeout and foreign keys;
/// its parent directory is created.
pub async fn connect(url: &str) -> Result<DatabaseConnection, StoreError> {
    let engine = Engine::of_url(url)?;
    let mut opts = ConnectOptions::new(url.to_owned());
    // Ping only connections idle long enough to have been dropped by the
    // server or a firewall; pinging on every checkout costs a round trip per
    // statement.
    opts.test_before_acquire_if_idle_for(Duration::from_secs(30));
    opts.sqlx_logging(false)
        .connect_timeout(Duration::from_secs(5))
        .acquire_timeout(Duration::from_secs(10));
    match engine {
        Engine::Sqlite => {
            let dir = url
                .strip_prefix("sqlite://")
                .and_then(|p| p.split('?').next())
                .and_then(|p| Path::new(p).parent())
                .filter(|d| !d.as_os_str().is_empty());
            if let Some(dir) = dir {
                chipsite_model::files::private_dir(dir).map_err(|source| StoreError::Dir {
                    path: dir.display().to_string(),
                    source,
                })?;
            }
            opts.max_connections(8).map_sqlx_sqlite_opts(|o| {
                o.busy_timeout(Duration::from_secs(10))
                    .journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
                    .synchronous(sea_orm::sqlx::sqlite::SqliteSynchronous::Normal)
                    .foreign_keys(true)
            });
        }
        Engine::Postgres => {
            // Per service: more connections than a few per core only queue
            // inside PostgreSQL, and a site is five services (two sites on
            // one server must stay under its default max_connections, 100).
            opts.max_connections(8);
        }
    }
    let db = Database::connect(opts).await.map_err(StoreError::Connect)?;
    if engine == Engine::Sqlite {
        sqlite_files_private(url)?;
    }
    Ok(db)
}

/// SQLite creates its files with default modes: make the database, its
/// write-ahead log and its shared-memory index owner-only.
fn sqlite_files_private(url: &str) -> Result<(), StoreError> {
    let Some(path) = url.strip_prefix("sqlite://").and_then(|p| p.split('?').next()) else {
        return Ok(());
    };
    if path.is_empty() || path == ":memory:" {
        return Ok(());
    }
    for suffix in ["", "-wal", "-shm"] {
        let file = format!("{path}{suffix}");
        chipsite_model::files::make_private(Path::new(&file)).map_err(|source| StoreError::Dir {
            path: file.clone(),
            source,
        })?;
    }
    Ok(())
}

/// A URL with any password replaced, for messages and logs.
pub fn redact_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let mut out = match (base.find("://"), base.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &base[scheme + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!("{}{}:***{}", &base[..scheme + 3], &userinfo[..colon], &base[at..]),
                None => base.to_owned(),
            }
        }
        _ => base.to_owned(),
    };
    if let Some(q) = query {
        let params: Vec<String> = q
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => kv.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

/// Milliseconds since the Unix epoch: how every service stores time, so
/// that SQLite and PostgreSQL hold the same values.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The time as a service sees it: the system clock, plus an offset that only
/// a test moves ([`Clock::advance`]), so that expiry is tested without
/// waiting. Clones share the offset.
#[derive(Debug, Clone, Default)]
pub struct Clock(std::sync::Arc<std::sync::atomic::AtomicI64>);

impl Clock {
    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> i64 {
        now_ms().saturating_add(self.0.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Move this clock (and its clones) forward.
    pub fn advance(&self, by: std::time::Duration) {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.0.fetch_add(ms, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Begin a transaction that will write. On SQLite it is `BEGIN IMMEDIATE`:
/// it takes the database's write lock at once, waiting its turn under the
/// busy timeout, instead of starting as a reader and failing with "database
/// is locked" (codes 5 and 517) when it tries to write after another writer
/// committed. On PostgreSQL it is a plain `BEGIN`.
pub async fn begin_write<C: sea_orm::TransactionTrait>(db: &C) -> Result<C::Transaction, DbErr> {
    db.begin_with_options(sea_orm::TransactionOptions {
        sqlite_transaction_mode: Some(sea_orm::SqliteTransactionMode::Immediate),
        ..Default::default()
    })
    .await
}

/// Run a service's migrations. On PostgreSQL they run in one transaction
/// that first takes a transaction-scoped advisory lock named after the
/// service's migration table: replicas starting at once against one database
/// take turns, and the later ones find nothing left to do (and a migration
/// that fails leaves nothing half-applied). SQLite databases belong to one
/// process (`chipsite dev`) and need no lock.
pub async fn migrate<M: sea_orm_migration::MigratorTrait>(db: &DatabaseConnection) -> Result<(), DbErr> {
    use sea_orm::{ConnectionTrait, TransactionTrait};
    if db.get_database_backend() != sea_orm::DbBackend::Postgres {
        return M::up(db, None).await;
    }
    let table = M::migration_table_name().to_string();
    let txn = db.begin().await?;
    // A replica stuck behind another's migrations gives up (and its
    // supervisor restarts it) rather than wait for ever.
    txn.execute_unprepared("SET LOCAL lock_timeout = '120s'").await?;
    txn.execute_raw(sea_orm::Statement::from_sql_and_values(
        sea_orm::DbBackend::Postgres,
        "SELECT pg_advisory_xact_lock($1)",
        [migration_lock_key(&table).into()],
    ))
    .await?;
    M::up(&txn, None).await?;
    txn.commit().await
}

/// A claim that this is the only process of a service against its
/// database: a session-level advisory lock on a connection of its own,
/// held for as long as the claim lives (PostgreSQL drops it when the process
/// or its connection goes). See [`claim_single`].
pub struct SingleInstance {
    service: String,
    conn: sea_orm::sqlx::PgConnection,
}

impl std::fmt::Debug for SingleInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SingleInstance")
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

/// Claim that `service` runs once against the database at `url`: `None` on
/// SQLite (a file belongs to one process anyway), [`StoreError::Taken`] if
/// another process holds the claim. Replicas of a service that must stay
/// single (admin, key-vault, tally) would otherwise each believe they are
/// the only one.
pub async fn claim_single(url: &str, service: &str) -> Result<Option<SingleInstance>, StoreError> {
    use sea_orm::sqlx::{Connection, Row};
    if Engine::of_url(url)? != Engine::Postgres {
        return Ok(None);
    }
    let connect = |e: sea_orm::sqlx::Error| StoreError::Connect(DbErr::Custom(e.to_string()));
    let mut conn = sea_orm::sqlx::PgConnection::connect(url).await.map_err(connect)?;
    let row = sea_orm::sqlx::query("SELECT pg_try_advisory_lock($1)")
        .bind(migration_lock_key(&format!(
            "chipsite single instance: {service}"
        )))
        .fetch_one(&mut conn)
        .await
        .map_err(connect)?;
    let held: bool = row.try_get(0).map_err(connect)?;
    if !held {
        return Err(StoreError::Taken(service.to_owned()));
    }
    Ok(Some(SingleInstance {
        service: service.to_owned(),
        conn,
    }))
}

impl SingleInstance {
    /// Keep the claim, checking its connection every `every`; returns (an
    /// error) only when the connection, and so the claim, is lost: the
    /// service must then stop, since another process may claim it now.
    pub async fn hold(mut self, every: Duration) -> Result<(), StoreError> {
        use sea_orm::sqlx::Connection;
        loop {
            tokio::time::sleep(every).await;
            if let Err(e) = self.conn.ping().await {
                return Err(StoreError::LockLost(self.service, e.to_string()));
            }
        }
    }
}

/// A stable advisory-lock key for a migration table (FNV-1a of its name).
fn migration_lock_key(table: &str) -> i64 {
    let hash = table.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    i64::from_ne_bytes(hash.to_ne_bytes())
}

/// Whether a database error is a uniqueness violation (both engines).
pub fn is_unique_violation(err: &DbErr) -> bool {
    matches!(err.sql_err(), Some(sea_orm::SqlErr::UniqueConstraintViolation(_)))
}

/// Rows with `text` (any case, taken literally) in any of `columns`:
/// `LOWER(col) LIKE '%text%'`, the same on SQLite and PostgreSQL.
pub fn contains_any<C>(columns: &[C], text: &str) -> sea_orm::Condition
where
    C: sea_orm::ColumnTrait,
{
    use sea_orm::sea_query::{Expr, ExprTrait, Func, LikeExpr};
    let mut escaped = String::with_capacity(text.len() + 2);
    for ch in text.to_lowercase().chars() {
        if matches!(ch, '%' | '_' | '\\') {
            escaped.push('\\');
        }
        escaped.push(ch);
    }
    let pattern = format!("%{escaped}%");
    columns.iter().fold(sea_orm::Condition::any(), |cond, col| {
        cond.add(Expr::expr(Func::lower(Expr::col(*col))).like(LikeExpr::new(pattern.clone()).escape('\\')))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact_url("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("sqlite:///tmp/x.db"), "sqlite:///tmp/x.db");
        assert_eq!(
            redact_url("postgres://h/db?user=u&password=pw&x=1"),
            "postgres://h/db?user=u&password=***&x=1"
        );
        assert_eq!(redact_url("sqlite://x?mode=rwc"), "sqlite://x?mode=rwc");
    }

    #[test]
    fn engines_are_told_apart() {
        assert_eq!(Engine::of_url("postgresql://h/db").ok(), Some(Engine::Postgres));
        assert_eq!(Engine::of_url("sqlite://x?mode=rwc").ok(), Some(Engine::Sqlite));
        assert!(Engine::of_url("mysql://h/db").is_err());
    }
}
