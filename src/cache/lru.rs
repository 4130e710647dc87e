//! The bound on mirrored content: least-recently-used order kept by regmirror itself (not
//! filesystem atime), persisted as an append-only access log, and an eviction pass whose cost is
//! proportional to what it evicts.
//!
//! Never evicted: private content (every blob linked into, or manifest stored in, a private
//! repository is *protected*), pinned images, and blobs being served or filled right now.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

use crate::oci::Digest;
use crate::storage::{fs::atomic_write, unix_now, Meta};

#[derive(Clone, Copy)]
struct Entry {
    atime: u64,
    seq: u64,
    size: u64,
}

#[derive(Default)]
struct Index {
    entries: HashMap<Digest, Entry>,
    /// (access time, sequence) → digest: the front is the least recently used.
    order: BTreeMap<(u64, u64), Digest>,
    protected: HashSet<Digest>,
    pinned: HashSet<Digest>,
    in_use: HashMap<Digest, usize>,
    /// Taken as victims, being deleted: nobody may start reading them.
    evicting: HashSet<Digest>,
    /// Subject → the manifests that refer to it: a referrer never outlives its subject here.
    referrers: HashMap<Digest, HashSet<Digest>>,
    /// When this replica last recorded a use of a blob in a store shared with other replicas.
    /// Kept apart from `entries`, whose times include the other replicas' uses: one replica's
    /// use must not keep another's from being recorded.
    shared: HashMap<Digest, u64>,
    /// Accesses not yet appended to the log.
    dirty: Vec<(Digest, u64)>,
    log_lines: u64,
    next_seq: u64,
}

impl Index {
    fn remove(&mut self, d: &Digest) -> Option<Entry> {
        let e = self.entries.remove(d)?;
        self.order.remove(&(e.atime, e.seq));
        Some(e)
    }

    fn insert(&mut self, d: Digest, atime: u64, size: u64) {
        self.remove(&d);
        self.next_seq += 1;
        let e = Entry { atime, seq: self.next_seq, size };
        self.order.insert((atime, e.seq), d.clone());
        self.entries.insert(d, e);
    }
}

/// What one eviction pass did.
#[derive(Debug, Default, PartialEq)]
pub struct Evicted {
    pub blobs: u64,
    pub bytes: u64,
}

pub struct Lru {
    index: Mutex<Index>,
    log_path: PathBuf,
    /// Woken whenever a victim is gone, for writers waiting to store the same digest again.
    eviction_done: tokio::sync::Notify,
}

/// Keeps a blob from eviction while it is being served.
pub struct InUse {
    lru: std::sync::Arc<Lru>,
    digest: Digest,
}

impl Drop for InUse {
    fn drop(&mut self) {
        let mut idx = self.lru.lock();
        if let Some(n) = idx.in_use.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                idx.in_use.remove(&self.digest);
            }
        }
    }
}

impl Lru {
    pub fn new(storage_root: &std::path::Path) -> Lru {
        Lru {
            index: Mutex::default(),
            log_path: storage_root.join(Meta::AccessLog.path()),
            eviction_done: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        crate::lock(&self.index)
    }

    /// Record that mirrored content was used now.
    pub fn touch(&self, d: &Digest, size: u64) {
        let mut idx = self.lock();
        if idx.protected.contains(d) {
            return;
        }
        let now = unix_now();
        idx.insert(d.clone(), now, size);
        idx.dirty.push((d.clone(), now));
    }

    /// Whether a use of `d` now is to be recorded in a store shared with other replicas: yes,
    /// unless this replica recorded one in the last `every` seconds or `d` is private content.
    pub fn due_for_sharing(&self, d: &Digest, every: u64) -> bool {
        let now = unix_now();
        let mut idx = self.lock();
        if idx.protected.contains(d) || idx.shared.get(d).is_some_and(|t| t + every > now) {
            return false;
        }
        // Only recent records matter: the older ones go before the map outgrows the index.
        if idx.shared.len() > idx.entries.len() + 1024 {
            idx.shared.retain(|_, t| *t + every > now);
        }
        idx.shared.insert(d.clone(), now);
        true
    }

    /// Bring the order up to date with a store other replicas share: blobs they added join it,
    /// blobs gone leave it, and a use anywhere (the store's time for a blob) counts like one here.
    pub fn refresh(&self, protected: HashSet<Digest>, blobs: Vec<(Digest, u64, u64)>) {
        let mut idx = self.lock();
        // Pushed through another replica since: out of the eviction order for good.
        for d in &protected {
            idx.remove(d);
        }
        idx.protected.extend(protected);
        let present: HashSet<&Digest> = blobs.iter().map(|b| &b.0).collect();
        let gone: Vec<Digest> =
            idx.entries.keys().filter(|d| !present.contains(d) && !idx.in_use.contains_key(*d)).cloned().collect();
        for d in gone {
            idx.remove(&d);
        }
        for (d, size, used) in blobs {
            if idx.protected.contains(&d) || idx.evicting.contains(&d) {
                continue;
            }
            let atime = idx.entries.get(&d).map_or(used, |e| e.atime.max(used));
            if idx.entries.get(&d).is_none_or(|e| e.atime != atime || e.size != size) {
                idx.insert(d, atime, size);
            }
        }
    }

    /// Mark content as private: it leaves the eviction order for good.
    pub fn protect(&self, d: &Digest) {
        let mut idx = self.lock();
        idx.remove(d);
        idx.protected.insert(d.clone());
    }

    /// `referrer` refers to `subject` (a signature, an SBOM): evicting the subject evicts it too.
    pub fn relate(&self, subject: &Digest, referrer: &Digest) {
        self.lock().referrers.entry(subject.clone()).or_default().insert(referrer.clone());
    }

    /// Replace the set of pinned digests (after a pin refresh).
    pub fn set_pinned(&self, pinned: HashSet<Digest>) {
        self.lock().pinned = pinned;
    }

    pub fn pinned_bytes(&self) -> u64 {
        let idx = self.lock();
        idx.pinned.iter().filter_map(|d| idx.entries.get(d)).map(|e| e.size).sum()
    }

    /// Keep `d` from eviction until the guard drops; `None` when it is being evicted right now
    /// (the caller treats it as not stored).
    pub fn hold(self: &std::sync::Arc<Self>, d: &Digest) -> Option<InUse> {
        let mut idx = self.lock();
        if idx.evicting.contains(d) {
            return None;
        }
        *idx.in_use.entry(d.clone()).or_default() += 1;
        Some(InUse { lru: self.clone(), digest: d.clone() })
    }

    /// A victim is gone (or was given back).
    pub fn evicted(&self, d: &Digest) {
        self.lock().evicting.remove(d);
        self.eviction_done.notify_waiters();
    }

    /// Hold `d` for a write (a push that may find the blob already stored): when it is being
    /// evicted right now, wait until it is gone, so the writer stores its own copy instead of
    /// trusting one about to disappear.
    pub async fn hold_for_write(self: &std::sync::Arc<Self>, d: &Digest) -> InUse {
        loop {
            let done = self.eviction_done.notified();
            if let Some(guard) = self.hold(d) {
                return guard;
            }
            done.await;
        }
    }

    /// Bytes a pass could evict now: mirrored content neither pinned nor in use.
    pub fn evictable_bytes(&self) -> u64 {
        let idx = self.lock();
        idx.entries
            .iter()
            .filter(|(d, _)| !idx.pinned.contains(*d) && !idx.in_use.contains_key(*d))
            .map(|(_, e)| e.size)
            .sum()
    }

    /// Bytes of mirrored content the index knows of.
    pub fn mirrored_bytes(&self) -> u64 {
        self.lock().entries.values().map(|e| e.size).sum()
    }

    /// Load state at start: protected digests (private content), access times from the log, and
    /// every other blob of the store (size, and its file time when the log has no access).
    pub fn load(&self, protected: HashSet<Digest>, blobs: Vec<(Digest, u64, u64)>) {
        // The log has seconds; its line order tells apart uses within one second.
        let mut atimes: HashMap<Digest, (u64, usize)> = HashMap::new();
        let mut lines = 0;
        if let Ok(text) = std::fs::read_to_string(&self.log_path) {
            for line in text.lines() {
                lines += 1;
                let Some((d, t)) = line.split_once(' ') else { continue };
                if let (Ok(d), Ok(t)) = (d.parse::<Digest>(), t.parse::<u64>()) {
                    atimes.insert(d, (t, lines as usize));
                }
            }
        }
        let mut idx = self.lock();
        idx.protected.extend(protected);
        idx.log_lines = lines;
        let mut known: Vec<(u64, usize, Digest, u64)> = blobs
            .into_iter()
            .filter(|(d, ..)| !idx.protected.contains(d) && !idx.entries.contains_key(d))
            .map(|(d, size, mtime)| {
                let (atime, order) = atimes.get(&d).copied().unwrap_or((mtime, 0));
                (atime, order, d, size)
            })
            .collect();
        known.sort_unstable_by_key(|k| (k.0, k.1));
        for (atime, _, d, size) in known {
            idx.insert(d, atime, size);
        }
    }

    /// Append pending accesses to the log; rewrite it compactly once it holds far more lines
    /// than entries. Called periodically and at shutdown.
    pub fn persist(&self) -> std::io::Result<()> {
        let (dirty, compact) = {
            let mut idx = self.lock();
            let dirty = std::mem::take(&mut idx.dirty);
            idx.log_lines += dirty.len() as u64;
            let compact = idx.log_lines > 4 * (idx.entries.len() as u64).max(1000);
            let snapshot: Option<Vec<(Digest, u64)>> = compact
                .then(|| idx.order.values().filter_map(|d| idx.entries.get(d).map(|e| (d.clone(), e.atime))).collect());
            if compact {
                idx.log_lines = snapshot.as_ref().map_or(0, |s| s.len() as u64);
            }
            (dirty, snapshot)
        };
        if let Some(dir) = self.log_path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        if let Some(all) = compact {
            let mut text = Vec::new();
            for (d, t) in all {
                writeln!(text, "{d} {t}")?;
            }
            return atomic_write(&self.log_path, &text, 0o644);
        }
        if dirty.is_empty() {
            return Ok(());
        }
        let mut f =
            std::io::BufWriter::new(std::fs::OpenOptions::new().create(true).append(true).open(&self.log_path)?);
        for (d, t) in dirty {
            writeln!(f, "{d} {t}")?;
        }
        f.flush()
    }

    /// Take least-recently-used candidates totalling at least `bytes`, skipping pinned and
    /// in-use content. They leave the index; the caller deletes them (or gives them back).
    pub fn take_victims(&self, bytes: u64) -> Vec<(Digest, u64)> {
        let mut idx = self.lock();
        let mut out = Vec::new();
        let mut skipped = Vec::new();
        let mut total = 0;
        while total < bytes {
            let Some((key, d)) = idx.order.pop_first() else { break };
            let Some(e) = idx.entries.get(&d).copied() else { continue };
            if idx.pinned.contains(&d) || idx.in_use.contains_key(&d) {
                skipped.push((key, d));
                continue;
            }
            idx.entries.remove(&d);
            idx.evicting.insert(d.clone());
            total += e.size;
            out.push((d.clone(), e.size));
            // Its referrers go with it (and theirs: a signature of an SBOM).
            let mut related: Vec<Digest> = idx.referrers.remove(&d).into_iter().flatten().collect();
            while let Some(r) = related.pop() {
                if idx.pinned.contains(&r) || idx.in_use.contains_key(&r) {
                    continue;
                }
                if let Some(re) = idx.remove(&r) {
                    idx.evicting.insert(r.clone());
                    total += re.size;
                    related.extend(idx.referrers.remove(&r).into_iter().flatten());
                    out.push((r, re.size));
                }
            }
        }
        for (key, d) in skipped {
            idx.order.insert(key, d);
        }
        out
    }

    /// Put a candidate back (it could not be deleted).
    pub fn give_back(&self, d: Digest, size: u64) {
        {
            let mut idx = self.lock();
            idx.evicting.remove(&d);
            let atime = unix_now();
            idx.insert(d, atime, size);
        }
        self.eviction_done.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> Digest {
        Digest::sha256_of(&[n])
    }

    #[test]
    fn least_recently_used_first_skipping_pinned_protected_and_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let lru = std::sync::Arc::new(Lru::new(dir.path()));
        lru.load(HashSet::from([d(9)]), vec![(d(1), 10, 100), (d(2), 10, 50), (d(3), 10, 200), (d(9), 10, 1)]);
        lru.set_pinned(HashSet::from([d(2)]));
        let _held = lru.hold(&d(3));
        // d(2) is oldest but pinned, d(3) in use, d(9) protected: only d(1) can go.
        assert_eq!(lru.take_victims(100), vec![(d(1), 10)]);
        // Newly used content is evictable too, after everything older that may go.
        lru.touch(&d(4), 5);
        assert_eq!(lru.take_victims(1), vec![(d(4), 5)]);
        assert_eq!(lru.take_victims(1), vec![]);
    }

    #[tokio::test]
    async fn a_writer_waits_for_an_eviction_in_progress() {
        let dir = tempfile::tempdir().unwrap();
        let lru = std::sync::Arc::new(Lru::new(dir.path()));
        lru.load(HashSet::new(), vec![(d(1), 10, 100)]);
        assert_eq!(lru.take_victims(1), vec![(d(1), 10)]);
        assert!(lru.hold(&d(1)).is_none(), "a victim being deleted was handed out");
        let waiting = tokio::spawn({
            let lru = lru.clone();
            async move { lru.hold_for_write(&d(1)).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        lru.evicted(&d(1));
        let _guard = waiting.await.unwrap();
        // Held now: no later pass may choose it.
        lru.touch(&d(1), 10);
        assert_eq!(lru.take_victims(100), vec![]);
    }

    #[test]
    fn a_subjects_referrers_leave_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let lru = Lru::new(dir.path());
        // d(1) is the oldest; d(2) refers to it, d(3) to d(2); d(4) is unrelated and newer.
        lru.load(HashSet::new(), vec![(d(1), 10, 100), (d(2), 1, 300), (d(3), 1, 400), (d(4), 10, 200)]);
        lru.relate(&d(1), &d(2));
        lru.relate(&d(2), &d(3));
        let mut taken: Vec<Digest> = lru.take_victims(1).into_iter().map(|(d, _)| d).collect();
        taken.sort();
        let mut expected = vec![d(1), d(2), d(3)];
        expected.sort();
        assert_eq!(taken, expected);
    }

    #[test]
    fn another_replicas_use_does_not_keep_this_ones_from_being_shared() {
        let dir = tempfile::tempdir().unwrap();
        let lru = Lru::new(dir.path());
        lru.load(HashSet::from([d(9)]), vec![(d(1), 1, 100), (d(9), 1, 100)]);
        // The bucket says another replica used d(1) just now.
        lru.refresh(HashSet::new(), vec![(d(1), 1, unix_now())]);
        assert!(lru.due_for_sharing(&d(1), 60), "this replica's use was hidden by another's");
        assert!(!lru.due_for_sharing(&d(1), 60), "recorded twice within a minute");
        assert!(lru.due_for_sharing(&d(1), 0));
        assert!(!lru.due_for_sharing(&d(9), 60), "private content entered the eviction order");
    }

    #[test]
    fn access_order_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let lru = Lru::new(dir.path());
        lru.load(HashSet::new(), vec![(d(1), 1, 100), (d(2), 1, 100)]);
        lru.touch(&d(1), 1);
        lru.persist().unwrap();
        let again = Lru::new(dir.path());
        again.load(HashSet::new(), vec![(d(1), 1, 100), (d(2), 1, 100)]);
        assert_eq!(again.take_victims(1), vec![(d(2), 1)]);
    }
}
