//! admin's site configuration rows kept in memory, so that the hot paths
//! (a ticket's lifetime, the gateways' settings) read no row.
//!
//! Exact while admin is the only writer: every write of admin's goes
//! through [`SettingsCache::changed`] after it commits, and one admin runs
//! against a database (ADR 0012; `chipsite serve admin` holds a lock for
//! it). A copy is kept at most [`SETTINGS_TTL`], so that a change made
//! around admin (SQL by hand, a second admin in a test) is seen within
//! that. The site's state (lockdown, the peer server) is not cached: it is
//! read with what it decides, in the same statement (`Admin::lockdown`).
//!
//! A load that raced a write is not kept: every write bumps a generation,
//! and a load is stored only if the generation it started from is still
//! current (the admission cache's rule in the gateways).

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter};

use crate::{AdminError, store::setting};

/// How long a loaded copy of the settings is used.
pub const SETTINGS_TTL: Duration = Duration::from_secs(1);

#[derive(Default)]
pub(crate) struct SettingsCache {
    generation: AtomicU64,
    loaded: Mutex<Option<Loaded>>,
}

struct Loaded {
    at: Instant,
    rows: Arc<Vec<setting::Model>>,
}

impl SettingsCache {
    /// Every configuration row, from memory when a fresh copy is there.
    pub(crate) async fn rows(&self, db: &DatabaseConnection) -> Result<Arc<Vec<setting::Model>>, AdminError> {
        if let Some(rows) = self.with_loaded(|l| match l {
            Some(l) if l.at.elapsed() < SETTINGS_TTL => Some(l.rows.clone()),
            _ => None,
        }) {
            return Ok(rows);
        }
        let generation = self.generation.load(Ordering::Acquire);
        let rows = Arc::new(
            setting::Entity::find()
                .filter(setting::Column::Scope.eq(crate::CONFIG))
                .all(db)
                .await?,
        );
        if self.generation.load(Ordering::Acquire) == generation {
            self.with_loaded(|l| {
                *l = Some(Loaded {
                    at: Instant::now(),
                    rows: rows.clone(),
                });
            });
        }
        Ok(rows)
    }

    /// A write committed (or may have): the next read loads the rows again.
    pub(crate) fn changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.with_loaded(|l| *l = None);
    }

    fn with_loaded<T>(&self, f: impl FnOnce(&mut Option<Loaded>) -> T) -> T {
        let mut guard = self
            .loaded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut guard)
    }
}
