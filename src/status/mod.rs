//! The status page (`GET /`) and its JSON (`GET /api/status`): what the mirror holds, what it
//! saved, what it is doing right now. Both come from one [`Status`], built from the same counters
//! `/metrics` shows, and both show a visitor only the repositories they may pull.

mod history;
mod page;
mod repositories;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::app::AppState;
use crate::auth::{ConnInfo, Principal};
use crate::cache::fill::FillStatus;
use crate::config::TlsConfig;
use crate::storage::unix_now;
pub use history::{Bucket, History};
pub use repositories::{RepoIndex, RepoRow};

/// The status page's own state, kept with the application's.
#[derive(Default)]
pub struct Tracker {
    pub history: History,
    pub repositories: RepoIndex,
    started: std::sync::OnceLock<Instant>,
    /// The server is shutting down: the background tasks end.
    stopping: std::sync::atomic::AtomicBool,
    stop: tokio::sync::Notify,
    /// The CA's fingerprint, read once.
    ca_sha256: std::sync::OnceLock<String>,
}

impl Tracker {
    fn stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// How often the hourly savings are brought up to date and written to the store.
const SAMPLE_EVERY: Duration = Duration::from_secs(60);

/// Load what the last run kept, then keep the history current and the repository summary
/// built in the background (until [`stop`]).
pub async fn spawn(state: AppState) {
    let _ = state.status.started.set(Instant::now());
    history::load(&state).await;
    repositories::spawn(state.clone());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = state.status.stop.notified() => return,
            }
            if state.status.stopping() {
                return;
            }
            state.status.history.sample(&state.metrics, unix_now());
            if let Err(e) = history::save(&state).await {
                tracing::warn!(error = %e, "could not save the status history");
            }
        }
    });
}

/// At shutdown: stop the background tasks and keep the history up to the last request.
pub async fn stop(state: &AppState) {
    state.status.stopping.store(true, std::sync::atomic::Ordering::Release);
    state.status.stop.notify_waiters();
    state.status.repositories.wake();
    state.status.history.sample(&state.metrics, unix_now());
    if let Err(e) = history::save(state).await {
        tracing::warn!(error = %e, "could not save the status history");
    }
}

/// Everything the page and the JSON show.
#[derive(Serialize)]
pub struct Status {
    pub version: &'static str,
    /// Unix seconds.
    pub generated_at: u64,
    pub uptime_seconds: u64,
    /// Who the figures were filtered for: `null` for an anonymous visitor.
    pub user: Option<String>,
    pub savings: Savings,
    pub store: StoreStatus,
    pub upstreams: Vec<UpstreamStatus>,
    pub fills: Vec<FillStatus>,
    /// The replicas on the same bucket (`[cluster]`), this one first; `null` for a lone replica.
    /// Their addresses only to a signed-in user (or where `[auth]` is off).
    pub replicas: Option<Vec<crate::cluster::ReplicaView>>,
    pub repositories: RepositoryPage,
    pub client: ClientSetup,
}

/// Since the server started (the same counters as `/metrics`), and hourly for the last 24 hours.
#[derive(Serialize)]
pub struct Savings {
    /// Blob bytes sent to clients (`regmirror_served_bytes_total`).
    pub served_bytes: u64,
    /// Of those, read from the store rather than streamed from a fill (`source="cache"`).
    pub served_from_store_bytes: u64,
    /// Bytes received from upstreams (`regmirror_upstream_bytes_total`).
    pub upstream_bytes: u64,
    /// Lookups of mirrored content (`regmirror_cache_requests_total`).
    pub lookups: u64,
    /// Lookups answered from the store: outcome hit, revalidated (a HEAD only) or stale.
    pub answered_from_store: u64,
    /// `answered_from_store / lookups` (0 without lookups).
    pub hit_ratio: f64,
    /// Lookups answered without any request upstream (outcome hit).
    pub upstream_requests_avoided: u64,
    /// Of those, manifest lookups (GET and HEAD): Docker Hub's pull limit counts manifest GETs.
    pub manifest_requests_avoided: u64,
    pub history: Vec<Bucket>,
}

#[derive(Serialize)]
pub struct StoreStatus {
    pub bytes: u64,
    /// `storage.max_size`; `null` when unbounded.
    pub max_bytes: Option<u64>,
    pub blobs: u64,
    /// Repositories this visitor may see.
    pub repositories: usize,
    pub pinned_bytes: u64,
    pub last_eviction: Option<crate::cache::EvictionRecord>,
    pub last_gc: Option<GcStatus>,
}

#[derive(Serialize)]
pub struct GcStatus {
    /// Unix seconds of the last run's end; 0 when recorded by an older version.
    pub at: u64,
    pub runs: u64,
    pub freed_bytes: u64,
}

#[derive(Serialize)]
pub struct UpstreamStatus {
    pub name: String,
    pub url: String,
    /// "ok", "rate-limited", "failing" or "unknown" (not asked since the start).
    pub state: &'static str,
    /// Failing since, or rate-limited until (Unix seconds).
    pub since: Option<u64>,
    pub until: Option<u64>,
    pub last_error: Option<String>,
    pub last_error_at: Option<u64>,
    /// `regmirror_upstream_requests_total` and `regmirror_upstream_failures_total` for it.
    pub requests: u64,
    pub errors: u64,
    pub ratelimit_limit: Option<u64>,
    pub ratelimit_remaining: Option<u64>,
    pub ratelimit_window_seconds: Option<u64>,
}

#[derive(Serialize)]
pub struct RepositoryPage {
    /// Repositories matching the search, of those the visitor may see.
    pub total: usize,
    pub page: usize,
    pub per_page: usize,
    pub query: String,
    pub sort: &'static str,
    pub descending: bool,
    pub items: Vec<RepositoryStatus>,
    /// Unix seconds of the summary the sizes come from (rebuilt in the background on change).
    pub as_of: u64,
}

#[derive(Serialize)]
pub struct RepositoryStatus {
    pub name: String,
    /// "mirrored" or "private".
    pub kind: &'static str,
    pub size_bytes: u64,
    pub blobs: usize,
    /// Unix seconds of the last manifest GET; `null` when never pulled since it was recorded.
    pub last_pull: Option<u64>,
    pub pinned: bool,
}

#[derive(Serialize)]
pub struct ClientSetup {
    /// The address the visitor used (the request's Host), or the configured one.
    pub host: String,
    /// `/ca.crt`, in self-signed mode.
    pub ca_url: Option<String>,
    /// SHA-256 of the CA certificate (DER), as `openssl x509 -fingerprint -sha256` prints it.
    pub ca_sha256: Option<String>,
    /// The text `regmirror client-setup` prints.
    pub setup: String,
}

/// The repository table's view: search, sort, page (query parameters, so it works without
/// JavaScript).
#[derive(Debug, Default, serde::Deserialize)]
pub struct View {
    #[serde(default)]
    pub q: String,
    pub sort: Option<String>,
    #[serde(default)]
    pub desc: Option<String>,
    pub page: Option<usize>,
    pub per_page: Option<usize>,
    /// `?login`: ask for credentials (HTTP Basic).
    pub login: Option<String>,
}

const PER_PAGE: usize = 50;
const MAX_PER_PAGE: usize = 1000;

impl Status {
    pub fn collect(state: &AppState, who: &Principal, view: &View, host: &str) -> Status {
        let now = unix_now();
        state.refresh_store_gauges();
        let m = &state.metrics;
        let snapshot = state.status.history.sample(m, now);
        let sum = |family: &str, labels: &[(&str, &str)]| snapshot.sum(family, labels) as u64;
        let totals = history::Counters::of(&snapshot);
        let hit = |kind: Option<&str>| {
            let mut labels = vec![("outcome", "hit")];
            labels.extend(kind.map(|k| ("kind", k)));
            sum("regmirror_cache_requests_total", &labels)
        };
        let savings = Savings {
            served_bytes: totals.served,
            served_from_store_bytes: sum("regmirror_served_bytes_total", &[("source", "cache")]),
            upstream_bytes: totals.upstream,
            lookups: totals.lookups,
            answered_from_store: totals.answered,
            hit_ratio: if totals.lookups == 0 { 0.0 } else { totals.answered as f64 / totals.lookups as f64 },
            upstream_requests_avoided: hit(None),
            manifest_requests_avoided: hit(Some("manifest")),
            history: state.status.history.last_day(now),
        };

        let visible = |name: &crate::oci::RepoName| state.access.may_pull(who, name);
        let index = state.status.repositories.current(state);
        let pulls = crate::lock(&state.cache.last_pulls).clone();
        let repositories = repository_page(&index.rows, &pulls, view, &visible, index.built_at);

        let gc = state.status.history.gc();
        let store = StoreStatus {
            bytes: m.store_bytes.get().max(0) as u64,
            max_bytes: state.config.max_size,
            blobs: m.store_objects.get().max(0) as u64,
            repositories: index.rows.iter().filter(|r| visible(&r.name)).count(),
            pinned_bytes: m.pinned_bytes.get().max(0) as u64,
            last_eviction: *crate::lock(&state.cache.last_eviction),
            last_gc: (gc.runs > 0).then_some(GcStatus { at: gc.last_run, runs: gc.runs, freed_bytes: gc.freed_bytes }),
        };

        let upstreams = state
            .upstreams
            .all()
            .into_iter()
            .map(|u| {
                let h = u.health();
                let name = u.name();
                let (state, since, until) = match (h.rate_limited_until, h.failing_since, h.last_ok) {
                    (Some(t), _, _) if t > now => ("rate-limited", None, Some(t)),
                    (_, Some(t), _) => ("failing", Some(t), None),
                    (_, None, Some(_)) => ("ok", None, None),
                    _ => ("unknown", None, None),
                };
                UpstreamStatus {
                    name: name.to_string(),
                    url: u.url_display(),
                    state,
                    since,
                    until,
                    last_error: h.last_error,
                    last_error_at: h.last_error_at,
                    requests: sum("regmirror_upstream_requests_total", &[("upstream", name)]),
                    errors: sum("regmirror_upstream_failures_total", &[("upstream", name)]),
                    ratelimit_limit: h.ratelimit_limit,
                    ratelimit_remaining: h.ratelimit_remaining,
                    ratelimit_window_seconds: h.ratelimit_window,
                }
            })
            .collect();

        let fills = state
            .cache
            .fills
            .list()
            .into_iter()
            .filter(|f| crate::oci::RepoName::parse(&f.repository).is_ok_and(|r| visible(&r)))
            .collect();

        Status {
            version: env!("CARGO_PKG_VERSION"),
            generated_at: now,
            uptime_seconds: state.status.started.get().map_or(0, |s| s.elapsed().as_secs()),
            user: match who {
                Principal::User(u) => Some(u.clone()),
                Principal::Anonymous => None,
            },
            savings,
            store,
            upstreams,
            fills,
            replicas: state.cache.cluster.as_ref().map(|cluster| {
                let addresses = !state.access.enabled() || *who != Principal::Anonymous;
                let mut replicas = cluster.replicas();
                if !addresses {
                    replicas.iter_mut().for_each(|r| r.advertise = None);
                }
                replicas
            }),
            repositories,
            client: client_setup(state, host),
        }
    }
}

/// The visible repositories that match the search, sorted, one page of them.
fn repository_page(
    rows: &[RepoRow],
    pulls: &HashMap<crate::oci::RepoName, u64>,
    view: &View,
    visible: &dyn Fn(&crate::oci::RepoName) -> bool,
    as_of: u64,
) -> RepositoryPage {
    let query = view.q.trim().to_lowercase();
    // Visibility first: what a search costs must not depend on names the visitor cannot see.
    let mut matching: Vec<&RepoRow> = rows
        .iter()
        .filter(|r| visible(&r.name))
        .filter(|r| query.is_empty() || r.name.as_str().to_lowercase().contains(&query))
        .collect();
    let sort = match view.sort.as_deref() {
        Some("size") => "size",
        Some("pulled") => "pulled",
        _ => "name",
    };
    // Sizes and pull times read best largest and newest first.
    let descending = match view.desc.as_deref() {
        Some("1" | "true") => true,
        Some(_) => false,
        None => sort != "name",
    };
    let pulled = |r: &RepoRow| pulls.get(&r.name).copied().unwrap_or(0);
    match sort {
        "size" => matching.sort_by(|a, b| a.size.cmp(&b.size).then_with(|| a.name.as_str().cmp(b.name.as_str()))),
        "pulled" => {
            matching.sort_by(|a, b| pulled(a).cmp(&pulled(b)).then_with(|| a.name.as_str().cmp(b.name.as_str())))
        }
        _ => matching.sort_by(|a, b| a.name.as_str().cmp(b.name.as_str())),
    }
    if descending {
        matching.reverse();
    }
    let per_page = view.per_page.unwrap_or(PER_PAGE).clamp(1, MAX_PER_PAGE);
    let pages = matching.len().div_ceil(per_page).max(1);
    let page = view.page.unwrap_or(1).clamp(1, pages);
    let items = matching
        .iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .map(|r| RepositoryStatus {
            name: r.name.to_string(),
            kind: if r.mirrored { "mirrored" } else { "private" },
            size_bytes: r.size,
            blobs: r.blobs,
            last_pull: pulls.get(&r.name).copied(),
            pinned: r.pinned,
        })
        .collect();
    RepositoryPage {
        total: matching.len(),
        page,
        per_page,
        query: view.q.trim().to_string(),
        sort,
        descending,
        items,
        as_of,
    }
}

fn client_setup(state: &AppState, host: &str) -> ClientSetup {
    let (ca_path, ca_url) = match &state.config.tls {
        TlsConfig::SelfSigned { dir, .. } => (Some(dir.join(crate::tls::CA_CERT)), Some("/ca.crt".to_string())),
        TlsConfig::Files { cert, .. } => (Some(cert.clone()), None),
        TlsConfig::Off => (None, None),
    };
    // The setup text names the file a client saves, not where the server keeps it.
    let setup = match &ca_path {
        Some(_) => crate::tls::client_setup(host, std::path::Path::new("ca.crt")),
        None => format!(
            "TLS is off: clients must be told {host} is an insecure registry (or put a TLS-terminating proxy in front).\n"
        ),
    };
    let ca_sha256 = match (&state.config.tls, &ca_path) {
        (TlsConfig::SelfSigned { .. }, Some(p)) => match state.status.ca_sha256.get() {
            Some(f) => Some(f.clone()),
            // Read once: the CA outlives certificate renewals.
            None => crate::tls::fingerprint_sha256(p).ok().map(|f| state.status.ca_sha256.get_or_init(|| f).clone()),
        },
        _ => None,
    };
    ClientSetup { host: host.to_string(), ca_url, ca_sha256, setup }
}

/// The host the visitor used, if it is a plausible HOST[:PORT]; else the configured one.
fn visitor_host(state: &AppState, headers: &HeaderMap) -> String {
    let plausible = |h: &str| {
        !h.is_empty() && h.len() <= 255 && h.chars().all(|c| c.is_ascii_alphanumeric() || ".-:[]_".contains(c))
    };
    match headers.get(header::HOST).and_then(|v| v.to_str().ok()) {
        Some(h) if plausible(h) => h.to_string(),
        _ => crate::tls::default_client_host(&state.config),
    }
}

/// Who is looking (HTTP Basic against the htpasswd file, a browser's login, or one of our
/// tokens), from where.
struct Visitor {
    who: Principal,
    /// Credentials came and were wrong.
    rejected: bool,
    host: String,
}

impl Visitor {
    async fn of(state: &AppState, req: Request) -> Visitor {
        let conn = req.extensions().get::<ConnInfo>().copied();
        let headers = req.headers().clone();
        drop(req);
        let authn = state.access.authenticate(&headers, conn, true).await;
        Visitor { who: authn.principal, rejected: authn.rejected, host: visitor_host(state, &headers) }
    }
}

/// `GET /`.
pub async fn page(State(state): State<AppState>, Query(view): Query<View>, req: Request) -> Response {
    let started = Instant::now();
    let Visitor { who, rejected, host } = Visitor::of(&state, req).await;
    if state.access.enabled() && (view.login.is_some() || rejected) && who == Principal::Anonymous {
        return login_challenge();
    }
    let status = Status::collect(&state, &who, &view, &host);
    // Logging in sends a password: offered only where it is encrypted.
    let login = state.access.enabled() && !matches!(state.config.tls, TlsConfig::Off);
    let html = page::render(&status, login);
    let mut resp = ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response();
    secure(&mut resp, started, true);
    resp
}

/// `GET /api/status`.
pub async fn json(State(state): State<AppState>, Query(view): Query<View>, req: Request) -> Response {
    let started = Instant::now();
    let Visitor { who, rejected, host } = Visitor::of(&state, req).await;
    if rejected {
        return login_challenge();
    }
    let status = Status::collect(&state, &who, &view, &host);
    let mut resp = axum::Json(status).into_response();
    secure(&mut resp, started, false);
    resp
}

fn login_challenge() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [
            (header::WWW_AUTHENTICATE, "Basic realm=\"regmirror\", charset=\"UTF-8\""),
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        "<!doctype html><title>regmirror: log in</title><p>Log in with your registry user name and password, or go <a href=\"/\">back to the status page</a>.</p>\n",
    )
        .into_response()
}

/// No caching (the figures are live, and may be per user), a strict content security policy,
/// and the server time in `Server-Timing`.
fn secure(resp: &mut Response, started: Instant, html: bool) {
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::VARY, HeaderValue::from_static("Authorization"));
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    if html {
        if let Ok(v) = HeaderValue::from_str(&page::content_security_policy()) {
            h.insert(header::CONTENT_SECURITY_POLICY, v);
        }
        h.insert("x-frame-options", HeaderValue::from_static("DENY"));
        h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    }
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    if let Ok(v) = HeaderValue::from_str(&format!("render;dur={ms:.2}")) {
        h.insert("server-timing", v);
    }
}
