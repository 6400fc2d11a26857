//! A gateway's external TLS key (the user gateway's, the peer gateway's):
//! made in memory, never stored, certified by the site key through
//! key-vault's `IssueServiceCertificate` for the host the site tells its
//! clients to use, and renewed at two thirds of its life. The site key
//! itself never leaves key-vault.

use std::{
    future::Future,
    sync::atomic::{AtomicI64, Ordering},
    time::Duration,
};

use chipsite_proto::{
    admin::v1::{self as ad, admin_service_client::AdminServiceClient},
    keyvault::v1::{self as kv, key_vault_client::KeyVaultClient},
};
use chipsite_telemetry::TracedChannel;
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};

/// What key-vault certified: the chain `[leaf, site certificate]`, the
/// leaf's private key (PKCS#8 DER, in memory only) and the leaf's expiry.
pub struct Certified {
    pub chain: Vec<Vec<u8>>,
    pub pkcs8: Vec<u8>,
    pub not_after_ms: i64,
}

impl std::fmt::Debug for Certified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certified")
            .field("chain", &self.chain.len())
            .field("not_after_ms", &self.not_after_ms)
            .finish_non_exhaustive()
    }
}

/// The site configuration's value for `key` (`user_gateway.host`,
/// `peer_gateway.host`), or `default`.
pub async fn site_setting(
    admin: &AdminServiceClient<TracedChannel>,
    key: &str,
    default: &str,
) -> Result<String, tonic::Status> {
    let values = admin
        .clone()
        .get_site_config(ad::GetSiteConfigRequest {})
        .await?
        .into_inner()
        .values;
    Ok(values.get(key).cloned().unwrap_or_else(|| default.to_owned()))
}

/// Make a new P-256 key and have key-vault certify it for `host` for `ttl`
/// (key-vault bounds it to 60 s … 24 h).
pub async fn certify(
    vault: &KeyVaultClient<TracedChannel>,
    host: String,
    ttl: Duration,
) -> Result<Certified, String> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
    let issued = vault
        .clone()
        .issue_service_certificate(kv::IssueServiceCertificateRequest {
            public_key: rcgen::PublicKeyData::subject_public_key_info(&key),
            subject_alt_names: vec![host],
            ttl_seconds: u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX),
        })
        .await
        .map_err(|e| e.message().to_owned())?
        .into_inner();
    Ok(Certified {
        chain: issued.chain,
        pkcs8: key.serialize_der(),
        not_after_ms: issued.not_after_ms,
    })
}

/// Call `certify` every second until it succeeds (key-vault may not be up
/// yet, or sealed), warning once that `who` waits.
pub async fn until_certified<E: std::fmt::Display, Fut: Future<Output = Result<i64, E>>>(
    who: &str,
    mut certify: impl FnMut() -> Fut,
) {
    let mut warned = false;
    loop {
        match certify().await {
            Ok(_) => return,
            Err(e) if !warned => {
                tracing::warn!(error = %e, "the {who} waits for key-vault to certify it (is the vault sealed?)");
                warned = true;
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Renew with `certify` at two thirds of the remaining life of the
/// certificate expiring at `not_after_ms` (retrying every 10 s while
/// key-vault refuses; the current one serves meanwhile). Never ends.
pub async fn keep_certified<E: std::fmt::Display, Fut: Future<Output = Result<i64, E>>>(
    who: &str,
    not_after_ms: &AtomicI64,
    mut certify: impl FnMut() -> Fut,
) {
    loop {
        let left = not_after_ms.load(Ordering::Relaxed) - now_ms();
        let wait = Duration::from_millis(u64::try_from(left * 2 / 3).unwrap_or(0));
        tokio::time::sleep(wait.max(Duration::from_secs(10))).await;
        if let Err(e) = certify().await {
            tracing::warn!(error = %e, "could not renew the {who}'s certificate; retrying");
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
