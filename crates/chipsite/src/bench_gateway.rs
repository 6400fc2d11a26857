//! `chipsite bench-gateway`: the user gateway under load, on this machine,
//! with its baseline measured in the same run.
//!
//! The site runs as a child process (`chipsite dev`, SQLite), so its memory
//! is its own; clients run in this process (and, for the idle-session
//! count, in two helper child processes, because each process may hold at
//! most `ulimit -n` sockets).
//!
//! 1. Mutual-TLS session setups per second (connect, TLS 1.3 handshake with
//!    a client certificate, one request line and its answer, close) against
//!    the gateway (`ping`, after admission), and against a bare
//!    tokio-rustls server with the same TLS configuration and key type that
//!    echoes one line: the baseline.
//! 2. `status` round trips over 1,000 open sessions at a fixed offered rate:
//!    p50/p99 and throughput.
//! 3. Idle subscribed sessions held by the gateway: its memory per session.
//! 4. One alarm to each of 10,000 connected users: time from the raise to
//!    the last delivery.

use std::{
    io::{BufRead, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::bench::{ms, percentile};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chipsite_app::{AppKey, PinnedSiteKey, Session};
use chipsite_proto::{
    admin::v1::{self as ad, admin_service_client::AdminServiceClient},
    events::v1::{self as ev, user_events_client::UserEventsClient},
    keyvault::v1::{self as kv, key_vault_client::KeyVaultClient},
};
use chipsite_site::Endpoints;
use chipsite_tls::InternalChannel as Channel;
use chipsite_tls::{ReloadableTls, identity};
use rustls::{ClientConfig, pki_types::ServerName};
use serde_json::json;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Seconds each throughput measurement runs.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent clients for the setup measurement.
    #[arg(long, default_value_t = 32)]
    setup_concurrency: usize,
    /// Open sessions for the `status` measurement.
    #[arg(long, default_value_t = 1000)]
    sessions: usize,
    /// Offered `status` requests per second, spread over the sessions.
    #[arg(long, default_value_t = 1000)]
    status_rate: u64,
    /// Idle subscribed sessions to hold (at most `ulimit -n` minus a few:
    /// the gateway holds one socket per session).
    #[arg(long, default_value_t = 19_900)]
    idle_sessions: usize,
    /// Users that each get one alarm.
    #[arg(long, default_value_t = 10_000)]
    alarm_users: usize,
    /// Internal: serve the baseline (bare tokio-rustls echo) for this site.
    #[arg(long, hide = true)]
    baseline_server: Option<PathBuf>,
    /// Internal: hold sessions for users FIRST..LAST (this many per user).
    #[arg(long, hide = true, num_args = 3)]
    hold: Option<Vec<usize>>,
    /// Internal: the bench's working directory.
    #[arg(long, hide = true)]
    work: Option<PathBuf>,
}

fn user(i: usize) -> String {
    format!("u{i:05}")
}

/// What every client needs: the gateway, the site key, the shared app key.
pub(crate) struct Work {
    endpoints: Endpoints,
    site_key: Vec<u8>,
    key: AppKey,
}

/// What [`Work::load`] (and the baseline server) read beside the site's
/// data: its key, and a new app key for every bench user, returned.
pub(crate) fn write_work(dir: &Path, site_key: &[u8]) -> anyhow::Result<AppKey> {
    std::fs::write(dir.join("site-key.b64"), URL_SAFE_NO_PAD.encode(site_key))?;
    let key = AppKey::generate()?;
    chipsite_tls::write_private(&dir.join("app.key"), key.to_pem().as_bytes())?;
    Ok(key)
}

impl Work {
    pub(crate) fn load(dir: &Path) -> anyhow::Result<Self> {
        let endpoints = Endpoints::read(&dir.join("site"))?;
        let site_key = URL_SAFE_NO_PAD.decode(std::fs::read_to_string(dir.join("site-key.b64"))?.trim())?;
        let key = AppKey::from_pem(&std::fs::read_to_string(dir.join("app.key"))?)?;
        Ok(Self {
            endpoints,
            site_key,
            key,
        })
    }

    fn gateway(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.endpoints.user_gateway.parse()?)
    }

    fn channel(&self, addr: &str, server: &str, as_identity: &str) -> anyhow::Result<Channel> {
        let tls = ReloadableTls::from_files(self.endpoints.cert_paths(as_identity))?;
        Ok(chipsite_tls::connect_lazy(addr, server, tls)?)
    }

    pub(crate) fn client_config(&self, chip_id: &str) -> anyhow::Result<Arc<ClientConfig>> {
        let (chain, key) = self.key.client_identity(chip_id)?;
        Ok(Arc::new(
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .dangerous()
                .with_custom_certificate_verifier(PinnedSiteKey::new(&self.site_key)?)
                .with_client_auth_cert(chain, key)?,
        ))
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    chipsite_tls::install_crypto_provider();
    if let Some(port_file) = &args.baseline_server {
        let work = Work::load(args.work.as_deref().context("--work")?)?;
        return baseline_server(&work, port_file).await;
    }
    if let Some(hold) = &args.hold {
        let work = Work::load(args.work.as_deref().context("--work")?)?;
        return hold_sessions(&work, hold[0], hold[1], hold[2]).await;
    }
    let dir = tempfile::tempdir()?;
    let mut site = start_site(dir.path(), "")?;
    let result = measure(&args, dir.path(), &site).await;
    let _ = site.kill();
    let _ = site.wait();
    result
}

/// `chipsite dev` in `dir/site` on `database_url` (empty: SQLite).
pub(crate) fn start_site(dir: &Path, database_url: &str) -> anyhow::Result<Child> {
    start_site_with(&std::env::current_exe()?, dir, database_url)
}

/// [`start_site`] with another `chipsite` binary (to compare two builds).
pub(crate) fn start_site_with(exe: &Path, dir: &Path, database_url: &str) -> anyhow::Result<Child> {
    let data = dir.join("site");
    let child = Command::new(exe)
        .arg("dev")
        .env("CHIPSITE_DATA_DIR", &data)
        .env("CHIPSITE_DATABASE_URL", database_url)
        .env("CHIPSITE_LOG", "warn")
        .envs(chipsite_site::config::Addresses::ephemeral_env())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the site")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !Endpoints::path(&data).exists() {
        if Instant::now() > deadline {
            bail!("the site did not start");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(child)
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmRSS")
}

async fn measure(args: &Args, dir: &Path, site: &Child) -> anyhow::Result<()> {
    let endpoints = Endpoints::read(&dir.join("site"))?;
    let vault_addr = endpoints.key_vault.clone();
    let admin_addr = endpoints.admin.clone();
    let tls = |id: &str| ReloadableTls::from_files(endpoints.cert_paths(id));
    let mut vault = KeyVaultClient::new(chipsite_tls::connect_lazy(
        &vault_addr,
        identity::KEY_VAULT,
        tls(identity::USER_GATEWAY)?,
    )?);
    let admin_channel =
        chipsite_tls::connect_lazy(&admin_addr, identity::ADMIN, tls(identity::ADMIN_CLIENT)?)?;
    let site_key = vault
        .get_status(kv::GetStatusRequest {})
        .await?
        .into_inner()
        .site_public_key;
    write_work(dir, &site_key)?;
    let work = Work::load(dir)?;

    // Users u00000.. with the same app key (the gateway compares keys per CHIP ID).
    let users = args.alarm_users.max(args.sessions).max(args.setup_concurrency);
    let started = Instant::now();
    let spki = work.key.spki_der();
    let admin = AdminServiceClient::new(admin_channel.clone());
    let jobs = futures::stream::iter(0..users).map(|i| {
        let (mut admin, mut vault, spki) = (admin.clone(), vault.clone(), spki.clone());
        async move {
            admin
                .create_user(ad::CreateUserRequest {
                    chip_id: user(i),
                    name: format!("Bench user {i}"),
                    ..Default::default()
                })
                .await?;
            vault
                .register_user_key(kv::RegisterUserKeyRequest {
                    chip_id: user(i),
                    public_key: spki,
                })
                .await?;
            anyhow::Ok(())
        }
    });
    use futures::StreamExt;
    let made: Vec<anyhow::Result<()>> = jobs.buffer_unordered(16).collect().await;
    made.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    println!(
        "setup: {users} users with keys in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // 1. Setups per second, baseline first.
    let (mut baseline, base_addr) = start_baseline(dir).await?;
    let base = setups(&work, base_addr, b"ping\n", args).await;
    let _ = baseline.kill();
    let _ = baseline.wait();
    let base = base?;
    let ping = b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"}\n";
    let gateway = setups(&work, work.gateway()?, ping, args).await?;
    println!();
    println!(
        "mutual-TLS session setups ({} clients, {} s each)",
        args.setup_concurrency, args.seconds
    );
    println!("  baseline (bare tokio-rustls echo)   {base:>8.0} /s");
    println!("  user gateway (admitted + ping)      {gateway:>8.0} /s");
    println!(
        "  ratio {:.2}   (target >= 0.70)",
        gateway / base.max(f64::MIN_POSITIVE)
    );

    // 2. status at N open sessions.
    status_rounds(&work, args).await?;

    // 3 and 4. Idle subscribed sessions, then one alarm per user.
    let pid = site.id();
    let before = rss_kib(pid)?;
    // Users 0.. hold two sessions each, the last few one, so that the
    // alarm fan-out reaches `alarm_users` distinct users.
    let users_held = args.alarm_users.min(args.idle_sessions);
    let doubled = args.idle_sessions.saturating_sub(users_held).min(users_held);
    let half = doubled / 2;
    let mut holders = vec![];
    for (first, last, per_user) in [(0, half, 2), (half, doubled, 2), (doubled, users_held, 1)] {
        if first == last {
            continue;
        }
        let child = Command::new(std::env::current_exe()?)
            .args(["bench-gateway", "--work"])
            .arg(dir)
            .args([
                "--hold",
                &first.to_string(),
                &last.to_string(),
                &per_user.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        holders.push(child);
    }
    let mut readers = vec![];
    for h in &mut holders {
        let out = h.stdout.take().context("holder stdout")?;
        let mut lines = std::io::BufReader::new(out).lines();
        match lines.next() {
            Some(Ok(l)) if l.starts_with("ready") => {}
            other => bail!("a session holder failed: {other:?}"),
        }
        readers.push(lines);
    }
    let held = doubled * 2 + (users_held - doubled);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(pid)?;
    let per_session = (after.saturating_sub(before)) as f64 * 1024.0 / held as f64;
    println!();
    println!("idle subscribed sessions held by the gateway: {held}");
    println!(
        "  site process RSS {} MiB -> {} MiB: {:.1} KiB per session   (target < 32 KiB)",
        before / 1024,
        after / 1024,
        per_session / 1024.0
    );

    // One alarm to each of the first `alarm_users` users (each has two sessions).
    let n = users_held;
    let mut events = UserEventsClient::new(admin_channel);
    let alarms: Vec<ev::NewAlarm> = (0..n)
        .map(|i| ev::NewAlarm {
            chip_id: user(i),
            kind: "bench".into(),
            text: format!("alarm for {}", user(i)),
        })
        .collect();
    let t0 = now_ms();
    let raised = Instant::now();
    events.raise_alarms(ev::RaiseAlarmsRequest { alarms }).await?;
    let raise_call = raised.elapsed();
    let mut last = 0i64;
    let mut received = 0u64;
    for lines in &mut readers {
        match lines.next() {
            Some(Ok(l)) if l.starts_with("alarms ") => {
                let mut it = l.split_whitespace().skip(1);
                received += it.next().and_then(|x| x.parse().ok()).unwrap_or(0);
                last = last.max(it.next().and_then(|x| x.parse().ok()).unwrap_or(0));
            }
            other => bail!("a session holder failed: {other:?}"),
        }
    }
    for mut h in holders {
        drop(h.stdin.take());
        let _ = h.wait();
    }
    println!();
    println!("one alarm to each of {n} connected users ({held} subscribed sessions)");
    println!(
        "  delivered {received} of {held}; raise call {}; last delivery {} ms after the raise   (target <= 1000 ms)",
        ms(raise_call),
        last - t0
    );
    Ok(())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// One setup: connect, handshake with a client certificate, one line out,
/// one line back, close.
async fn setup_once(
    addr: SocketAddr,
    name: ServerName<'static>,
    config: Arc<ClientConfig>,
    line: &[u8],
) -> anyhow::Result<()> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let mut tls = TlsConnector::from(config).connect(name, tcp).await?;
    tls.write_all(line).await?;
    let mut reader = BufReader::new(tls);
    let mut answer = String::new();
    reader.read_line(&mut answer).await?;
    if answer.is_empty() || answer.contains("\"error\"") {
        bail!("no answer: {answer:?}");
    }
    let _ = reader.into_inner().shutdown().await;
    Ok(())
}

async fn setups(work: &Work, addr: SocketAddr, line: &[u8], args: &Args) -> anyhow::Result<f64> {
    let configs = (0..args.setup_concurrency)
        .map(|c| work.client_config(&user(c % args.sessions.max(1))))
        .collect::<anyhow::Result<Vec<_>>>()?;
    setup_rate(
        addr,
        ServerName::try_from("127.0.0.1")?,
        configs,
        line,
        args.seconds,
    )
    .await
}

/// Setups per second (connect, TLS 1.3 with a client certificate, `line`
/// and its answer, close) by one client per configuration, for `seconds`.
pub(crate) async fn setup_rate(
    addr: SocketAddr,
    name: ServerName<'static>,
    configs: Vec<Arc<ClientConfig>>,
    line: &[u8],
    seconds: u64,
) -> anyhow::Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = vec![];
    for config in configs {
        let (done, failed, stop, line, name) = (
            done.clone(),
            failed.clone(),
            stop.clone(),
            line.to_vec(),
            name.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match setup_once(addr, name.clone(), config.clone(), &line).await {
                    Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed();
    let n = done.load(Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let f = failed.load(Ordering::Relaxed);
    if f > 0 {
        println!("  ({f} setups to {addr} failed)");
    }
    Ok(n as f64 / elapsed.as_secs_f64())
}

async fn status_rounds(work: &Work, args: &Args) -> anyhow::Result<()> {
    let gw = work.gateway()?;
    let host = gw.ip().to_string();
    let mut sessions = vec![];
    for i in 0..args.sessions {
        sessions.push(Arc::new(
            Session::connect(&host, gw.port(), &work.site_key, &user(i), &work.key).await?,
        ));
    }
    // Open loop: requests leave at the offered rate, round robin over the sessions.
    let interval = Duration::from_secs_f64(1.0 / args.status_rate.max(1) as f64);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let start = Instant::now();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent = 0usize;
    while start.elapsed() < Duration::from_secs(args.seconds) {
        ticker.tick().await;
        let s = sessions[sent % sessions.len()].clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let t = Instant::now();
            let ok = s.call("status", json!({})).await.is_ok();
            let _ = tx.send((ok, t.elapsed()));
        });
        sent += 1;
    }
    drop(tx);
    let mut lat = vec![];
    let mut errors = 0;
    while let Some((ok, d)) = rx.recv().await {
        if ok {
            lat.push(d);
        } else {
            errors += 1;
        }
    }
    let elapsed = start.elapsed();
    lat.sort();
    println!();
    println!(
        "status round trips over {} open sessions, offered {} /s for {} s",
        args.sessions, args.status_rate, args.seconds
    );
    println!(
        "  {:.0} /s answered, {errors} errors; p50 {}  p99 {}  max {}   (target p99 < 5 ms)",
        lat.len() as f64 / elapsed.as_secs_f64(),
        ms(percentile(&lat, 0.50)),
        ms(percentile(&lat, 0.99)),
        ms(lat.last().copied().unwrap_or_default())
    );
    Ok(())
}

/// The baseline server ([`baseline_server`]) in a child process, for the
/// site whose bench directory is `dir` (`site-key.b64` and `app.key` written).
pub(crate) async fn start_baseline(dir: &Path) -> anyhow::Result<(Child, SocketAddr)> {
    let port_file = dir.join("baseline.port");
    let mut baseline = Command::new(std::env::current_exe()?)
        .args(["bench-gateway", "--work"])
        .arg(dir)
        .arg("--baseline-server")
        .arg(&port_file)
        .stdout(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !port_file.exists() {
        if Instant::now() > deadline {
            let _ = baseline.kill();
            bail!("the baseline server did not start");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let addr = format!("127.0.0.1:{}", std::fs::read_to_string(&port_file)?.trim()).parse()?;
    Ok((baseline, addr))
}

/// The baseline: the gateway's TLS configuration (certified the same way)
/// in front of a line echo, nothing else.
async fn baseline_server(work: &Work, port_file: &Path) -> anyhow::Result<()> {
    let mut vault = KeyVaultClient::new(work.channel(
        &work.endpoints.key_vault,
        identity::KEY_VAULT,
        identity::USER_GATEWAY,
    )?);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let issued = vault
        .issue_service_certificate(kv::IssueServiceCertificateRequest {
            public_key: rcgen::PublicKeyData::subject_public_key_info(&key),
            subject_alt_names: vec!["127.0.0.1".into()],
            ttl_seconds: 3600,
        })
        .await?
        .into_inner();
    let config = Arc::new(chipsite_user_gateway::server_config(
        issued.chain,
        key.serialize_der(),
    )?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let tmp = port_file.with_extension("tmp");
    std::fs::write(&tmp, listener.local_addr()?.port().to_string())?;
    std::fs::rename(&tmp, port_file)?;
    echo_lines(listener, config).await
}

/// Hold subscribed sessions for users FIRST..LAST, PER_USER each; print
/// "ready", then, once every session has received one alarm (or after
/// 30 s), "alarms <count> <unix ms of the last>"; exit when stdin closes.
async fn hold_sessions(work: &Work, first: usize, last: usize, per_user: usize) -> anyhow::Result<()> {
    let gw = work.gateway()?;
    let host = gw.ip().to_string();
    let received = Arc::new(AtomicU64::new(0));
    let last_at = Arc::new(AtomicU64::new(0));
    let mut sessions = vec![];
    use futures::StreamExt;
    let opened: Vec<anyhow::Result<Session>> = futures::stream::iter(first..last)
        .flat_map(|i| futures::stream::iter(std::iter::repeat_n(i, per_user)))
        .map(|i| {
            let host = host.clone();
            async move {
                let s = Session::connect(&host, gw.port(), &work.site_key, &user(i), &work.key).await?;
                s.call("alarms.subscribe", json!({})).await?;
                anyhow::Ok(s)
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    for s in opened {
        let s = Arc::new(s?);
        let (received, last_at) = (received.clone(), last_at.clone());
        let watcher = s.clone();
        tokio::spawn(async move {
            while let Some(n) = watcher.next_notification().await {
                if n.method == "alarm" {
                    received.fetch_add(1, Ordering::Relaxed);
                    last_at.fetch_max(now_ms() as u64, Ordering::Relaxed);
                }
            }
        });
        sessions.push(s);
    }
    println!("ready {}", sessions.len());
    std::io::stdout().flush()?;
    let expected = sessions.len() as u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while received.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Anything still arriving is late; count what came.
    println!(
        "alarms {} {}",
        received.load(Ordering::Relaxed),
        last_at.load(Ordering::Relaxed)
    );
    std::io::stdout().flush()?;
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    Ok(())
}

/// The baselines' server: accept TLS with `config`, read one line, send it
/// back, close.
pub(crate) async fn echo_lines(
    listener: tokio::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> anyhow::Result<()> {
    loop {
        let (tcp, _) = listener.accept().await?;
        let acceptor = tokio_rustls::TlsAcceptor::from(config.clone());
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let mut reader = BufReader::new(tls);
            let mut line = String::new();
            if reader.read_line(&mut line).await.is_ok() {
                let mut tls = reader.into_inner();
                let _ = tls.write_all(line.as_bytes()).await;
                let _ = tls.shutdown().await;
            }
        });
    }
}
