//! OpenTelemetry export: with `otlp_endpoint` set, `chipsite dev` sends its
//! RPC spans over OTLP/gRPC to a real collector endpoint (a loopback
//! TraceService here), flushing them when it stops.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use chipsite_proto::admin::v1::{GetVaultStatusRequest, admin_service_client::AdminServiceClient};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};

#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<(String, String)>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut seen = self.0.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref())
                .map(|v| format!("{:?}", v.value))
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    seen.push((service.clone(), span.name));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_exports_rpc_spans_over_otlp_when_configured() {
    chipsite_tls::install_crypto_provider();
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_chipsite"))
        .args(["dev", "--data-dir"])
        .arg(dir.path())
        .env("CHIPSITE_OTLP_ENDPOINT", &endpoint)
        .envs(chipsite_site::config::Addresses::ephemeral_env())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let endpoints_file = dir.path().join("endpoints.json");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !endpoints_file.exists() {
        assert!(Instant::now() < deadline, "dev site did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let endpoints = chipsite_site::Endpoints::read(dir.path()).unwrap();
    let mut admin = AdminServiceClient::new(
        chipsite_tls::connect_lazy(
            &endpoints.admin,
            chipsite_tls::identity::ADMIN,
            chipsite_tls::ReloadableTls::from_files(
                endpoints.cert_paths(chipsite_tls::identity::ADMIN_CLIENT),
            )
            .unwrap(),
        )
        .unwrap(),
    );
    admin.get_vault_status(GetVaultStatusRequest {}).await.unwrap();

    // Ctrl-C: the telemetry guard flushes the batch on the way out.
    assert!(
        Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "dev site did not stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = collector.0.lock().unwrap().clone();
    assert!(
        seen.iter().any(|(service, name)| service.contains("chipsite")
            && name == "/chipsite.admin.v1.AdminService/GetVaultStatus"),
        "exported spans: {seen:?}"
    );
    assert!(
        seen.iter()
            .any(|(_, name)| name == "/chipsite.keyvault.v1.KeyVault/GetStatus"),
        "the internal call it made is exported too: {seen:?}"
    );
}
