//! Hourly savings for the last 24 hours, and when each repository was last pulled: sampled from
//! the metrics' counters, kept in the store, so a restart loses neither.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::lock;
use crate::app::AppState;
use crate::gc::GcRecord;
use crate::metrics::Metrics;
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
struct Counters {
    served: u64,
    upstream: u64,
    lookups: u64,
    answered: u64,
}

impl Counters {
    fn read(m: &Metrics) -> Counters {
        let sum = |family: &str, labels: &[(&str, &str)]| m.sum(family, labels) as u64;
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
    buckets: Mutex<VecDeque<Bucket>>,
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
    /// Add what the counters gained since the last sample to the hour of `now`.
    pub fn sample(&self, metrics: &Metrics, now: u64) {
        let current = Counters::read(metrics);
        let mut seen = lock(&self.seen);
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
        if buckets.back().is_none_or(|b| b.hour < hour) {
            buckets.push_back(Bucket { hour, ..Default::default() });
        }
        if let Some(b) = buckets.back_mut() {
            b.served_bytes += gained.served;
            b.upstream_bytes += gained.upstream;
            b.lookups += gained.lookups;
            b.answered_from_store += gained.answered;
        }
        let oldest = hour.saturating_sub((HOURS - 1) * 3600);
        while buckets.front().is_some_and(|b| b.hour < oldest) {
            buckets.pop_front();
        }
    }

    /// The last 24 hours, one bucket per hour (empty ones included), oldest first.
    pub fn last_day(&self, now: u64) -> Vec<Bucket> {
        let hour = now - now % 3600;
        let buckets = lock(&self.buckets);
        (0..HOURS)
            .rev()
            .map(|ago| {
                let h = hour.saturating_sub(ago * 3600);
                buckets.iter().find(|b| b.hour == h).cloned().unwrap_or(Bucket { hour: h, ..Default::default() })
            })
            .collect()
    }

    pub fn gc(&self) -> GcRecord {
        let g = lock(&self.gc);
        GcRecord { runs: g.runs, freed_bytes: g.freed_bytes, last_run: g.last_run }
    }
}

/// Take up the saved history and pull times (a missing or unreadable file starts empty).
pub async fn load(state: &AppState) {
    *lock(&state.status.history.gc) = crate::gc::record(&state.store).await;
    let saved: Saved = match state.store.read_meta(Meta::StatusHistory).await {
        Ok(Some(bytes)) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "the saved status history is unreadable; starting a new one");
            Saved::default()
        }),
        Ok(None) => Saved::default(),
        Err(e) => {
            tracing::warn!(error = %e, "could not read the saved status history");
            Saved::default()
        }
    };
    *lock(&state.status.history.buckets) = saved.buckets.into_iter().collect();
    let mut pulls = lock(&state.cache.last_pulls);
    for (name, at) in saved.last_pulls {
        if let Ok(name) = RepoName::parse(&name) {
            let t = pulls.entry(name).or_insert(at);
            *t = (*t).max(at);
        }
    }
}

/// Write the history and pull times to the store; read the gc record anew.
pub async fn save(state: &AppState) -> std::io::Result<()> {
    *lock(&state.status.history.gc) = crate::gc::record(&state.store).await;
    let saved = Saved {
        buckets: lock(&state.status.history.buckets).iter().cloned().collect(),
        last_pulls: lock(&state.cache.last_pulls).iter().map(|(k, v)| (k.to_string(), *v)).collect(),
    };
    let json = serde_json::to_vec(&saved).map_err(std::io::Error::other)?;
    state.store.write_meta(Meta::StatusHistory, &json).await
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
}
