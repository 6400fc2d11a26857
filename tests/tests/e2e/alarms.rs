//! Lockdown and alarms through the user gateway: sessions closed at once,
//! alarms pushed to subscribed sessions, e-mailed (real SMTP) and texted
//! (a real HTTP webhook) to users with no session, none lost, none twice.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use chipsite_app::{AppError, AppKey, Session, enroll};
use chipsite_e2e::{SmtpSink, Store, TestSite, WebhookSink, eventually, store_test};
use chipsite_proto::{admin::v1 as pb, events::v1 as ev};
use serde_json::json;

/// The site's last word on a session, then the close; returns how long it took.
async fn closed_with(s: &Session, method: &str, code: i64) -> Duration {
    let start = Instant::now();
    // Alarms still on their way (raised while waiting for a replica) may come first.
    let note = loop {
        let note = tokio::time::timeout(Duration::from_secs(5), s.next_notification())
            .await
            .expect("the site closes the session")
            .expect("a notification before the close");
        if note.method != "alarm" {
            break note;
        }
    };
    let took = start.elapsed();
    assert_eq!(
        (note.method.as_str(), note.params["code"].as_i64()),
        (method, Some(code)),
        "{note:?}"
    );
    let end = tokio::time::timeout(Duration::from_secs(5), s.next_notification())
        .await
        .expect("the connection ends");
    assert!(end.is_none(), "{end:?}");
    took
}

async fn lockdown(site: &TestSite, chip_id: &str, locked: bool) {
    site.admin()
        .set_lockdown(pb::SetLockdownRequest {
            chip_id: chip_id.into(),
            locked,
        })
        .await
        .unwrap();
}

async fn works(s: &Session, chip_id: &str) {
    assert_eq!(s.call("status", json!({})).await.unwrap()["chip_id"], chip_id);
}

store_test!(lockdown_closes_open_sessions_and_refuses_new_ones);
async fn lockdown_closes_open_sessions_and_refuses_new_ones(store: Store) {
    let site = TestSite::start(&store).await;
    let alice = site.enrolled("alice").await;
    let bob = site.enrolled("bob").await;
    let (sa, sb) = (
        site.session("alice", &alice).await.unwrap(),
        site.session("bob", &bob).await.unwrap(),
    );
    works(&sa, "alice").await;
    works(&sb, "bob").await;
    // Issued before the lockdown: enrollment must be refused during it.
    let ticket = site.user_ticket("alice", 0).await;

    // One user.
    lockdown(&site, "alice", true).await;
    let took = closed_with(&sa, "closed", -32002).await;
    eprintln!("[{}] user lockdown closed the session in {took:?}", store.label());
    works(&sb, "bob").await;
    closed_with(&site.session("alice", &alice).await.unwrap(), "error", -32002).await;
    let r = enroll(&ticket, "alice", &AppKey::generate().unwrap()).await;
    assert!(matches!(r, Err(AppError::Refused)), "{r:?}");
    lockdown(&site, "alice", false).await;
    let sa = site.session("alice", &alice).await.unwrap();
    works(&sa, "alice").await;

    // The whole site.
    let ticket = site.user_ticket("bob", 0).await;
    lockdown(&site, "", true).await;
    let took = closed_with(&sa, "closed", -32002).await;
    closed_with(&sb, "closed", -32002).await;
    eprintln!(
        "[{}] site lockdown closed the sessions in {took:?}",
        store.label()
    );
    closed_with(&site.session("bob", &bob).await.unwrap(), "error", -32002).await;
    let r = enroll(&ticket, "bob", &AppKey::generate().unwrap()).await;
    assert!(matches!(r, Err(AppError::Refused)), "{r:?}");
    lockdown(&site, "", false).await;
    works(&site.session("alice", &alice).await.unwrap(), "alice").await;
    works(&site.session("bob", &bob).await.unwrap(), "bob").await;
    site.finish().await;
}

async fn contact(site: &TestSite, chip_id: &str, email: &str, phone: &str) {
    site.create_user(chip_id).await;
    site.admin()
        .update_user(pb::UpdateUserRequest {
            chip_id: chip_id.into(),
            email: Some(email.into()),
            phone: Some(phone.into()),
            ..Default::default()
        })
        .await
        .unwrap();
}

fn alarm(chip_id: &str, text: &str) -> ev::NewAlarm {
    ev::NewAlarm {
        chip_id: chip_id.into(),
        kind: "notice".into(),
        text: text.into(),
    }
}

store_test!(alarms_reach_sessions_or_email_and_text_once);
async fn alarms_reach_sessions_or_email_and_text_once(store: Store) {
    let smtp = SmtpSink::start().await;
    let hook = WebhookSink::start().await;
    let site = TestSite::start(&store).await;
    let tag = store.label();
    site.admin()
        .update_site_config(pb::UpdateSiteConfigRequest {
            set: [
                ("alarm.smtp_url".to_owned(), smtp.url()),
                ("alarm.sms_webhook".to_owned(), hook.url()),
                ("alarm.email_from".to_owned(), "site@chipsite.test".to_owned()),
            ]
            .into(),
            reset: vec![],
        })
        .await
        .unwrap();
    contact(&site, "alice", &format!("alice-{tag}@example.com"), "+1 555 0100").await;
    contact(&site, "bob", &format!("bob-{tag}@example.com"), "+1 555 0101").await;
    contact(&site, "carol", &format!("carol-{tag}@example.com"), "").await;
    let alice = site.enrolled("alice").await;
    // Two subscribed sessions and one that did not subscribe.
    let s1 = site.session("alice", &alice).await.unwrap();
    let s2 = site.session("alice", &alice).await.unwrap();
    let s3 = site.session("alice", &alice).await.unwrap();
    for s in [&s1, &s2] {
        assert_eq!(
            s.call("alarms.subscribe", json!({})).await.unwrap()["subscribed"],
            true
        );
    }
    works(&s3, "alice").await;

    let raised = site
        .events()
        .raise_alarms(ev::RaiseAlarmsRequest {
            alarms: vec![
                alarm("alice", &format!("a1-{tag}")),
                alarm("bob", &format!("b1-{tag}")),
                alarm("carol", &format!("c1-{tag}")),
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .alarms;
    for s in [&s1, &s2] {
        let note = tokio::time::timeout(Duration::from_secs(5), s.next_notification())
            .await
            .expect("pushed at once")
            .unwrap();
        assert_eq!(note.method, "alarm");
        assert_eq!(note.params["text"], format!("a1-{tag}"));
        assert_eq!(note.params["id"], raised[0].id);
    }
    // Offline users: e-mail (bob, carol) and a text (bob, who has a phone).
    let mailed = eventually(Duration::from_secs(20), || async {
        let t = smtp.text();
        t.contains(&format!("b1-{tag}")) && t.contains(&format!("c1-{tag}"))
    })
    .await;
    assert!(mailed, "alarm e-mails: {}", smtp.text());
    let texted = eventually(Duration::from_secs(10), || async {
        hook.bodies().iter().any(|b| b["text"] == format!("b1-{tag}"))
    })
    .await;
    assert!(texted, "{:?}", hook.bodies());
    // Nothing for the user who was online, nothing twice. A later alarm
    // mailed to carol shows that the delivery pass ran again after the
    // first three were settled (no fixed sleep).
    site.raise_alarm("carol", &format!("c2-{tag}")).await;
    let again = eventually(Duration::from_secs(20), || async {
        smtp.text().contains(&format!("c2-{tag}"))
    })
    .await;
    assert!(again, "the later alarm is mailed: {}", smtp.text());
    let mail = smtp.text();
    assert!(!mail.contains(&format!("a1-{tag}")), "{mail}");
    assert_eq!(mail.matches(&format!("b1-{tag}")).count(), 1, "{mail}");
    assert_eq!(mail.matches(&format!("c1-{tag}")).count(), 1, "{mail}");
    assert!(mail.contains(&format!("bob-{tag}@example.com")));
    let texts: Vec<_> = hook
        .bodies()
        .into_iter()
        .filter(|b| b["text"] == format!("b1-{tag}"))
        .collect();
    assert_eq!(texts.len(), 1, "{texts:?}");
    assert_eq!(texts[0]["to"], "+1 555 0101");
    assert!(
        !hook
            .bodies()
            .iter()
            .any(|b| b["text"] == format!("c1-{tag}") || b["text"] == format!("a1-{tag}"))
    );
    // The unsubscribed session got nothing.
    let quiet = tokio::time::timeout(Duration::from_millis(300), s3.next_notification()).await;
    assert!(quiet.is_err(), "{quiet:?}");

    let how = |chip: &'static str| {
        let mut ev = site.events();
        async move {
            ev.list_alarms(ev::ListAlarmsRequest {
                chip_id: chip.into(),
                include_acked: true,
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .alarms[0]
                .delivered_by
                .clone()
        }
    };
    assert_eq!(how("alice").await, "session");
    assert_eq!(how("bob").await, "email+sms");
    assert_eq!(how("carol").await, "email");

    // From the app: list, acknowledge.
    let listed = s3.call("alarms.list", json!({})).await.unwrap();
    assert_eq!(listed["alarms"][0]["text"], format!("a1-{tag}"));
    assert_eq!(s3.call("status", json!({})).await.unwrap()["alarms_pending"], 1);
    let acked = s3.call("alarms.ack", json!({"id": raised[0].id})).await.unwrap();
    assert_eq!(acked["acked"], true);
    assert_eq!(s3.call("status", json!({})).await.unwrap()["alarms_pending"], 0);
    assert_eq!(
        s3.call("alarms.list", json!({})).await.unwrap()["alarms"],
        json!([])
    );
    // Another user's alarm is not found.
    let e = s3
        .call("alarms.ack", json!({"id": raised[1].id}))
        .await
        .unwrap_err();
    assert_eq!(e.rpc_code(), Some(-32004));
    // Bad alarms are refused whole.
    let e = site
        .events()
        .raise_alarms(ev::RaiseAlarmsRequest {
            alarms: vec![alarm("alice", "ok"), alarm("nobody", "x")],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    site.finish().await;
}

store_test!(events_reach_every_replica);
/// A second gateway replica in this process, and (on PostgreSQL) a second
/// admin replica that it watches: events reach it either way.
async fn events_reach_every_replica(store: Store) {
    let site = TestSite::start(&store).await;
    let endpoints = site.site.endpoints.clone();
    // On PostgreSQL, a second admin replica on the same database: the
    // second gateway watches it, events raised on the first reach it
    // through LISTEN/NOTIFY.
    let mut admin_addr = endpoints.admin.clone();
    let mut stop_admin2 = None;
    if let chipsite_e2e::Store::Postgres { .. } = &store {
        let url = store.url();
        let db = chipsite_store::connect(&url).await.unwrap();
        let hub = chipsite_admin::Hub::for_database(&url, &db).await.unwrap();
        let admin2 = std::sync::Arc::new(chipsite_admin::Admin::open(db).await.unwrap().with_hub(hub));
        let (addr, stop) = site.extra_admin(admin2, &endpoints.key_vault).await;
        admin_addr = addr;
        stop_admin2 = Some(stop);
    }
    let (port, stop_gateway) = site.extra_gateway(&admin_addr).await;

    let alice = site.enrolled("alice").await;
    let site_key = site.site_key().await;
    let connect = || Session::connect("127.0.0.1", port, &site_key, "alice", &alice);
    let deadline = Instant::now() + Duration::from_secs(20);
    let s = loop {
        match connect().await {
            Ok(s) if s.call("ping", json!({})).await.is_ok() => break s,
            _ if Instant::now() < deadline => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            other => panic!("the replica never served a session: {:?}", other.err()),
        }
    };
    s.call("alarms.subscribe", json!({})).await.unwrap();
    // The replica's event stream may not be watching yet: raise alarms
    // until one arrives (alarms raised before it watches go by e-mail).
    let deadline = Instant::now() + Duration::from_secs(20);
    let note = loop {
        site.events()
            .raise_alarms(ev::RaiseAlarmsRequest {
                alarms: vec![alarm("alice", "to the other replica")],
            })
            .await
            .unwrap();
        if let Ok(note) = tokio::time::timeout(Duration::from_secs(1), s.next_notification()).await {
            break note.expect("the session is open");
        }
        assert!(
            Instant::now() < deadline,
            "the alarm never reached the other replica"
        );
    };
    assert_eq!(note.params["text"], "to the other replica", "[{}]", store.label());
    // A new key enrolled through the first gateway closes this session.
    let renewed = site.enrolled("alice").await;
    closed_with(&s, "closed", -32001).await;
    // Lockdown through the first admin closes sessions on the second gateway.
    let s = Session::connect("127.0.0.1", port, &site_key, "alice", &renewed)
        .await
        .unwrap();
    works(&s, "alice").await;
    lockdown(&site, "", true).await;
    closed_with(&s, "closed", -32002).await;
    if let Some(stop) = stop_admin2 {
        let _ = stop.send(true);
    }
    let _ = stop_gateway.send(true);
    site.finish().await;
}

async fn set_status(site: &TestSite, chip_id: &str, status: &str) {
    site.admin()
        .update_user(pb::UpdateUserRequest {
            chip_id: chip_id.into(),
            status: Some(status.into()),
            ..Default::default()
        })
        .await
        .unwrap();
}

store_test!(suspended_and_closed_users_lose_their_sessions_and_cannot_enroll);
/// A user whose account is not active is treated as locked down: open
/// sessions close at once (−32002), new sessions and enrollments are
/// refused, and being active again lets them back in.
async fn suspended_and_closed_users_lose_their_sessions_and_cannot_enroll(store: Store) {
    let site = TestSite::start(&store).await;
    let alice = site.enrolled("alice").await;
    let bob = site.enrolled("bob").await;
    let (sa, sb) = (
        site.session("alice", &alice).await.unwrap(),
        site.session("bob", &bob).await.unwrap(),
    );
    // Issued while active: enrollment must be refused once suspended.
    let ticket = site.user_ticket("alice", 0).await;
    set_status(&site, "alice", "suspended").await;
    closed_with(&sa, "closed", -32002).await;
    works(&sb, "bob").await;
    closed_with(&site.session("alice", &alice).await.unwrap(), "error", -32002).await;
    let r = enroll(&ticket, "alice", &AppKey::generate().unwrap()).await;
    assert!(matches!(r, Err(AppError::Refused)), "{r:?}");
    // Lifting a lockdown does not let a suspended user in.
    lockdown(&site, "alice", true).await;
    lockdown(&site, "alice", false).await;
    closed_with(&site.session("alice", &alice).await.unwrap(), "error", -32002).await;
    set_status(&site, "alice", "active").await;
    works(&site.session("alice", &alice).await.unwrap(), "alice").await;

    set_status(&site, "bob", "closed").await;
    closed_with(&sb, "closed", -32002).await;
    closed_with(&site.session("bob", &bob).await.unwrap(), "error", -32002).await;
    site.finish().await;
}
