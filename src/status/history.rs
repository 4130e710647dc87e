//! Hourly savings for the last 24 hours, and when each repository was last pulled: sampled from
//! the metrics' counters, kept in the store, so a restart loses neither.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::app::AppState;
use crate::gc::GcRecord;
use crate::lock;
use crate::metrics::{Metrics, Snapshot};
use crate::oci::RepoName;
use crate::storage::Meta;

const HOURS: u64 = 24;

/// One hour's traffic.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Bucket {
    /// The hour's start, Unix seconds.
    pub hour: u64,
    pub served_bytes: u64,
    pub upstream_bytes: u64,
    pub lookups: u64,
    pub answered_from_store: u64,
}

/// The counters' values at the last sample.
#[derive(Clone, Copy, Default)]
pub struct Counters {
    /// Blob bytes sent to clients.
    pub served: u64,
    /// Bytes received from upstreams.
    pub upstream: u64,
    /// Lookups of mirrored content.
    pub lookups: u64,
    /// Lookups answered from the store: outcome hit, revalidated or stale.
    pub answered: u64,
}

impl Counters {
    pub fn of(snapshot: &Snapshot) -> Counters {
        let sum = |family: &str, labels: &[(&str, &str)]| snapshot.sum(family, labels) as u64;
        let outcome = |o: &str| sum("regmirror_cache_requests_total", &[("outcome", o)]);
        Counters {
            served: sum("regmirror_served_bytes_total", &[]),
            upstream: sum("regmirror_upstream_bytes_total", &[]),
            lookups: sum("regmirror_cache_requests_total", &[]),
            answered: outcome("hit") + outcome("revalidated") + outcome("stale"),
        }
    }
}

#[derive(Default)]
pub struct History {
    /// By the hour's start.
    buckets: Mutex<BTreeMap<u64, Bucket>>,
    /// Counter values already added to the buckets (they start at zero with the process).
    seen: Mutex<Counters>,
    /// The store's gc record, as read last (the `gc` subcommand writes it from another process).
    gc: Mutex<GcRecord>,
}

/// What `meta/status.json` holds.
#[derive(Default, Serialize, Deserialize)]
struct Saved {
    buckets: Vec<Bucket>,
    last_pulls: HashMap<String, u64>,
}

impl History {
    /// Add what the counters gained since the last sample to the hour of `now`; returns the
    /// metrics as read, for the caller to show the same figures.
    pub fn sample(&self, metrics: &Metrics, now: u64) -> Snapshot {
        // Read under the lock: two samples at once must not hand back counts already added.
        let mut seen = lock(&self.seen);
        let snapshot = metrics.snapshot();
        let current = Counters::of(&snapshot);
        let gained = Counters {
            served: current.served.saturating_sub(seen.served),
            upstream: current.upstream.saturating_sub(seen.upstream),
            lookups: current.lookups.saturating_sub(seen.lookups),
            answered: current.answered.saturating_sub(seen.answered),
        };
        *seen = current;
        drop(seen);
        let hour = now - now % 3600;
        let mut buckets = lock(&self.buckets);
        let b = buckets.entry(hour).or_insert_with(|| Bucket { hour, ..Default::default() });
        b.served_bytes += gained.served;
        b.upstream_bytes += gained.upstream;
        b.lookups += gained.lookups;
        b.answered_from_store += gained.answered;
        keep_last_day(&mut buckets, hour);
        snapshot
    }

    /// The last 24 hours, one bucket per hour (empty ones included), oldest first.
    pub fn last_day(&self, now: u64) -> Vec<Bucket> {
        let hour = now - now % 3600;
        let buckets = lock(&self.buckets);
        (0..HOURS)
            .rev()
            .map(|ago| {
                let h = hour.saturating_sub(ago * 3600);
                buckets.get(&h).cloned().unwrap_or(Bucket { hour: h, ..Default::default() })
            })
            .collect()
    }

    pub fn gc(&self) -> GcRecord {
        let g = lock(&self.gc);
        GcRecord { runs: g.runs, freed_bytes: g.freed_bytes, last_run: g.last_run }
    }
}

/// Only the 24 hours up to `hour`: older ones, and ones "ahead" after the clock was set back.
fn keep_last_day(buckets: &mut BTreeMap<u64, Bucket>, hour: u64) {
    let oldest = hour.saturating_sub((HOURS - 1) * 3600);
    buckets.retain(|&h, _| h >= oldest && h <= hour);
}

/// Take up the saved history and pull times (a missing or unreadable file starts empty).
pub async fn load(state: &AppState) {
    *lock(&state.status.history.gc) = crate::gc::record(&state.store).await;
    let saved: Saved = match tokio::fs::read(saved_path(state)).await {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "the saved status history is unreadable; starting a new one");
            Saved::default()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Saved::default(),
        Err(e) => {
            tracing::warn!(error = %e, "could not read the saved status history");
            Saved::default()
        }
    };
    let mut buckets: BTreeMap<u64, Bucket> = saved.buckets.into_iter().map(|b| (b.hour, b)).collect();
    let now = crate::storage::unix_now();
    keep_last_day(&mut buckets, now - now % 3600);
    *lock(&state.status.history.buckets) = buckets;
    let mut pulls = lock(&state.cache.last_pulls);
    for (name, at) in saved.last_pulls {
        if let Ok(name) = RepoName::parse(&name) {
            let t = pulls.entry(name).or_insert(at);
            *t = (*t).max(at);
        }
    }
}

/// Where this replica keeps its history: on its own disk (replicas on one bucket each count
/// what they served).
fn saved_path(state: &AppState) -> std::path::PathBuf {
    state.config.storage_root.join(Meta::StatusHistory.path())
}

/// Write the history and pull times to the local disk; read the gc record anew.
pub async fn save(state: &AppState) -> std::io::Result<()> {
    *lock(&state.status.history.gc) = crate::gc::record(&state.store).await;
    let saved = Saved {
        buckets: lock(&state.status.history.buckets).values().cloned().collect(),
        last_pulls: lock(&state.cache.last_pulls).iter().map(|(k, v)| (k.to_string(), *v)).collect(),
    };
    let json = serde_json::to_vec(&saved).map_err(std::io::Error::other)?;
    let path = saved_path(state);
    tokio::task::spawn_blocking(move || {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        crate::storage::fs::atomic_write(&path, &json, 0o644)
    })
    .await
    .map_err(std::io::Error::other)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_land_in_their_hour_and_the_day_keeps_24_hours() {
        let metrics = Metrics::new();
        let history = History::default();
        let t0: u64 = 1_800_000_000; // an hour's start
        metrics.bytes_served.with_label_values(&["cache"]).inc_by(100);
        history.sample(&metrics, t0 + 10);
        metrics.bytes_served.with_label_values(&["cache"]).inc_by(50);
        history.sample(&metrics, t0 + 20);
        metrics.bytes_served.with_label_values(&["fill"]).inc_by(7);
        history.sample(&metrics, t0 + 3600 + 5);
        let day = history.last_day(t0 + 3600 + 5);
        assert_eq!(day.len(), 24);
        assert_eq!(day[23].hour, t0 + 3600);
        assert_eq!(day[23].served_bytes, 7);
        assert_eq!(day[22].served_bytes, 150);
        assert!(day[..22].iter().all(|b| b.served_bytes == 0));
        // A day later the old hours have gone.
        history.sample(&metrics, t0 + 30 * 3600);
        assert!(history.last_day(t0 + 30 * 3600).iter().all(|b| b.served_bytes == 0));
        assert_eq!(lock(&history.buckets).len(), 1);
    }

    #[test]
    fn a_clock_set_back_starts_counting_in_the_right_hour_again() {
        let metrics = Metrics::new();
        let history = History::default();
        let t0: u64 = 1_800_000_000; // an hour's start
        metrics.bytes_served.with_label_values(&["cache"]).inc_by(10);
        history.sample(&metrics, t0 + 5 * 3600); // the clock ran five hours ahead
        metrics.bytes_served.with_label_values(&["cache"]).inc_by(20);
        history.sample(&metrics, t0 + 60); // and was corrected
        let day = history.last_day(t0 + 60);
        assert_eq!(day[23].hour, t0);
        assert_eq!(day[23].served_bytes, 20, "counted in the hour it is now");
        assert_eq!(lock(&history.buckets).len(), 1, "the hour 'ahead' is gone");
    }

    #[test]
    fn concurrent_samples_count_every_byte_once() {
        let metrics = Metrics::new();
        let history = std::sync::Arc::new(History::default());
        let t0: u64 = 1_800_000_000;
        std::thread::scope(|s| {
            for _ in 0..4 {
                let (history, metrics) = (history.clone(), metrics.clone());
                s.spawn(move || {
                    for _ in 0..500 {
                        metrics.bytes_served.with_label_values(&["cache"]).inc_by(3);
                        history.sample(&metrics, t0 + 10);
                    }
                });
            }
        });
        history.sample(&metrics, t0 + 10);
        assert_eq!(history.last_day(t0 + 10)[23].served_bytes, 4 * 500 * 3);
    }
}
