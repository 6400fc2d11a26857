//! Per-RPC authorization of internal callers by certificate identity.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tower::{Layer, Service};

use crate::identity_of;

/// The identity of the internal caller of an RPC, put into the request's
/// extensions by [`AuthzLayer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller(pub String);

impl Caller {
    /// The caller of a tonic request (set by [`AuthzLayer`]); "unknown" if absent.
    pub fn of<T>(request: &tonic::Request<T>) -> String {
        request
            .extensions()
            .get::<Caller>()
            .map(|c| c.0.clone())
            .unwrap_or_else(|| "unknown".to_owned())
    }
}

/// Which identities may call which gRPC method. Methods are named by their
/// path (`/package.Service/Method`); a rule for `/package.Service/` covers
/// every method of that service. Anything not named is refused.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    rules: HashMap<String, Vec<String>>,
}

impl Policy {
    pub fn new() -> Self {
        Self::default()
    }

    /// Allow `callers` to call `method` (`/pkg.Service/Method`, or `/pkg.Service/` for all).
    pub fn allow(mut self, method: &str, callers: &[&str]) -> Self {
        self.rules
            .entry(method.to_owned())
            .or_default()
            .extend(callers.iter().map(|c| (*c).to_owned()));
        self
    }

    /// Whether `caller` may call the method at `path`.
    pub fn permits(&self, path: &str, caller: &str) -> bool {
        let service = path.rfind('/').map(|i| &path[..=i]).unwrap_or(path);
        [path, service]
            .iter()
            .filter_map(|key| self.rules.get(*key))
            .any(|allowed| allowed.iter().any(|a| a == caller))
    }
}

/// Tower layer enforcing a [`Policy`] on a tonic server.
#[derive(Debug, Clone)]
pub struct AuthzLayer {
    policy: Arc<Policy>,
}

impl AuthzLayer {
    pub fn new(policy: Policy) -> Self {
        Self {
            policy: Arc::new(policy),
        }
    }
}

impl<S> Layer<S> for AuthzLayer {
    type Service = Authz<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Authz {
            inner,
            policy: self.policy.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Authz<S> {
    inner: S,
    policy: Arc<Policy>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B> Service<http::Request<B>> for Authz<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let caller = request
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|info| info.peer_certs())
            .and_then(|certs| certs.first().and_then(|leaf| identity_of(leaf)))
            // An in-process call: its certificates were verified by the
            // channel (`crate::local`), which alone can set this.
            .or_else(|| {
                request
                    .extensions()
                    .get::<crate::local::LocalCaller>()
                    .map(|c| c.0.clone())
            });
        let path = request.uri().path().to_owned();
        match caller {
            Some(caller) if self.policy.permits(&path, &caller) => {
                request.extensions_mut().insert(Caller(caller));
                // Take the service that was driven to readiness, leave a clone.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(async move { inner.call(request).await })
            }
            caller => {
                let who = caller
                    .as_deref()
                    .unwrap_or("a caller without an internal identity");
                tracing::warn!(%path, caller = who, "internal call refused by policy");
                let mut code = tonic::metadata::MetadataMap::new();
                code.insert(
                    chipsite_model::CODE_METADATA,
                    tonic::metadata::MetadataValue::from_static(
                        chipsite_model::ErrorCode::Forbidden.as_str(),
                    ),
                );
                let status = tonic::Status::with_metadata(
                    tonic::Code::PermissionDenied,
                    format!("{who} may not call {path}"),
                    code,
                );
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_matches_methods_and_services_and_refuses_the_rest() {
        let p = Policy::new().allow("/a.S/M", &["x"]).allow("/a.T/", &["y"]);
        assert!(p.permits("/a.S/M", "x"));
        assert!(!p.permits("/a.S/M", "y"));
        assert!(!p.permits("/a.S/N", "x"));
        assert!(p.permits("/a.T/Anything", "y"));
        assert!(!p.permits("/a.T/Anything", "x"));
        assert!(!p.permits("/b.U/M", "x"));
    }
}
