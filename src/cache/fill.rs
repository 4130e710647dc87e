//! Blob fills: at most one per digest, shared by every repository and client. A fill is a task of
//! its own that streams the upstream body into a staging file while hashing, publishes how many
//! bytes are on disk, resumes with `Range` when the connection breaks, and verifies digest and size
//! before the blob becomes visible. Every requester, the first one included, is a pure reader of the
//! growing file: a client that disconnects drops only its reader, and N clients cost one upstream
//! fetch and constant memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use reqwest::{Method, StatusCode};
use tokio::sync::watch;

use crate::app::AppState;
use crate::registry::names::{Digest, RepoName};
use crate::registry::response::CHUNK;
use crate::storage::CommitError;
use crate::upstream::{error_chain, Upstream, UpstreamError};

/// How often a broken upstream connection is resumed before the fill gives up.
const MAX_RESUMES: u32 = 5;

#[derive(Clone, Debug)]
pub enum Phase {
    /// Waiting for the upstream's response headers.
    Connecting,
    /// Bytes are arriving; `total` is the upstream's Content-Length.
    Streaming {
        total: u64,
        staging: String,
    },
    /// Verified and visible in the store.
    Done {
        total: u64,
    },
    Failed(UpstreamError),
}

#[derive(Clone, Debug)]
pub struct Progress {
    pub phase: Phase,
    /// Bytes flushed to the staging file.
    pub written: u64,
}

#[derive(Default)]
pub struct Fills {
    /// Fills in progress, with the repository each was started for.
    running: Mutex<HashMap<Digest, (watch::Receiver<Progress>, RepoName)>>,
}

impl Fills {
    /// Join the fill for `digest`, or start one.
    pub fn join_or_start(
        &self,
        state: &AppState,
        upstream: Arc<Upstream>,
        remote: RepoName,
        local: RepoName,
        digest: Digest,
    ) -> watch::Receiver<Progress> {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((rx, _)) = running.get(&digest) {
            return rx.clone();
        }
        let (tx, rx) = watch::channel(Progress { phase: Phase::Connecting, written: 0 });
        running.insert(digest.clone(), (rx.clone(), local.clone()));
        drop(running);
        tokio::spawn(run(state.clone(), upstream, remote, local, digest, tx));
        rx
    }

    /// The repository a running fill of `digest` was started for.
    pub fn running_for(&self, digest: &Digest) -> Option<RepoName> {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).get(digest).map(|(_, repo)| repo.clone())
    }

    fn finished(&self, digest: &Digest) {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).remove(digest);
    }

    pub fn in_flight(&self) -> usize {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

async fn run(
    state: AppState,
    upstream: Arc<Upstream>,
    remote: RepoName,
    local: RepoName,
    digest: Digest,
    tx: watch::Sender<Progress>,
) {
    let started = Instant::now();
    state.metrics.fills_in_flight.inc();
    tracing::info!(upstream = upstream.name(), repository = %local, %digest, "fill started");
    let outcome = fetch(&state, &upstream, &remote, &digest, &tx).await;
    let outcome = match outcome {
        Ok(total) => match state.store.link_blob(&local, &digest).await {
            Ok(()) => Ok(total),
            Err(e) => {
                Err(UpstreamError::Reset { upstream: upstream.name().to_string(), detail: format!("storage: {e}") })
            }
        },
        Err(e) => Err(e),
    };
    match &outcome {
        Ok(total) => {
            tracing::info!(upstream = upstream.name(), repository = %local, %digest, bytes = total, seconds = started.elapsed().as_secs_f64(), "fill finished");
            state.metrics.fill_duration.observe(started.elapsed().as_secs_f64());
            state.lru.touch(&digest, *total);
            tx.send_modify(|p| p.phase = Phase::Done { total: *total });
        }
        Err(e) => {
            tracing::warn!(upstream = upstream.name(), repository = %local, %digest, cause = e.cause(), error = %e, "fill failed");
            tx.send_modify(|p| p.phase = Phase::Failed(e.clone()));
        }
    }
    state.fills.finished(&digest);
    state.metrics.fills_in_flight.dec();
    state.evict_wakeup.notify_one();
}

/// Stream the blob into a staging file, resuming on broken connections, then commit it.
async fn fetch(
    state: &AppState,
    upstream: &Upstream,
    remote: &RepoName,
    digest: &Digest,
    tx: &watch::Sender<Progress>,
) -> Result<u64, UpstreamError> {
    let storage_err = |e: std::io::Error| UpstreamError::Reset {
        upstream: upstream.name().to_string(),
        detail: format!("storage: {e}"),
    };
    let mut writer = state.store.begin_blob(digest.algorithm()).await.map_err(storage_err)?;
    let mut total: Option<u64> = None;
    let mut resumes = 0;
    loop {
        let offset = writer.written();
        let resp = match upstream.blob(Method::GET, remote, digest, offset).await {
            Ok(r) => r,
            Err(e) if offset > 0 && resumes < MAX_RESUMES && e.is_outage() => {
                resumes += 1;
                continue;
            }
            Err(e) => {
                writer.abort().await;
                return Err(e);
            }
        };
        if offset > 0 && resp.status() != StatusCode::PARTIAL_CONTENT {
            // The upstream ignored the range; resuming would duplicate bytes.
            writer.abort().await;
            return Err(upstream.failed(UpstreamError::Reset {
                upstream: upstream.name().to_string(),
                detail: format!("resume at byte {offset} answered {} instead of 206", resp.status()),
            }));
        }
        if total.is_none() {
            let Some(len) = resp.content_length() else {
                writer.abort().await;
                return Err(upstream.failed(UpstreamError::Reset {
                    upstream: upstream.name().to_string(),
                    detail: "blob response without Content-Length".into(),
                }));
            };
            total = Some(len);
            let staging = writer.staging_path().to_string();
            tx.send_modify(|p| p.phase = Phase::Streaming { total: len, staging });
        }
        let mut body = resp.bytes_stream();
        let mut broken = None;
        loop {
            // Write out what we have whenever the upstream pauses, so readers never wait on a batch.
            let next = match body.next().now_or_never() {
                Some(n) => n,
                None => {
                    writer.flush().await.map_err(storage_err)?;
                    publish(&writer, tx);
                    body.next().await
                }
            };
            match next {
                Some(Ok(chunk)) => {
                    writer.write(chunk).await.map_err(storage_err)?;
                    publish(&writer, tx);
                }
                Some(Err(e)) => {
                    broken = Some(e);
                    break;
                }
                None => break,
            }
        }
        writer.flush().await.map_err(storage_err)?;
        publish(&writer, tx);
        let expected = total.unwrap_or(0);
        if writer.written() >= expected {
            break;
        }
        let detail = broken.map_or_else(|| "body ended early".to_string(), |e| error_chain(&e));
        let err = upstream.failed(UpstreamError::Reset { upstream: upstream.name().to_string(), detail });
        if resumes >= MAX_RESUMES {
            writer.abort().await;
            return Err(err);
        }
        resumes += 1;
        tracing::info!(upstream = upstream.name(), %digest, offset = writer.written(), error = %err, "resuming fill with a range request");
    }
    match writer.commit(digest, total).await {
        Ok(n) => Ok(n),
        Err(CommitError::Io(e)) => Err(storage_err(e)),
        Err(e) => {
            tracing::warn!(upstream = upstream.name(), %digest, error = %e, "upstream content rejected");
            Err(upstream.failed(UpstreamError::DigestMismatch {
                upstream: upstream.name().to_string(),
                digest: digest.to_string(),
            }))
        }
    }
}

/// Tell readers how much of the staging file they may read.
fn publish(writer: &crate::storage::BlobWriter, tx: &watch::Sender<Progress>) {
    let on_disk = writer.on_disk();
    if tx.borrow().written < on_disk {
        tx.send_modify(|p| p.written = on_disk);
    }
}

/// Wait until the fill knows the blob's size (or failed).
pub async fn wait_for_size(rx: &mut watch::Receiver<Progress>) -> Result<u64, UpstreamError> {
    loop {
        let phase = rx.borrow_and_update().phase.clone();
        match phase {
            Phase::Streaming { total, .. } | Phase::Done { total } => return Ok(total),
            Phase::Failed(e) => return Err(e),
            Phase::Connecting => {
                if rx.changed().await.is_err() {
                    return Err(UpstreamError::Reset {
                        upstream: String::new(),
                        detail: "fill ended without a result".into(),
                    });
                }
            }
        }
    }
}

/// A client's view of a fill: bytes `[start, end)` as they land on disk. An error ends the stream
/// with `Err`, which aborts the response: a client never receives a complete body with bad bytes.
pub fn follow(
    state: AppState,
    digest: Digest,
    rx: watch::Receiver<Progress>,
    start: u64,
    end: u64,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send {
    struct Follower {
        state: AppState,
        digest: Digest,
        rx: watch::Receiver<Progress>,
        pos: u64,
        end: u64,
        _waiting: WaiterGauge,
        /// Keeps the committed blob from eviction while this client reads it.
        _hold: Option<super::lru::InUse>,
    }
    let waiting = WaiterGauge::new(&state);
    let hold = state.lru.hold(&digest);
    let follower = Follower { state, digest, rx, pos: start, end, _waiting: waiting, _hold: hold };
    futures_util::stream::unfold(follower, |mut f| async move {
        loop {
            if f.pos >= f.end {
                return None;
            }
            let progress = f.rx.borrow_and_update().clone();
            let (available, staging) = match progress.phase {
                Phase::Failed(e) => return Some((Err(std::io::Error::other(e.to_string())), Follower { end: 0, ..f })),
                Phase::Done { total } => (total, None),
                // The last byte of the response (of a range too) waits for verification, so a
                // response never completes with content that turns out not to match its digest.
                Phase::Streaming { staging, .. } => (progress.written.min(f.end.saturating_sub(1)), Some(staging)),
                Phase::Connecting => (0, None),
            };
            if f.pos < available {
                let want = (available.min(f.end) - f.pos).min(CHUNK as u64) as usize;
                return match read(&f.state, &f.digest, staging.as_deref(), f.pos, want).await {
                    Ok(chunk) => {
                        f.pos += want as u64;
                        f.state.metrics.bytes_served.with_label_values(&["fill"]).inc_by(want as u64);
                        Some((Ok(chunk), f))
                    }
                    Err(e) => Some((Err(e), Follower { end: 0, ..f })),
                };
            }
            if f.rx.changed().await.is_err() {
                // The fill task is gone; its last word decides.
                let last = f.rx.borrow().phase.clone();
                if !matches!(last, Phase::Done { .. }) {
                    return Some((
                        Err(std::io::Error::other("fill ended without completing")),
                        Follower { end: 0, ..f },
                    ));
                }
            }
        }
    })
}

/// `want` bytes at `pos`, from the staging file or, once the fill has committed and the staging
/// file is gone, from the store.
async fn read(
    state: &AppState,
    digest: &Digest,
    staging: Option<&str>,
    pos: u64,
    want: usize,
) -> std::io::Result<Bytes> {
    let chunk = match staging {
        Some(path) => state.store.driver().read_at(path, pos, want).await?,
        None => None,
    };
    let chunk = match chunk {
        Some(c) => c,
        None => state
            .store
            .read_blob_at(digest, pos, want)
            .await?
            .ok_or_else(|| std::io::Error::other(format!("blob {digest} vanished during a fill")))?,
    };
    if chunk.len() != want {
        return Err(std::io::Error::other(format!("blob {digest}: {} bytes where {want} were written", chunk.len())));
    }
    Ok(chunk)
}

/// Counts clients streaming from a fill, for the `fill_waiters` gauge.
struct WaiterGauge(prometheus::IntGauge);

impl WaiterGauge {
    fn new(state: &AppState) -> Self {
        state.metrics.fill_waiters.inc();
        WaiterGauge(state.metrics.fill_waiters.clone())
    }
}

impl Drop for WaiterGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}
