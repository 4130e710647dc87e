//! The application state (a cheap `Clone` handle) and the router.

use std::ops::Deref;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
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
use crate::storage::Store;
use crate::upstream::Upstreams;

pub struct Shared {
    pub config: Config,
    pub store: Store,
    pub upstreams: Upstreams,
    pub cache: Cache,
    pub sessions: Sessions,
    pub metrics: Metrics,
    pub access: Access,
    pub status: crate::status::Tracker,
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

impl StartError {
    /// The object store did not answer (or failed): worth waiting for, unlike a wrong setting.
    fn store_unavailable(&self) -> bool {
        match self {
            StartError::Storage { source: e, .. }
            | StartError::Index(e)
            | StartError::Auth(AuthError::SigningKeyStore(e)) => crate::storage::is_unavailable(e),
            _ => false,
        }
    }
}

impl AppState {
    pub async fn new(config: Config) -> Result<Self, StartError> {
        // reqwest and the TLS listener share one crypto provider; installing twice is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let metrics = Metrics::new();
        let store = crate::storage::open(&config, true, &metrics)
            .map_err(|source| StartError::Storage { path: config.storage_root.clone(), source })?;
        let upstreams = Upstreams::new(&config, &metrics).map_err(StartError::Upstreams)?;
        let key = match &config.auth {
            Some(_) => crate::auth::signing_key(&store).await?,
            None => rand::random(),
        };
        let proxies = config.trusted_proxies.clone();
        let access = Access::new(config.auth.clone(), key, config.namespaces(), proxies, metrics.clone())?;
        let cluster = crate::cluster::Cluster::new(&config, &store, &metrics).await?;
        let cache = Cache::new(&config, store.clone(), metrics.clone(), cluster);
        Ok(AppState(Arc::new(Shared {
            config,
            store,
            upstreams,
            cache,
            sessions: Sessions::default(),
            metrics,
            access,
            status: Default::default(),
        })))
    }
}

impl AppState {
    /// Bring the store's gauges up to date (they are kept as plain counters by the store).
    pub fn refresh_store_gauges(&self) {
        let stats = self.store.stats();
        self.metrics.store_bytes.set(stats.bytes.load(std::sync::atomic::Ordering::Relaxed));
        self.metrics.store_objects.set(stats.objects.load(std::sync::atomic::Ordering::Relaxed));
        self.metrics.pinned_bytes.set(self.cache.lru.pinned_bytes() as i64);
    }
}

/// A mirror ready to serve: the state, with the store indexed and the background tasks
/// (eviction, pins, the purge of expired uploads) running. `main` and the tests start here.
///
/// An object store that cannot be used (no answer, or an error) is waited for, the wait growing
/// to 30 s between attempts: a replica started (or restarted by systemd) while the bucket is
/// away would otherwise exit, again and again, until systemd gives up on it.
pub async fn start(config: Config) -> Result<AppState, StartError> {
    const LONGEST_WAIT: Duration = Duration::from_secs(30);
    let mut wait = Duration::from_secs(1);
    let state = loop {
        match indexed(config.clone()).await {
            Err(e) if e.store_unavailable() => {
                tracing::warn!(error = %e, retry_in_seconds = wait.as_secs(), "the object store cannot be used; not serving until it can");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(LONGEST_WAIT);
            }
            result => break result?,
        }
    };
    evict::spawn(state.cache.clone());
    let config = &state.config;
    let (pins, every, referrers) = (config.pins.clone(), config.pin_refresh, config.pin_referrers);
    pins::spawn(state.cache.clone(), state.upstreams.clone(), pins, every, referrers);
    uploads::spawn_purge(state.clone());
    if let Some(cluster) = &state.cache.cluster {
        cluster.spawn_announcements(state.config.ui_enabled);
    }
    if state.config.ui_enabled {
        crate::status::spawn(state.clone()).await;
    }
    Ok(state)
}

/// The state, with the store indexed.
async fn indexed(config: Config) -> Result<AppState, StartError> {
    let state = AppState::new(config).await?;
    let started = Instant::now();
    evict::load(&state.cache).await.map_err(StartError::Index)?;
    tracing::info!(ms = started.elapsed().as_millis() as u64, "store indexed");
    Ok(state)
}

/// After the listeners drained: keep what must outlive the process (access times for the
/// eviction order, the status page's history), stop the background tasks that write them, give
/// up the leases this replica holds and take its record out of the bucket.
pub async fn shutdown(state: &AppState) {
    // First: the other replicas wait for these.
    if let Some(cluster) = &state.cache.cluster {
        cluster.release_leases().await;
    }
    if state.config.ui_enabled {
        crate::status::stop(state).await;
    }
    if let Err(e) = state.cache.lru.persist() {
        tracing::warn!(error = %e, "could not persist access times");
    }
    if let Some(cluster) = &state.cache.cluster {
        cluster.withdraw().await;
    }
}

pub fn router(state: AppState) -> Router {
    let mut router = Router::new();
    if state.config.ui_enabled {
        router = router.route("/", get(crate::status::page)).route("/api/status", get(crate::status::json));
    }
    router
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/ca.crt", get(ca_certificate))
        .route("/auth/token", get(registry::token::token))
        .route("/_regmirror/fills/{digest}", get(registry::blobs::for_replica))
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
                state.refresh_store_gauges();
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
        Err(e) if crate::storage::is_unavailable(&e) => {
            tracing::warn!(error = %e, "not ready: storage backend unavailable");
            (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n").into_response()
        }
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
        "/" => "/",
        "/api/status" => "/api/status",
        _ => "other",
    };
    let head = method == axum::http::Method::HEAD;
    let resp = next.run(req).await;
    let info = resp
        .extensions()
        .get::<RequestInfo>()
        .cloned()
        .unwrap_or(RequestInfo { route: path_route, ..Default::default() });
    let status = resp.status();
    state.metrics.requests.with_label_values(&[method.as_str(), info.route, status.as_str()]).inc();
    state
        .metrics
        .request_duration
        .with_label_values(&[method.as_str(), info.route])
        .observe(started.elapsed().as_secs_f64());
    let expected = match head {
        true => Some(0),
        false => resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .or_else(|| http_body::Body::size_hint(resp.body()).exact()),
    };
    let line = RequestLine {
        method,
        status: status.as_u16(),
        info,
        error: resp.extensions().get::<LoggedError>().map(|e| e.0.clone()),
        started,
        expected,
        sent: 0,
        finished: head || http_body::Body::is_end_stream(resp.body()),
    };
    resp.map(|body| Body::new(LoggedBody { inner: body, line }))
}

/// What the request log says of one request, written when its response body is done: sent to
/// the last byte, or dropped early (the client went away, or the body failed).
struct RequestLine {
    method: axum::http::Method,
    status: u16,
    info: RequestInfo,
    error: Option<String>,
    started: Instant,
    /// The body's length as announced (0 for HEAD), when known.
    expected: Option<u64>,
    sent: u64,
    finished: bool,
}

impl Drop for RequestLine {
    fn drop(&mut self) {
        let aborted = !self.finished && self.expected.is_none_or(|n| self.sent < n);
        tracing::info!(
            target: "regmirror::request",
            method = %self.method,
            route = self.info.route,
            repository = self.info.repository.as_deref().unwrap_or(""),
            reference = self.info.reference.as_deref().unwrap_or(""),
            status = self.status,
            bytes = self.sent,
            duration_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            aborted,
            cache = self.info.cache.unwrap_or(""),
            upstream = self.info.upstream.as_deref().unwrap_or(""),
            error = self.error.as_deref().unwrap_or(""),
            "request"
        );
    }
}

/// A response body that counts what it hands to the connection.
struct LoggedBody {
    inner: Body,
    line: RequestLine,
}

impl http_body::Body for LoggedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.line.sent += data.len() as u64;
                }
                // hyper stops polling a body that says it has ended: that is its end too.
                if self.inner.is_end_stream() {
                    self.line.finished = true;
                }
            }
            std::task::Poll::Ready(None) => self.line.finished = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
