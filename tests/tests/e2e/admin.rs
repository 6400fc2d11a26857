//! Every admin command through the real AdminService over mutual TLS, on
//! every store.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use chipsite_e2e::{Store, TestSite, store_test};
use chipsite_proto::admin::v1 as pb;
use chipsite_tls::identity as id;
use tonic::Code;

fn create(chip_id: &str, name: &str) -> pb::CreateUserRequest {
    pb::CreateUserRequest {
        chip_id: chip_id.into(),
        name: name.into(),
        address: "1 Main St\nSpringfield".into(),
        contact: Some(pb::Contact {
            email: format!("{chip_id}@example.com"),
            phone: "+1 555 0100".into(),
        }),
    }
}

store_test!(users_can_be_created_listed_edited_and_validated);
async fn users_can_be_created_listed_edited_and_validated(store: Store) {
    let site = TestSite::start(&store).await;
    let mut admin = site.admin();
    let u = admin
        .create_user(create("alice", "Alice"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (u.chip_id.as_str(), u.status.as_str(), u.locked, u.has_key),
        ("alice", "active", false, false)
    );
    for i in 0..5 {
        admin
            .create_user(create(&format!("user{i}"), &format!("User {i}")))
            .await
            .unwrap();
    }
    let dup = admin
        .create_user(create("alice", "Alice again"))
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists, "{}", store.label());
    for bad in ["", "Alice", "-x", "a b", &"x".repeat(65), "<script>"] {
        let e = admin.create_user(create(bad, "X")).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "chip id {bad:?}");
    }
    let e = admin.create_user(create("nameless", " ")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // Paging walks every user exactly once, in CHIP ID order.
    let mut seen = vec![];
    let mut token = String::new();
    loop {
        let page = admin
            .list_users(pb::ListUsersRequest {
                query: String::new(),
                page_size: 2,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.users.into_iter().map(|u| u.chip_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ["alice", "user0", "user1", "user2", "user3", "user4"]);
    let found = admin
        .list_users(pb::ListUsersRequest {
            query: "User 3".into(),
            page_size: 10,
            page_token: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(found.users.len(), 1);

    let edited = admin
        .update_user(pb::UpdateUserRequest {
            chip_id: "alice".into(),
            name: Some("Alice B.".into()),
            status: Some("suspended".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (edited.name.as_str(), edited.status.as_str()),
        ("Alice B.", "suspended")
    );
    assert_eq!(
        edited.contact.unwrap().email,
        "alice@example.com",
        "untouched fields stay"
    );
    let e = admin
        .update_user(pb::UpdateUserRequest {
            chip_id: "alice".into(),
            status: Some("deleted".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = admin
        .get_user(pb::GetUserRequest {
            chip_id: "nobody".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::NotFound, "user \"nobody\" not found")
    );
    // A suspended user gets no ticket.
    let e = admin
        .issue_user_ticket(pb::IssueUserTicketRequest {
            chip_id: "alice".into(),
            ttl_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    site.finish().await;
}

/// Every page of a user list, walked with its tokens.
async fn walk(
    admin: &mut pb::admin_service_client::AdminServiceClient<tonic::transport::Channel>,
    req: pb::ListUsersRequest,
) -> (Vec<String>, u64) {
    let (mut seen, mut token, mut total) = (vec![], String::new(), None);
    for _ in 0..50 {
        let page = admin
            .list_users(pb::ListUsersRequest {
                page_token: token.clone(),
                ..req.clone()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.users.len() <= req.page_size as usize);
        assert_eq!(
            *total.get_or_insert(page.total),
            page.total,
            "the same total on every page"
        );
        seen.extend(page.users.into_iter().map(|u| u.chip_id));
        if page.next_page_token.is_empty() {
            return (seen, total.unwrap_or(0));
        }
        token = page.next_page_token;
    }
    panic!("paging never ends: {seen:?}");
}

store_test!(user_lists_sort_filter_count_and_page_and_the_audit_pages_by_cursor);
async fn user_lists_sort_filter_count_and_page_and_the_audit_pages_by_cursor(store: Store) {
    let site = TestSite::start(&store).await;
    let mut admin = site.admin();
    // Names sort otherwise than CHIP IDs, two are equal (ties go by CHIP
    // ID), and users made in the same millisecond tie on creation time.
    let users = [
        ("u1", "kim"),
        ("u2", "amy"),
        ("u3", "zed"),
        ("u4", "amy"),
        ("u5", "bob"),
        ("v6", "kimberly"),
        ("v7", "al"),
    ];
    for (chip_id, name) in users {
        admin.create_user(create(chip_id, name)).await.unwrap();
    }
    for chip_id in ["u3", "v6"] {
        admin
            .update_user(pb::UpdateUserRequest {
                chip_id: chip_id.into(),
                status: Some("suspended".into()),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    for chip_id in ["u2", "v6", "v7"] {
        admin
            .set_lockdown(pb::SetLockdownRequest {
                chip_id: chip_id.into(),
                locked: true,
            })
            .await
            .unwrap();
    }
    let list = |sort: &str| pb::ListUsersRequest {
        page_size: 2,
        sort: sort.into(),
        ..Default::default()
    };
    let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let label = store.label();
    let (by_id, total) = walk(&mut admin, list("")).await;
    assert_eq!(
        (by_id, total),
        (ids(&["u1", "u2", "u3", "u4", "u5", "v6", "v7"]), 7),
        "[{label}]"
    );
    assert_eq!(
        walk(&mut admin, list("-chip_id")).await.0,
        ids(&["v7", "v6", "u5", "u4", "u3", "u2", "u1"])
    );
    assert_eq!(
        walk(&mut admin, list("name")).await.0,
        ids(&["v7", "u2", "u4", "u5", "u1", "v6", "u3"]),
        "[{label}] by name, then CHIP ID"
    );
    assert_eq!(
        walk(&mut admin, list("-name")).await.0,
        ids(&["u3", "v6", "u1", "u5", "u4", "u2", "v7"])
    );
    assert_eq!(
        walk(&mut admin, list("status")).await.0,
        ids(&["u1", "u2", "u4", "u5", "v7", "u3", "v6"]),
        "[{label}] active before suspended"
    );
    // Creation order is the order above (ties by CHIP ID agree with it).
    let mut created = walk(&mut admin, list("created")).await.0;
    assert_eq!(created.len(), 7);
    let mut newest_first = walk(&mut admin, list("-created")).await.0;
    newest_first.reverse();
    assert_eq!(created, newest_first, "[{label}] reversed exactly");
    created.sort();
    assert_eq!(created, ids(&["u1", "u2", "u3", "u4", "u5", "v6", "v7"]));

    // Filters, with the query, counted over all pages.
    let filtered = |query: &str, status: &str, locked: Option<bool>| pb::ListUsersRequest {
        query: query.into(),
        page_size: 1,
        status: status.into(),
        locked,
        sort: "name".into(),
        ..Default::default()
    };
    assert_eq!(
        walk(&mut admin, filtered("", "suspended", None)).await,
        (ids(&["v6", "u3"]), 2)
    );
    assert_eq!(
        walk(&mut admin, filtered("", "", Some(true))).await,
        (ids(&["v7", "u2", "v6"]), 3)
    );
    assert_eq!(
        walk(&mut admin, filtered("", "active", Some(false))).await,
        (ids(&["u4", "u5", "u1"]), 3)
    );
    assert_eq!(
        walk(&mut admin, filtered("kim", "", None)).await,
        (ids(&["u1", "v6"]), 2)
    );
    assert_eq!(walk(&mut admin, filtered("nobody", "", None)).await, (vec![], 0));

    // A token from another sort, a bad sort or status: refused, named.
    let page = admin.list_users(list("name")).await.unwrap().into_inner();
    for (sort, token, status, what) in [
        ("created", page.next_page_token.as_str(), "", "page_token"),
        ("name", "name:u1", "", "page_token"),
        ("created", "created:u1:soon", "", "page_token"),
        ("age", "", "", "sort"),
        ("", "", "asleep", "status"),
    ] {
        let e = admin
            .list_users(pb::ListUsersRequest {
                page_token: token.into(),
                sort: sort.into(),
                status: status.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{sort} {token} {status}");
        assert!(e.message().contains(what), "{}", e.message());
    }

    // The audit log, paged by its cursor: the same rows, newest first, as
    // one long page, with ticket attempts mixed in.
    let ticket = site.user_ticket("u1", 0).await;
    let gateway = site.tickets_as(id::USER_GATEWAY);
    for (i, token) in [ticket.token.as_str(), "nonsense", ticket.token.as_str()]
        .into_iter()
        .enumerate()
    {
        let _ = gateway
            .clone()
            .redeem_ticket(chipsite_proto::ticket::v1::RedeemTicketRequest {
                kind: chipsite_proto::ticket::v1::TicketKind::User as i32,
                token: token.into(),
                chip_id: "u1".into(),
                source: format!("10.0.0.{i}"),
                refusal: String::new(),
            })
            .await;
    }
    let all = admin
        .list_audit(pb::ListAuditRequest {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(all.next_page_token.is_empty());
    let key = |e: &pb::AuditEntry| (e.source.clone(), e.id);
    let whole: Vec<_> = all.entries.iter().map(key).collect();
    assert!(
        whole.iter().filter(|(s, _)| s == "ticket").count() >= 3,
        "{whole:?}"
    );
    assert!(whole.len() > 10);
    let (mut paged, mut token) = (vec![], String::new());
    for _ in 0..100 {
        let page = admin
            .list_audit(pb::ListAuditRequest {
                limit: 3,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= 3);
        paged.extend(page.entries.iter().map(key));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(paged, whole, "[{label}] pages make up the whole log, in order");
    let e = admin
        .list_audit(pb::ListAuditRequest {
            page_token: "yesterday".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    site.finish().await;
}

store_test!(dump_and_load_round_trip_exactly_and_bad_dumps_write_nothing);
async fn dump_and_load_round_trip_exactly_and_bad_dumps_write_nothing(store: Store) {
    let a = TestSite::start(&store).await;
    let mut admin_a = a.admin();
    admin_a
        .create_user(create("bob", "Bob \"the\" Builder ✓"))
        .await
        .unwrap();
    admin_a
        .set_lockdown(pb::SetLockdownRequest {
            chip_id: "bob".into(),
            locked: true,
        })
        .await
        .unwrap();
    let dump = admin_a
        .dump_user(pb::DumpUserRequest {
            chip_id: "bob".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .json;
    // Loading the same dump again is a retry, and succeeds (a load that
    // failed half-way is finished so); another user of that CHIP ID is refused.
    let again = admin_a
        .load_user(pb::LoadUserRequest { json: dump.clone() })
        .await
        .expect("the same dump loads again")
        .into_inner();
    assert_eq!(again.chip_id, "bob");
    // …and never replaces a key the user holds now (enrolled since).
    let enrolled = chipsite_app::AppKey::generate().unwrap().spki_der();
    a.key_vault_as(id::ADMIN)
        .register_user_key(chipsite_proto::keyvault::v1::RegisterUserKeyRequest {
            chip_id: "bob".into(),
            public_key: enrolled.clone(),
        })
        .await
        .unwrap();
    admin_a
        .load_user(pb::LoadUserRequest { json: dump.clone() })
        .await
        .unwrap();
    let held = a
        .key_vault_as(id::ADMIN)
        .get_user_key(chipsite_proto::keyvault::v1::GetUserKeyRequest {
            chip_id: "bob".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .public_key;
    assert_eq!(held, enrolled, "a repeated load leaves the current key alone");
    let mut other: serde_json::Value = serde_json::from_str(&dump).unwrap();
    other["name"] = "Someone Else".into();
    let e = admin_a
        .load_user(pb::LoadUserRequest {
            json: other.to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "a conflicting CHIP ID is refused");
    // A key key-vault holds for a CHIP ID nobody has (left by a load cut
    // short) does not pass to a new user of that CHIP ID.
    let orphan = chipsite_app::AppKey::generate().unwrap().spki_der();
    a.key_vault_as(id::ADMIN)
        .register_user_key(chipsite_proto::keyvault::v1::RegisterUserKeyRequest {
            chip_id: "ghost".into(),
            public_key: orphan,
        })
        .await
        .unwrap();
    let ghost = admin_a
        .create_user(create("ghost", "Ghost"))
        .await
        .unwrap()
        .into_inner();
    assert!(!ghost.has_key, "the new user inherits no key");
    a.finish().await;

    let fresh = store.another().await;
    let b = TestSite::start(&fresh).await;
    let mut admin_b = b.admin();
    let count = |users: pb::ListUsersResponse| users.users.len();
    let all = || pb::ListUsersRequest {
        page_size: 100,
        ..Default::default()
    };

    let v: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let mutate = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut m = v.clone();
        f(&mut m);
        m.to_string()
    };
    let bad_dumps = [
        "".to_owned(),
        "{".to_owned(),
        "[]".to_owned(),
        "{\"format\":\"chipsite.user.v1\"}".to_owned(),
        mutate(&|m| m["format"] = "other".into()),
        mutate(&|m| m["chip_id"] = "Not Valid".into()),
        mutate(&|m| m["status"] = "gone".into()),
        mutate(&|m| m["extra"] = 1.into()),
        mutate(&|m| m["contact"]["email"] = "not-an-email".into()),
        mutate(&|m| m["updated_at_ms"] = 1.into()),
        mutate(&|m| m["public_key"] = "!!!".into()),
        // Well-formed base64 that is no key: key-vault refuses it and the user is taken out again.
        mutate(&|m| m["public_key"] = "AAAA".into()),
    ];
    for bad in &bad_dumps {
        let e = admin_b
            .load_user(pb::LoadUserRequest { json: bad.clone() })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad}: {}", e.message());
        assert!(e.message().starts_with("bad user dump"), "{}", e.message());
        assert_eq!(
            count(admin_b.list_users(all()).await.unwrap().into_inner()),
            0,
            "nothing written for {bad}"
        );
    }

    let loaded = admin_b
        .load_user(pb::LoadUserRequest { json: dump.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(loaded.locked);
    let again = admin_b
        .dump_user(pb::DumpUserRequest {
            chip_id: "bob".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .json;
    assert_eq!(again, dump, "dump → load → dump is exact");
    b.finish().await;
}

store_test!(lockdown_peer_server_config_and_audit);
async fn lockdown_peer_server_config_and_audit(store: Store) {
    let site = TestSite::start(&store).await;
    let mut admin = site.admin();
    admin.create_user(create("carol", "Carol")).await.unwrap();

    let l = admin
        .set_lockdown(pb::SetLockdownRequest {
            chip_id: "carol".into(),
            locked: true,
        })
        .await
        .unwrap();
    assert!(l.into_inner().user_locked);
    let l = admin
        .set_lockdown(pb::SetLockdownRequest {
            chip_id: String::new(),
            locked: true,
        })
        .await
        .unwrap();
    assert!(l.into_inner().site_locked);
    let l = admin
        .get_lockdown(pb::GetLockdownRequest {
            chip_id: "carol".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(l.site_locked && l.user_locked);
    admin
        .set_lockdown(pb::SetLockdownRequest {
            chip_id: String::new(),
            locked: false,
        })
        .await
        .unwrap();
    admin
        .set_lockdown(pb::SetLockdownRequest {
            chip_id: "carol".into(),
            locked: false,
        })
        .await
        .unwrap();
    let l = admin
        .get_lockdown(pb::GetLockdownRequest {
            chip_id: "carol".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!l.site_locked && !l.user_locked);
    let e = admin
        .set_lockdown(pb::SetLockdownRequest {
            chip_id: "nobody".into(),
            locked: true,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    let p = admin
        .get_peer_server(pb::GetPeerServerRequest {})
        .await
        .unwrap()
        .into_inner();
    // A dev site starts its peer server on its first launch (it holds the
    // pass phrase); an operator stops it.
    assert_eq!(p.desired, "running");
    let p = admin
        .stop_peer_server(pb::StopPeerServerRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.desired, "stopped");
    let e = admin
        .start_peer_server(pb::StartPeerServerRequest {
            passphrase: "wrong pass phrase".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(
        admin
            .get_peer_server(pb::GetPeerServerRequest {})
            .await
            .unwrap()
            .into_inner()
            .desired,
        "stopped"
    );
    let pass = std::fs::read_to_string(chipsite_site::dev::passphrase_path(&site.data_dir())).unwrap();
    let p = admin
        .start_peer_server(pb::StartPeerServerRequest { passphrase: pass })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.desired, "running");
    let p = admin
        .stop_peer_server(pb::StopPeerServerRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.desired, "stopped");

    let c = admin
        .update_site_config(pb::UpdateSiteConfigRequest {
            set: [
                ("ticket.ttl_seconds".to_owned(), "3600".to_owned()),
                ("site.name".to_owned(), "Test".to_owned()),
            ]
            .into(),
            reset: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.values["ticket.ttl_seconds"], "3600");
    for (k, v) in [
        ("ticket.ttl_seconds", "5"),
        ("user_gateway.port", "0"),
        ("unknown.key", "x"),
        ("user_gateway.host", "a b"),
    ] {
        let e = admin
            .update_site_config(pb::UpdateSiteConfigRequest {
                set: [
                    ("site.name".to_owned(), "Half".to_owned()),
                    (k.to_owned(), v.to_owned()),
                ]
                .into(),
                reset: vec![],
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{k}={v}");
    }
    let c = admin
        .get_site_config(pb::GetSiteConfigRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.values["site.name"], "Test", "a rejected update writes nothing");
    let c = admin
        .update_site_config(pb::UpdateSiteConfigRequest {
            set: Default::default(),
            reset: vec!["site.name".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.values["site.name"], "chipsite");
    assert!(!c.changed.contains(&"site.name".to_owned()), "a default again");
    assert!(
        c.changed.contains(&"ticket.ttl_seconds".to_owned()),
        "{:?}",
        c.changed
    );

    // A password inside a value is masked for every caller; sent back as
    // shown (the console's form, `config show | config set`), it is kept.
    let set_smtp = |value: &str| pb::UpdateSiteConfigRequest {
        set: [("alarm.smtp_url".to_owned(), value.to_owned())].into(),
        reset: vec![],
    };
    let shown = "smtp://mailer:****@relay:25";
    let c = admin
        .update_site_config(set_smtp("smtp://mailer:hunter2@relay:25"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.values["alarm.smtp_url"], shown);
    assert!(c.changed.contains(&"alarm.smtp_url".to_owned()));
    let c = admin
        .update_site_config(set_smtp(shown))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.values["alarm.smtp_url"], shown);
    let c = admin
        .get_site_config(pb::GetSiteConfigRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.values["alarm.smtp_url"], shown);
    let stored = site.stored_bytes().await;
    let holds = |needle: &[u8]| stored.windows(needle.len()).any(|w| w == needle);
    assert!(holds(b"mailer:hunter2@relay"), "the secret is kept");
    assert!(!holds(b"mailer:****@relay"), "the mask was stored");

    let audit = admin
        .list_audit(pb::ListAuditRequest {
            limit: 100,
            source: "admin".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let entries = audit.into_inner().entries;
    let actions: Vec<&str> = entries.iter().map(|e| e.action.as_str()).collect();
    for a in [
        "create_user",
        "lockdown",
        "lift_lockdown",
        "start_peer_server",
        "stop_peer_server",
        "update_site_config",
    ] {
        assert!(actions.contains(&a), "{a} audited: {actions:?}");
    }
    assert!(entries.iter().all(|e| e.actor == "admin-client"));
    assert!(
        entries
            .iter()
            .any(|e| e.action == "start_peer_server" && e.outcome.starts_with("PermissionDenied")),
        "failed commands are audited too"
    );
    assert!(
        entries.windows(2).all(|w| w[0].at_ms >= w[1].at_ms),
        "newest first"
    );
    site.finish().await;
}

store_test!(configuration_is_cached_briefly_and_lockdown_is_read_fresh);
/// admin keeps the site configuration in memory: its own changes show at
/// once, and one made around it (SQL by hand) within the cache's lifetime.
/// The site's lockdown is never cached: a lockdown written around admin is
/// in the very next answer.
async fn configuration_is_cached_briefly_and_lockdown_is_read_fresh(store: Store) {
    use sea_orm::ConnectionTrait;
    let site = TestSite::start(&store).await;
    site.create_user("alice").await;
    let mut admin = site.admin();
    let ttl = |admin: &mut pb::admin_service_client::AdminServiceClient<tonic::transport::Channel>| {
        let mut admin = admin.clone();
        async move {
            admin
                .get_site_config(pb::GetSiteConfigRequest {})
                .await
                .unwrap()
                .into_inner()
                .values["ticket.ttl_seconds"]
                .clone()
        }
    };
    assert_eq!(ttl(&mut admin).await, "86400");
    admin
        .update_site_config(pb::UpdateSiteConfigRequest {
            set: [("ticket.ttl_seconds".to_owned(), "120".to_owned())].into(),
            reset: vec![],
        })
        .await
        .unwrap();
    assert_eq!(ttl(&mut admin).await, "120", "admin's own change, at once");
    let t = admin
        .issue_user_ticket(pb::IssueUserTicketRequest {
            chip_id: "alice".into(),
            ttl_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let lifetime = t.expires_at_ms - chipsite_store::now_ms();
    assert!((100_000..=120_000).contains(&lifetime), "{lifetime}");

    // admin's own store: PostgreSQL, or its SQLite file in the data dir.
    let url = match store {
        Store::Sqlite => chipsite_store::sqlite_url(&site.data_dir().join("db").join("admin.sqlite")),
        Store::Postgres { .. } => store.url(),
    };
    let db = chipsite_store::connect(&url).await.unwrap();
    db.execute_unprepared(
        "UPDATE admin_settings SET value = '150' WHERE scope = 'config' AND key = 'ticket.ttl_seconds'",
    )
    .await
    .unwrap();
    let seen = chipsite_e2e::eventually(std::time::Duration::from_secs(5), || {
        let mut admin = admin.clone();
        async move { ttl(&mut admin).await == "150" }
    })
    .await;
    assert!(seen, "[{}] a change around admin is seen", store.label());

    db.execute_unprepared(
        "INSERT INTO admin_settings (scope, key, value, changed_at_ms) VALUES ('state', 'site_locked', 'true', 1) \
         ON CONFLICT (scope, key) DO UPDATE SET value = excluded.value",
    )
    .await
    .unwrap();
    let lock = admin
        .get_lockdown(pb::GetLockdownRequest {
            chip_id: "alice".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(lock.site_locked && !lock.user_locked, "{lock:?}");
    let e = admin
        .get_lockdown(pb::GetLockdownRequest {
            chip_id: "nobody".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    site.finish().await;
}

store_test!(a_created_user_and_its_audit_record_commit_together);
/// `CreateUser` writes the user and its audit record in one commit; a
/// refusal is audited on its own; a creation undone because key-vault could
/// not be asked leaves no user and one record that says so, not `ok`.
async fn a_created_user_and_its_audit_record_commit_together(store: Store) {
    let site = TestSite::start(&store).await;
    let mut admin = site.admin();
    let records = |entries: &[pb::AuditEntry], subject: &str| -> Vec<String> {
        entries
            .iter()
            .filter(|e| e.action == "create_user" && e.subject == subject)
            .map(|e| e.outcome.clone())
            .collect()
    };
    let audit = |mut admin: chipsite_proto::admin::v1::admin_service_client::AdminServiceClient<_>| async move {
        admin
            .list_audit(pb::ListAuditRequest {
                limit: 100,
                source: "admin".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .entries
    };

    admin.create_user(create("alice", "Alice")).await.unwrap();
    let again = admin
        .create_user(create("alice", "Alice again"))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists, "{again:?}");
    let bad = admin.create_user(create("Not An Id", "Bad")).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    let entries = audit(site.admin()).await;
    let alice = records(&entries, "alice");
    assert_eq!(alice.len(), 2, "{alice:?}");
    assert!(alice[0].starts_with("AlreadyExists"), "newest first: {alice:?}");
    assert_eq!(alice[1], "ok");
    let bad = records(&entries, "Not An Id");
    assert!(bad.len() == 1 && bad[0].starts_with("InvalidArgument"), "{bad:?}");
    let u = admin
        .get_user(pb::GetUserRequest {
            chip_id: "alice".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(u.name, "Alice", "the refused second creation changed nothing");

    // A second admin process on the same store whose key-vault cannot be
    // reached (a closed port): the user is created, then undone.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = closed.local_addr().unwrap().to_string();
    drop(closed);
    let url =
        chipsite_e2e::config_for(site.dir.path(), &store).database_url_for(chipsite_site::Service::Admin);
    let db = chipsite_store::connect(&url).await.unwrap();
    let admin2 = std::sync::Arc::new(chipsite_admin::Admin::open(db).await.unwrap());
    let (admin2_addr, stop_admin2) = site.extra_admin(admin2, &nowhere).await;
    let mut other = chipsite_proto::admin::v1::admin_service_client::AdminServiceClient::new(
        chipsite_tls::connect_tls_lazy(&admin2_addr, id::ADMIN, site.tls(id::ADMIN_CLIENT)).unwrap(),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let refused = loop {
        match other.create_user(create("bob", "Bob")).await {
            Err(e) if e.message().contains("nothing was created") => break e,
            // The second admin may not be serving yet.
            Err(e) if e.code() == Code::Unavailable && std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            other => panic!("expected a refusal naming key-vault: {other:?}"),
        }
    };
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    let gone = admin
        .get_user(pb::GetUserRequest {
            chip_id: "bob".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "nothing was created");
    let bob = records(&audit(site.admin()).await, "bob");
    assert_eq!(
        bob.len(),
        1,
        "one record, corrected rather than added to: {bob:?}"
    );
    assert!(
        bob[0].starts_with("Unavailable") && bob[0].contains("nothing was created"),
        "{bob:?}"
    );
    let _ = stop_admin2.send(true);
    site.finish().await;
}
