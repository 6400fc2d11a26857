//! The open sessions of this gateway replica, by CHIP ID: so a lockdown or
//! a key change can close them and an alarm can reach them.

use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use chipsite_wire::ErrorCode;
use tokio::sync::{mpsc, watch};

/// Why the site ends a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The user or the whole site was locked down.
    LockedDown,
    /// A new key was enrolled for the user; this session used the old one.
    KeyReplaced,
    /// The gateway is stopping.
    ShuttingDown,
    /// The session could not keep up with its alarms.
    TooSlow,
}

impl CloseReason {
    pub fn code(self) -> ErrorCode {
        match self {
            Self::LockedDown => ErrorCode::LockedDown,
            Self::KeyReplaced => ErrorCode::Unauthorized,
            Self::ShuttingDown | Self::TooSlow => ErrorCode::Unavailable,
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Self::LockedDown => "locked down",
            Self::KeyReplaced => "a new key was enrolled for this user",
            Self::ShuttingDown => "the site is restarting",
            Self::TooSlow => "too many undelivered alarms",
        }
    }
}

/// Alarms queued for one session at most; a session that falls this far
/// behind is closed (its alarms stay listed with the site).
const QUEUE: usize = 64;

struct Entry {
    id: u64,
    key: Vec<u8>,
    /// Admitted (key and lockdown checked): only these count against the
    /// user's cap, so a stranger naming the user cannot fill it.
    admitted: bool,
    subscribed: bool,
    alarms: mpsc::Sender<String>,
    close: watch::Sender<Option<CloseReason>>,
}

/// The receiving side a session task holds.
pub struct Handle {
    pub id: u64,
    pub alarms: mpsc::Receiver<String>,
    pub close: watch::Receiver<Option<CloseReason>>,
}

#[derive(Default)]
pub struct Registry {
    sessions: Mutex<HashMap<String, Vec<Entry>>>,
    next: AtomicU64,
}

impl Registry {
    fn with<T>(&self, f: impl FnOnce(&mut HashMap<String, Vec<Entry>>) -> T) -> T {
        let mut guard = match self.sessions.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut guard)
    }

    pub fn register(&self, chip_id: &str, key: &[u8]) -> Handle {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (alarms_tx, alarms) = mpsc::channel(QUEUE);
        let (close_tx, close) = watch::channel(None);
        self.with(|m| {
            m.entry(chip_id.to_owned()).or_default().push(Entry {
                id,
                key: key.to_vec(),
                admitted: false,
                subscribed: false,
                alarms: alarms_tx,
                close: close_tx,
            });
        });
        Handle { id, alarms, close }
    }

    pub fn unregister(&self, chip_id: &str, id: u64) {
        self.with(|m| {
            if let Some(v) = m.get_mut(chip_id) {
                v.retain(|e| e.id != id);
                if v.is_empty() {
                    m.remove(chip_id);
                }
            }
        });
    }

    /// Count the session as admitted, unless the user already has `max`
    /// admitted sessions on this replica.
    pub fn admit(&self, chip_id: &str, id: u64, max: usize) -> bool {
        self.with(|m| {
            let Some(v) = m.get_mut(chip_id) else { return false };
            if v.iter().filter(|e| e.admitted).count() >= max {
                return false;
            }
            v.iter_mut()
                .find(|e| e.id == id)
                .map(|e| e.admitted = true)
                .is_some()
        })
    }

    pub fn subscribe(&self, chip_id: &str, id: u64) {
        self.with(|m| {
            if let Some(e) = m.get_mut(chip_id).and_then(|v| v.iter_mut().find(|e| e.id == id)) {
                e.subscribed = true;
            }
        });
    }

    /// Close the user's sessions (those not using `keep_key`, when given).
    /// Returns how many were told to close.
    pub fn close_user(&self, chip_id: &str, reason: CloseReason, keep_key: Option<&[u8]>) -> usize {
        self.with(|m| {
            let mut closed = 0;
            for e in m.get(chip_id).into_iter().flatten() {
                if keep_key.is_none_or(|k| e.key != k) {
                    let _ = e.close.send(Some(reason));
                    closed += 1;
                }
            }
            closed
        })
    }

    /// Close every session.
    pub fn close_all(&self, reason: CloseReason) -> usize {
        self.with(|m| {
            let mut closed = 0;
            for e in m.values().flatten() {
                let _ = e.close.send(Some(reason));
                closed += 1;
            }
            closed
        })
    }

    /// Queue an alarm frame for every subscribed session of the user.
    /// Returns how many sessions took it.
    pub fn push(&self, chip_id: &str, frame: &str) -> usize {
        self.with(|m| {
            let Some(v) = m.get(chip_id) else { return 0 };
            let mut delivered = 0;
            for e in v.iter().filter(|e| e.subscribed) {
                match e.alarms.try_send(frame.to_owned()) {
                    Ok(()) => delivered += 1,
                    Err(_) => {
                        let _ = e.close.send(Some(CloseReason::TooSlow));
                    }
                }
            }
            delivered
        })
    }

    /// The CHIP IDs with open sessions.
    pub fn users(&self) -> Vec<String> {
        self.with(|m| m.keys().cloned().collect())
    }

    pub fn len(&self) -> usize {
        self.with(|m| m.values().map(Vec::len).sum())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
