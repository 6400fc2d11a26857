//! The internal certificate authority (made by `chipsite dev`, or by an
//! operator for production) and helpers to read certificates.

use std::{net::IpAddr, time::Duration};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::{TRUST_DOMAIN, TlsError, service_dns_name, spiffe_uri};

/// A certificate and its private key, PEM, with the CA certificate that issued it.
#[derive(Clone)]
pub struct IssuedCertificate {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

impl std::fmt::Debug for IssuedCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCertificate")
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// The site's internal CA.
pub struct CertificateAuthority {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority").finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// A new P-256 CA valid for ten years.
    pub fn generate(site_name: &str) -> Result<Self, TlsError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("chipsite internal CA ({site_name})"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(3650);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Load a CA from its certificate and key (PEM).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            issuer,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PEM. Only `chipsite dev` writes it (to its data
    /// directory, mode 0600); production keeps the CA offline.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Issue a certificate for an internal identity, usable as both a TLS
    /// server and client certificate.
    pub fn issue(
        &self,
        identity: &str,
        extra_names: &[String],
        validity: Duration,
    ) -> Result<IssuedCertificate, TlsError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut names = vec![service_dns_name(identity), "localhost".to_owned()];
        names.extend(
            extra_names
                .iter()
                .filter(|n| n.parse::<IpAddr>().is_err())
                .cloned(),
        );
        let mut params = CertificateParams::new(names)?;
        params
            .subject_alt_names
            .push(SanType::URI(spiffe_uri(identity).try_into()?));
        let mut ips: Vec<IpAddr> = vec![[127, 0, 0, 1].into(), std::net::Ipv6Addr::LOCALHOST.into()];
        ips.extend(extra_names.iter().filter_map(|n| n.parse::<IpAddr>().ok()));
        params
            .subject_alt_names
            .extend(ips.into_iter().map(SanType::IpAddress));
        params.distinguished_name.push(DnType::CommonName, identity);
        params
            .distinguished_name
            .push(DnType::OrganizationName, TRUST_DOMAIN);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        // At most a hundred years: the date arithmetic below cannot overflow.
        let seconds = validity.as_secs().min(100 * 365 * 24 * 3600);
        params.not_after = now + time::Duration::seconds(i64::try_from(seconds).unwrap_or(0));
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCertificate {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            ca_pem: self.cert_pem.clone(),
        })
    }
}

/// The internal identity a certificate names (`spiffe://chipsite.internal/<id>`).
pub fn identity_of(cert_der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(cert_der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let prefix = format!("spiffe://{TRUST_DOMAIN}/");
    san.value.general_names.iter().find_map(|name| match name {
        GeneralName::URI(uri) => uri.strip_prefix(prefix.as_str()).map(str::to_owned),
        _ => None,
    })
}

pub use chipsite_model::pin_of_spki;
