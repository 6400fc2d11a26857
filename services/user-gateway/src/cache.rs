//! What admission needs to know (each user's registered key, lockdown
//! state), remembered while the user-event stream is live: every change
//! to them arrives on that stream (key changes from enrollments and user
//! loads, lockdowns), so a remembered value is current. When the stream is
//! down, nothing is remembered and admission asks key-vault and admin.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

/// Users remembered at most; past this the cache starts over.
const MAX_USERS: usize = 200_000;

#[derive(Default)]
struct State {
    live: bool,
    /// Bumped by every event and every (re)connection, so an answer fetched
    /// before a change cannot be stored after it.
    generation: u64,
    site_locked: Option<bool>,
    keys: HashMap<String, Arc<[u8]>>,
    user_locked: HashMap<String, bool>,
}

/// What the cache knows about one user, and when it knew it.
pub(crate) struct Known {
    pub generation: u64,
    pub key: Option<Arc<[u8]>>,
    /// (site locked, user locked), when both are known.
    pub lockdown: Option<(bool, bool)>,
}

#[derive(Default)]
pub(crate) struct AdmissionCache(Mutex<State>);

impl AdmissionCache {
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut g = match self.0.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        f(&mut g)
    }

    pub fn known(&self, chip_id: &str) -> Known {
        self.with(|s| Known {
            generation: s.generation,
            key: s.live.then(|| s.keys.get(chip_id).cloned()).flatten(),
            lockdown: s
                .live
                .then(|| Some((s.site_locked?, *s.user_locked.get(chip_id)?)))
                .flatten(),
        })
    }

    fn room(s: &mut State) {
        if s.keys.len() + s.user_locked.len() > MAX_USERS {
            s.keys.clear();
            s.user_locked.clear();
        }
    }

    /// Remember a fetched key, unless something changed since `generation`.
    pub fn store_key(&self, generation: u64, chip_id: &str, key: &[u8]) {
        self.with(|s| {
            if s.live && s.generation == generation {
                Self::room(s);
                s.keys.insert(chip_id.to_owned(), key.into());
            }
        });
    }

    /// Remember a fetched lockdown state, unless something changed since `generation`.
    pub fn store_lockdown(&self, generation: u64, chip_id: &str, site: bool, user: bool) {
        self.with(|s| {
            if s.live && s.generation == generation {
                Self::room(s);
                s.site_locked = Some(site);
                s.user_locked.insert(chip_id.to_owned(), user);
            }
        });
    }

    pub fn key_changed(&self, chip_id: &str, key: &[u8]) {
        self.with(|s| {
            s.generation += 1;
            if s.live {
                s.keys.insert(chip_id.to_owned(), key.into());
            }
        });
    }

    /// A lockdown change; an empty CHIP ID is the whole site.
    pub fn lockdown(&self, chip_id: &str, locked: bool) {
        self.with(|s| {
            s.generation += 1;
            if chip_id.is_empty() {
                s.site_locked = s.live.then_some(locked);
            } else if s.live {
                s.user_locked.insert(chip_id.to_owned(), locked);
            }
        });
    }

    /// The event stream connected (true) or ended (false): forget everything.
    pub fn set_live(&self, live: bool) {
        self.with(|s| {
            *s = State {
                live,
                generation: s.generation + 1,
                ..State::default()
            };
        });
    }
}
