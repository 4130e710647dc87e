//! The eviction task: loads the LRU index at start, persists access times, and keeps the store
//! under `storage.max_size` — starting above it and stopping 5 % below, so it does not thrash.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::lru::Evicted;
use super::Cache;
use crate::storage::unix_now;

/// How often access times are persisted and the bound checked when nothing else wakes the task.
const TICK: Duration = Duration::from_secs(10);

/// Run the eviction loop; call after `load`.
pub fn spawn(cache: Cache) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TICK);
        let mut gc_runs = crate::gc::record(&cache.store).await.runs;
        // Replicas on one bucket check the bound on the tick only: each check lists the bucket,
        // too much to do after every fill.
        let on_wakeup = cache.cluster.is_none();
        loop {
            tokio::select! {
                _ = cache.evict_wakeup.notified(), if on_wakeup => {}
                _ = tick.tick() => {}
            }
            // `regmirror gc` deletes behind the server's back: count the store again after it ran.
            let runs = crate::gc::record(&cache.store).await.runs;
            if runs != gc_runs {
                gc_runs = runs;
                match cache.store.scan_blobs().await {
                    Ok(blobs) => recount(&cache, &blobs),
                    Err(e) => tracing::warn!(error = %e, "could not count the store after gc"),
                }
            }
            if let Err(e) = cache.lru.persist() {
                tracing::warn!(error = %e, "could not persist access times");
            }
            if let Some(max) = cache.policy.max_size {
                match &cache.cluster {
                    Some(cluster) => replicated_pass(&cache, cluster, max).await,
                    None => {
                        pass(&cache, max).await;
                    }
                }
            }
        }
    });
}

/// Index the store: private content is protected, everything else is mirrored content in LRU
/// order; the store's size figures come from the same scan. Once, at start, before serving.
pub async fn load(cache: &Cache) -> std::io::Result<()> {
    let blobs = cache.store.scan_blobs().await?;
    recount(cache, &blobs);
    let (repositories, protected) = private_content(cache).await?;
    mark_provenance(cache, &repositories, &protected).await?;
    cache.lru.load(protected, blobs);
    cache.loaded.store(true, Ordering::Release);
    Ok(())
}

/// The store's size figures, from a scan of its blobs (size is the second field).
fn recount(cache: &Cache, blobs: &[(crate::oci::Digest, u64, u64)]) {
    cache.store.stats().reset(blobs.iter().map(|b| b.1).sum(), blobs.len() as u64);
}

/// Every repository, and the digests private repositories hold (never evicted); relations of
/// referrers to their subjects are recorded on the way.
async fn private_content(cache: &Cache) -> std::io::Result<(Vec<crate::oci::RepoName>, HashSet<crate::oci::Digest>)> {
    let mut protected = HashSet::new();
    let repositories = cache.store.list_repositories_all().await?;
    for repo in &repositories {
        if !cache.namespaces.is_mirrored(repo) {
            protected.extend(cache.store.repository_digests(repo).await?);
        } else {
            for (subject, referrer) in cache.store.referrer_pairs(repo).await? {
                cache.lru.relate(&subject, &referrer);
            }
        }
    }
    Ok((repositories, protected))
}

/// An eviction pass on a bucket shared by replicas: by one replica at a time (the eviction
/// lease), over what the bucket holds now (blobs every replica added, pushes through any of
/// them) with every replica's uses (the blobs' `touch` times in the bucket).
async fn replicated_pass(cache: &Cache, cluster: &crate::cluster::Cluster, max: u64) {
    let lease = match cluster.claim_eviction().await {
        Ok(Some(lease)) => lease,
        Ok(None) => return, // another replica runs the pass
        Err(e) => {
            tracing::warn!(error = %e, "could not take the eviction lease");
            return;
        }
    };
    let listed_at = unix_now();
    let refreshed = async {
        let blobs = cache.store.scan_blobs().await?;
        let (_, protected) = private_content(cache).await?;
        recount(cache, &blobs);
        cache.lru.refresh(protected, blobs);
        std::io::Result::Ok(())
    };
    match refreshed.await {
        // (A lease lost meanwhile: another replica runs the pass now.)
        Ok(()) if !lease.lost() => {
            checked_pass(cache, max, Some(listed_at)).await;
        }
        Ok(()) => {}
        Err(e) => tracing::warn!(error = %e, "could not read the bucket for an eviction pass"),
    }
    lease.release().await;
}

/// Evict least recently used mirrored content, `bytes` at least where there is that much. With
/// `listed_at` (replicas on one bucket: the order comes from a listing taken then), a victim used
/// or linked since, on any replica, is kept.
async fn evict(cache: &Cache, bytes: u64, listed_at: Option<u64>) -> Evicted {
    let mut done = Evicted::default();
    for (d, size) in cache.lru.take_victims(bytes) {
        if let Some(listed_at) = listed_at {
            match cache.store.blob_stat(&d).await {
                Ok(Some((_, used))) if used < listed_at => {}
                Ok(None) => {
                    cache.lru.evicted(&d); // gone already (another replica's gc or pass)
                    continue;
                }
                _ => {
                    cache.lru.give_back(d, size);
                    continue;
                }
            }
        }
        match cache.store.delete_blob(&d).await {
            Ok(()) => {
                cache.lru.evicted(&d);
                done.blobs += 1;
                done.bytes += size;
            }
            Err(e) => {
                tracing::warn!(digest = %d, error = %e, "could not evict");
                cache.lru.give_back(d, size);
            }
        }
    }
    cache.metrics.evictions.inc_by(done.blobs);
    cache.metrics.evicted_bytes.inc_by(done.bytes);
    if done.blobs > 0 {
        let record = super::EvictionRecord { at: unix_now(), blobs: done.blobs, bytes: done.bytes };
        *crate::lock(&cache.last_eviction) = Some(record);
    }
    done
}

/// The disk is too full for a blob of `bytes` more: evict least recently used mirrored content
/// to make room, whatever `storage.max_size` says (on a full disk that bound cannot hold anyway).
pub async fn make_room(cache: &Cache, bytes: u64) -> Evicted {
    let _one_at_a_time = cache.evicting.lock().await;
    let done = evict(cache, bytes, None).await;
    tracing::info!(
        evicted = done.blobs,
        evicted_bytes = done.bytes,
        wanted = bytes,
        "evicted to make room on a full disk"
    );
    done
}

/// Stores written before blobs recorded which upstream delivered them: once, mark every blob that
/// only mirrored repositories hold as delivered by their upstreams. A blob a private repository
/// holds too may have come from a push; it is verified against its upstream on its next use.
async fn mark_provenance(
    cache: &Cache,
    repositories: &[crate::oci::RepoName],
    local: &HashSet<crate::oci::Digest>,
) -> std::io::Result<()> {
    use crate::storage::Meta;
    if cache.store.read_meta(Meta::ProvenanceMarked).await?.is_some() {
        return Ok(());
    }
    let mut marked = 0u64;
    for repo in repositories.iter().filter(|r| cache.namespaces.is_mirrored(r)) {
        let upstream = repo.first_component();
        for d in cache.store.repository_digests(repo).await? {
            if local.contains(&d) || cache.store.blob_size(&d).await?.is_none() {
                continue;
            }
            if !cache.store.delivered_by(&d, upstream).await? {
                cache.store.mark_delivered(&d, upstream).await?;
                marked += 1;
            }
        }
    }
    if marked > 0 {
        tracing::info!(blobs = marked, "recorded which upstream delivered the blobs of an older store");
    }
    cache.store.write_meta(Meta::ProvenanceMarked, b"1\n").await
}

/// One eviction pass: least recently used mirrored content first, until the store is 5 % under
/// `max`. Costs time in proportion to what it evicts.
pub async fn pass(cache: &Cache, max: u64) -> Evicted {
    checked_pass(cache, max, None).await
}

/// `pass`, where the eviction order comes from a listing of a shared bucket taken at `listed_at`.
async fn checked_pass(cache: &Cache, max: u64, listed_at: Option<u64>) -> Evicted {
    // Passes one at a time, each counting what the last one left.
    let _one_at_a_time = cache.evicting.lock().await;
    let stats = cache.store.stats();
    let bytes = stats.bytes.load(Ordering::Relaxed).max(0) as u64;
    cache.metrics.store_max_bytes.set(max as i64);
    cache.metrics.pinned_bytes.set(cache.lru.pinned_bytes() as i64);
    if bytes <= max || !cache.loaded.load(Ordering::Acquire) {
        return Evicted::default();
    }
    let started = Instant::now();
    let low = max - max / 20;
    let done = evict(cache, bytes - low, listed_at).await;
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
    cache.metrics.over_limit.set(over as i64);
    if over && cache.over_limit_reported() {
        tracing::error!(store_bytes = after, max_size = max, "private and pinned content (and downloads in progress) alone exceed storage.max_size; nothing more can be evicted — raise max_size or delete private images and run `regmirror gc`");
    }
    done
}
