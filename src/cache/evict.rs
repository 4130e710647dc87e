//! The eviction task: loads the LRU index at start, persists access times, and keeps the store
//! under `storage.max_size` — starting above it and stopping 5 % below, so it does not thrash.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::lru::Evicted;
use crate::app::AppState;
use crate::registry::names::RepoName;

/// How often access times are persisted and the bound checked when nothing else wakes the task.
const TICK: Duration = Duration::from_secs(10);

/// Run the eviction loop; call after `load`.
pub fn spawn(state: AppState) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TICK);
        let mut gc_runs = crate::gc::record(&state.store).await.runs;
        loop {
            tokio::select! {
                _ = state.evict_wakeup.notified() => {}
                _ = tick.tick() => {}
            }
            // `regmirror gc` deletes behind the server's back: count the store again after it ran.
            let runs = crate::gc::record(&state.store).await.runs;
            if runs != gc_runs {
                gc_runs = runs;
                match state.store.scan_blobs().await {
                    Ok(blobs) => state.store.stats().reset(blobs.iter().map(|b| b.1).sum(), blobs.len() as u64),
                    Err(e) => tracing::warn!(error = %e, "could not count the store after gc"),
                }
            }
            if let Err(e) = state.lru.persist() {
                tracing::warn!(error = %e, "could not persist access times");
            }
            if let Some(max) = state.config.max_size {
                pass(&state, max).await;
            }
        }
    });
}

/// Index the store: private content is protected, everything else is mirrored content in LRU
/// order; the store's size figures come from the same scan. Once, at start, before serving.
pub async fn load(state: &AppState) -> std::io::Result<()> {
    let blobs = state.store.scan_blobs().await?;
    state.store.stats().reset(blobs.iter().map(|b| b.1).sum(), blobs.len() as u64);
    let mut protected = HashSet::new();
    for repo in state.store.list_repositories_all().await? {
        let Ok(name) = RepoName::parse(&repo) else { continue };
        if state.config.private_namespaces.iter().any(|ns| name.is_under(ns)) {
            protected.extend(state.store.repository_digests(&name).await?);
        }
    }
    state.lru.load(protected, blobs);
    state.loaded.store(true, Ordering::Release);
    Ok(())
}

/// One eviction pass: least recently used mirrored content first, until the store is 5 % under
/// `max`. Costs time in proportion to what it evicts.
pub async fn pass(state: &AppState, max: u64) -> Evicted {
    let stats = state.store.stats();
    let bytes = stats.bytes.load(Ordering::Relaxed).max(0) as u64;
    state.metrics.store_max_bytes.set(max as i64);
    state.metrics.pinned_bytes.set(state.lru.pinned_bytes() as i64);
    if bytes <= max || !state.loaded.load(Ordering::Acquire) {
        return Evicted::default();
    }
    let started = Instant::now();
    let low = max - max / 20;
    let mut done = Evicted::default();
    for (d, size) in state.lru.take_victims(bytes - low) {
        match state.store.delete_blob(&d).await {
            Ok(()) => {
                state.lru.evicted(&d);
                done.blobs += 1;
                done.bytes += size;
            }
            Err(e) => {
                tracing::warn!(digest = %d, error = %e, "could not evict");
                state.lru.give_back(d, size);
            }
        }
    }
    state.metrics.evictions.inc_by(done.blobs);
    state.metrics.evicted_bytes.inc_by(done.bytes);
    let after = stats.bytes.load(Ordering::Relaxed).max(0) as u64;
    tracing::info!(
        evicted = done.blobs,
        evicted_bytes = done.bytes,
        store_bytes = after,
        max_size = max,
        ms = started.elapsed().as_millis() as u64,
        "eviction pass"
    );
    let over = after > max;
    state.metrics.over_limit.set(over as i64);
    if over {
        tracing::error!(store_bytes = after, max_size = max, "private and pinned content (and downloads in progress) alone exceed storage.max_size; nothing more can be evicted — raise max_size or delete private images and run `regmirror gc`");
    }
    done
}
