//! Mirrored manifests. By digest: immutable, cached for good. By tag: the tag→digest answer is
//! trusted for `tag_ttl`, then revalidated with a HEAD (free against Docker Hub's rate limit); when
//! the upstream fails, the last known digest is served if `serve_stale` allows.

use axum::response::{IntoResponse, Response};
use reqwest::Method;

use super::{count, to_registry_error};
use crate::app::AppState;
use crate::registry::error::{Code, RegistryError, Result};
use crate::registry::listing::tags_page;
use crate::registry::manifests::{describe, load, manifest_response};
use crate::registry::names::{Algorithm, Digest, Reference, RepoName};
use crate::registry::{Ctx, RequestInfo, Target};
use crate::storage::{unix_now, ManifestMeta, TagRecord};
use crate::upstream::{Upstream, UpstreamError};

pub async fn get(ctx: &Ctx, target: &Target, reference: &Reference, info: &mut RequestInfo) -> Result<Response> {
    let Target::Mirror { upstream, remote, local } = target else {
        return Err(RegistryError::internal("cache::manifests::get on a local repository"));
    };
    let state = &ctx.state;
    let store = &state.store;
    let head = ctx.is_head();
    let mut outcome = |o: &'static str| {
        info.cache = Some(o);
        count(state, target, "manifest", o);
    };
    match reference {
        Reference::Digest(d) => {
            if let Some((meta, bytes)) = load(store, local, d).await? {
                outcome("hit");
                return Ok(serve(state, d, &meta, bytes, head));
            }
            let fetched = fetch(&ctx.state, upstream, remote, &d.to_string(), Some(d))
                .await
                .map_err(|e| to_registry_error(&e, Code::ManifestUnknown))?;
            store.put_manifest(local, &fetched.digest, &fetched.meta, &fetched.bytes).await?;
            outcome("miss");
            Ok(serve(state, &fetched.digest, &fetched.meta, fetched.bytes, head))
        }
        Reference::Tag(tag) => {
            let known = match store.tag(local, tag).await? {
                Some(rec) => match rec.digest.parse::<Digest>() {
                    Ok(d) => load(store, local, &d).await?.map(|(meta, bytes)| (rec, d, meta, bytes)),
                    Err(_) => None,
                },
                None => None,
            };
            let ttl = state.config.tag_ttl.as_secs();
            if let Some((rec, d, meta, bytes)) = &known {
                if unix_now().saturating_sub(rec.fetched_at) < ttl {
                    outcome("hit");
                    return Ok(serve(state, d, meta, bytes.clone(), head));
                }
            }
            let result = match &known {
                Some((_, d, _, _)) => revalidate(&ctx.state, upstream, remote, tag, d).await,
                None => fetch(&ctx.state, upstream, remote, tag, None).await.map(Some),
            };
            match (result, known) {
                // Unchanged upstream: no GET, just a fresh timestamp.
                (Ok(None), Some((_, d, meta, bytes))) => {
                    store.set_tag(local, tag, &TagRecord::now(&d)).await?;
                    outcome("revalidated");
                    Ok(serve(state, &d, &meta, bytes, head))
                }
                (Ok(Some(f)), _) => {
                    store.put_manifest(local, &f.digest, &f.meta, &f.bytes).await?;
                    store.set_tag(local, tag, &TagRecord::now(&f.digest)).await?;
                    outcome("miss");
                    Ok(serve(state, &f.digest, &f.meta, f.bytes, head))
                }
                (Err(e), Some((_, d, meta, bytes))) if state.config.serve_stale && e.is_outage() => {
                    tracing::warn!(upstream = upstream.name(), repository = %local, tag, error = %e, "upstream failed; serving the last known digest");
                    outcome("stale");
                    Ok(serve(state, &d, &meta, bytes, head))
                }
                (Err(e), _) => {
                    outcome("error");
                    Err(to_registry_error(&e, Code::ManifestUnknown))
                }
                (Ok(None), None) => Err(RegistryError::internal("revalidation without a cached manifest")),
            }
        }
    }
}

/// Answer with a mirrored manifest, which counts as a use for the eviction order.
fn serve(state: &AppState, d: &Digest, meta: &ManifestMeta, bytes: Vec<u8>, head: bool) -> Response {
    state.lru.touch(d, bytes.len() as u64);
    manifest_response(d, meta, bytes, head)
}

pub struct Fetched {
    pub digest: Digest,
    pub meta: ManifestMeta,
    pub bytes: Vec<u8>,
}

/// `None` when the upstream still points the tag at `current`; otherwise the new manifest.
async fn revalidate(
    state: &AppState,
    upstream: &Upstream,
    remote: &RepoName,
    tag: &str,
    current: &Digest,
) -> Result<Option<Fetched>, UpstreamError> {
    let resp = upstream.manifest(Method::HEAD, remote, tag).await?;
    let advertised = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<Digest>().ok());
    if advertised.as_ref() == Some(current) {
        return Ok(None);
    }
    fetch(state, upstream, remote, tag, None).await.map(Some)
}

/// GET a manifest from upstream and verify its digest. Bytes are kept exactly as sent.
pub async fn fetch(
    state: &AppState,
    upstream: &Upstream,
    remote: &RepoName,
    reference: &str,
    expected: Option<&Digest>,
) -> Result<Fetched, UpstreamError> {
    let resp = upstream.manifest(Method::GET, remote, reference).await?;
    let content_type = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).map(str::to_string);
    let advertised = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<Digest>().ok());
    let limit = state.config.max_manifest_size;
    if resp.content_length().is_some_and(|l| l > limit) {
        return Err(upstream.failed(UpstreamError::Status { upstream: upstream.name().to_string(), status: 413 }));
    }
    let bytes = resp.bytes().await.map_err(|e| upstream.failed(upstream.stream_error(e)))?.to_vec();
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
    match upstream.tags(remote, &query.join("&")).await {
        Ok(resp) => {
            let link = resp.headers().get("link").cloned();
            let body: serde_json::Value = resp
                .json()
                .await
                .map_err(|e| RegistryError::new(Code::Unavailable, format!("upstream tags list: {e}")))?;
            let tags = body.get("tags").cloned().unwrap_or(serde_json::json!([]));
            let mut out = axum::Json(serde_json::json!({ "name": local.as_str(), "tags": tags })).into_response();
            if let Some(link) = link {
                out.headers_mut().insert("link", link);
            }
            Ok(out)
        }
        Err(e) if e.is_outage() => tags_page(&ctx, local, ctx.state.store.list_tags(local).await?),
        Err(e) => Err(to_registry_error(&e, Code::NameUnknown)),
    }
}
