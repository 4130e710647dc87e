//! Blob GET/HEAD (with ranges) and DELETE.

use axum::body::Body;
use axum::http::StatusCode;
use axum::response::Response;

use super::error::{Code, RegistryError, Result};
use super::names::{Digest, RepoName};
use super::response::{blob_body, blob_response, located, parse_range};
use super::{Ctx, RequestInfo, Target};

pub fn unknown(repo: &RepoName, d: &Digest) -> RegistryError {
    RegistryError::new(Code::BlobUnknown, format!("blob {d} is not in {repo}"))
}

/// Serve a blob from the store, honouring `Range`. `None` when the store does not have it.
/// Mirrored content counts as used (eviction order); every blob is kept from eviction while served.
pub async fn serve_stored(ctx: &Ctx, d: &Digest, mirrored: bool) -> Result<Option<Response>> {
    let store = &ctx.state.store;
    let Some(guard) = ctx.state.lru.hold(d) else {
        return Ok(None);
    };
    let Some(size) = store.blob_size(d).await? else {
        return Ok(None);
    };
    if mirrored {
        ctx.state.lru.touch(d, size);
    }
    let range = parse_range(&ctx.headers, size)?;
    let status = if range.is_some() { StatusCode::PARTIAL_CONTENT } else { StatusCode::OK };
    if ctx.is_head() {
        return Ok(Some(blob_response(status, d, size, range, Body::empty())));
    }
    let (offset, len) = range.map_or((0, size), |r| (r.start, r.len()));
    let served = ctx.state.metrics.bytes_served.with_label_values(&["cache"]);
    let body = blob_body(store.clone(), d.clone(), offset, len, move |n| served.inc_by(n), guard);
    Ok(Some(blob_response(status, d, size, range, body)))
}

pub async fn get(ctx: Ctx, target: Target, digest: &str, info: &mut RequestInfo) -> Result<Response> {
    let d: Digest = digest.parse()?;
    let repo = target.local();
    if ctx.state.store.is_blob_linked(repo, &d).await? {
        if let Some(resp) = serve_stored(&ctx, &d, target.upstream_name().is_some()).await? {
            if target.upstream_name().is_some() {
                info.cache = Some("hit");
                crate::cache::count(&ctx.state, &target, "blob", "hit");
            }
            return Ok(resp);
        }
    }
    match target {
        Target::Local(_) => Err(unknown(repo, &d)),
        Target::Mirror { .. } => crate::cache::blobs::get(&ctx, &target, &d, info).await,
    }
}

pub async fn delete(ctx: Ctx, target: Target, digest: &str) -> Result<Response> {
    let repo = target.require_local()?;
    let d: Digest = digest.parse()?;
    if !ctx.state.store.is_blob_linked(repo, &d).await? {
        return Err(unknown(repo, &d));
    }
    ctx.state.store.unlink_blob(repo, &d).await?;
    Ok(located(StatusCode::ACCEPTED, &format!("/v2/{repo}/blobs/{d}"), None))
}
