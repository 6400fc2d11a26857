//! The database pools (chipsite's patch of sqlx-core,
//! vendor/sqlx-core/CHIPSITE-PATCH.md): a connection goes back to the pool
//! without a round trip to the server, and still goes back clean after a
//! dropped transaction or a query dropped mid-way; the connection given back
//! last is handed out first; a transaction after a dropped one begins as
//! asked.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use chipsite_e2e::{Store, store_test};
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// A loopback proxy in front of PostgreSQL that counts the Sync messages
/// its clients send: one per statement, plus one per round trip the pool
/// makes of its own (the published sqlx-core pings every connection it
/// takes back).
struct CountingProxy {
    port: u16,
    syncs: Arc<AtomicU64>,
}

impl CountingProxy {
    async fn start(server: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let syncs = Arc::new(AtomicU64::new(0));
        let counted = syncs.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = TcpStream::connect(&server).await.unwrap();
                tokio::spawn(relay(client, server, counted.clone()));
            }
        });
        Self { port, syncs }
    }

    fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::SeqCst)
    }
}

/// Copy both ways; count the client's Sync messages ('S', length 4) as
/// they pass, before they reach the server (so every reply the client has
/// seen was to a counted message).
async fn relay(client: TcpStream, server: TcpStream, syncs: Arc<AtomicU64>) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    tokio::spawn(async move {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
    });
    // The startup message has no type byte; every later one is a type
    // byte and a big-endian length that counts itself but not the type.
    let mut pending: Vec<u8> = Vec::new();
    let mut started = false;
    let mut buf = vec![0u8; 65536];
    loop {
        let n = match client_read.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        loop {
            let header = if started { 5 } else { 4 };
            if pending.len() < header {
                break;
            }
            let at = header - 4;
            let len = u32::from_be_bytes(pending[at..at + 4].try_into().unwrap()) as usize;
            let whole = at + len;
            if pending.len() < whole {
                break;
            }
            if started && pending[0] == b'S' && len == 4 {
                syncs.fetch_add(1, Ordering::SeqCst);
            }
            started = true;
            pending.drain(..whole);
        }
        if server_write.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A pool of one connection, so that every statement reuses the one the
/// last statement gave back; otherwise as `chipsite_store::connect` makes
/// them (a connection is tested before use only after 30 s idle).
async fn pool_of_one(url: &str) -> DatabaseConnection {
    let mut opts = ConnectOptions::new(url.to_owned());
    opts.max_connections(1)
        .min_connections(0)
        .test_before_acquire_if_idle_for(Duration::from_secs(30))
        .sqlx_logging(false);
    Database::connect(opts).await.unwrap()
}

fn stmt(db: &DatabaseConnection, sql: &str) -> Statement {
    Statement::from_string(db.get_database_backend(), sql.to_owned())
}

async fn number(db: &DatabaseConnection, sql: &str) -> i64 {
    let row = db.query_one_raw(stmt(db, sql)).await.unwrap().unwrap();
    row.try_get_by_index::<i64>(0).unwrap()
}

async fn connections_go_back_to_the_pool_clean_and_without_a_round_trip(store: Store) {
    let dir = tempfile::tempdir().unwrap();
    let (url, proxy) = match &store {
        Store::Sqlite => (chipsite_store::sqlite_url(&dir.path().join("pool.db")), None),
        Store::Postgres { server, name } => {
            // host:port of the test server, from postgres://user@host:port/db.
            let host_port = server
                .split('@')
                .nth(1)
                .and_then(|rest| rest.split('/').next())
                .unwrap()
                .to_owned();
            let user = server
                .strip_prefix("postgres://")
                .and_then(|rest| rest.split('@').next())
                .unwrap();
            let proxy = CountingProxy::start(host_port).await;
            let url = format!(
                "postgres://{user}@127.0.0.1:{}/{name}?sslmode=disable",
                proxy.port
            );
            (url, Some(proxy))
        }
    };
    let db = pool_of_one(&url).await;
    db.execute_unprepared("CREATE TABLE pool_probe (n INTEGER NOT NULL)")
        .await
        .unwrap();

    // Statements one after the other, each on the connection the last one
    // gave back: one Sync each, none for giving the connection back.
    if let Some(proxy) = &proxy {
        let query =
            || Statement::from_sql_and_values(DbBackend::Postgres, "SELECT $1::bigint + 1", [41i64.into()]);
        db.query_one_raw(query()).await.unwrap().unwrap();
        let before = proxy.syncs();
        for _ in 0..20 {
            let row = db.query_one_raw(query()).await.unwrap().unwrap();
            assert_eq!(row.try_get_by_index::<i64>(0).unwrap(), 42);
        }
        // A statement waits for the connection the one before gave back,
        // so every round trip of the first 19 releases is counted here.
        assert_eq!(
            proxy.syncs() - before,
            20,
            "20 statements made {} round trips: is the published sqlx-core back (vendor/sqlx-core)?",
            proxy.syncs() - before
        );
    }

    // A transaction dropped without a commit: its ROLLBACK still reaches
    // the server before the connection is used again.
    {
        let txn = chipsite_store::begin_write(&db).await.unwrap();
        txn.execute_unprepared("INSERT INTO pool_probe (n) VALUES (1)")
            .await
            .unwrap();
        drop(txn);
    }
    db.execute_unprepared("INSERT INTO pool_probe (n) VALUES (2)")
        .await
        .unwrap();
    // Seen from another connection, so the insert above was not made
    // inside the dropped transaction.
    let other = pool_of_one(&url).await;
    assert_eq!(
        number(
            &other,
            "SELECT CAST(COALESCE(SUM(n), 0) AS BIGINT) FROM pool_probe"
        )
        .await,
        2
    );
    other.close().await.unwrap();

    // A query dropped before its answer (a call cancelled mid-way): the
    // next statement on the connection gets its own answer, not that one's.
    let slow = match &store {
        Store::Sqlite => {
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 2000000) \
             SELECT CAST(COUNT(*) AS BIGINT) FROM c"
        }
        Store::Postgres { .. } => "SELECT CAST(COUNT(*) AS BIGINT) FROM pg_sleep(0.3)",
    };
    let dropped = tokio::time::timeout(Duration::from_millis(1), db.query_one_raw(stmt(&db, slow))).await;
    assert!(dropped.is_err(), "the slow query finished within 1 ms");
    assert_eq!(number(&db, "SELECT CAST(7 AS BIGINT)").await, 7);
    assert_eq!(
        number(&db, "SELECT CAST(COUNT(*) AS BIGINT) FROM pool_probe").await,
        1
    );
    db.close().await.unwrap();
}
store_test!(connections_go_back_to_the_pool_clean_and_without_a_round_trip);

/// How many connections sit idle in `db`'s pool.
fn idle(db: &DatabaseConnection) -> usize {
    match db.get_database_backend() {
        DbBackend::Postgres => db.get_postgres_connection_pool().num_idle(),
        _ => db.get_sqlite_connection_pool().num_idle(),
    }
}

/// Wait (at most 10 s) until `n` connections are idle in `db`'s pool.
async fn until_idle(db: &DatabaseConnection, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while idle(db) != n {
        assert!(std::time::Instant::now() < deadline, "{} idle, not {n}", idle(db));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn the_connection_given_back_last_is_used_first(store: Store) {
    let dir = tempfile::tempdir().unwrap();
    let url = match &store {
        Store::Sqlite => chipsite_store::sqlite_url(&dir.path().join("pool.db")),
        Store::Postgres { .. } => store.url(),
    };
    let mut opts = ConnectOptions::new(url);
    opts.max_connections(3)
        .min_connections(0)
        .test_before_acquire_if_idle_for(Duration::from_secs(30))
        .sqlx_logging(false);
    let db = Database::connect(opts).await.unwrap();
    // Three connections at once, each marked with its number in a
    // temporary table (one per connection), given back 0, 1, 2 in turn.
    let mut txns = vec![];
    for n in 0..3 {
        let txn = sea_orm::TransactionTrait::begin(&db).await.unwrap();
        txn.execute_unprepared("CREATE TEMPORARY TABLE connection_mark (n INTEGER NOT NULL)")
            .await
            .unwrap();
        txn.execute_unprepared(&format!("INSERT INTO connection_mark (n) VALUES ({n})"))
            .await
            .unwrap();
        txns.push(txn);
    }
    for (n, txn) in txns.into_iter().enumerate() {
        txn.commit().await.unwrap();
        until_idle(&db, n + 1).await;
    }
    let mark = "SELECT CAST(n AS BIGINT) FROM connection_mark";
    assert_eq!(
        number(&db, mark).await,
        2,
        "the pool handed out a connection idle longer than another (is sqlx-core's FIFO queue back? vendor/sqlx-core)"
    );
    until_idle(&db, 3).await;
    // While that one is busy, the next most recent.
    let busy = sea_orm::TransactionTrait::begin(&db).await.unwrap();
    let row = busy.query_one_raw(stmt(&db, mark)).await.unwrap().unwrap();
    assert_eq!(row.try_get_by_index::<i64>(0).unwrap(), 2);
    assert_eq!(number(&db, mark).await, 1);
    busy.commit().await.unwrap();
    db.close().await.unwrap();
}
store_test!(the_connection_given_back_last_is_used_first);

/// A transaction dropped without a commit, then the next one at once on the
/// same connection: on SQLite the next one still takes the write lock as it
/// begins (`BEGIN IMMEDIATE`), so another connection's write waits for it;
/// on both stores the dropped one's write is gone. (Without the release
/// `ping` for a connection still in a transaction, SQLite's worker had not
/// yet run the rollback when the connection was handed out again, and the
/// next transaction began deferred.)
async fn a_transaction_after_a_dropped_one_begins_as_asked(store: Store) {
    let dir = tempfile::tempdir().unwrap();
    let url = match &store {
        Store::Sqlite => chipsite_store::sqlite_url(&dir.path().join("pool.db")),
        Store::Postgres { .. } => store.url(),
    };
    let db = pool_of_one(&url).await;
    db.execute_unprepared("CREATE TABLE pool_probe (n INTEGER NOT NULL)")
        .await
        .unwrap();
    let other = pool_of_one(&url).await;
    if let Store::Sqlite = store {
        // The other connection gives up at once instead of waiting.
        other.execute_unprepared("PRAGMA busy_timeout = 0").await.unwrap();
    }
    for round in 0..50 {
        {
            let dropped = chipsite_store::begin_write(&db).await.unwrap();
            dropped
                .execute_unprepared("INSERT INTO pool_probe (n) VALUES (1000)")
                .await
                .unwrap();
        }
        let next = chipsite_store::begin_write(&db).await.unwrap();
        if let Store::Sqlite = store {
            let blocked = other
                .execute_unprepared("INSERT INTO pool_probe (n) VALUES (7)")
                .await;
            assert!(
                blocked.is_err(),
                "round {round}: the transaction after a dropped one did not take the write lock as it began"
            );
        }
        next.execute_unprepared("INSERT INTO pool_probe (n) VALUES (1)")
            .await
            .unwrap();
        next.commit().await.unwrap();
    }
    assert_eq!(
        number(&db, "SELECT CAST(COALESCE(SUM(n), 0) AS BIGINT) FROM pool_probe").await,
        50,
        "only the committed rows"
    );
    other.close().await.unwrap();
    db.close().await.unwrap();
}
store_test!(a_transaction_after_a_dropped_one_begins_as_asked);
