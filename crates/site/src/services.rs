//! One function per service: serve it on an already-bound listener over
//! internal mutual TLS until `shutdown` resolves. Each server carries gRPC
//! health, server reflection and its authorization policy.

use std::{future::Future, sync::Arc};

use chipsite_admin::{Admin, AdminGrpc};
use chipsite_key_vault::{KeyVault, KeyVaultGrpc};
use chipsite_proto::{
    admin::v1::admin_service_server::AdminServiceServer, keyvault::v1::key_vault_server::KeyVaultServer,
    ticket::v1::tickets_server::TicketsServer,
};
use chipsite_ticket::{Tickets, TicketsGrpc};
use chipsite_tls::{AuthzLayer, Policy, ReloadableTls, identity as id, tls_incoming};
use tokio::net::TcpListener;
use tonic::transport::{Channel, Server};

use crate::SiteError;

/// Health for every identity; reflection for the operator and console.
fn with_common(p: Policy) -> Policy {
    p.allow("/grpc.health.v1.Health/", id::ALL)
        .allow(
            "/grpc.reflection.v1.ServerReflection/",
            &[id::ADMIN_CLIENT, id::CONSOLE],
        )
        .allow(
            "/grpc.reflection.v1alpha.ServerReflection/",
            &[id::ADMIN_CLIENT, id::CONSOLE],
        )
}

macro_rules! serve_with {
    ($svc:expr, $server_ty:ty, $policy:expr, $listener:expr, $tls:expr, $shutdown:expr) => {{
        // Reflection advertises this server's own service, health and reflection.
        let name = <$server_ty as tonic::server::NamedService>::NAME;
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter.set_serving::<$server_ty>().await;
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(chipsite_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name(name)
            .with_service_name("grpc.health.v1.Health")
            .with_service_name("grpc.reflection.v1.ServerReflection")
            .with_service_name("grpc.reflection.v1alpha.ServerReflection")
            .build_v1()
            .map_err(|e| SiteError::Io(format!("reflection: {e}")))?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(chipsite_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name(name)
            .with_service_name("grpc.health.v1.Health")
            .with_service_name("grpc.reflection.v1.ServerReflection")
            .with_service_name("grpc.reflection.v1alpha.ServerReflection")
            .build_v1alpha()
            .map_err(|e| SiteError::Io(format!("reflection: {e}")))?;
        chipsite_telemetry::install_propagator();
        Server::builder()
            .layer(chipsite_telemetry::TraceContextLayer)
            .layer(AuthzLayer::new(with_common($policy)))
            .add_service(health)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service($svc)
            .serve_with_incoming_shutdown(tls_incoming($listener, $tls), $shutdown)
            .await
            .map_err(|e| SiteError::Serve(e.to_string()))
    }};
}

pub async fn serve_key_vault(
    vault: Arc<KeyVault>,
    listener: TcpListener,
    tls: Arc<ReloadableTls>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), SiteError> {
    type S = KeyVaultServer<KeyVaultGrpc>;
    let svc = S::new(KeyVaultGrpc(vault));
    serve_with!(svc, S, chipsite_key_vault::policy(), listener, tls, shutdown)
}

pub async fn serve_ticket(
    tickets: Arc<Tickets>,
    key_vault: Channel,
    listener: TcpListener,
    tls: Arc<ReloadableTls>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), SiteError> {
    type S = TicketsServer<TicketsGrpc>;
    let svc = S::new(TicketsGrpc::new(tickets, key_vault));
    serve_with!(svc, S, chipsite_ticket::policy(), listener, tls, shutdown)
}

pub async fn serve_admin(
    admin: Arc<Admin>,
    key_vault: Channel,
    tickets: Channel,
    listener: TcpListener,
    tls: Arc<ReloadableTls>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), SiteError> {
    type S = AdminServiceServer<AdminGrpc>;
    let svc = S::new(AdminGrpc::new(admin, key_vault, tickets));
    serve_with!(svc, S, chipsite_admin::policy(), listener, tls, shutdown)
}
