//! Tickets through the internal gRPC API: atomic burning, uniform refusals,
//! expiry at redemption, audit, throttling, and no token in the clear.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use chipsite_e2e::{Store, TestSite, captured_logs, store_test};
use chipsite_proto::{admin::v1 as pb, ticket::v1 as tk};
use chipsite_ticket::render::PublishedTicket;
use chipsite_tls::identity as id;
use tonic::Code;

async fn user_with_ticket(site: &TestSite, chip_id: &str, ttl: u32) -> (String, String) {
    let mut admin = site.admin();
    let _ = admin
        .create_user(pb::CreateUserRequest {
            chip_id: chip_id.into(),
            name: chip_id.into(),
            ..Default::default()
        })
        .await;
    let t = admin
        .issue_user_ticket(pb::IssueUserTicketRequest {
            chip_id: chip_id.into(),
            ttl_seconds: ttl,
        })
        .await
        .unwrap()
        .into_inner();
    let published = PublishedTicket::from_uri(&t.uri).unwrap();
    assert_eq!(PublishedTicket::from_json(&t.json).unwrap(), published);
    (t.ticket_id, published.token)
}

fn redeem(token: &str, chip_id: &str, source: &str) -> tk::RedeemTicketRequest {
    tk::RedeemTicketRequest {
        kind: tk::TicketKind::User as i32,
        token: token.into(),
        chip_id: chip_id.into(),
        source: source.into(),
        refusal: String::new(),
    }
}

store_test!(sixty_four_concurrent_redemptions_give_exactly_one_success);
async fn sixty_four_concurrent_redemptions_give_exactly_one_success(store: Store) {
    let site = TestSite::start(&store).await;
    let (ticket_id, token) = user_with_ticket(&site, "alice", 0).await;
    let gateway = site.tickets_as(id::USER_GATEWAY);
    let attempts = (0..64).map(|i| {
        let mut g = gateway.clone();
        let req = redeem(&token, "alice", &format!("10.0.0.{i}"));
        tokio::spawn(async move { g.redeem_ticket(req).await })
    });
    let results = futures::future::join_all(attempts).await;
    let ok: Vec<_> = results.iter().filter(|r| matches!(r, Ok(Ok(_)))).collect();
    assert_eq!(ok.len(), 1, "{}: exactly one redemption wins", store.label());
    for r in &results {
        if let Ok(Err(s)) = r {
            assert_eq!(
                (s.code(), s.message()),
                (Code::PermissionDenied, "ticket refused")
            );
        }
    }
    let audit = site
        .tickets_as(id::ADMIN)
        .list_audit(tk::ListAuditRequest {
            ticket_id: ticket_id.clone(),
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    let attempts = audit.iter().filter(|r| r.outcome != "issued").count();
    assert_eq!(attempts, 64, "one audit record per attempt");
    assert_eq!(audit.iter().filter(|r| r.outcome == "redeemed").count(), 1);
    site.finish().await;
}

store_test!(every_kind_of_failed_attempt_looks_the_same_and_burns_the_ticket);
async fn every_kind_of_failed_attempt_looks_the_same_and_burns_the_ticket(store: Store) {
    let site = TestSite::start(&store).await;
    let mut gateway = site.tickets_as(id::USER_GATEWAY);
    let mut admin = site.admin();
    let refused = |r: Result<tonic::Response<tk::RedeemTicketResponse>, tonic::Status>| {
        let s = r.unwrap_err();
        assert_eq!(
            (s.code(), s.message().to_owned()),
            (Code::PermissionDenied, "ticket refused".to_owned())
        );
    };

    // Wrong CHIP ID: refused, and the right one afterwards is refused too.
    let (_, token) = user_with_ticket(&site, "alice", 0).await;
    refused(gateway.redeem_ticket(redeem(&token, "mallory", "s1")).await);
    refused(gateway.redeem_ticket(redeem(&token, "alice", "s1")).await);

    // Text the database would refuse (NUL) is still an attempt: it burns.
    let (_, token) = user_with_ticket(&site, "alice", 0).await;
    refused(gateway.redeem_ticket(redeem(&token, "alice\0", "s1\0\n")).await);
    refused(gateway.redeem_ticket(redeem(&token, "alice", "s1")).await);

    // Wrong kind (a user ticket presented as a tally ticket) burns it.
    let (_, token) = user_with_ticket(&site, "alice", 0).await;
    let mut tally = redeem(&token, "alice", "s2");
    tally.kind = tk::TicketKind::Tally as i32;
    refused(gateway.redeem_ticket(tally).await);
    refused(gateway.redeem_ticket(redeem(&token, "alice", "s2")).await);

    // Expired: judged at redemption.
    let (_, token) = user_with_ticket(&site, "alice", 1).await;
    site.site.clock.advance(Duration::from_millis(1001));
    refused(gateway.redeem_ticket(redeem(&token, "alice", "s3")).await);

    // Used.
    let (_, token) = user_with_ticket(&site, "alice", 0).await;
    gateway
        .redeem_ticket(redeem(&token, "alice", "s4"))
        .await
        .unwrap();
    refused(gateway.redeem_ticket(redeem(&token, "alice", "s4")).await);

    // Unknown, and absurd.
    refused(
        gateway
            .redeem_ticket(redeem("bm90LWEtdG9rZW4", "alice", "s5"))
            .await,
    );
    refused(
        gateway
            .redeem_ticket(redeem(&"A".repeat(100_000), "alice", "s5"))
            .await,
    );
    refused(gateway.redeem_ticket(redeem("", "", "")).await);

    // Revoked.
    let (ticket_id, token) = user_with_ticket(&site, "alice", 0).await;
    admin
        .revoke_ticket(pb::RevokeTicketRequest {
            id: ticket_id.clone(),
        })
        .await
        .unwrap();
    refused(gateway.redeem_ticket(redeem(&token, "alice", "s6")).await);
    let e = admin
        .revoke_ticket(pb::RevokeTicketRequest { id: ticket_id })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);

    let outcomes: Vec<String> = site
        .tickets_as(id::ADMIN)
        .list_audit(tk::ListAuditRequest {
            ticket_id: String::new(),
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records
        .into_iter()
        .map(|r| r.outcome)
        .collect();
    for o in [
        "refused_chip_id",
        "refused_kind",
        "refused_expired",
        "refused_used",
        "refused_unknown",
        "refused_revoked",
    ] {
        assert!(outcomes.iter().any(|x| x == o), "{o} in {outcomes:?}");
    }
    let listed = admin
        .list_tickets(pb::ListTicketsRequest {
            chip_id: "alice".into(),
            include_closed: true,
        })
        .await
        .unwrap()
        .into_inner()
        .tickets;
    let states: Vec<&str> = listed.iter().map(|t| t.state.as_str()).collect();
    assert_eq!(states.iter().filter(|s| **s == "burned").count(), 4, "{states:?}");
    assert!(
        states.contains(&"revoked") && states.contains(&"redeemed"),
        "{states:?}"
    );
    let open = admin
        .list_tickets(pb::ListTicketsRequest {
            chip_id: "alice".into(),
            include_closed: false,
        })
        .await
        .unwrap()
        .into_inner()
        .tickets;
    assert!(open.is_empty(), "no outstanding tickets left: {open:?}");
    site.finish().await;
}

store_test!(failed_attempts_are_throttled_per_source);
async fn failed_attempts_are_throttled_per_source(store: Store) {
    let site = TestSite::start(&store).await;
    let mut gateway = site.tickets_as(id::USER_GATEWAY);
    for _ in 0..12 {
        let _ = gateway
            .redeem_ticket(redeem("Z3Vlc3M", "alice", "203.0.113.9"))
            .await;
    }
    let (ticket_id, token) = user_with_ticket(&site, "alice", 0).await;
    let s = gateway
        .redeem_ticket(redeem(&token, "alice", "203.0.113.9"))
        .await
        .unwrap_err();
    assert_eq!(
        s.message(),
        "ticket refused",
        "a flooding source is refused even with a good ticket"
    );
    // …but the refusal claimed nothing: the ticket stays good for its
    // owner, who may share the flooder's address (NAT, a proxy).
    gateway
        .redeem_ticket(redeem(&token, "alice", "198.51.100.7"))
        .await
        .expect("the ticket a throttled attempt named still redeems");
    let records = site
        .tickets_as(id::ADMIN)
        .list_audit(tk::ListAuditRequest {
            ticket_id: String::new(),
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    // Repeated refusals from one source are one record with a count: the
    // first ten unknown tokens, then the three throttled attempts.
    let from_flood: Vec<_> = records.iter().filter(|r| r.source == "203.0.113.9").collect();
    assert_eq!(from_flood.len(), 2, "{from_flood:?}");
    let count_of = |outcome: &str| from_flood.iter().find(|r| r.outcome == outcome).map(|r| r.count);
    assert_eq!(count_of("refused_unknown"), Some(10), "{from_flood:?}");
    assert_eq!(count_of("throttled"), Some(3), "{from_flood:?}");
    assert!(
        records
            .iter()
            .any(|r| r.ticket_id == ticket_id && r.outcome == "redeemed" && r.count == 1),
        "{records:?}"
    );
    site.finish().await;
}

store_test!(old_tickets_and_audit_records_are_swept);
async fn old_tickets_and_audit_records_are_swept(store: Store) {
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let mut config = chipsite_e2e::config_for(dir.path(), &store);
    config.ticket_retention_days = 1;
    let url = config.database_url_for(chipsite_site::Service::Ticket);
    let db = chipsite_store::connect(&url).await.unwrap();
    let clock = chipsite_store::Clock::default();
    let tickets = chipsite_ticket::Tickets::open(db)
        .await
        .unwrap()
        .with_clock(clock.clone());
    let issue = || {
        tickets.issue(
            chipsite_ticket::Kind::User,
            "alice",
            Duration::from_secs(3600),
            "127.0.0.1",
            1,
            "test",
        )
    };
    let redeemed = issue().await.unwrap();
    tickets
        .redeem(chipsite_ticket::Kind::User, &redeemed.token, "alice", "s", None)
        .await
        .unwrap();
    let outstanding = issue().await.unwrap();
    assert!(
        tickets
            .redeem(chipsite_ticket::Kind::User, "bm9wZQ", "alice", "s", None)
            .await
            .is_err()
    );
    // Nothing is old yet.
    assert_eq!(tickets.sweep(Duration::from_secs(86_400)).await.unwrap(), (0, 0));
    // Two days on: the redeemed ticket, the expired one and every record go;
    // a ticket issued now stays.
    clock.advance(Duration::from_secs(2 * 86_400));
    let fresh = issue().await.unwrap();
    assert_eq!(tickets.sweep(Duration::from_secs(86_400)).await.unwrap(), (2, 2));
    let left = tickets.list(None, true, 100).await.unwrap();
    assert_eq!(
        left.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(),
        [fresh.ticket.id.as_str()]
    );
    assert!(tickets.audit_log(None, 100, "", 0).await.unwrap().is_empty());
    let _ = outstanding;
    store.drop_database().await;
}

store_test!(tokens_never_appear_in_the_clear_in_the_database_or_the_logs);
async fn tokens_never_appear_in_the_clear_in_the_database_or_the_logs(store: Store) {
    let site = TestSite::start(&store).await;
    let mut gateway = site.tickets_as(id::USER_GATEWAY);
    let mut tokens = vec![];
    for (i, chip) in ["dave", "erin", "frank"].iter().enumerate() {
        let (_, token) = user_with_ticket(&site, chip, 0).await;
        // Redeemed, refused and outstanding tickets alike.
        match i {
            0 => drop(gateway.redeem_ticket(redeem(&token, chip, "s")).await.unwrap()),
            1 => drop(
                gateway
                    .redeem_ticket(redeem(&token, "wrong", "s"))
                    .await
                    .unwrap_err(),
            ),
            _ => {}
        }
        tokens.push(token);
    }
    let stored = site.stored_bytes().await;
    assert!(!stored.is_empty());
    let logs = captured_logs();
    assert!(logs.contains("ticket refused"), "the log capture works");
    for t in &tokens {
        assert!(
            !stored.windows(t.len()).any(|w| w == t.as_bytes()),
            "{}: token stored in the clear",
            store.label()
        );
        assert!(!logs.contains(t.as_str()), "token in the logs");
    }
    site.finish().await;
}

store_test!(a_database_fault_is_logged_and_reaches_callers_as_internal_error);
/// A fault inside the site (here: the ticket table gone) reaches the caller
/// as "internal error" with the code `internal`, through admin as well; the
/// detail is in the ticket service's log, not in the answer.
async fn a_database_fault_is_logged_and_reaches_callers_as_internal_error(store: Store) {
    use chipsite_proto::status::{ErrorCode, code_of};
    use sea_orm::ConnectionTrait;
    let site = TestSite::start(&store).await;
    user_with_ticket(&site, "alice", 0).await;
    let url = match &store {
        Store::Sqlite => chipsite_store::sqlite_url(&site.data_dir().join("db").join("ticket.sqlite")),
        Store::Postgres { .. } => store.url(),
    };
    let db = chipsite_store::connect(&url).await.unwrap();
    db.execute_unprepared("DROP TABLE ticket_tickets").await.unwrap();

    let direct = site
        .tickets_as(id::ADMIN)
        .list_tickets(tk::ListTicketsRequest::default())
        .await
        .unwrap_err();
    let via_admin = site
        .admin()
        .list_tickets(pb::ListTicketsRequest::default())
        .await
        .unwrap_err();
    for e in [&direct, &via_admin] {
        assert_eq!(code_of(e), ErrorCode::Internal, "{e:?}");
        assert_eq!(e.code(), Code::Internal);
        assert_eq!(e.message(), "internal error", "no database text for callers");
    }
    let logs = captured_logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("ERROR") && l.contains("internal error") && l.contains("ticket_tickets")),
        "the fault is logged with its detail where it happened"
    );
    site.finish().await;
}

store_test!(a_malformed_kind_burns_nothing);
/// A redemption whose kind is not a kind at all is refused as invalid before
/// anything is claimed, whoever sends it: the console (which may only spend
/// its own sign-in tickets) cannot burn a user's ticket that way, nor can a
/// gateway; the ticket still works afterwards.
async fn a_malformed_kind_burns_nothing(store: Store) {
    let site = TestSite::start(&store).await;
    let (_, token) = user_with_ticket(&site, "alice", 0).await;
    for identity in [id::CONSOLE, id::USER_GATEWAY] {
        let mut malformed = redeem(&token, "alice", "s1");
        malformed.kind = 99;
        let e = site
            .tickets_as(identity)
            .redeem_ticket(malformed)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{identity}: {e:?}");
    }
    site.tickets_as(id::USER_GATEWAY)
        .redeem_ticket(redeem(&token, "alice", "s1"))
        .await
        .expect("the ticket was not burned");
    site.finish().await;
}
