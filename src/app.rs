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

use crate::auth::{Access, AuthError};
use crate::cache::{evict, pins, Cache};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::registry::error::LoggedError;
use crate::registry::uploads::{self, Sessions};
use crate::registry::{self, RequestInfo};
use crate::storage::{fs::FsDriver, Store};
use crate::upstream::Upstreams;

pub struct Shared {
    pub config: Config,
    pub store: Store,
    pub upstreams: Upstreams,
    pub cache: Cache,
    pub sessions: Sessions,
    pub metrics: Metrics,
    pub access: Access,
}

#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// Why regmirror could not start serving.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("storage.root = {path:?} cannot be used: {source}")]
    Storage { path: std::path::PathBuf, source: std::io::Error },
    #[error("building upstream clients: {0}")]
    Upstreams(reqwest::Error),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("indexing the store: {0}")]
    Index(std::io::Error),
}

impl AppState {
    pub async fn new(config: Config) -> Result<Self, StartError> {
        // reqwest and the TLS listener share one crypto provider; installing twice is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let metrics = Metrics::new();
        let driver = FsDriver::new(&config.storage_root)
            .map_err(|source| StartError::Storage { path: config.storage_root.clone(), source })?;
        let store = Store::new(driver);
        let upstreams = Upstreams::new(&config, &metrics).map_err(StartError::Upstreams)?;
        let key = match &config.auth {
            Some(_) => crate::auth::signing_key(&store).await?,
            None => rand::random(),
        };
        let access = Access::new(config.auth.clone(), key, config.namespaces(), metrics.clone())?;
        let cache = Cache::new(&config, store.clone(), metrics.clone());
        Ok(AppState(Arc::new(Shared {
            config,
            store,
            upstreams,
            cache,
            sessions: Sessions::default(),
            metrics,
            access,
        })))
    }
}

/// A mirror ready to serve: the state, with the store indexed and the background tasks
/// (eviction, pins, the purge of expired uploads) running. `main` and the tests start here.
pub async fn start(config: Config) -> Result<AppState, StartError> {
    let state = AppState::new(config).await?;
    let started = Instant::now();
    evict::load(&state.cache).await.map_err(StartError::Index)?;
    tracing::info!(ms = started.elapsed().as_millis() as u64, "store indexed");
    evict::spawn(state.cache.clone());
    let config = &state.config;
    pins::spawn(state.cache.clone(), state.upstreams.clone(), config.pins.clone(), config.pin_refresh);
    uploads::spawn_purge(state.clone());
    Ok(state)
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/ca.crt", get(ca_certificate))
        .route("/auth/token", get(registry::token::token))
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

/// Ready when the store accepts a write.
async fn ready(State(state): State<AppState>) -> Response {
    match state.store.check_writable().await {
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
