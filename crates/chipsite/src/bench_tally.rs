//! `chipsite bench-tally`: tally steps from site A to site B, PostgreSQL
//! under both (each site its own database), beside `pgbench -N` on site A's
//! database, measured in the same run (issue 13's second benchmark).
//!
//! Both dev sites run in this process. `concurrency` users on A, each
//! linked with one user on B through a tally ticket, each in its own app
//! session, sign and submit offers (a new tally each).
//!
//! 1. **Submission** (app -> A): for `seconds`, with A's peer server
//!    stopped, the apps submit as fast as A takes them; each step is
//!    checked and recorded with its outbox message.
//! 2. **Delivery** (A -> B, the figure beside pgbench): A's peer server
//!    starts, and every waiting step is delivered to B, which checks and
//!    records it; the rate is the steps B recorded over the time until A's
//!    outbox was empty.
//! 3. **Latency**, one step at a time: from the app's signature (`at_ms`)
//!    to B's record (`recorded_at_ms`, read from B's store), p50 and p99.

use std::time::{Duration, Instant};

use anyhow::Context;
use chipsite_app::{AppKey, Session};
use chipsite_model::tally::{self, Kind, Party};
use chipsite_proto::admin::v1::{self as ad, admin_service_client::AdminServiceClient};
use chipsite_site::{Config, Site, config::Addresses};
use chipsite_tls::{ReloadableTls, identity};
use sea_orm::{ConnectionTrait, Statement};
use serde_json::json;

use crate::bench::{Args, BenchDatabase, ms, percentile, pgbench};

pub async fn run(args: Args) -> anyhow::Result<()> {
    chipsite_tls::install_crypto_provider();
    // The sites' warnings and errors, on stderr.
    let _logs = chipsite_telemetry::init("bench-tally", "warn", "")?;
    let (db_a, db_b) = (
        BenchDatabase::create(&args.postgres.postgres_url).await?,
        BenchDatabase::create(&args.postgres.postgres_url).await?,
    );
    let result = measure(&args, &db_a.url, &db_b.url).await;
    db_a.drop().await;
    db_b.drop().await;
    result
}

async fn start(url: &str, dir: &std::path::Path) -> anyhow::Result<Site> {
    let config = Config {
        data_dir: dir.to_path_buf(),
        database_url: url.to_owned(),
        addresses: Addresses::ephemeral(),
        log: "warn".into(),
        ..Config::default()
    };
    Ok(Site::start_dev(&config).await?)
}

fn admin(site: &Site) -> anyhow::Result<AdminServiceClient<chipsite_tls::InternalChannel>> {
    let tls = ReloadableTls::from_files(site.endpoints.cert_paths(identity::ADMIN_CLIENT))?;
    Ok(AdminServiceClient::new(chipsite_tls::connect_lazy(
        &site.endpoints.admin,
        identity::ADMIN,
        tls,
    )?))
}

/// A user created, enrolled and in a session on `site`.
async fn enrolled(site: &Site, chip_id: &str) -> anyhow::Result<(AppKey, Session, Party)> {
    let mut admin = admin(site)?;
    admin
        .create_user(ad::CreateUserRequest {
            chip_id: chip_id.into(),
            name: chip_id.into(),
            ..Default::default()
        })
        .await?;
    let uri = admin
        .issue_user_ticket(ad::IssueUserTicketRequest {
            chip_id: chip_id.into(),
            ttl_seconds: 0,
        })
        .await?
        .into_inner()
        .uri;
    let ticket = chipsite_model::PublishedTicket::from_uri(&uri)?;
    let key = AppKey::generate()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    // The gateway listens once key-vault certified it.
    loop {
        match chipsite_app::enroll(&ticket, chip_id, &key).await {
            Ok(()) => break,
            Err(e) if Instant::now() > deadline => return Err(e).context("enrolling"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let state = chipsite_app::AppState::new(&ticket, chip_id, &key);
    let session = Session::open(&state).await.context("opening a session")?;
    Ok((key, session, state.party()?))
}

async fn outbox_depth(admin: &mut AdminServiceClient<chipsite_tls::InternalChannel>) -> anyhow::Result<u32> {
    Ok(admin
        .list_peers(chipsite_proto::peer::v1::ListPeersRequest {})
        .await?
        .into_inner()
        .sites
        .iter()
        .map(|s| s.outbox_depth)
        .sum())
}

async fn measure(args: &Args, url_a: &str, url_b: &str) -> anyhow::Result<()> {
    let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let a = start(url_a, dir_a.path()).await?;
    let b = start(url_b, dir_b.path()).await?;
    println!(
        "chipsite bench-tally: tally offers from site A to site B, PostgreSQL under both, {} apps, {} s",
        args.concurrency, args.seconds
    );
    // One user on B, linked with every user on A.
    let (_, bob, bob_at) = enrolled(&b, "bob").await?;
    let mut apps = vec![];
    for i in 0..args.concurrency {
        let chip_id = format!("a{i}");
        let (key, session, party) = enrolled(&a, &chip_id).await?;
        let ticket = session
            .call("tally_ticket", json!({}))
            .await
            .context("asking for a tally ticket")?;
        let uri = ticket["uri"].as_str().context("a tally ticket")?.to_owned();
        let deadline = Instant::now() + Duration::from_secs(30);
        // B's peer gateway may still be getting certified.
        while let Err(e) = bob.redeem_tally_ticket(&uri).await {
            if Instant::now() > deadline {
                return Err(e).context("linking");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        apps.push((key, session, party));
    }
    let mut admin_a = admin(&a)?;
    // Warm up: sessions, pools, prepared statements, peer sessions.
    submit_for(&apps, &bob_at, Duration::from_secs(1)).await?;
    drain(&mut admin_a).await?;
    let b_db = chipsite_store::connect(url_b).await?;
    let passphrase = std::fs::read_to_string(chipsite_site::dev::passphrase_path(dir_a.path()))?;

    // 1. Submission: the apps sign and submit for `seconds` while A's peer
    //    server is stopped, so the steps wait in A's outbox.
    let before = recorded(&b_db).await?.len();
    admin_a.stop_peer_server(ad::StopPeerServerRequest {}).await?;
    let (submitted, submit) = submit_for(&apps, &bob_at, Duration::from_secs(args.seconds)).await?;
    let submit_rate = submitted as f64 / args.seconds as f64;

    // 2. Delivery: A's peer server starts; every waiting step goes to B.
    // (Those sent before A's peer gateway saw the stop, within a second,
    // are not counted here.)
    let early = recorded(&b_db).await?.len() - before;
    let started = Instant::now();
    admin_a
        .start_peer_server(ad::StartPeerServerRequest {
            passphrase: passphrase.trim().to_owned(),
        })
        .await?;
    drain(&mut admin_a).await?;
    let elapsed = started.elapsed();
    let arrived = recorded(&b_db).await?.len() - before;
    let rate = (arrived - early) as f64 / elapsed.as_secs_f64();

    // 3. Latency, one step at a time: from the app's signature to B's record.
    let before = recorded(&b_db).await?.len();
    let one = &apps[..1];
    let deadline = Instant::now() + Duration::from_secs(args.seconds.min(5));
    while Instant::now() < deadline {
        // Waiting asks only for a count, every 5 ms: reading every step
        // each millisecond (thousands after the run above) loaded the
        // machine the measurement runs on, the more the faster the
        // connection. The latency is B's record time less the signature's,
        // so how often this looks does not change it.
        let at = recorded_count(&b_db).await?;
        submit_count(one, &bob_at, 1).await?;
        while recorded_count(&b_db).await? == at {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let mut latency: Vec<Duration> = recorded(&b_db).await?[before..]
        .iter()
        .map(|(at, rec)| Duration::from_millis(u64::try_from(rec - at).unwrap_or(0)))
        .collect();
    latency.sort_unstable();
    a.shutdown(Duration::from_secs(5)).await?;
    b.shutdown(Duration::from_secs(5)).await?;

    println!();
    println!(
        "  submit     {submit_rate:>9.0} steps/s app -> A   (signed, checked, recorded with its outbox message; p50 {}  p99 {})",
        ms(percentile(&submit, 0.50)),
        ms(percentile(&submit, 0.99))
    );
    println!(
        "  chipsite   {rate:>9.0} steps/s A -> B     ({} waiting steps delivered and recorded on B in {:.1} s)",
        arrived - early,
        elapsed.as_secs_f64()
    );
    println!(
        "  one at a time: signed -> recorded on B  p50 {}  p99 {}  ({} steps)",
        ms(percentile(&latency, 0.50)),
        ms(percentile(&latency, 0.99)),
        latency.len()
    );
    anyhow::ensure!(arrived as u64 == submitted, "steps were lost or doubled");
    if args.no_pgbench {
        return Ok(());
    }
    let tps = pgbench(url_a, args.concurrency, args.seconds)?;
    println!(
        "  pgbench -N {tps:>9.0} tps                 (site A's database, -c {} -j 2 -T {})",
        args.concurrency, args.seconds
    );
    let ratio = rate / tps;
    println!();
    println!(
        "  ratio {:.2} of pgbench's TPS, A -> B (target ≥ 0.25): {}",
        ratio,
        if ratio >= 0.25 { "met" } else { "NOT met" }
    );
    Ok(())
}

/// Each app submits `n` offers, one after another.
async fn submit_count(apps: &[(AppKey, Session, Party)], to: &Party, n: usize) -> anyhow::Result<()> {
    for (key, session, me) in apps {
        for _ in 0..n {
            session
                .submit_step(Kind::Offer, &offer(key, me, to)?)
                .await
                .context("submitting an offer")?;
        }
    }
    Ok(())
}

/// A signed offer from `me` to `to`.
fn offer(key: &AppKey, me: &Party, to: &Party) -> anyhow::Result<serde_json::Value> {
    let now_ms = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis(),
    )?;
    let doc = tally::doc(
        Kind::Offer,
        &chipsite_app::new_tally_id()?,
        me,
        to,
        None,
        Some(&json!({"limit": 1000})),
        now_ms,
    );
    Ok(key.signed_step(&doc)?)
}

/// Every app signs and submits offers until `length` has passed: how many,
/// and how long each submission took.
async fn submit_for(
    apps: &[(AppKey, Session, Party)],
    to: &Party,
    length: Duration,
) -> anyhow::Result<(u64, Vec<Duration>)> {
    let deadline = Instant::now() + length;
    let work = apps.iter().map(|(key, session, me)| async move {
        let mut took = vec![];
        while Instant::now() < deadline {
            let step = offer(key, me, to)?;
            let t0 = Instant::now();
            session
                .submit_step(Kind::Offer, &step)
                .await
                .context("submitting an offer")?;
            took.push(t0.elapsed());
        }
        anyhow::Ok(took)
    });
    let mut all = vec![];
    for took in futures::future::join_all(work).await {
        all.extend(took?);
    }
    all.sort_unstable();
    Ok((all.len() as u64, all))
}

/// Wait until site A's outbox is empty (every step delivered).
async fn drain(admin: &mut AdminServiceClient<chipsite_tls::InternalChannel>) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    while outbox_depth(admin).await? > 0 {
        anyhow::ensure!(Instant::now() < deadline, "site A's outbox did not drain");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// How many steps B has recorded.
async fn recorded_count(db: &sea_orm::DatabaseConnection) -> anyhow::Result<i64> {
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT count(*) AS n FROM tally_steps".to_owned(),
        ))
        .await?
        .context("a count")?;
    Ok(row.try_get("", "n")?)
}

/// The steps B recorded, oldest first: (signed at, recorded at), in ms.
async fn recorded(db: &sea_orm::DatabaseConnection) -> anyhow::Result<Vec<(i64, i64)>> {
    let rows = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT doc, recorded_at_ms FROM tally_steps ORDER BY recorded_at_ms".to_owned(),
        ))
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let doc: String = r.try_get("", "doc")?;
        let at: i64 = r.try_get("", "recorded_at_ms")?;
        let signed = serde_json::from_str::<serde_json::Value>(&doc)?["at_ms"]
            .as_i64()
            .unwrap_or(at);
        out.push((signed, at));
    }
    Ok(out)
}
