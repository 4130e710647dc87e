//! Mirrored blobs that are not (yet) in this repository: served from a shared fill, or, for
//! HEAD, answered by the upstream's HEAD.

use axum::body::Body;
use axum::http::StatusCode;
use axum::response::Response;
use reqwest::Method;

use super::fill::{follow, wait_for_size, wait_until_done, Phase};
use super::{count, to_registry_error, CacheError};
use crate::app::AppState;
use crate::registry::blobs::serve_stored;
use crate::registry::error::{Code, RegistryError, Result};
use crate::registry::names::{Digest, RepoName};
use crate::registry::response::{blob_response, parse_range};
use crate::registry::{Ctx, RequestInfo, Target};
use crate::upstream::content_length;

pub async fn get(ctx: &Ctx, target: &Target, d: &Digest, info: &mut RequestInfo) -> Result<Response> {
    let Target::Mirror { upstream, remote, local } = target else {
        return Err(RegistryError::internal("cache::blobs::get on a local repository"));
    };
    let state = &ctx.state;
    let mut outcome = |o: &'static str| {
        info.cache = Some(o);
        count(state, target, "blob", o);
    };
    let blob_error = |e: CacheError| to_registry_error(&e, Code::BlobUnknown);
    // Content-addressed: another repository may already have brought these bytes from this
    // upstream. The upstream still decides whether this repository has the blob, so nothing
    // leaks across repositories. Bytes this upstream never delivered (a push) are fetched
    // again and verified, never handed out on the upstream's word.
    let stored = state.store.blob_size(d).await?.is_some();
    if stored && state.store.delivered_by(d, upstream.name()).await? {
        match upstream.blob(Method::HEAD, remote, d, 0).await {
            Ok(_) => {
                state.store.link_blob(local, d).await?;
                outcome("hit");
                if let Some(resp) = serve_stored(ctx, d, true).await? {
                    return Ok(resp);
                }
            }
            Err(e) => {
                outcome("error");
                return Err(blob_error(e.into()));
            }
        }
    }
    if ctx.is_head() {
        // HEAD on an uncached blob asks the upstream with HEAD, not a fill.
        let resp = upstream.blob(Method::HEAD, remote, d, 0).await.map_err(|e| blob_error(e.into()))?;
        let Some(size) = content_length(&resp) else {
            return Err(RegistryError::new(
                Code::Unavailable,
                format!("upstream {} answered HEAD {d} without a Content-Length", upstream.name()),
            ));
        };
        outcome("miss");
        return Ok(blob_response(StatusCode::OK, d, size, None, Body::empty()));
    }
    // Joining a fill another repository started: the upstream decides whether this repository
    // has the blob, as it does for stored blobs above. Having checked, this repository becomes a
    // source the fill falls back to.
    if state.fills.runs_without(d, local) {
        if let Err(e) = upstream.blob(Method::HEAD, remote, d, 0).await {
            outcome("error");
            return Err(blob_error(e.into()));
        }
    }
    let mut rx = state.fills.join_or_start(state, upstream.clone(), remote.clone(), local.clone(), d.clone());
    let total = match wait_for_size(&mut rx, local).await {
        Ok(t) => t,
        Err(e) => {
            outcome("error");
            return Err(blob_error(e));
        }
    };
    outcome("miss");
    link_when_done(state, local.clone(), d.clone(), rx.clone());
    let range = parse_range(&ctx.headers, total)?;
    let status = if range.is_some() { StatusCode::PARTIAL_CONTENT } else { StatusCode::OK };
    let (start, end) = range.map_or((0, total), |r| (r.start, r.end + 1));
    let body = Body::from_stream(follow(state.clone(), d.clone(), rx, start, end));
    Ok(blob_response(status, d, total, range, body))
}

/// A repository that followed a fill links the blob once the fill has succeeded (the fill links
/// the repository it fetched through itself).
fn link_when_done(
    state: &AppState,
    local: RepoName,
    digest: Digest,
    mut rx: tokio::sync::watch::Receiver<super::fill::Progress>,
) {
    let store = state.store.clone();
    tokio::spawn(async move {
        if matches!(wait_until_done(&mut rx).await, Phase::Done { .. }) {
            let _ = store.link_blob(&local, &digest).await;
        }
    });
}
