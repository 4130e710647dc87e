//! Blob GET/HEAD (with ranges) and DELETE. Local and mirrored blobs are answered by the same code:
//! the store or the cache says where the bytes are, `serve` makes the response.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::error::{Code, RegistryError, Result};
use super::response::{blob_body, blob_response, located, parse_range};
use super::{Ctx, RequestInfo, Target};
use crate::app::AppState;
use crate::cache::BlobSource;
use crate::cluster::{PEER_AUTH, PEER_PATH};
use crate::oci::{Digest, RepoName};

pub fn unknown(repo: &RepoName, d: &Digest) -> RegistryError {
    RegistryError::new(Code::BlobUnknown, format!("blob {d} is not in {repo}"))
}

pub async fn get(ctx: Ctx, target: Target, digest: &str, info: &mut RequestInfo) -> Result<Response> {
    let d: Digest = digest.parse()?;
    let cache = &ctx.state.cache;
    let source = match &target {
        Target::Local(repo) => {
            let stored = match cache.store.is_blob_linked(repo, &d).await? {
                true => cache.stored_blob(&d).await?,
                false => None,
            };
            stored.ok_or_else(|| unknown(repo, &d))?
        }
        Target::Mirror(m) => {
            let found = cache.blob(m, &d, ctx.is_head()).await;
            info.cache = Some(found.as_ref().map_or("error", |(_, obtained)| obtained.label()));
            found?.0
        }
    };
    if let BlobSource::Stored { .. } = source {
        if !ctx.is_head() && redirects(&ctx.state) {
            // Without a URL (the store could not sign one), the blob is served here.
            if let Ok(Some(url)) = ctx.state.store.blob_url(&d, REDIRECT_TTL).await {
                ctx.state.metrics.blob_redirects.inc();
                let mut resp = located(StatusCode::TEMPORARY_REDIRECT, &url, Some(&d));
                resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                return Ok(resp);
            }
        }
    }
    serve(&ctx, &d, source)
}

/// How long a redirect to the object store stays valid: long enough to start a large download,
/// short enough that a leaked URL soon stops working.
const REDIRECT_TTL: std::time::Duration = std::time::Duration::from_secs(600);

/// Whether stored blobs are answered with a redirect to the object store (`storage.s3.redirect`).
fn redirects(state: &AppState) -> bool {
    matches!(&state.config.backend, crate::config::StorageBackend::S3(s3) if s3.redirect)
}

fn serve(ctx: &Ctx, d: &Digest, source: BlobSource) -> Result<Response> {
    serve_blob(&ctx.state, &ctx.headers, ctx.is_head(), d, source)
}

/// The response for a blob wherever its bytes are: ranges, HEAD and lengths in one place.
fn serve_blob(state: &AppState, headers: &HeaderMap, head: bool, d: &Digest, source: BlobSource) -> Result<Response> {
    let size = source.size();
    // The upstream's own answer to a HEAD is passed on whole.
    let range = match &source {
        BlobSource::Upstream { .. } => None,
        _ => parse_range(headers, size)?,
    };
    let status = if range.is_some() { StatusCode::PARTIAL_CONTENT } else { StatusCode::OK };
    if head {
        return Ok(blob_response(status, d, size, range, Body::empty()));
    }
    let (start, len) = range.map_or((0, size), |r| (r.start, r.len()));
    let body = match source {
        BlobSource::Stored { hold, .. } => {
            let served = state.metrics.bytes_served.with_label_values(&["cache"]);
            blob_body(state.store.clone(), d.clone(), start, len, move |n| served.inc_by(n), hold)
        }
        BlobSource::Filling { fill, .. } => Body::from_stream(fill.stream(start, start + len)),
        BlobSource::Upstream { .. } => Body::empty(),
    };
    Ok(blob_response(status, d, size, range, body))
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

/// `GET /_regmirror/fills/<digest>`: another replica on the bucket asks for the bytes of a fill
/// this one runs (it found this replica's lease), or has just stored. Only requests signed by a
/// replica are answered.
pub async fn for_replica(State(state): State<AppState>, Path(digest): Path<String>, headers: HeaderMap) -> Response {
    let answer = async {
        let signed = headers.get(PEER_AUTH).and_then(|v| v.to_str().ok());
        match &state.cache.cluster {
            Some(cluster) if cluster.verify(&format!("{PEER_PATH}{digest}"), signed) => {}
            _ => return Err(RegistryError::new(Code::Denied, "only for the other replicas of this mirror")),
        }
        let d: Digest = digest.parse()?;
        match state.cache.blob_for_replica(&d).await? {
            Some(source) => serve_blob(&state, &headers, false, &d, source),
            None => Err(RegistryError::new(Code::BlobUnknown, format!("no fill of {d} runs here"))),
        }
    };
    answer.await.unwrap_or_else(IntoResponse::into_response)
}
