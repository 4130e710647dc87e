//! A test upstream that behaves like Docker Hub where no real server does on demand: bearer-token
//! challenges with scopes and expiring tokens, blob GETs answered with 307 to a CDN host, 429 with
//! Retry-After, and a CDN that can send wrong bytes, break mid-body, or hold bytes back until the
//! test releases them. Every request is counted.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::Bytes;
use futures_util::StreamExt;

#[derive(Default)]
pub struct Counters {
    pub token_requests: AtomicUsize,
    pub manifest_gets: AtomicUsize,
    pub manifest_heads: AtomicUsize,
    pub blob_gets: AtomicUsize,
    pub blob_heads: AtomicUsize,
    pub cdn_gets: AtomicUsize,
    pub cdn_range_gets: AtomicUsize,
    /// Set if the CDN ever saw an Authorization header.
    pub cdn_saw_authorization: AtomicBool,
    pub tags_gets: AtomicUsize,
}

/// (media type, bytes), stored by (repository, reference).
pub type Manifest = (String, Vec<u8>);

#[derive(Default)]
pub struct HubState {
    pub counters: Counters,
    pub manifests: Mutex<HashMap<(String, String), Manifest>>,
    pub blobs: Mutex<HashMap<String, Vec<u8>>>,
    /// Answer every registry request with 429.
    pub rate_limited: AtomicBool,
    /// The CDN flips one byte of every body.
    pub corrupt: AtomicBool,
    /// The CDN breaks the connection after this many bytes, once (0 = never).
    pub reset_after: AtomicU64,
    /// The CDN stops sending after this many bytes and keeps the connection open, once (0 = never).
    pub stall_after: AtomicU64,
    /// The CDN sends at most this many bytes of a body until raised (u64::MAX = no gate).
    pub gate: tokio::sync::watch::Sender<u64>,
    pub token_ttl: AtomicU64,
    /// Tokens from an older epoch are rejected (the test "expires" them all at once).
    pub token_epoch: AtomicU64,
    pub cdn_addr: Mutex<Option<SocketAddr>>,
    pub addr: Mutex<Option<SocketAddr>>,
    /// Repositories that have no blobs at all: blob requests for them get 404.
    pub absent_repos: Mutex<std::collections::HashSet<String>>,
    /// Blob HEADs answer 200 for any digest (a permissive or compromised upstream).
    pub permissive_heads: AtomicBool,
    /// The CDN answers 503 to this many range requests (a short outage while resuming).
    pub fail_ranges: AtomicU64,
    /// When the CDN saw each range request.
    pub range_attempts: Mutex<Vec<std::time::Instant>>,
    /// Manifest GETs of this repository stream an endless (64 MiB) chunked body; bytes sent so far.
    pub huge_manifest_repo: Mutex<Option<String>>,
    pub huge_sent: Arc<AtomicU64>,
    /// Prefix of the tags list's `Link` (empty: a path on this registry).
    pub link_base: Mutex<String>,
    /// Registry manifest requests and blob GETs wait while this is false; `held` counts them.
    pub open: tokio::sync::watch::Sender<bool>,
    pub held: tokio::sync::watch::Sender<usize>,
}

pub struct Hub {
    pub state: Arc<HubState>,
    pub addr: SocketAddr,
    pub cdn: SocketAddr,
}

impl Hub {
    pub async fn start() -> Hub {
        let (gate, _) = tokio::sync::watch::channel(u64::MAX);
        let (open, _) = tokio::sync::watch::channel(true);
        let state = Arc::new(HubState { gate, open, token_ttl: AtomicU64::new(300), ..Default::default() });
        let cdn_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let cdn = cdn_listener.local_addr().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        *state.cdn_addr.lock().unwrap() = Some(cdn);
        *state.addr.lock().unwrap() = Some(addr);
        let registry = Router::new().fallback(registry).with_state(state.clone());
        let cdn_app = Router::new().fallback(cdn_handler).with_state(state.clone());
        tokio::spawn(async move { axum::serve(listener, registry).await.unwrap() });
        tokio::spawn(async move { axum::serve(cdn_listener, cdn_app).await.unwrap() });
        Hub { state, addr, cdn }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn add_blob(&self, bytes: Vec<u8>) -> String {
        let d = super::sha256(&bytes);
        self.state.blobs.lock().unwrap().insert(d.clone(), bytes);
        d
    }

    pub fn add_manifest(&self, repo: &str, tag: &str, media_type: &str, bytes: Vec<u8>) -> String {
        let d = super::sha256(&bytes);
        let mut m = self.state.manifests.lock().unwrap();
        m.insert((repo.to_string(), tag.to_string()), (media_type.to_string(), bytes.clone()));
        m.insert((repo.to_string(), d.clone()), (media_type.to_string(), bytes));
        d
    }

    pub fn count(&self, c: &AtomicUsize) -> usize {
        c.load(Ordering::SeqCst)
    }

    /// Hold registry manifest and blob requests until `release`.
    pub fn hold(&self) {
        self.state.open.send_replace(false);
    }

    pub fn release(&self) {
        self.state.open.send_replace(true);
    }

    /// Wait until at least `n` requests are being held.
    pub async fn wait_held(&self, n: usize) {
        let mut held = self.state.held.subscribe();
        let _ = held.wait_for(|h| *h >= n).await;
    }
}

/// Whether an `Accept` header admits `media_type`, as distribution decides it: a request that
/// lists types gets only those.
fn accepts(headers: &HeaderMap, media_type: &str) -> bool {
    let listed: Vec<String> = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.split(';').next().unwrap_or_default().trim().to_string())
        .filter(|t| !t.is_empty())
        .collect();
    listed.is_empty() || listed.iter().any(|t| t == media_type || t == "*/*")
}

fn challenge(state: &HubState, repo: &str) -> Response {
    let addr = state.addr.lock().unwrap().unwrap();
    let value = format!("Bearer realm=\"http://{addr}/token\",service=\"test-hub\",scope=\"repository:{repo}:pull\"");
    let body = r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required","detail":null}]}"#;
    (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, value)], body).into_response()
}

/// Tokens look like `tok:<epoch>:<scope>:<expiry unix seconds>`: valid for their scope until
/// expiry, within the current epoch.
fn token_ok(state: &HubState, headers: &HeaderMap, repo: &str) -> bool {
    let Some(v) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else { return false };
    let prefix = format!("Bearer tok:{}:", state.token_epoch.load(Ordering::SeqCst));
    let Some(tok) = v.strip_prefix(&prefix) else { return false };
    let Some((scope, expiry)) = tok.rsplit_once(':') else { return false };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    scope == format!("repository:{repo}:pull") && expiry.parse::<u64>().is_ok_and(|e| e > now)
}

async fn registry(State(state): State<Arc<HubState>>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    if path == "/token" {
        state.counters.token_requests.fetch_add(1, Ordering::SeqCst);
        let q: HashMap<String, String> = req
            .uri()
            .query()
            .and_then(|q| reqwest::Url::parse(&format!("http://x/?{q}")).ok())
            .map(|u| u.query_pairs().into_owned().collect())
            .unwrap_or_default();
        let scope = q.get("scope").cloned().unwrap_or_default();
        let ttl = state.token_ttl.load(Ordering::SeqCst);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        return axum::Json(serde_json::json!({"token": format!("tok:{}:{scope}:{}", state.token_epoch.load(Ordering::SeqCst), now + ttl), "expires_in": ttl})).into_response();
    }
    if path == "/v2/" {
        return StatusCode::OK.into_response();
    }
    let Some(rest) = path.strip_prefix("/v2/") else { return StatusCode::NOT_FOUND.into_response() };
    if let Some(repo) = rest.strip_suffix("/tags/list") {
        if !token_ok(&state, req.headers(), repo) {
            return challenge(&state, repo);
        }
    }
    let (repo, kind, reference) = if let Some((repo, r)) = rest.rsplit_once("/manifests/") {
        (repo.to_string(), "manifests", r.to_string())
    } else if let Some((repo, r)) = rest.rsplit_once("/blobs/") {
        (repo.to_string(), "blobs", r.to_string())
    } else if let Some(repo) = rest.strip_suffix("/tags/list") {
        (repo.to_string(), "tags", String::new())
    } else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if kind == "tags" {
        return tags_list(&state, &repo, req.uri().query().unwrap_or_default());
    }
    let gated = kind == "manifests" || req.method() == Method::GET;
    if gated && !*state.open.borrow() {
        state.held.send_modify(|h| *h += 1);
        let mut open = state.open.subscribe();
        let _ = open.wait_for(|o| *o).await;
        state.held.send_modify(|h| *h -= 1);
    }
    if state.rate_limited.load(Ordering::SeqCst) {
        let body = r#"{"errors":[{"code":"TOOMANYREQUESTS","message":"You have reached your pull rate limit."}]}"#;
        return (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "42")], body).into_response();
    }
    if !token_ok(&state, req.headers(), &repo) {
        return challenge(&state, &repo);
    }
    let head = req.method() == Method::HEAD;
    let c = &state.counters;
    match kind {
        "manifests" => {
            if head { &c.manifest_heads } else { &c.manifest_gets }.fetch_add(1, Ordering::SeqCst);
            if !head && state.huge_manifest_repo.lock().unwrap().as_deref() == Some(repo.as_str()) {
                return huge_manifest(&state);
            }
            let found = state.manifests.lock().unwrap().get(&(repo, reference)).cloned();
            match found {
                Some((mt, _)) if !accepts(req.headers(), &mt) => (
                    StatusCode::NOT_FOUND,
                    r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"OCI index found, but accept header does not support OCI indexes"}]}"#,
                )
                    .into_response(),
                Some((mt, bytes)) => {
                    let d = super::sha256(&bytes);
                    let len = bytes.len();
                    let body = if head { Body::empty() } else { Body::from(bytes) };
                    // As Docker Hub: a pull allowance of 100 manifest GETs per 6 hours.
                    let used = c.manifest_gets.load(Ordering::SeqCst);
                    Response::builder()
                        .header("content-type", mt)
                        .header("docker-content-digest", d)
                        .header("content-length", len)
                        .header("ratelimit-limit", "100;w=21600")
                        .header("ratelimit-remaining", format!("{};w=21600", 100usize.saturating_sub(used)))
                        .body(body)
                        .unwrap()
                }
                None => {
                    (StatusCode::NOT_FOUND, r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#)
                        .into_response()
                }
            }
        }
        _ => {
            if head { &c.blob_heads } else { &c.blob_gets }.fetch_add(1, Ordering::SeqCst);
            let absent = state.absent_repos.lock().unwrap().contains(&repo);
            let len = state.blobs.lock().unwrap().get(&reference).map(Vec::len).filter(|_| !absent);
            let len = match len {
                None if head && state.permissive_heads.load(Ordering::SeqCst) => Some(10),
                len => len,
            };
            match len {
                None => (StatusCode::NOT_FOUND, r#"{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown"}]}"#)
                    .into_response(),
                Some(len) if head => Response::builder()
                    .header("content-length", len)
                    .header("docker-content-digest", reference)
                    .body(Body::empty())
                    .unwrap(),
                Some(_) => {
                    let cdn = state.cdn_addr.lock().unwrap().unwrap();
                    Response::builder()
                        .status(StatusCode::TEMPORARY_REDIRECT)
                        .header("location", format!("http://{cdn}/blobs/{reference}?signature=abc"))
                        .body(Body::empty())
                        .unwrap()
                }
            }
        }
    }
}

async fn cdn_handler(State(state): State<Arc<HubState>>, req: Request) -> Response {
    let c = &state.counters;
    c.cdn_gets.fetch_add(1, Ordering::SeqCst);
    if req.headers().contains_key(header::AUTHORIZATION) {
        c.cdn_saw_authorization.store(true, Ordering::SeqCst);
    }
    let digest = req.uri().path().trim_start_matches("/blobs/").to_string();
    let Some(mut bytes) = state.blobs.lock().unwrap().get(&digest).cloned() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if state.corrupt.load(Ordering::SeqCst) && !bytes.is_empty() {
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
    }
    let total = bytes.len() as u64;
    let start = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.trim_end_matches('-').parse::<u64>().ok());
    if start.is_some() {
        c.cdn_range_gets.fetch_add(1, Ordering::SeqCst);
        state.range_attempts.lock().unwrap().push(std::time::Instant::now());
        let failing = state.fail_ranges.load(Ordering::SeqCst);
        if failing > 0 {
            state.fail_ranges.store(failing - 1, Ordering::SeqCst);
            return (StatusCode::SERVICE_UNAVAILABLE, "temporarily unavailable").into_response();
        }
    }
    let start = start.unwrap_or(0).min(total);
    let reset_after = state.reset_after.swap(0, Ordering::SeqCst);
    let stall_after = state.stall_after.swap(0, Ordering::SeqCst);
    let gate = state.gate.subscribe();
    let data = Bytes::from(bytes);
    // Send in 64 KiB pieces, honouring the gate and the one-time reset.
    let stream = futures_util::stream::unfold((start, gate), move |(pos, mut gate)| {
        let data = data.clone();
        async move {
            if pos >= total {
                return None;
            }
            if stall_after > 0 && pos >= start + stall_after {
                // Headers sent, then silence on an open connection.
                std::future::pending::<()>().await;
            }
            if reset_after > 0 && pos >= start + reset_after {
                return Some((Err(std::io::Error::other("connection reset by test")), (total, gate)));
            }
            loop {
                let allowed = *gate.borrow_and_update();
                if pos < allowed {
                    break;
                }
                if gate.changed().await.is_err() {
                    return None;
                }
            }
            let allowed = *gate.borrow();
            let mut end = (pos + 65536).min(total).min(allowed.max(pos + 1));
            if stall_after > 0 {
                end = end.min(start + stall_after);
            }
            if reset_after > 0 {
                end = end.min(start + reset_after);
            }
            Some((Ok::<_, std::io::Error>(data.slice(pos as usize..end as usize)), (end, gate)))
        }
    });
    let status = if start > 0 { StatusCode::PARTIAL_CONTENT } else { StatusCode::OK };
    let mut resp = Response::builder().status(status).header("content-length", total - start);
    if start > 0 {
        resp = resp.header("content-range", format!("bytes {start}-{}/{total}", total - 1));
    }
    resp.body(Body::from_stream(stream)).unwrap()
}

/// A "manifest" that never ends: 64 MiB of JSON whitespace, chunked, no Content-Length.
fn huge_manifest(state: &HubState) -> Response {
    let sent = state.huge_sent.clone();
    let piece = Bytes::from(vec![b' '; 64 << 10]);
    let stream = futures_util::stream::iter(0..1024).map(move |_| {
        sent.fetch_add(piece.len() as u64, Ordering::SeqCst);
        Ok::<_, std::io::Error>(piece.clone())
    });
    Response::builder()
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(Body::from_stream(stream))
        .unwrap()
}

/// `tags/list` with `n` and `last`, and a `Link` to the next page as distribution writes it.
fn tags_list(state: &HubState, repo: &str, query: &str) -> Response {
    state.counters.tags_gets.fetch_add(1, Ordering::SeqCst);
    let q: HashMap<String, String> = form_urlencoded::parse(query.as_bytes()).into_owned().collect();
    let mut tags: Vec<String> = state
        .manifests
        .lock()
        .unwrap()
        .keys()
        .filter(|(r, t)| r == repo && !t.contains(':'))
        .map(|(_, t)| t.clone())
        .collect();
    tags.sort();
    if let Some(last) = q.get("last") {
        tags.retain(|t| t > last);
    }
    let n = q.get("n").and_then(|n| n.parse::<usize>().ok()).unwrap_or(usize::MAX);
    let more = tags.len() > n;
    tags.truncate(n);
    let mut resp = axum::Json(serde_json::json!({"name": repo, "tags": tags})).into_response();
    if more {
        let base = state.link_base.lock().unwrap().clone();
        let link = format!("<{base}/v2/{repo}/tags/list?last={}&n={n}>; rel=\"next\"", tags.last().unwrap());
        resp.headers_mut().insert(header::LINK, link.parse().unwrap());
    }
    resp
}
