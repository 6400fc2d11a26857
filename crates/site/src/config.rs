//! Configuration: defaults → TOML file → `CHIPSITE_*` environment → flags.
//! Nested keys use `__` in the environment (`CHIPSITE_TLS__CERT`).

use std::{net::SocketAddr, path::PathBuf};

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use serde::{Deserialize, Serialize};

/// The services a site is made of: `chipsite dev` runs them all in one
/// process, `chipsite serve <service>` one of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Service {
    Admin,
    KeyVault,
    Ticket,
    UserGateway,
    PeerGateway,
    Tally,
    Console,
}

impl Service {
    pub const ALL: [Service; 7] = [
        Service::Admin,
        Service::KeyVault,
        Service::Ticket,
        Service::UserGateway,
        Service::PeerGateway,
        Service::Tally,
        Service::Console,
    ];

    /// The internal identity (certificate name) of the service.
    pub fn identity(self) -> &'static str {
        match self {
            Self::Admin => chipsite_tls::identity::ADMIN,
            Self::KeyVault => chipsite_tls::identity::KEY_VAULT,
            Self::Ticket => chipsite_tls::identity::TICKET,
            Self::UserGateway => chipsite_tls::identity::USER_GATEWAY,
            Self::PeerGateway => chipsite_tls::identity::PEER_GATEWAY,
            Self::Tally => chipsite_tls::identity::TALLY,
            Self::Console => chipsite_tls::identity::CONSOLE,
        }
    }

    /// Services of which one process at a time may run against a database:
    /// admin (the alarm sweeper, the settings), key-vault (the unsealed key
    /// in its memory), tally (its outbox leasing is serialised in its memory,
    /// and it lets go of every lease when it opens). `serve` claims this
    /// with an advisory lock on PostgreSQL (ADR 0012).
    pub fn must_run_alone(self) -> bool {
        matches!(self, Self::Admin | Self::KeyVault | Self::Tally)
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.identity() == s)
    }

    /// Every service's name, as `chipsite serve` takes it.
    pub fn names() -> [&'static str; 7] {
        Self::ALL.map(Self::identity)
    }

    /// The service's listeners, by name; the first is its main port, and
    /// each name is also its key under `addresses` (`-` for `_`).
    pub fn listeners(self) -> &'static [&'static str] {
        match self {
            Self::Admin => &["admin"],
            Self::KeyVault => &["key-vault"],
            Self::Ticket => &["ticket"],
            Self::UserGateway => &["user-gateway"],
            // Its internal gRPC port, then the peer sites' port.
            Self::PeerGateway => &["peer-gateway", "peer"],
            Self::Tally => &["tally"],
            Self::Console => &["console", "console-https"],
        }
    }
}

/// Where each service listens (`chipsite dev`) or is reached (`serve`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Addresses {
    pub admin: String,
    pub key_vault: String,
    pub ticket: String,
    /// The user gateway's external port (apps connect here).
    pub user_gateway: String,
    /// The peer gateway's internal gRPC port (the user gateway and admin call it).
    pub peer_gateway: String,
    /// The peer gateway's external port (peer sites connect here); open
    /// only while the peer server runs.
    pub peer: String,
    /// The tally service (the ledger; both gateways call it).
    pub tally: String,
    /// The admin web console (HTTP; loopback unless behind a TLS proxy).
    pub console: String,
    /// The console's HTTPS port, which requires a client certificate of the
    /// internal CA and signs in the admin client certificate. Empty: none.
    pub console_https: String,
    /// The ops port of this process: plain HTTP `/livez`, `/readyz` and
    /// `/metrics` for container runtimes and Prometheus. Empty: none for
    /// `serve` (set one per process, e.g. `0.0.0.0:9090` in a container);
    /// `chipsite dev` then uses [`DEV_OPS`].
    pub ops: String,
}

/// The dev site's ops port when `addresses.ops` is empty.
pub const DEV_OPS: &str = "127.0.0.1:44309";

impl Default for Addresses {
    fn default() -> Self {
        Self {
            admin: "127.0.0.1:44310".into(),
            key_vault: "127.0.0.1:44311".into(),
            ticket: "127.0.0.1:44312".into(),
            user_gateway: "127.0.0.1:44301".into(),
            peer_gateway: "127.0.0.1:44313".into(),
            peer: "127.0.0.1:44302".into(),
            tally: "127.0.0.1:44314".into(),
            console: "127.0.0.1:44303".into(),
            console_https: "127.0.0.1:44304".into(),
            ops: String::new(),
        }
    }
}

impl Addresses {
    /// Every service on a loopback port the system picks (tests, benchmarks).
    pub fn ephemeral() -> Self {
        let any = || "127.0.0.1:0".to_owned();
        Self {
            admin: any(),
            key_vault: any(),
            ticket: any(),
            user_gateway: any(),
            peer_gateway: any(),
            peer: any(),
            tally: any(),
            console: any(),
            console_https: any(),
            ops: any(),
        }
    }

    /// The environment that puts every service of a `chipsite dev` child
    /// process on a port the system picks (one entry per service, so a new
    /// service is never left on its fixed default port).
    pub fn ephemeral_env() -> Vec<(String, &'static str)> {
        Service::ALL
            .iter()
            .flat_map(|s| s.listeners().iter().copied())
            .chain(["ops"])
            .map(|name| {
                let name = name.to_ascii_uppercase().replace('-', "_");
                (format!("CHIPSITE_ADDRESSES__{name}"), "127.0.0.1:0")
            })
            .collect()
    }

    /// Move every port by `by` (`chipsite dev --port-offset`, to run a
    /// second site beside the first): each listener's address, and the ops
    /// port (the dev default when none is set). Port 0 stays 0.
    pub fn offset_ports(&mut self, by: u16) -> Result<(), String> {
        if self.ops.is_empty() {
            self.ops = DEV_OPS.to_owned();
        }
        for name in Service::ALL
            .iter()
            .flat_map(|s| s.listeners().iter().copied())
            .chain(["ops"])
        {
            let addr = self.named_mut(name);
            if addr.is_empty() {
                continue;
            }
            let mut a: SocketAddr = addr
                .parse()
                .map_err(|e| format!("addresses.{}: {addr:?}: {e}", name.replace('-', "_")))?;
            if a.port() != 0 {
                let port = a.port().checked_add(by).ok_or_else(|| {
                    format!(
                        "addresses.{}: port {} + {by} is past 65535",
                        name.replace('-', "_"),
                        a.port()
                    )
                })?;
                a.set_port(port);
            }
            *addr = a.to_string();
        }
        Ok(())
    }

    /// The address of a listener named by [`Service::listeners`] (empty
    /// for an unknown name).
    pub fn named(&self, listener: &str) -> &str {
        match listener {
            "admin" => &self.admin,
            "key-vault" => &self.key_vault,
            "ticket" => &self.ticket,
            "user-gateway" => &self.user_gateway,
            "peer-gateway" => &self.peer_gateway,
            "peer" => &self.peer,
            "tally" => &self.tally,
            "console" => &self.console,
            "console-https" => &self.console_https,
            "ops" => &self.ops,
            _ => "",
        }
    }

    pub(crate) fn named_mut(&mut self, listener: &str) -> &mut String {
        match listener {
            "admin" => &mut self.admin,
            "key-vault" => &mut self.key_vault,
            "ticket" => &mut self.ticket,
            "user-gateway" => &mut self.user_gateway,
            "peer-gateway" => &mut self.peer_gateway,
            "peer" => &mut self.peer,
            "tally" => &mut self.tally,
            "console" => &mut self.console,
            "ops" => &mut self.ops,
            _ => &mut self.console_https,
        }
    }

    pub fn of(&self, s: Service) -> &str {
        match s {
            Service::Admin => &self.admin,
            Service::KeyVault => &self.key_vault,
            Service::Ticket => &self.ticket,
            Service::UserGateway => &self.user_gateway,
            Service::PeerGateway => &self.peer_gateway,
            Service::Tally => &self.tally,
            Service::Console => &self.console,
        }
    }
}

/// Certificate, key and internal CA files (serve mode).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// The whole configuration. Every field has a default, so an empty file
/// and environment give a working dev site. (`Debug` masks the database password.)
/// A key it does not know, in the file or as a `CHIPSITE_*` variable, is an
/// error at start that names the key: a typo never passes for a default.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where `chipsite dev` keeps its databases, PKI and endpoints file.
    pub data_dir: PathBuf,
    /// One database URL for every service (PostgreSQL in production). Empty:
    /// an SQLite file per service under `data_dir/db`.
    pub database_url: String,
    /// Service addresses: where each service listens, and where others reach it.
    pub addresses: Addresses,
    /// `serve`: this service's address to listen on (default: its entry in `addresses`).
    pub listen: Option<SocketAddr>,
    /// `serve`: certificate files; reloaded when they change.
    pub tls: Option<TlsFiles>,
    /// Directory of init scripts (`*.sql`, run once each, in name order).
    pub init_dir: Option<PathBuf>,
    /// OTLP endpoint for traces (e.g. `http://127.0.0.1:4317`); empty is off.
    pub otlp_endpoint: String,
    /// Log filter (tracing's EnvFilter syntax).
    pub log: String,
    /// The user gateway's limits (`[gateway]`, `CHIPSITE_GATEWAY__…`).
    pub gateway: GatewayLimits,
    /// Days the ticket service keeps closed or expired tickets and its
    /// audit records (1 to 3650; a sweep runs every hour).
    pub ticket_retention_days: u64,
    /// How the console guards its ports (`[console]`, `CHIPSITE_CONSOLE__…`).
    pub console: ConsoleSettings,
    /// Peer sessions (`[peer]`, `CHIPSITE_PEER__…`).
    pub peer: PeerSettings,
    /// Services that share a process call each other in-process, with the
    /// certificate checks and policy of a mutual-TLS call; `true` sends
    /// those calls over TCP and TLS too (to compare, or to rule the
    /// in-process path out). Process-wide.
    #[serde(default)]
    pub internal_tcp: bool,
}

/// How long peer sessions stay open with nothing to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PeerSettings {
    /// Seconds a session this site opened stays open with nothing to send
    /// (1 to 3600).
    pub session_idle_s: u64,
    /// Seconds a session another site opened may stay silent before this
    /// site closes it (1 to 3600).
    pub idle_s: u64,
}

impl Default for PeerSettings {
    fn default() -> Self {
        Self {
            session_idle_s: 30,
            idle_s: 300,
        }
    }
}

/// The console's guards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleSettings {
    /// Host names, besides IP addresses and `localhost`, that browsers may
    /// use to reach the console (comma-separated); any other `Host` gets 421.
    pub hosts: String,
    /// Seconds a console connection may stay idle (1 to 3600).
    pub idle_s: u64,
    /// Allow the plain-HTTP port on an address that is not loopback. Off:
    /// such an address stops the start (use `addresses.console_https`, or
    /// put a TLS proxy in front and allow it).
    pub plain_remote: bool,
}

impl Default for ConsoleSettings {
    fn default() -> Self {
        Self {
            hosts: String::new(),
            idle_s: 60,
            plain_remote: false,
        }
    }
}

impl ConsoleSettings {
    pub fn host_names(&self) -> Vec<String> {
        self.hosts
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

/// The user gateway's limits, each checked against its range at start. The
/// defaults are what docs/protocol.md states.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayLimits {
    /// Open connections at most (more are closed at accept).
    pub max_connections: u64,
    /// Open connections from one source address (an IPv6 /64) at most.
    pub max_connections_per_source: u64,
    /// TLS handshakes in progress at most.
    pub max_handshakes: u64,
    /// TLS handshakes in progress from one source at most.
    pub max_handshakes_per_source: u64,
    /// Sessions one user may hold open on one gateway replica at most.
    pub max_sessions_per_user: u64,
    /// How long a TLS handshake may take.
    pub handshake_timeout_ms: u64,
    /// How long one write may wait for the app to read.
    pub write_timeout_ms: u64,
    /// How long an enrollment connection may take to send its request.
    pub enroll_timeout_ms: u64,
    /// How long a session may stay silent.
    pub session_idle_s: u64,
    /// How long one frame may take once its first byte arrived.
    pub frame_timeout_ms: u64,
    /// The longest frame, in bytes.
    pub max_frame_bytes: u64,
    /// Lifetime of the gateway's certificate (renewed at two thirds).
    pub cert_ttl_s: u64,
}

impl Default for GatewayLimits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_connections_per_source: 64,
            max_handshakes: 512,
            max_handshakes_per_source: 16,
            max_sessions_per_user: 8,
            handshake_timeout_ms: 5_000,
            write_timeout_ms: 10_000,
            enroll_timeout_ms: 10_000,
            session_idle_s: 300,
            frame_timeout_ms: 10_000,
            max_frame_bytes: 64 * 1024,
            cert_ttl_s: 24 * 3600,
        }
    }
}

impl GatewayLimits {
    /// Each limit with its key and allowed range.
    fn ranges(&self) -> [(&'static str, u64, std::ops::RangeInclusive<u64>); 12] {
        [
            ("gateway.max_connections", self.max_connections, 1..=1_000_000),
            (
                "gateway.max_connections_per_source",
                self.max_connections_per_source,
                1..=1_000_000,
            ),
            ("gateway.max_handshakes", self.max_handshakes, 1..=65_536),
            (
                "gateway.max_handshakes_per_source",
                self.max_handshakes_per_source,
                1..=65_536,
            ),
            (
                "gateway.max_sessions_per_user",
                self.max_sessions_per_user,
                1..=10_000,
            ),
            (
                "gateway.handshake_timeout_ms",
                self.handshake_timeout_ms,
                100..=60_000,
            ),
            ("gateway.write_timeout_ms", self.write_timeout_ms, 100..=60_000),
            (
                "gateway.enroll_timeout_ms",
                self.enroll_timeout_ms,
                1_000..=60_000,
            ),
            ("gateway.session_idle_s", self.session_idle_s, 10..=86_400),
            ("gateway.frame_timeout_ms", self.frame_timeout_ms, 100..=60_000),
            ("gateway.max_frame_bytes", self.max_frame_bytes, 1_024..=1_048_576),
            // key-vault certifies for at most a day.
            ("gateway.cert_ttl_s", self.cert_ttl_s, 600..=86_400),
        ]
    }

    pub fn validate(&self) -> Result<(), String> {
        for (key, value, range) in self.ranges() {
            if !range.contains(&value) {
                return Err(format!(
                    "{key} = {value} is out of range ({}..={})",
                    range.start(),
                    range.end()
                ));
            }
        }
        Ok(())
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("data_dir", &self.data_dir)
            .field("database_url", &chipsite_store::redact_url(&self.database_url))
            .field("addresses", &self.addresses)
            .field("listen", &self.listen)
            .field("tls", &self.tls)
            .field("init_dir", &self.init_dir)
            .field("otlp_endpoint", &self.otlp_endpoint)
            .field("log", &self.log)
            .field("gateway", &self.gateway)
            .field("ticket_retention_days", &self.ticket_retention_days)
            .field("console", &self.console)
            .field("peer", &self.peer)
            .finish()
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: default_data_dir(),
            database_url: String::new(),
            addresses: Addresses::default(),
            listen: None,
            tls: None,
            init_dir: None,
            otlp_endpoint: String::new(),
            log: "info,sea_orm_migration=warn".into(),
            gateway: GatewayLimits::default(),
            ticket_retention_days: 90,
            console: ConsoleSettings::default(),
            peer: PeerSettings::default(),
            internal_tcp: false,
        }
    }
}

/// Whether a `CHIPSITE_*` variable (its key after the prefix, any case) is one
/// that Kubernetes (or a Docker link) sets for a Service named `chipsite` or
/// `chipsite-…`: `CHIPSITE_SERVICE_HOST`, `CHIPSITE_ADMIN_SERVICE_PORT_GRPC`,
/// `CHIPSITE_PORT`, `CHIPSITE_ADMIN_PORT_44310_TCP_ADDR`, …. They are not
/// settings, and no setting looks like them.
pub fn is_service_link(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    // Every nested setting has `__`; no service-link variable does.
    if key.contains("__") {
        return false;
    }
    let words: Vec<&str> = key.split('_').collect();
    words
        .windows(2)
        .any(|w| w == ["service", "host"] || w == ["service", "port"])
        || words.first() == Some(&"port")
        || words.iter().skip(1).any(|w| *w == "port")
}

/// `CHIPSITE_*` variables that are not settings: the pass phrase (read by
/// `serve key-vault` alone and never part of `Config`), the `--config` flag's
/// variable, and the test suite's own.
pub const NOT_SETTINGS: &[&str] = &[
    "site_key_passphrase",
    "site_key_passphrase_file",
    "config",
    "test_postgres_url",
    "bench_postgres_url",
    "screenshots",
];

pub use chipsite_model::endpoints::default_data_dir;

impl Config {
    /// Defaults, then `file` (if given), then `CHIPSITE_*` environment.
    pub fn load(file: Option<&std::path::Path>) -> Result<Self, Box<figment::Error>> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(f) = file {
            if !f.exists() {
                return Err(Box::new(figment::Error::from(format!(
                    "config file {} does not exist",
                    f.display()
                ))));
            }
            fig = fig.merge(Toml::file(f));
        }
        fig = fig.merge(
            Env::prefixed("CHIPSITE_")
                .filter(|key| {
                    !is_service_link(key.as_str()) && !key.as_str().to_ascii_lowercase().ends_with("_file")
                })
                .split("__")
                .ignore(NOT_SETTINGS),
        );
        // `CHIPSITE_<KEY>_FILE`: the setting's value is the file's content
        // (a mounted secret, such as a database URL with its password), the
        // convention of the PostgreSQL image; it wins over `CHIPSITE_<KEY>`.
        for (var, path) in std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v))) {
            let Some(key) = var
                .strip_prefix("CHIPSITE_")
                .and_then(|k| k.strip_suffix("_FILE"))
            else {
                continue;
            };
            let key = key.to_ascii_lowercase();
            if NOT_SETTINGS.contains(&format!("{key}_file").as_str()) || is_service_link(&key) {
                continue;
            }
            let text = std::fs::read_to_string(&path).map_err(|e| {
                Box::new(figment::Error::from(format!(
                    "{var} ({}): {e}",
                    std::path::Path::new(&path).display()
                )))
            })?;
            let value = text.trim_end_matches(['\r', '\n']).to_owned();
            fig = fig.merge(Serialized::default(&key.replace("__", "."), value));
        }
        let config: Config = fig.extract().map_err(Box::new)?;
        config
            .gateway
            .validate()
            .map_err(|e| Box::new(figment::Error::from(e)))?;
        if !(1..=3600).contains(&config.console.idle_s) {
            return Err(Box::new(figment::Error::from(format!(
                "console.idle_s = {} is out of range (1..=3600)",
                config.console.idle_s
            ))));
        }
        for (key, value) in [
            ("peer.session_idle_s", config.peer.session_idle_s),
            ("peer.idle_s", config.peer.idle_s),
        ] {
            if !(1..=3600).contains(&value) {
                return Err(Box::new(figment::Error::from(format!(
                    "{key} = {value} is out of range (1..=3600)"
                ))));
            }
        }
        if !(1..=3650).contains(&config.ticket_retention_days) {
            return Err(Box::new(figment::Error::from(format!(
                "ticket_retention_days = {} is out of range (1..=3650)",
                config.ticket_retention_days
            ))));
        }
        Ok(config)
    }

    pub fn init_dir(&self) -> PathBuf {
        self.init_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("init.d"))
    }

    /// The database URL a service uses.
    pub fn database_url_for(&self, s: Service) -> String {
        if self.database_url.is_empty() {
            chipsite_store::sqlite_url(&self.data_dir.join("db").join(format!("{}.sqlite", s.identity())))
        } else {
            self.database_url.clone()
        }
    }

    /// The configuration as TOML (the file format it is read from), with
    /// the database password masked.
    pub fn to_masked_toml(&self) -> String {
        let mut c = self.clone();
        c.database_url = chipsite_store::redact_url(&c.database_url);
        toml::to_string(&c).unwrap_or_else(|e| format!("# cannot print the configuration: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// `chipsite dev --port-offset` moves every port, the dev ops port
    /// included, so a second site never collides with the first.
    #[test]
    fn a_port_offset_moves_every_port() {
        let mut a = Addresses::default();
        a.offset_ports(100).unwrap();
        let d = Addresses::default();
        for name in Service::ALL.iter().flat_map(|s| s.listeners().iter().copied()) {
            let (was, now): (SocketAddr, SocketAddr) =
                (d.named(name).parse().unwrap(), a.named(name).parse().unwrap());
            assert_eq!(now.port(), was.port() + 100, "{name}");
        }
        assert_eq!(a.ops, "127.0.0.1:44409");
        assert_eq!(a.peer, "127.0.0.1:44402");
        let mut e = Addresses::ephemeral();
        e.offset_ports(100).unwrap();
        assert_eq!(e, Addresses::ephemeral(), "port 0 stays 0");
        let e = Addresses::default().offset_ports(30_000).unwrap_err();
        assert!(e.contains("past 65535"), "{e}");
    }
}
