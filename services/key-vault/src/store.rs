//! key-vault's tables: the site key (encrypted PKCS#8 only), users' public
//! keys, known peer-site keys.

use sea_orm_migration::prelude::*;

pub mod site_key {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "keyvault_site_keys")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        /// Encrypted PKCS#8 PEM. Never the clear key.
        #[sea_orm(column_type = "Text")]
        pub encrypted_pem: String,
        /// SPKI DER.
        pub public_key: Vec<u8>,
        /// Self-signed certificate of the site key (DER).
        pub certificate: Vec<u8>,
        pub created_at_ms: i64,
        pub retired_at_ms: Option<i64>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod user_key {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "keyvault_user_keys")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub chip_id: String,
        pub public_key: Vec<u8>,
        pub registered_at_ms: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod peer_key {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "keyvault_peer_keys")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub peer_chip_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub peer_host: String,
        pub public_key: Vec<u8>,
        pub registered_at_ms: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

#[derive(DeriveIden)]
struct KeyvaultMigrations;

#[derive(DeriveIden)]
enum KeyvaultSiteKeys {
    Table,
    Id,
    EncryptedPem,
    PublicKey,
    Certificate,
    CreatedAtMs,
    RetiredAtMs,
}

#[derive(DeriveIden)]
enum KeyvaultUserKeys {
    Table,
    ChipId,
    PublicKey,
    RegisteredAtMs,
}

#[derive(DeriveIden)]
enum KeyvaultPeerKeys {
    Table,
    PeerChipId,
    PeerHost,
    PublicKey,
    RegisteredAtMs,
}

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(M0001Initial)]
    }

    fn migration_table_name() -> DynIden {
        KeyvaultMigrations.into_iden()
    }
}

struct M0001Initial;

impl MigrationName for M0001Initial {
    fn name(&self) -> &str {
        "m0001_keyvault_initial"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for M0001Initial {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(KeyvaultSiteKeys::Table)
                    .col(
                        ColumnDef::new(KeyvaultSiteKeys::Id)
                            .big_integer()
                            .not_null()
                            .auto_increment()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(KeyvaultSiteKeys::EncryptedPem).text().not_null())
                    .col(ColumnDef::new(KeyvaultSiteKeys::PublicKey).blob().not_null())
                    .col(ColumnDef::new(KeyvaultSiteKeys::Certificate).blob().not_null())
                    .col(
                        ColumnDef::new(KeyvaultSiteKeys::CreatedAtMs)
                            .big_integer()
                            .not_null(),
                    )
                    .col(ColumnDef::new(KeyvaultSiteKeys::RetiredAtMs).big_integer().null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(KeyvaultUserKeys::Table)
                    .col(
                        ColumnDef::new(KeyvaultUserKeys::ChipId)
                            .string_len(64)
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(KeyvaultUserKeys::PublicKey).blob().not_null())
                    .col(
                        ColumnDef::new(KeyvaultUserKeys::RegisteredAtMs)
                            .big_integer()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(KeyvaultPeerKeys::Table)
                    .col(
                        ColumnDef::new(KeyvaultPeerKeys::PeerChipId)
                            .string_len(64)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(KeyvaultPeerKeys::PeerHost)
                            .string_len(255)
                            .not_null(),
                    )
                    .col(ColumnDef::new(KeyvaultPeerKeys::PublicKey).blob().not_null())
                    .col(
                        ColumnDef::new(KeyvaultPeerKeys::RegisteredAtMs)
                            .big_integer()
                            .not_null(),
                    )
                    .primary_key(
                        Index::create()
                            .col(KeyvaultPeerKeys::PeerChipId)
                            .col(KeyvaultPeerKeys::PeerHost),
                    )
                    .to_owned(),
            )
            .await?;
        Ok(())
    }
}
