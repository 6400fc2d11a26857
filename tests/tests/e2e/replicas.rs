//! Two gateway replicas and a key-change announcement that fails: the
//! announcement is retried until admin takes it, and the other replica's
//! admission cache forgets what it knew within its lifetime anyway.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    sync::{Arc, atomic::AtomicU32},
    time::Duration,
};

use chipsite_app::{AppKey, Session, enroll_from};
use chipsite_e2e::{Store, TestSite, eventually, store_test};

/// Whether the session was admitted: its first call is answered.
async fn admitted(s: &Session) -> bool {
    s.call("ping", json!({})).await.is_ok()
}
use serde_json::json;

store_test!(a_failed_key_announcement_is_retried_and_caches_expire);
async fn a_failed_key_announcement_is_retried_and_caches_expire(store: Store) {
    let site = TestSite::start(&store).await;
    let admin = site.site.endpoints.admin.clone();
    let site_key = site.site_key().await;
    // Replica E enrolls; its announcements fail while `fail` says so.
    let fail = Arc::new(AtomicU32::new(u32::MAX));
    let (enroller, _stop_e) = site
        .extra_gateway_with(
            &admin,
            chipsite_user_gateway::Settings {
                fail_announcements: fail.clone(),
                ..Default::default()
            },
        )
        .await;
    // Replica B serves sessions and trusts its cache for one second.
    let (serving, _stop_b) = site
        .extra_gateway_with(
            &admin,
            chipsite_user_gateway::Settings {
                admission_cache_ttl: Duration::from_secs(1),
                ..Default::default()
            },
        )
        .await;
    // Keys as PEM, so each use makes its own AppKey.
    let key = |pem: &str| AppKey::from_pem(pem).unwrap();
    let on_b = |pem: String| {
        let site_key = site_key.clone();
        async move {
            Session::connect("127.0.0.1", serving, &site_key, "alice", &key(&pem))
                .await
                .unwrap()
        }
    };
    let enroll_on_e = |pem: String| {
        let site = &site;
        async move {
            let mut ticket = site.user_ticket("alice", 0).await;
            ticket.port = enroller;
            enroll_from(&ticket, "alice", &key(&pem), None).await.unwrap();
        }
    };

    site.create_user("alice").await;
    let first = AppKey::generate().unwrap().to_pem();
    enroll_on_e(first.clone()).await;
    let s = on_b(first.clone()).await;
    assert!(admitted(&s).await, "B admits the first key (and caches it)");

    // A second key, whose announcement never gets through: B's cache
    // expires, and B stops admitting the first key all the same.
    let second = AppKey::generate().unwrap().to_pem();
    enroll_on_e(second.clone()).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            !admitted(&on_b(first.clone()).await).await
        })
        .await,
        "B refuses the replaced key once its cache entry expired"
    );
    assert!(admitted(&on_b(second.clone()).await).await);

    // A third key whose announcement fails twice, then goes through: the
    // session B holds with the second key is closed (key replaced).
    let held = on_b(second.clone()).await;
    assert!(admitted(&held).await);
    fail.store(2, std::sync::atomic::Ordering::Relaxed);
    enroll_on_e(AppKey::generate().unwrap().to_pem()).await;
    let note = tokio::time::timeout(Duration::from_secs(20), held.next_notification())
        .await
        .expect("the retried announcement closes the session in time")
        .expect("a notification before the close");
    assert_eq!(
        (note.method.as_str(), note.params["code"].as_i64()),
        ("closed", Some(-32001))
    );
    assert_eq!(
        fail.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "both injected failures were used"
    );
    site.finish().await;
}
