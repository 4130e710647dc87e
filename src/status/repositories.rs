//! A summary of every repository (size, blobs, pinned), built from the store in the background
//! and rebuilt after the store changes, so the page never scans 10,000 repositories while a
//! visitor waits.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::app::AppState;
use crate::oci::{Digest, RepoName};
use crate::storage::unix_now;

/// The least time between two rebuilds, and how many times the last build's duration must pass
/// first: a busy mirror changes its store all the time, and a scan must not run back to back.
const REBUILD_AFTER: Duration = Duration::from_secs(1);
const REST_FACTOR: u32 = 10;
/// Rebuilt at least this often, for changes other processes make (`regmirror gc`).
const MAX_AGE: Duration = Duration::from_secs(300);

#[derive(Clone, Debug)]
pub struct RepoRow {
    pub name: RepoName,
    pub mirrored: bool,
    /// Bytes of the blobs it links (a blob shared by several repositories counts in each).
    pub size: u64,
    pub blobs: usize,
    pub pinned: bool,
}

#[derive(Default)]
pub struct Summary {
    pub rows: Vec<RepoRow>,
    /// The store's change count the summary was built at.
    changes: u64,
    /// Unix seconds; 0 before the first build.
    pub built_at: u64,
}

#[derive(Default)]
pub struct RepoIndex {
    summary: RwLock<Arc<Summary>>,
    /// Wakes the builder: someone looked, and the store may have changed.
    wanted: Notify,
}

impl RepoIndex {
    pub(super) fn wake(&self) {
        self.wanted.notify_one();
    }

    /// The summary as last built; asks for a rebuild when the store changed since.
    pub fn current(&self, state: &AppState) -> Arc<Summary> {
        let summary = self.summary.read().unwrap_or_else(|e| e.into_inner()).clone();
        if summary.built_at == 0 || summary.changes != state.store.stats().changes.load(Ordering::Relaxed) {
            self.wanted.notify_one();
        }
        summary
    }
}

/// The builder: one task, rebuilding when a visitor finds the summary stale (or it is older than
/// `MAX_AGE`), resting between builds in proportion to how long the last one took, so nobody
/// looking costs nothing and a busy store is not scanned back to back. A build that fails or
/// panics is logged and tried again on the next wake-up.
pub fn spawn(state: AppState) {
    tokio::spawn(async move {
        let index = &state.status.repositories;
        let mut first = true;
        loop {
            if !first {
                let _ = tokio::time::timeout(MAX_AGE, index.wanted.notified()).await;
            }
            first = false;
            if state.status.stopping() {
                return;
            }
            let summary = index.summary.read().unwrap_or_else(|e| e.into_inner()).clone();
            let changes = state.store.stats().changes.load(Ordering::Relaxed);
            let age = Duration::from_secs(unix_now().saturating_sub(summary.built_at));
            if summary.built_at != 0 && summary.changes == changes && age < MAX_AGE {
                continue;
            }
            let started = Instant::now();
            let build = tokio::spawn({
                let state = state.clone();
                async move { build(&state, changes).await }
            });
            match build.await {
                Ok(Ok(summary)) => *index.summary.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(summary),
                Ok(Err(e)) => tracing::warn!(error = %e, "could not summarise the repositories for the status page"),
                Err(e) => tracing::error!(error = %e, "summarising the repositories for the status page failed"),
            }
            tokio::time::sleep(REBUILD_AFTER.max(started.elapsed() * REST_FACTOR)).await;
        }
    });
}

async fn build(state: &AppState, changes: u64) -> std::io::Result<Summary> {
    let store = &state.store;
    let sizes: HashMap<Digest, u64> = store.scan_blobs().await?.into_iter().map(|(d, size, _)| (d, size)).collect();
    let pinned: HashSet<RepoName> = state
        .config
        .pins
        .iter()
        .filter_map(|p| RepoName::parse(&p.repository).and_then(|r| r.prefixed(&p.upstream)).ok())
        .collect();
    let namespaces = state.config.namespaces();
    let mut rows = Vec::new();
    for name in store.list_repositories_all().await? {
        let digests = store.repository_digests(&name).await?;
        let present: Vec<u64> = digests.iter().filter_map(|d| sizes.get(d).copied()).collect();
        rows.push(RepoRow {
            mirrored: namespaces.is_mirrored(&name),
            size: present.iter().sum(),
            blobs: present.len(),
            pinned: pinned.contains(&name),
            name,
        });
    }
    Ok(Summary { rows, changes, built_at: unix_now() })
}
