//! The key-vault: sealing, pass phrases, gateway certificates, and key
//! files that interoperate with the `openssl` command both ways.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use chipsite_e2e::{Store, TestSite, openssl, openssl_ok, store_test};
use chipsite_proto::{admin::v1 as pb, keyvault::v1 as kv};
use chipsite_tls::identity as id;
use tonic::Code;

fn gateway_key_spki() -> Vec<u8> {
    // A fresh P-256 key made by openssl, as a gateway would make its own.
    let dir = tempfile::tempdir().unwrap();
    let key = path(&dir, "gw.key");
    openssl_ok(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        &key,
    ]);
    openssl_ok(&["pkey", "-pubout", "-outform", "DER", "-in", &key])
}

fn path(dir: &tempfile::TempDir, name: &str) -> String {
    dir.path().join(name).to_str().unwrap().to_owned()
}

fn cert_request(spki: &[u8]) -> kv::IssueServiceCertificateRequest {
    kv::IssueServiceCertificateRequest {
        public_key: spki.to_vec(),
        subject_alt_names: vec!["localhost".into(), "127.0.0.1".into()],
        ttl_seconds: 3600,
    }
}

store_test!(sealed_vault_refuses_signing_and_wrong_pass_phrases_keep_it_sealed);
async fn sealed_vault_refuses_signing_and_wrong_pass_phrases_keep_it_sealed(store: Store) {
    let site = TestSite::start(&store).await;
    let mut admin = site.admin();
    let mut gateway = site.key_vault_as(id::USER_GATEWAY);
    let spki = gateway_key_spki();
    let pass = std::fs::read_to_string(chipsite_site::dev::passphrase_path(&site.data_dir())).unwrap();

    // Unsealed: the gateway gets [leaf, site certificate], the leaf signed by the site key.
    let issued = gateway
        .issue_service_certificate(cert_request(&spki))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(issued.chain.len(), 2);
    let dir = tempfile::tempdir().unwrap();
    let (leaf, root) = (path(&dir, "leaf.der"), path(&dir, "site.der"));
    std::fs::write(&leaf, &issued.chain[0]).unwrap();
    std::fs::write(&root, &issued.chain[1]).unwrap();
    let (leaf_pem, root_pem) = (path(&dir, "leaf.pem"), path(&dir, "site.pem"));
    openssl_ok(&["x509", "-inform", "DER", "-in", &leaf, "-out", &leaf_pem]);
    openssl_ok(&["x509", "-inform", "DER", "-in", &root, "-out", &root_pem]);
    // openssl verifies the gateway leaf against the site key's certificate.
    openssl_ok(&["verify", "-CAfile", &root_pem, &leaf_pem]);
    let status = gateway
        .get_status(kv::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!status.sealed && status.site_key_pin.starts_with("sha256//"));

    // Bad requests are clear errors.
    let e = gateway
        .issue_service_certificate(cert_request(b"not a key"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    admin.seal_vault(pb::SealVaultRequest {}).await.unwrap();
    let e = gateway
        .issue_service_certificate(cert_request(&spki))
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::FailedPrecondition,
        "sealed vault refuses signing work"
    );

    let e = admin
        .unseal_vault(pb::UnsealVaultRequest {
            passphrase: "wrong".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        admin
            .get_vault_status(pb::GetVaultStatusRequest {})
            .await
            .unwrap()
            .into_inner()
            .sealed
    );
    admin
        .unseal_vault(pb::UnsealVaultRequest {
            passphrase: pass.clone(),
        })
        .await
        .unwrap();
    assert!(
        !admin
            .get_vault_status(pb::GetVaultStatusRequest {})
            .await
            .unwrap()
            .into_inner()
            .sealed
    );

    // Repeated wrong pass phrases are throttled (even the right one must wait).
    for _ in 0..4 {
        let _ = admin
            .unseal_vault(pb::UnsealVaultRequest {
                passphrase: "wrong".into(),
            })
            .await;
    }
    let e = admin
        .unseal_vault(pb::UnsealVaultRequest {
            passphrase: pass.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());

    let audit = admin
        .list_audit(pb::ListAuditRequest {
            limit: 100,
            source: "admin".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let failed = audit
        .into_inner()
        .entries
        .into_iter()
        .filter(|e| e.action == "unseal_vault" && e.outcome.starts_with("PermissionDenied"))
        .count();
    assert!(failed >= 4, "wrong pass phrases are audited");
    let stored = site.stored_bytes().await;
    assert!(
        !stored.windows(pass.len()).any(|w| w == pass.as_bytes()),
        "pass phrase not stored"
    );
    site.finish().await;
}

store_test!(pass_phrase_change_new_key_and_openssl_interop);
async fn pass_phrase_change_new_key_and_openssl_interop(store: Store) {
    let site = TestSite::start(&store).await;
    let mut admin = site.admin();
    let mut vault = site.key_vault_as(id::ADMIN);
    let pass = std::fs::read_to_string(chipsite_site::dev::passphrase_path(&site.data_dir())).unwrap();
    let before = admin
        .get_vault_status(pb::GetVaultStatusRequest {})
        .await
        .unwrap()
        .into_inner();

    let e = admin
        .change_passphrase(pb::ChangePassphraseRequest {
            old_passphrase: pass.clone(),
            new_passphrase: "short".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let after = admin
        .change_passphrase(pb::ChangePassphraseRequest {
            old_passphrase: pass.clone(),
            new_passphrase: "plum orchard lantern seven".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        after.site_key_pin, before.site_key_pin,
        "a new pass phrase keeps the key"
    );
    admin.seal_vault(pb::SealVaultRequest {}).await.unwrap();
    let e = admin
        .unseal_vault(pb::UnsealVaultRequest {
            passphrase: pass.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::PermissionDenied,
        "the old pass phrase no longer opens it"
    );
    admin
        .unseal_vault(pb::UnsealVaultRequest {
            passphrase: "plum orchard lantern seven".into(),
        })
        .await
        .unwrap();

    // What we store, openssl opens; only for whoever holds the pass phrase.
    let e = vault
        .export_site_key(kv::ExportSiteKeyRequest {
            passphrase: pass.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::PermissionDenied,
        "export needs the current pass phrase"
    );
    let pem = vault
        .export_site_key(kv::ExportSiteKeyRequest {
            passphrase: "plum orchard lantern seven".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .encrypted_pem;
    assert!(pem.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----"));
    let dir = tempfile::tempdir().unwrap();
    let file = path(&dir, "site.key");
    std::fs::write(&file, &pem).unwrap();
    let opened = openssl_ok(&[
        "pkey",
        "-passin",
        "pass:plum orchard lantern seven",
        "-pubout",
        "-outform",
        "DER",
        "-in",
        &file,
    ]);
    let spki = vault
        .get_status(kv::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .site_public_key;
    assert_eq!(
        opened, spki,
        "openssl opens our key and finds the site public key in it"
    );
    assert!(
        !openssl(&["pkey", "-passin", "pass:wrong", "-in", &file])
            .status
            .success()
    );

    // What openssl encrypts, we load: PBES2 with PBKDF2, and with scrypt.
    let (plain, pbkdf2, scrypt) = (
        path(&dir, "plain.key"),
        path(&dir, "pbkdf2.key"),
        path(&dir, "scrypt.key"),
    );
    openssl_ok(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        &plain,
    ]);
    openssl_ok(&[
        "pkcs8",
        "-topk8",
        "-v2",
        "aes-256-cbc",
        "-passout",
        "pass:openssl pass",
        "-in",
        &plain,
        "-out",
        &pbkdf2,
    ]);
    openssl_ok(&[
        "pkcs8",
        "-topk8",
        "-v2",
        "aes-256-cbc",
        "-scrypt",
        "-passout",
        "pass:openssl pass",
        "-in",
        &plain,
        "-out",
        &scrypt,
    ]);
    let plain_spki = openssl_ok(&["pkey", "-pubout", "-outform", "DER", "-in", &plain]);
    let mut current = "plum orchard lantern seven";
    for file in [&pbkdf2, &scrypt] {
        let pem = std::fs::read_to_string(file).unwrap();
        let import = |passphrase: &str, current: &str| kv::ImportSiteKeyRequest {
            encrypted_pem: pem.clone(),
            passphrase: passphrase.into(),
            current_passphrase: current.into(),
        };
        let e = vault.import_site_key(import("nope", current)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        let e = vault
            .import_site_key(import("openssl pass", "not the current one"))
            .await
            .unwrap_err();
        assert_eq!(
            e.code(),
            Code::PermissionDenied,
            "import needs the current pass phrase"
        );
        let s = vault
            .import_site_key(import("openssl pass", current))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            s.site_public_key, plain_spki,
            "the imported key is the site key now"
        );
        assert!(!s.sealed);
        current = "openssl pass";
    }
    // A file whose key derivation is out of bounds is refused before any
    // derivation runs (scrypt N patched from 2^14 to 2^14 + 1).
    let der = openssl_ok(&[
        "pkcs8",
        "-topk8",
        "-v2",
        "aes-256-cbc",
        "-scrypt",
        "-passout",
        "pass:openssl pass",
        "-in",
        &plain,
        "-outform",
        "DER",
    ]);
    let at = der
        .windows(4)
        .position(|w| w == [0x02, 0x02, 0x40, 0x00])
        .expect("scrypt N = 16384 in the DER");
    let mut patched = der.clone();
    patched[at + 3] = 0x01;
    let patched_der = path(&dir, "patched.der");
    std::fs::write(&patched_der, &patched).unwrap();
    let pem_text = {
        use std::fmt::Write;
        let b64 = openssl_ok(&["base64", "-in", &patched_der]);
        let mut s = String::from("-----BEGIN ENCRYPTED PRIVATE KEY-----\n");
        let _ = write!(s, "{}", String::from_utf8(b64).unwrap());
        s.push_str("-----END ENCRYPTED PRIVATE KEY-----\n");
        s
    };
    let e = vault
        .import_site_key(kv::ImportSiteKeyRequest {
            encrypted_pem: pem_text,
            passphrase: "openssl pass".into(),
            current_passphrase: current.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("out of bounds"), "{}", e.message());
    // An unencrypted key is refused: the site key is never stored in the clear.
    let e = vault
        .import_site_key(kv::ImportSiteKeyRequest {
            encrypted_pem: std::fs::read_to_string(&plain).unwrap(),
            passphrase: String::new(),
            current_passphrase: current.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // A new site key: a new pin, the vault unsealed with it.
    let old_pin = admin
        .get_vault_status(pb::GetVaultStatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .site_key_pin;
    let create = |new: &str, current: &str| pb::CreateSiteKeyRequest {
        passphrase: new.into(),
        current_passphrase: current.into(),
    };
    // Not without the current pass phrase; not a weak or well-known new one.
    let e = admin
        .create_site_key(create("another long pass phrase", "not the current one"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    for (weak, why) in [
        ("eleven char", "at least 12"),
        ("abababababababab", "six different"),
        ("Correct Horse Battery Staple", "well-known"),
        ("password1234", "well-known"),
    ] {
        let e = admin.create_site_key(create(weak, current)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{weak}");
        assert!(e.message().contains(why), "{weak}: {}", e.message());
    }
    let unchanged = admin
        .get_vault_status(pb::GetVaultStatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .site_key_pin;
    assert_eq!(unchanged, old_pin, "nothing refused replaced the key");
    let s = admin
        .create_site_key(create("another long pass phrase", current))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(s.site_key_pin, old_pin);
    assert!(!s.sealed && s.has_key);
    site.finish().await;
}

store_test!(a_user_key_is_registered_replaced_and_registered_again);
/// RegisterUserKey: a first key is new, another replaces it (and says
/// so), and after the key is forgotten the next one is new again.
async fn a_user_key_is_registered_replaced_and_registered_again(store: Store) {
    let site = TestSite::start(&store).await;
    site.create_user("alice").await;
    let mut vault = site.key_vault_as(id::USER_GATEWAY);
    let (first, second) = (gateway_key_spki(), gateway_key_spki());
    let mut register = async |key: &[u8]| {
        vault
            .register_user_key(kv::RegisterUserKeyRequest {
                chip_id: "alice".into(),
                public_key: key.to_vec(),
            })
            .await
            .unwrap()
            .into_inner()
            .replaced
    };
    assert!(!register(&first).await, "[{}] a first key", store.label());
    assert!(register(&second).await, "another key replaces it");
    assert!(register(&second).await, "the same key again: replaced by itself");
    let held = site
        .key_vault_as(id::ADMIN)
        .get_user_key(kv::GetUserKeyRequest {
            chip_id: "alice".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .public_key;
    assert_eq!(held, second);
    site.key_vault_as(id::ADMIN)
        .delete_user_key(kv::GetUserKeyRequest {
            chip_id: "alice".into(),
        })
        .await
        .unwrap();
    assert!(!register(&first).await, "forgotten, then new again");
    site.finish().await;
}
