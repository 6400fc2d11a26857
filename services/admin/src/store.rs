//! admin's tables: users, site configuration, site state (lockdown, peer
//! server), init scripts that ran, and the admin audit log.

use sea_orm_migration::prelude::*;

pub mod user {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "admin_users")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub chip_id: String,
        pub name: String,
        #[sea_orm(column_type = "Text")]
        pub address: String,
        pub email: String,
        pub phone: String,
        pub status: String,
        pub locked: bool,
        pub created_at_ms: i64,
        pub updated_at_ms: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Key/value rows: site configuration (`config`) and site state (`state`).
pub mod setting {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "admin_settings")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub scope: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub key: String,
        #[sea_orm(column_type = "Text")]
        pub value: String,
        pub changed_at_ms: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod init_script {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "admin_init_scripts")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub name: String,
        pub sha256: String,
        pub ran_at_ms: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod audit {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "admin_audit")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub at_ms: i64,
        pub actor: String,
        pub action: String,
        pub subject: String,
        pub outcome: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Alarms for users: raised, delivered (to a session, or by e-mail/text),
/// acknowledged. Times are Unix ms; 0 means "not yet".
pub mod alarm {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "admin_alarms")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub chip_id: String,
        pub kind: String,
        #[sea_orm(column_type = "Text")]
        pub text: String,
        pub created_at_ms: i64,
        pub acked_at_ms: i64,
        pub delivered_at_ms: i64,
        pub notified_at_ms: i64,
        pub delivered_by: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

#[derive(DeriveIden)]
struct AdminMigrations;

#[derive(DeriveIden)]
enum AdminAlarms {
    Table,
    Id,
    ChipId,
    Kind,
    Text,
    CreatedAtMs,
    AckedAtMs,
    DeliveredAtMs,
    NotifiedAtMs,
    DeliveredBy,
}

#[derive(DeriveIden)]
enum AdminUsers {
    Table,
    ChipId,
    Name,
    Address,
    Email,
    Phone,
    Status,
    Locked,
    CreatedAtMs,
    UpdatedAtMs,
}

#[derive(DeriveIden)]
enum AdminSettings {
    Table,
    Scope,
    Key,
    Value,
    ChangedAtMs,
}

#[derive(DeriveIden)]
enum AdminInitScripts {
    Table,
    Name,
    Sha256,
    RanAtMs,
}

#[derive(DeriveIden)]
enum AdminAudit {
    Table,
    Id,
    AtMs,
    Actor,
    Action,
    Subject,
    Outcome,
}

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(M0001Initial),
            Box::new(M0002Alarms),
            Box::new(M0003UserSorts),
        ]
    }

    fn migration_table_name() -> DynIden {
        AdminMigrations.into_iden()
    }
}

struct M0001Initial;

impl MigrationName for M0001Initial {
    fn name(&self) -> &str {
        "m0001_admin_initial"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for M0001Initial {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(AdminUsers::Table)
                    .col(
                        ColumnDef::new(AdminUsers::ChipId)
                            .string_len(64)
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(AdminUsers::Name).string_len(200).not_null())
                    .col(ColumnDef::new(AdminUsers::Address).text().not_null())
                    .col(ColumnDef::new(AdminUsers::Email).string_len(254).not_null())
                    .col(ColumnDef::new(AdminUsers::Phone).string_len(32).not_null())
                    .col(ColumnDef::new(AdminUsers::Status).string_len(16).not_null())
                    .col(ColumnDef::new(AdminUsers::Locked).boolean().not_null())
                    .col(ColumnDef::new(AdminUsers::CreatedAtMs).big_integer().not_null())
                    .col(ColumnDef::new(AdminUsers::UpdatedAtMs).big_integer().not_null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(AdminSettings::Table)
                    .col(ColumnDef::new(AdminSettings::Scope).string_len(16).not_null())
                    .col(ColumnDef::new(AdminSettings::Key).string_len(128).not_null())
                    .col(ColumnDef::new(AdminSettings::Value).text().not_null())
                    .col(
                        ColumnDef::new(AdminSettings::ChangedAtMs)
                            .big_integer()
                            .not_null(),
                    )
                    .primary_key(Index::create().col(AdminSettings::Scope).col(AdminSettings::Key))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(AdminInitScripts::Table)
                    .col(
                        ColumnDef::new(AdminInitScripts::Name)
                            .string_len(255)
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(AdminInitScripts::Sha256).string_len(64).not_null())
                    .col(ColumnDef::new(AdminInitScripts::RanAtMs).big_integer().not_null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(AdminAudit::Table)
                    .col(
                        ColumnDef::new(AdminAudit::Id)
                            .big_integer()
                            .not_null()
                            .auto_increment()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(AdminAudit::AtMs).big_integer().not_null())
                    .col(ColumnDef::new(AdminAudit::Actor).string_len(64).not_null())
                    .col(ColumnDef::new(AdminAudit::Action).string_len(64).not_null())
                    .col(ColumnDef::new(AdminAudit::Subject).string_len(255).not_null())
                    .col(ColumnDef::new(AdminAudit::Outcome).string_len(255).not_null())
                    .to_owned(),
            )
            .await?;
        Ok(())
    }
}

struct M0002Alarms;

impl MigrationName for M0002Alarms {
    fn name(&self) -> &str {
        "m0002_admin_alarms"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for M0002Alarms {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let time = |c: AdminAlarms| ColumnDef::new(c).big_integer().not_null().default(0).to_owned();
        manager
            .create_table(
                Table::create()
                    .table(AdminAlarms::Table)
                    .col(
                        ColumnDef::new(AdminAlarms::Id)
                            .big_integer()
                            .not_null()
                            .auto_increment()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(AdminAlarms::ChipId).string_len(64).not_null())
                    .col(ColumnDef::new(AdminAlarms::Kind).string_len(32).not_null())
                    .col(ColumnDef::new(AdminAlarms::Text).text().not_null())
                    .col(time(AdminAlarms::CreatedAtMs))
                    .col(time(AdminAlarms::AckedAtMs))
                    .col(time(AdminAlarms::DeliveredAtMs))
                    .col(time(AdminAlarms::NotifiedAtMs))
                    .col(
                        ColumnDef::new(AdminAlarms::DeliveredBy)
                            .string_len(16)
                            .not_null()
                            .default(""),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("admin_alarms_by_user")
                    .table(AdminAlarms::Table)
                    .col(AdminAlarms::ChipId)
                    .col(AdminAlarms::Id)
                    .to_owned(),
            )
            .await?;
        // The sweeper's question: alarms neither delivered nor notified.
        manager
            .create_index(
                Index::create()
                    .name("admin_alarms_undelivered")
                    .table(AdminAlarms::Table)
                    .col(AdminAlarms::NotifiedAtMs)
                    .col(AdminAlarms::DeliveredAtMs)
                    .col(AdminAlarms::CreatedAtMs)
                    .to_owned(),
            )
            .await?;
        Ok(())
    }
}

/// Indexes for the console's user list sorted by name or creation time
/// (ties broken by CHIP ID, as the keyset pages need).
struct M0003UserSorts;

impl MigrationName for M0003UserSorts {
    fn name(&self) -> &str {
        "m0003_admin_user_sorts"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for M0003UserSorts {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for (name, col) in [
            ("admin_users_by_name", AdminUsers::Name),
            ("admin_users_by_created", AdminUsers::CreatedAtMs),
        ] {
            manager
                .create_index(
                    Index::create()
                        .name(name)
                        .table(AdminUsers::Table)
                        .col(col)
                        .col(AdminUsers::ChipId)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}
