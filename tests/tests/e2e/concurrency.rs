//! Many writers at once through every service that writes: none of them
//! may fail (SQLite's "database is locked" included), and every write lands.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use chipsite_app::{AppKey, enroll};
use chipsite_e2e::{Store, TestSite, store_test};
use chipsite_proto::{admin::v1 as ad, events::v1 as ev};

store_test!(concurrent_writers_all_succeed);
async fn concurrent_writers_all_succeed(store: Store) {
    let owned = TestSite::start(&store).await;
    const WRITERS: usize = 16;
    const ROUNDS: usize = 4;
    let site = &owned;
    let writers = (0..WRITERS).map(|w| async move {
        let mut admin = site.admin();
        let mut events = site.events();
        for r in 0..ROUNDS {
            let chip_id = format!("writer{w}-{r}");
            // admin: a user, its details, its lockdown on and off.
            admin
                .create_user(ad::CreateUserRequest {
                    chip_id: chip_id.clone(),
                    name: format!("Writer {w} {r}"),
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|e| chipsite_e2e::fail_with_logs(&format!("create {w}/{r}: {e:?}")));
            admin
                .update_user(ad::UpdateUserRequest {
                    chip_id: chip_id.clone(),
                    email: Some(format!("{chip_id}@example.org")),
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|e| chipsite_e2e::fail_with_logs(&format!("update {w}/{r}: {e:?}")));
            for locked in [true, false] {
                admin
                    .set_lockdown(ad::SetLockdownRequest {
                        chip_id: chip_id.clone(),
                        locked,
                    })
                    .await
                    .unwrap_or_else(|e| chipsite_e2e::fail_with_logs(&format!("lockdown {w}/{r}: {e:?}")));
            }
            // admin's alarms.
            events
                .raise_alarms(ev::RaiseAlarmsRequest {
                    alarms: vec![ev::NewAlarm {
                        chip_id: chip_id.clone(),
                        kind: "notice".into(),
                        text: format!("round {r}"),
                    }],
                })
                .await
                .unwrap_or_else(|e| chipsite_e2e::fail_with_logs(&format!("alarm {w}/{r}: {e:?}")));
            // ticket: one revoked, one redeemed (and key-vault registers the key).
            let spare = admin
                .issue_user_ticket(ad::IssueUserTicketRequest {
                    chip_id: chip_id.clone(),
                    ttl_seconds: 0,
                })
                .await
                .unwrap_or_else(|e| chipsite_e2e::fail_with_logs(&format!("issue {w}/{r}: {e:?}")))
                .into_inner();
            admin
                .revoke_ticket(ad::RevokeTicketRequest {
                    id: spare.ticket_id.clone(),
                })
                .await
                .unwrap_or_else(|e| chipsite_e2e::fail_with_logs(&format!("revoke {w}/{r}: {e:?}")));
            let ticket = site.user_ticket(&chip_id, 0).await;
            enroll(&ticket, &chip_id, &AppKey::generate().unwrap())
                .await
                .unwrap_or_else(|e| chipsite_e2e::fail_with_logs(&format!("enroll {w}/{r}: {e:?}")));
        }
    });
    futures::future::join_all(writers).await;

    // Every write landed.
    let users = site
        .admin()
        .list_users(ad::ListUsersRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .users;
    assert_eq!(users.len(), WRITERS * ROUNDS);
    assert!(
        users.iter().all(|u| u
            .contact
            .as_ref()
            .is_some_and(|c| c.email.ends_with("@example.org"))
            && !u.locked
            && u.has_key),
        "{users:?}"
    );
    owned.finish().await;
}
