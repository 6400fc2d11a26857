//! W3C trace context is carried across internal gRPC calls: a trace the
//! caller starts continues in admin, in ticket and in key-vault.
//! (Its own test binary: it installs its own global subscriber.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use chipsite_e2e::{Store, TestSite, eventually};
use chipsite_proto::admin::v1 as pb;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::{
    error::OTelSdkResult,
    trace::{SdkTracerProvider, SpanData, SpanExporter},
};
use tracing_subscriber::layer::SubscriberExt;

/// Keeps every finished span.
#[derive(Debug, Clone, Default)]
struct Collected(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Collected {
    fn export(&self, batch: Vec<SpanData>) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        self.0.lock().unwrap().extend(batch);
        std::future::ready(Ok(()))
    }
}

impl Collected {
    /// Names of the spans of `trace_id` (hex).
    fn in_trace(&self, trace_id: &str) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.span_context.trace_id().to_string() == trace_id)
            .map(|s| s.name.to_string())
            .collect()
    }
}

/// A request that continues the trace `trace_id` (W3C `traceparent`).
fn traced<T>(trace_id: &str, message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    let parent = format!("00-{trace_id}-00f067aa0ba902b7-01");
    r.metadata_mut().insert("traceparent", parent.parse().unwrap());
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_context_crosses_every_internal_hop() {
    let collected = Collected::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(collected.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    tracing::subscriber::set_global_default(subscriber).unwrap();
    chipsite_telemetry::install_propagator();

    let site = TestSite::start(&Store::Sqlite).await;
    let mut admin = site.admin();
    // admin → key-vault (CreateUser has key-vault forget any stale key).
    let t1 = "4bf92f3577b34da6a3ce929d0e0e4736";
    admin
        .create_user(traced(
            t1,
            pb::CreateUserRequest {
                chip_id: "tess".into(),
                name: "Tess".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    // admin → ticket → key-vault (IssueTicket reads the site key).
    let t2 = "0af7651916cd43dd8448eb211c80319c";
    admin
        .issue_user_ticket(traced(
            t2,
            pb::IssueUserTicketRequest {
                chip_id: "tess".into(),
                ttl_seconds: 0,
            },
        ))
        .await
        .unwrap();

    let expect = [
        (t1, "/chipsite.admin.v1.AdminService/CreateUser"),
        (t1, "/chipsite.keyvault.v1.KeyVault/DeleteUserKey"),
        (t2, "/chipsite.admin.v1.AdminService/IssueUserTicket"),
        (t2, "/chipsite.ticket.v1.Tickets/IssueTicket"),
        (t2, "/chipsite.keyvault.v1.KeyVault/GetStatus"),
    ];
    let all_there = eventually(Duration::from_secs(5), || {
        let c = collected.clone();
        async move {
            expect
                .iter()
                .all(|(t, name)| c.in_trace(t).iter().any(|n| n == name))
        }
    })
    .await;
    assert!(
        all_there,
        "spans by trace: {:?} / {:?}",
        collected.in_trace(t1),
        collected.in_trace(t2)
    );
    // And nothing leaks between the two traces.
    assert!(!collected.in_trace(t1).iter().any(|n| n.contains("IssueTicket")));
    site.finish().await;
}
