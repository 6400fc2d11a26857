//! W3C trace context (`traceparent`, `tracestate`) across internal gRPC:
//! clients inject the current span's context into request metadata; servers
//! start each request's span as a child of the context they receive. With
//! no OpenTelemetry layer installed both sides are cheap no-ops.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use chipsite_tls::InternalChannel;
use opentelemetry::propagation::{Extractor, Injector};
use tonic::{
    Request, Status,
    metadata::{MetadataKey, MetadataMap, MetadataValue},
    service::interceptor::InterceptedService,
};
use tower::{Layer, Service};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Use the W3C trace-context propagator process-wide. Idempotent.
pub fn install_propagator() {
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
}

/// An internal channel whose requests carry the caller's trace context.
pub type TracedChannel = InterceptedService<InternalChannel, fn(Request<()>) -> Result<Request<()>, Status>>;

pub fn traced(channel: InternalChannel) -> TracedChannel {
    InterceptedService::new(
        channel,
        inject_trace_context as fn(Request<()>) -> Result<Request<()>, Status>,
    )
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// Interceptor: put the current span's trace context into the request.
pub fn inject_trace_context(mut request: Request<()>) -> Result<Request<()>, Status> {
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut MetadataInjector(request.metadata_mut()))
    });
    Ok(request)
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Tower layer for servers: one span per request, named after the RPC and
/// parented on the trace context the caller sent.
#[derive(Debug, Clone, Default)]
pub struct TraceContextLayer;

impl<S> Layer<S> for TraceContextLayer {
    type Service = TraceContext<S>;
    fn layer(&self, inner: S) -> Self::Service {
        TraceContext { inner }
    }
}

#[derive(Debug, Clone)]
pub struct TraceContext<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B> Service<http::Request<B>> for TraceContext<S>
where
    S: Service<http::Request<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let parent = opentelemetry::global::get_text_map_propagator(|p| {
            p.extract(&HeaderExtractor(request.headers()))
        });
        let path = request.uri().path();
        let span = tracing::info_span!("grpc", otel.name = %path, otel.kind = "server", rpc.system = "grpc");
        let _ = span.set_parent(parent);
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move { inner.call(request).await }.instrument(span))
    }
}
