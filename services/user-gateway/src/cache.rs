//! What admission needs to know (each user's registered key, lockdown
//! state), remembered while the user-event stream is live: every change
//! to them arrives on that stream (key changes from enrollments and user
//! loads, lockdowns), so a remembered value is current. When the stream is
//! down, nothing is remembered and admission asks key-vault and admin.
//!
//! Every entry also has a bounded lifetime ([`AdmissionCache::new`]'s
//! `ttl`): should an announcement be lost while the stream stays up, a
//! replaced key or a lockdown is seen at the latest when the entry expires.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;

/// Users remembered at most; past this the cache starts over.
const MAX_USERS: usize = 200_000;

/// A registered key (SPKI DER), shared.
type Key = Arc<[u8]>;

#[derive(Default)]
struct State {
    live: bool,
    /// Counts every event and every (re)connection. An answer is fetched
    /// at a count and stored only if nothing it depends on changed since:
    /// neither the whole cache (`epoch`) nor its user (`changed`).
    generation: u64,
    /// The count at the last change that concerns every user: the stream
    /// (re)connected or ended, a site-wide lockdown, `changed` forgotten.
    epoch: u64,
    /// Per CHIP ID, the count at its last key change or lockdown, so that
    /// one user's change does not discard answers fetched for others (at
    /// c = 4 that had every fifth enrollment ask for a lockdown twice).
    changed: HashMap<String, u64>,
    site_locked: Option<(bool, Instant)>,
    /// `None`: no key is registered for the CHIP ID (or no such user), so
    /// a repeated probe of an unknown CHIP ID is answered as fast as one of
    /// a known user and the timing tells nothing.
    keys: HashMap<String, (Option<Key>, Instant)>,
    user_locked: HashMap<String, (bool, Instant)>,
}

impl State {
    /// Whether an answer about `chip_id` fetched at `generation` is still
    /// current.
    fn current(&self, generation: u64, chip_id: &str) -> bool {
        self.live && self.epoch <= generation && self.changed.get(chip_id).is_none_or(|g| *g <= generation)
    }

    /// Count a change of `chip_id`.
    fn change(&mut self, chip_id: &str) {
        self.generation += 1;
        if self.changed.len() >= MAX_USERS {
            // Forgetting who changed when is a change for everyone.
            self.changed.clear();
            self.epoch = self.generation;
        }
        self.changed.insert(chip_id.to_owned(), self.generation);
    }
}

/// What the cache knows about one user, and when it knew it.
pub(crate) struct Known {
    pub generation: u64,
    /// `Some(None)`: known to have no key.
    pub key: Option<Option<Arc<[u8]>>>,
    /// (site locked, user locked), when both are known.
    pub lockdown: Option<(bool, bool)>,
}

pub(crate) struct AdmissionCache {
    state: Mutex<State>,
    ttl: Duration,
}

impl AdmissionCache {
    /// A cache whose entries live at most `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            state: Mutex::default(),
            ttl,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut g = match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        f(&mut g)
    }

    pub fn known(&self, chip_id: &str) -> Known {
        let now = Instant::now();
        let fresh = |at: Instant| now.duration_since(at) < self.ttl;
        self.with(|s| Known {
            generation: s.generation,
            key: s
                .live
                .then(|| {
                    s.keys
                        .get(chip_id)
                        .filter(|(_, at)| fresh(*at))
                        .map(|(k, _)| k.clone())
                })
                .flatten(),
            lockdown: s
                .live
                .then(|| {
                    let site = s.site_locked.filter(|(_, at)| fresh(*at))?.0;
                    let user = s.user_locked.get(chip_id).filter(|(_, at)| fresh(*at))?.0;
                    Some((site, user))
                })
                .flatten(),
        })
    }

    fn room(s: &mut State) {
        if s.keys.len() + s.user_locked.len() > MAX_USERS {
            s.keys.clear();
            s.user_locked.clear();
        }
    }

    /// Remember a fetched key (or that there is none), unless something
    /// changed since `generation`.
    pub fn store_key(&self, generation: u64, chip_id: &str, key: Option<&[u8]>) {
        self.with(|s| {
            if s.current(generation, chip_id) {
                Self::room(s);
                s.keys
                    .insert(chip_id.to_owned(), (key.map(Arc::from), Instant::now()));
            }
        });
    }

    /// Remember a fetched lockdown state, unless something changed since `generation`.
    pub fn store_lockdown(&self, generation: u64, chip_id: &str, site: bool, user: bool) {
        self.with(|s| {
            if s.current(generation, chip_id) {
                Self::room(s);
                let now = Instant::now();
                s.site_locked = Some((site, now));
                s.user_locked.insert(chip_id.to_owned(), (user, now));
            }
        });
    }

    pub fn key_changed(&self, chip_id: &str, key: &[u8]) {
        self.with(|s| {
            s.change(chip_id);
            if s.live {
                s.keys
                    .insert(chip_id.to_owned(), (Some(key.into()), Instant::now()));
            }
        });
    }

    /// A lockdown change; an empty CHIP ID is the whole site.
    pub fn lockdown(&self, chip_id: &str, locked: bool) {
        self.with(|s| {
            let now = Instant::now();
            if chip_id.is_empty() {
                s.generation += 1;
                s.epoch = s.generation;
                s.site_locked = s.live.then_some((locked, now));
            } else {
                s.change(chip_id);
                if s.live {
                    s.user_locked.insert(chip_id.to_owned(), (locked, now));
                }
            }
        });
    }

    /// The event stream connected (true) or ended (false): forget everything.
    pub fn set_live(&self, live: bool) {
        self.with(|s| {
            *s = State {
                live,
                generation: s.generation + 1,
                epoch: s.generation + 1,
                ..State::default()
            };
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A repeated probe of an unknown CHIP ID is answered from the cache,
    /// as one of a known user is: its timing tells nothing.
    #[tokio::test]
    async fn unknown_and_known_chip_ids_are_both_remembered_and_both_expire() {
        let cache = AdmissionCache::new(Duration::from_millis(300));
        cache.set_live(true);
        let g = cache.known("alice").generation;
        cache.store_key(g, "alice", Some(b"key"));
        cache.store_key(g, "nobody", None);
        assert_eq!(cache.known("alice").key, Some(Some(Arc::from(&b"key"[..]))));
        assert_eq!(cache.known("nobody").key, Some(None), "known to have no key");
        assert_eq!(cache.known("stranger").key, None, "never looked up");
        // A key enrolled for the unknown one replaces what was remembered.
        cache.key_changed("nobody", b"new");
        assert_eq!(cache.known("nobody").key, Some(Some(Arc::from(&b"new"[..]))));
        // Entries expire.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(cache.known("alice").key, None);
        assert_eq!(cache.known("nobody").key, None);
    }

    /// An answer fetched before a change it depends on is not stored; one
    /// fetched before another user's change is.
    #[test]
    fn only_changes_an_answer_depends_on_discard_it() {
        let cache = AdmissionCache::new(Duration::from_secs(60));
        cache.set_live(true);
        let g = cache.known("alice").generation;
        cache.key_changed("bob", b"bob's");
        cache.lockdown("carol", true);
        cache.store_key(g, "alice", Some(b"alice's"));
        cache.store_lockdown(g, "alice", false, false);
        let alice = cache.known("alice");
        assert_eq!(
            alice.key,
            Some(Some(Arc::from(&b"alice's"[..]))),
            "bob's change is not alice's"
        );
        assert_eq!(alice.lockdown, Some((false, false)));

        // Her own change since the fetch: the older answer is dropped.
        let g = cache.known("dave").generation;
        cache.key_changed("dave", b"new");
        cache.store_key(g, "dave", Some(b"old"));
        assert_eq!(cache.known("dave").key, Some(Some(Arc::from(&b"new"[..]))));
        let g = cache.known("erin").generation;
        cache.lockdown("erin", true);
        cache.store_lockdown(g, "erin", false, false);
        assert_eq!(cache.known("erin").lockdown, Some((false, true)));

        // A site-wide lockdown since the fetch: nothing fetched before it is stored.
        let g = cache.known("frank").generation;
        cache.lockdown("", true);
        cache.store_key(g, "frank", Some(b"frank's"));
        cache.store_lockdown(g, "frank", false, false);
        let frank = cache.known("frank");
        assert_eq!((frank.key, frank.lockdown), (None, None));

        // So is a reconnection of the event stream.
        let g = cache.known("gina").generation;
        cache.set_live(true);
        cache.store_key(g, "gina", Some(b"gina's"));
        assert_eq!(cache.known("gina").key, None);
    }
}
