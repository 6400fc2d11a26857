//! The process's metrics, in Prometheus' text format on the ops port
//! (`/metrics`): every gRPC server's calls by method and status code (one
//! tower layer, [`RpcMetricsLayer`], beside the trace layer), and what the
//! user gateway and the alarm notifier count. One registry per process:
//! `chipsite dev` reports every service it runs, `chipsite serve` its one.

use std::{
    future::Future,
    pin::Pin,
    sync::OnceLock,
    task::{Context, Poll},
    time::Instant,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tower::{Layer, Service};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// The gRPC path: `/package.Service/Method`.
    pub method: String,
    /// The gRPC status code (0 is OK).
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChannelLabels {
    pub channel: &'static str,
}

/// Everything the process counts.
#[derive(Debug)]
pub struct Metrics {
    pub rpc_requests: Family<RpcLabels, Counter>,
    pub rpc_seconds: Family<RpcLabels, Histogram>,
    /// Open app sessions on the user gateway.
    pub gateway_sessions: Gauge,
    /// TLS handshakes on the user gateway, by outcome (`ok`, `failed`, `timeout`).
    pub gateway_handshakes: Family<OutcomeLabels, Counter>,
    /// Enrollment connections, by outcome (`enrolled`, `refused`, `no_request`).
    pub gateway_enrollments: Family<OutcomeLabels, Counter>,
    /// Alarms delivered, by channel (`session`, `email`, `sms`).
    pub alarm_deliveries: Family<ChannelLabels, Counter>,
    registry: Registry,
}

fn rpc_histogram() -> Histogram {
    // 0.25 ms .. ~8 s
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

impl Metrics {
    fn new() -> Self {
        let rpc_requests = Family::<RpcLabels, Counter>::default();
        let rpc_seconds =
            Family::<RpcLabels, Histogram>::new_with_constructor(rpc_histogram as fn() -> Histogram);
        let gateway_sessions = Gauge::default();
        let gateway_handshakes = Family::<OutcomeLabels, Counter>::default();
        let gateway_enrollments = Family::<OutcomeLabels, Counter>::default();
        let alarm_deliveries = Family::<ChannelLabels, Counter>::default();
        let mut registry = Registry::with_prefix("chipsite");
        registry.register(
            "grpc_server_requests",
            "gRPC calls served, by method and status code",
            rpc_requests.clone(),
        );
        registry.register(
            "grpc_server_seconds",
            "gRPC call latency until the response headers, by method and status code",
            rpc_seconds.clone(),
        );
        registry.register(
            "gateway_sessions",
            "App sessions open on the user gateway",
            gateway_sessions.clone(),
        );
        registry.register(
            "gateway_handshakes",
            "TLS handshakes on the user gateway, by outcome",
            gateway_handshakes.clone(),
        );
        registry.register(
            "gateway_enrollments",
            "Enrollment attempts on the user gateway, by outcome",
            gateway_enrollments.clone(),
        );
        registry.register(
            "alarm_deliveries",
            "Alarms delivered, by channel",
            alarm_deliveries.clone(),
        );
        Self {
            rpc_requests,
            rpc_seconds,
            gateway_sessions,
            gateway_handshakes,
            gateway_enrollments,
            alarm_deliveries,
            registry,
        }
    }

    /// Everything, in the OpenMetrics text format (which Prometheus reads).
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!(error = %e, "could not encode the metrics");
        }
        text
    }
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// Counts each call the policy let through and times it until its response
/// headers (`method` is `unimplemented` for a path no service has). The status
/// code is the `grpc-status` of a trailers-only response (how tonic answers
/// every error a handler returns), else 0: a stream that fails after its
/// headers counts as OK here.
#[derive(Debug, Clone, Default)]
pub struct RpcMetricsLayer;

impl<S> Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics { inner }
    }
}

#[derive(Debug, Clone)]
pub struct RpcMetrics<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B, R> Service<http::Request<B>> for RpcMetrics<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
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
        let method = request.uri().path().to_owned();
        let start = Instant::now();
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let result = inner.call(request).await;
            let code = match &result {
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("0")
                    .to_owned(),
                Err(_) => "transport".to_owned(),
            };
            // A path no service has (within one the policy let through)
            // is not a label value of its own.
            let method = if code == "12" {
                "unimplemented".to_owned()
            } else {
                method
            };
            let labels = RpcLabels { method, code };
            let m = metrics();
            m.rpc_requests.get_or_create(&labels).inc();
            m.rpc_seconds
                .get_or_create(&labels)
                .observe(start.elapsed().as_secs_f64());
            result
        })
    }
}
