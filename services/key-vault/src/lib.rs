//! key-vault: the site key, sealed at rest, and the public keys the site
//! knows (its users' and its peers').
//!
//! The site private key exists in the clear only in this process's memory
//! while the vault is unsealed. At rest it is standard encrypted PKCS#8 (PBES2:
//! scrypt + AES-256-CBC), which `openssl pkey -passin` opens. Other services
//! get signatures made with it (short-lived gateway certificates), never the key.

mod grpc;
pub mod store;

use std::{sync::Arc, time::Duration};

use p256::{
    PublicKey, SecretKey,
    elliptic_curve::Generate,
    pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, LineEnding},
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SubjectPublicKeyInfo,
};
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter,
    QueryOrder, sea_query::OnConflict,
};
use time::OffsetDateTime;
use tokio::sync::{Mutex, RwLock};
use zeroize::Zeroizing;

use chipsite_proto::status::ErrorCode;
use chipsite_store::now_ms;
pub use grpc::{KeyVaultGrpc, policy};
use store::{peer_key, site_key, user_key};

/// Longest lifetime of a gateway certificate.
pub const MAX_SERVICE_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Shortest acceptable new pass phrase. The key's scrypt parameters sit at
/// what `openssl pkey` accepts, so the phrase carries the strength.
pub const MIN_PASSPHRASE_LEN: usize = 12;
/// Wrong pass phrases tolerated before attempts are spaced out.
const FREE_FAILURES: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("the vault is sealed: unseal it with the site key pass phrase")]
    Sealed,
    #[error("there is no site key yet")]
    NoKey,
    #[error("wrong pass phrase")]
    WrongPassphrase,
    #[error("too many wrong pass phrases; try again in {0} s")]
    Throttled(u64),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("database: {0}")]
    Store(#[from] sea_orm::DbErr),
    #[error("key handling failed: {0}")]
    Crypto(String),
}

impl VaultError {
    /// The site-wide code of this error (carried across gRPC).
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Sealed => ErrorCode::Sealed,
            Self::NoKey => ErrorCode::NoSiteKey,
            Self::WrongPassphrase => ErrorCode::WrongPassphrase,
            Self::Throttled(_) => ErrorCode::Throttled,
            Self::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::AlreadyExists(_) => ErrorCode::AlreadyExists,
            Self::Store(_) | Self::Crypto(_) => ErrorCode::Internal,
        }
    }
}

impl From<VaultError> for tonic::Status {
    fn from(e: VaultError) -> Self {
        match e.code() {
            ErrorCode::Internal => chipsite_proto::status::internal(&e),
            code => chipsite_proto::status::status(code, e.to_string()),
        }
    }
}

fn crypto(e: impl std::fmt::Display) -> VaultError {
    VaultError::Crypto(e.to_string())
}

/// The public state of the vault.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub has_key: bool,
    pub sealed: bool,
    pub site_public_key: Vec<u8>,
    pub site_key_pin: String,
    pub key_created_at_ms: i64,
    pub site_certificate: Vec<u8>,
}

struct Unsealed {
    key_id: i64,
    signer: Arc<KeyPair>,
}

#[derive(Default)]
struct Throttle {
    failures: u32,
    next_allowed: Option<tokio::time::Instant>,
}

pub struct KeyVault {
    db: DatabaseConnection,
    unsealed: RwLock<Option<Unsealed>>,
    throttle: Mutex<Throttle>,
    /// Held while the site key is created, imported or re-encrypted, so
    /// that two such changes cannot interleave.
    key_changes: Mutex<()>,
}

impl std::fmt::Debug for KeyVault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyVault").finish_non_exhaustive()
    }
}

impl KeyVault {
    /// Open the vault on `db`, creating its tables if needed. It starts sealed.
    pub async fn open(db: DatabaseConnection) -> Result<Self, VaultError> {
        chipsite_store::migrate::<store::Migrator>(&db).await?;
        Ok(Self {
            db,
            unsealed: RwLock::new(None),
            throttle: Mutex::new(Throttle::default()),
            key_changes: Mutex::new(()),
        })
    }

    async fn current(&self) -> Result<Option<site_key::Model>, VaultError> {
        Ok(site_key::Entity::find()
            .filter(site_key::Column::RetiredAtMs.is_null())
            .order_by_desc(site_key::Column::Id)
            .one(&self.db)
            .await?)
    }

    pub async fn status(&self) -> Result<Status, VaultError> {
        let current = self.current().await?;
        let unsealed = self.unsealed.read().await;
        Ok(match current {
            None => Status {
                sealed: true,
                ..Status::default()
            },
            Some(k) => Status {
                has_key: true,
                sealed: unsealed.as_ref().is_none_or(|u| u.key_id != k.id),
                site_key_pin: chipsite_tls::pin_of_spki(&k.public_key),
                site_public_key: k.public_key,
                key_created_at_ms: k.created_at_ms,
                site_certificate: k.certificate,
            },
        })
    }

    /// First launch: create a site key under `passphrase` unless one exists
    /// (nothing to prove then: there is no current key).
    /// Returns whether a key was created.
    pub async fn ensure_site_key(&self, passphrase: &str) -> Result<bool, VaultError> {
        if self.current().await?.is_some() {
            return Ok(false);
        }
        check_new_passphrase(passphrase)?;
        let _changing = self.key_changes.lock().await;
        let secret = SecretKey::try_generate().map_err(crypto)?;
        let encrypted_pem = encrypt(secret.clone(), passphrase).await?;
        self.install(encrypted_pem, &secret).await?;
        Ok(true)
    }

    /// Whoever replaces or exports the current key must hold its pass phrase
    /// (checked, and throttled, as an unseal is). With no key yet there is
    /// nothing to prove.
    async fn prove_current(&self, current_passphrase: &str) -> Result<(), VaultError> {
        if self.current().await?.is_none() {
            return Ok(());
        }
        self.open_current(current_passphrase).await.map(|_| ())
    }

    /// Generate a new site key, encrypted under `passphrase`; the old key is
    /// retired (its pass phrase, `current_passphrase`, is required). The
    /// vault is left unsealed with the new key.
    pub async fn create_site_key(
        &self,
        passphrase: &str,
        current_passphrase: &str,
    ) -> Result<Status, VaultError> {
        check_new_passphrase(passphrase)?;
        let _changing = self.key_changes.lock().await;
        self.prove_current(current_passphrase).await?;
        let secret = SecretKey::try_generate().map_err(crypto)?;
        let encrypted_pem = encrypt(secret.clone(), passphrase).await?;
        self.install(encrypted_pem, &secret).await
    }

    /// Replace the site key with an encrypted PKCS#8 PEM (P-256) opened by
    /// `passphrase`. The file's key-derivation parameters are bounded before
    /// anything is derived, and the key is stored re-encrypted under this
    /// vault's own parameters, never as given.
    /// The current key's pass phrase, `current_passphrase`, is required.
    pub async fn import_site_key(
        &self,
        encrypted_pem: &str,
        passphrase: &str,
        current_passphrase: &str,
    ) -> Result<Status, VaultError> {
        check_new_passphrase(passphrase)?;
        check_key_derivation(encrypted_pem)?;
        let _changing = self.key_changes.lock().await;
        self.prove_current(current_passphrase).await?;
        let secret = decrypt(encrypted_pem.to_owned(), passphrase).await.map_err(|e| match e {
            VaultError::WrongPassphrase => VaultError::InvalidArgument(
                "cannot open the key: it must be a P-256 key in encrypted PKCS#8 PEM and the pass phrase must match"
                    .into(),
            ),
            e => e,
        })?;
        let pem = encrypt(secret.clone(), passphrase).await?;
        self.install(pem, &secret).await
    }

    async fn install(&self, encrypted_pem: String, secret: &SecretKey) -> Result<Status, VaultError> {
        let signer = signer_of(secret)?;
        let public_key = secret
            .public_key()
            .to_public_key_der()
            .map_err(crypto)?
            .into_vec();
        let certificate = site_certificate(&signer)?;
        let now = now_ms();
        let txn = chipsite_store::begin_write(&self.db).await?;
        site_key::Entity::update_many()
            .col_expr(
                site_key::Column::RetiredAtMs,
                sea_orm::sea_query::Expr::value(now),
            )
            .filter(site_key::Column::RetiredAtMs.is_null())
            .exec(&txn)
            .await?;
        let row = site_key::ActiveModel {
            encrypted_pem: Set(encrypted_pem),
            public_key: Set(public_key),
            certificate: Set(certificate),
            created_at_ms: Set(now),
            retired_at_ms: Set(None),
            ..Default::default()
        }
        .insert(&txn)
        .await?;
        txn.commit().await?;
        *self.unsealed.write().await = Some(Unsealed {
            key_id: row.id,
            signer: Arc::new(signer),
        });
        tracing::info!(pin = %chipsite_tls::pin_of_spki(&row.public_key), "new site key installed");
        self.status().await
    }

    fn check_throttle(throttle: &Throttle) -> Result<(), VaultError> {
        if let Some(at) = throttle.next_allowed {
            let now = tokio::time::Instant::now();
            if at > now {
                return Err(VaultError::Throttled((at - now).as_secs().max(1)));
            }
        }
        Ok(())
    }

    fn record_attempt(throttle: &mut Throttle, ok: bool) {
        if ok {
            *throttle = Throttle::default();
            return;
        }
        throttle.failures = throttle.failures.saturating_add(1);
        if throttle.failures > FREE_FAILURES {
            let secs = 1u64 << (throttle.failures - FREE_FAILURES).min(6);
            throttle.next_allowed = Some(tokio::time::Instant::now() + Duration::from_secs(secs));
        }
        tracing::warn!(failures = throttle.failures, "wrong site key pass phrase");
    }

    /// Open the current key with `passphrase` (throttled after repeated
    /// failures). Attempts are serialized, so concurrent guesses cannot slip
    /// past the throttle.
    async fn open_current(&self, passphrase: &str) -> Result<(site_key::Model, SecretKey), VaultError> {
        let mut throttle = self.throttle.lock().await;
        Self::check_throttle(&throttle)?;
        let current = self.current().await?.ok_or(VaultError::NoKey)?;
        let result = decrypt(current.encrypted_pem.clone(), passphrase).await;
        Self::record_attempt(&mut throttle, result.is_ok());
        Ok((current, result?))
    }

    pub async fn unseal(&self, passphrase: &str) -> Result<Status, VaultError> {
        let (current, secret) = self.open_current(passphrase).await?;
        let signer = signer_of(&secret)?;
        *self.unsealed.write().await = Some(Unsealed {
            key_id: current.id,
            signer: Arc::new(signer),
        });
        tracing::info!("vault unsealed");
        self.status().await
    }

    pub async fn seal(&self) -> Result<Status, VaultError> {
        *self.unsealed.write().await = None;
        tracing::info!("vault sealed");
        self.status().await
    }

    /// Re-encrypt the current key under `new`. The key itself, and so every
    /// pin, ticket and peer relationship, is unchanged.
    pub async fn change_passphrase(&self, old: &str, new: &str) -> Result<Status, VaultError> {
        check_new_passphrase(new)?;
        let _changing = self.key_changes.lock().await;
        let (current, secret) = self.open_current(old).await?;
        let pem = encrypt(secret, new).await?;
        site_key::ActiveModel {
            id: Set(current.id),
            encrypted_pem: Set(pem),
            ..Default::default()
        }
        .update(&self.db)
        .await?;
        tracing::info!("site key pass phrase changed");
        self.status().await
    }

    /// The current key as stored: encrypted PKCS#8 PEM, for whoever holds
    /// its pass phrase (an exported key could otherwise be guessed at
    /// offline, around the unseal throttle).
    pub async fn export_site_key(&self, passphrase: &str) -> Result<String, VaultError> {
        let (current, _) = self.open_current(passphrase).await?;
        Ok(current.encrypted_pem)
    }

    async fn signer(&self) -> Result<(Arc<KeyPair>, Vec<u8>), VaultError> {
        let current = self.current().await?.ok_or(VaultError::NoKey)?;
        let unsealed = self.unsealed.read().await;
        match unsealed.as_ref() {
            Some(u) if u.key_id == current.id => Ok((u.signer.clone(), current.certificate)),
            _ => Err(VaultError::Sealed),
        }
    }

    /// Certify a gateway's TLS key (SPKI DER) with the site key, for at most
    /// [`MAX_SERVICE_CERT_TTL`]. Returns `[leaf, site certificate]` (DER) and
    /// the leaf's expiry.
    pub async fn issue_service_certificate(
        &self,
        public_key: &[u8],
        names: &[String],
        ttl: Duration,
    ) -> Result<(Vec<Vec<u8>>, i64), VaultError> {
        let (signer, site_cert) = self.signer().await?;
        PublicKey::from_public_key_der(public_key)
            .map_err(|_| VaultError::InvalidArgument("public_key must be a P-256 SPKI (DER)".into()))?;
        if names.is_empty() {
            return Err(VaultError::InvalidArgument(
                "at least one subject alternative name is required".into(),
            ));
        }
        let ttl = ttl.min(MAX_SERVICE_CERT_TTL).max(Duration::from_secs(60));
        let spki = SubjectPublicKeyInfo::from_der(public_key).map_err(crypto)?;
        let issuer = Issuer::from_ca_cert_der(&site_cert.clone().into(), signer.as_ref()).map_err(crypto)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(crypto)?;
        for name in names {
            params
                .subject_alt_names
                .push(match name.parse::<std::net::IpAddr>() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => SanType::DnsName(
                        name.clone()
                            .try_into()
                            .map_err(|_| VaultError::InvalidArgument(format!("bad name {name:?}")))?,
                    ),
                });
        }
        params
            .distinguished_name
            .push(DnType::CommonName, names[0].clone());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Gateways serve with it, and the peer gateway also dials peer sites
        // with it as its client certificate.
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::seconds(ttl.as_secs() as i64);
        let leaf = params.signed_by(&spki, &issuer).map_err(crypto)?;
        Ok((
            vec![leaf.der().to_vec(), site_cert],
            now_ms() + ttl.as_millis() as i64,
        ))
    }

    pub async fn register_user_key(&self, chip_id: &str, public_key: &[u8]) -> Result<bool, VaultError> {
        check_name("chip_id", chip_id, 64)?;
        check_public_key(public_key)?;
        let now = now_ms();
        let row = || user_key::ActiveModel {
            chip_id: Set(chip_id.to_owned()),
            public_key: Set(public_key.to_vec()),
            registered_at_ms: Set(now),
        };
        // A first key, as in every enrollment: one INSERT. A user with a key
        // meets the primary key instead, and the key is replaced.
        match user_key::Entity::insert(row())
            .exec_without_returning(&self.db)
            .await
        {
            Ok(_) => return Ok(false),
            Err(e) if chipsite_store::is_unique_violation(&e) => {}
            Err(e) => return Err(e.into()),
        }
        // Replaced in place; or, if it was deleted meanwhile, written anew.
        user_key::Entity::insert(row())
            .on_conflict(
                OnConflict::column(user_key::Column::ChipId)
                    .update_columns([user_key::Column::PublicKey, user_key::Column::RegisteredAtMs])
                    .to_owned(),
            )
            .exec_without_returning(&self.db)
            .await?;
        Ok(true)
    }

    /// Forget a user's key; whether there was one.
    pub async fn delete_user_key(&self, chip_id: &str) -> Result<bool, VaultError> {
        Ok(user_key::Entity::delete_by_id(chip_id.to_owned())
            .exec(&self.db)
            .await?
            .rows_affected
            > 0)
    }

    pub async fn user_key(&self, chip_id: &str) -> Result<user_key::Model, VaultError> {
        user_key::Entity::find_by_id(chip_id.to_owned())
            .one(&self.db)
            .await?
            .ok_or_else(|| VaultError::NotFound(format!("key of user {chip_id:?}")))
    }

    /// Which of `chip_ids` have a key.
    pub async fn users_with_keys(&self, chip_ids: &[String]) -> Result<Vec<String>, VaultError> {
        use sea_orm::QuerySelect;
        if chip_ids.is_empty() {
            return Ok(vec![]);
        }
        Ok(user_key::Entity::find()
            .select_only()
            .column(user_key::Column::ChipId)
            .filter(user_key::Column::ChipId.is_in(chip_ids.iter().cloned()))
            .into_tuple()
            .all(&self.db)
            .await?)
    }

    /// Remember a peer site's key for one of its users. A key learned once
    /// is never replaced by another (`AlreadyExists`): whoever holds a tally
    /// ticket could otherwise claim an existing peer's name and host and
    /// take its place. Registering the same key again only refreshes it.
    pub async fn register_peer_key(
        &self,
        chip_id: &str,
        host: &str,
        public_key: &[u8],
    ) -> Result<(), VaultError> {
        check_name("peer_chip_id", chip_id, 64)?;
        check_name("peer_host", host, 255)?;
        check_public_key(public_key)?;
        let row = peer_key::ActiveModel {
            peer_chip_id: Set(chip_id.to_owned()),
            peer_host: Set(host.to_owned()),
            public_key: Set(public_key.to_vec()),
            registered_at_ms: Set(now_ms()),
        };
        let inserted = peer_key::Entity::insert(row)
            .on_conflict(
                OnConflict::columns([peer_key::Column::PeerChipId, peer_key::Column::PeerHost])
                    .do_nothing()
                    .to_owned(),
            )
            .exec_without_returning(&self.db)
            .await?;
        if inserted == 0 {
            let known = self.peer_key(chip_id, host).await?;
            if known.public_key != public_key {
                return Err(VaultError::AlreadyExists(format!(
                    "peer {chip_id}@{host} is known with another site key"
                )));
            }
        }
        Ok(())
    }

    /// Every key learned for `chip_id`, at any host.
    pub async fn peer_keys(&self, chip_id: &str) -> Result<Vec<peer_key::Model>, VaultError> {
        use sea_orm::{ColumnTrait, QueryFilter};
        check_name("peer_chip_id", chip_id, 64)?;
        Ok(peer_key::Entity::find()
            .filter(peer_key::Column::PeerChipId.eq(chip_id))
            .all(&self.db)
            .await?)
    }

    pub async fn peer_key(&self, chip_id: &str, host: &str) -> Result<peer_key::Model, VaultError> {
        peer_key::Entity::find_by_id((chip_id.to_owned(), host.to_owned()))
            .one(&self.db)
            .await?
            .ok_or_else(|| VaultError::NotFound(format!("key of peer {chip_id}@{host}")))
    }
}

/// A new pass phrase: at least [`MIN_PASSPHRASE_LEN`] characters, at least
/// six different ones, and not a well-known password or phrase (compared
/// without case, spaces or punctuation).
pub fn check_new_passphrase(passphrase: &str) -> Result<(), VaultError> {
    if passphrase.chars().count() < MIN_PASSPHRASE_LEN {
        return Err(VaultError::InvalidArgument(format!(
            "the pass phrase must have at least {MIN_PASSPHRASE_LEN} characters"
        )));
    }
    let distinct: std::collections::BTreeSet<char> = passphrase.chars().collect();
    if distinct.len() < 6 {
        return Err(VaultError::InvalidArgument(
            "the pass phrase must use at least six different characters".into(),
        ));
    }
    let folded: String = passphrase
        .chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect();
    let common = COMMON_PHRASES.iter().any(|c| {
        // A common phrase, perhaps repeated or with a few digits after it.
        folded == *c || folded.trim_end_matches(|ch: char| ch.is_ascii_digit()) == *c || folded == c.repeat(2)
    });
    if common {
        return Err(VaultError::InvalidArgument(
            "the pass phrase is a well-known one: choose another".into(),
        ));
    }
    Ok(())
}

/// Well-known passwords and phrases, folded (lower case, letters and digits
/// only), refused as pass phrases whatever their length.
const COMMON_PHRASES: &[&str] = &[
    "password",
    "passphrase",
    "password1",
    "password123",
    "passw0rd",
    "123456789012",
    "123456789",
    "1234567890",
    "12345678",
    "qwertyuiop",
    "qwertyuiopasdfghjkl",
    "qwerty123456",
    "1q2w3e4r5t6y",
    "1qaz2wsx3edc",
    "asdfghjkl",
    "zxcvbnm",
    "iloveyou",
    "letmein",
    "welcome",
    "welcometo",
    "administrator",
    "admin",
    "adminadmin",
    "changeme",
    "changemeplease",
    "secret",
    "topsecret",
    "trustno1",
    "monkey",
    "dragon",
    "football",
    "baseball",
    "superman",
    "batman",
    "sunshine",
    "princess",
    "master",
    "shadow",
    "whatever",
    "starwars",
    "pokemon",
    "computer",
    "internet",
    "correcthorsebatterystaple",
    "thequickbrownfoxjumpsoverthelazydog",
    "opensesame",
    "letmeinplease",
    "mypassword",
    "mypassphrase",
    "thisismypassword",
    "thisismypassphrase",
    "sitekey",
    "sitekeypassphrase",
    "chipsite",
    "chipsitesitekey",
    "mychips",
    "chips",
    "abcdefghijkl",
    "abcdefghijklmnopqrstuvwxyz",
    "abc123456789",
    "aaaaaaaaaaaa",
    "hello",
    "helloworld",
    "testtest",
    "test1234",
    "testpassword",
    "default",
    "defaultpassword",
    "p4ssw0rd",
    "p455w0rd",
    "pa55word",
    "passwordpassword",
    "00000000",
    "11111111",
];

/// Names (CHIP IDs, hosts) are short printable text: anything else is a
/// clear error, not a database failure.
fn check_name(what: &str, value: &str, max: usize) -> Result<(), VaultError> {
    if value.is_empty() || value.len() > max || value.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(VaultError::InvalidArgument(format!(
            "{what} must be 1 to {max} printable characters"
        )));
    }
    Ok(())
}

fn check_public_key(spki: &[u8]) -> Result<(), VaultError> {
    PublicKey::from_public_key_der(spki)
        .map(|_| ())
        .map_err(|_| VaultError::InvalidArgument("public key must be a P-256 SPKI (DER)".into()))
}

/// Encrypt the key under `passphrase` as this vault stores keys (PBES2:
/// scrypt N = 2^14, r = 8, p = 1, AES-256-CBC), off the async threads.
async fn encrypt(secret: SecretKey, passphrase: &str) -> Result<String, VaultError> {
    let passphrase = Zeroizing::new(passphrase.to_owned());
    tokio::task::spawn_blocking(move || {
        secret
            .to_pkcs8_encrypted_pem(passphrase.as_bytes(), LineEnding::LF)
            .map(|p| p.to_string())
            .map_err(crypto)
    })
    .await
    .map_err(crypto)?
}

/// Bound what deriving the key of an imported file may cost: a file could
/// otherwise ask for terabytes of scrypt memory or a panic on N = 0.
fn check_key_derivation(pem: &str) -> Result<(), VaultError> {
    use p256::pkcs8::{Document, EncryptedPrivateKeyInfoRef, pkcs5::pbes2::Kdf};
    let bad = |why: &str| VaultError::InvalidArgument(format!("cannot import the key: {why}"));
    let (label, doc) = Document::from_pem(pem).map_err(|_| bad("it is not a PEM document"))?;
    if label != "ENCRYPTED PRIVATE KEY" {
        return Err(bad(
            "it must be encrypted PKCS#8 (BEGIN ENCRYPTED PRIVATE KEY); a site key is never taken in the clear",
        ));
    }
    let info = EncryptedPrivateKeyInfoRef::try_from(doc.as_bytes())
        .map_err(|_| bad("malformed encrypted PKCS#8"))?;
    let params = info
        .encryption_algorithm
        .pbes2()
        .ok_or_else(|| bad("only PBES2 encryption is accepted"))?;
    let ok = match &params.kdf {
        Kdf::Pbkdf2(p) => (1..=10_000_000).contains(&p.iteration_count),
        Kdf::Scrypt(p) => {
            let n = p.cost_parameter;
            n >= 2
                && n.is_power_of_two()
                && (1..=8).contains(&p.block_size)
                && (1..=4).contains(&p.parallelization)
                && n.saturating_mul(u64::from(p.block_size)) <= 1 << 19
        }
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(bad(
            "its key-derivation parameters are out of bounds (scrypt N·r ≤ 2^19, p ≤ 4; PBKDF2 ≤ 10,000,000 iterations)",
        ))
    }
}

/// Decrypt an encrypted PKCS#8 PEM off the async threads (scrypt is slow on purpose).
async fn decrypt(pem: String, passphrase: &str) -> Result<SecretKey, VaultError> {
    let passphrase = Zeroizing::new(passphrase.to_owned());
    tokio::task::spawn_blocking(move || {
        SecretKey::from_pkcs8_encrypted_pem(&pem, passphrase.as_bytes())
            .map_err(|_| VaultError::WrongPassphrase)
    })
    .await
    .map_err(crypto)?
}

fn signer_of(secret: &SecretKey) -> Result<KeyPair, VaultError> {
    let der = secret.to_pkcs8_der().map_err(crypto)?;
    KeyPair::try_from(der.as_bytes()).map_err(crypto)
}

/// The self-signed certificate of the site key: the anchor gateway
/// certificates chain to.
fn site_certificate(signer: &KeyPair) -> Result<Vec<u8>, VaultError> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(crypto)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "chipsite site key");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(3650);
    Ok(params.self_signed(signer).map_err(crypto)?.der().to_vec())
}

/// Serve key-vault on an already-bound `listener` over internal mutual TLS
/// (`tls`) until `shutdown`: the entry point of the same shape every service
/// crate has (its dependencies, its listener, its TLS material, a shutdown).
/// Each handler runs to completion even if its caller goes away.
pub async fn serve(
    vault: std::sync::Arc<KeyVault>,
    listener: tokio::net::TcpListener,
    tls: std::sync::Arc<chipsite_tls::ReloadableTls>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), chipsite_grpc_server::ServeError> {
    type S = chipsite_proto::keyvault::v1::key_vault_server::KeyVaultServer<KeyVaultGrpc>;
    let svc = S::new(KeyVaultGrpc(vault));
    chipsite_grpc_server::serve_with!([svc => S], policy(), true, listener, tls, shutdown)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// A vault on a real SQLite file of its own: cheaper than a whole site.
    async fn vault() -> (KeyVault, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let url = chipsite_store::sqlite_url(&dir.path().join("kv.sqlite"));
        let db = chipsite_store::connect(&url).await.unwrap();
        (KeyVault::open(db).await.unwrap(), dir)
    }

    /// Calls between services in one process skip TCP and TLS but make the
    /// same checks: the same policy answers, and a certificate that would
    /// fail the handshake (another CA, or a server that is not the one named)
    /// never takes the in-process path.
    #[tokio::test]
    async fn in_process_calls_make_the_checks_a_handshake_and_the_policy_make() {
        use chipsite_proto::keyvault::v1::{GetStatusRequest, key_vault_client::KeyVaultClient};
        use chipsite_tls::{CertificateAuthority, ReloadableTls, TlsMaterial, identity as id};
        chipsite_tls::install_crypto_provider();
        let tls = |ca: &CertificateAuthority, who: &str| {
            let c = ca.issue(who, &[], Duration::from_secs(3600)).unwrap();
            ReloadableTls::from_material(&TlsMaterial::from_pem(&c.cert_pem, &c.key_pem, &c.ca_pem).unwrap())
                .unwrap()
        };
        let site = CertificateAuthority::generate("site").unwrap();
        let rogue = CertificateAuthority::generate("site").unwrap();
        let (v, _dir) = vault().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let server = tokio::spawn(serve(
            Arc::new(v),
            listener,
            tls(&site, id::KEY_VAULT),
            async move {
                let _ = stopped.wait_for(|s| *s).await;
            },
        ));

        // An identity the policy allows: answered in-process (once the
        // server has registered; until then over TLS).
        let tally = chipsite_tls::connect_lazy(&addr, id::KEY_VAULT, tls(&site, id::TALLY)).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while tally.local_calls() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "no call was made in-process"
            );
            KeyVaultClient::new(tally.clone())
                .get_status(GetStatusRequest {})
                .await
                .unwrap();
        }

        // One it does not: the same refusal in-process as over TLS.
        let refusal = |e: tonic::Status| (e.code(), e.message().to_owned());
        let console = chipsite_tls::connect_lazy(&addr, id::KEY_VAULT, tls(&site, id::CONSOLE)).unwrap();
        let local = KeyVaultClient::new(console.clone())
            .get_status(GetStatusRequest {})
            .await
            .unwrap_err();
        assert_eq!(console.local_calls(), 1);
        let over_tls = chipsite_tls::connect_tls_lazy(&addr, id::KEY_VAULT, tls(&site, id::CONSOLE)).unwrap();
        let remote = KeyVaultClient::new(over_tls)
            .get_status(GetStatusRequest {})
            .await
            .unwrap_err();
        assert_eq!(refusal(local.clone()).0, tonic::Code::PermissionDenied);
        assert_eq!(refusal(local), refusal(remote));

        // A certificate from another CA naming an allowed identity, and a
        // server that is not the one named: never in-process, and refused.
        for channel in [
            chipsite_tls::connect_lazy(&addr, id::KEY_VAULT, tls(&rogue, id::TALLY)).unwrap(),
            chipsite_tls::connect_lazy(&addr, id::ADMIN, tls(&site, id::TALLY)).unwrap(),
        ] {
            assert!(
                KeyVaultClient::new(channel.clone())
                    .get_status(GetStatusRequest {})
                    .await
                    .is_err()
            );
            assert_eq!(channel.local_calls(), 0);
        }

        // A stopping server takes no more in-process calls.
        stop.send(true).unwrap();
        server.await.unwrap().unwrap();
        let before = tally.local_calls();
        let _ = KeyVaultClient::new(tally.clone())
            .get_status(GetStatusRequest {})
            .await;
        assert_eq!(tally.local_calls(), before);
    }

    /// A page of users' key status in one query: exactly those with a key.
    #[tokio::test]
    async fn users_with_keys_names_exactly_those_with_one() {
        use p256::pkcs8::EncodePublicKey;
        let (v, _dir) = vault().await;
        let spki = SecretKey::try_generate()
            .unwrap()
            .public_key()
            .to_public_key_der()
            .unwrap();
        v.register_user_key("alice", spki.as_bytes()).await.unwrap();
        v.register_user_key("carol", spki.as_bytes()).await.unwrap();
        let ids = ["alice", "bob", "carol"].map(str::to_owned);
        let mut with = v.users_with_keys(&ids).await.unwrap();
        with.sort();
        assert_eq!(with, ["alice", "carol"]);
        assert!(v.users_with_keys(&[]).await.unwrap().is_empty());
        assert!(v.users_with_keys(&["bob".to_owned()]).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn the_site_key_seals_unseals_and_keeps_its_pin_across_a_new_pass_phrase() {
        let (v, _dir) = vault().await;
        assert!(matches!(v.unseal("anything").await, Err(VaultError::NoKey)));
        assert!(v.ensure_site_key("first pass phrase").await.unwrap());
        assert!(
            !v.ensure_site_key("first pass phrase").await.unwrap(),
            "only once"
        );
        let created = v.status().await.unwrap();
        assert!(created.has_key && !created.sealed);

        let sealed = v.seal().await.unwrap();
        assert!(sealed.sealed);
        assert!(matches!(
            v.issue_service_certificate(&[1, 2, 3], &["user-gateway".to_owned()], Duration::from_secs(60))
                .await,
            Err(VaultError::Sealed)
        ));
        assert!(matches!(
            v.unseal("wrong").await,
            Err(VaultError::WrongPassphrase)
        ));
        assert!(
            v.status().await.unwrap().sealed,
            "a wrong pass phrase keeps it sealed"
        );
        assert!(!v.unseal("first pass phrase").await.unwrap().sealed);

        v.change_passphrase("first pass phrase", "second pass phrase")
            .await
            .unwrap();
        v.seal().await.unwrap();
        assert!(matches!(
            v.unseal("first pass phrase").await,
            Err(VaultError::WrongPassphrase)
        ));
        let reopened = v.unseal("second pass phrase").await.unwrap();
        assert_eq!(
            reopened.site_key_pin, created.site_key_pin,
            "the key itself is unchanged"
        );
    }

    #[tokio::test]
    async fn repeated_wrong_pass_phrases_are_spaced_out() {
        let (v, _dir) = vault().await;
        v.ensure_site_key("right pass phrase").await.unwrap();
        v.seal().await.unwrap();
        let mut throttled = false;
        for _ in 0..=FREE_FAILURES + 1 {
            match v.unseal("wrong").await {
                Err(VaultError::WrongPassphrase) => {}
                Err(VaultError::Throttled(secs)) => {
                    assert!(secs >= 1);
                    throttled = true;
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(throttled, "after {FREE_FAILURES} free failures, attempts wait");
        assert!(
            matches!(v.unseal("right pass phrase").await, Err(VaultError::Throttled(_))),
            "even the right one waits its turn"
        );
    }

    #[test]
    fn every_error_has_a_site_code() {
        use chipsite_proto::status::{code_of, grpc_code};
        for e in [
            VaultError::Sealed,
            VaultError::NoKey,
            VaultError::WrongPassphrase,
            VaultError::Throttled(3),
            VaultError::InvalidArgument("x".into()),
            VaultError::NotFound("x".into()),
            VaultError::Crypto("secret detail".into()),
        ] {
            let code = e.code();
            let status = tonic::Status::from(e);
            assert_eq!(code_of(&status), code);
            assert_eq!(status.code(), grpc_code(code));
            if code == ErrorCode::Internal {
                assert_eq!(status.message(), "internal error");
            }
        }
    }
}
