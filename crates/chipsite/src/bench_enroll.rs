//! `chipsite bench-enroll`: the enrollment cycle (issue 15) against a
//! `chipsite dev` child process, on SQLite and on PostgreSQL, beside its
//! floor measured in the same run.
//!
//! One cycle: an operator creates a user and issues a user ticket (two
//! AdminService calls over mutual TLS), the app redeems it (enrollment),
//! opens its first session, asks for `status`, and closes. Printed per
//! concurrency: cycles per second, p50/p99 per step, server CPU per cycle
//! (the site's process and, on PostgreSQL, every `postgres` process, read
//! from `/proc`), and the internal calls per cycle (the site's own gRPC
//! counters, the operator's two calls left out); then redemption alone, and
//! one app that leaves Nagle's algorithm on.
//!
//! The floor, per concurrency: two bare TLS 1.3 handshakes with the same
//! key types (the gateway's TLS configuration in front of a line echo) and,
//! on PostgreSQL, `pgbench` running a script of the cycle's statements (a
//! one-row insert for each row the cycle writes, a lookup by key for each of
//! its other transactions; both counted in `pg_stat_database` during the
//! run). Floor cycles per
//! second = 1 / (2 / handshakes per second + 1 / scripts per second).

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::Path,
    process::{Child, Command},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use chipsite_app::{AppKey, Dial, Session};
use chipsite_model::PublishedTicket;
use chipsite_proto::{
    admin::v1::{self as ad, admin_service_client::AdminServiceClient},
    keyvault::v1::{self as kv, key_vault_client::KeyVaultClient},
};
use chipsite_site::Endpoints;
use chipsite_tls::{ReloadableTls, identity};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::bench::{BenchDatabase, ms, percentile};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    postgres: crate::bench::Postgres,
    /// Concurrent apps, one measurement each.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,16")]
    concurrency: Vec<usize>,
    /// Seconds each cycle measurement runs.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Redemptions timed per concurrency (tickets issued beforehand).
    #[arg(long, default_value_t = 400)]
    redemptions: usize,
    /// Stores: `sqlite`, `postgres` or `both`.
    #[arg(long, default_value = "both")]
    store: String,
    /// Skip the floor (bare handshakes, pgbench).
    #[arg(long)]
    no_floor: bool,
    /// Run the site with this `chipsite` binary (default: this one), to
    /// compare two builds with the same client. The site's process inherits
    /// this environment (`CHIPSITE_INTERNAL_TCP=true`, for one).
    #[arg(long)]
    site_exe: Option<std::path::PathBuf>,
}

/// Linux's `USER_HZ`: the unit of `/proc/<pid>/stat`'s CPU times.
const TICKS_PER_SECOND: f64 = 100.0;

/// The steps of a cycle, as printed.
const STEPS: [&str; 4] = ["issue", "redeem", "session", "status"];

pub async fn run(args: Args) -> anyhow::Result<()> {
    chipsite_tls::install_crypto_provider();
    if args.concurrency.is_empty() || args.concurrency.contains(&0) {
        bail!("--concurrency: one or more counts above 0");
    }
    let (sqlite, postgres) = match args.store.as_str() {
        "sqlite" => (true, false),
        "postgres" => (false, true),
        "both" => (true, true),
        other => bail!("--store {other:?}: sqlite, postgres or both"),
    };
    println!(
        "chipsite bench-enroll: create + ticket, redeem, first session, status, close; {} s per measurement",
        args.seconds
    );
    if sqlite {
        let dir = tempfile::tempdir()?;
        measure(&args, dir.path(), None).await?;
    }
    if postgres {
        let db = BenchDatabase::create(&args.postgres.postgres_url).await?;
        let dir = tempfile::tempdir()?;
        let result = measure(&args, dir.path(), Some(&db)).await;
        db.drop().await;
        result?;
    }
    Ok(())
}

/// A `chipsite dev` child and what the bench's clients need of it.
struct Site {
    child: Child,
    admin: AdminServiceClient<tonic::transport::Channel>,
    ops: String,
    site_key: Vec<u8>,
    key: AppKey,
    next: Arc<AtomicU64>,
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Site {
    async fn start(exe: &Path, dir: &Path, database_url: &str) -> anyhow::Result<Self> {
        let child = crate::bench_gateway::start_site_with(exe, dir, database_url)?;
        let endpoints = Endpoints::read(&dir.join("site"))?;
        let tls = |id: &str| ReloadableTls::from_files(endpoints.cert_paths(id));
        let admin = AdminServiceClient::new(chipsite_tls::connect_tls_lazy(
            &endpoints.admin,
            identity::ADMIN,
            tls(identity::ADMIN_CLIENT)?,
        )?);
        let mut vault = KeyVaultClient::new(chipsite_tls::connect_tls_lazy(
            &endpoints.key_vault,
            identity::KEY_VAULT,
            tls(identity::USER_GATEWAY)?,
        )?);
        let site_key = vault
            .get_status(kv::GetStatusRequest {})
            .await?
            .into_inner()
            .site_public_key;
        // What the baseline server (bench-gateway's) reads.
        let key = crate::bench_gateway::write_work(dir, &site_key)?;
        Ok(Self {
            child,
            admin,
            ops: endpoints.ops.trim_start_matches("http://").to_owned(),
            site_key,
            key,
            next: Arc::new(AtomicU64::new(0)),
        })
    }

    fn new_chip_id(&self) -> String {
        format!("be{:07}", self.next.fetch_add(1, Ordering::Relaxed))
    }

    /// A new user and a user ticket for it (the operator's two calls).
    async fn ticket(&self) -> anyhow::Result<(String, PublishedTicket)> {
        let chip_id = self.new_chip_id();
        let mut admin = self.admin.clone();
        admin
            .create_user(ad::CreateUserRequest {
                chip_id: chip_id.clone(),
                name: "Bench user".into(),
                ..Default::default()
            })
            .await?;
        let issued = admin
            .issue_user_ticket(ad::IssueUserTicketRequest {
                chip_id: chip_id.clone(),
                ttl_seconds: 0,
            })
            .await?
            .into_inner();
        Ok((chip_id, PublishedTicket::from_json(&issued.json)?))
    }

    /// One whole cycle; the time of each step.
    async fn cycle(&self, dial: Dial) -> anyhow::Result<[Duration; 4]> {
        let t0 = Instant::now();
        let (chip_id, ticket) = self.ticket().await?;
        let t1 = Instant::now();
        chipsite_app::enroll_with(&ticket, &chip_id, &self.key, dial).await?;
        let t2 = Instant::now();
        let session = Session::connect_with(
            &ticket.host,
            ticket.port,
            &self.site_key,
            &chip_id,
            &self.key,
            dial,
        )
        .await?;
        let t3 = Instant::now();
        session.call("status", json!({})).await?;
        let t4 = Instant::now();
        session.close().await;
        Ok([t1 - t0, t2 - t1, t3 - t2, t4 - t3])
    }

    /// CPU ticks of the site's process and, with PostgreSQL under it, of
    /// every `postgres` process.
    fn cpu_ticks(&self, postgres: bool) -> u64 {
        let mut pids = vec![self.child.id()];
        if postgres {
            pids.extend(postgres_pids());
        }
        pids.into_iter().filter_map(ticks_of).sum()
    }

    /// The site's gRPC calls served so far, by method.
    async fn rpc_counts(&self) -> anyhow::Result<HashMap<String, f64>> {
        let mut tcp = tokio::net::TcpStream::connect(&self.ops).await?;
        tcp.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await?;
        let mut text = String::new();
        tcp.read_to_string(&mut text).await?;
        let mut counts = HashMap::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("chipsite_grpc_server_requests_total{") else {
                continue;
            };
            let method = rest
                .split("method=\"")
                .nth(1)
                .and_then(|m| m.split('"').next())
                .unwrap_or("?")
                .to_owned();
            let value: f64 = rest
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            *counts.entry(method).or_insert(0.0) += value;
        }
        Ok(counts)
    }
}

fn ticks_of(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name (which may hold spaces) in parentheses:
    // state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

fn postgres_pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "postgres")
        })
        .collect()
}

/// Transactions committed and rows written in `db` so far.
async fn pg_counters(db: &BenchDatabase) -> anyhow::Result<(i64, i64)> {
    use sea_orm::{ConnectionTrait, Statement};
    let conn = chipsite_store::connect(&db.url).await?;
    let row = conn
        .query_one_raw(Statement::from_string(
            conn.get_database_backend(),
            "SELECT xact_commit, tup_inserted + tup_updated + tup_deleted AS written \
             FROM pg_stat_database WHERE datname = current_database()",
        ))
        .await?
        .context("pg_stat_database")?;
    Ok((row.try_get("", "xact_commit")?, row.try_get("", "written")?))
}

/// What one measurement found.
struct Run {
    per_second: f64,
    cpu_ms: f64,
    /// Of it, the site's own process.
    site_cpu_ms: f64,
    calls: f64,
    by_method: Vec<(String, f64)>,
    latencies: [Vec<Duration>; 4],
    failed: u64,
    pg: Option<(f64, f64)>,
}

async fn cycles(
    site: &Arc<Site>,
    apps: usize,
    seconds: u64,
    dial: Dial,
    db: Option<&BenchDatabase>,
) -> anyhow::Result<Run> {
    let stop = Arc::new(AtomicBool::new(false));
    let latencies: Arc<Mutex<[Vec<Duration>; 4]>> = Arc::default();
    let failed = Arc::new(AtomicU64::new(0));
    let (calls_before, cpu_before) = (site.rpc_counts().await?, site.cpu_ticks(db.is_some()));
    let own_before = site.cpu_ticks(false);
    let pg_before = match db {
        Some(db) => Some(pg_counters(db).await?),
        None => None,
    };
    let start = Instant::now();
    let tasks: Vec<_> = (0..apps)
        .map(|_| {
            let (site, stop, latencies, failed) =
                (site.clone(), stop.clone(), latencies.clone(), failed.clone());
            tokio::spawn(async move {
                let mut done = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    match site.cycle(dial).await {
                        Ok(steps) => {
                            done += 1;
                            if let Ok(mut l) = latencies.lock() {
                                for (all, d) in l.iter_mut().zip(steps) {
                                    all.push(d);
                                }
                            }
                        }
                        Err(e) => {
                            if failed.fetch_add(1, Ordering::Relaxed) == 0 {
                                eprintln!("  a cycle failed: {e:#}");
                            }
                        }
                    }
                }
                done
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut done = 0;
    for t in tasks {
        done += t.await.unwrap_or(0);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = site.cpu_ticks(db.is_some()).saturating_sub(cpu_before);
    let own = site.cpu_ticks(false).saturating_sub(own_before);
    let calls_after = site.rpc_counts().await?;
    let pg = match (db, pg_before) {
        (Some(db), Some((commits, rows))) => {
            // The statistics reach pg_stat_database within a second.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let (c, r) = pg_counters(db).await?;
            Some(((c - commits) as f64, (r - rows) as f64))
        }
        _ => None,
    };
    let per_cycle = |n: f64| if done == 0 { 0.0 } else { n / done as f64 };
    let mut by_method: Vec<(String, f64)> = calls_after
        .iter()
        .map(|(m, n)| {
            (
                m.clone(),
                per_cycle(n - calls_before.get(m).copied().unwrap_or(0.0)),
            )
        })
        .filter(|(_, n)| *n > 0.0)
        .collect();
    by_method.sort_by(|a, b| b.1.total_cmp(&a.1));
    // The operator's CreateUser and IssueUserTicket are the bench's, not the site's.
    let calls = by_method.iter().map(|(_, n)| n).sum::<f64>() - 2.0;
    let mut latencies = std::mem::take(&mut *latencies.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    for l in &mut latencies {
        l.sort();
    }
    Ok(Run {
        per_second: done as f64 / elapsed,
        cpu_ms: per_cycle(cpu as f64 * 1000.0 / TICKS_PER_SECOND),
        site_cpu_ms: per_cycle(own as f64 * 1000.0 / TICKS_PER_SECOND),
        calls,
        by_method,
        latencies,
        failed: failed.load(Ordering::Relaxed),
        pg: pg.map(|(c, r)| (per_cycle(c), per_cycle(r))),
    })
}

/// Redemptions of `count` tickets issued beforehand, by `apps` apps: per
/// second, and server CPU per redemption.
async fn redemptions(
    site: &Arc<Site>,
    apps: usize,
    count: usize,
    dial: Dial,
    postgres: bool,
) -> anyhow::Result<(f64, f64)> {
    let mut tickets = Vec::with_capacity(count);
    for _ in 0..count {
        tickets.push(site.ticket().await?);
    }
    let queue = Arc::new(Mutex::new(tickets));
    let cpu_before = site.cpu_ticks(postgres);
    let start = Instant::now();
    let tasks: Vec<_> = (0..apps)
        .map(|_| {
            let (site, queue) = (site.clone(), queue.clone());
            tokio::spawn(async move {
                let mut failed = 0u64;
                loop {
                    let next = queue.lock().ok().and_then(|mut q| q.pop());
                    let Some((chip_id, ticket)) = next else { break };
                    if chipsite_app::enroll_with(&ticket, &chip_id, &site.key, dial)
                        .await
                        .is_err()
                    {
                        failed += 1;
                    }
                }
                failed
            })
        })
        .collect();
    let mut failed = 0;
    for t in tasks {
        failed += t.await.unwrap_or(0);
    }
    let elapsed = start.elapsed().as_secs_f64();
    if failed > 0 {
        println!("  ({failed} redemptions failed)");
    }
    let cpu = site.cpu_ticks(postgres).saturating_sub(cpu_before) as f64 * 1000.0 / TICKS_PER_SECOND;
    Ok((count as f64 / elapsed, cpu / count.max(1) as f64))
}

/// Bare handshakes per second at `apps` clients: the gateway's TLS
/// configuration in front of a line echo, app certificates of the same key type.
async fn handshakes(dir: &Path, base: SocketAddr, apps: usize, seconds: u64) -> anyhow::Result<f64> {
    let work = crate::bench_gateway::Work::load(dir)?;
    let configs = (0..apps)
        .map(|i| work.client_config(&format!("floor{i}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    crate::bench_gateway::setup_rate(
        base,
        rustls::pki_types::ServerName::try_from("127.0.0.1")?,
        configs,
        b"ping\n",
        seconds,
    )
    .await
}

/// `pgbench` running the cycle's statements as one script, at `apps`
/// clients: scripts per second. The cycle commits `commits` transactions,
/// each one statement, writing `rows` rows in all: the script writes one
/// row in each of `rows` transactions (at most `commits`) and reads one row
/// by its key in each of the others, as the cycle's lookups do.
fn pgbench_cycles(
    db: &BenchDatabase,
    commits: f64,
    rows: f64,
    apps: usize,
    seconds: u64,
    dir: &Path,
) -> anyhow::Result<f64> {
    let commits = commits.round().max(1.0) as usize;
    let writes = (rows.round() as usize).clamp(1, commits);
    let setup = Command::new("psql")
        .args([
            &db.url,
            "-qc",
            "CREATE TABLE IF NOT EXISTS bench_floor (id bigserial PRIMARY KEY, v bigint, pad text)",
        ])
        .output()
        .context("running psql")?;
    if !setup.status.success() {
        bail!("psql: {}", String::from_utf8_lossy(&setup.stderr));
    }
    let mut script = String::from("\\set v random(1, 1000000000)\n\\set id random(1, 10000)\n");
    for _ in 0..writes {
        script.push_str("INSERT INTO bench_floor (v, pad) VALUES (:v, repeat('x', 100));\n");
    }
    for _ in writes..commits {
        script.push_str("SELECT v, pad FROM bench_floor WHERE id = :id;\n");
    }
    let file = dir.join("floor.sql");
    std::fs::write(&file, script)?;
    let out = Command::new("pgbench")
        .args([
            "-n",
            "-c",
            &apps.to_string(),
            "-j",
            "2",
            "-T",
            &seconds.to_string(),
            "-f",
        ])
        .arg(&file)
        .arg(&db.url)
        .output()
        .context("running pgbench (is it installed?)")?;
    if !out.status.success() {
        bail!("pgbench failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    crate::bench::tps_of(&out.stdout)
}

async fn measure(args: &Args, dir: &Path, db: Option<&BenchDatabase>) -> anyhow::Result<()> {
    let store = if db.is_some() { "PostgreSQL" } else { "SQLite" };
    let exe = match &args.site_exe {
        Some(exe) => exe.clone(),
        None => std::env::current_exe()?,
    };
    let site = Arc::new(Site::start(&exe, dir, db.map(|d| d.url.as_str()).unwrap_or("")).await?);
    let (mut baseline, base) = if args.no_floor {
        (None, None)
    } else {
        let (child, addr) = crate::bench_gateway::start_baseline(dir).await?;
        (Some(child), Some(addr))
    };
    println!();
    println!(
        "{store}{}",
        if db.is_some() {
            " (CPU: the site's process and every postgres process)"
        } else {
            " (CPU: the site's process)"
        }
    );
    // A warm-up cycle: connections, caches, statements.
    site.cycle(Dial::default()).await.context("the first cycle")?;
    let result = async {
        for &apps in &args.concurrency {
            let run = cycles(&site, apps, args.seconds, Dial::default(), db).await?;
            let (redeemed, redeem_cpu) =
                redemptions(&site, apps, args.redemptions, Dial::default(), db.is_some()).await?;
            println!(
                "  c={apps:<2}  {:>6.1} cycles/s  CPU {:.2} ms/cycle (site {:.2})  internal calls {:.1}/cycle{}   redemption alone {:>6.1}/s, CPU {:.2} ms",
                run.per_second,
                run.cpu_ms,
                run.site_cpu_ms,
                run.calls,
                if run.failed > 0 {
                    format!("  ({} failed)", run.failed)
                } else {
                    String::new()
                },
                redeemed,
                redeem_cpu,
            );
            let steps: Vec<String> = STEPS
                .iter()
                .zip(&run.latencies)
                .map(|(name, l)| format!("{name} {}/{}", ms(percentile(l, 0.5)), ms(percentile(l, 0.99))))
                .collect();
            println!("        p50/p99: {}", steps.join(", "));
            if apps == args.concurrency[0] {
                let calls: Vec<String> = run
                    .by_method
                    .iter()
                    .map(|(m, n)| format!("{} {n:.1}", m.rsplit('/').next().unwrap_or(m)))
                    .collect();
                println!("        calls per cycle (the operator's included): {}", calls.join(", "));
            }
            if let Some(base) = base {
                let hs = handshakes(dir, base, apps, args.seconds.min(3)).await?;
                let writes = match (db, run.pg) {
                    (Some(db), Some((commits, rows))) => {
                        let tps = pgbench_cycles(db, commits, rows, apps, args.seconds.min(3), dir)?;
                        println!(
                            "        floor: {hs:.0} bare handshakes/s; pgbench with the cycle's {commits:.1} one-statement transactions, {rows:.1} of them writing a row: {tps:.0} cycles/s"
                        );
                        Some(tps)
                    }
                    _ => {
                        println!("        floor: {hs:.0} bare handshakes/s");
                        None
                    }
                };
                let floor = 1.0 / (2.0 / hs + writes.map(|w| 1.0 / w).unwrap_or(0.0));
                println!(
                    "        floor {floor:.0} cycles/s; chipsite at {:.2} of it",
                    run.per_second / floor
                );
            }
        }
        // One app with Nagle's algorithm on (many platforms' default).
        let nagle = Dial {
            nagle: true,
            ..Dial::default()
        };
        let run = cycles(&site, 1, args.seconds, nagle, db).await?;
        let (redeemed, _) = redemptions(&site, 1, args.redemptions / 4, nagle, db.is_some()).await?;
        println!(
            "  Nagle on, c=1: {:.1} cycles/s, redemption alone {redeemed:.1}/s; p50: {}",
            run.per_second,
            STEPS
                .iter()
                .zip(&run.latencies)
                .map(|(name, l)| format!("{name} {}", ms(percentile(l, 0.5))))
                .collect::<Vec<_>>()
                .join(", ")
        );
        anyhow::Ok(())
    }
    .await;
    if let Some(b) = baseline.as_mut() {
        let _ = b.kill();
        let _ = b.wait();
    }
    result
}
