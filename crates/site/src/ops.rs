//! The ops port: plain HTTP for container runtimes, kubelet and Prometheus,
//! with no client certificate and no shell needed (ADR 0008).
//!
//! - `GET /livez`: 200 while the process serves at all.
//! - `GET /readyz`: 200 when every service of this process can do its work
//!   (its store answers; the user gateway holds a certificate from the site
//!   key), else 503; each check on a line of its own. Not ready while the
//!   site is starting or stopping.
//! - `GET /metrics`: the process's metrics in the OpenMetrics text format.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use futures::future::BoxFuture;
use tokio::net::TcpListener;

use crate::{Shutdown, SiteError};

/// How long one readiness check may take before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

type Check = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// What "ready" means for the services of this process.
pub struct Readiness {
    checks: Mutex<Vec<(String, Check)>>,
    started: AtomicBool,
    stopping: Shutdown,
}

impl Readiness {
    pub(crate) fn new(stopping: Shutdown) -> Arc<Self> {
        Arc::new(Self {
            checks: Mutex::new(vec![]),
            started: AtomicBool::new(false),
            stopping,
        })
    }

    /// A condition this process needs to do its work, named for the
    /// `/readyz` answer.
    pub fn add<F, Fut>(&self, name: impl Into<String>, check: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
    {
        let check: Check = Arc::new(move || Box::pin(check()));
        if let Ok(mut checks) = self.checks.lock() {
            checks.push((name.into(), check));
        }
    }

    /// Every service of the process has started.
    pub(crate) fn started(&self) {
        self.started.store(true, Ordering::Release);
    }

    /// Whether the process is ready, and a line per check.
    pub async fn check(&self) -> (bool, Vec<String>) {
        if self.stopping.is_set() {
            return (false, vec!["stopping".into()]);
        }
        if !self.started.load(Ordering::Acquire) {
            return (false, vec!["starting".into()]);
        }
        let checks = self.checks.lock().map(|c| c.clone()).unwrap_or_default();
        let results = futures::future::join_all(checks.iter().map(|(name, check)| async move {
            match tokio::time::timeout(CHECK_TIMEOUT, check()).await {
                Ok(Ok(())) => (true, format!("ok {name}")),
                Ok(Err(why)) => (false, format!("not ready {name}: {why}")),
                Err(_) => (
                    false,
                    format!("not ready {name}: no answer within {CHECK_TIMEOUT:?}"),
                ),
            }
        }))
        .await;
        let ready = results.iter().all(|(ok, _)| *ok);
        (ready, results.into_iter().map(|(_, line)| line).collect())
    }
}

async fn livez() -> &'static str {
    "ok\n"
}

async fn readyz(State(r): State<Arc<Readiness>>) -> impl IntoResponse {
    let (ready, lines) = r.check().await;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, lines.join("\n") + "\n")
}

async fn metrics() -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        chipsite_telemetry::metrics::metrics().encode(),
    )
}

/// Serve the ops port until `shutdown`.
pub(crate) async fn serve(
    listener: TcpListener,
    readiness: Arc<Readiness>,
    shutdown: Shutdown,
) -> Result<(), SiteError> {
    let app = Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(readiness);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.wait())
        .await
        .map_err(|e| SiteError::Serve(format!("ops port: {e}")))
}
