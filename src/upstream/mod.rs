//! Upstream registries: one HTTP client each, Docker Hub's bearer-token flow with a token cache
//! per scope, redirects that never carry our credentials to another host, and failures sorted by
//! cause.

pub mod auth;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, RANGE, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode};

use crate::config::{Config, UpstreamConfig};
use crate::metrics::Metrics;
use crate::oci::{Digest, RepoName, ACCEPT_ALL};
use auth::{Challenge, TokenCache};

/// Why an upstream could not answer; `cause()` is the metrics label.
#[derive(Clone, Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream {upstream} timed out")]
    Timeout { upstream: String },
    #[error("upstream {upstream} unreachable: {detail}")]
    Unreachable { upstream: String, detail: String },
    #[error("upstream {upstream} answered {status}")]
    Status { upstream: String, status: u16 },
    #[error("upstream {upstream} is rate limiting (429)")]
    TooManyRequests { upstream: String, retry_after: Option<String> },
    #[error("upstream {upstream} sent content that does not match {digest}")]
    DigestMismatch { upstream: String, digest: String },
    #[error("upstream {upstream} connection broke: {detail}")]
    Reset { upstream: String, detail: String },
    #[error("upstream {upstream} sent a {what} larger than the limit of {limit} bytes")]
    TooLarge { upstream: String, what: &'static str, limit: u64 },
}

impl UpstreamError {
    pub fn cause(&self) -> &'static str {
        match self {
            UpstreamError::Timeout { .. } => "timeout",
            UpstreamError::Unreachable { .. } => "unreachable",
            UpstreamError::Status { status, .. } if *status >= 500 => "5xx",
            UpstreamError::Status { .. } => "4xx",
            UpstreamError::TooManyRequests { .. } => "429",
            UpstreamError::DigestMismatch { .. } => "digest_mismatch",
            UpstreamError::Reset { .. } => "reset",
            UpstreamError::TooLarge { .. } => "too_large",
        }
    }

    /// A failure of the upstream itself (not an answer about the content): stale content may be
    /// served instead.
    pub fn is_outage(&self) -> bool {
        match self {
            UpstreamError::Status { status, .. } => *status >= 500,
            UpstreamError::DigestMismatch { .. } | UpstreamError::TooLarge { .. } => false,
            _ => true,
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, UpstreamError::Status { status: 404, .. })
    }

    /// The upstream says this repository does not have the content: 404, or 401/403, which
    /// Docker Hub answers for a repository that does not exist.
    pub fn is_absent(&self) -> bool {
        matches!(self, UpstreamError::Status { status: 401 | 403 | 404, .. })
    }
}

/// Largest token response read from an upstream's token service.
const TOKEN_LIMIT: u64 = 1 << 20;

/// The `Content-Length` header as sent. `reqwest::Response::content_length` is the length of the
/// body received, which is 0 for every HEAD response.
pub fn content_length(resp: &reqwest::Response) -> Option<u64> {
    resp.headers().get(reqwest::header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// What a request to an upstream is about (a metrics label).
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    Manifest,
    Blob,
    Tags,
    Referrers,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Manifest => "manifest",
            Kind::Blob => "blob",
            Kind::Tags => "tags",
            Kind::Referrers => "referrers",
        }
    }
}

/// What the status page says about an upstream: failures, rate limiting, and the pull allowance
/// Docker Hub announces in its `ratelimit-*` headers.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Health {
    /// When an answer last came that was not a failure (Unix seconds).
    pub last_ok: Option<u64>,
    /// Since when every request has failed; `None` once one succeeds.
    pub failing_since: Option<u64>,
    pub last_error: Option<String>,
    pub last_error_at: Option<u64>,
    /// Until when it asked not to be called (a 429's `Retry-After`; 60 s when it gave none).
    pub rate_limited_until: Option<u64>,
    /// `ratelimit-limit` and `ratelimit-remaining` as last sent.
    pub ratelimit_limit: Option<u64>,
    pub ratelimit_remaining: Option<u64>,
    /// The window they count over, in seconds (`;w=21600`).
    pub ratelimit_window: Option<u64>,
}

impl Health {
    fn succeeded(&mut self, headers: &HeaderMap) {
        let now = crate::storage::unix_now();
        self.last_ok = Some(now);
        self.failing_since = None;
        if self.rate_limited_until.is_some_and(|t| t <= now) {
            self.rate_limited_until = None;
        }
        // Docker Hub: `ratelimit-limit: 100;w=21600`, `ratelimit-remaining: 76;w=21600`.
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let count = |v: &str| v.split(';').next().and_then(|n| n.trim().parse::<u64>().ok());
        let window = |v: &str| {
            v.split(';').skip(1).find_map(|p| p.trim().strip_prefix("w=").and_then(|w| w.trim().parse::<u64>().ok()))
        };
        if let Some(limit) = header("ratelimit-limit") {
            self.ratelimit_limit = count(&limit);
            self.ratelimit_window = window(&limit);
        }
        if let Some(remaining) = header("ratelimit-remaining") {
            self.ratelimit_remaining = count(&remaining);
        }
    }

    fn failed(&mut self, e: &UpstreamError) {
        let now = crate::storage::unix_now();
        self.failing_since.get_or_insert(now);
        self.last_error = Some(e.to_string());
        self.last_error_at = Some(now);
        if let UpstreamError::TooManyRequests { retry_after, .. } = e {
            let wait = retry_after.as_deref().and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(60);
            self.rate_limited_until = Some(now + wait.min(86_400));
            self.ratelimit_remaining = Some(0);
        }
    }
}

pub struct Upstream {
    health: std::sync::Mutex<Health>,
    name: String,
    base: reqwest::Url,
    client: reqwest::Client,
    credentials: Option<(String, String)>,
    tokens: TokenCache,
    metrics: Metrics,
}

impl Upstream {
    pub fn new(cfg: &UpstreamConfig, timeout: Duration, metrics: Metrics) -> reqwest::Result<Self> {
        let client = reqwest::Client::builder()
            .user_agent(concat!("regmirror/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(timeout)
            .read_timeout(timeout)
            // reqwest drops Authorization when a redirect leaves the host (Docker Hub → CDN).
            .redirect(reqwest::redirect::Policy::limited(5))
            .build()?;
        let credentials = cfg.username.clone().zip(cfg.password.clone());
        Ok(Upstream {
            health: Default::default(),
            name: cfg.name.clone(),
            base: cfg.url.clone(),
            client,
            credentials,
            tokens: TokenCache::new(),
            metrics,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The upstream's URL without any user information.
    pub fn url_display(&self) -> String {
        let mut u = self.base.clone();
        let _ = u.set_username("");
        let _ = u.set_password(None);
        u.to_string()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The upstream URL of an API path, with an optional (encoded) query.
    fn url(&self, path: &str, query: Option<&str>) -> reqwest::Url {
        let mut url = self.base.clone();
        let base_path = url.path().trim_end_matches('/').to_string();
        url.set_path(&format!("{base_path}{path}"));
        url.set_query(query);
        url
    }

    /// Errors name no URL: after a redirect it is a CDN's, signed, and the status page shows the
    /// message to anyone.
    fn err_from(&self, e: reqwest::Error) -> UpstreamError {
        let e = e.without_url();
        let upstream = self.name.clone();
        if e.is_timeout() {
            UpstreamError::Timeout { upstream }
        } else if e.is_connect() {
            UpstreamError::Unreachable { upstream, detail: error_chain(&e) }
        } else {
            UpstreamError::Reset { upstream, detail: error_chain(&e) }
        }
    }

    /// Record an upstream failure (labelled by cause) and pass it on.
    pub fn failed(&self, e: UpstreamError) -> UpstreamError {
        self.metrics.upstream_failures.with_label_values(&[&self.name, e.cause()]).inc();
        self.health_now().failed(&e);
        e
    }

    pub fn health(&self) -> Health {
        self.health_now().clone()
    }

    fn health_now(&self) -> std::sync::MutexGuard<'_, Health> {
        crate::lock(&self.health)
    }

    /// Send a request for `repo`, answering a bearer or basic challenge once.
    async fn send(
        &self,
        method: Method,
        repo: &RepoName,
        path: &str,
        headers: HeaderMap,
        kind: Kind,
    ) -> Result<reqwest::Response, UpstreamError> {
        self.send_query(method, repo, path, None, headers, kind).await
    }

    async fn send_query(
        &self,
        method: Method,
        repo: &RepoName,
        path: &str,
        query: Option<&str>,
        headers: HeaderMap,
        kind: Kind,
    ) -> Result<reqwest::Response, UpstreamError> {
        let scope = format!("repository:{repo}:pull");
        let url = self.url(path, query);
        let mut authorization = self.tokens.get(&scope).await;
        for attempt in 0..2 {
            let mut req = self.client.request(method.clone(), url.clone()).headers(headers.clone());
            if let Some(a) = &authorization {
                req = req.header(AUTHORIZATION, a.clone());
            }
            let resp = req.send().await.map_err(|e| self.failed(self.err_from(e)))?;
            let status = resp.status();
            self.metrics.upstream_requests.with_label_values(&[&self.name, kind.label(), status.as_str()]).inc();
            if status == StatusCode::UNAUTHORIZED && attempt == 0 {
                let challenge =
                    resp.headers().get(WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()).and_then(Challenge::parse);
                authorization = match challenge {
                    Some(Challenge::Bearer { realm, service, scope: challenged }) => {
                        let scope = challenged.unwrap_or_else(|| scope.clone());
                        Some(self.fetch_token(&realm, service.as_deref(), &scope).await?)
                    }
                    Some(Challenge::Basic) => self.basic(),
                    None => None,
                };
                if authorization.is_some() {
                    continue;
                }
            }
            return self.check(resp);
        }
        Err(self.failed(UpstreamError::Status { upstream: self.name.clone(), status: 401 }))
    }

    fn basic(&self) -> Option<HeaderValue> {
        use base64::Engine;
        let (user, pass) = self.credentials.as_ref()?;
        let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        let mut v = HeaderValue::from_str(&format!("Basic {encoded}")).ok()?;
        v.set_sensitive(true);
        Some(v)
    }

    /// The final answer to a request: success, or the error it stands for. Health follows the
    /// answer, not the challenges on the way to it.
    fn check(&self, resp: reqwest::Response) -> Result<reqwest::Response, UpstreamError> {
        let status = resp.status();
        if status.is_success() {
            self.health_now().succeeded(resp.headers());
            return Ok(resp);
        }
        let upstream = self.name.clone();
        let err = if status == StatusCode::TOO_MANY_REQUESTS {
            let retry_after = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_string);
            UpstreamError::TooManyRequests { upstream, retry_after }
        } else {
            UpstreamError::Status { upstream, status: status.as_u16() }
        };
        if err.is_absent() {
            // A working upstream saying the repository does not have it (Docker Hub answers 401
            // for a name that does not exist): counted as before, but no sign of trouble.
            self.health_now().succeeded(resp.headers());
            if !err.is_not_found() {
                self.metrics.upstream_failures.with_label_values(&[&self.name, err.cause()]).inc();
            }
            return Err(err);
        }
        Err(self.failed(err))
    }

    async fn fetch_token(&self, realm: &str, service: Option<&str>, scope: &str) -> Result<HeaderValue, UpstreamError> {
        self.metrics.token_fetches.with_label_values(&[&self.name]).inc();
        let mut url = reqwest::Url::parse(realm).map_err(|_| {
            self.failed(UpstreamError::Unreachable {
                upstream: self.name.clone(),
                detail: "token realm is not a URL".into(),
            })
        })?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            q.append_pair("scope", scope);
        }
        // Credentials go to a realm over TLS, or to the upstream's own host.
        let trusted_realm = url.scheme() == "https" || url.host_str() == self.base.host_str();
        let mut req = self.client.get(url);
        if let Some(basic) = self.basic().filter(|_| trusted_realm) {
            req = req.header(AUTHORIZATION, basic);
        }
        let resp = req.send().await.map_err(|e| self.failed(self.err_from(e)))?;
        let resp = self.check(resp)?;
        let body = self.read_limited(resp, TOKEN_LIMIT, "token response").await?;
        let token: auth::TokenResponse = serde_json::from_slice(&body).map_err(|e| {
            self.failed(UpstreamError::Reset { upstream: self.name.clone(), detail: format!("token response: {e}") })
        })?;
        let value = self.tokens.insert(scope, token).await;
        value.ok_or_else(|| self.failed(UpstreamError::Status { upstream: self.name.clone(), status: 401 }))
    }

    /// GET or HEAD a manifest, asking for the media types in `accept`.
    pub async fn manifest(
        &self,
        method: Method,
        repo: &RepoName,
        reference: &str,
        accept: &str,
    ) -> Result<reqwest::Response, UpstreamError> {
        let mut headers = HeaderMap::new();
        let accept = HeaderValue::from_str(accept).unwrap_or_else(|_| HeaderValue::from_static(ACCEPT_ALL));
        headers.insert(ACCEPT, accept);
        self.send(method, repo, &format!("/v2/{repo}/manifests/{reference}"), headers, Kind::Manifest).await
    }

    /// GET (from `offset`) or HEAD a blob. Redirects to a CDN are followed.
    pub async fn blob(
        &self,
        method: Method,
        repo: &RepoName,
        digest: &Digest,
        offset: u64,
    ) -> Result<reqwest::Response, UpstreamError> {
        let mut headers = HeaderMap::new();
        if offset > 0 {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes={offset}-")) {
                headers.insert(RANGE, v);
            }
        }
        self.send(method, repo, &format!("/v2/{repo}/blobs/{digest}"), headers, Kind::Blob).await
    }

    /// The referrers API: an index of the manifests whose `subject` is `digest`. Registries
    /// without the API answer 404.
    pub async fn referrers(&self, repo: &RepoName, digest: &Digest) -> Result<reqwest::Response, UpstreamError> {
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static(crate::oci::OCI_INDEX));
        self.send(Method::GET, repo, &format!("/v2/{repo}/referrers/{digest}"), headers, Kind::Referrers).await
    }

    /// A page of the tags list: at most `n` tags, after `last`.
    pub async fn tags(
        &self,
        repo: &RepoName,
        n: Option<&str>,
        last: Option<&str>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let path = format!("/v2/{repo}/tags/list");
        let query = {
            let mut query = form_urlencoded::Serializer::new(String::new());
            for (key, value) in [("n", n), ("last", last)] {
                if let Some(v) = value {
                    query.append_pair(key, v);
                }
            }
            query.finish()
        };
        let query = (!query.is_empty()).then_some(query.as_str());
        self.send_query(Method::GET, repo, &path, query, HeaderMap::new(), Kind::Tags).await
    }

    /// Wrap a body-stream error.
    pub fn stream_error(&self, e: reqwest::Error) -> UpstreamError {
        self.err_from(e)
    }

    /// Read a whole body into memory, `limit` bytes at most, counted as they arrive: a chunked
    /// body has no `Content-Length` to check in advance.
    pub async fn read_limited(
        &self,
        resp: reqwest::Response,
        limit: u64,
        what: &'static str,
    ) -> Result<Vec<u8>, UpstreamError> {
        use futures_util::StreamExt;
        let too_large = || self.failed(UpstreamError::TooLarge { upstream: self.name.clone(), what, limit });
        if content_length(&resp).is_some_and(|l| l > limit) {
            return Err(too_large());
        }
        let mut out = Vec::new();
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| self.failed(self.err_from(e)))?;
            if out.len() as u64 + chunk.len() as u64 > limit {
                return Err(too_large());
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }
}

/// The whole chain of causes, so "error sending request" says why.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

/// All configured upstreams, by name (a cheap `Clone`).
#[derive(Clone)]
pub struct Upstreams {
    by_name: HashMap<String, Arc<Upstream>>,
}

impl Upstreams {
    /// Every upstream, by name.
    pub fn all(&self) -> Vec<&Arc<Upstream>> {
        let mut all: Vec<_> = self.by_name.values().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    pub fn new(config: &Config, metrics: &Metrics) -> reqwest::Result<Self> {
        let mut by_name = HashMap::new();
        for u in &config.upstreams {
            by_name.insert(u.name.clone(), Arc::new(Upstream::new(u, config.upstream_timeout, metrics.clone())?));
        }
        Ok(Upstreams { by_name })
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.by_name.get(name)
    }
}
