//! A fill among replicas on one bucket: the replica holding the fill's lease fetches from the
//! upstream; the others stream the bytes from it as they arrive (and still verify them), and
//! take the fill over, from the byte they have, when its holder goes away.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use reqwest::Method;

use super::super::{Cache, CacheError, Mirrored};
use crate::cluster::{Claim, Cluster, Lease};
use crate::oci::{Digest, RepoName};
use crate::upstream::UpstreamError;

/// How long the replica holding a fill may stay unreachable while it keeps renewing its lease
/// (replicas that reach the bucket but not each other) before this one fetches the blob itself.
const PEER_PATIENCE: Duration = Duration::from_secs(30);

/// Between two attempts to reach the replica holding a fill.
const PEER_RETRY: Duration = Duration::from_millis(500);

/// A stream from another replica that brings nothing for this long is checked: is its lease
/// still renewed?
const STALL_CHECK: Duration = Duration::from_secs(3);

/// Where the next bytes of a fill come from.
pub enum Opened {
    /// The upstream's answer (or why there is none).
    Upstream(Result<reqwest::Response, UpstreamError>),
    /// The replica running the fill.
    Peer(reqwest::Response),
    /// Nowhere: the blob is stored already (another replica finished it), this many bytes.
    Stored(u64),
}

/// How a fill's receiving ended.
pub enum Received {
    /// Every byte is staged here.
    Bytes(super::Staged, Mirrored),
    /// Another replica stored the blob meanwhile.
    Stored(u64, Mirrored),
}

/// The next piece of a response body.
pub enum Next {
    Chunk(reqwest::Result<Bytes>),
    End,
    /// Stop reading this response: the source of the bytes must be decided again.
    Switch(String),
}

/// One fill's place among the replicas.
pub struct Coordination {
    cluster: Option<Arc<Cluster>>,
    lease: Option<Lease>,
    /// The repository the upstream confirmed has the blob, before bytes fetched by another replica
    /// (for another repository, maybe) are taken for it.
    confirmed: Option<RepoName>,
    /// Since when the replica holding the lease has not been reachable.
    unreachable_since: Option<Instant>,
    /// Fetching from the upstream without the lease (its holder could not be reached).
    alone: bool,
    /// The replica the bytes come from now.
    peer: Option<String>,
    /// Some of the bytes came from another replica (a mismatch is then not the upstream's fault).
    pub relayed_any: bool,
}

impl Coordination {
    pub fn new(cache: &Cache) -> Self {
        Coordination {
            cluster: cache.cluster.clone(),
            lease: None,
            confirmed: None,
            unreachable_since: None,
            alone: false,
            peer: None,
            relayed_any: false,
        }
    }

    /// The fill has ended: the lease goes (the blob is recorded by now, or the fill failed).
    pub async fn release(&mut self, digest: &Digest) {
        if let Some(lease) = self.lease.take() {
            lease.release().await;
        }
        if let Some(cluster) = &self.cluster {
            cluster.forget_fill(digest);
        }
    }

    pub fn lease_lost(&self) -> bool {
        self.lease.as_ref().is_some_and(Lease::lost)
    }

    pub fn relayed(&mut self, n: u64) {
        self.relayed_any = true;
        if let Some(cluster) = &self.cluster {
            cluster.relayed(n);
        }
    }

    pub fn peer_failed(&self) {
        if let Some(cluster) = &self.cluster {
            cluster.peer_failed();
        }
    }

    /// Open the source of the bytes from `offset` on: the upstream when this replica runs the
    /// fill (alone, or holding the lease), else the replica that holds the lease.
    pub async fn open(
        &mut self,
        cache: &Cache,
        source: &Mirrored,
        digest: &Digest,
        offset: u64,
    ) -> Result<Opened, CacheError> {
        self.peer = None;
        let Some(cluster) = self.cluster.clone() else { return Ok(from_upstream(source, digest, offset).await) };
        if self.alone || self.lease.as_ref().is_some_and(|l| !l.lost()) {
            return Ok(from_upstream(source, digest, offset).await);
        }
        self.lease = None;
        loop {
            match cluster.claim_fill(digest).await? {
                Claim::Owned(lease) => {
                    self.lease = Some(lease);
                    // The last holder may have finished just before its lease went.
                    if let Some(size) = stored(cache, source, digest).await? {
                        if let Err(e) = self.confirm(source, digest).await {
                            return Ok(Opened::Upstream(Err(e)));
                        }
                        return Ok(Opened::Stored(size));
                    }
                    return Ok(from_upstream(source, digest, offset).await);
                }
                Claim::Held { url } => {
                    if let Err(e) = self.confirm(source, digest).await {
                        return Ok(Opened::Upstream(Err(e)));
                    }
                    match cluster.fetch_from_peer(&url, digest, offset).await {
                        Ok(resp) => {
                            if offset == 0 {
                                tracing::info!(%digest, replica = url, "fill streams from the replica that runs it");
                            }
                            self.unreachable_since = None;
                            self.peer = Some(url);
                            return Ok(Opened::Peer(resp));
                        }
                        Err(refusal) => {
                            // (Confirmed with the upstream above.)
                            if let Some(size) = stored(cache, source, digest).await? {
                                return Ok(Opened::Stored(size));
                            }
                            let since = *self.unreachable_since.get_or_insert_with(Instant::now);
                            // A refusal will not go away by asking again (keys or addresses
                            // differ between the replicas): say so, and fetch here at once.
                            if refusal.refused || since.elapsed() >= PEER_PATIENCE {
                                tracing::warn!(%digest, replica = url, detail = refusal.detail, "the replica running this fill cannot be used; fetching from the upstream here as well");
                                self.alone = true;
                                return Ok(from_upstream(source, digest, offset).await);
                            }
                            tracing::debug!(%digest, replica = url, detail = refusal.detail, "the replica running this fill did not answer");
                            tokio::time::sleep(PEER_RETRY).await;
                        }
                    }
                }
            }
        }
    }

    /// The upstream must say that this repository has the blob before bytes fetched for another
    /// (by another replica) are served for it, as for a fill of another repository here.
    async fn confirm(&mut self, source: &Mirrored, digest: &Digest) -> Result<(), UpstreamError> {
        if self.confirmed.as_ref() == Some(&source.local) {
            return Ok(());
        }
        source.upstream.blob(Method::HEAD, &source.remote, digest, 0).await?;
        self.confirmed = Some(source.local.clone());
        Ok(())
    }

    /// The next piece of `body`. A stream from another replica that stalls is given up when that
    /// replica's lease is no longer renewed; a fill whose lease was taken over stops.
    pub async fn next_chunk(
        &self,
        body: &mut (impl Stream<Item = reqwest::Result<Bytes>> + Unpin),
        digest: &Digest,
        from_peer: bool,
    ) -> Next {
        if self.lease_lost() {
            return Next::Switch("another replica took the fill's lease over".into());
        }
        let (Some(cluster), Some(peer), true) = (&self.cluster, &self.peer, from_peer) else {
            return body.next().await.map_or(Next::End, Next::Chunk);
        };
        loop {
            match tokio::time::timeout(STALL_CHECK, body.next()).await {
                Ok(next) => return next.map_or(Next::End, Next::Chunk),
                Err(_) => match cluster.fill_owner_alive(digest, peer).await {
                    Ok(true) => continue,
                    Ok(false) => return Next::Switch("the replica running the fill stopped renewing its lease".into()),
                    // The bucket cannot tell: keep waiting for the bytes.
                    Err(_) => continue,
                },
            }
        }
    }
}

async fn from_upstream(source: &Mirrored, digest: &Digest, offset: u64) -> Opened {
    Opened::Upstream(source.upstream.blob(Method::GET, &source.remote, digest, offset).await)
}

/// The blob's size when the store has it from this fill's upstream (another replica's fill
/// finished): bytes another upstream delivered, or a push, are fetched and verified instead, as
/// on a single replica.
async fn stored(cache: &Cache, source: &Mirrored, digest: &Digest) -> Result<Option<u64>, CacheError> {
    if !cache.store.delivered_by(digest, source.upstream.name()).await? {
        return Ok(None);
    }
    Ok(cache.store.blob_size(digest).await?)
}
