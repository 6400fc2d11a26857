//! The peer gateway's tables: the links between local users and users on
//! other sites (who may keep tallies with whom, and where to reach them).
//! Keys are key-vault's; tallies (next) the tally service's.

use sea_orm_migration::prelude::*;

pub mod link {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "peer_links")]
    pub struct Model {
        /// The local user.
        #[sea_orm(primary_key, auto_increment = false)]
        pub chip_id: String,
        /// The user on the other site.
        #[sea_orm(primary_key, auto_increment = false)]
        pub peer_chip_id: String,
        /// Where the other site's peer gateway listens (as it said, or as its
        /// ticket said).
        pub peer_host: String,
        pub peer_port: i32,
        /// The other site's key (SPKI DER) and its pin: the other site is
        /// this key, wherever it listens.
        pub peer_site_key: Vec<u8>,
        #[sea_orm(primary_key, auto_increment = false)]
        pub peer_site_pin: String,
        /// "issued" (the other site redeemed our user's ticket) or "redeemed".
        pub via: String,
        pub created_at_ms: i64,
        pub updated_at_ms: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

#[derive(DeriveIden)]
struct PeerMigrations;

#[derive(DeriveIden)]
enum PeerLinks {
    Table,
    ChipId,
    PeerChipId,
    PeerHost,
    PeerPort,
    PeerSiteKey,
    PeerSitePin,
    Via,
    CreatedAtMs,
    UpdatedAtMs,
}

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(M0001Initial)]
    }

    fn migration_table_name() -> DynIden {
        PeerMigrations.into_iden()
    }
}

struct M0001Initial;

impl MigrationName for M0001Initial {
    fn name(&self) -> &str {
        "m0001_peer_initial"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for M0001Initial {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(PeerLinks::Table)
                    .col(ColumnDef::new(PeerLinks::ChipId).string_len(64).not_null())
                    .col(ColumnDef::new(PeerLinks::PeerChipId).string_len(64).not_null())
                    .col(ColumnDef::new(PeerLinks::PeerHost).string_len(255).not_null())
                    .col(ColumnDef::new(PeerLinks::PeerPort).integer().not_null())
                    .col(ColumnDef::new(PeerLinks::PeerSiteKey).blob().not_null())
                    .col(ColumnDef::new(PeerLinks::PeerSitePin).string_len(64).not_null())
                    .col(ColumnDef::new(PeerLinks::Via).string_len(16).not_null())
                    .col(ColumnDef::new(PeerLinks::CreatedAtMs).big_integer().not_null())
                    .col(ColumnDef::new(PeerLinks::UpdatedAtMs).big_integer().not_null())
                    // The key is part of the table itself: an SQLite
                    // connection that read the schema before a later
                    // CREATE INDEX would refuse an ON CONFLICT naming it.
                    .primary_key(
                        Index::create()
                            .col(PeerLinks::ChipId)
                            .col(PeerLinks::PeerChipId)
                            .col(PeerLinks::PeerSitePin),
                    )
                    .to_owned(),
            )
            .await?;
        Ok(())
    }
}
