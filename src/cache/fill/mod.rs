//! Blob fills: at most one per digest, shared by every repository and client. A fill is a task of
//! its own that streams the upstream body into a staging file while hashing, publishes how many
//! bytes have arrived, resumes with `Range` when the connection breaks, and verifies digest and size
//! before the blob becomes visible. Every requester, the first one included, is a pure reader of the
//! fill: bytes that arrived recently come from a window kept in memory (`window`: so a client that
//! keeps up with the upstream never waits for the disk), older ones from the growing staging file.
//! A client that disconnects drops only its reader, and N clients cost one upstream fetch and
//! constant memory.

mod replicas;
mod window;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::StatusCode;
use tokio::sync::watch;

use super::{Cache, CacheError, Content, Mirrored};
use crate::lock;
use crate::oci::{Digest, RepoName};
use crate::storage::{BlobWriter, CommitError, CHUNK};
use crate::upstream::{content_length, error_chain, UpstreamError};
use replicas::{Coordination, Next, Opened, Received};
use window::{Pacing, Reader, Shared, Source};

/// How often in a row a broken upstream connection is resumed before the fill gives up: with
/// the delays below, about 11 s of waiting in all.
const MAX_RESUMES: u32 = 8;

/// The wait before the first resume; it doubles with each further one.
const RESUME_FIRST_DELAY: Duration = Duration::from_millis(50);

/// The longest wait between two resumes.
const RESUME_MAX_DELAY: Duration = Duration::from_secs(5);

/// A connection that delivered this much before breaking counts as progress: the next break is
/// resumed as if it were the first.
const PROGRESS_RESETS_RESUMES: u64 = 1 << 20;

#[derive(Clone, Debug)]
pub enum Phase {
    /// Waiting for the upstream's response headers.
    Connecting,
    /// Bytes are arriving; `total` is the upstream's Content-Length.
    Streaming(Staged),
    /// Verified and visible in the store.
    Done {
        total: u64,
    },
    Failed(CacheError),
}

/// Where a fill's bytes are while it runs: the newest in memory, all older ones in `staging`.
#[derive(Clone, Debug)]
pub struct Staged {
    pub total: u64,
    staging: Arc<str>,
    shared: Arc<Shared>,
}

#[derive(Clone, Debug)]
pub struct Progress {
    pub phase: Phase,
    /// Bytes received from the upstream.
    pub received: u64,
    /// Local repositories whose upstream repository does not have the blob, with its answer.
    pub not_found: Vec<(RepoName, UpstreamError)>,
    /// Clients streaming from this fill (each counts itself in and out).
    clients: Arc<AtomicUsize>,
}

/// The repositories a fill may use, in the order they asked. The fill tries the next one only
/// when the upstream says the current one does not have the blob; `closed` once it gave up.
#[derive(Default)]
struct Sources {
    list: Vec<Mirrored>,
    current: usize,
    closed: bool,
}

impl Sources {
    fn current(&self) -> Option<Mirrored> {
        self.list.get(self.current).cloned()
    }

    /// Move on to the next repository, or close when none is left.
    fn advance(&mut self) -> Option<Mirrored> {
        self.current += 1;
        let next = self.current();
        self.closed = next.is_none();
        next
    }
}

struct Running {
    id: u64,
    rx: watch::Receiver<Progress>,
    sources: Arc<Mutex<Sources>>,
    started: Instant,
}

/// A running fill as the status page shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FillStatus {
    pub digest: String,
    pub upstream: String,
    /// The local repository the fill fetches through.
    pub repository: String,
    pub received: u64,
    /// The upstream's Content-Length, once its headers arrived.
    pub total: Option<u64>,
    pub seconds: f64,
    /// Bytes per second since the fill started.
    pub bytes_per_second: u64,
    pub clients: usize,
}

/// A fill of the blob runs for another repository: the caller's repository must be confirmed
/// with the upstream before it may join.
#[derive(Debug)]
pub struct NeedsCheck;

#[derive(Default)]
pub struct Fills {
    running: Mutex<HashMap<Digest, Running>>,
    next_id: AtomicU64,
}

impl Fills {
    /// Join the fill for `digest`, or start one. A caller from another repository than the
    /// fill's must have checked with the upstream that its repository has the blob (a HEAD,
    /// `confirmed`; without it the answer is `Err(NeedsCheck)`): it then becomes a source the
    /// fill falls back to if the first repository does not have it.
    pub fn join_or_start(
        &self,
        cache: &Cache,
        source: Mirrored,
        digest: Digest,
        confirmed: bool,
    ) -> Result<watch::Receiver<Progress>, NeedsCheck> {
        let mut running = lock(&self.running);
        if let Some(r) = running.get(&digest) {
            let mut sources = lock(&r.sources);
            if !sources.closed {
                if !sources.list.iter().any(|s| s.local == source.local) {
                    if !confirmed {
                        return Err(NeedsCheck);
                    }
                    sources.list.push(source);
                }
                return Ok(r.rx.clone());
            }
            // That fill has given up: this caller starts a fresh one, through its own repository.
        }
        let progress =
            Progress { phase: Phase::Connecting, received: 0, not_found: Vec::new(), clients: Arc::default() };
        let (tx, rx) = watch::channel(progress);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let sources = Arc::new(Mutex::new(Sources { list: vec![source], current: 0, closed: false }));
        let started = Instant::now();
        running.insert(digest.clone(), Running { id, rx: rx.clone(), sources: sources.clone(), started });
        drop(running);
        tokio::spawn(run(cache.clone(), sources, digest, id, tx));
        Ok(rx)
    }

    /// Whether a fill of `digest` is running that `local` is not yet one of the sources of.
    pub fn runs_without(&self, digest: &Digest, local: &RepoName) -> bool {
        lock(&self.running).get(digest).is_some_and(|r| !lock(&r.sources).list.iter().any(|s| &s.local == local))
    }

    fn finished(&self, digest: &Digest, id: u64) {
        let mut running = lock(&self.running);
        if running.get(digest).is_some_and(|r| r.id == id) {
            running.remove(digest);
        }
    }

    /// The progress of the running fill of `digest`, if there is one.
    pub fn progress(&self, digest: &Digest) -> Option<watch::Receiver<Progress>> {
        lock(&self.running).get(digest).map(|r| r.rx.clone())
    }

    pub fn in_flight(&self) -> usize {
        lock(&self.running).len()
    }

    /// Every running fill: what, through where, how far, for how many clients.
    pub fn list(&self) -> Vec<FillStatus> {
        let running = lock(&self.running);
        let mut fills: Vec<FillStatus> = running
            .iter()
            .map(|(digest, r)| {
                let progress = r.rx.borrow();
                let total = match &progress.phase {
                    Phase::Streaming(s) => Some(s.total),
                    Phase::Done { total } => Some(*total),
                    Phase::Connecting | Phase::Failed(_) => None,
                };
                let source = lock(&r.sources).current();
                let seconds = r.started.elapsed().as_secs_f64();
                FillStatus {
                    digest: digest.to_string(),
                    upstream: source.as_ref().map(|s| s.upstream.name().to_string()).unwrap_or_default(),
                    repository: source.as_ref().map(|s| s.local.to_string()).unwrap_or_default(),
                    received: progress.received,
                    total,
                    seconds,
                    bytes_per_second: (progress.received as f64 / seconds.max(0.001)) as u64,
                    clients: progress.clients.load(Ordering::Relaxed),
                }
            })
            .collect();
        fills.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        fills
    }
}

async fn run(cache: Cache, sources: Arc<Mutex<Sources>>, digest: Digest, id: u64, tx: watch::Sender<Progress>) {
    // The blob may be being evicted this very moment: wait until it is gone, then keep any pass
    // from taking it while this fill writes it.
    let _no_eviction = cache.lru.hold_for_write(&digest).await;
    let started = Instant::now();
    cache.metrics.fills_in_flight.inc();
    // However the fill ends, a panic included, it leaves the map: the next request starts anew.
    let _leave = Leave { cache: cache.clone(), digest: digest.clone(), id };
    let first = lock(&sources).current();
    if let Some(s) = &first {
        tracing::info!(upstream = s.upstream.name(), repository = %s.local, %digest, "fill started");
    }
    // Held until the blob is recorded below: another replica that finds the lease gone finds
    // the blob stored.
    let mut coordination = Coordination::new(&cache);
    let outcome = fetch(&cache, &sources, &digest, &tx, &mut coordination).await;
    let running = tx.borrow().phase.clone();
    // The repository that delivered the blob has it now; others link it as their clients finish.
    let outcome = match outcome {
        Ok((total, source)) => {
            let recorded = async {
                cache.store.mark_delivered(&digest, source.upstream.name()).await?;
                cache.store.link_blob(&source.local, &digest).await
            };
            match recorded.await {
                Ok(()) => Ok((total, source)),
                Err(e) => Err(CacheError::from(e)),
            }
        }
        Err(e) => Err(e),
    };
    match &outcome {
        Ok((total, source)) => {
            tracing::info!(upstream = source.upstream.name(), repository = %source.local, %digest, bytes = total, seconds = started.elapsed().as_secs_f64(), "fill finished");
            cache.metrics.fill_duration.observe(started.elapsed().as_secs_f64());
            cache.lru.touch(&digest, *total);
            tx.send_modify(|p| p.phase = Phase::Done { total: *total });
        }
        Err(e) => {
            let cause = e.cause();
            let repository = first.as_ref().map(|s| s.local.to_string()).unwrap_or_default();
            tracing::warn!(repository, %digest, cause, error = %e, "fill failed");
            tx.send_modify(|p| p.phase = Phase::Failed(e.clone()));
        }
    }
    coordination.release(&digest).await;
    lock(&sources).closed = true;
    // Readers now go to the store (or fail); the window's memory is not needed any more.
    if let Phase::Streaming(staged) = &running {
        let mut window = staged.shared.window();
        window.chunks.clear();
        window.closed = true;
    }
    cache.evict_wakeup.notify_one();
}

/// Takes a fill out of the running ones when its task ends.
struct Leave {
    cache: Cache,
    digest: Digest,
    id: u64,
}

impl Drop for Leave {
    fn drop(&mut self) {
        self.cache.fills.finished(&self.digest, self.id);
        self.cache.metrics.fills_in_flight.dec();
    }
}

/// Stream the blob into a staging file, resuming on broken connections, then commit it. Returns
/// its size and the source that delivered it.
async fn fetch(
    cache: &Cache,
    sources: &Mutex<Sources>,
    digest: &Digest,
    tx: &watch::Sender<Progress>,
    coordination: &mut Coordination,
) -> Result<(u64, Mirrored), CacheError> {
    let mut writer = cache.store.begin_blob(digest.algorithm()).await?;
    let (staged, source) = match receive(cache, sources, digest, tx, &mut writer, coordination).await {
        Ok(Received::Bytes(staged, source)) => (staged, source),
        // Another replica stored it (verified) while this one waited: nothing to write.
        Ok(Received::Stored(total, source)) => {
            writer.abort().await;
            return Ok((total, source));
        }
        Err(e) => {
            writer.abort().await;
            return Err(e);
        }
    };
    let upstream = &source.upstream;
    match writer.commit(digest, Some(staged.total)).await {
        Ok(total) => Ok((total, source)),
        Err(CommitError::Io(e)) => Err(e.into()),
        // Bytes relayed by another replica: not the upstream's fault (and nothing was stored).
        Err(e) if coordination.relayed_any => {
            tracing::warn!(%digest, error = %e, "bytes relayed by another replica were rejected");
            Err(CacheError::Internal(format!("blob {digest}: bytes relayed by another replica did not match")))
        }
        Err(e) => {
            tracing::warn!(upstream = upstream.name(), %digest, error = %e, "upstream content rejected");
            Err(CacheError::Upstream(upstream.failed(UpstreamError::DigestMismatch {
                upstream: upstream.name().to_string(),
                digest: digest.to_string(),
            })))
        }
    }
}

/// How long to wait before resume number `n` (from 0): doubling from `RESUME_FIRST_DELAY`, at most
/// `RESUME_MAX_DELAY`, so a short upstream blip is waited out instead of failing every client.
fn resume_delay(n: u32) -> Duration {
    RESUME_FIRST_DELAY.saturating_mul(1 << n.min(16)).min(RESUME_MAX_DELAY)
}

/// Receive the whole body into `writer`, resuming with `Range` when the connection breaks.
async fn receive(
    cache: &Cache,
    sources: &Mutex<Sources>,
    digest: &Digest,
    tx: &watch::Sender<Progress>,
    writer: &mut BlobWriter,
    coordination: &mut Coordination,
) -> Result<Received, CacheError> {
    let mut staged: Option<Staged> = None;
    let mut pacing = Pacing::new();
    let mut resumes = 0;
    let Some(mut source) = lock(sources).current() else {
        return Err(CacheError::Internal(format!("fill of {digest} without a source")));
    };
    loop {
        let upstream = source.upstream.clone();
        let offset = writer.written();
        let opened = match coordination.open(cache, &source, digest, offset).await {
            Ok(opened) => opened,
            // The bucket blinked while the fill was under way (deciding who continues it): wait
            // and ask again, as for a broken upstream connection.
            Err(e) if offset > 0 && resumes < MAX_RESUMES => {
                tracing::info!(%digest, offset, error = %e, "could not decide where the fill continues; trying again");
                tokio::time::sleep(resume_delay(resumes)).await;
                resumes += 1;
                continue;
            }
            Err(e) => return Err(e),
        };
        let (resp, from_peer) = match opened {
            // Clients have this fill's size already: a blob of another size is not theirs.
            Opened::Stored(total) if staged.as_ref().is_some_and(|s| s.total != total) => {
                return Err(CacheError::Internal(format!(
                    "blob {digest}: stored with {total} bytes, announced with {}",
                    staged.as_ref().map_or(0, |s| s.total)
                )));
            }
            Opened::Stored(total) => return Ok(Received::Stored(total, source)),
            Opened::Peer(resp) => (Ok(resp), true),
            Opened::Upstream(resp) => (resp, false),
        };
        let resp = match resp {
            Ok(r) => r,
            // This repository does not have it: that fails its own clients only. Another
            // repository that joined (and whose HEAD succeeded) is tried next.
            Err(e) if offset == 0 && e.is_absent() => {
                tx.send_modify(|p| p.not_found.push((source.local.clone(), e.clone())));
                let next = lock(sources).advance();
                match next {
                    Some(next) => {
                        tracing::info!(upstream = next.upstream.name(), repository = %next.local, %digest, "fill continues through another repository");
                        source = next;
                        continue;
                    }
                    None => return Err(CacheError::upstream(Content::Blob, e)),
                }
            }
            Err(e) if offset > 0 && resumes < MAX_RESUMES && e.is_outage() => {
                tokio::time::sleep(resume_delay(resumes)).await;
                resumes += 1;
                continue;
            }
            Err(e) => return Err(CacheError::upstream(Content::Blob, e)),
        };
        let misplaced =
            offset > 0 && (resp.status() != StatusCode::PARTIAL_CONTENT || range_start(&resp) != Some(offset));
        if misplaced && from_peer {
            // The replica answered for another range (its fill ended and restarted, say): ask again.
            coordination.peer_failed();
            if resumes >= MAX_RESUMES {
                return Err(replicas_failed(digest, "answered for the wrong range"));
            }
            tokio::time::sleep(resume_delay(resumes)).await;
            resumes += 1;
            continue;
        }
        if misplaced {
            // The upstream ignored the range, or answered another: resuming would misplace bytes.
            let range = resp.headers().get(reqwest::header::CONTENT_RANGE).and_then(|v| v.to_str().ok());
            return Err(CacheError::Upstream(upstream.failed(UpstreamError::Reset {
                upstream: upstream.name().to_string(),
                detail: format!(
                    "resume at byte {offset} answered {} (Content-Range {})",
                    resp.status(),
                    range.unwrap_or("missing")
                ),
            })));
        }
        let staged = match &staged {
            Some(s) => s.clone(),
            None => {
                let Some(total) = content_length(&resp) else {
                    return Err(CacheError::Upstream(upstream.failed(UpstreamError::Reset {
                        upstream: upstream.name().to_string(),
                        detail: "blob response without Content-Length".into(),
                    })));
                };
                // Refused before any client has its response headers: a full disk is an error
                // clients can read, not a download cut short.
                ensure_room(cache, total).await?;
                let s = Staged { total, staging: writer.staging_path().into(), shared: Arc::default() };
                tx.send_modify(|p| p.phase = Phase::Streaming(s.clone()));
                staged.insert(s).clone()
            }
        };
        let upstream_bytes = cache.metrics.upstream_bytes.with_label_values(&[upstream.name(), "blob"]);
        let mut body = resp.bytes_stream();
        let mut broken = None;
        loop {
            let next = match coordination.next_chunk(&mut body, digest, from_peer).await {
                Next::Chunk(next) => next,
                Next::End => break,
                // The lease changed hands (or its holder is gone): where the bytes come from is
                // decided again.
                Next::Switch(why) => {
                    tracing::info!(%digest, offset = writer.written(), why, "fill switches source");
                    broken = Some(why);
                    break;
                }
            };
            match next {
                Ok(chunk) => {
                    let received = writer.written() + chunk.len() as u64;
                    staged.shared.window().push(chunk.clone(), writer.on_disk());
                    tx.send_modify(|p| p.received = received);
                    match from_peer {
                        true => coordination.relayed(chunk.len() as u64),
                        false => upstream_bytes.inc_by(chunk.len() as u64),
                    }
                    writer.write(chunk).await?;
                    pacing.keep_pace(&staged.shared, received).await;
                }
                Err(e) => {
                    broken = Some(error_chain(&e.without_url()));
                    break;
                }
            }
        }
        if writer.written() >= staged.total {
            return Ok(Received::Bytes(staged, source));
        }
        // A connection that made real progress starts the count of resumes afresh.
        if writer.written() >= offset + PROGRESS_RESETS_RESUMES {
            resumes = 0;
        }
        let detail = broken.unwrap_or_else(|| "body ended early".to_string());
        if from_peer || coordination.lease_lost() {
            // Asked again at once: the replica may have gone, and its lease is then taken over.
            // (Not the upstream's failure: its health and metrics stay as they are.)
            tracing::info!(%digest, offset = writer.written(), detail, "the stream from the replica running the fill broke off");
            coordination.peer_failed();
            if resumes >= MAX_RESUMES {
                return Err(replicas_failed(digest, &detail));
            }
            resumes += 1;
            continue;
        }
        let err = upstream.failed(UpstreamError::Reset { upstream: upstream.name().to_string(), detail });
        if resumes >= MAX_RESUMES {
            return Err(CacheError::Upstream(err));
        }
        tracing::info!(upstream = upstream.name(), %digest, offset = writer.written(), error = %err, "resuming fill with a range request");
        tokio::time::sleep(resume_delay(resumes)).await;
        resumes += 1;
    }
}

/// A fill that the replicas on the bucket could not bring to an end between them.
fn replicas_failed(digest: &Digest, detail: &str) -> CacheError {
    CacheError::Internal(format!("blob {digest}: the replicas could not complete the fill ({detail})"))
}

/// Free space kept beyond a blob's size for the store's own small writes (links, tags, logs).
const ROOM_MARGIN: u64 = 1 << 20;

/// Make sure the store can take `total` more bytes. With `storage.max_size` set, mirrored content
/// is evicted to make room; otherwise a full disk fails the fill.
async fn ensure_room(cache: &Cache, total: u64) -> Result<(), CacheError> {
    let wanted = total.saturating_add(ROOM_MARGIN);
    let free = |cache: &Cache| cache.store.available().map(|f| f.unwrap_or(u64::MAX));
    let available = free(cache)?;
    if available >= wanted {
        return Ok(());
    }
    // Evict only when that can make enough room: a blob larger than everything evictable (or an
    // upstream lying about its size) must not empty the cache for nothing.
    if cache.policy.max_size.is_some() && available.saturating_add(cache.lru.evictable_bytes()) >= wanted {
        super::evict::make_room(cache, wanted - available).await;
        if free(cache)? >= wanted {
            return Ok(());
        }
    }
    tracing::warn!(needed = total, available, "the store is full");
    Err(std::io::Error::from_raw_os_error(libc::ENOSPC).into())
}

/// Where a 206's `Content-Range: bytes START-END/TOTAL` starts.
fn range_start(resp: &reqwest::Response) -> Option<u64> {
    let value = resp.headers().get(reqwest::header::CONTENT_RANGE)?.to_str().ok()?;
    value.strip_prefix("bytes ")?.split('-').next()?.trim().parse().ok()
}

/// Wait until the fill has ended: `Done`, `Failed`, or (the task gone without a word) whatever
/// it published last.
pub async fn wait_until_done(rx: &mut watch::Receiver<Progress>) -> Phase {
    let ended = |p: &Progress| !matches!(p.phase, Phase::Connecting | Phase::Streaming(_));
    let phase = match rx.wait_for(ended).await {
        Ok(p) => Some(p.phase.clone()),
        Err(_) => None,
    };
    phase.unwrap_or_else(|| rx.borrow().phase.clone())
}

/// Wait until the fill knows the blob's size (or failed, or found that `local`'s upstream
/// repository does not have the blob).
pub async fn wait_for_size(rx: &mut watch::Receiver<Progress>, local: &RepoName) -> Result<u64, CacheError> {
    loop {
        let (phase, absent) = {
            let p = rx.borrow_and_update();
            (p.phase.clone(), p.not_found.iter().find(|(repo, _)| repo == local).map(|(_, e)| e.clone()))
        };
        if let Some(e) = absent {
            return Err(CacheError::upstream(Content::Blob, e));
        }
        match phase {
            Phase::Streaming(Staged { total, .. }) | Phase::Done { total } => return Ok(total),
            Phase::Failed(e) => return Err(e),
            Phase::Connecting => {
                if rx.changed().await.is_err() {
                    return Err(CacheError::Internal("fill ended without a result".into()));
                }
            }
        }
    }
}

/// A client's view of a fill: bytes `[start, end)` as they land on disk. An error ends the stream
/// with `Err`, which aborts the response: a client never receives a complete body with bad bytes.
pub(super) fn follow(
    cache: Cache,
    digest: Digest,
    rx: watch::Receiver<Progress>,
    start: u64,
    end: u64,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send {
    struct Follower {
        cache: Cache,
        digest: Digest,
        rx: watch::Receiver<Progress>,
        pos: u64,
        end: u64,
        _waiting: WaiterGauge,
        /// Keeps the committed blob from eviction while this client reads it.
        _hold: Option<super::lru::InUse>,
        /// Counts this client among the fill's readers, once bytes flow.
        reader: Option<Reader>,
    }
    let waiting = WaiterGauge::new(&cache, &rx);
    let hold = cache.lru.hold(&digest);
    let follower = Follower { cache, digest, rx, pos: start, end, _waiting: waiting, _hold: hold, reader: None };
    futures_util::stream::unfold(follower, |mut f| async move {
        loop {
            if f.pos >= f.end {
                return None;
            }
            let progress = f.rx.borrow_and_update().clone();
            let (available, staged) = match progress.phase {
                Phase::Failed(e) => return Some((Err(std::io::Error::other(e.to_string())), Follower { end: 0, ..f })),
                // A stored blob shorter than the range asked for (the fill's announced size) ends
                // the response with an error instead of waiting for bytes that never come.
                Phase::Done { total } if f.pos >= total => {
                    return Some((
                        Err(std::io::Error::other(format!("blob {}: stored with {total} bytes", f.digest))),
                        Follower { end: 0, ..f },
                    ));
                }
                Phase::Done { total } => (total, None),
                // The last byte of the response (of a range too) waits until the blob is verified
                // and stored: a response never completes with content that turns out not to match
                // its digest, and a client that has the whole blob finds it cached.
                Phase::Streaming(s) => (progress.received.min(f.end.saturating_sub(1)), Some(s)),
                Phase::Connecting => (0, None),
            };
            if f.pos < available {
                let want = (available.min(f.end) - f.pos).min(CHUNK as u64) as usize;
                let chunk = match staged {
                    Some(s) => {
                        let reader = f.reader.get_or_insert_with(|| Reader::join(&s.shared, f.pos));
                        reader.advanced_to(f.pos);
                        let source = s.shared.window().locate(f.pos, want);
                        match source {
                            Source::Memory(bytes) => Ok(bytes),
                            // The outcome follows the closing: wait for it, then read on.
                            Source::Closed => {
                                let _ = f.rx.changed().await;
                                continue;
                            }
                            Source::File(n) => read(&f.cache, &f.digest, Some(&s.staging), f.pos, n).await,
                        }
                    }
                    None => read(&f.cache, &f.digest, None, f.pos, want).await,
                };
                return match chunk {
                    Ok(chunk) if !chunk.is_empty() => {
                        f.pos += chunk.len() as u64;
                        f.cache.metrics.bytes_served.with_label_values(&["fill"]).inc_by(chunk.len() as u64);
                        Some((Ok(chunk), f))
                    }
                    Ok(_) => Some((
                        Err(std::io::Error::other(format!("blob {}: no bytes at {}", f.digest, f.pos))),
                        Follower { end: 0, ..f },
                    )),
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
async fn read(cache: &Cache, digest: &Digest, staging: Option<&str>, pos: u64, want: usize) -> std::io::Result<Bytes> {
    let chunk = match staging {
        Some(path) => cache.store.read_staged_at(path, pos, want).await?,
        None => None,
    };
    let chunk = match chunk {
        Some(c) => c,
        None => cache
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

/// Counts a client streaming from a fill: in the `fill_waiters` gauge and in the count of the
/// fill it joined.
struct WaiterGauge(prometheus::IntGauge, Arc<AtomicUsize>);

impl WaiterGauge {
    fn new(cache: &Cache, rx: &watch::Receiver<Progress>) -> Self {
        cache.metrics.fill_waiters.inc();
        let fill = rx.borrow().clients.clone();
        fill.fetch_add(1, Ordering::Relaxed);
        WaiterGauge(cache.metrics.fill_waiters.clone(), fill)
    }
}

impl Drop for WaiterGauge {
    fn drop(&mut self) {
        self.0.dec();
        self.1.fetch_sub(1, Ordering::Relaxed);
    }
}
