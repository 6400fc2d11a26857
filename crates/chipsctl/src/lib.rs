//! chipsctl: the admin CLI. Every command is one AdminService call over
//! mutual TLS with the operator's (admin-client) certificate. Output is for
//! people by default and JSON with `--json`; every failure is one line.

use std::{
    collections::HashMap,
    io::{BufRead, Write},
    path::PathBuf,
};

use chipsite_model::endpoints::{Endpoints, default_data_dir};
use chipsite_proto::status::{ErrorCode, code_of};
use chipsite_proto::{
    admin::v1::{self as pb, admin_service_client::AdminServiceClient},
    events::v1::{self as ev, user_events_client::UserEventsClient},
};
use chipsite_tls::InternalChannel as Channel;
use chipsite_tls::{CertPaths, identity};
use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};

#[derive(Parser, Debug)]
#[command(name = "chipsctl", version, about = "Administer a chipsite site")]
pub struct Cli {
    /// Data directory of a dev site (default: $CHIPSITE_DATA_DIR or ~/.local/share/chipsite/dev).
    #[arg(long, global = true, env = "CHIPSITE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// AdminService address (host:port); with --cert, --key and --ca instead of a data directory.
    #[arg(long, global = true, env = "CHIPSCTL_ADMIN")]
    pub admin: Option<String>,
    #[arg(long, global = true, env = "CHIPSCTL_CERT")]
    pub cert: Option<PathBuf>,
    #[arg(long, global = true, env = "CHIPSCTL_KEY")]
    pub key: Option<PathBuf>,
    #[arg(long, global = true, env = "CHIPSCTL_CA")]
    pub ca: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Who you are, for the audit ("admin-client (NAME)"): 1-48 of letters,
    /// digits and . _ @ + - (default: $USER when it is such a name).
    #[arg(long, global = true, env = "CHIPSCTL_OPERATOR")]
    pub operator: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Users: create, show, list, edit, dump, load, lock, unlock.
    #[command(subcommand)]
    User(UserCmd),
    /// Connection tickets: issue, list, revoke.
    #[command(subcommand)]
    Ticket(TicketCmd),
    /// The site key: status, unseal, seal, create, passphrase.
    #[command(subcommand)]
    Key(KeyCmd),
    /// The peer server (status, start, stop) and the peer sites this site knows (list).
    #[command(subcommand)]
    Peer(PeerCmd),
    /// Tallies between a local user and users on other sites: list.
    #[command(subcommand)]
    Tally(TallyCmd),
    /// Site-wide lockdown: status, lock, unlock.
    #[command(subcommand)]
    Site(SiteCmd),
    /// Site configuration defaults: show, set, reset.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Alarms for users: raise, list.
    #[command(subcommand)]
    Alarm(AlarmCmd),
    /// The admin web console: a one-time sign-in link.
    #[command(subcommand)]
    Console(ConsoleCmd),
    /// The audit log, newest first.
    Audit {
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Only "admin" or "ticket" records.
        #[arg(long, default_value = "")]
        source: String,
        /// Only records with this text (any case) in a field.
        #[arg(long, default_value = "")]
        contains: String,
        /// The older entries after a page (printed at its end; use the same
        /// --source and --contains).
        #[arg(long, default_value = "", allow_hyphen_values = true)]
        page_token: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum ConsoleCmd {
    /// Print a one-time sign-in link for the web console.
    Link {
        /// Seconds the link stays valid (at most 3600; default 600).
        #[arg(long, default_value_t = 0)]
        ttl: u32,
    },
}

#[derive(Subcommand, Debug)]
pub enum AlarmCmd {
    /// Raise an alarm for a user: pushed to the user's app if it is
    /// connected, else sent by e-mail and/or text.
    Raise {
        chip_id: String,
        text: String,
        #[arg(long, default_value = "notice")]
        kind: String,
    },
    /// A user's alarms, newest first.
    List {
        chip_id: String,
        /// Acknowledged ones too.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Args, Debug)]
#[group(id = "user_fields")]
pub struct UserFields {
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub contact: ContactFields,
}

/// A user's address and contact details, each optional.
#[derive(Args, Debug)]
pub struct ContactFields {
    #[arg(long)]
    pub address: Option<String>,
    #[arg(long)]
    pub email: Option<String>,
    #[arg(long)]
    pub phone: Option<String>,
}

/// A new user's fields: the name is required (checked by chipsctl itself, so
/// that a missing one is a one-line error like every other).
#[derive(Args, Debug)]
pub struct NewUserFields {
    /// The user's name (required).
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub contact: ContactFields,
}

#[derive(Subcommand, Debug)]
pub enum UserCmd {
    /// Create a user (a name is required; contact details are optional).
    Create {
        chip_id: String,
        #[command(flatten)]
        fields: NewUserFields,
    },
    Show {
        chip_id: String,
    },
    List {
        /// Part of a CHIP ID or name.
        #[arg(long, default_value = "")]
        query: String,
        /// Only users with this status: active, suspended or closed.
        #[arg(long, default_value = "")]
        status: String,
        /// Only locked-down users (true) or only open ones (false).
        #[arg(long)]
        locked: Option<bool>,
        /// chip_id, name, status or created; a leading - reverses it
        /// (--sort=-created: newest first).
        #[arg(long, default_value = "chip_id", allow_hyphen_values = true)]
        sort: String,
        #[arg(long, default_value_t = 50)]
        page_size: u32,
        /// The next page (printed at a page's end; use the same query,
        /// filters and sort).
        #[arg(long, default_value = "", allow_hyphen_values = true)]
        page_token: String,
    },
    Edit {
        chip_id: String,
        #[command(flatten)]
        fields: UserFields,
        /// active, suspended or closed.
        #[arg(long)]
        status: Option<String>,
    },
    /// Write the user as JSON to a file (or stdout).
    Dump {
        chip_id: String,
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Load a user from a JSON dump file ("-" for stdin).
    Load {
        file: PathBuf,
    },
    /// Lock the user out: open sessions close, new ones are refused.
    Lock {
        chip_id: String,
    },
    Unlock {
        chip_id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum TicketCmd {
    /// Issue a user's connection ticket. A user who is locked down (or not
    /// active) gets none: lift the lockdown first.
    Issue {
        chip_id: String,
        /// Lifetime in seconds, at most 2592000 (30 days); 0, the default,
        /// takes the site's ticket.ttl_seconds (60 to 2592000, 86400 unless changed).
        #[arg(long, default_value_t = 0)]
        ttl: u32,
        /// Also draw the ticket as a QR code in the terminal.
        #[arg(long)]
        qr: bool,
        /// Also write the QR code as an SVG file.
        #[arg(long)]
        svg: Option<PathBuf>,
    },
    List {
        #[arg(long, default_value = "")]
        user: String,
        /// Include redeemed, burned, expired and revoked tickets.
        #[arg(long)]
        all: bool,
    },
    Revoke {
        id: String,
    },
}

#[derive(Args, Debug, Default)]
#[group(id = "passphrase_source")]
pub struct Passphrase {
    /// Read the pass phrase from this file (else $CHIPSCTL_PASSPHRASE, else typed at the
    /// terminal without echo, or one line of piped stdin).
    #[arg(long)]
    pub passphrase_file: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum KeyCmd {
    Status,
    Unseal {
        #[command(flatten)]
        passphrase: Passphrase,
    },
    Seal,
    /// Create a new site key under a new pass phrase (the old key is retired).
    /// The current pass phrase first (--passphrase-file, else $CHIPSCTL_PASSPHRASE,
    /// else the first line of stdin), then the new one.
    Create {
        #[command(flatten)]
        passphrase: Passphrase,
        /// Read the new pass phrase from this file (else $CHIPSCTL_NEW_PASSPHRASE, else the next line of stdin).
        #[arg(long)]
        new_passphrase_file: Option<PathBuf>,
    },
    /// Write the site key as stored (encrypted PKCS#8 PEM) to a file or stdout;
    /// asks for the current pass phrase.
    Export {
        #[arg(short, long)]
        output: Option<PathBuf>,
        #[command(flatten)]
        passphrase: Passphrase,
    },
    /// Replace the site key with an encrypted PKCS#8 PEM file (for example from openssl).
    /// The current pass phrase first, then the file's (which the key keeps).
    Import {
        file: PathBuf,
        #[command(flatten)]
        passphrase: Passphrase,
        /// Read the file's pass phrase from this file (else $CHIPSCTL_NEW_PASSPHRASE, else the next line of stdin).
        #[arg(long)]
        new_passphrase_file: Option<PathBuf>,
    },
    /// Encrypt the site key under a new pass phrase.
    Passphrase {
        #[command(flatten)]
        passphrase: Passphrase,
        /// Read the new pass phrase from this file (else $CHIPSCTL_NEW_PASSPHRASE, else the second line of stdin).
        #[arg(long)]
        new_passphrase_file: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum TallyCmd {
    /// A user's tallies, newest first: the other user and site, the state,
    /// the terms, how the user's last step is getting there, and (with
    /// --json) every signed step.
    List {
        chip_id: String,
        /// At most this many (1 to 1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

#[derive(Subcommand, Debug)]
pub enum PeerCmd {
    Status,
    Start {
        #[command(flatten)]
        passphrase: Passphrase,
    },
    Stop,
    /// The peer sites this site knows: their keys' pins, where they listen,
    /// the links between their users and ours, the last contact.
    List,
}

#[derive(Subcommand, Debug)]
pub enum SiteCmd {
    Status,
    Lock,
    Unlock,
}

#[derive(Subcommand, Debug)]
pub enum ConfigCmd {
    Show,
    /// Set keys: `chipsctl config set ticket.ttl_seconds=3600 site.name=Example`.
    Set {
        #[arg(required = true)]
        pairs: Vec<String>,
    },
    /// Reset keys to their defaults.
    Reset {
        #[arg(required = true)]
        keys: Vec<String>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    NoSite(#[from] chipsite_model::endpoints::NoSite),
    #[error("{0}")]
    Tls(#[from] chipsite_tls::TlsError),
    #[error("{0}")]
    Rpc(String),
    #[error("{0}")]
    Io(String),
}

/// A tonic status as one line a person can act on.
fn rpc_error(admin: &str) -> impl Fn(tonic::Status) -> CliError + '_ {
    move |s| {
        CliError::Rpc(match code_of(&s) {
            ErrorCode::Unavailable => format!("cannot reach the admin service at {admin}: {}", s.message()),
            ErrorCode::Forbidden => {
                format!("refused: {} (is this the admin-client certificate?)", s.message())
            }
            _ => s.message().to_owned(),
        })
    }
}

/// Where pass phrases come from: a file, else an environment variable, else
/// stdin: typed at a terminal without echo (a new one twice), or the next
/// line of a pipe (never the command line, where `ps` shows it).
#[derive(Default)]
struct Secrets {
    stdin: Option<std::io::Lines<std::io::StdinLock<'static>>>,
}

impl Secrets {
    fn read(&mut self, file: &Option<PathBuf>, env: &str) -> Result<String, CliError> {
        if let Some(f) = file {
            let s = std::fs::read_to_string(f).map_err(|e| CliError::Io(format!("{}: {e}", f.display())))?;
            return Ok(s.trim_end_matches(['\r', '\n']).to_owned());
        }
        if let Ok(s) = std::env::var(env) {
            return Ok(s);
        }
        if self.stdin.is_none() && std::io::IsTerminal::is_terminal(&std::io::stdin()) {
            return typed(env == "CHIPSCTL_NEW_PASSPHRASE");
        }
        match self
            .stdin
            .get_or_insert_with(|| std::io::stdin().lock().lines())
            .next()
        {
            Some(Ok(s)) => Ok(s.trim_end_matches('\r').to_owned()),
            _ => Err(CliError::Usage(format!(
                "no pass phrase: give a file, set ${env}, or write it to stdin"
            ))),
        }
    }

    fn passphrase(&mut self, p: &Passphrase) -> Result<String, CliError> {
        self.read(&p.passphrase_file, "CHIPSCTL_PASSPHRASE")
    }
}

/// A pass phrase typed at the terminal, not echoed; a new one is asked for
/// twice and must match.
fn typed(new: bool) -> Result<String, CliError> {
    let ask = |prompt: &str| {
        rpassword::prompt_password(prompt).map_err(|e| CliError::Io(format!("reading the pass phrase: {e}")))
    };
    let first = ask(if new {
        "new site key pass phrase: "
    } else {
        "site key pass phrase: "
    })?;
    if new && ask("the new pass phrase again: ")? != first {
        return Err(CliError::Usage(
            "the two new pass phrases differ; nothing was changed".into(),
        ));
    }
    Ok(first)
}

fn connect(cli: &Cli) -> Result<(Channel, String), CliError> {
    if let Some(admin) = &cli.admin {
        let (Some(cert), Some(key), Some(ca)) = (&cli.cert, &cli.key, &cli.ca) else {
            return Err(CliError::Usage("--admin needs --cert, --key and --ca".into()));
        };
        let certs = CertPaths {
            cert: cert.clone(),
            key: key.clone(),
            ca: ca.clone(),
        };
        return Ok((admin_channel(admin, &certs)?, admin.clone()));
    }
    let data_dir = cli.data_dir.clone().unwrap_or_else(default_data_dir);
    let endpoints = Endpoints::read(&data_dir)?;
    let channel = admin_channel(&endpoints.admin, &endpoints.cert_paths(identity::ADMIN_CLIENT))?;
    Ok((channel, endpoints.admin))
}

/// A mutual-TLS channel to the admin service with these certificate files.
fn admin_channel(admin: &str, certs: &CertPaths) -> Result<Channel, CliError> {
    let tls = chipsite_tls::ReloadableTls::from_files(certs.clone())?;
    chipsite_tls::connect_lazy(admin, identity::ADMIN, tls).map_err(|e| CliError::Usage(e.to_string()))
}

fn alarm_json(a: &ev::Alarm) -> Value {
    json!({"id": a.id, "chip_id": a.chip_id, "kind": a.kind, "text": a.text,
           "created_at_ms": a.created_at_ms, "acked_at_ms": a.acked_at_ms, "delivered_by": a.delivered_by})
}

fn alarm_text(a: &ev::Alarm) -> String {
    format!(
        "{:>6}  {}  {:<10} {:<10} {:<9} {}\n",
        a.id,
        ms(a.created_at_ms),
        a.chip_id,
        a.kind,
        if a.delivered_by.is_empty() {
            "pending"
        } else {
            &a.delivered_by
        },
        a.text
    )
}

fn ms(t: i64) -> String {
    if t <= 0 {
        return "-".into();
    }
    // Seconds since the epoch as UTC, without a date library.
    let secs = t / 1000;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn user_json(u: &pb::User) -> Value {
    let c = u.contact.clone().unwrap_or_default();
    json!({
        "chip_id": u.chip_id, "name": u.name, "address": u.address,
        "contact": {"email": c.email, "phone": c.phone},
        "status": u.status, "locked": u.locked, "has_key": u.has_key,
        "created_at_ms": u.created_at_ms, "updated_at_ms": u.updated_at_ms,
    })
}

fn user_text(u: &pb::User) -> String {
    let c = u.contact.clone().unwrap_or_default();
    format!(
        "{}\n  name     {}\n  address  {}\n  email    {}\n  phone    {}\n  status   {}{}\n  key      {}\n  created  {}\n  updated  {}\n",
        u.chip_id,
        u.name,
        u.address,
        c.email,
        c.phone,
        u.status,
        if u.locked { " (LOCKED DOWN)" } else { "" },
        if u.has_key { "registered" } else { "none yet" },
        ms(u.created_at_ms),
        ms(u.updated_at_ms)
    )
}

fn vault_json(v: &pb::VaultStatusView) -> Value {
    json!({"has_key": v.has_key, "sealed": v.sealed, "site_key_pin": v.site_key_pin, "key_created_at_ms": v.key_created_at_ms})
}

fn vault_text(v: &pb::VaultStatusView) -> String {
    if !v.has_key {
        return "no site key (create one: chipsctl key create)\n".into();
    }
    format!(
        "site key {}\n  pin      {}\n  created  {}\n",
        if v.sealed { "SEALED" } else { "unsealed" },
        v.site_key_pin,
        ms(v.key_created_at_ms)
    )
}

fn ticket_json(t: &pb::TicketInfo) -> Value {
    json!({"id": t.id, "kind": t.kind, "chip_id": t.chip_id, "state": t.state,
           "created_at_ms": t.created_at_ms, "expires_at_ms": t.expires_at_ms})
}

fn lockdown_json(l: &pb::LockdownState) -> Value {
    json!({"site_locked": l.site_locked, "chip_id": l.chip_id, "user_locked": l.user_locked})
}

fn lockdown_text(l: &pb::LockdownState) -> String {
    let mut s = format!("site {}\n", if l.site_locked { "LOCKED DOWN" } else { "open" });
    if !l.chip_id.is_empty() {
        s.push_str(&format!(
            "user {} {}\n",
            l.chip_id,
            if l.user_locked { "LOCKED DOWN" } else { "open" }
        ));
    }
    s
}

fn tallies_json(tallies: &[chipsite_proto::tally::v1::Tally]) -> Value {
    json!(
        tallies
            .iter()
            .map(|t| json!({
                "id": t.id,
                "chip_id": t.chip_id,
                "peer": {"chip_id": t.peer_chip_id, "site_pin": t.peer_site_pin},
                "role": t.role,
                "state": t.state,
                "terms": serde_json::from_str::<Value>(&t.terms).unwrap_or(Value::Null),
                "delivery": t.delivery,
                "created_at_ms": t.created_at_ms,
                "updated_at_ms": t.updated_at_ms,
                "steps": t.steps.iter().map(|s| json!({
                    "seq": s.seq,
                    "kind": s.kind,
                    "signer": {"chip_id": s.signer_chip_id, "site_pin": s.signer_site_pin},
                    "doc": serde_json::from_str::<Value>(&s.doc).unwrap_or(Value::Null),
                    "sig": s.sig,
                    "hash": s.hash,
                    "state": s.state,
                    "recorded_at_ms": s.recorded_at_ms,
                })).collect::<Vec<_>>(),
            }))
            .collect::<Vec<_>>()
    )
}

fn tallies_text(chip_id: &str, tallies: &[chipsite_proto::tally::v1::Tally]) -> String {
    if tallies.is_empty() {
        return format!("{chip_id} has no tallies\n");
    }
    let mut s = String::new();
    for t in tallies {
        s.push_str(&format!(
            "{}  {} with {} ({})  {}\n  terms {}; {} step(s){}\n",
            t.id,
            t.role,
            t.peer_chip_id,
            t.peer_site_pin,
            t.state,
            t.terms,
            t.steps.len(),
            match t.delivery.as_str() {
                "" => String::new(),
                d => format!("; last step {d}"),
            }
        ));
    }
    s
}

fn peer_json(p: &pb::PeerServerState) -> Value {
    json!({"desired": p.desired, "changed_at_ms": p.changed_at_ms})
}

fn peers_json(sites: &[chipsite_proto::peer::v1::PeerSite]) -> Value {
    json!(
        sites
            .iter()
            .map(|s| json!({
                "site_pin": s.site_pin,
                "host": s.host,
                "port": s.port,
                "last_contact_ms": s.last_contact_ms,
                "last_outcome": s.last_outcome,
                "outbox_depth": s.outbox_depth,
                "sessions_out": s.sessions_out,
                "sessions_in": s.sessions_in,
                "links": s.links.iter().map(|l| json!({
                    "chip_id": l.chip_id,
                    "peer_chip_id": l.peer_chip_id,
                    "via": l.via,
                    "created_at_ms": l.created_at_ms,
                })).collect::<Vec<_>>(),
            }))
            .collect::<Vec<_>>()
    )
}

fn peers_text(sites: &[chipsite_proto::peer::v1::PeerSite]) -> String {
    if sites.is_empty() {
        return "no peer sites yet (a user redeems another site's tally ticket, or another site redeems one of ours)\n".into();
    }
    let mut s = String::new();
    for site in sites {
        let contact = match site.last_contact_ms {
            0 => "no contact since the peer gateway started".to_owned(),
            t => format!("last contact {} ({})", ms(t), site.last_outcome),
        };
        s.push_str(&format!(
            "{}:{}  {}\n  {contact}; sessions {} out, {} in; outbox {}\n",
            site.host, site.port, site.site_pin, site.sessions_out, site.sessions_in, site.outbox_depth
        ));
        for l in &site.links {
            s.push_str(&format!(
                "  {} <-> {}  ({}, {})\n",
                l.chip_id,
                l.peer_chip_id,
                l.via,
                ms(l.created_at_ms)
            ));
        }
    }
    s
}

fn config_json(c: &pb::SiteConfig) -> Value {
    let sorted: std::collections::BTreeMap<_, _> = c.values.iter().collect();
    json!(sorted)
}

/// `key = value`, with `(changed)` after a value that is not the default.
/// Secrets inside values come masked (`****`); `config set key=<as shown>`
/// leaves such a value unchanged.
fn config_text(c: &pb::SiteConfig) -> String {
    let sorted: std::collections::BTreeMap<_, _> = c.values.iter().collect();
    sorted
        .into_iter()
        .map(|(k, v)| {
            if c.changed.contains(k) {
                format!("{k} = {v}  (changed)\n")
            } else {
                format!("{k} = {v}\n")
            }
        })
        .collect()
}

/// Names the operator on every AdminService call (`chipsite-operator`).
#[derive(Clone)]
struct NameOperator(Option<tonic::metadata::AsciiMetadataValue>);

impl tonic::service::Interceptor for NameOperator {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut()
                .insert(chipsite_model::operator::METADATA, v.clone());
        }
        Ok(req)
    }
}

type AdminClient = AdminServiceClient<tonic::service::interceptor::InterceptedService<Channel, NameOperator>>;

/// The operator to name: `--operator` (refused if not a plain name), else
/// `$USER` when it is one, else none.
fn operator(cli: &Cli) -> Result<NameOperator, CliError> {
    let name = match &cli.operator {
        Some(n) if chipsite_model::operator::valid(n) => Some(n.clone()),
        Some(_) => {
            return Err(CliError::Usage(
                "--operator must be 1-48 of letters, digits and . _ @ + -".into(),
            ));
        }
        None => std::env::var("USER")
            .ok()
            .filter(|n| chipsite_model::operator::valid(n)),
    };
    Ok(NameOperator(name.and_then(|n| n.parse().ok())))
}

/// Lock down a user (`chip_id`) or the whole site (empty), or lift it.
async fn set_lockdown(
    client: &mut AdminClient,
    chip_id: String,
    locked: bool,
) -> Result<pb::LockdownState, tonic::Status> {
    Ok(client
        .set_lockdown(pb::SetLockdownRequest { chip_id, locked })
        .await?
        .into_inner())
}

/// Run one command, writing its output to `out`.
pub async fn run(cli: Cli, out: &mut dyn Write) -> Result<(), CliError> {
    let named = operator(&cli)?;
    let (channel, admin_addr) = connect(&cli)?;
    let mut client = AdminServiceClient::with_interceptor(channel.clone(), named);
    let mut events = UserEventsClient::new(channel);
    let err = rpc_error(&admin_addr);
    let mut secrets = Secrets::default();
    let json_mode = cli.json;
    let emit = |out: &mut dyn Write, v: Value, text: String| -> Result<(), CliError> {
        let s = if json_mode {
            format!("{}\n", serde_json::to_string_pretty(&v).unwrap_or_default())
        } else {
            text
        };
        out.write_all(s.as_bytes())
            .map_err(|e| CliError::Io(e.to_string()))
    };
    match cli.command {
        Command::User(cmd) => match cmd {
            UserCmd::Create { chip_id, fields } => {
                let name = fields
                    .name
                    .ok_or_else(|| CliError::Usage("user create needs --name".into()))?;
                let u = client
                    .create_user(pb::CreateUserRequest {
                        chip_id,
                        name,
                        address: fields.contact.address.unwrap_or_default(),
                        contact: Some(pb::Contact {
                            email: fields.contact.email.unwrap_or_default(),
                            phone: fields.contact.phone.unwrap_or_default(),
                        }),
                    })
                    .await
                    .map_err(&err)?
                    .into_inner();
                emit(out, user_json(&u), format!("created user {}\n", u.chip_id))
            }
            UserCmd::Show { chip_id } => {
                let u = client
                    .get_user(pb::GetUserRequest { chip_id })
                    .await
                    .map_err(&err)?
                    .into_inner();
                emit(out, user_json(&u), user_text(&u))
            }
            UserCmd::List {
                query,
                status,
                locked,
                sort,
                page_size,
                page_token,
            } => {
                let r = client
                    .list_users(pb::ListUsersRequest {
                        query,
                        page_size,
                        page_token,
                        sort,
                        status,
                        locked,
                    })
                    .await
                    .map_err(&err)?
                    .into_inner();
                let mut text: String = r
                    .users
                    .iter()
                    .map(|u| {
                        format!(
                            "{:<24} {:<9} {}{}\n",
                            u.chip_id,
                            u.status,
                            u.name,
                            if u.locked { "  [locked]" } else { "" }
                        )
                    })
                    .collect();
                text.push_str(&format!("({} in all)\n", r.total));
                if !r.next_page_token.is_empty() {
                    text.push_str(&format!("(more: --page-token='{}')\n", r.next_page_token));
                }
                let v = json!({"users": r.users.iter().map(user_json).collect::<Vec<_>>(),
                    "next_page_token": r.next_page_token, "total": r.total});
                emit(out, v, text)
            }
            UserCmd::Edit {
                chip_id,
                fields,
                status,
            } => {
                let u = client
                    .update_user(pb::UpdateUserRequest {
                        chip_id,
                        name: fields.name,
                        address: fields.contact.address,
                        email: fields.contact.email,
                        phone: fields.contact.phone,
                        status,
                    })
                    .await
                    .map_err(&err)?
                    .into_inner();
                emit(out, user_json(&u), user_text(&u))
            }
            UserCmd::Dump { chip_id, output } => {
                let d = client
                    .dump_user(pb::DumpUserRequest {
                        chip_id: chip_id.clone(),
                    })
                    .await
                    .map_err(&err)?
                    .into_inner();
                match output {
                    Some(path) => {
                        chipsite_tls::write_private(&path, format!("{}\n", d.json).as_bytes())
                            .map_err(|e| CliError::Io(format!("{}: {e}", path.display())))?;
                        emit(
                            out,
                            json!({"chip_id": chip_id, "file": path}),
                            format!("wrote {chip_id} to {}\n", path.display()),
                        )
                    }
                    None => out
                        .write_all(format!("{}\n", d.json).as_bytes())
                        .map_err(|e| CliError::Io(e.to_string())),
                }
            }
            UserCmd::Load { file } => {
                let text = if file.as_os_str() == "-" {
                    let mut s = String::new();
                    std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                        .map_err(|e| CliError::Io(e.to_string()))?;
                    s
                } else {
                    std::fs::read_to_string(&file)
                        .map_err(|e| CliError::Io(format!("{}: {e}", file.display())))?
                };
                let u = client
                    .load_user(pb::LoadUserRequest { json: text })
                    .await
                    .map_err(&err)?
                    .into_inner();
                emit(out, user_json(&u), format!("loaded user {}\n", u.chip_id))
            }
            UserCmd::Lock { chip_id } | UserCmd::Unlock { chip_id } if chip_id.is_empty() => {
                Err(CliError::Usage("a CHIP ID is required".into()))
            }
            UserCmd::Lock { chip_id } => {
                let l = set_lockdown(&mut client, chip_id, true).await.map_err(&err)?;
                emit(out, lockdown_json(&l), lockdown_text(&l))
            }
            UserCmd::Unlock { chip_id } => {
                let l = set_lockdown(&mut client, chip_id, false).await.map_err(&err)?;
                emit(out, lockdown_json(&l), lockdown_text(&l))
            }
        },
        Command::Ticket(cmd) => match cmd {
            TicketCmd::Issue {
                chip_id,
                ttl,
                qr,
                svg,
            } => {
                let t = client
                    .issue_user_ticket(pb::IssueUserTicketRequest {
                        chip_id,
                        ttl_seconds: ttl,
                    })
                    .await
                    .map_err(&err)?
                    .into_inner();
                if let Some(path) = &svg {
                    let s = chipsite_model::ticket::qr_svg(&t.uri)
                        .ok_or_else(|| CliError::Io("ticket too large for a QR code".into()))?;
                    // The QR code carries the token: owner-only, like any secret.
                    chipsite_tls::write_private(path, s.as_bytes())
                        .map_err(|e| CliError::Io(format!("{}: {e}", path.display())))?;
                }
                let mut text = format!(
                    "ticket {} for {} (expires {})\n\nURI:\n{}\n\nJSON:\n{}\n\nsite key pin: {}\n",
                    t.ticket_id,
                    t.chip_id,
                    ms(t.expires_at_ms),
                    t.uri,
                    t.json,
                    t.site_key_pin
                );
                if qr {
                    let code = chipsite_model::ticket::qr_terminal(&t.uri).unwrap_or_default();
                    text.push_str(&format!("\n{code}\n"));
                }
                if let Some(p) = &svg {
                    text.push_str(&format!("QR code written to {}\n", p.display()));
                }
                let ticket: Value = serde_json::from_str(&t.json).unwrap_or(Value::Null);
                let v = json!({"ticket_id": t.ticket_id, "chip_id": t.chip_id, "expires_at_ms": t.expires_at_ms,
                               "uri": t.uri, "site_key_pin": t.site_key_pin, "ticket": ticket});
                emit(out, v, text)
            }
            TicketCmd::List { user, all } => {
                let r = client
                    .list_tickets(pb::ListTicketsRequest {
                        chip_id: user,
                        include_closed: all,
                    })
                    .await
                    .map_err(&err)?
                    .into_inner();
                let text = if r.tickets.is_empty() {
                    "no tickets\n".to_owned()
                } else {
                    r.tickets
                        .iter()
                        .map(|t| {
                            format!(
                                "{:<26} {:<6} {:<20} {:<12} expires {}\n",
                                t.id,
                                t.kind,
                                t.chip_id,
                                t.state,
                                ms(t.expires_at_ms)
                            )
                        })
                        .collect()
                };
                emit(
                    out,
                    json!({"tickets": r.tickets.iter().map(ticket_json).collect::<Vec<_>>()}),
                    text,
                )
            }
            TicketCmd::Revoke { id } => {
                let r = client
                    .revoke_ticket(pb::RevokeTicketRequest { id })
                    .await
                    .map_err(&err)?
                    .into_inner();
                let t = r.ticket.unwrap_or_default();
                emit(out, ticket_json(&t), format!("revoked {}\n", t.id))
            }
        },
        Command::Key(cmd) => {
            let v = match cmd {
                KeyCmd::Export { output, passphrase } => {
                    let p = secrets.passphrase(&passphrase)?;
                    let pem = client
                        .export_site_key(pb::ExportSiteKeyRequest { passphrase: p })
                        .await
                        .map_err(&err)?
                        .into_inner()
                        .encrypted_pem;
                    return match output {
                        Some(path) => {
                            chipsite_tls::write_private(&path, pem.as_bytes())
                                .map_err(|e| CliError::Io(format!("{}: {e}", path.display())))?;
                            emit(
                                out,
                                json!({"file": path}),
                                format!("wrote the encrypted site key to {}\n", path.display()),
                            )
                        }
                        None => out
                            .write_all(pem.as_bytes())
                            .map_err(|e| CliError::Io(e.to_string())),
                    };
                }
                KeyCmd::Import {
                    file,
                    passphrase,
                    new_passphrase_file,
                } => {
                    let pem = std::fs::read_to_string(&file)
                        .map_err(|e| CliError::Io(format!("{}: {e}", file.display())))?;
                    let current = secrets.passphrase(&passphrase)?;
                    let p = secrets.read(&new_passphrase_file, "CHIPSCTL_NEW_PASSPHRASE")?;
                    client
                        .import_site_key(pb::ImportSiteKeyRequest {
                            encrypted_pem: pem,
                            passphrase: p,
                            current_passphrase: current,
                        })
                        .await
                }
                KeyCmd::Status => client.get_vault_status(pb::GetVaultStatusRequest {}).await,
                KeyCmd::Unseal { passphrase } => {
                    let p = secrets.passphrase(&passphrase)?;
                    client
                        .unseal_vault(pb::UnsealVaultRequest { passphrase: p })
                        .await
                }
                KeyCmd::Seal => client.seal_vault(pb::SealVaultRequest {}).await,
                KeyCmd::Create {
                    passphrase,
                    new_passphrase_file,
                } => {
                    let current = secrets.passphrase(&passphrase)?;
                    let p = secrets.read(&new_passphrase_file, "CHIPSCTL_NEW_PASSPHRASE")?;
                    client
                        .create_site_key(pb::CreateSiteKeyRequest {
                            passphrase: p,
                            current_passphrase: current,
                        })
                        .await
                }
                KeyCmd::Passphrase {
                    passphrase,
                    new_passphrase_file,
                } => {
                    let old = secrets.passphrase(&passphrase)?;
                    let new = secrets.read(&new_passphrase_file, "CHIPSCTL_NEW_PASSPHRASE")?;
                    client
                        .change_passphrase(pb::ChangePassphraseRequest {
                            old_passphrase: old,
                            new_passphrase: new,
                        })
                        .await
                }
            }
            .map_err(&err)?
            .into_inner();
            emit(out, vault_json(&v), vault_text(&v))
        }
        Command::Tally(TallyCmd::List { chip_id, limit }) => {
            let tallies = client
                .list_tallies(chipsite_proto::tally::v1::ListTalliesRequest {
                    chip_id: chip_id.clone(),
                    limit,
                })
                .await
                .map_err(&err)?
                .into_inner()
                .tallies;
            emit(out, tallies_json(&tallies), tallies_text(&chip_id, &tallies))
        }
        Command::Peer(cmd) => {
            let p = match cmd {
                PeerCmd::List => {
                    let peers = client
                        .list_peers(chipsite_proto::peer::v1::ListPeersRequest {})
                        .await
                        .map_err(&err)?
                        .into_inner()
                        .sites;
                    return emit(out, peers_json(&peers), peers_text(&peers));
                }
                PeerCmd::Status => client.get_peer_server(pb::GetPeerServerRequest {}).await,
                PeerCmd::Start { passphrase } => {
                    let p = secrets.passphrase(&passphrase)?;
                    client
                        .start_peer_server(pb::StartPeerServerRequest { passphrase: p })
                        .await
                }
                PeerCmd::Stop => client.stop_peer_server(pb::StopPeerServerRequest {}).await,
            }
            .map_err(&err)?
            .into_inner();
            emit(
                out,
                peer_json(&p),
                format!("peer server {} (since {})\n", p.desired, ms(p.changed_at_ms)),
            )
        }
        Command::Site(cmd) => {
            let l = match cmd {
                SiteCmd::Status => client
                    .get_lockdown(pb::GetLockdownRequest {
                        chip_id: String::new(),
                    })
                    .await
                    .map(tonic::Response::into_inner),
                SiteCmd::Lock => set_lockdown(&mut client, String::new(), true).await,
                SiteCmd::Unlock => set_lockdown(&mut client, String::new(), false).await,
            }
            .map_err(&err)?;
            emit(out, lockdown_json(&l), lockdown_text(&l))
        }
        Command::Config(cmd) => {
            let c = match cmd {
                ConfigCmd::Show => client.get_site_config(pb::GetSiteConfigRequest {}).await,
                ConfigCmd::Set { pairs } => {
                    let mut set = HashMap::new();
                    for p in pairs {
                        let (k, v) = p
                            .split_once('=')
                            .ok_or_else(|| CliError::Usage(format!("{p:?} is not key=value")))?;
                        set.insert(k.trim().to_owned(), v.trim().to_owned());
                    }
                    client
                        .update_site_config(pb::UpdateSiteConfigRequest { set, reset: vec![] })
                        .await
                }
                ConfigCmd::Reset { keys } => {
                    client
                        .update_site_config(pb::UpdateSiteConfigRequest {
                            set: HashMap::new(),
                            reset: keys,
                        })
                        .await
                }
            }
            .map_err(&err)?
            .into_inner();
            emit(out, config_json(&c), config_text(&c))
        }
        Command::Console(ConsoleCmd::Link { ttl }) => {
            let t = client
                .issue_console_ticket(pb::IssueConsoleTicketRequest { ttl_seconds: ttl })
                .await
                .map_err(&err)?
                .into_inner();
            emit(
                out,
                json!({"url": t.url, "ticket_id": t.ticket_id, "expires_at_ms": t.expires_at_ms}),
                format!("{}\n(one sign-in, until {})\n", t.url, ms(t.expires_at_ms)),
            )
        }
        Command::Alarm(AlarmCmd::Raise { chip_id, text, kind }) => {
            let r = events
                .raise_alarms(ev::RaiseAlarmsRequest {
                    alarms: vec![ev::NewAlarm { chip_id, kind, text }],
                })
                .await
                .map_err(&err)?
                .into_inner();
            let a = r.alarms.first().cloned().unwrap_or_default();
            emit(
                out,
                alarm_json(&a),
                format!("raised alarm {} for {}\n", a.id, a.chip_id),
            )
        }
        Command::Alarm(AlarmCmd::List { chip_id, all }) => {
            let r = events
                .list_alarms(ev::ListAlarmsRequest {
                    chip_id,
                    include_acked: all,
                    limit: 100,
                    ..Default::default()
                })
                .await
                .map_err(&err)?
                .into_inner();
            let v = json!({"alarms": r.alarms.iter().map(alarm_json).collect::<Vec<_>>()});
            emit(out, v, r.alarms.iter().map(alarm_text).collect())
        }
        Command::Audit {
            limit,
            source,
            contains,
            page_token,
        } => {
            let r = client
                .list_audit(pb::ListAuditRequest {
                    limit,
                    source,
                    contains,
                    page_token,
                })
                .await
                .map_err(&err)?
                .into_inner();
            let mut text: String = r
                .entries
                .iter()
                .map(|e| {
                    format!(
                        "{}  {:<6} {:<14} {:<20} {:<20} {}\n",
                        ms(e.at_ms),
                        e.source,
                        e.actor,
                        e.action,
                        e.subject,
                        // Words for people; --json keeps the code.
                        chipsite_model::audit::outcome_words(&e.outcome)
                    )
                })
                .collect();
            if !r.next_page_token.is_empty() {
                text.push_str(&format!("(older: --page-token={})\n", r.next_page_token));
            }
            let v = json!({"entries": r.entries.iter().map(|e| json!({"at_ms": e.at_ms, "source": e.source, "actor": e.actor,
                "action": e.action, "subject": e.subject, "outcome": e.outcome, "id": e.id})).collect::<Vec<_>>(),
                "next_page_token": r.next_page_token});
            emit(out, v, text)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn command_line_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }

    #[test]
    fn dates_render_in_utc() {
        assert_eq!(super::ms(0), "-");
        assert_eq!(super::ms(1_000), "1970-01-01 00:00:01Z");
        assert_eq!(super::ms(1_764_028_800_000), "2025-11-25 00:00:00Z");
    }
}
