//! The tally service's tables: tallies, their signed steps, and the outbox
//! of the local users' steps on their way to the other site.

use sea_orm_migration::prelude::*;

pub mod tally {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "tally_tallies")]
    pub struct Model {
        /// The offerer's id (`tly_…`), the same on both sites.
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        /// The local user, the user on the other site and its site's pin.
        pub chip_id: String,
        pub peer_chip_id: String,
        pub peer_site_pin: String,
        /// "offerer" or "recipient".
        pub role: String,
        /// "offered", "open", "rejected" or "closed".
        pub state: String,
        /// The offer's terms, canonical JSON.
        pub terms: String,
        /// The local user's last step on its way (see the proto's Tally.delivery).
        pub delivery: String,
        pub created_at_ms: i64,
        pub updated_at_ms: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod step {
    use sea_orm::entity::prelude::*;

    /// A signed step as it was received or submitted, never changed.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "tally_steps")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub tally_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub seq: i32,
        /// The signer's site pin: two closes at once (one per side) are two steps.
        #[sea_orm(primary_key, auto_increment = false)]
        pub signer_site_pin: String,
        pub signer_chip_id: String,
        /// "offer", "accept", "reject" or "close".
        pub kind: String,
        /// The canonical document, its signature and the signer's key.
        pub doc: String,
        pub sig: String,
        pub signer_key: Vec<u8>,
        pub hash: String,
        /// The state the step left the tally in.
        pub state_after: String,
        pub recorded_at_ms: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod outbox {
    use sea_orm::entity::prelude::*;

    /// A local user's step to deliver to the other site.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "tally_outbox")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        #[sea_orm(unique)]
        pub idempotency_key: String,
        pub tally_id: String,
        pub seq: i32,
        pub chip_id: String,
        pub peer_chip_id: String,
        pub peer_site_pin: String,
        /// The envelope, as the peer method carries it.
        pub step: String,
        /// "pending", "delivered" or "refused".
        pub state: String,
        pub attempts: i32,
        /// Not before this time (a backoff, or another delivery's lease).
        pub next_at_ms: i64,
        pub last_error: String,
        pub created_at_ms: i64,
        pub settled_at_ms: Option<i64>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

#[derive(DeriveIden)]
struct TallyMigrations;

#[derive(DeriveIden)]
enum TallyTallies {
    Table,
    Id,
    ChipId,
    PeerChipId,
    PeerSitePin,
    Role,
    State,
    Terms,
    Delivery,
    CreatedAtMs,
    UpdatedAtMs,
}

#[derive(DeriveIden)]
enum TallySteps {
    Table,
    TallyId,
    Seq,
    SignerSitePin,
    SignerChipId,
    Kind,
    Doc,
    Sig,
    SignerKey,
    Hash,
    StateAfter,
    RecordedAtMs,
}

#[derive(DeriveIden)]
enum TallyOutbox {
    Table,
    Id,
    IdempotencyKey,
    TallyId,
    Seq,
    ChipId,
    PeerChipId,
    PeerSitePin,
    Step,
    State,
    Attempts,
    NextAtMs,
    LastError,
    CreatedAtMs,
    SettledAtMs,
}

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(M0001Initial), Box::new(M0002QueueHeads)]
    }

    fn migration_table_name() -> DynIden {
        TallyMigrations.into_iden()
    }
}

struct M0001Initial;

impl MigrationName for M0001Initial {
    fn name(&self) -> &str {
        "m0001_tally_initial"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for M0001Initial {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(TallyTallies::Table)
                    .col(
                        ColumnDef::new(TallyTallies::Id)
                            .string_len(64)
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(TallyTallies::ChipId).string_len(64).not_null())
                    .col(ColumnDef::new(TallyTallies::PeerChipId).string_len(64).not_null())
                    .col(
                        ColumnDef::new(TallyTallies::PeerSitePin)
                            .string_len(64)
                            .not_null(),
                    )
                    .col(ColumnDef::new(TallyTallies::Role).string_len(16).not_null())
                    .col(ColumnDef::new(TallyTallies::State).string_len(16).not_null())
                    .col(ColumnDef::new(TallyTallies::Terms).text().not_null())
                    .col(ColumnDef::new(TallyTallies::Delivery).text().not_null())
                    .col(ColumnDef::new(TallyTallies::CreatedAtMs).big_integer().not_null())
                    .col(ColumnDef::new(TallyTallies::UpdatedAtMs).big_integer().not_null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("tally_tallies_chip_id")
                    .table(TallyTallies::Table)
                    .col(TallyTallies::ChipId)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(TallySteps::Table)
                    .col(ColumnDef::new(TallySteps::TallyId).string_len(64).not_null())
                    .col(ColumnDef::new(TallySteps::Seq).integer().not_null())
                    .col(
                        ColumnDef::new(TallySteps::SignerSitePin)
                            .string_len(64)
                            .not_null(),
                    )
                    .col(ColumnDef::new(TallySteps::SignerChipId).string_len(64).not_null())
                    .col(ColumnDef::new(TallySteps::Kind).string_len(16).not_null())
                    .col(ColumnDef::new(TallySteps::Doc).text().not_null())
                    .col(ColumnDef::new(TallySteps::Sig).string_len(128).not_null())
                    .col(ColumnDef::new(TallySteps::SignerKey).blob().not_null())
                    .col(ColumnDef::new(TallySteps::Hash).string_len(64).not_null())
                    .col(ColumnDef::new(TallySteps::StateAfter).string_len(16).not_null())
                    .col(ColumnDef::new(TallySteps::RecordedAtMs).big_integer().not_null())
                    .primary_key(
                        Index::create()
                            .col(TallySteps::TallyId)
                            .col(TallySteps::Seq)
                            .col(TallySteps::SignerSitePin),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(TallyOutbox::Table)
                    .col(
                        ColumnDef::new(TallyOutbox::Id)
                            .big_integer()
                            .not_null()
                            .auto_increment()
                            .primary_key(),
                    )
                    .col(
                        ColumnDef::new(TallyOutbox::IdempotencyKey)
                            .string_len(200)
                            .not_null()
                            .unique_key(),
                    )
                    .col(ColumnDef::new(TallyOutbox::TallyId).string_len(64).not_null())
                    .col(ColumnDef::new(TallyOutbox::Seq).integer().not_null())
                    .col(ColumnDef::new(TallyOutbox::ChipId).string_len(64).not_null())
                    .col(ColumnDef::new(TallyOutbox::PeerChipId).string_len(64).not_null())
                    .col(ColumnDef::new(TallyOutbox::PeerSitePin).string_len(64).not_null())
                    .col(ColumnDef::new(TallyOutbox::Step).text().not_null())
                    .col(ColumnDef::new(TallyOutbox::State).string_len(16).not_null())
                    .col(ColumnDef::new(TallyOutbox::Attempts).integer().not_null())
                    .col(ColumnDef::new(TallyOutbox::NextAtMs).big_integer().not_null())
                    .col(ColumnDef::new(TallyOutbox::LastError).text().not_null())
                    .col(ColumnDef::new(TallyOutbox::CreatedAtMs).big_integer().not_null())
                    .col(ColumnDef::new(TallyOutbox::SettledAtMs).big_integer().null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("tally_outbox_state_id")
                    .table(TallyOutbox::Table)
                    .col(TallyOutbox::State)
                    .col(TallyOutbox::Id)
                    .to_owned(),
            )
            .await?;
        Ok(())
    }
}

/// The outbox is read by the head of each tally's queue: an index that
/// finds a tally's older pending messages at once.
struct M0002QueueHeads;

impl MigrationName for M0002QueueHeads {
    fn name(&self) -> &str {
        "m0002_tally_queue_heads"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for M0002QueueHeads {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_index(
                Index::create()
                    .name("tally_outbox_tally_state_id")
                    .table(TallyOutbox::Table)
                    .col(TallyOutbox::TallyId)
                    .col(TallyOutbox::State)
                    .col(TallyOutbox::Id)
                    .to_owned(),
            )
            .await
    }
}
