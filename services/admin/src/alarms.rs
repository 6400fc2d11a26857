//! Alarms for users: raised by the operator or by services, delivered to
//! the user's open sessions through the gateways, or else by e-mail and/or
//! text (see `notify.rs`), listed and acknowledged from the app.

use std::collections::BTreeSet;

use sea_orm::{
    ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, sea_query::Expr,
};

use chipsite_store::now_ms;

use crate::{Admin, AdminError, store::alarm, store::user, validate_chip_id};

/// Alarms raised in one call at most.
pub const MAX_BATCH: usize = 20_000;
/// Rows per INSERT (SQLite allows 32766 parameters per statement).
const CHUNK: usize = 1000;

/// A new alarm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAlarm {
    pub chip_id: String,
    pub kind: String,
    pub text: String,
}

fn validate(a: &NewAlarm) -> Result<(), AdminError> {
    validate_chip_id(&a.chip_id)?;
    let kind_ok = !a.kind.is_empty()
        && a.kind.len() <= 32
        && a.kind
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c));
    if !kind_ok {
        return Err(AdminError::InvalidArgument(
            "an alarm kind has 1-32 of a-z, 0-9, '.', '_', '-'".into(),
        ));
    }
    let chars = a.text.chars().count();
    if a.text.trim().is_empty() || chars > 1000 || a.text.contains('\0') {
        return Err(AdminError::InvalidArgument(
            "an alarm text has 1 to 1000 characters".into(),
        ));
    }
    Ok(())
}

impl Admin {
    /// Store alarms (all or none): every user must exist.
    pub async fn raise_alarms(&self, new: &[NewAlarm]) -> Result<Vec<alarm::Model>, AdminError> {
        if new.is_empty() || new.len() > MAX_BATCH {
            return Err(AdminError::InvalidArgument(format!(
                "raise 1 to {MAX_BATCH} alarms at a time"
            )));
        }
        for a in new {
            validate(a)?;
        }
        let wanted: BTreeSet<&str> = new.iter().map(|a| a.chip_id.as_str()).collect();
        let txn = chipsite_store::begin_write(&self.db).await?;
        let mut found = BTreeSet::new();
        let wanted_list: Vec<&str> = wanted.iter().copied().collect();
        for chunk in wanted_list.chunks(CHUNK) {
            let ids: Vec<String> = user::Entity::find()
                .select_only()
                .column(user::Column::ChipId)
                .filter(user::Column::ChipId.is_in(chunk.iter().copied()))
                .into_tuple()
                .all(&txn)
                .await?;
            found.extend(ids);
        }
        if let Some(missing) = wanted.iter().find(|c| !found.contains(**c)) {
            return Err(AdminError::UserNotFound((*missing).to_owned()));
        }
        let now = now_ms();
        let mut stored = Vec::with_capacity(new.len());
        for chunk in new.chunks(CHUNK) {
            let rows = chunk.iter().map(|a| alarm::ActiveModel {
                chip_id: Set(a.chip_id.clone()),
                kind: Set(a.kind.clone()),
                text: Set(a.text.clone()),
                created_at_ms: Set(now),
                acked_at_ms: Set(0),
                delivered_at_ms: Set(0),
                notified_at_ms: Set(0),
                delivered_by: Set(String::new()),
                ..Default::default()
            });
            stored.extend(alarm::Entity::insert_many(rows).exec_with_returning(&txn).await?);
        }
        txn.commit().await?;
        Ok(stored)
    }

    /// A user's alarms, newest first.
    pub async fn list_alarms(
        &self,
        chip_id: &str,
        include_acked: bool,
        limit: u64,
    ) -> Result<Vec<alarm::Model>, AdminError> {
        let mut q = alarm::Entity::find().filter(alarm::Column::ChipId.eq(chip_id));
        if !include_acked {
            q = q.filter(alarm::Column::AckedAtMs.eq(0));
        }
        Ok(q.order_by_desc(alarm::Column::Id)
            .limit(limit.clamp(1, 1000))
            .all(&self.db)
            .await?)
    }

    /// How many alarms the user has (unacknowledged only, unless `include_acked`).
    pub async fn count_alarms(&self, chip_id: &str, include_acked: bool) -> Result<u64, AdminError> {
        use sea_orm::PaginatorTrait;
        let mut q = alarm::Entity::find().filter(alarm::Column::ChipId.eq(chip_id));
        if !include_acked {
            q = q.filter(alarm::Column::AckedAtMs.eq(0));
        }
        Ok(q.count(&self.db).await?)
    }

    /// Acknowledge one of the user's alarms (again is fine).
    pub async fn ack_alarm(&self, chip_id: &str, id: i64) -> Result<alarm::Model, AdminError> {
        alarm::Entity::update_many()
            .col_expr(alarm::Column::AckedAtMs, Expr::value(now_ms()))
            .filter(alarm::Column::Id.eq(id))
            .filter(alarm::Column::ChipId.eq(chip_id))
            .filter(alarm::Column::AckedAtMs.eq(0))
            .exec(&self.db)
            .await?;
        alarm::Entity::find_by_id(id)
            .filter(alarm::Column::ChipId.eq(chip_id))
            .one(&self.db)
            .await?
            .ok_or_else(|| AdminError::NotFound(format!("alarm {id}")))
    }

    /// Gateways delivered these alarms to open sessions.
    pub async fn alarms_delivered(&self, ids: &[i64]) -> Result<(), AdminError> {
        let now = now_ms();
        for chunk in ids.chunks(CHUNK) {
            alarm::Entity::update_many()
                .col_expr(alarm::Column::DeliveredAtMs, Expr::value(now))
                .col_expr(
                    alarm::Column::DeliveredBy,
                    Expr::cust("CASE WHEN delivered_by = '' THEN 'session' ELSE delivered_by END"),
                )
                .filter(alarm::Column::Id.is_in(chunk.iter().copied()))
                .filter(alarm::Column::DeliveredAtMs.eq(0))
                .exec(&self.db)
                .await?;
        }
        Ok(())
    }

    /// Alarms neither delivered to a session nor sent otherwise, raised
    /// at or before `created_before` (among `ids`, when given).
    pub async fn undelivered_alarms(
        &self,
        ids: Option<&[i64]>,
        created_before: i64,
    ) -> Result<Vec<alarm::Model>, AdminError> {
        let base = || {
            alarm::Entity::find()
                .filter(alarm::Column::DeliveredAtMs.eq(0))
                .filter(alarm::Column::NotifiedAtMs.eq(0))
                .filter(alarm::Column::CreatedAtMs.lte(created_before))
        };
        match ids {
            None => Ok(base()
                .order_by_asc(alarm::Column::Id)
                .limit(1000)
                .all(&self.db)
                .await?),
            Some(ids) => {
                let mut all = vec![];
                for chunk in ids.chunks(CHUNK) {
                    all.extend(
                        base()
                            .filter(alarm::Column::Id.is_in(chunk.iter().copied()))
                            .all(&self.db)
                            .await?,
                    );
                }
                Ok(all)
            }
        }
    }

    /// Claim an undelivered alarm for e-mail/text: true for exactly one
    /// claimant, and never once a gateway has delivered it.
    pub async fn claim_alarm_notification(&self, id: i64) -> Result<bool, AdminError> {
        let r = alarm::Entity::update_many()
            .col_expr(alarm::Column::NotifiedAtMs, Expr::value(now_ms()))
            .filter(alarm::Column::Id.eq(id))
            .filter(alarm::Column::DeliveredAtMs.eq(0))
            .filter(alarm::Column::NotifiedAtMs.eq(0))
            .exec(&self.db)
            .await?;
        Ok(r.rows_affected == 1)
    }

    /// Record how a claimed alarm went out; `None` gives the claim back
    /// (nothing could be sent: a later sweep retries).
    pub async fn finish_alarm_notification(
        &self,
        id: i64,
        delivered_by: Option<&str>,
    ) -> Result<(), AdminError> {
        let q = alarm::Entity::update_many().filter(alarm::Column::Id.eq(id));
        let q = match delivered_by {
            Some(how) => q.col_expr(alarm::Column::DeliveredBy, Expr::value(how)),
            None => q.col_expr(alarm::Column::NotifiedAtMs, Expr::value(0)),
        };
        q.exec(&self.db).await?;
        Ok(())
    }

    /// What an app's `status` shows of a user: CHIP ID, name, status,
    /// lockdown, and how many alarms wait to be acknowledged; one statement.
    pub async fn user_status(
        &self,
        chip_id: &str,
    ) -> Result<(String, String, String, bool, i64), AdminError> {
        use sea_orm::{
            QuerySelect,
            sea_query::{Expr, ExprTrait, Query},
        };
        let pending = Query::select()
            .expr(Expr::col((alarm::Entity, alarm::Column::Id)).count())
            .from(alarm::Entity)
            .and_where(
                Expr::col((alarm::Entity, alarm::Column::ChipId))
                    .equals((user::Entity, user::Column::ChipId)),
            )
            .and_where(Expr::col((alarm::Entity, alarm::Column::AckedAtMs)).eq(0))
            .to_owned();
        user::Entity::find_by_id(chip_id.to_owned())
            .select_only()
            .columns([
                user::Column::ChipId,
                user::Column::Name,
                user::Column::Status,
                user::Column::Locked,
            ])
            .column_as(Expr::SubQuery(None, Box::new(pending.into())), "pending")
            .into_tuple()
            .one(&self.db)
            .await?
            .ok_or_else(|| AdminError::UserNotFound(chip_id.to_owned()))
    }
}
