//! `chipsite bench-peer`: peer session setups against the peer gateway,
//! beside a bare tokio-rustls server with the same TLS configuration,
//! measured in the same run (issue 13's benchmark).
//!
//! The site runs as a child process (`chipsite dev`, SQLite); the baseline
//! server in another child process, so each server has its own process as
//! the peer gateway does. A "peer site" user `peerbench` is given a learned
//! key (the site's own key stands in for the peer site's: the same
//! verification work), and its chain `[leaf, site certificate]`, issued by
//! key-vault, is what every client presents.
//!
//! One setup: connect, TLS 1.3 with the server name naming `peerbench`, the
//! responder's key lookup (key-vault `ListPeerKeys`) and the client chain
//! checked against it, one `ping` and its answer, close. The baseline does
//! the TLS part with the same chains and verifier, and echoes the line.
//!
//! Tally steps per second (durable on both sides, beside `pgbench -N`) are
//! `chipsite bench-tally`.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chipsite_proto::keyvault::v1::{self as kv, key_vault_client::KeyVaultClient};
use chipsite_site::Endpoints;
use chipsite_tls::{ReloadableTls, identity};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::bench_gateway::{echo_lines, setup_rate, start_site};

const USER: &str = "peerbench";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Seconds each measurement runs.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Internal: serve the baseline with the material in this directory.
    #[arg(long, hide = true)]
    baseline_server: Option<PathBuf>,
}

/// A chain `[leaf, site certificate]` and its leaf key, issued by key-vault.
struct Chain {
    chain: Vec<Vec<u8>>,
    pkcs8: Vec<u8>,
}

impl Chain {
    async fn issue(vault: &mut KeyVaultClient<chipsite_tls::InternalChannel>) -> anyhow::Result<Self> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let issued = vault
            .issue_service_certificate(kv::IssueServiceCertificateRequest {
                public_key: rcgen::PublicKeyData::subject_public_key_info(&key),
                subject_alt_names: vec!["127.0.0.1".into()],
                ttl_seconds: 3600,
            })
            .await?
            .into_inner();
        Ok(Self {
            chain: issued.chain,
            pkcs8: key.serialize_der(),
        })
    }

    fn save(&self, dir: &Path, name: &str) -> anyhow::Result<()> {
        let items: Vec<String> = self.chain.iter().map(|c| URL_SAFE_NO_PAD.encode(c)).collect();
        std::fs::write(dir.join(format!("{name}.chain")), items.join("\n"))?;
        chipsite_tls::write_private(
            &dir.join(format!("{name}.key")),
            URL_SAFE_NO_PAD.encode(&self.pkcs8).as_bytes(),
        )?;
        Ok(())
    }

    fn load(dir: &Path, name: &str) -> anyhow::Result<Self> {
        let chain = std::fs::read_to_string(dir.join(format!("{name}.chain")))?
            .lines()
            .map(|l| URL_SAFE_NO_PAD.decode(l.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        let pkcs8 =
            URL_SAFE_NO_PAD.decode(std::fs::read_to_string(dir.join(format!("{name}.key")))?.trim())?;
        Ok(Self { chain, pkcs8 })
    }

    fn client_config(&self, site_key: &[u8]) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        let chain = self.chain.iter().cloned().map(CertificateDer::from).collect();
        let key = PrivateKeyDer::Pkcs8(self.pkcs8.clone().into());
        Ok(Arc::new(chipsite_external_tls::client_config(
            site_key,
            Some((chain, key)),
        )?))
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    chipsite_tls::install_crypto_provider();
    if let Some(dir) = &args.baseline_server {
        return baseline_server(dir).await;
    }
    let dir = tempfile::tempdir()?;
    let mut site = start_site(dir.path(), "")?;
    let result = measure(&args, dir.path()).await;
    let _ = site.kill();
    let _ = site.wait();
    result
}

async fn measure(args: &Args, dir: &Path) -> anyhow::Result<()> {
    let endpoints = Endpoints::read(&dir.join("site"))?;
    let tls = ReloadableTls::from_files(endpoints.cert_paths(identity::PEER_GATEWAY))?;
    let mut vault = KeyVaultClient::new(chipsite_tls::connect_lazy(
        &endpoints.key_vault,
        identity::KEY_VAULT,
        tls,
    )?);
    let site_key = vault
        .get_status(kv::GetStatusRequest {})
        .await?
        .into_inner()
        .site_public_key;
    vault
        .register_peer_key(kv::RegisterPeerKeyRequest {
            peer_chip_id: USER.into(),
            peer_host: "127.0.0.1".into(),
            public_key: site_key.clone(),
        })
        .await?;
    let client = Chain::issue(&mut vault).await?;
    let server = Chain::issue(&mut vault).await?;
    server.save(dir, "server")?;
    std::fs::write(dir.join("site-key.b64"), URL_SAFE_NO_PAD.encode(&site_key))?;

    let configs = (0..args.concurrency)
        .map(|_| client.client_config(&site_key))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let name = ServerName::try_from(chipsite_peer_gateway::session_name(USER))?;
    let ping = b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"}\n";

    // The baseline first, in its own process.
    let port_file = dir.join("baseline.port");
    let mut baseline = Command::new(std::env::current_exe()?)
        .arg("bench-peer")
        .arg("--baseline-server")
        .arg(dir)
        .stdout(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !port_file.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let base_addr: SocketAddr =
        format!("127.0.0.1:{}", std::fs::read_to_string(&port_file)?.trim()).parse()?;
    let base = setup_rate(base_addr, name.clone(), configs.clone(), ping, args.seconds).await;
    let _ = baseline.kill();
    let _ = baseline.wait();
    let base = base?;

    let peer: SocketAddr = endpoints.peer.parse().context("the peer port")?;
    let gateway = setup_rate(peer, name, configs, ping, args.seconds).await?;
    println!(
        "peer session setups ({} clients, {} s each; TLS 1.3 with both chains, the key lookup, ping)",
        args.concurrency, args.seconds
    );
    println!("  baseline (bare tokio-rustls, same TLS configuration)   {base:>8.0} /s");
    println!("  peer gateway (key lookup + session + ping)             {gateway:>8.0} /s");
    println!(
        "  ratio {:.2}   (target >= 0.70)",
        gateway / base.max(f64::MIN_POSITIVE)
    );
    println!("tally steps per second: chipsite bench-tally (PostgreSQL under both sites, beside pgbench)");
    Ok(())
}

/// The baseline: the same server chain and the same client verifier (only
/// the peer's learned key), answering one line with itself.
async fn baseline_server(dir: &Path) -> anyhow::Result<()> {
    let server = Chain::load(dir, "server")?;
    let site_key = URL_SAFE_NO_PAD.decode(std::fs::read_to_string(dir.join("site-key.b64"))?.trim())?;
    let config = Arc::new(chipsite_external_tls::server_config(
        server.chain,
        server.pkcs8,
        chipsite_external_tls::SiteChainVerifier::expecting(Some(vec![site_key])),
    )?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port_file = dir.join("baseline.port");
    let tmp = port_file.with_extension("tmp");
    std::fs::write(&tmp, listener.local_addr()?.port().to_string())?;
    std::fs::rename(&tmp, &port_file)?;
    echo_lines(listener, config).await
}
