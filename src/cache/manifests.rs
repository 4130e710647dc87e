//! Mirrored manifests. By digest: immutable, cached for good. By tag: the tag→digest answer is
//! trusted for `tag_ttl`, then revalidated with a HEAD (free against Docker Hub's rate limit); when
//! the upstream fails, the last known digest is served if `serve_stale` allows.
//!
//! Every trip to the upstream is a single flight per (upstream, repository, reference, accepted
//! types): 200 nodes rolling out a new tag at once cost one counted pull, not 200.

use std::sync::Arc;
use std::time::Duration;

use axum::response::{IntoResponse, Response};
use reqwest::Method;

use super::flight::Flights;
use super::{count, to_registry_error, CacheError};
use crate::registry::error::{Code, RegistryError, Result};
use crate::registry::listing::tags_page;
use crate::registry::manifests::{acceptable, describe, manifest_response, upstream_accept, ACCEPT_ALL};
use crate::registry::names::{Algorithm, Digest, Reference, RepoName};
use crate::registry::{Ctx, RequestInfo, Target};
use crate::storage::{unix_now, ManifestMeta, Store, TagRecord};
use crate::upstream::{Upstream, UpstreamError};

/// Largest tags list read from an upstream (Docker Hub pages hold at most 10,000 tags).
const TAGS_LIMIT: u64 = 8 << 20;

/// How a manifest answer was obtained (the `outcome` label of the cache metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Obtained {
    /// From the store, without asking the upstream.
    Hit,
    /// Fetched from the upstream.
    Miss,
    /// The upstream confirmed (with a HEAD) that the cached tag is current.
    Revalidated,
    /// The upstream failed; the last known answer was served.
    Stale,
}

impl Obtained {
    pub fn label(self) -> &'static str {
        match self {
            Obtained::Hit => "hit",
            Obtained::Miss => "miss",
            Obtained::Revalidated => "revalidated",
            Obtained::Stale => "stale",
        }
    }
}

/// A manifest as the cache has it: exact bytes, meta, digest, and how it was obtained.
pub struct Resolved {
    pub digest: Digest,
    pub meta: ManifestMeta,
    pub bytes: Vec<u8>,
    pub obtained: Obtained,
}

/// What identifies one upstream manifest request.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FlightKey {
    upstream: String,
    remote: RepoName,
    reference: String,
    accept: String,
}

pub type ManifestFlights = Flights<FlightKey, Result<Arc<Resolved>, CacheError>>;

/// The settings a manifest lookup follows.
#[derive(Clone, Copy)]
pub struct Policy {
    pub tag_ttl: Duration,
    pub serve_stale: bool,
    pub max_manifest_size: u64,
}

pub async fn get(ctx: &Ctx, target: &Target, reference: &Reference, info: &mut RequestInfo) -> Result<Response> {
    let Target::Mirror { upstream, remote, local } = target else {
        return Err(RegistryError::internal("cache::manifests::get on a local repository"));
    };
    let state = &ctx.state;
    let client_accept = accept_header(&ctx.headers);
    let policy = Policy {
        tag_ttl: state.config.tag_ttl,
        serve_stale: state.config.serve_stale,
        max_manifest_size: state.config.max_manifest_size,
    };
    let resolved = resolve(
        &state.manifest_flights,
        &state.store,
        upstream,
        remote,
        local,
        reference,
        client_accept.as_deref(),
        policy,
    )
    .await;
    let resolved = match resolved {
        Ok(r) => r,
        Err(e) => {
            info.cache = Some("error");
            count(state, target, "manifest", "error");
            return Err(to_registry_error(&e, Code::ManifestUnknown));
        }
    };
    info.cache = Some(resolved.obtained.label());
    count(state, target, "manifest", resolved.obtained.label());
    // As distribution does: a client that cannot read this media type is told it is not here.
    if !acceptable(&resolved.meta.media_type, client_accept.as_deref()) {
        return Err(RegistryError::new(
            Code::ManifestUnknown,
            format!(
                "{local}:{reference} is a {}, which the request's Accept header does not include",
                resolved.meta.media_type
            ),
        ));
    }
    state.lru.touch(&resolved.digest, resolved.bytes.len() as u64);
    Ok(manifest_response(&resolved.digest, &resolved.meta, resolved.bytes.clone(), ctx.is_head()))
}

/// Every `Accept` header of a request, as one list.
fn accept_header(headers: &axum::http::HeaderMap) -> Option<String> {
    let values: Vec<&str> =
        headers.get_all(axum::http::header::ACCEPT).iter().filter_map(|v| v.to_str().ok()).collect();
    (!values.is_empty()).then(|| values.join(", "))
}

/// Find a mirrored manifest: in the store while it is fresh, otherwise through one shared
/// upstream request.
#[allow(clippy::too_many_arguments)]
pub async fn resolve(
    flights: &ManifestFlights,
    store: &Store,
    upstream: &Arc<Upstream>,
    remote: &RepoName,
    local: &RepoName,
    reference: &Reference,
    client_accept: Option<&str>,
    policy: Policy,
) -> Result<Arc<Resolved>, CacheError> {
    if let Some(found) = cached(store, local, reference, policy.tag_ttl).await? {
        return Ok(Arc::new(found));
    }
    let accept = upstream_accept(client_accept);
    let key = FlightKey {
        upstream: upstream.name().to_string(),
        remote: remote.clone(),
        reference: reference.to_string(),
        accept: accept.clone(),
    };
    let (store, upstream, remote, local, reference) =
        (store.clone(), upstream.clone(), remote.clone(), local.clone(), reference.clone());
    flights
        .run(key, move || async move {
            refresh(&store, &upstream, &remote, &local, &reference, &accept, policy).await.map(Arc::new)
        })
        .await
        .unwrap_or_else(|| Err(CacheError::Internal("manifest fetch task failed".into())))
}

/// The manifest from the store when it may be served without asking the upstream: by digest
/// always, by tag while the tag is younger than `ttl`.
async fn cached(
    store: &Store,
    local: &RepoName,
    reference: &Reference,
    ttl: Duration,
) -> Result<Option<Resolved>, CacheError> {
    match reference {
        Reference::Digest(d) => Ok(load(store, local, d).await?.map(|(meta, bytes)| Resolved {
            digest: d.clone(),
            meta,
            bytes,
            obtained: Obtained::Hit,
        })),
        Reference::Tag(tag) => Ok(known_tag(store, local, tag)
            .await?
            .filter(|(rec, ..)| unix_now().saturating_sub(rec.fetched_at) < ttl.as_secs())
            .map(|(_, digest, meta, bytes)| Resolved { digest, meta, bytes, obtained: Obtained::Hit })),
    }
}

/// What the store knows of a tag: its record and the manifest it points to.
async fn known_tag(
    store: &Store,
    local: &RepoName,
    tag: &str,
) -> Result<Option<(TagRecord, Digest, ManifestMeta, Vec<u8>)>, CacheError> {
    let Some(rec) = store.tag(local, tag).await? else { return Ok(None) };
    let Ok(d) = rec.digest.parse::<Digest>() else { return Ok(None) };
    Ok(load(store, local, &d).await?.map(|(meta, bytes)| (rec, d, meta, bytes)))
}

/// The bytes and meta of a manifest in `repo`, or `None`.
pub async fn load(store: &Store, repo: &RepoName, d: &Digest) -> std::io::Result<Option<(ManifestMeta, Vec<u8>)>> {
    let Some(meta) = store.manifest_meta(repo, d).await? else {
        return Ok(None);
    };
    let Some(bytes) = store.read_blob(d).await? else {
        return Ok(None);
    };
    Ok(Some((meta, bytes)))
}

/// One flight: ask the upstream, store what it says, and fall back to the last known answer
/// when it fails.
async fn refresh(
    store: &Store,
    upstream: &Upstream,
    remote: &RepoName,
    local: &RepoName,
    reference: &Reference,
    accept: &str,
    policy: Policy,
) -> Result<Resolved, CacheError> {
    // Another flight may have finished between our look at the store and this one's start.
    if let Some(found) = cached(store, local, reference, policy.tag_ttl).await? {
        return Ok(found);
    }
    let limit = policy.max_manifest_size;
    let tag = match reference {
        Reference::Digest(d) => {
            let f = fetch(upstream, remote, &d.to_string(), Some(d), accept, limit).await?;
            store.put_manifest(local, &f.digest, &f.meta, &f.bytes).await?;
            return Ok(Resolved { digest: f.digest, meta: f.meta, bytes: f.bytes, obtained: Obtained::Miss });
        }
        Reference::Tag(tag) => tag,
    };
    let known = known_tag(store, local, tag).await?;
    let result = match &known {
        Some((_, d, ..)) => revalidate(upstream, remote, tag, d, accept, limit).await,
        None => fetch(upstream, remote, tag, None, accept, limit).await.map(Some),
    };
    match (result, known) {
        // Unchanged upstream: no GET, just a fresh timestamp.
        (Ok(None), Some((_, digest, meta, bytes))) => {
            store.set_tag(local, tag, &TagRecord::now(&digest)).await?;
            Ok(Resolved { digest, meta, bytes, obtained: Obtained::Revalidated })
        }
        (Ok(Some(f)), _) => {
            store.put_manifest(local, &f.digest, &f.meta, &f.bytes).await?;
            store.set_tag(local, tag, &TagRecord::now(&f.digest)).await?;
            Ok(Resolved { digest: f.digest, meta: f.meta, bytes: f.bytes, obtained: Obtained::Miss })
        }
        (Err(e), Some((_, digest, meta, bytes))) if policy.serve_stale && e.is_outage() => {
            tracing::warn!(upstream = upstream.name(), repository = %local, tag, error = %e, "upstream failed; serving the last known digest");
            Ok(Resolved { digest, meta, bytes, obtained: Obtained::Stale })
        }
        (Err(e), _) => Err(e.into()),
        (Ok(None), None) => Err(CacheError::Internal("revalidation without a cached manifest".into())),
    }
}

pub struct Fetched {
    pub digest: Digest,
    pub meta: ManifestMeta,
    pub bytes: Vec<u8>,
}

/// `None` when the upstream still points the tag at `current`; otherwise the new manifest.
async fn revalidate(
    upstream: &Upstream,
    remote: &RepoName,
    tag: &str,
    current: &Digest,
    accept: &str,
    limit: u64,
) -> Result<Option<Fetched>, UpstreamError> {
    // What the tag points to now, whatever its type: whether the client may read it is decided
    // after, against its own Accept.
    let resp = upstream.manifest(Method::HEAD, remote, tag, ACCEPT_ALL).await?;
    let advertised = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<Digest>().ok());
    if advertised.as_ref() == Some(current) {
        return Ok(None);
    }
    fetch(upstream, remote, tag, None, accept, limit).await.map(Some)
}

/// GET a manifest from upstream (at most `limit` bytes) and verify its digest. Bytes are kept
/// exactly as sent.
pub async fn fetch(
    upstream: &Upstream,
    remote: &RepoName,
    reference: &str,
    expected: Option<&Digest>,
    accept: &str,
    limit: u64,
) -> Result<Fetched, UpstreamError> {
    let resp = upstream.manifest(Method::GET, remote, reference, accept).await?;
    let content_type = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).map(str::to_string);
    let advertised = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<Digest>().ok());
    let bytes = upstream.read_limited(resp, limit, "manifest").await?;
    let algorithm = expected.or(advertised.as_ref()).map_or(Algorithm::Sha256, Digest::algorithm);
    let digest = Digest::of(algorithm, &bytes);
    let mismatch = expected.is_some_and(|e| e != &digest)
        || advertised.as_ref().is_some_and(|a| a.algorithm() == algorithm && a != &digest);
    if mismatch {
        return Err(upstream.failed(UpstreamError::DigestMismatch {
            upstream: upstream.name().to_string(),
            digest: expected.map_or_else(|| reference.to_string(), Digest::to_string),
        }));
    }
    let meta = match describe(&bytes, content_type.as_deref()) {
        Ok(d) => d.meta,
        // Old or unusual manifests are still served exactly as the upstream sent them.
        Err(_) => ManifestMeta {
            media_type: content_type.unwrap_or_else(|| "application/json".into()),
            size: bytes.len() as u64,
            artifact_type: None,
            subject: None,
            annotations: None,
        },
    };
    Ok(Fetched { digest, meta, bytes })
}

/// Tags of a mirrored repository: the upstream's list, or the cached tags when it is down.
pub async fn tags(ctx: Ctx, target: &Target) -> Result<Response> {
    let Target::Mirror { upstream, remote, local } = target else {
        return Err(RegistryError::internal("cache::manifests::tags on a local repository"));
    };
    let mut query: Vec<String> = Vec::new();
    for key in ["n", "last"] {
        if let Some(v) = ctx.query.get(key) {
            query.push(format!("{key}={}", crate::registry::query_escape(v)));
        }
    }
    let listed = match upstream.tags(remote, &query.join("&")).await {
        Ok(resp) => {
            let link = resp.headers().get("link").and_then(|v| v.to_str().ok()).map(str::to_string);
            let body = upstream.read_limited(resp, TAGS_LIMIT, "tags list").await;
            body.map(|b| (b, link))
        }
        Err(e) => Err(e),
    };
    match listed {
        Ok((body, link)) => {
            let body: serde_json::Value = serde_json::from_slice(&body)
                .map_err(|e| RegistryError::new(Code::Unavailable, format!("upstream tags list: {e}")))?;
            let tags = body.get("tags").cloned().unwrap_or(serde_json::json!([]));
            let mut out = axum::Json(serde_json::json!({ "name": local.as_str(), "tags": tags })).into_response();
            // The upstream's link names its own path (and could name any URL): point the client
            // at the same page of this repository on the mirror instead.
            if let Some(next) = link.as_deref().and_then(|l| next_page_link(l, local)) {
                if let Ok(v) = axum::http::HeaderValue::from_str(&next) {
                    out.headers_mut().insert("link", v);
                }
            }
            Ok(out)
        }
        Err(e) if e.is_outage() => tags_page(&ctx, local, ctx.state.store.list_tags(local).await?),
        Err(e) => Err(to_registry_error(&e.into(), Code::NameUnknown)),
    }
}

/// The mirror's own `Link` for the page an upstream's `Link: <…?n=N&last=L>; rel="next"` names,
/// or `None` when it names no next page we understand.
fn next_page_link(upstream_link: &str, local: &RepoName) -> Option<String> {
    let (target, params) = upstream_link.split_once(';')?;
    if !params.split(';').any(|p| p.trim().replace(' ', "") == "rel=\"next\"" || p.trim() == "rel=next") {
        return None;
    }
    let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
    let query = target.split_once('?')?.1;
    let mut n = None;
    let mut last = None;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "n" => n = v.parse::<usize>().ok(),
            "last" => last = Some(v.into_owned()),
            _ => {}
        }
    }
    let last = last?;
    let mut out = format!("</v2/{local}/tags/list?");
    if let Some(n) = n {
        out.push_str(&format!("n={n}&"));
    }
    out.push_str(&format!("last={}>; rel=\"next\"", crate::registry::query_escape(&last)));
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_links_become_mirror_links() {
        let local = RepoName::parse("ghcr.io/org/tool").unwrap();
        assert_eq!(
            next_page_link("</v2/org/tool/tags/list?last=v1.2&n=2>; rel=\"next\"", &local).as_deref(),
            Some("</v2/ghcr.io/org/tool/tags/list?n=2&last=v1.2>; rel=\"next\"")
        );
        // Another host, odd characters: only the page position survives, escaped.
        assert_eq!(
            next_page_link("<https://evil.example/x?n=5&last=a%0d%0aSet-Cookie>; rel=\"next\"", &local).as_deref(),
            Some("</v2/ghcr.io/org/tool/tags/list?n=5&last=a%0D%0ASet-Cookie>; rel=\"next\"")
        );
        assert_eq!(next_page_link("<https://evil.example/x>; rel=\"next\"", &local), None);
        assert_eq!(next_page_link("</v2/x/tags/list?last=a>; rel=\"prev\"", &local), None);
        assert_eq!(next_page_link("garbage", &local), None);
    }
}
