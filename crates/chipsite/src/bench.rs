//! `chipsite bench`: ticket issue + redeem through the internal gRPC API
//! (mutual TLS, the `bench` identity) against PostgreSQL at N concurrent
//! callers, printed beside `pgbench -N` on the same database and
//! concurrency, measured in the same run.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use chipsite_proto::ticket::v1::{
    IssueTicketRequest, RedeemTicketRequest, TicketKind, tickets_client::TicketsClient,
};
use chipsite_site::{Config, Site, config::Addresses};
use chipsite_tls::{ReloadableTls, identity};

/// A benchmark against PostgreSQL at N concurrent callers, beside
/// `pgbench -N` at the same concurrency (`bench` and `bench-tally`).
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub(crate) postgres: Postgres,
    /// Concurrent callers (and pgbench clients).
    #[arg(long, default_value_t = 16)]
    pub(crate) concurrency: usize,
    /// Seconds each measurement runs.
    #[arg(long, default_value_t = 10)]
    pub(crate) seconds: u64,
    /// Skip pgbench (then no baseline is printed).
    #[arg(long)]
    pub(crate) no_pgbench: bool,
}

/// Where the benchmarks make their PostgreSQL databases.
#[derive(clap::Args, Debug)]
pub struct Postgres {
    /// PostgreSQL maintenance database (fresh databases are created beside it and dropped after).
    #[arg(
        long,
        env = "CHIPSITE_BENCH_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub(crate) postgres_url: String,
}

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub(crate) fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    chipsite_tls::install_crypto_provider();
    let db = BenchDatabase::create(&args.postgres.postgres_url).await?;
    let result = measure(&args, &db.url).await;
    db.drop().await;
    result
}

/// A fresh PostgreSQL database beside `postgres_url`'s, dropped after.
pub(crate) struct BenchDatabase {
    admin: sea_orm::DatabaseConnection,
    name: String,
    pub(crate) url: String,
}

impl BenchDatabase {
    pub(crate) async fn create(postgres_url: &str) -> anyhow::Result<Self> {
        use sea_orm::ConnectionTrait;
        let admin = chipsite_store::connect(postgres_url)
            .await
            .context("connecting to PostgreSQL")?;
        let mut rnd = [0u8; 6];
        getrandom::fill(&mut rnd).map_err(|e| anyhow::anyhow!("random: {e}"))?;
        let name = format!(
            "chipsite_bench_{}",
            rnd.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await?;
        // The same server and options (`?sslmode=…`), another database.
        let (server, options) = match postgres_url.split_once('?') {
            Some((s, o)) => (s, format!("?{o}")),
            None => (postgres_url, String::new()),
        };
        let base = server.rsplit_once('/').map(|(b, _)| b).unwrap_or(server);
        let url = format!("{base}/{name}{options}");
        Ok(Self { admin, name, url })
    }

    pub(crate) async fn drop(self) {
        use sea_orm::ConnectionTrait;
        let _ = self
            .admin
            .execute_unprepared(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name))
            .await;
    }
}

async fn measure(args: &Args, db_url: &str) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = Config {
        data_dir: dir.path().to_path_buf(),
        database_url: db_url.to_owned(),
        addresses: Addresses::ephemeral(),
        ..Config::default()
    };
    let site = Site::start_dev(&config).await?;
    let tls = ReloadableTls::from_files(site.endpoints.cert_paths(identity::BENCH))?;
    let channel = chipsite_tls::connect_tls_lazy(&site.endpoints.ticket, identity::TICKET, tls)?;

    println!(
        "chipsite bench: ticket issue + redeem over internal mTLS gRPC, PostgreSQL, {} callers, {} s",
        args.concurrency, args.seconds
    );
    // Warm up: connections, prepared statements, the pool.
    run_load(&channel, args.concurrency, Duration::from_secs(1)).await?;
    let (pairs, issue, redeem, elapsed) =
        run_load(&channel, args.concurrency, Duration::from_secs(args.seconds)).await?;
    site.shutdown(Duration::from_secs(5)).await?;

    let rate = pairs as f64 / elapsed.as_secs_f64();
    println!();
    println!(
        "  chipsite  {rate:>10.0} redemptions/s   ({pairs} issue+redeem pairs in {:.1} s)",
        elapsed.as_secs_f64()
    );
    println!(
        "            redeem p50 {}  p99 {}",
        ms(percentile(&redeem, 0.50)),
        ms(percentile(&redeem, 0.99))
    );
    println!(
        "            issue  p50 {}  p99 {}",
        ms(percentile(&issue, 0.50)),
        ms(percentile(&issue, 0.99))
    );

    if args.no_pgbench {
        return Ok(());
    }
    let tps = pgbench(db_url, args.concurrency, args.seconds)?;
    println!(
        "  pgbench -N {tps:>9.0} tps             (same database, -c {} -j 2 -T {})",
        args.concurrency, args.seconds
    );
    let ratio = rate / tps;
    println!();
    println!(
        "  ratio {:.2} of pgbench's TPS (target ≥ 0.50): {}",
        ratio,
        if ratio >= 0.5 { "met" } else { "NOT met" }
    );
    Ok(())
}

type Load = (u64, Vec<Duration>, Vec<Duration>, Duration);

async fn run_load(
    channel: &tonic::transport::Channel,
    concurrency: usize,
    length: Duration,
) -> anyhow::Result<Load> {
    let start = Instant::now();
    let deadline = start + length;
    let mut workers = vec![];
    for w in 0..concurrency {
        let mut client = TicketsClient::new(channel.clone());
        workers.push(tokio::spawn(async move {
            let chip_id = format!("bench-{w}");
            let (mut issue, mut redeem) = (vec![], vec![]);
            while Instant::now() < deadline {
                let t0 = Instant::now();
                let issued = client
                    .issue_ticket(IssueTicketRequest {
                        kind: TicketKind::User as i32,
                        chip_id: chip_id.clone(),
                        ttl_seconds: 600,
                        host: "127.0.0.1".into(),
                        port: 44301,
                        issuer: String::new(),
                    })
                    .await?
                    .into_inner();
                let t1 = Instant::now();
                client
                    .redeem_ticket(RedeemTicketRequest {
                        kind: TicketKind::User as i32,
                        token: issued.token,
                        chip_id: chip_id.clone(),
                        source: format!("bench-{w}"),
                        refusal: String::new(),
                    })
                    .await?;
                let t2 = Instant::now();
                issue.push(t1 - t0);
                redeem.push(t2 - t1);
            }
            Ok::<_, tonic::Status>((issue, redeem))
        }));
    }
    let (mut issue, mut redeem) = (vec![], vec![]);
    for w in workers {
        let (i, r) = w.await??;
        issue.extend(i);
        redeem.extend(r);
    }
    let elapsed = start.elapsed();
    issue.sort_unstable();
    redeem.sort_unstable();
    Ok((redeem.len() as u64, issue, redeem, elapsed))
}

/// `pgbench -i` then `pgbench -N` on the same database; returns its TPS.
pub(crate) fn pgbench(db_url: &str, clients: usize, seconds: u64) -> anyhow::Result<f64> {
    let init = Command::new("pgbench")
        .args(["-i", "-q", "-s", "1", db_url])
        .output()
        .context("running pgbench (is it installed?)")?;
    if !init.status.success() {
        bail!("pgbench -i failed: {}", String::from_utf8_lossy(&init.stderr));
    }
    let out = Command::new("pgbench")
        .args([
            "-N",
            "-c",
            &clients.to_string(),
            "-j",
            "2",
            "-T",
            &seconds.to_string(),
            db_url,
        ])
        .output()?;
    if !out.status.success() {
        bail!("pgbench -N failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    tps_of(&out.stdout)
}

/// The `tps = …` figure of pgbench's output.
pub(crate) fn tps_of(stdout: &[u8]) -> anyhow::Result<f64> {
    let text = String::from_utf8_lossy(stdout);
    text.lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| {
            l.trim_start_matches("tps = ")
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .with_context(|| format!("no tps in pgbench output: {text}"))
}
