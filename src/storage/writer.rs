//! Staged blob writes. A blob's bytes go to two threads at once — one hashes, one writes the
//! staging file — so the task receiving them (a fill reading the upstream, an upload reading its
//! request body) never waits on either unless one falls `LANE_BUDGET` bytes behind. Chunks are
//! shared (`Bytes`), not copied on the way to the threads.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::{CommitError, StagedFile, Store};
use crate::oci::{Algorithm, Digest, Hasher};

/// How far (in bytes) the hasher or the file may fall behind the receiver before it waits: the
/// memory a blob write holds, whatever the blob's size.
const LANE_BUDGET: usize = 4 << 20;

/// Stack of a lane thread: hashing and writing need little.
const LANE_STACK: usize = 256 << 10;

/// A blob being written: hashed and written to a staging file as it streams.
pub struct BlobWriter {
    store: Store,
    path: String,
    hasher: Lane<Digest>,
    file: Lane<()>,
    /// Bytes accepted so far.
    written: u64,
    /// Bytes in the staging file (readers may read up to here), advanced by the file thread.
    on_disk: Arc<AtomicU64>,
    /// Committed or aborted: the staging file is gone, or is the blob now.
    settled: bool,
}

impl BlobWriter {
    pub(super) fn new(
        store: Store,
        path: String,
        mut file: Box<dyn StagedFile>,
        algorithm: Algorithm,
    ) -> io::Result<Self> {
        let on_disk = Arc::new(AtomicU64::new(0));
        let progress = on_disk.clone();
        let file = Lane::spawn("blob-write", move |mut input| {
            while let Some(chunk) = input.next() {
                progress.store(file.append(&chunk)?, Ordering::Release);
                input.done(&chunk);
            }
            progress.store(file.finish()?, Ordering::Release);
            Ok(())
        })?;
        let hasher = Lane::spawn("blob-hash", move |mut input| {
            let mut h = Hasher::new(algorithm);
            while let Some(chunk) = input.next() {
                h.update(&chunk);
                input.done(&chunk);
            }
            Ok(h.finish())
        })?;
        Ok(BlobWriter { store, path, hasher, file, written: 0, on_disk, settled: false })
    }

    /// Accept the next chunk. Waits only while the hasher or the file is `LANE_BUDGET` behind.
    pub async fn write(&mut self, chunk: Bytes) -> io::Result<()> {
        if chunk.is_empty() {
            return Ok(());
        }
        self.written += chunk.len() as u64;
        if self.file.send(chunk.clone()).await.is_err() {
            return Err(self.file.failure().await);
        }
        if self.hasher.send(chunk).await.is_err() {
            return Err(self.hasher.failure().await);
        }
        Ok(())
    }

    /// Bytes readers can read from the staging file now.
    pub fn on_disk(&self) -> u64 {
        self.on_disk.load(Ordering::Acquire)
    }

    /// Bytes accepted so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The staging path, for readers that follow a write as it grows.
    pub fn staging_path(&self) -> &str {
        &self.path
    }

    /// Verify digest (and size, when known), wait for the file, make it durable and move it into
    /// place. On any failure the staged bytes are deleted.
    pub async fn commit(mut self, expected: &Digest, expected_size: Option<u64>) -> Result<u64, CommitError> {
        let outcome = async {
            let actual = self.hasher.finish().await?;
            if let Some(size) = expected_size.filter(|&s| s != self.written) {
                return Err(CommitError::SizeMismatch { expected: size, actual: self.written });
            }
            if &actual != expected {
                return Err(CommitError::DigestMismatch { expected: expected.clone(), actual });
            }
            self.file.finish().await?;
            self.store.publish(&self.path, expected).await?;
            Ok(self.written)
        }
        .await;
        match outcome {
            Ok(n) => {
                self.settled = true;
                Ok(n)
            }
            Err(e) => {
                self.abort().await;
                Err(e)
            }
        }
    }

    /// Give up: the staged bytes are deleted.
    pub async fn abort(mut self) {
        let _ = self.file.finish().await;
        let _ = self.store.driver.delete(&self.path).await;
        self.settled = true;
    }
}

impl Drop for BlobWriter {
    /// A write dropped half way (a client went away, an error was returned early) leaves nothing
    /// in the staging area.
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        self.store.driver.discard_staged(&self.path);
    }
}

/// One consumer of a blob's chunks, on a thread of its own: chunks arrive in order, and the sender
/// waits once `LANE_BUDGET` bytes are queued. Not a thread of tokio's blocking pool: a write lives
/// as long as its upload or fill, and hundreds of them must not starve the pool that serves files.
struct Lane<T> {
    tx: Option<mpsc::UnboundedSender<Bytes>>,
    budget: Arc<Semaphore>,
    result: Option<oneshot::Receiver<io::Result<T>>>,
}

/// The consumer's end of a `Lane`.
struct LaneInput {
    rx: mpsc::UnboundedReceiver<Bytes>,
    budget: Arc<Semaphore>,
}

/// The lane's consumer thread has stopped (with an error, or panicked).
struct LaneClosed;

fn permits(chunk: &Bytes) -> u32 {
    chunk.len().min(LANE_BUDGET) as u32
}

impl<T: Send + 'static> Lane<T> {
    fn spawn(name: &str, work: impl FnOnce(LaneInput) -> io::Result<T> + Send + 'static) -> io::Result<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (done, result) = oneshot::channel();
        let budget = Arc::new(Semaphore::new(LANE_BUDGET));
        let input = LaneInput { rx, budget: budget.clone() };
        std::thread::Builder::new().name(name.into()).stack_size(LANE_STACK).spawn(move || {
            // However the work ends (a panic included), a sender waiting for budget must wake up.
            struct CloseOnExit(Arc<Semaphore>);
            impl Drop for CloseOnExit {
                fn drop(&mut self) {
                    self.0.close();
                }
            }
            let _close = CloseOnExit(input.budget.clone());
            let _ = done.send(work(input));
        })?;
        Ok(Lane { tx: Some(tx), budget, result: Some(result) })
    }

    async fn send(&mut self, chunk: Bytes) -> Result<(), LaneClosed> {
        let permit = self.budget.acquire_many(permits(&chunk)).await.map_err(|_| LaneClosed)?;
        permit.forget();
        let tx = self.tx.as_ref().ok_or(LaneClosed)?;
        tx.send(chunk).map_err(|_| LaneClosed)
    }

    /// Let the consumer drain what it has and return its result.
    async fn finish(&mut self) -> io::Result<T> {
        self.tx.take();
        match self.result.take() {
            Some(result) => result.await.unwrap_or_else(|_| Err(io::Error::other("blob write thread panicked"))),
            None => Err(io::Error::other("blob write already finished")),
        }
    }

    /// Why the consumer stopped early.
    async fn failure(&mut self) -> io::Error {
        match self.finish().await {
            Err(e) => e,
            Ok(_) => io::Error::other("blob write stopped early"),
        }
    }
}

impl LaneInput {
    fn next(&mut self) -> Option<Bytes> {
        self.rx.blocking_recv()
    }

    /// The chunk has been consumed: its bytes no longer count against the budget.
    fn done(&self, chunk: &Bytes) {
        self.budget.add_permits(permits(chunk) as usize);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::fs::FsDriver;

    fn digest_of(data: &[u8]) -> Digest {
        let mut h = Hasher::new(Algorithm::Sha256);
        h.update(data);
        h.finish()
    }

    #[tokio::test]
    async fn chunks_of_any_size_are_stored_whole_and_verified() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(FsDriver::new(dir.path()).unwrap());
        // More than the lane budget, in uneven chunks, so the sender has to wait for the threads.
        let data: Vec<u8> = (0..(LANE_BUDGET * 3 + 12345)).map(|i| (i * 7 % 251) as u8).collect();
        let d = digest_of(&data);
        let mut w = store.begin_blob(Algorithm::Sha256).await.unwrap();
        let mut pos = 0;
        for size in [1usize, 4096, 65536 + 3, LANE_BUDGET + 1].iter().cycle() {
            if pos == data.len() {
                break;
            }
            let end = (pos + size).min(data.len());
            w.write(Bytes::copy_from_slice(&data[pos..end])).await.unwrap();
            pos = end;
        }
        assert_eq!(w.commit(&d, Some(data.len() as u64)).await.unwrap(), data.len() as u64);
        assert_eq!(store.read_blob(&d).await.unwrap().unwrap(), data);
    }

    #[tokio::test]
    async fn a_write_dropped_half_way_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(FsDriver::new(dir.path()).unwrap());
        let mut w = store.begin_blob(Algorithm::Sha256).await.unwrap();
        w.write(Bytes::from(vec![7u8; 3 << 20])).await.unwrap();
        assert_eq!(store.driver.list("tmp").await.unwrap().len(), 1);
        drop(w);
        assert!(store.driver.list("tmp").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_mismatch_keeps_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(FsDriver::new(dir.path()).unwrap());
        let d = digest_of(b"expected");
        let mut w = store.begin_blob(Algorithm::Sha256).await.unwrap();
        w.write(Bytes::from_static(b"something else")).await.unwrap();
        assert!(matches!(w.commit(&d, None).await, Err(CommitError::DigestMismatch { .. })));
        let mut w = store.begin_blob(Algorithm::Sha256).await.unwrap();
        w.write(Bytes::from_static(b"expected")).await.unwrap();
        assert!(matches!(w.commit(&d, Some(9)).await, Err(CommitError::SizeMismatch { .. })));
        assert!(store.read_blob(&d).await.unwrap().is_none());
        assert!(store.driver.list("tmp").await.unwrap().is_empty(), "staged bytes are deleted");
    }
}
