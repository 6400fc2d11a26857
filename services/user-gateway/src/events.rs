//! Following admin's user events: lockdowns and key changes close sessions,
//! alarms go to the user's subscribed sessions (and are reported delivered,
//! so admin sends no e-mail or text for them).

use std::{sync::Arc, time::Duration};

use chipsite_proto::{
    admin::v1 as ad,
    events::v1::{self as ev, user_event::Event},
};
use chipsite_wire::Notification;
use futures::StreamExt;
use serde_json::json;
use tokio::sync::mpsc;

use crate::{CloseReason, Inner};

/// Delivered alarm ids waiting to be reported, at most.
pub(crate) const DELIVERED_QUEUE: usize = 100_000;

/// The `alarm` notification a session receives.
pub(crate) fn alarm_frame(a: &ev::Alarm) -> String {
    Notification {
        method: "alarm".into(),
        params: json!({"id": a.id, "kind": a.kind, "text": a.text, "created_at_ms": a.created_at_ms}),
    }
    .to_frame()
}

/// Watch admin's events for as long as the task runs, reconnecting when the
/// stream ends; after each (re)connection, re-check every open session's
/// lockdown state, since events may have been missed meanwhile.
pub(crate) async fn follow(inner: Arc<Inner>, delivered: mpsc::Sender<i64>) {
    let mut warned = false;
    loop {
        match inner.events.clone().watch(ev::WatchRequest {}).await {
            Ok(response) => {
                if warned {
                    tracing::info!("user gateway follows user events again");
                }
                warned = false;
                let mut stream = response.into_inner();
                inner.cache.set_live(true);
                resync(&inner).await;
                loop {
                    match stream.message().await {
                        Ok(Some(e)) => apply(&inner, e, &delivered),
                        Ok(None) => break,
                        Err(e) => {
                            tracing::debug!(error = %e, "user event stream ended");
                            break;
                        }
                    }
                }
            }
            Err(e) if !warned => {
                tracing::warn!(error = %e, "cannot follow user events (lockdowns and alarms); retrying");
                warned = true;
            }
            Err(_) => {}
        }
        inner.cache.set_live(false);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn apply(inner: &Inner, e: ev::UserEvent, delivered: &mpsc::Sender<i64>) {
    match e.event {
        Some(Event::Lockdown(l)) if !l.locked => inner.cache.lockdown(&l.chip_id, false),
        Some(Event::Lockdown(l)) => {
            inner.cache.lockdown(&l.chip_id, true);
            let closed = if l.chip_id.is_empty() {
                inner.registry.close_all(CloseReason::LockedDown)
            } else {
                inner
                    .registry
                    .close_user(&l.chip_id, CloseReason::LockedDown, None)
            };
            tracing::info!(chip_id = l.chip_id, closed, "lockdown: sessions closed");
        }
        Some(Event::KeyChanged(k)) => {
            inner.cache.key_changed(&k.chip_id, &k.public_key);
            inner
                .registry
                .close_user(&k.chip_id, CloseReason::KeyReplaced, Some(&k.public_key));
        }
        Some(Event::Alarm(a)) if inner.registry.push(&a.chip_id, &alarm_frame(&a)) > 0 => {
            let _ = delivered.try_send(a.id);
        }
        _ => {}
    }
}

/// Close the sessions whose user (or site) is locked down now.
async fn resync(inner: &Inner) {
    let users = inner.registry.users();
    let checks = futures::stream::iter(users)
        .map(|chip_id| async move {
            let lock = inner
                .admin
                .clone()
                .get_lockdown(ad::GetLockdownRequest {
                    chip_id: chip_id.clone(),
                })
                .await;
            (chip_id, lock)
        })
        .buffer_unordered(16);
    tokio::pin!(checks);
    while let Some((chip_id, lock)) = checks.next().await {
        match lock.map(tonic::Response::into_inner) {
            Ok(l) if l.site_locked => {
                inner.registry.close_all(CloseReason::LockedDown);
                return;
            }
            Ok(l) if l.user_locked => {
                inner.registry.close_user(&chip_id, CloseReason::LockedDown, None);
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(chip_id, error = %e, "lockdown re-check failed"),
        }
    }
}

/// Report delivered alarms to admin in batches.
pub(crate) async fn report_delivered(inner: Arc<Inner>, mut rx: mpsc::Receiver<i64>) {
    while let Some(first) = rx.recv().await {
        let mut ids = vec![first];
        while ids.len() < 5000 {
            match rx.try_recv() {
                Ok(id) => ids.push(id),
                Err(_) => break,
            }
        }
        if let Err(e) = inner
            .events
            .clone()
            .alarms_delivered(ev::AlarmsDeliveredRequest { ids })
            .await
        {
            tracing::warn!(error = %e, "could not report delivered alarms (they may also go out by e-mail or text)");
        }
    }
}
