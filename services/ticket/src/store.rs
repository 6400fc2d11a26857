//! The ticket service's tables: tickets (token hashes only) and the audit log.

use sea_orm_migration::prelude::*;

pub mod ticket {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "ticket_tickets")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        /// "user" or "tally".
        pub kind: String,
        pub chip_id: String,
        pub host: String,
        pub port: i32,
        /// SHA-256 of the token. The token itself is never stored.
        #[sea_orm(unique)]
        pub token_hash: Vec<u8>,
        pub created_at_ms: i64,
        pub expires_at_ms: i64,
        /// "outstanding", "redeemed", "burned" or "revoked".
        pub state: String,
        pub closed_at_ms: Option<i64>,
        /// Who issued it (an operator identity through admin, or the service).
        pub issued_by: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod audit {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "ticket_audit")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub ticket_id: Option<String>,
        pub outcome: String,
        pub source: String,
        pub at_ms: i64,
        /// How many attempts this record stands for (repeated refusals from
        /// one source are collapsed into one record).
        pub count: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

#[derive(DeriveIden)]
struct TicketMigrations;

#[derive(DeriveIden)]
enum TicketTickets {
    Table,
    Id,
    Kind,
    ChipId,
    Host,
    Port,
    TokenHash,
    CreatedAtMs,
    ExpiresAtMs,
    State,
    ClosedAtMs,
    IssuedBy,
}

#[derive(DeriveIden)]
enum TicketAudit {
    Table,
    Id,
    TicketId,
    Outcome,
    Source,
    AtMs,
    Count,
}

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(M0001Initial),
            Box::new(M0002HotClaims),
            Box::new(M0003AuditCounts),
        ]
    }

    fn migration_table_name() -> DynIden {
        TicketMigrations.into_iden()
    }
}

struct M0001Initial;

impl MigrationName for M0001Initial {
    fn name(&self) -> &str {
        "m0001_ticket_initial"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for M0001Initial {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(TicketTickets::Table)
                    .col(
                        ColumnDef::new(TicketTickets::Id)
                            .string_len(40)
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(TicketTickets::Kind).string_len(16).not_null())
                    .col(ColumnDef::new(TicketTickets::ChipId).string_len(64).not_null())
                    .col(ColumnDef::new(TicketTickets::Host).string_len(255).not_null())
                    .col(ColumnDef::new(TicketTickets::Port).integer().not_null())
                    .col(
                        ColumnDef::new(TicketTickets::TokenHash)
                            .blob()
                            .not_null()
                            .unique_key(),
                    )
                    .col(
                        ColumnDef::new(TicketTickets::CreatedAtMs)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(TicketTickets::ExpiresAtMs)
                            .big_integer()
                            .not_null(),
                    )
                    .col(ColumnDef::new(TicketTickets::State).string_len(16).not_null())
                    .col(ColumnDef::new(TicketTickets::ClosedAtMs).big_integer().null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ticket_tickets_chip_id")
                    .table(TicketTickets::Table)
                    .col(TicketTickets::ChipId)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(TicketAudit::Table)
                    .col(
                        ColumnDef::new(TicketAudit::Id)
                            .big_integer()
                            .not_null()
                            .auto_increment()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(TicketAudit::TicketId).string_len(40).null())
                    .col(ColumnDef::new(TicketAudit::Outcome).string_len(32).not_null())
                    .col(ColumnDef::new(TicketAudit::Source).string_len(128).not_null())
                    .col(ColumnDef::new(TicketAudit::AtMs).big_integer().not_null())
                    .to_owned(),
            )
            .await?;
        Ok(())
    }
}

/// Every ticket row is updated exactly once (the claim), and only in
/// unindexed columns. With room left in each page PostgreSQL can make that
/// update HOT: no new entries in the three indexes. (SQLite has no such knob.)
struct M0002HotClaims;

impl MigrationName for M0002HotClaims {
    fn name(&self) -> &str {
        "m0002_ticket_hot_claims"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for M0002HotClaims {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() == sea_orm::DbBackend::Postgres {
            manager
                .get_connection()
                .execute_unprepared("ALTER TABLE ticket_tickets SET (fillfactor = 70)")
                .await?;
        }
        Ok(())
    }
}

/// Collapsed refusals carry a count and tickets their issuer; the sweeper
/// deletes by age and the collapse looks up a source's latest record, so
/// both get an index.
struct M0003AuditCounts;

impl MigrationName for M0003AuditCounts {
    fn name(&self) -> &str {
        "m0003_ticket_audit_counts"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for M0003AuditCounts {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(TicketAudit::Table)
                    .add_column(
                        ColumnDef::new(TicketAudit::Count)
                            .big_integer()
                            .not_null()
                            .default(1),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(TicketTickets::Table)
                    .add_column(
                        ColumnDef::new(TicketTickets::IssuedBy)
                            .string_len(80)
                            .not_null()
                            .default(""),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ticket_audit_source")
                    .table(TicketAudit::Table)
                    .col(TicketAudit::Source)
                    .col(TicketAudit::AtMs)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ticket_audit_at")
                    .table(TicketAudit::Table)
                    .col(TicketAudit::AtMs)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ticket_tickets_expires")
                    .table(TicketTickets::Table)
                    .col(TicketTickets::ExpiresAtMs)
                    .to_owned(),
            )
            .await
    }
}
