//! A running fill's newest bytes in memory, and how the fill keeps pace with its readers.
//!
//! While clients are reading from memory, the fill keeps at most `PACE_LEAD` ahead of the fastest
//! one: running further ahead gains nobody much (the blob is not visible before its last byte) and
//! would push that client out of the window onto the disk. Pacing is bounded: a fill stops waiting
//! for good when its readers make no progress for `READER_STALL`, or once it has waited
//! `MAX_PACING` in all, so a slow or stuck client never holds the upstream transfer for long.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

/// Bytes of a fill kept in memory, at most, for clients a little behind the newest.
pub(super) const WINDOW_KEEP: usize = 2 << 20;

/// How far a fill may run ahead of its fastest reader; less than `WINDOW_KEEP`, so that reader is
/// served from memory.
const PACE_LEAD: u64 = 1 << 20;

/// A fill waiting for its readers gives up pacing when the fastest has not moved for this long.
const READER_STALL: Duration = Duration::from_millis(250);

/// The most a fill waits for its readers in all.
const MAX_PACING: Duration = Duration::from_secs(2);

/// What a fill and its readers share while it runs.
#[derive(Debug, Default)]
pub(super) struct Shared {
    pub(super) window: Mutex<Window>,
    /// A reader moved forward (or left).
    advanced: tokio::sync::Notify,
}

/// The newest chunks of a fill. Bytes before `start` are in the staging file: a chunk leaves the
/// window only once the file has it.
#[derive(Debug, Default)]
pub(super) struct Window {
    start: u64,
    pub(super) chunks: VecDeque<Bytes>,
    len: usize,
    /// Where each reader following the fill now has got to.
    readers: Vec<Arc<AtomicU64>>,
    /// The fill has ended; its memory is released.
    pub(super) closed: bool,
}

/// Where a reader finds the bytes at its position.
pub(super) enum Source {
    Memory(Bytes),
    /// In the staging file: at most this many bytes from there on.
    File(usize),
    /// The fill has ended: its outcome is (or is about to be) published.
    Closed,
}

impl Shared {
    pub(super) fn window(&self) -> std::sync::MutexGuard<'_, Window> {
        crate::lock(&self.window)
    }

    /// Wait, until `deadline` at most, while the fastest reader reading from memory is more than
    /// `PACE_LEAD` behind `received`. False when that reader stalled or the deadline passed.
    async fn wait_for_readers(&self, received: u64, deadline: Instant) -> bool {
        let mut seen = None;
        let mut stall_at = Instant::now() + READER_STALL;
        loop {
            let furthest = self.window().readers.iter().map(|r| r.load(Ordering::Relaxed)).max();
            let Some(furthest) = furthest else { return true };
            let lead = received.saturating_sub(furthest);
            // Close enough, or so far behind that it reads from the file anyway.
            if lead <= PACE_LEAD || lead > WINDOW_KEEP as u64 {
                return true;
            }
            let now = Instant::now();
            if seen != Some(furthest) {
                seen = Some(furthest);
                stall_at = now + READER_STALL;
            }
            let until = stall_at.min(deadline);
            if now >= until {
                return false;
            }
            let _ = tokio::time::timeout_at(until.into(), self.advanced.notified()).await;
        }
    }
}

/// A fill's side of pacing: how long it may still wait for its readers.
pub(super) struct Pacing {
    left: Duration,
    active: bool,
}

impl Pacing {
    pub(super) fn new() -> Self {
        Pacing { left: MAX_PACING, active: true }
    }

    pub(super) async fn keep_pace(&mut self, shared: &Shared, received: u64) {
        if !self.active {
            return;
        }
        let started = Instant::now();
        let kept = shared.wait_for_readers(received, started + self.left).await;
        self.left = self.left.saturating_sub(started.elapsed());
        self.active = kept && !self.left.is_zero();
    }
}

/// A reader's place among a fill's readers, given up when it is dropped.
pub(super) struct Reader {
    shared: Arc<Shared>,
    pos: Arc<AtomicU64>,
}

impl Reader {
    pub(super) fn join(shared: &Arc<Shared>, pos: u64) -> Self {
        let pos = Arc::new(AtomicU64::new(pos));
        shared.window().readers.push(pos.clone());
        Reader { shared: shared.clone(), pos }
    }

    pub(super) fn advanced_to(&self, pos: u64) {
        self.pos.store(pos, Ordering::Relaxed);
        self.shared.advanced.notify_one();
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.shared.window().readers.retain(|r| !Arc::ptr_eq(r, &self.pos));
        self.shared.advanced.notify_one();
    }
}

impl Window {
    /// Add the newest chunk. A chunk leaves once the file has it and either no reader still
    /// needs it or the window is over `WINDOW_KEEP`.
    pub(super) fn push(&mut self, chunk: Bytes, on_disk: u64) {
        self.len += chunk.len();
        self.chunks.push_back(chunk);
        let slowest = self.readers.iter().map(|r| r.load(Ordering::Relaxed)).min().unwrap_or(u64::MAX);
        while let Some(front) = self.chunks.front() {
            let front_end = self.start + front.len() as u64;
            let wanted = slowest < front_end && self.len - front.len() < WINDOW_KEEP;
            if wanted || front_end > on_disk {
                break;
            }
            self.len -= front.len();
            self.start = front_end;
            self.chunks.pop_front();
        }
    }

    /// Up to `want` bytes at `pos`, which must be below what has been received.
    pub(super) fn locate(&self, pos: u64, want: usize) -> Source {
        if self.closed {
            return Source::Closed;
        }
        if pos < self.start {
            return Source::File(want.min((self.start - pos) as usize));
        }
        let mut chunk_start = self.start;
        for chunk in &self.chunks {
            let chunk_end = chunk_start + chunk.len() as u64;
            if pos < chunk_end {
                let from = (pos - chunk_start) as usize;
                return Source::Memory(chunk.slice(from..chunk.len().min(from + want)));
            }
            chunk_start = chunk_end;
        }
        Source::Memory(Bytes::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(n: usize) -> Bytes {
        Bytes::from(vec![0u8; n])
    }

    #[test]
    fn the_window_keeps_what_readers_need_and_only_what_is_on_disk_leaves() {
        const MIB: usize = 1 << 20;
        let mut w = Window::default();
        // No reader: a chunk leaves as soon as the file has it, not before.
        w.push(chunk(MIB), 0);
        w.push(chunk(MIB), MIB as u64);
        assert_eq!((w.start, w.len), (MIB as u64, MIB));
        // A reader at 1.5 MiB holds the chunk it is in, and everything after it.
        let reader = Arc::new(AtomicU64::new(3 * MIB as u64 / 2));
        w.readers.push(reader.clone());
        w.push(chunk(MIB), 3 * MIB as u64);
        assert_eq!(w.start, MIB as u64);
        assert!(matches!(w.locate(3 * MIB as u64 / 2, MIB), Source::Memory(b) if b.len() == MIB / 2));
        // ... but not beyond WINDOW_KEEP.
        for n in 3..8 {
            w.push(chunk(MIB), (n * MIB) as u64);
        }
        assert!(w.len <= WINDOW_KEEP + MIB);
        // Bytes before the window come from the file, never past where the window starts.
        let start = w.start;
        assert!(matches!(w.locate(start - 10, MIB), Source::File(10)));
        assert!(matches!(w.locate(start, 100), Source::Memory(b) if b.len() == 100));
    }
}
