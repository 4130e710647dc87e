//! Which replicas share the bucket, for the operator's eyes (the status page and its JSON).
//!
//! Every replica writes a record of its own (`cluster/replicas/<node>`) every [`ANNOUNCE`] and
//! lists the others' with one LIST. A record whose time in the store has not changed for
//! [`GONE`], by this replica's clock (the replicas' clocks need not agree), belongs to a replica
//! that stopped without saying so; one that stays so for a day is removed. A replica that shuts
//! down cleanly removes its own.
//!
//! Nothing here decides anything: fills and eviction go by their leases alone.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::Cluster;
use crate::lock;
use crate::storage::unix_now;

/// How often a replica rewrites its record and reads the others'.
pub const ANNOUNCE: Duration = Duration::from_secs(10);

/// The longest a shutdown waits to take this replica's record out.
const WITHDRAW_WAIT: Duration = Duration::from_secs(5);

/// A record unchanged for this long (three announcements missed) is a replica that is gone.
const GONE: Duration = Duration::from_secs(35);

/// Records this old are removed.
const FORGOTTEN: u64 = 24 * 3600;

/// How far this replica's clock and the store's may disagree (the README asks for NTP, and
/// signed requests between replicas allow twice this).
const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// What a replica's record holds. Every field has a default, so a record written by another
/// version still lists that replica.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct Record {
    node: String,
    advertise: String,
    version: String,
    /// Unix seconds, the replica's own clock.
    started_at: u64,
}

/// A record as this replica last read it.
struct Seen {
    record: Record,
    /// The record's time in the store at the last listing.
    written_at: u64,
    /// When this replica last saw that time change.
    changed: Instant,
    /// How old the record already was when first seen (this replica's clock against the
    /// store's time, less what the two clocks may disagree by); zero once it changes.
    age_then: Duration,
}

impl Seen {
    fn unchanged_for(&self) -> Duration {
        self.changed.elapsed() + self.age_then
    }
}

pub(super) struct Members {
    started_at: u64,
    others: Mutex<HashMap<String, Seen>>,
    /// Whether this replica's record was taken out (a clean shutdown): then it is not written
    /// again. Held across each write and the removal, so neither overtakes the other.
    withdrawn: tokio::sync::Mutex<bool>,
}

impl Members {
    pub(super) fn new() -> Members {
        Members { started_at: unix_now(), others: Mutex::default(), withdrawn: tokio::sync::Mutex::new(false) }
    }

    /// A replica's record read for the first time: how old the store says it is tells whether
    /// it is current, so a record from an hour ago is shown gone at once.
    fn first_seen(&self, node: String, record: Record, written_at: u64, now: u64) {
        let age = Duration::from_secs(now.saturating_sub(written_at));
        let seen = Seen { record, written_at, changed: Instant::now(), age_then: age.saturating_sub(CLOCK_SKEW) };
        lock(&self.others).insert(node, seen);
    }
}

/// One replica as the status page shows it.
#[derive(Clone, Debug, Serialize)]
pub struct ReplicaView {
    /// Random per process: a replica restarted is a new node.
    pub node: String,
    /// The URL the other replicas reach it at (`cluster.advertise`); left out where the viewer
    /// may not see it.
    pub advertise: Option<String>,
    pub version: String,
    /// Unix seconds.
    pub started_at: u64,
    /// Since its record last changed, by this replica's clock (0 for this replica).
    pub last_seen_seconds: u64,
    /// Its record changed within the last 35 s.
    pub up: bool,
    /// The replica that answered.
    pub this: bool,
}

impl Cluster {
    fn own_record(&self) -> Record {
        Record {
            node: self.node.clone(),
            advertise: self.advertise.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at: self.members.started_at,
        }
    }

    /// Write this replica's record and, with `list`, read the others': one PUT, one LIST, and a
    /// GET for each replica not seen before.
    pub async fn announce(&self, list: bool) -> std::io::Result<()> {
        {
            let withdrawn = self.members.withdrawn.lock().await;
            if *withdrawn {
                return Ok(());
            }
            let own = serde_json::to_vec(&self.own_record()).map_err(std::io::Error::other)?;
            self.store.write_replica_record(&self.node, &own).await?;
        }
        if !list {
            return Ok(());
        }
        let now = unix_now();
        let mut listed = self.store.list_replica_records().await?;
        listed.retain(|(node, _)| *node != self.node);
        // Gone for a day, by this replica's own watch as well as by the store's time (a clock
        // a day off must not remove replicas that are up).
        let forgotten: Vec<String> = {
            let others = lock(&self.members.others);
            let old = |node: &String, written_at: u64| {
                now.saturating_sub(written_at) > FORGOTTEN && others.get(node).is_some_and(|s| s.unchanged_for() > GONE)
            };
            listed.iter().filter(|(node, at)| old(node, *at)).map(|(node, _)| node.clone()).collect()
        };
        for node in &forgotten {
            let _ = self.store.remove_replica_record(node).await;
        }
        listed.retain(|(node, _)| !forgotten.contains(node));
        let mut new = Vec::new();
        {
            let mut others = lock(&self.members.others);
            others.retain(|node, _| listed.iter().any(|(n, _)| n == node));
            for (node, written_at) in &listed {
                match others.get_mut(node) {
                    Some(seen) if seen.written_at != *written_at => {
                        seen.written_at = *written_at;
                        seen.changed = Instant::now();
                        seen.age_then = Duration::ZERO;
                    }
                    Some(_) => {}
                    None => new.push((node.clone(), *written_at)),
                }
            }
        }
        for (node, written_at) in new {
            let Some(bytes) = self.store.read_replica_record(&node).await? else { continue };
            let Ok(record) = serde_json::from_slice::<Record>(&bytes) else { continue };
            self.members.first_seen(node, record, written_at, now);
        }
        Ok(())
    }

    /// Remove this replica's record (a clean shutdown); it is not written again. Bounded: with
    /// the store away, the record is left to show this replica as gone.
    pub async fn withdraw(&self) {
        let removed = tokio::time::timeout(WITHDRAW_WAIT, async {
            let mut withdrawn = self.members.withdrawn.lock().await;
            *withdrawn = true;
            self.store.remove_replica_record(&self.node).await
        });
        match removed.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not remove this replica's record from the bucket"),
            Err(_) => {
                tracing::warn!("the bucket did not answer in time; this replica's record stays and shows it as gone")
            }
        }
    }

    /// Keep this replica's record current, every [`ANNOUNCE`]; with `list` (the status page is
    /// on), read the others' too.
    pub fn spawn_announcements(self: &std::sync::Arc<Self>, list: bool) {
        let cluster = self.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(ANNOUNCE);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                if let Err(e) = cluster.announce(list).await {
                    tracing::debug!(error = %e, "could not announce this replica in the bucket");
                }
            }
        });
    }

    /// The replicas on the bucket, this one first, then by address.
    pub fn replicas(&self) -> Vec<ReplicaView> {
        let own = self.own_record();
        let mut views = vec![ReplicaView {
            node: own.node,
            advertise: Some(own.advertise),
            version: own.version,
            started_at: own.started_at,
            last_seen_seconds: 0,
            up: true,
            this: true,
        }];
        let others = lock(&self.members.others);
        let mut rest: Vec<ReplicaView> = others
            .iter()
            .map(|(node, seen)| {
                let since = seen.unchanged_for();
                ReplicaView {
                    node: node.clone(),
                    advertise: Some(seen.record.advertise.clone()),
                    version: seen.record.version.clone(),
                    started_at: seen.record.started_at,
                    last_seen_seconds: since.as_secs(),
                    up: since < GONE,
                    this: false,
                }
            })
            .collect();
        // A replica restarted after a crash is a new node at the same address: the old record
        // would show it gone next to itself for a day.
        let up_at: Vec<Option<String>> =
            views.iter().chain(rest.iter()).filter(|v| v.up).map(|v| v.advertise.clone()).collect();
        rest.retain(|v| v.up || !up_at.contains(&v.advertise));
        rest.sort_by(|a, b| (&a.advertise, &a.node).cmp(&(&b.advertise, &b.node)));
        views.extend(rest);
        views
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(node: &str) -> Record {
        Record { node: node.into(), advertise: format!("https://{node}:5000"), version: "1".into(), started_at: 1 }
    }

    #[test]
    fn a_record_first_seen_long_after_it_was_written_is_a_replica_gone() {
        let members = Members::new();
        let now = unix_now();
        members.first_seen("old".into(), record("old"), now - 7200, now);
        members.first_seen("new".into(), record("new"), now - 5, now);
        // Clocks a minute apart: a record "from the future" is current.
        members.first_seen("ahead".into(), record("ahead"), now + 50, now);
        let others = lock(&members.others);
        assert!(others["old"].unchanged_for() >= Duration::from_secs(7200) - CLOCK_SKEW);
        assert!(others["old"].unchanged_for() > GONE);
        assert!(others["new"].unchanged_for() < GONE);
        assert!(others["ahead"].unchanged_for() < GONE);
    }
}
