//! What every internal gRPC server of the site shares: internal mutual TLS
//! on an already-bound listener, the authorization policy, W3C trace
//! context, metrics, gRPC health (NOT_SERVING while draining), server
//! reflection, and a bounded drain. Each service crate's `serve` is one
//! [`serve_with!`] call.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use chipsite_tls::{Policy, identity as id};

// For `serve_with!` in other crates.
#[doc(hidden)]
pub use {chipsite_telemetry, chipsite_tls, tokio, tonic, tonic_health, tower};

/// Why a server stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("server reflection: {0}")]
    Reflection(String),
    #[error("server: {0}")]
    Transport(String),
    /// A background task the server runs beside itself ended.
    #[error("{0}")]
    TaskEnded(String),
}

/// How long a stopping server waits for open calls and streams (a health
/// `Watch` never ends by itself) before it stops anyway.
pub const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// Runs each call's handler on a task of its own, so a caller that goes away
/// mid-call cannot cut a command short between its writes and its audit record.
#[derive(Debug, Clone, Default)]
pub struct RunToCompletionLayer;

impl<S> tower::Layer<S> for RunToCompletionLayer {
    type Service = RunToCompletion<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RunToCompletion { inner }
    }
}

#[derive(Debug, Clone)]
pub struct RunToCompletion<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B> tower::Service<http::Request<B>> for RunToCompletion<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        // The task keeps the call's span (and so its trace context).
        let span = tracing::Span::current();
        let call = tokio::spawn(tracing::Instrument::instrument(
            async move { inner.call(request).await },
            span,
        ));
        Box::pin(async move {
            match call.await {
                Ok(result) => result,
                Err(e) => {
                    tracing::error!(error = %e, "a call handler failed");
                    let status = chipsite_proto::status::status(
                        chipsite_proto::status::ErrorCode::Internal,
                        "internal error",
                    );
                    Ok(status.into_http())
                }
            }
        })
    }
}

/// Serve until `shutdown`, then drain for at most [`DRAIN_GRACE`].
#[doc(hidden)]
pub async fn serve_until<F>(server: F, stopping: tokio::sync::watch::Receiver<bool>) -> Result<(), ServeError>
where
    F: Future<Output = Result<(), tonic::transport::Error>>,
{
    let mut stopping = stopping;
    let grace = async move {
        let _ = stopping.wait_for(|s| *s).await;
        tokio::time::sleep(DRAIN_GRACE).await;
    };
    tokio::select! {
        result = server => result.map_err(|e| ServeError::Transport(e.to_string())),
        () = grace => {
            tracing::warn!("calls still open after the grace period; stopping anyway");
            Ok(())
        }
    }
}

/// Health for every identity; reflection for the operator and console.
#[doc(hidden)]
pub fn with_common(p: Policy) -> Policy {
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

/// Server reflection advertising a server's own services (with health and reflection).
#[doc(hidden)]
pub fn reflection(services: &[&'static str]) -> tonic_reflection::server::Builder<'static> {
    services
        .iter()
        .fold(tonic_reflection::server::Builder::configure(), |b, s| {
            b.with_service_name(*s)
        })
        .register_encoded_file_descriptor_set(chipsite_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name("grpc.health.v1.Health")
        .with_service_name("grpc.reflection.v1.ServerReflection")
        .with_service_name("grpc.reflection.v1alpha.ServerReflection")
}

/// Serve `[service => ServerType, …]` with `policy` on `listener` until
/// `shutdown`, then drain for at most [`DRAIN_GRACE`]; `run_to_completion`
/// runs each handler on a task of its own ([`RunToCompletionLayer`]).
#[macro_export]
macro_rules! serve_with {
    ([$($svc:expr => $server_ty:ty),+], $policy:expr, $run_to_completion:expr, $listener:expr, $tls:expr, $shutdown:expr) => {{
        let names = [$(<$server_ty as $crate::tonic::server::NamedService>::NAME),+];
        let (reporter, health) = $crate::tonic_health::server::health_reporter();
        $(reporter.set_serving::<$server_ty>().await;)+
        let reflection_v1 = $crate::reflection(&names)
            .build_v1()
            .map_err(|e| $crate::ServeError::Reflection(e.to_string()))?;
        let reflection_v1alpha = $crate::reflection(&names)
            .build_v1alpha()
            .map_err(|e| $crate::ServeError::Reflection(e.to_string()))?;
        $crate::chipsite_telemetry::install_propagator();
        let (stopping_tx, stopping) = $crate::tokio::sync::watch::channel(false);
        let shutdown = async move {
            $shutdown.await;
            // Draining: health says so at once, to probes and watchers alike.
            reporter
                .set_service_status("", $crate::tonic_health::ServingStatus::NotServing)
                .await;
            $(reporter.set_not_serving::<$server_ty>().await;)+
            let _ = stopping_tx.send(true);
        };
        let policy = $crate::with_common($policy);
        let routes = $crate::tonic::service::Routes::new(health)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            $(.add_service($svc))+;
        let listener: $crate::tokio::net::TcpListener = $listener;
        let tls: ::std::sync::Arc<$crate::chipsite_tls::ReloadableTls> = $tls;
        // The same stack, callable by services in this process
        // (`chipsite_tls::local`); withdrawn when the server starts draining.
        let registration = listener.local_addr().ok().and_then(|addr| {
            $crate::chipsite_tls::local::register(
                addr,
                tls.clone(),
                $crate::tower::ServiceBuilder::new()
                    .layer($crate::chipsite_telemetry::TraceContextLayer)
                    .layer($crate::chipsite_tls::AuthzLayer::new(policy.clone()))
                    .layer($crate::chipsite_telemetry::metrics::RpcMetricsLayer)
                    .option_layer($run_to_completion.then_some($crate::RunToCompletionLayer))
                    .service(routes.clone().prepare()),
            )
        });
        let shutdown = async move {
            shutdown.await;
            drop(registration);
        };
        let server = $crate::tonic::transport::Server::builder()
            .layer($crate::chipsite_telemetry::TraceContextLayer)
            .layer($crate::chipsite_tls::AuthzLayer::new(policy))
            // Inside the policy: only calls it let through are counted, so
            // a caller cannot mint label values with made-up paths.
            .layer($crate::chipsite_telemetry::metrics::RpcMetricsLayer)
            .layer($crate::tower::util::option_layer(
                $run_to_completion.then_some($crate::RunToCompletionLayer),
            ))
            .add_routes(routes)
            .serve_with_incoming_shutdown($crate::chipsite_tls::tls_incoming(
                listener,
                tls,
                $crate::chipsite_tls::Admission::new($crate::chipsite_tls::AdmissionLimits::INTERNAL),
            ), shutdown);
        $crate::serve_until(server, stopping).await
    }};
}
