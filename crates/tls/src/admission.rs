//! Connection admission for a port that faces untrusted clients: caps on
//! connections and TLS handshakes, in total and per source, decided at
//! accept without ever waiting. A connection over a cap is shed (closed at
//! once, before any TLS byte), so a flood from one address cannot pause the
//! accept loop or take the slots every other client needs.
//!
//! A connection holds a [`ConnPermit`] for its whole life; its handshake
//! slot is given back by [`ConnPermit::handshake_done`] (or the drop).

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

/// The caps of one port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// Open connections at most (handshaking or not).
    pub max_connections: usize,
    /// Open connections from one source at most.
    pub max_connections_per_source: usize,
    /// TLS handshakes in progress at most.
    pub max_handshakes: usize,
    /// TLS handshakes in progress from one source at most.
    pub max_handshakes_per_source: usize,
}

impl AdmissionLimits {
    /// For the internal mutual-TLS ports and the console's HTTPS port: a
    /// few long-lived HTTP/2 clients per service.
    pub const INTERNAL: Self = Self {
        max_connections: 1024,
        max_connections_per_source: 256,
        max_handshakes: 128,
        max_handshakes_per_source: 32,
    };
}

/// Why a connection was shed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// The port holds `max_connections` already.
    Connections,
    /// The source holds `max_connections_per_source` already.
    SourceConnections,
    /// `max_handshakes` are in progress.
    Handshakes,
    /// The source has `max_handshakes_per_source` in progress.
    SourceHandshakes,
}

impl Shed {
    /// A short label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::Connections => "connections",
            Self::SourceConnections => "source_connections",
            Self::Handshakes => "handshakes",
            Self::SourceHandshakes => "source_handshakes",
        }
    }
}

/// The source a connection counts against: an IPv4 address, or the /64
/// network of an IPv6 address (one host usually holds a whole /64).
/// IPv4-mapped IPv6 addresses count as their IPv4 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    V4(u32),
    /// The network's first 64 bits.
    V6(u64),
}

impl From<IpAddr> for Source {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self::V4(u32::from(v4)),
                None => Self::V6(u64::try_from(u128::from(v6) >> 64).unwrap_or(u64::MAX)),
            },
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    connections: usize,
    handshakes: usize,
}

#[derive(Debug, Default)]
struct State {
    total: Counts,
    by_source: HashMap<Source, Counts>,
}

/// The caps and the current counts of one port.
#[derive(Debug)]
pub struct Admission {
    limits: AdmissionLimits,
    state: Mutex<State>,
}

impl Admission {
    pub fn new(limits: AdmissionLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            state: Mutex::default(),
        })
    }

    pub fn limits(&self) -> AdmissionLimits {
        self.limits
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // The counts stay consistent even if a holder panicked: every
        // change is a single step.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Admit a new connection from `ip` to its handshake, or say why not.
    /// Never waits.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnPermit, Shed> {
        let source = Source::from(ip);
        let l = self.limits;
        let mut s = self.state();
        if s.total.connections >= l.max_connections {
            return Err(Shed::Connections);
        }
        if s.total.handshakes >= l.max_handshakes {
            return Err(Shed::Handshakes);
        }
        let mine = s.by_source.get(&source);
        if mine.is_some_and(|c| c.connections >= l.max_connections_per_source) {
            return Err(Shed::SourceConnections);
        }
        if mine.is_some_and(|c| c.handshakes >= l.max_handshakes_per_source) {
            return Err(Shed::SourceHandshakes);
        }
        s.total.connections += 1;
        s.total.handshakes += 1;
        let mine = s.by_source.entry(source).or_default();
        mine.connections += 1;
        mine.handshakes += 1;
        Ok(ConnPermit {
            admission: self.clone(),
            source,
            handshaking: true,
        })
    }

    /// Open connections and handshakes in progress, in total.
    pub fn counts(&self) -> (usize, usize) {
        let s = self.state();
        (s.total.connections, s.total.handshakes)
    }

    /// Sources with at least one open connection.
    pub fn sources(&self) -> usize {
        self.state().by_source.len()
    }

    fn release(&self, source: Source, handshake: bool, connection: bool) {
        let mut s = self.state();
        if handshake {
            s.total.handshakes = s.total.handshakes.saturating_sub(1);
        }
        if connection {
            s.total.connections = s.total.connections.saturating_sub(1);
        }
        if let Some(c) = s.by_source.get_mut(&source) {
            if handshake {
                c.handshakes = c.handshakes.saturating_sub(1);
            }
            if connection {
                c.connections = c.connections.saturating_sub(1);
            }
            if c.connections == 0 {
                s.by_source.remove(&source);
            }
        }
    }
}

/// One admitted connection's place, held for its whole life.
#[derive(Debug)]
pub struct ConnPermit {
    admission: Arc<Admission>,
    source: Source,
    handshaking: bool,
}

impl ConnPermit {
    /// The handshake finished (either way): give its slot back, keep the
    /// connection's.
    pub fn handshake_done(&mut self) {
        if std::mem::take(&mut self.handshaking) {
            self.admission.release(self.source, true, false);
        }
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        self.admission.release(self.source, self.handshaking, true);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn per_source_handshakes_are_capped_and_others_still_admitted() {
        let a = Admission::new(AdmissionLimits {
            max_connections: 10,
            max_connections_per_source: 5,
            max_handshakes: 4,
            max_handshakes_per_source: 2,
        });
        let x1 = a.admit(ip("127.0.0.2")).unwrap();
        let mut x2 = a.admit(ip("127.0.0.2")).unwrap();
        assert_eq!(a.admit(ip("127.0.0.2")).unwrap_err(), Shed::SourceHandshakes);
        let y1 = a.admit(ip("127.0.0.3")).unwrap();
        // The flooder's finished handshake frees a handshake slot, not its connection's.
        x2.handshake_done();
        let x3 = a.admit(ip("127.0.0.2")).unwrap();
        assert_eq!(a.counts(), (4, 3));
        let _y2 = a.admit(ip("127.0.0.3")).unwrap();
        // Four handshakes in progress: the global cap sheds any source.
        assert_eq!(a.admit(ip("127.0.0.4")).unwrap_err(), Shed::Handshakes);
        drop((x1, x3, y1));
        assert_eq!(a.counts(), (2, 1));
        drop(x2);
        assert_eq!(a.sources(), 1);
    }

    #[test]
    fn connections_are_capped_per_source_and_in_total() {
        let a = Admission::new(AdmissionLimits {
            max_connections: 3,
            max_connections_per_source: 2,
            max_handshakes: 10,
            max_handshakes_per_source: 10,
        });
        let mut held = vec![];
        for _ in 0..2 {
            let mut p = a.admit(ip("10.0.0.1")).unwrap();
            p.handshake_done();
            held.push(p);
        }
        assert_eq!(a.admit(ip("10.0.0.1")).unwrap_err(), Shed::SourceConnections);
        // IPv4-mapped IPv6 is the same source.
        assert_eq!(
            a.admit(ip("::ffff:10.0.0.1")).unwrap_err(),
            Shed::SourceConnections
        );
        held.push(a.admit(ip("10.0.0.2")).unwrap());
        assert_eq!(a.admit(ip("10.0.0.3")).unwrap_err(), Shed::Connections);
        held.clear();
        assert_eq!(a.counts(), (0, 0));
        assert_eq!(a.sources(), 0);
    }

    #[test]
    fn an_ipv6_host_counts_as_its_64() {
        assert_eq!(
            Source::from(ip("2001:db8:1:2::1")),
            Source::from(ip("2001:db8:1:2:ffff::9"))
        );
        assert_ne!(
            Source::from(ip("2001:db8:1:2::1")),
            Source::from(ip("2001:db8:1:3::1"))
        );
        assert_ne!(Source::from(ip("0.0.0.1")), Source::from(ip("::")));
    }
}
