//! Pinned images: fetched at start and every `cache.pin_refresh`, and never evicted — every
//! manifest and blob of them.

use std::collections::HashSet;
use std::sync::Arc;

use super::fill::{wait_for_size, wait_until_done, Phase};
use super::manifests::{fetch, load};
use crate::app::AppState;
use crate::registry::manifests::{describe, ACCEPT_ALL};
use crate::registry::names::{Digest, RepoName};
use crate::storage::TagRecord;
use crate::upstream::Upstream;

pub fn spawn(state: AppState) {
    if state.config.pins.is_empty() {
        return;
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(state.config.pin_refresh);
        loop {
            tick.tick().await;
            refresh(&state).await;
        }
    });
}

/// Re-resolve every pin, fetch what changed, and replace the pinned set.
pub async fn refresh(state: &AppState) {
    let mut pinned = HashSet::new();
    for pin in &state.config.pins {
        let (Some(upstream), Ok(remote)) = (state.upstreams.get(&pin.upstream), RepoName::parse(&pin.repository))
        else {
            continue;
        };
        let Ok(local) = remote.prefixed(upstream.name()) else { continue };
        let tags = match &pin.tag {
            Some(t) => vec![t.clone()],
            None => state.store.list_tags(&local).await.unwrap_or_default(),
        };
        for tag in tags {
            if let Err(e) = warm_tag(state, upstream, &remote, &local, &tag).await {
                tracing::warn!(image = %format!("{}/{}:{tag}", pin.upstream, pin.repository), error = %e, "pin refresh failed; keeping what is cached");
            }
            // Whatever the cache holds for the tag stays pinned, fetched just now or not.
            if let Ok(Some(rec)) = state.store.tag(&local, &tag).await {
                if let Ok(d) = rec.digest.parse::<Digest>() {
                    closure(state, &local, &d, &mut pinned).await;
                }
            }
        }
    }
    let count = pinned.len();
    state.lru.set_pinned(pinned);
    state.metrics.pinned_bytes.set(state.lru.pinned_bytes() as i64);
    tracing::info!(pins = state.config.pins.len(), digests = count, "pins refreshed");
}

/// Resolve `tag` upstream and make sure every manifest and blob of it is in the store.
pub async fn warm_tag(
    state: &AppState,
    upstream: &Arc<Upstream>,
    remote: &RepoName,
    local: &RepoName,
    tag: &str,
) -> Result<(), String> {
    let limit = state.config.max_manifest_size;
    let top = fetch(upstream, remote, tag, None, ACCEPT_ALL, limit).await.map_err(|e| e.to_string())?;
    state.store.put_manifest(local, &top.digest, &top.meta, &top.bytes).await.map_err(|e| e.to_string())?;
    state.store.set_tag(local, tag, &TagRecord::now(&top.digest)).await.map_err(|e| e.to_string())?;
    let described = describe(&top.bytes, Some(&top.meta.media_type)).map_err(|e| e.to_string())?;
    let mut blobs = described.blobs;
    for child in described.children {
        let bytes = match load(&state.store, local, &child).await.map_err(|e| e.to_string())? {
            Some((_, bytes)) => bytes,
            None => {
                let f = fetch(upstream, remote, &child.to_string(), Some(&child), ACCEPT_ALL, limit)
                    .await
                    .map_err(|e| e.to_string())?;
                state.store.put_manifest(local, &f.digest, &f.meta, &f.bytes).await.map_err(|e| e.to_string())?;
                f.bytes
            }
        };
        blobs.extend(describe(&bytes, None).map_err(|e| e.to_string())?.blobs);
    }
    for d in blobs {
        ensure_blob(state, upstream, remote, local, &d).await?;
    }
    Ok(())
}

/// The blob is in the store and linked to `local` when this returns `Ok`. A stored copy counts
/// only when this upstream delivered it; anything else is fetched (and verified) through a fill.
async fn ensure_blob(
    state: &AppState,
    upstream: &Arc<Upstream>,
    remote: &RepoName,
    local: &RepoName,
    d: &Digest,
) -> Result<(), String> {
    let stored = state.store.blob_size(d).await.map_err(|e| e.to_string())?.is_some();
    if stored && state.store.delivered_by(d, upstream.name()).await.map_err(|e| e.to_string())? {
        return state.store.link_blob(local, d).await.map_err(|e| e.to_string());
    }
    let mut rx = state.fills.join_or_start(state, upstream.clone(), remote.clone(), local.clone(), d.clone());
    wait_for_size(&mut rx, local).await.map_err(|e| e.to_string())?;
    match wait_until_done(&mut rx).await {
        Phase::Done { .. } => state.store.link_blob(local, d).await.map_err(|e| e.to_string()),
        Phase::Failed(e) => Err(e.to_string()),
        _ => Err(format!("fill of {d} ended without a result")),
    }
}

/// Every digest a manifest stands for in the store: itself, its children, their blobs.
pub async fn closure(state: &AppState, local: &RepoName, top: &Digest, out: &mut HashSet<Digest>) {
    let mut pending = vec![top.clone()];
    while let Some(d) = pending.pop() {
        if !out.insert(d.clone()) {
            continue;
        }
        let Ok(Some((meta, bytes))) = load(&state.store, local, &d).await else { continue };
        if let Ok(described) = describe(&bytes, Some(&meta.media_type)) {
            out.extend(described.blobs);
            pending.extend(described.children);
        }
    }
}
