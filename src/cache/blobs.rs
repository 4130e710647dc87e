//! Where a mirrored blob's bytes are: in the store, or arriving through a shared fill; for a
//! HEAD of a blob not stored, what the upstream says of it.

use bytes::Bytes;
use futures_util::Stream;
use reqwest::Method;
use tokio::sync::watch;

use super::fill::{follow, wait_for_size, wait_until_done, NeedsCheck, Phase, Progress};
use super::lru::InUse;
use super::{Cache, CacheError, Content, Mirrored, Obtained};
use crate::oci::{Digest, RepoName};
use crate::upstream::content_length;

/// Where the bytes of a blob are.
pub enum BlobSource {
    /// In the store, kept from eviction while `hold` lives.
    Stored { size: u64, hold: InUse },
    /// Arriving from the upstream: read them as they come with [`Following::stream`].
    Filling { total: u64, fill: Following },
    /// Not fetched (the answer to a HEAD): the size the upstream gives.
    Upstream { size: u64 },
}

impl BlobSource {
    pub fn size(&self) -> u64 {
        match self {
            BlobSource::Stored { size, .. } | BlobSource::Upstream { size } => *size,
            BlobSource::Filling { total, .. } => *total,
        }
    }
}

/// A client's place in a running fill.
pub struct Following {
    cache: Cache,
    digest: Digest,
    rx: watch::Receiver<Progress>,
}

impl Following {
    /// Bytes `[start, end)` as they arrive. An error ends the stream with `Err`, which aborts the
    /// response: a client never receives a complete body with bad bytes.
    pub fn stream(self, start: u64, end: u64) -> impl Stream<Item = std::io::Result<Bytes>> + Send {
        follow(self.cache, self.digest, self.rx, start, end)
    }
}

impl Cache {
    /// A stored blob of the private namespace, held from eviction while it is served; `None`
    /// when the store does not have it. (Mirrored blobs come from `blob`, which also counts the
    /// use for the eviction order.)
    pub async fn stored_blob(&self, d: &Digest) -> std::io::Result<Option<BlobSource>> {
        let Some(hold) = self.lru.hold(d) else { return Ok(None) };
        let Some(size) = self.store.blob_size(d).await? else { return Ok(None) };
        Ok(Some(BlobSource::Stored { size, hold }))
    }

    /// A blob for another replica on the bucket, which found this one holding its fill's lease:
    /// the running fill (from its first byte on), or its result in the store once it has
    /// finished. `None` when no fill of it runs here, or it failed: a blob merely stored (a push,
    /// say) is never handed out this way, as it would not be for a mirrored repository here.
    pub async fn blob_for_replica(&self, d: &Digest) -> Result<Option<BlobSource>, CacheError> {
        let Some(mut rx) = self.fills.progress(d) else { return Ok(None) };
        loop {
            let phase = rx.borrow_and_update().phase.clone();
            match phase {
                Phase::Streaming(staged) => {
                    let fill = Following { cache: self.clone(), digest: d.clone(), rx };
                    return Ok(Some(BlobSource::Filling { total: staged.total, fill }));
                }
                Phase::Done { .. } => return Ok(self.stored_blob(d).await?),
                Phase::Failed(_) => return Ok(None),
                Phase::Connecting => {
                    if rx.changed().await.is_err() {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// Find a mirrored blob: stored (this repository's, or another's that this upstream
    /// delivered and confirms for this repository), or through a fill. A HEAD (`head`) never
    /// starts a fill: the upstream's HEAD answers it.
    pub async fn blob(&self, m: &Mirrored, d: &Digest, head: bool) -> Result<(BlobSource, Obtained), CacheError> {
        let found = self.find_blob(m, d, head).await;
        let outcome = match &found {
            Ok((_, o)) => o.label(),
            Err(_) => "error",
        };
        self.count(m, "blob", outcome);
        found
    }

    async fn find_blob(&self, m: &Mirrored, d: &Digest, head: bool) -> Result<(BlobSource, Obtained), CacheError> {
        let Mirrored { upstream, remote, local } = m;
        let missing = |e| CacheError::upstream(Content::Blob, e);
        // Stored, delivered by this upstream, and not being evicted right now: a hit. The
        // upstream still decides whether this repository has the blob (content-addressed, another
        // repository may have brought it), so nothing leaks across repositories; bytes this
        // upstream never delivered (a push, or a store from before deliveries were recorded) are
        // fetched again and verified, never handed out on the upstream's word.
        if self.store.delivered_by(d, upstream.name()).await? {
            if let Some(hold) = self.lru.hold(d) {
                if let Some(size) = self.store.blob_size(d).await? {
                    if !self.store.is_blob_linked(local, d).await? {
                        upstream.blob(Method::HEAD, remote, d, 0).await.map_err(missing)?;
                        self.store.link_blob(local, d).await?;
                    }
                    self.share_use(d);
                    self.lru.touch(d, size);
                    return Ok((BlobSource::Stored { size, hold }, Obtained::Hit));
                }
            }
        }
        if head {
            let resp = upstream.blob(Method::HEAD, remote, d, 0).await.map_err(missing)?;
            let size = content_length(&resp).ok_or_else(|| {
                CacheError::Upstream(crate::upstream::UpstreamError::Reset {
                    upstream: upstream.name().to_string(),
                    detail: format!("HEAD {d} answered without a Content-Length"),
                })
            })?;
            return Ok((BlobSource::Upstream { size }, Obtained::Miss));
        }
        // Joining a fill another repository started: the upstream decides whether this repository
        // has the blob, as it does for stored blobs above. Having checked, this repository becomes
        // a source the fill falls back to.
        let mut rx = self.join_fill(m, d).await?;
        let total = wait_for_size(&mut rx, local).await?;
        self.link_when_done(local.clone(), d.clone(), rx.clone());
        Ok((
            BlobSource::Filling { total, fill: Following { cache: self.clone(), digest: d.clone(), rx } },
            Obtained::Miss,
        ))
    }

    /// Replicas on one bucket: record a use in the bucket too (at most once a minute per blob and
    /// replica), so the replica that runs eviction counts it.
    fn share_use(&self, d: &Digest) {
        const SHARED_EVERY: u64 = 60;
        if self.cluster.is_none() || !self.lru.due_for_sharing(d, SHARED_EVERY) {
            return;
        }
        let (store, d) = (self.store.clone(), d.clone());
        tokio::spawn(async move {
            if let Err(e) = store.touch_blob(&d).await {
                tracing::debug!(digest = %d, error = %e, "could not record a use in the bucket");
            }
        });
    }

    /// Have a mirrored blob in the store and linked to its repository (pins): a stored copy
    /// counts only when this upstream delivered it; anything else is fetched and verified.
    pub async fn ensure_blob(&self, m: &Mirrored, d: &Digest) -> Result<(), CacheError> {
        if self.store.delivered_by(d, m.upstream.name()).await? {
            if let Some(_not_evicted) = self.lru.hold(d) {
                if self.store.blob_size(d).await?.is_some() {
                    return Ok(self.store.link_blob(&m.local, d).await?);
                }
            }
        }
        let mut rx = self.join_fill(m, d).await?;
        wait_for_size(&mut rx, &m.local).await?;
        match wait_until_done(&mut rx).await {
            Phase::Done { .. } => Ok(self.store.link_blob(&m.local, d).await?),
            Phase::Failed(e) => Err(e),
            _ => Err(CacheError::Internal(format!("fill of {d} ended without a result"))),
        }
    }

    /// Join (or start) the fill of `d` for `m`, confirming with the upstream first when the fill
    /// runs for another repository.
    async fn join_fill(&self, m: &Mirrored, d: &Digest) -> Result<watch::Receiver<Progress>, CacheError> {
        let mut confirmed = false;
        loop {
            match self.fills.join_or_start(self, m.clone(), d.clone(), confirmed) {
                Ok(rx) => return Ok(rx),
                Err(NeedsCheck) => {
                    m.upstream
                        .blob(Method::HEAD, &m.remote, d, 0)
                        .await
                        .map_err(|e| CacheError::upstream(Content::Blob, e))?;
                    confirmed = true;
                }
            }
        }
    }

    /// A repository that followed a fill links the blob once the fill has succeeded (the fill
    /// links the repository it fetched through itself).
    fn link_when_done(&self, local: RepoName, digest: Digest, mut rx: watch::Receiver<Progress>) {
        let store = self.store.clone();
        tokio::spawn(async move {
            if matches!(wait_until_done(&mut rx).await, Phase::Done { .. }) {
                let _ = store.link_blob(&local, &digest).await;
            }
        });
    }
}
