//! The application state (a cheap `Clone` handle) and the router.

use std::ops::Deref;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::auth::Access;
use crate::cache::fill::Fills;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::registry::error::LoggedError;
use crate::registry::uploads::Sessions;
use crate::registry::{self, RequestInfo};
use crate::storage::{fs::FsDriver, Store};
use crate::upstream::Upstreams;

pub struct Shared {
    pub config: Config,
    pub store: Store,
    pub upstreams: Upstreams,
    pub fills: Fills,
    /// Upstream manifest requests in progress, shared by every client asking the same.
    pub manifest_flights: crate::cache::manifests::ManifestFlights,
    pub sessions: Sessions,
    pub metrics: Metrics,
    pub access: Access,
    pub lru: std::sync::Arc<crate::cache::lru::Lru>,
    /// Wakes the eviction task (a fill finished).
    pub evict_wakeup: tokio::sync::Notify,
    /// The eviction index is loaded.
    pub loaded: std::sync::atomic::AtomicBool,
}

#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl AppState {
    pub fn new(config: Config) -> Result<Self, String> {
        // reqwest and the TLS listener share one crypto provider; installing twice is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let metrics = Metrics::new();
        let driver = FsDriver::new(&config.storage_root)
            .map_err(|e| format!("storage.root = {:?} cannot be used: {e}", config.storage_root.display()))?;
        let upstreams = Upstreams::new(&config, &metrics).map_err(|e| format!("building upstream clients: {e}"))?;
        let upstream_names = config.upstreams.iter().map(|u| u.name.clone()).collect();
        let access = Access::new(config.auth.clone(), &config.storage_root, upstream_names, metrics.clone())?;
        let lru = Arc::new(crate::cache::lru::Lru::new(&config.storage_root));
        Ok(AppState(Arc::new(Shared {
            config,
            store: Store::new(driver),
            upstreams,
            fills: Fills::default(),
            manifest_flights: Default::default(),
            sessions: Sessions::default(),
            lru,
            metrics,
            access,
            evict_wakeup: tokio::sync::Notify::new(),
            loaded: std::sync::atomic::AtomicBool::new(false),
        })))
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/ca.crt", get(ca_certificate))
        .route("/auth/token", get(token))
        .fallback(registry::handle)
        .layer(middleware::from_fn_with_state(state.clone(), log_request))
        .with_state(state)
}

/// The metrics listener's router: `/metrics` only.
pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(state): State<AppState>| async move {
                let stats = state.store.stats();
                state.metrics.store_bytes.set(stats.bytes.load(std::sync::atomic::Ordering::Relaxed));
                state.metrics.store_objects.set(stats.objects.load(std::sync::atomic::Ordering::Relaxed));
                let gc = crate::gc::record(&state.store).await;
                state.metrics.gc_runs.set(gc.runs as i64);
                state.metrics.gc_freed_bytes.set(gc.freed_bytes as i64);
                ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
            }),
        )
        .with_state(state)
}

/// The CA certificate (public part only), in self-signed mode, so clients can bootstrap trust.
async fn ca_certificate(State(state): State<AppState>) -> Response {
    let crate::config::TlsConfig::SelfSigned { dir, .. } = &state.config.tls else {
        return (StatusCode::NOT_FOUND, "no CA: regmirror is not in self-signed TLS mode\n").into_response();
    };
    match tokio::fs::read(dir.join(crate::tls::CA_CERT)).await {
        Ok(pem) => ([(header::CONTENT_TYPE, "application/x-pem-file")], pem).into_response(),
        Err(_) => (StatusCode::NOT_FOUND, "CA certificate not found\n").into_response(),
    }
}

/// The token endpoint of the registry token flow (`docker login`, anonymous pulls).
async fn token(State(state): State<AppState>, req: Request) -> Response {
    let conn = req.extensions().get::<crate::auth::ConnInfo>().copied();
    let requested: Vec<String> = req
        .uri()
        .query()
        .map(|q| {
            form_urlencoded::parse(q.as_bytes()).filter(|(k, _)| k == "scope").map(|(_, v)| v.into_owned()).collect()
        })
        .unwrap_or_default();
    let scopes = requested
        .iter()
        .filter_map(|s| crate::auth::parse_scope(s))
        .filter_map(|(name, actions)| {
            let target = registry::resolve_target(&state, &name, None).ok()?;
            let mirrored = matches!(target, registry::Target::Mirror { .. });
            Some(crate::auth::Scope { name, local: target.local().to_string(), mirrored, actions })
        })
        .collect();
    state.access.token_endpoint(req.headers(), conn, scopes).await
}

/// Ready when the store accepts a write.
async fn ready(State(state): State<AppState>) -> Response {
    match state.store.driver().put("tmp/.readyz", b"ok").await {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("store not writable: {e}\n")).into_response(),
    }
}

/// One log line and the request metrics per request.
async fn log_request(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let path_route = match req.uri().path() {
        "/healthz" => "/healthz",
        "/readyz" => "/readyz",
        "/ca.crt" => "/ca.crt",
        "/auth/token" => "/auth/token",
        _ => "other",
    };
    let resp = next.run(req).await;
    let info = resp
        .extensions()
        .get::<RequestInfo>()
        .cloned()
        .unwrap_or(RequestInfo { route: path_route, ..Default::default() });
    let status = resp.status();
    let elapsed = started.elapsed();
    state.metrics.requests.with_label_values(&[method.as_str(), info.route, status.as_str()]).inc();
    state.metrics.request_duration.with_label_values(&[method.as_str(), info.route]).observe(elapsed.as_secs_f64());
    let bytes = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let error = resp.extensions().get::<LoggedError>().map(|e| e.0.as_str());
    tracing::info!(
        target: "regmirror::request",
        method = %method,
        route = info.route,
        repository = info.repository.as_deref().unwrap_or(""),
        reference = info.reference.as_deref().unwrap_or(""),
        status = status.as_u16(),
        bytes,
        duration_ms = elapsed.as_secs_f64() * 1000.0,
        cache = info.cache.unwrap_or(""),
        upstream = info.upstream.as_deref().unwrap_or(""),
        error = error.unwrap_or(""),
        "request"
    );
    resp
}
