//! Pinned images: fetched at start and every `cache.pin_refresh`, and never evicted — every
//! manifest and blob of them.

use std::collections::HashSet;
use std::time::Duration;

use super::manifests::{fetch, load};
use super::{Cache, CacheError, Content, Mirrored};
use crate::config::Pin;
use crate::oci::{describe, Digest, Reference, RepoName, ACCEPT_ALL};
use crate::storage::TagRecord;
use crate::upstream::Upstreams;

pub fn spawn(cache: Cache, upstreams: Upstreams, pins: Vec<Pin>, every: Duration, referrers: bool) {
    if pins.is_empty() {
        return;
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            refresh(&cache, &upstreams, &pins, referrers).await;
        }
    });
}

/// Re-resolve every pin, fetch what changed, and replace the pinned set. With `referrers`, every
/// referrer of a pinned image (signatures, SBOMs, attestations, recursively) is fetched and
/// pinned too.
pub async fn refresh(cache: &Cache, upstreams: &Upstreams, pins: &[Pin], referrers: bool) {
    let mut pinned = HashSet::new();
    for pin in pins {
        let (Some(upstream), Ok(remote)) = (upstreams.get(&pin.upstream), RepoName::parse(&pin.repository)) else {
            continue;
        };
        let Ok(local) = remote.prefixed(upstream.name()) else { continue };
        let m = Mirrored { upstream: upstream.clone(), remote, local };
        let tags = match &pin.tag {
            Some(t) => vec![t.clone()],
            None => cache.store.list_tags(&m.local).await.unwrap_or_default(),
        };
        for tag in tags {
            let image = format!("{}/{}:{tag}", pin.upstream, pin.repository);
            if let Err(e) = warm_tag(cache, &m, &tag).await {
                tracing::warn!(image, error = %e, "pin refresh failed; keeping what is cached");
            }
            // Whatever the cache holds for the tag stays pinned, fetched just now or not.
            if let Ok(Some(rec)) = cache.store.tag(&m.local, &tag).await {
                if referrers {
                    let image_manifests = manifests_of(cache, &m.local, &rec.digest).await;
                    if let Err(e) = warm_referrers(cache, &m, image_manifests).await {
                        tracing::warn!(image, error = %e, "fetching the referrers of a pinned image failed; keeping what is cached");
                    }
                }
                closure(cache, &m.local, &rec.digest, referrers, &mut pinned).await;
            }
        }
    }
    let count = pinned.len();
    cache.lru.set_pinned(pinned);
    cache.metrics.pinned_bytes.set(cache.lru.pinned_bytes() as i64);
    tracing::info!(pins = pins.len(), digests = count, "pins refreshed");
}

/// Resolve `tag` upstream and make sure every manifest and blob of it is in the store.
pub async fn warm_tag(cache: &Cache, m: &Mirrored, tag: &str) -> Result<(), CacheError> {
    let Mirrored { upstream, remote, local } = m;
    let limit = cache.policy.max_manifest_size;
    let missing = |e| CacheError::upstream(Content::Manifest, e);
    let invalid = |e: crate::oci::Error| CacheError::Internal(format!("{local}:{tag}: {e}"));
    let top = fetch(upstream, remote, tag, None, ACCEPT_ALL, limit).await.map_err(missing)?;
    cache.store_manifest(local, &top).await?;
    let now = TagRecord { digest: top.digest.clone(), fetched_at: cache.clock.now() };
    cache.store.set_tag(local, tag, &now).await?;
    let described = describe(&top.bytes, Some(&top.meta.media_type)).map_err(invalid)?;
    let mut blobs = described.blobs;
    for child in described.children {
        let bytes = match load(&cache.store, local, &child).await? {
            Some((_, bytes)) => bytes,
            None => {
                let f = fetch(upstream, remote, &child.to_string(), Some(&child), ACCEPT_ALL, limit)
                    .await
                    .map_err(missing)?;
                cache.store_manifest(local, &f).await?;
                f.bytes
            }
        };
        blobs.extend(describe(&bytes, None).map_err(invalid)?.blobs);
    }
    for d in blobs {
        cache.ensure_blob(m, &d).await?;
    }
    Ok(())
}

/// Every digest a manifest stands for in the store: itself, its children, their blobs, and with
/// `referrers` the manifests that refer to any of them, with everything those stand for.
pub async fn closure(cache: &Cache, local: &RepoName, top: &Digest, referrers: bool, out: &mut HashSet<Digest>) {
    let mut pending = vec![top.clone()];
    while let Some(d) = pending.pop() {
        if !out.insert(d.clone()) {
            continue;
        }
        if referrers {
            if let Ok(found) = cache.store.referrers(local, &d).await {
                pending.extend(found.into_iter().map(|(r, _)| r));
            }
        }
        let Ok(Some((meta, bytes))) = load(&cache.store, local, &d).await else { continue };
        if let Ok(described) = describe(&bytes, Some(&meta.media_type)) {
            out.extend(described.blobs);
            pending.extend(described.children);
        }
    }
}

/// A manifest and, for an index, its children: what referrers may point at.
async fn manifests_of(cache: &Cache, local: &RepoName, top: &Digest) -> HashSet<Digest> {
    let mut out = HashSet::new();
    let mut pending = vec![top.clone()];
    while let Some(d) = pending.pop() {
        if !out.insert(d.clone()) {
            continue;
        }
        let Ok(Some((meta, bytes))) = load(&cache.store, local, &d).await else { continue };
        if let Ok(described) = describe(&bytes, Some(&meta.media_type)) {
            pending.extend(described.children);
        }
    }
    out
}

/// Fetch every referrer of `subjects` (and of those referrers, and so on), with their blobs.
async fn warm_referrers(cache: &Cache, m: &Mirrored, subjects: HashSet<Digest>) -> Result<(), CacheError> {
    let mut pending: Vec<Digest> = subjects.into_iter().collect();
    let mut seen = HashSet::new();
    while let Some(subject) = pending.pop() {
        if !seen.insert(subject.clone()) {
            continue;
        }
        let listed = cache.referrers(m, &subject).await?;
        for referrer in listed.manifests.iter().filter_map(|d| d["digest"].as_str()?.parse::<Digest>().ok()) {
            let mut manifests = vec![referrer.clone()];
            while let Some(d) = manifests.pop() {
                let resolved = cache.manifest(m, &Reference::Digest(d.clone()), None).await?;
                let invalid = |e: crate::oci::Error| CacheError::Internal(format!("{}@{d}: {e}", m.local));
                let described = describe(&resolved.bytes, Some(&resolved.meta.media_type)).map_err(invalid)?;
                for b in &described.blobs {
                    cache.ensure_blob(m, b).await?;
                }
                manifests.extend(described.children.iter().cloned());
                pending.push(d);
            }
        }
    }
    Ok(())
}
