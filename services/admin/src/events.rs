//! The user-event hub: lockdown changes, key changes and alarms, fanned out
//! to every gateway's `Watch` stream on every admin replica.
//!
//! With PostgreSQL, events travel through `NOTIFY chipsite_user_events`
//! (each payload one protobuf `UserEvent`, base64), and every replica
//! `LISTEN`s and fans out what it hears, its own events included, so
//! every gateway sees every event whichever replica it watches. SQLite is
//! one process: events go straight to the in-process channel.

use std::sync::Arc;

use base64::{Engine, engine::general_purpose::STANDARD};
use chipsite_proto::events::v1::UserEvent;
use prost::Message;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement, sqlx::postgres::PgListener};
use tokio::sync::broadcast;

use crate::AdminError;

/// The PostgreSQL channel events travel on.
pub const CHANNEL: &str = "chipsite_user_events";

/// Events a slow watcher may fall behind by before its stream is ended
/// (it then reconnects and re-checks its sessions).
const BACKLOG: usize = 65_536;

/// What watchers receive.
#[derive(Debug, Clone)]
pub enum HubMessage {
    Event(Arc<UserEvent>),
    /// Events may have been missed (the PostgreSQL listener reconnected):
    /// watchers must re-check what they hold.
    Resync,
}

#[derive(Debug, Clone)]
pub struct Hub {
    tx: broadcast::Sender<HubMessage>,
    /// Set when events go through PostgreSQL.
    postgres: Option<DatabaseConnection>,
    /// The LISTEN task, stopped when the last clone of the hub goes.
    _listener: Option<Arc<StopOnDrop>>,
    /// Turns true if the LISTEN task ends (it never does by itself).
    ended: Option<tokio::sync::watch::Receiver<bool>>,
}

/// Says the LISTEN task ended, however it ended (a panic unwinds through it).
struct Ended(tokio::sync::watch::Sender<bool>);

impl Drop for Ended {
    fn drop(&mut self) {
        let _ = self.0.send(true);
    }
}

#[derive(Debug)]
struct StopOnDrop(tokio::task::JoinHandle<()>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Hub {
    /// An in-process hub (SQLite, one process).
    pub fn local() -> Self {
        let (tx, _) = broadcast::channel(BACKLOG);
        Self {
            tx,
            postgres: None,
            _listener: None,
            ended: None,
        }
    }

    /// The hub for a database: LISTEN/NOTIFY on PostgreSQL (listening before
    /// this returns, so nothing published afterwards is missed), else local.
    pub async fn for_database(url: &str, db: &DatabaseConnection) -> Result<Self, AdminError> {
        if db.get_database_backend() != DbBackend::Postgres {
            return Ok(Self::local());
        }
        let mut listener = PgListener::connect(url)
            .await
            .map_err(|e| AdminError::Unavailable(format!("event listener: {e}")))?;
        listener
            .listen(CHANNEL)
            .await
            .map_err(|e| AdminError::Unavailable(format!("event listener: {e}")))?;
        let (tx, _) = broadcast::channel(BACKLOG);
        let (ended_tx, ended) = tokio::sync::watch::channel(false);
        let events = tx.clone();
        let task = tokio::spawn(async move {
            let _ended = Ended(ended_tx);
            listen(listener, events).await;
        });
        Ok(Self {
            tx,
            postgres: Some(db.clone()),
            _listener: Some(Arc::new(StopOnDrop(task))),
            ended: Some(ended),
        })
    }

    /// Resolves if the PostgreSQL LISTEN task ends (a bug: it loops for
    /// ever), so that admin stops rather than let gateways miss events;
    /// never for an in-process hub.
    pub async fn ended(&self) {
        match self.ended.clone() {
            Some(mut ended) => {
                let _ = ended.wait_for(|e| *e).await;
            }
            None => std::future::pending().await,
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<HubMessage> {
        self.tx.subscribe()
    }

    /// Publish events to every watcher on every replica. On PostgreSQL the
    /// whole batch is one statement.
    pub async fn publish(&self, events: Vec<UserEvent>) -> Result<(), AdminError> {
        match &self.postgres {
            None => {
                self.fan_out(events);
                Ok(())
            }
            Some(db) => Self::notify(db, &events).await,
        }
    }

    /// Publish events as part of the transaction `txn` that makes the change
    /// they announce, so that the change is never committed unannounced. On
    /// PostgreSQL the `NOTIFY` is in `txn` (delivered at its commit, or not
    /// at all); in process, nothing can fail, and the events go out when
    /// [`AfterCommit::done`] is called after the commit.
    pub async fn publish_in(
        &self,
        txn: &impl ConnectionTrait,
        events: Vec<UserEvent>,
    ) -> Result<AfterCommit, AdminError> {
        match &self.postgres {
            None => Ok(AfterCommit(Some((self.clone(), events)))),
            Some(_) => {
                Self::notify(txn, &events).await?;
                Ok(AfterCommit(None))
            }
        }
    }

    fn fan_out(&self, events: Vec<UserEvent>) {
        for e in events {
            let _ = self.tx.send(HubMessage::Event(Arc::new(e)));
        }
    }

    async fn notify(db: &impl ConnectionTrait, events: &[UserEvent]) -> Result<(), AdminError> {
        if events.is_empty() {
            return Ok(());
        }
        let payloads: Vec<String> = events
            .iter()
            .map(|e| STANDARD.encode(e.encode_to_vec()))
            .collect();
        db.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            format!("SELECT pg_notify('{CHANNEL}', p) FROM unnest($1::text[]) AS p"),
            [sea_orm::Value::from(payloads)],
        ))
        .await?;
        Ok(())
    }
}

/// What is left to publish once the transaction committed (the in-process hub).
#[must_use = "call done() after the commit"]
pub struct AfterCommit(Option<(Hub, Vec<UserEvent>)>);

impl AfterCommit {
    pub fn done(self) {
        if let Some((hub, events)) = self.0 {
            hub.fan_out(events);
        }
    }
}

async fn listen(mut listener: PgListener, tx: broadcast::Sender<HubMessage>) {
    loop {
        match listener.try_recv().await {
            Ok(Some(n)) => {
                let event = STANDARD
                    .decode(n.payload())
                    .ok()
                    .and_then(|b| UserEvent::decode(b.as_slice()).ok());
                match event {
                    Some(e) => {
                        let _ = tx.send(HubMessage::Event(Arc::new(e)));
                    }
                    None => tracing::warn!("ignoring a malformed user event notification"),
                }
            }
            // The connection was lost; sqlx reconnects on the next call and
            // re-issues LISTEN. What was sent meanwhile is lost: resync.
            Ok(None) => {
                tracing::warn!("user event listener lost its connection; watchers resync");
                let _ = tx.send(HubMessage::Resync);
            }
            Err(e) => {
                tracing::warn!(error = %e, "user event listener failed; retrying");
                let _ = tx.send(HubMessage::Resync);
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    }
}
