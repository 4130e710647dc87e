//! Mirrored blobs that are not (yet) in this repository: served from a shared fill, or, for
//! HEAD, answered by the upstream's HEAD.

use axum::body::Body;
use axum::http::StatusCode;
use axum::response::Response;
use reqwest::Method;

use super::fill::{follow, wait_for_size};
use super::{count, to_registry_error};
use crate::registry::blobs::serve_stored;
use crate::registry::error::{Code, RegistryError, Result};
use crate::registry::names::Digest;
use crate::registry::response::{blob_response, parse_range};
use crate::registry::{Ctx, RequestInfo, Target};

pub async fn get(ctx: &Ctx, target: &Target, d: &Digest, info: &mut RequestInfo) -> Result<Response> {
    let Target::Mirror { upstream, remote, local } = target else {
        return Err(RegistryError::internal("cache::blobs::get on a local repository"));
    };
    let state = &ctx.state;
    let mut outcome = |o: &'static str| {
        info.cache = Some(o);
        count(state, target, "blob", o);
    };
    // Content-addressed: another repository may already have brought these bytes. The upstream
    // still decides whether this repository has the blob, so nothing leaks across repositories.
    if state.store.blob_size(d).await?.is_some() {
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
                return Err(to_registry_error(&e, Code::BlobUnknown));
            }
        }
    }
    if ctx.is_head() {
        // HEAD on an uncached blob asks the upstream with HEAD, not a fill.
        let resp =
            upstream.blob(Method::HEAD, remote, d, 0).await.map_err(|e| to_registry_error(&e, Code::BlobUnknown))?;
        let size = resp.content_length().unwrap_or(0);
        outcome("miss");
        return Ok(blob_response(StatusCode::OK, d, size, None, Body::empty()));
    }
    // Joining a fill another repository started: the upstream decides whether this repository
    // has the blob, as it does for stored blobs above.
    if state.fills.running_for(d).is_some_and(|owner| &owner != local) {
        if let Err(e) = upstream.blob(Method::HEAD, remote, d, 0).await {
            outcome("error");
            return Err(to_registry_error(&e, Code::BlobUnknown));
        }
    }
    let mut rx = state.fills.join_or_start(state, upstream.clone(), remote.clone(), local.clone(), d.clone());
    let total = match wait_for_size(&mut rx).await {
        Ok(t) => t,
        Err(e) => {
            outcome("error");
            return Err(to_registry_error(&e, Code::BlobUnknown));
        }
    };
    outcome("miss");
    // A repository that joined another's fill links the blob once the fill has succeeded.
    let (store, local, digest, mut done) = (state.store.clone(), local.clone(), d.clone(), rx.clone());
    tokio::spawn(async move {
        loop {
            let finished = matches!(done.borrow_and_update().phase, super::fill::Phase::Done { .. });
            if finished {
                let _ = store.link_blob(&local, &digest).await;
                return;
            }
            if done.changed().await.is_err() {
                if matches!(done.borrow().phase, super::fill::Phase::Done { .. }) {
                    let _ = store.link_blob(&local, &digest).await;
                }
                return;
            }
        }
    });
    let range = parse_range(&ctx.headers, total)?;
    let status = if range.is_some() { StatusCode::PARTIAL_CONTENT } else { StatusCode::OK };
    let (start, end) = range.map_or((0, total), |r| (r.start, r.end + 1));
    let body = Body::from_stream(follow(state.clone(), d.clone(), rx, start, end));
    Ok(blob_response(status, d, total, range, body))
}
