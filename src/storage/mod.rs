//! The content-addressed store. `Driver` is the small trait a backend implements (the filesystem
//! today, an object store later); `Store` owns the on-disk layout and the typed operations the API
//! layer uses, so a new backend never touches the API.
//!
//! Layout under the storage root:
//! ```text
//! blobs/<alg>/<hex[..2]>/<hex>/data                         content, stored once
//! blobs/<alg>/<hex[..2]>/<hex>/from/<upstream>              that upstream delivered these bytes
//! repositories/<name>/_layers/<alg>/<hex>/link              blob may be served from <name>
//! repositories/<name>/_manifests/revisions/<alg>/<hex>/link  manifest meta (media type, size, subject)
//! repositories/<name>/_manifests/tags/<tag>/current          {digest, fetched_at}
//! repositories/<name>/_referrers/<alg>/<subject hex>/<alg>-<hex>  referrer descriptor
//! repositories/<name>/_upstream_referrers/<alg>/<subject hex>     the upstream's referrers, when asked
//! uploads/<id>/data, uploads/<id>/info                       resumable upload sessions
//! tmp/                                                        staged writes, renamed into place
//! meta/token.key                                              the token signing key (0600)
//! meta/access.log                                             last use of mirrored blobs (LRU)
//! meta/gc.json                                                totals of `regmirror gc` runs
//! blobs/<alg>/<hex[..2]>/<hex>/data.touched                 last use on any replica (S3 only)
//! cluster/leases/fill-<alg>-<hex>, cluster/leases/eviction    who runs a fill, an eviction pass
//! cluster/replicas/<node>                                     each replica's record (S3 only)
//! ```
//! Repository components never start with `_`, so the `_` directories cannot collide with names.

mod counted;
pub mod fs;
pub mod s3;
mod writer;

pub use writer::BlobWriter;

use std::io;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::oci::{Algorithm, Digest, Hasher, ManifestMeta, RepoName};

/// Blob bytes are read (and sent) in chunks this large: close to sendfile speed without sendfile.
pub const CHUNK: usize = 1 << 20;

pub type Reader = Box<dyn AsyncRead + Send + Unpin>;
pub type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// What a storage backend provides. Paths are `/`-separated and relative to the backend's root.
#[async_trait]
pub trait Driver: Send + Sync + 'static {
    /// A small file's content, or `None` when it does not exist.
    async fn get(&self, path: &str) -> io::Result<Option<Vec<u8>>>;
    /// Replace a small file atomically and durably.
    async fn put(&self, path: &str, content: &[u8]) -> io::Result<()>;
    /// `put`, readable by the owner only (a key).
    async fn put_private(&self, path: &str, content: &[u8]) -> io::Result<()>;
    /// Remove a file or a whole tree; a missing path is not an error.
    async fn delete(&self, path: &str) -> io::Result<()>;
    /// Names of the children of a directory, sorted; empty when it does not exist.
    async fn list(&self, path: &str) -> io::Result<Vec<String>>;
    /// Size of a file, `None` when it does not exist.
    async fn size(&self, path: &str) -> io::Result<Option<u64>>;
    /// Size and modification time (Unix seconds) of a file, `None` when it does not exist.
    async fn stat(&self, path: &str) -> io::Result<Option<(u64, u64)>>;
    /// A reader positioned at `offset`, `None` when the file does not exist.
    async fn open_read(&self, path: &str, offset: u64) -> io::Result<Option<Reader>>;
    /// Up to `len` bytes at `offset` (fewer only where the file ends); `None` when the file does
    /// not exist. The fast path for serving blobs: one read per chunk, no intermediate buffer.
    async fn read_at(&self, path: &str, offset: u64, len: usize) -> io::Result<Option<bytes::Bytes>>;
    /// A writer appending to an existing file (`NotFound` when there is none).
    async fn open_append(&self, path: &str) -> io::Result<Writer>;
    /// Cut a file back to `len` bytes.
    async fn truncate(&self, path: &str, len: u64) -> io::Result<()>;
    /// A new file to stage a blob in. It is written from a blocking thread of its own (see
    /// `BlobWriter`), so a backend may write it however is fastest.
    async fn create_staged(&self, path: &str) -> io::Result<Box<dyn StagedFile>>;
    /// Remove a staged file right away, from any context (a write dropped half way); best effort.
    fn discard_staged(&self, path: &str);
    /// Set a file's modification time to now (a blob in use again is not garbage).
    async fn touch(&self, path: &str) -> io::Result<()>;
    /// Make a staged file durable and move it to `to`, atomically. Its content was checked to be
    /// `expected`; a backend that copies it checks again on the way.
    async fn commit(&self, from: &str, to: &str, expected: &Digest) -> io::Result<()>;
    /// A fresh path for staging a write.
    fn staging_path(&self) -> String;
    /// Bytes that can still be written, when the backend can tell.
    fn available(&self) -> io::Result<Option<u64>>;
    /// A small object with its version, for compare-and-swap writes (replicas coordinate through
    /// these). Only a shared backend has them.
    async fn get_versioned(&self, _path: &str) -> io::Result<Option<(Vec<u8>, Version)>> {
        Err(not_shared())
    }
    /// Write `content` only if `condition` holds: the new version, or `None` when it did not hold.
    async fn put_if(&self, _path: &str, _content: &[u8], _condition: Condition) -> io::Result<Option<Version>> {
        Err(not_shared())
    }
    /// Every file below `path` with its size and modification time (Unix seconds), paths relative
    /// to `path`, in one sweep; `None` when the backend has no cheaper way than walking `list`.
    async fn list_tree(&self, _path: &str) -> io::Result<Option<Vec<(String, u64, u64)>>> {
        Ok(None)
    }
    /// Bytes `range` of a file as one stream (an object store's single ranged GET), when that is
    /// the backend's fast way to serve it; `None`: serve with `read_at`, chunk by chunk.
    async fn stream_range(&self, _path: &str, _range: std::ops::Range<u64>) -> io::Result<Option<ByteStream>> {
        Ok(None)
    }
    /// Remove writes that were started and never finished nor aborted (an object store's
    /// multipart uploads left by a crash) once they are older than `age`; how many were removed.
    async fn purge_abandoned_writes(&self, _age: std::time::Duration) -> io::Result<usize> {
        Ok(0)
    }
    /// A URL where a client can GET the file itself for `ttl`, when the backend can give one.
    async fn presigned_get(&self, _path: &str, _ttl: std::time::Duration) -> io::Result<Option<String>> {
        Ok(None)
    }
}

/// File content as it arrives.
pub type ByteStream = futures_util::stream::BoxStream<'static, io::Result<bytes::Bytes>>;

/// A version of an object (an S3 ETag) for compare-and-swap writes.
pub type Version = String;

/// When a conditional write may happen.
#[derive(Clone, Debug)]
pub enum Condition {
    /// Nothing is stored under the path yet.
    Absent,
    /// What is stored is still at this version.
    Unchanged(Version),
}

fn not_shared() -> io::Error {
    io::Error::new(io::ErrorKind::Unsupported, "conditional writes need a shared (object store) backend")
}

/// The store a configuration names. `serving`: this process serves it, so staged writes left by
/// a previous run are removed (other processes, such as `regmirror gc`, leave them alone).
pub fn open(config: &crate::config::Config, serving: bool, metrics: &crate::metrics::Metrics) -> io::Result<Store> {
    use crate::config::StorageBackend;
    // The whole store, or (with an object store) the staged writes only.
    let local =
        if serving { fs::FsDriver::new(&config.storage_root)? } else { fs::FsDriver::open(&config.storage_root)? };
    Ok(match &config.backend {
        StorageBackend::Fs => Store::new(local),
        StorageBackend::S3(s3) => {
            let bucket = s3::S3Driver::new(s3, local, config.upstream_timeout)?;
            Store::new(counted::Counted::new(bucket, metrics.storage_errors.clone()))
        }
    })
}

/// The storage backend (an object store) failed or did not answer: worth retrying, not a fault
/// of the request. Carried inside `io::Error`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

/// Whether an error means the storage backend is unavailable (see [`Unavailable`]).
pub fn is_unavailable(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<Unavailable>())
}

/// Whether an error means the store is full (no space left, or over a quota).
pub fn is_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(code) if code == libc::ENOSPC || code == libc::EDQUOT)
}

/// A staged blob file, written front to back by one thread.
pub trait StagedFile: Send {
    /// Append `bytes`. Returns how many bytes others can read from the file now: a backend may
    /// hold some back to write them in larger blocks.
    fn append(&mut self, bytes: &[u8]) -> io::Result<u64>;
    /// Write out everything appended; returns the file's length.
    fn finish(&mut self) -> io::Result<u64>;
}

/// A tag: the digest it points to and when that answer was learned (upstream fetch or push).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TagRecord {
    pub digest: Digest,
    /// Unix seconds.
    pub fetched_at: u64,
}

impl TagRecord {
    pub fn now(digest: &Digest) -> Self {
        TagRecord { digest: digest.clone(), fetched_at: unix_now() }
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// What an upstream answered for the referrers of a subject, and when.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct UpstreamReferrers {
    /// The descriptors of the referrers, as the upstream listed them.
    pub manifests: Vec<serde_json::Value>,
    /// Unix seconds.
    pub fetched_at: u64,
}

/// An upload session's record, kept on disk so it survives a restart.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UploadInfo {
    pub repository: RepoName,
    pub started_at: u64,
}

/// Why a staged blob was not committed.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("content digest {actual} does not match {expected}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("content is {actual} bytes, expected {expected}")]
    SizeMismatch { expected: u64, actual: u64 },
    #[error("storage: {0}")]
    Io(#[from] io::Error),
}

#[derive(Clone)]
pub struct Store {
    driver: std::sync::Arc<dyn Driver>,
    stats: std::sync::Arc<StoreStats>,
}

/// Blob count and bytes, counted once at start and kept current by every write and delete.
#[derive(Default)]
pub struct StoreStats {
    pub bytes: std::sync::atomic::AtomicI64,
    pub objects: std::sync::atomic::AtomicI64,
    /// Counts changes to blobs, links, manifests and tags: a summary built from the store is
    /// current while this has not moved.
    pub changes: std::sync::atomic::AtomicU64,
}

impl StoreStats {
    /// Set the figures from a full scan (at start; later writes keep them current).
    pub fn reset(&self, bytes: u64, objects: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.bytes.store(bytes as i64, Relaxed);
        self.objects.store(objects as i64, Relaxed);
    }

    /// Counts a change once it is done (when the guard drops, whichever way the operation
    /// ends): a summary read before it then never takes its result for current.
    fn change(&self) -> ChangeDone<'_> {
        ChangeDone(&self.changes)
    }

    fn add(&self, bytes: i64, objects: i64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.changes.fetch_add(1, Relaxed);
        self.bytes.fetch_add(bytes, Relaxed);
        self.objects.fetch_add(objects, Relaxed);
    }
}

struct ChangeDone<'a>(&'a std::sync::atomic::AtomicU64);

impl Drop for ChangeDone<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

fn blob_path(d: &Digest) -> String {
    let hex = d.hex();
    format!("blobs/{}/{}/{}/data", d.algorithm().as_str(), &hex[..2], hex)
}

/// Marks that `upstream` itself delivered (and the fill verified) a blob's bytes.
fn origin_path(d: &Digest, upstream: &str) -> String {
    let hex = d.hex();
    format!("blobs/{}/{}/{}/from/{upstream}", d.algorithm().as_str(), &hex[..2], hex)
}

fn repo_path(repo: &RepoName) -> String {
    format!("repositories/{repo}")
}

fn layer_link(repo: &RepoName, d: &Digest) -> String {
    format!("{}/_layers/{}/{}/link", repo_path(repo), d.algorithm().as_str(), d.hex())
}

fn revision_link(repo: &RepoName, d: &Digest) -> String {
    format!("{}/_manifests/revisions/{}/{}/link", repo_path(repo), d.algorithm().as_str(), d.hex())
}

fn tags_dir(repo: &RepoName) -> String {
    format!("{}/_manifests/tags", repo_path(repo))
}

fn tag_path(repo: &RepoName, tag: &str) -> String {
    format!("{}/{tag}/current", tags_dir(repo))
}

fn referrers_dir(repo: &RepoName, subject: &Digest) -> String {
    format!("{}/_referrers/{}/{}", repo_path(repo), subject.algorithm().as_str(), subject.hex())
}

fn upstream_referrers_path(repo: &RepoName, subject: &Digest) -> String {
    format!("{}/_upstream_referrers/{}/{}", repo_path(repo), subject.algorithm().as_str(), subject.hex())
}

fn upload_dir(id: &str) -> String {
    format!("uploads/{id}")
}

/// Where replicas on one bucket keep a record each.
const REPLICAS: &str = "cluster/replicas";

fn replica_record_path(node: &str) -> String {
    format!("{REPLICAS}/{node}")
}

fn lease_path(name: &str) -> String {
    format!("cluster/leases/{name}")
}

fn upload_data(id: &str) -> String {
    format!("uploads/{id}/data")
}

/// Files of the store's own bookkeeping, under `meta/`.
#[derive(Clone, Copy, Debug)]
pub enum Meta {
    /// The token signing key.
    TokenKey,
    /// The last use of every mirrored blob, appended to (eviction order; on the replica's own
    /// disk, under `storage.root`).
    AccessLog,
    /// Totals of `regmirror gc` runs.
    GcRecord,
    /// Present once the blobs of an older store have been given their provenance.
    ProvenanceMarked,
    /// The status page's hourly savings and the last pull of each repository (kept on the
    /// replica's own disk, under `storage.root`).
    StatusHistory,
}

impl Meta {
    pub fn path(self) -> &'static str {
        match self {
            Meta::TokenKey => "meta/token.key",
            Meta::AccessLog => "meta/access.log",
            Meta::GcRecord => "meta/gc.json",
            Meta::ProvenanceMarked => "meta/provenance.v1",
            Meta::StatusHistory => "meta/status.json",
        }
    }
}

/// The blobs among the files under `blobs/` (`<alg>/<xx>/<hex>/data`), each with its size and
/// last use: the later of its own time and its `touch` marker's (`data.touched`).
fn blobs_in_tree(files: Vec<(String, u64, u64)>) -> Vec<(Digest, u64, u64)> {
    let mut blobs: std::collections::HashMap<Digest, (Option<u64>, u64)> = std::collections::HashMap::new();
    for (path, size, mtime) in files {
        let mut parts = path.split('/');
        let (Some(alg), Some(_), Some(hex), Some(file), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let Ok(d) = format!("{alg}:{hex}").parse::<Digest>() else { continue };
        let entry = blobs.entry(d).or_insert((None, 0));
        match file {
            "data" => *entry = (Some(size), entry.1.max(mtime)),
            "data.touched" => entry.1 = entry.1.max(mtime),
            _ => {}
        }
    }
    blobs.into_iter().filter_map(|(d, (size, mtime))| size.map(|s| (d, s, mtime))).collect()
}

/// Upload ids are ours (hex); anything else cannot name a session and must not reach a path.
pub fn valid_upload_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Store {
    pub fn new(driver: impl Driver) -> Self {
        Store { driver: std::sync::Arc::new(driver), stats: Default::default() }
    }

    pub fn stats(&self) -> &StoreStats {
        &self.stats
    }

    /// Every blob in the store with its size and modification time.
    pub async fn scan_blobs(&self) -> io::Result<Vec<(Digest, u64, u64)>> {
        if let Some(files) = self.driver.list_tree("blobs").await? {
            return Ok(blobs_in_tree(files));
        }
        let mut out = Vec::new();
        for alg in self.driver.list("blobs").await? {
            for prefix in self.driver.list(&format!("blobs/{alg}")).await? {
                for hex in self.driver.list(&format!("blobs/{alg}/{prefix}")).await? {
                    let Ok(d) = format!("{alg}:{hex}").parse::<Digest>() else { continue };
                    if let Some((size, mtime)) = self.driver.stat(&blob_path(&d)).await? {
                        out.push((d, size, mtime));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Size and modification time of a blob.
    pub async fn blob_stat(&self, d: &Digest) -> io::Result<Option<(u64, u64)>> {
        self.driver.stat(&blob_path(d)).await
    }

    /// Every digest a repository links: its blobs and its manifests.
    pub async fn repository_digests(&self, repo: &RepoName) -> io::Result<Vec<Digest>> {
        let mut out = Vec::new();
        for dir in [format!("{}/_layers", repo_path(repo)), format!("{}/_manifests/revisions", repo_path(repo))] {
            for alg in self.driver.list(&dir).await? {
                for hex in self.driver.list(&format!("{dir}/{alg}")).await? {
                    if let Ok(d) = format!("{alg}:{hex}").parse::<Digest>() {
                        out.push(d);
                    }
                }
            }
        }
        Ok(out)
    }

    /// The manifests of a repository (digests).
    pub async fn manifest_digests(&self, repo: &RepoName) -> io::Result<Vec<Digest>> {
        let dir = format!("{}/_manifests/revisions", repo_path(repo));
        let mut out = Vec::new();
        for alg in self.driver.list(&dir).await? {
            for hex in self.driver.list(&format!("{dir}/{alg}")).await? {
                if let Ok(d) = format!("{alg}:{hex}").parse::<Digest>() {
                    out.push(d);
                }
            }
        }
        Ok(out)
    }

    // ---- bookkeeping ----

    /// Write a bookkeeping file unless there is one: `false` when another replica was first (read
    /// it back then). On a backend that is not shared, a plain write.
    pub async fn create_meta(&self, meta: Meta, content: &[u8]) -> io::Result<bool> {
        match self.driver.put_if(meta.path(), content, Condition::Absent).await {
            Ok(created) => Ok(created.is_some()),
            Err(e) if e.kind() == io::ErrorKind::Unsupported => self.write_meta(meta, content).await.map(|()| true),
            Err(e) => Err(e),
        }
    }

    // ---- leases (replicas on one bucket) ----

    pub async fn read_lease(&self, name: &str) -> io::Result<Option<(Vec<u8>, Version)>> {
        self.driver.get_versioned(&lease_path(name)).await
    }

    /// Write a lease if `condition` holds: its new version, or `None` when it did not hold.
    pub async fn write_lease(&self, name: &str, content: &[u8], condition: Condition) -> io::Result<Option<Version>> {
        self.driver.put_if(&lease_path(name), content, condition).await
    }

    pub async fn remove_lease(&self, name: &str) -> io::Result<()> {
        self.driver.delete(&lease_path(name)).await
    }

    // ---- the replicas' records ----

    pub async fn write_replica_record(&self, node: &str, content: &[u8]) -> io::Result<()> {
        self.driver.put(&replica_record_path(node), content).await
    }

    pub async fn read_replica_record(&self, node: &str) -> io::Result<Option<Vec<u8>>> {
        self.driver.get(&replica_record_path(node)).await
    }

    pub async fn remove_replica_record(&self, node: &str) -> io::Result<()> {
        self.driver.delete(&replica_record_path(node)).await
    }

    /// Every replica's record: its node and when it was last written (the store's clock, Unix
    /// seconds). Empty on a backend that is not shared.
    pub async fn list_replica_records(&self) -> io::Result<Vec<(String, u64)>> {
        let files = self.driver.list_tree(REPLICAS).await?.unwrap_or_default();
        // Records sit right in the folder; anything deeper was not written by a replica.
        Ok(files.into_iter().filter(|(node, ..)| !node.contains('/')).map(|(node, _, at)| (node, at)).collect())
    }

    /// A short-lived URL a client can fetch a stored blob from directly, when the backend gives
    /// one.
    pub async fn blob_url(&self, d: &Digest, ttl: std::time::Duration) -> io::Result<Option<String>> {
        self.driver.presigned_get(&blob_path(d), ttl).await
    }

    pub async fn read_meta(&self, meta: Meta) -> io::Result<Option<Vec<u8>>> {
        self.driver.get(meta.path()).await
    }

    /// Replace a bookkeeping file; the token key is readable by the owner only.
    pub async fn write_meta(&self, meta: Meta, content: &[u8]) -> io::Result<()> {
        match meta {
            Meta::TokenKey => self.driver.put_private(meta.path(), content).await,
            _ => self.driver.put(meta.path(), content).await,
        }
    }

    /// Bytes the store can still take, when the backend can tell.
    pub fn available(&self) -> io::Result<Option<u64>> {
        self.driver.available()
    }

    /// Whether the store takes a write now (readiness).
    /// Whether the store takes writes now: a small write where the content lives (the bucket,
    /// for an object store).
    pub async fn check_writable(&self) -> io::Result<()> {
        self.driver.put("meta/readyz", b"ok").await
    }

    /// Bytes of a fill's staging file (`None` once it is gone: committed or removed).
    pub async fn read_staged_at(&self, staging: &str, offset: u64, len: usize) -> io::Result<Option<bytes::Bytes>> {
        self.driver.read_at(staging, offset, len).await
    }

    // ---- blobs ----

    pub async fn blob_size(&self, d: &Digest) -> io::Result<Option<u64>> {
        self.driver.size(&blob_path(d)).await
    }

    pub async fn open_blob(&self, d: &Digest, offset: u64) -> io::Result<Option<Reader>> {
        self.driver.open_read(&blob_path(d), offset).await
    }

    pub async fn read_blob_at(&self, d: &Digest, offset: u64, len: usize) -> io::Result<Option<bytes::Bytes>> {
        self.driver.read_at(&blob_path(d), offset, len).await
    }

    /// Bytes `[offset, offset + len)` of a stored blob as one stream, where the backend serves
    /// it faster that way than chunk by chunk (an object store).
    pub async fn blob_stream(&self, d: &Digest, offset: u64, len: u64) -> io::Result<Option<ByteStream>> {
        self.driver.stream_range(&blob_path(d), offset..offset + len).await
    }

    pub async fn read_blob(&self, d: &Digest) -> io::Result<Option<Vec<u8>>> {
        self.driver.get(&blob_path(d)).await
    }

    pub async fn delete_blob(&self, d: &Digest) -> io::Result<()> {
        if let Some(size) = self.blob_size(d).await? {
            let hex = d.hex();
            self.driver.delete(&format!("blobs/{}/{}/{hex}", d.algorithm().as_str(), &hex[..2])).await?;
            self.stats.add(-(size as i64), -1);
        }
        Ok(())
    }

    /// Record that `upstream` delivered these bytes (a verified fill).
    pub async fn mark_delivered(&self, d: &Digest, upstream: &str) -> io::Result<()> {
        let path = origin_path(d, upstream);
        if self.driver.size(&path).await?.is_none() {
            self.driver.put(&path, b"").await?;
        }
        Ok(())
    }

    /// Whether `upstream` ever delivered this blob. Only then may a stored copy be served through
    /// its repositories without fetching it: a pushed blob must never reach an anonymous client
    /// through a mirrored name just because some upstream claims to have the digest.
    pub async fn delivered_by(&self, d: &Digest, upstream: &str) -> io::Result<bool> {
        Ok(self.driver.size(&origin_path(d, upstream)).await?.is_some())
    }

    /// Start a staged blob write; nothing is visible until `BlobWriter::commit` verifies it.
    pub async fn begin_blob(&self, algorithm: Algorithm) -> io::Result<BlobWriter> {
        let path = self.driver.staging_path();
        let file = self.driver.create_staged(&path).await?;
        let writer = BlobWriter::new(self.clone(), path.clone(), file, algorithm);
        if writer.is_err() {
            self.driver.discard_staged(&path);
        }
        writer
    }

    /// Verify a staged file (an upload session's data) against `expected` and move it into place.
    /// The staged file is consumed either way: a mismatch keeps nothing.
    async fn commit_staged(&self, staged: &str, expected: &Digest, hasher: Option<Hasher>) -> Result<u64, CommitError> {
        let outcome = async {
            let (actual, size) = match hasher {
                Some(h) => {
                    let size = self.driver.size(staged).await?.unwrap_or(0);
                    (h.finish(), size)
                }
                None => self.hash_file(staged, expected.algorithm()).await?,
            };
            if &actual != expected {
                return Err(CommitError::DigestMismatch { expected: expected.clone(), actual });
            }
            self.publish(staged, expected).await?;
            Ok(size)
        }
        .await;
        if outcome.is_err() {
            let _ = self.driver.delete(staged).await;
        }
        outcome
    }

    async fn hash_file(&self, path: &str, algorithm: Algorithm) -> io::Result<(Digest, u64)> {
        use tokio::io::AsyncReadExt;
        let mut h = Hasher::new(algorithm);
        let mut size = 0u64;
        if let Some(mut r) = self.driver.open_read(path, 0).await? {
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = r.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                size += n as u64;
            }
        }
        Ok((h.finish(), size))
    }

    /// Move verified content into the blob tree (or drop it when the blob is already there).
    async fn publish(&self, staged: &str, d: &Digest) -> io::Result<()> {
        if self.blob_size(d).await?.is_some() {
            return self.driver.delete(staged).await;
        }
        let size = self.driver.size(staged).await?.unwrap_or(0);
        self.driver.commit(staged, &blob_path(d), d).await?;
        self.stats.add(size as i64, 1);
        Ok(())
    }

    /// Store small content (a manifest) under its digest.
    pub async fn put_blob_bytes(&self, d: &Digest, bytes: &[u8]) -> io::Result<()> {
        if self.blob_size(d).await?.is_none() {
            self.driver.put(&blob_path(d), bytes).await?;
            self.stats.add(bytes.len() as i64, 1);
        }
        Ok(())
    }

    // ---- repository links ----

    /// Record a use of a blob in the store itself (replicas on one bucket see each other's uses).
    pub async fn touch_blob(&self, d: &Digest) -> io::Result<()> {
        self.driver.touch(&blob_path(d)).await
    }

    pub async fn link_blob(&self, repo: &RepoName, d: &Digest) -> io::Result<()> {
        let _changed = self.stats.change();
        // A fresh link makes the blob young again for gc's grace period.
        self.driver.touch(&blob_path(d)).await?;
        let path = layer_link(repo, d);
        if self.driver.size(&path).await?.is_none() {
            self.driver.put(&path, d.to_string().as_bytes()).await?;
        }
        Ok(())
    }

    pub async fn is_blob_linked(&self, repo: &RepoName, d: &Digest) -> io::Result<bool> {
        Ok(self.driver.size(&layer_link(repo, d)).await?.is_some())
    }

    pub async fn unlink_blob(&self, repo: &RepoName, d: &Digest) -> io::Result<()> {
        let _changed = self.stats.change();
        self.driver.delete(&format!("{}/_layers/{}/{}", repo_path(repo), d.algorithm().as_str(), d.hex())).await
    }

    // ---- manifests ----

    /// Record a manifest: content first, then the repository's link, then the referrer entry, so a
    /// crash never leaves a link to missing content.
    pub async fn put_manifest(&self, repo: &RepoName, d: &Digest, meta: &ManifestMeta, bytes: &[u8]) -> io::Result<()> {
        let _changed = self.stats.change();
        self.put_blob_bytes(d, bytes).await?;
        let json = serde_json::to_vec(meta).map_err(io::Error::other)?;
        self.driver.put(&revision_link(repo, d), &json).await?;
        if let Some(subject) = &meta.subject {
            let entry = format!("{}/{}-{}", referrers_dir(repo, subject), d.algorithm().as_str(), d.hex());
            self.driver.put(&entry, d.to_string().as_bytes()).await?;
        }
        Ok(())
    }

    pub async fn manifest_meta(&self, repo: &RepoName, d: &Digest) -> io::Result<Option<ManifestMeta>> {
        Ok(self.driver.get(&revision_link(repo, d)).await?.and_then(|b| serde_json::from_slice(&b).ok()))
    }

    /// Remove a manifest from a repository, with every tag that points to it and its referrer
    /// entry. The content stays (other repositories may share it; gc removes orphans).
    pub async fn delete_manifest(&self, repo: &RepoName, d: &Digest) -> io::Result<bool> {
        let _changed = self.stats.change();
        let Some(meta) = self.manifest_meta(repo, d).await? else {
            return Ok(false);
        };
        for tag in self.list_tags(repo).await? {
            if self.tag(repo, &tag).await?.is_some_and(|t| &t.digest == d) {
                self.delete_tag(repo, &tag).await?;
            }
        }
        if let Some(subject) = &meta.subject {
            let entry = format!("{}/{}-{}", referrers_dir(repo, subject), d.algorithm().as_str(), d.hex());
            self.driver.delete(&entry).await?;
        }
        self.driver
            .delete(&format!("{}/_manifests/revisions/{}/{}", repo_path(repo), d.algorithm().as_str(), d.hex()))
            .await?;
        Ok(true)
    }

    /// Every (subject, referrer) pair `repo` records.
    pub async fn referrer_pairs(&self, repo: &RepoName) -> io::Result<Vec<(Digest, Digest)>> {
        let dir = format!("{}/_referrers", repo_path(repo));
        let mut out = Vec::new();
        for alg in self.driver.list(&dir).await? {
            for hex in self.driver.list(&format!("{dir}/{alg}")).await? {
                let Ok(subject) = format!("{alg}:{hex}").parse::<Digest>() else { continue };
                for entry in self.driver.list(&format!("{dir}/{alg}/{hex}")).await? {
                    if let Ok(referrer) = entry.replacen('-', ":", 1).parse::<Digest>() {
                        out.push((subject.clone(), referrer));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Manifests in `repo` whose `subject` is `subject`, with their meta.
    pub async fn referrers(&self, repo: &RepoName, subject: &Digest) -> io::Result<Vec<(Digest, ManifestMeta)>> {
        let mut out = Vec::new();
        for entry in self.driver.list(&referrers_dir(repo, subject)).await? {
            let Some(d) = entry.replacen('-', ":", 1).parse::<Digest>().ok() else {
                continue;
            };
            if let Some(meta) = self.manifest_meta(repo, &d).await? {
                out.push((d, meta));
            }
        }
        Ok(out)
    }

    /// The upstream's referrers of `subject` as last fetched, if ever.
    pub async fn upstream_referrers(&self, repo: &RepoName, subject: &Digest) -> io::Result<Option<UpstreamReferrers>> {
        Ok(self
            .driver
            .get(&upstream_referrers_path(repo, subject))
            .await?
            .and_then(|b| serde_json::from_slice(&b).ok()))
    }

    pub async fn set_upstream_referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        record: &UpstreamReferrers,
    ) -> io::Result<()> {
        let json = serde_json::to_vec(record).map_err(io::Error::other)?;
        self.driver.put(&upstream_referrers_path(repo, subject), &json).await
    }

    // ---- tags ----

    pub async fn tag(&self, repo: &RepoName, tag: &str) -> io::Result<Option<TagRecord>> {
        Ok(self.driver.get(&tag_path(repo, tag)).await?.and_then(|b| serde_json::from_slice(&b).ok()))
    }

    pub async fn set_tag(&self, repo: &RepoName, tag: &str, record: &TagRecord) -> io::Result<()> {
        let _changed = self.stats.change();
        let json = serde_json::to_vec(record).map_err(io::Error::other)?;
        self.driver.put(&tag_path(repo, tag), &json).await
    }

    pub async fn delete_tag(&self, repo: &RepoName, tag: &str) -> io::Result<bool> {
        let _changed = self.stats.change();
        let existed = self.driver.size(&tag_path(repo, tag)).await?.is_some();
        self.driver.delete(&format!("{}/{tag}", tags_dir(repo))).await?;
        Ok(existed)
    }

    /// Tags of a repository in lexical order.
    pub async fn list_tags(&self, repo: &RepoName) -> io::Result<Vec<String>> {
        let mut tags = Vec::new();
        for t in self.driver.list(&tags_dir(repo)).await? {
            if self.driver.size(&tag_path(repo, &t)).await?.is_some() {
                tags.push(t);
            }
        }
        Ok(tags)
    }

    pub async fn repository_exists(&self, repo: &RepoName) -> io::Result<bool> {
        Ok(!self.driver.list(&repo_path(repo)).await?.is_empty())
    }

    /// Every repository that holds at least one manifest, in lexical order.
    pub async fn list_repositories(&self) -> io::Result<Vec<RepoName>> {
        self.walk_repositories(true).await
    }

    /// Every repository with anything in it (blobs pushed without a manifest yet included).
    pub async fn list_repositories_all(&self) -> io::Result<Vec<RepoName>> {
        self.walk_repositories(false).await
    }

    async fn walk_repositories(&self, with_manifests_only: bool) -> io::Result<Vec<RepoName>> {
        let mut out = Vec::new();
        let mut pending = vec![String::new()];
        while let Some(prefix) = pending.pop() {
            let dir = if prefix.is_empty() { "repositories".to_string() } else { format!("repositories/{prefix}") };
            let mut is_repo = false;
            for child in self.driver.list(&dir).await? {
                if child == "_manifests" {
                    is_repo |= !self.driver.list(&format!("{dir}/_manifests/revisions")).await?.is_empty();
                } else if child.starts_with('_') {
                    is_repo |= !with_manifests_only;
                } else {
                    pending.push(if prefix.is_empty() { child } else { format!("{prefix}/{child}") });
                }
            }
            if is_repo {
                // Only names this registry could have written; anything else is not a repository.
                if let Ok(name) = RepoName::parse(&prefix) {
                    out.push(name);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    // ---- upload sessions ----

    pub async fn create_upload(&self, repo: &RepoName) -> io::Result<String> {
        let id = fs::unique_name();
        let info = UploadInfo { repository: repo.clone(), started_at: unix_now() };
        let json = serde_json::to_vec(&info).map_err(io::Error::other)?;
        // The record first: a session folder without one is a leftover the purge may remove.
        self.driver.put(&format!("{}/info", upload_dir(&id)), &json).await?;
        self.driver.put(&upload_data(&id), b"").await?;
        Ok(id)
    }

    /// Remove writes into the store that a crash left half done, older than `age` (an object
    /// store's incomplete multipart uploads); how many.
    pub async fn purge_abandoned_writes(&self, age: std::time::Duration) -> io::Result<usize> {
        self.driver.purge_abandoned_writes(age).await
    }

    pub async fn upload_info(&self, id: &str) -> io::Result<Option<UploadInfo>> {
        if !valid_upload_id(id) {
            return Ok(None);
        }
        Ok(self.driver.get(&format!("{}/info", upload_dir(id))).await?.and_then(|b| serde_json::from_slice(&b).ok()))
    }

    /// When a session's data was last written (Unix seconds), `None` without data.
    pub async fn upload_modified(&self, id: &str) -> io::Result<Option<u64>> {
        Ok(self.driver.stat(&upload_data(id)).await?.map(|(_, mtime)| mtime))
    }

    pub async fn upload_size(&self, id: &str) -> io::Result<u64> {
        Ok(self.driver.size(&upload_data(id)).await?.unwrap_or(0))
    }

    /// Ids of every upload session in the store.
    pub async fn list_uploads(&self) -> io::Result<Vec<String>> {
        Ok(self.driver.list("uploads").await?.into_iter().filter(|id| valid_upload_id(id)).collect())
    }

    /// A writer appending to a session's data; `None` when the session is gone.
    pub async fn append_upload(&self, id: &str) -> io::Result<Option<Writer>> {
        match self.driver.open_append(&upload_data(id)).await {
            Ok(w) => Ok(Some(w)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Verify a session's data against `expected` and make it the blob; the data is consumed
    /// either way.
    pub async fn commit_upload(&self, id: &str, expected: &Digest, hasher: Option<Hasher>) -> Result<u64, CommitError> {
        self.commit_staged(&upload_data(id), expected, hasher).await
    }

    /// Cut a session's data back to `len` bytes (a chunk that was refused).
    pub async fn truncate_upload(&self, id: &str, len: u64) -> io::Result<()> {
        self.driver.truncate(&upload_data(id), len).await
    }

    pub async fn delete_upload(&self, id: &str) -> io::Result<()> {
        self.driver.delete(&upload_dir(id)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listing_of_the_blob_tree_gives_each_blob_its_size_and_last_use() {
        let (a, b) = ("a".repeat(64), "b".repeat(64));
        let files = vec![
            (format!("sha256/aa/{a}/data"), 100, 10),
            (format!("sha256/aa/{a}/data.touched"), 0, 50),
            (format!("sha256/aa/{a}/from/docker.io"), 2, 60),
            (format!("sha256/bb/{b}/data.touched"), 0, 70), // a marker without its blob
            ("sha256/zz/not-a-digest/data".to_string(), 5, 5),
            ("stray".to_string(), 1, 1),
        ];
        let blobs = blobs_in_tree(files);
        assert_eq!(blobs, vec![(format!("sha256:{a}").parse::<Digest>().unwrap(), 100, 50)]);
    }
}
