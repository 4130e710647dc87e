//! A summary of every repository (size, blobs, pinned), built from the store in the background
//! and rebuilt after the store changes, so the page never scans 10,000 repositories while a
//! visitor waits.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::app::AppState;
use crate::oci::{Digest, RepoName};
use crate::storage::unix_now;

/// The least time between two rebuilds: a busy mirror changes its store all the time.
const REBUILD_AFTER: Duration = Duration::from_secs(1);

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
    building: AtomicBool,
    last_build: std::sync::Mutex<Option<Instant>>,
}

impl RepoIndex {
    /// The summary as last built; starts a rebuild in the background when the store changed.
    pub fn current(&self, state: &AppState) -> Arc<Summary> {
        self.refresh(state);
        self.summary.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Rebuild in the background if the store changed since the last build (and that build is
    /// old enough).
    pub fn refresh(&self, state: &AppState) {
        let changes = state.store.stats().changes.load(Ordering::Relaxed);
        let summary = self.summary.read().unwrap_or_else(|e| e.into_inner()).clone();
        if summary.built_at != 0 && summary.changes == changes {
            return;
        }
        if super::lock(&self.last_build).is_some_and(|t| t.elapsed() < REBUILD_AFTER) {
            return;
        }
        if self.building.swap(true, Ordering::AcqRel) {
            return;
        }
        let state = state.clone();
        tokio::spawn(async move {
            let index = &state.status.repositories;
            *super::lock(&index.last_build) = Some(Instant::now());
            match build(&state, changes).await {
                Ok(summary) => *index.summary.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(summary),
                Err(e) => tracing::warn!(error = %e, "could not summarise the repositories for the status page"),
            }
            index.building.store(false, Ordering::Release);
        });
    }
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
