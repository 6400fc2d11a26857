//! `chipsite`: run a whole dev site, or one service for containers.

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use chipsite_site::{Config, Service, Site};
use clap::{Parser, Subcommand};

/// mimalloc instead of glibc's malloc: allocation was 18% of the site's
/// CPU per enrollment cycle with glibc (issue 15; `bench-enroll` measures).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod bench;
mod bench_enroll;
mod bench_gateway;
mod bench_peer;
mod bench_tally;
mod health;

#[derive(Parser)]
#[command(name = "chipsite", version, about = "The chipsite site server")]
struct Cli {
    /// Configuration file (TOML). CHIPSITE_* environment variables override it.
    #[arg(long, global = true, env = "CHIPSITE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The whole site in one process on loopback, with SQLite in a data directory.
    Dev {
        /// Data directory (default: $CHIPSITE_DATA_DIR or ~/.local/share/chipsite/dev).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Add this to every port (e.g. 100, with another --data-dir, for a
        /// second site beside the first: its peer port is then 44402).
        #[arg(long, default_value_t = 0)]
        port_offset: u16,
    },
    /// One service of the site, configured from file and environment (for
    /// containers). Exits non-zero if the service stops by itself.
    Serve {
        #[arg(value_parser = clap::builder::PossibleValuesParser::new(Service::names()))]
        service: String,
    },
    /// Print the effective configuration, secrets masked.
    Config,
    /// Ask this process's ops port whether the service is ready (or, with
    /// --live, alive): exit 0 if so, 1 if not. For container health checks,
    /// with no shell in the image.
    Health(health::Args),
    /// The internal PKI for a deployment (compose secrets, a Kubernetes Secret).
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Ticket issue + redeem benchmark against PostgreSQL, beside pgbench.
    Bench(bench::Args),
    /// User gateway benchmark: mutual-TLS setups beside a bare tokio-rustls
    /// baseline, status latency, memory per idle session, alarm fan-out.
    BenchGateway(bench_gateway::Args),
    /// Peer gateway benchmark: peer session setups (both chains, the key
    /// lookup, a ping) beside a bare tokio-rustls baseline.
    BenchPeer(bench_peer::Args),
    /// Tally steps from site A to site B, PostgreSQL under both (durable on
    /// both sides), beside pgbench.
    BenchTally(bench::Args),
    /// The enrollment cycle (ticket, redeem, first session, status) on SQLite
    /// and PostgreSQL: cycles per second, CPU and internal calls per cycle,
    /// beside bare handshakes and pgbench.
    BenchEnroll(bench_enroll::Args),
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Make the internal CA and one certificate and key per identity (every
    /// service, the console, and `admin-client` for operators) in DIR:
    /// `ca.pem`, `<identity>.pem`, `<identity>.key`, and the CA's key in
    /// `DIR/ca/ca.key` (keep it offline; a `kubectl create secret generic
    /// --from-file=DIR` skips that folder). Files already there are kept.
    Init {
        dir: PathBuf,
        /// Named in the CA's subject.
        #[arg(long, default_value = "chipsite")]
        site_name: String,
        /// Days each identity's certificate is valid (the CA: ten years).
        #[arg(long, default_value_t = 397, value_parser = clap::value_parser!(u64).range(1..=3650))]
        days: u64,
        /// Issue every identity's certificate again from the same CA (the
        /// services reload the new files without a restart).
        #[arg(long)]
        renew: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut config =
        Config::load(cli.config.as_deref()).map_err(|e| anyhow::anyhow!("configuration: {e}"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    // The OTLP exporter's gRPC channel is made in telemetry::init and needs
    // the runtime's context.
    let _runtime_context = runtime.enter();
    match cli.command {
        Command::Config => {
            print!("{}", config.to_masked_toml());
            Ok(())
        }
        Command::Health(args) => {
            let ok = runtime.block_on(health::check(&config, &args));
            std::process::exit(if ok { 0 } else { 1 });
        }
        Command::Pki(PkiCommand::Init {
            dir,
            site_name,
            days,
            renew,
        }) => {
            let layout = chipsite_site::pki::Layout::deploy(&dir);
            let made = chipsite_site::pki::ensure(
                &layout,
                &site_name,
                &chipsite_site::pki::deploy_identities(),
                Duration::from_secs(days * 86_400),
                renew,
            )?;
            if made.created_ca {
                println!("made the internal CA: {}", layout.ca_cert.display());
                println!(
                    "  its key: {} (keep it offline; only `pki init` needs it)",
                    layout.ca_key.display()
                );
            }
            if made.issued.is_empty() {
                println!("every identity already has a certificate in {}", dir.display());
            } else {
                println!("issued ({} days): {}", days, made.issued.join(", "));
            }
            Ok(())
        }
        Command::Dev {
            data_dir,
            port_offset,
        } => {
            if let Some(d) = data_dir {
                config.data_dir = d;
            }
            config
                .addresses
                .offset_ports(port_offset)
                .map_err(|e| anyhow::anyhow!("--port-offset: {e}"))?;
            let _telemetry = chipsite_telemetry::init("chipsite", &config.log, &config.otlp_endpoint)?;
            runtime.block_on(dev(config))
        }
        Command::Serve { service } => {
            let service = Service::parse(&service).with_context(|| {
                format!(
                    "unknown service {service:?}: use one of {}",
                    Service::names().join(", ")
                )
            })?;
            let _telemetry =
                chipsite_telemetry::init(service.identity(), &config.log, &config.otlp_endpoint)?;
            runtime.block_on(chipsite_site::serve_one(&config, service, shutdown_signal()))?;
            Ok(())
        }
        Command::Bench(args) => runtime.block_on(bench::run(args)),
        Command::BenchGateway(args) => runtime.block_on(bench_gateway::run(args)),
        Command::BenchPeer(args) => runtime.block_on(bench_peer::run(args)),
        Command::BenchTally(args) => runtime.block_on(bench_tally::run(args)),
        Command::BenchEnroll(args) => runtime.block_on(bench_enroll::run(args)),
    }
}

async fn dev(config: Config) -> anyhow::Result<()> {
    let stop = shutdown_signal();
    let site = Site::start_dev(&config).await?;
    let e = &site.endpoints;
    let data = e.data_dir.display();
    println!("chipsite dev site is running (data directory {data})");
    println!();
    println!(
        "  admin      {}  (AdminService, gRPC over mutual TLS, reflection on)",
        e.admin
    );
    println!("  key-vault  {}", e.key_vault);
    println!("  console    {}  (admin web console)", e.console);
    if !e.console_https.is_empty() {
        println!(
            "  console    {}  (HTTPS: sign in with the admin client certificate)",
            e.console_https
        );
    }
    println!("  ticket     {}", e.ticket);
    if !e.ops.is_empty() {
        println!("  ops        {}  (/livez, /readyz, /metrics: plain HTTP)", e.ops);
    }
    println!(
        "  apps       {}  (user gateway: JSON over TLS 1.3, see docs/protocol.md)",
        e.user_gateway
    );
    println!(
        "  peers      {}  (peer gateway: tally tickets between sites, docs/protocol.md section 14; internal {})",
        e.peer, e.peer_gateway
    );
    println!();
    println!(
        "  endpoints  {}",
        chipsite_site::Endpoints::path(&e.data_dir).display()
    );
    println!("  CA         {}", e.ca.display());
    println!(
        "  admin cert {} / {}",
        e.admin_client_cert.display(),
        e.admin_client_key.display()
    );
    println!();
    if site.created_site_key {
        println!("  first launch: created the site key");
    }
    if !site.init_scripts_ran.is_empty() {
        println!("  init scripts run: {}", site.init_scripts_ran.join(", "));
    }
    println!(
        "  WARNING: dev mode keeps the site key pass phrase in {} so it can unseal by itself.",
        chipsite_site::dev::passphrase_path(&e.data_dir).display()
    );
    println!("           Never do this in production (`chipsite serve` never does).");
    println!(
        "  vault: {}",
        if site.unsealed {
            "unsealed"
        } else {
            "SEALED (chipsctl key unseal)"
        }
    );
    // A one-time sign-in link for the web console (10 minutes).
    match site
        .admin_client()?
        .issue_console_ticket(chipsite_proto::admin::v1::IssueConsoleTicketRequest { ttl_seconds: 0 })
        .await
    {
        Ok(t) => println!("  console sign-in (one time, 10 min): {}", t.into_inner().url),
        Err(e) => println!("  console sign-in link unavailable: {}", e.message()),
    }
    println!();
    println!("Try:");
    println!("  chipsctl user create alice --name 'Alice Example' --email alice@example.com");
    println!("  chipsctl ticket issue alice --qr");
    println!("  chipapp enroll 'chipsite:user?…' --chip-id alice   # play the mobile app");
    println!("  chipapp status");
    println!("  chipsctl key status");
    println!("  chipsctl audit");
    println!("  chipsctl console link                    # another console sign-in link");
    println!();
    println!("Ctrl-C stops the site.");
    let stop = async {
        stop.await;
        println!("stopping…");
    };
    // A service that ends by itself stops the site with an error (non-zero exit).
    // Longer than a server's own drain (10 s), so each gets all of it.
    site.run_until(stop, Duration::from_secs(15)).await?;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is
/// called (not when first polled), so a signal that arrives while the site
/// is still starting is not lost, nor does it kill the process uncleanly.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let handlers = (signal(SignalKind::interrupt()), signal(SignalKind::terminate()));
        async move {
            match handlers {
                (Ok(mut int), Ok(mut term)) => {
                    tokio::select! {
                        _ = int.recv() => {},
                        _ = term.recv() => {},
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
