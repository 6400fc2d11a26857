//! chipsite's internal gRPC API, generated from `proto/` at build time.

#![allow(clippy::all, missing_docs)]

pub mod keyvault {
    pub mod v1 {
        tonic::include_proto!("chipsite.keyvault.v1");
    }
}
pub mod ticket {
    pub mod v1 {
        tonic::include_proto!("chipsite.ticket.v1");
    }
}
pub mod admin {
    pub mod v1 {
        tonic::include_proto!("chipsite.admin.v1");
    }
}
pub mod events {
    pub mod v1 {
        tonic::include_proto!("chipsite.events.v1");
    }
}
pub mod peer {
    pub mod v1 {
        tonic::include_proto!("chipsite.peer.v1");
    }
}
pub mod tally {
    pub mod v1 {
        tonic::include_proto!("chipsite.tally.v1");
    }
}

/// Encoded `FileDescriptorSet` of every chipsite proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/chipsite_descriptor.bin"));

/// `Debug` for messages that carry a secret (see `SECRET_MESSAGES` in
/// build.rs): every field but the secret ones.
mod secret_messages;
pub mod status;

pub use secret_messages::SECRET_MESSAGES;

macro_rules! redacted_debug {
    ($($ty:path { $($field:ident),* $(,)? } redacting [$($secret:ident),*];)*) => {$(
        impl std::fmt::Debug for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let mut d = f.debug_struct(stringify!($ty));
                $(d.field(stringify!($field), &self.$field);)*
                $(d.field(stringify!($secret), &"<redacted>");)*
                d.finish()
            }
        }
    )*};
}

redacted_debug! {
    keyvault::v1::UnsealRequest {} redacting [passphrase];
    keyvault::v1::CreateSiteKeyRequest {} redacting [passphrase, current_passphrase];
    keyvault::v1::ChangePassphraseRequest {} redacting [old_passphrase, new_passphrase];
    keyvault::v1::ImportSiteKeyRequest { encrypted_pem } redacting [passphrase, current_passphrase];
    keyvault::v1::ExportSiteKeyRequest {} redacting [passphrase];
    ticket::v1::IssuedTicket { info, site_key_pin } redacting [token];
    ticket::v1::RedeemTicketRequest { kind, chip_id, source, refusal } redacting [token];
    admin::v1::UnsealVaultRequest {} redacting [passphrase];
    admin::v1::CreateSiteKeyRequest {} redacting [passphrase, current_passphrase];
    admin::v1::ChangePassphraseRequest {} redacting [old_passphrase, new_passphrase];
    admin::v1::ImportSiteKeyRequest { encrypted_pem } redacting [passphrase, current_passphrase];
    admin::v1::ExportSiteKeyRequest {} redacting [passphrase];
    admin::v1::StartPeerServerRequest {} redacting [passphrase];
    admin::v1::IssuedTicketView { ticket_id, chip_id, expires_at_ms } redacting [json, uri];
    admin::v1::ConsoleTicket { ticket_id, expires_at_ms } redacting [url];
    peer::v1::RedeemTallyTicketRequest { chip_id, source } redacting [ticket];
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]

    /// Every message with a field that holds a pass phrase or a token is
    /// redacted; found by walking the descriptors, so a new one cannot be
    /// forgotten.
    #[test]
    fn every_message_with_a_secret_field_is_redacted() {
        use prost::Message;
        let set = prost_types::FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET).expect("descriptors");
        let mut secret = vec![];
        for file in &set.file {
            for message in &file.message_type {
                let name = format!(".{}.{}", file.package(), message.name());
                let holds_secret = message.field.iter().any(|f| {
                    let n = f.name();
                    n.contains("passphrase") || (n.contains("token") && !n.ends_with("page_token"))
                });
                if holds_secret {
                    secret.push(name);
                }
            }
        }
        assert!(
            secret.len() >= 10,
            "the walk finds the secret messages: {secret:?}"
        );
        for name in &secret {
            assert!(
                super::SECRET_MESSAGES.contains(&name.as_str()),
                "{name} is not redacted"
            );
        }
        let import = super::admin::v1::ImportSiteKeyRequest {
            encrypted_pem: "-----BEGIN ENCRYPTED PRIVATE KEY-----".into(),
            passphrase: "s3cret pass".into(),
            current_passphrase: "s3cret current".into(),
        };
        let export = super::admin::v1::ExportSiteKeyRequest {
            passphrase: "s3cret pass".into(),
        };
        for shown in [format!("{import:?}"), format!("{export:?}")] {
            assert!(
                !shown.contains("s3cret") && shown.contains("<redacted>"),
                "{shown}"
            );
        }
    }

    #[test]
    fn secrets_do_not_show_in_debug_output() {
        let redeem = super::ticket::v1::RedeemTicketRequest {
            token: "s3cret-token".into(),
            chip_id: "alice".into(),
            ..Default::default()
        };
        let unseal = super::admin::v1::UnsealVaultRequest {
            passphrase: "s3cret pass".into(),
        };
        for shown in [format!("{redeem:?}"), format!("{unseal:?}")] {
            assert!(!shown.contains("s3cret"), "{shown}");
            assert!(shown.contains("<redacted>"), "{shown}");
        }
        assert!(format!("{redeem:?}").contains("alice"));
    }
}
