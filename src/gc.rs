//! `regmirror gc`: remove blobs no manifest references any more (after private manifests were
//! deleted). Safe while the server runs and pushes continue: only blobs older than a grace period
//! are candidates (an upload in progress, or a blob pushed moments before its manifest, is young),
//! and references are marked again right before anything is deleted.

use std::collections::HashSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::Namespaces;
use crate::oci::{describe, Digest, RepoName};
use crate::storage::{unix_now, Meta, Store};

#[derive(Default, Serialize, Deserialize)]
pub struct GcRecord {
    pub runs: u64,
    pub freed_bytes: u64,
    /// When the last run ended (Unix seconds; 0 when never, or recorded by an older version).
    #[serde(default)]
    pub last_run: u64,
}

/// Totals over every run (zero when gc never ran), read by the server for its metrics.
pub async fn record(store: &Store) -> GcRecord {
    match store.read_meta(Meta::GcRecord).await {
        Ok(Some(b)) => serde_json::from_slice(&b).unwrap_or_default(),
        _ => GcRecord::default(),
    }
}

#[derive(Debug, Default)]
pub struct Report {
    pub removed: Vec<(Digest, u64)>,
    pub freed_bytes: u64,
    pub unlinked: usize,
}

/// Digests in use: every manifest of every repository, with its blobs and children, and every
/// blob a mirrored repository links (mirrored content is eviction's business, not gc's).
async fn mark(store: &Store, namespaces: &Namespaces) -> std::io::Result<HashSet<Digest>> {
    let mut used = HashSet::new();
    for name in store.list_repositories_all().await? {
        if namespaces.is_mirrored(&name) {
            used.extend(store.repository_digests(&name).await?);
            continue;
        }
        for m in store.manifest_digests(&name).await? {
            used.insert(m.clone());
            if let Some(bytes) = store.read_blob(&m).await? {
                let media_type = store.manifest_meta(&name, &m).await?.map(|meta| meta.media_type);
                if let Ok(described) = describe(&bytes, media_type.as_deref()) {
                    used.extend(described.blobs);
                    used.extend(described.children);
                }
            }
        }
    }
    Ok(used)
}

pub async fn run(store: &Store, namespaces: &Namespaces, grace: Duration, dry_run: bool) -> std::io::Result<Report> {
    let used = mark(store, namespaces).await?;
    let now = unix_now();
    let young = |mtime: u64| mtime + grace.as_secs() > now;
    let candidates: Vec<(Digest, u64)> = store
        .scan_blobs()
        .await?
        .into_iter()
        .filter(|(d, _, mtime)| !used.contains(d) && !young(*mtime))
        .map(|(d, size, _)| (d, size))
        .collect();
    let mut report = Report::default();
    let candidates: Vec<(Digest, u64)> = {
        let mut kept = Vec::new();
        for (d, size) in candidates {
            // Linked again (a push reusing it) since the scan: young again, keep it.
            if store.blob_stat(&d).await?.is_some_and(|(_, mtime)| !young(mtime)) {
                kept.push((d, size));
            }
        }
        kept
    };
    if dry_run {
        report.freed_bytes = candidates.iter().map(|c| c.1).sum();
        report.removed = candidates;
        return Ok(report);
    }
    // Unlink first: a manifest pushed from now on cannot reference these blobs (the push checks
    // the links), then mark once more and delete only what is still unreferenced and old.
    let private_repos: Vec<RepoName> =
        store.list_repositories_all().await?.into_iter().filter(|name| !namespaces.is_mirrored(name)).collect();
    for (d, _) in &candidates {
        for name in &private_repos {
            if store.is_blob_linked(name, d).await? {
                store.unlink_blob(name, d).await?;
                report.unlinked += 1;
            }
        }
    }
    let used = mark(store, namespaces).await?;
    for (d, size) in candidates {
        if used.contains(&d) || store.blob_stat(&d).await?.is_none_or(|(_, mtime)| young(mtime)) {
            continue;
        }
        store.delete_blob(&d).await?;
        report.freed_bytes += size;
        report.removed.push((d, size));
    }
    let mut record = record(store).await;
    record.runs += 1;
    record.freed_bytes += report.freed_bytes;
    record.last_run = unix_now();
    store.write_meta(Meta::GcRecord, &serde_json::to_vec(&record).map_err(std::io::Error::other)?).await?;
    Ok(report)
}
