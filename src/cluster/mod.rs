//! Replicas on one bucket: which of them runs a fill, and how the others reach it.
//!
//! A fill's lease is an object in the bucket (`cluster/leases/fill-<digest>`) naming the replica
//! that fetches the blob from the upstream and the URL its peers reach it at. It is taken with a
//! create-only write (`If-None-Match: *`) and renewed every [`RENEW`] with a compare-and-swap
//! write (`If-Match: <etag>`) while the fill runs; the other replicas stream the blob from the
//! owner as it arrives. A lease whose version has not changed for [`EXPIRY`], by the observer's
//! own clock (so the replicas' clocks need not agree), belongs to a replica that is gone: it is
//! taken over with a compare-and-swap write, which exactly one replica wins.
//!
//! Requests between replicas carry an HMAC of the path and an expiry time, keyed from the token
//! signing key that all replicas read from the bucket.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{KeyInit, Mac};
use serde::{Deserialize, Serialize};

use crate::auth::AuthError;
use crate::config::{Config, TlsConfig};
use crate::lock;
use crate::metrics::Metrics;
use crate::oci::Digest;
use crate::storage::{unix_now, Condition, Store, Version};

mod members;
pub use members::ReplicaView;

/// How often an owner renews its lease.
pub const RENEW: Duration = Duration::from_secs(2);

/// A lease unchanged for this long is taken to belong to a replica that is gone.
pub const EXPIRY: Duration = Duration::from_secs(6);

/// Attempts to take or read a lease that keeps changing under our hands.
const CLAIM_ROUNDS: usize = 8;

/// The path other replicas fetch a blob's bytes at.
pub const PEER_PATH: &str = "/_regmirror/fills/";

/// The header that authenticates a request between replicas.
pub const PEER_AUTH: &str = "x-regmirror-peer";

/// How long a signed request between replicas stays valid (the replicas' clocks may differ by
/// up to this much).
const SIGNATURE_TTL: u64 = 120;

/// What a lease object holds.
#[derive(Serialize, Deserialize)]
struct LeaseRecord {
    /// The process holding it (a replica restarted at the same address is another holder).
    node: String,
    /// Where the other replicas reach the holder.
    url: String,
    /// Random per claim: two claims never write the same object.
    #[serde(default)]
    nonce: u64,
    /// Counts renewals, so every renewal changes the object.
    beat: u64,
}

impl LeaseRecord {
    fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// The outcome of asking for a lease.
pub enum Claim {
    /// This replica holds it until the `Lease` is dropped.
    Owned(Lease),
    /// Another replica holds it and is reachable at `url`.
    Held { url: String },
}

pub struct Cluster {
    store: Store,
    node: String,
    advertise: String,
    peer_key: [u8; 32],
    client: reqwest::Client,
    /// The version of each lease seen held by another replica, and since when (this replica's
    /// clock): a version that outlives `EXPIRY` is a lease nobody renews.
    observed: Mutex<HashMap<String, (Version, Instant)>>,
    metrics: Metrics,
    /// The replicas on the bucket as this one last read them (see `members`).
    members: members::Members,
    /// Set when the process ends: every lease held is given up at once.
    ending: tokio::sync::watch::Sender<bool>,
    /// Leases held right now (their renewal tasks running).
    held: tokio::sync::watch::Sender<usize>,
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

fn fill_lease(d: &Digest) -> String {
    format!("fill-{}-{}", d.algorithm().as_str(), d.hex())
}

impl Cluster {
    /// The cluster a configuration asks for (`[cluster] advertise`), `None` for a lone replica.
    pub async fn new(config: &Config, store: &Store, metrics: &Metrics) -> Result<Option<Arc<Cluster>>, AuthError> {
        let Some(advertise) = &config.advertise else { return Ok(None) };
        if advertise.starts_with("http://") && !matches!(config.tls, TlsConfig::Off) {
            tracing::warn!(advertise, "cluster.advertise is plain http while this replica serves TLS: blob bytes between replicas travel unencrypted");
        }
        let signing_key = crate::auth::signing_key(store).await?;
        let peer_key = hmac_sha256(&signing_key, b"regmirror replicas v1");
        let mut client = reqwest::Client::builder()
            .user_agent(concat!("regmirror/", env!("CARGO_PKG_VERSION"), " (replica)"))
            .connect_timeout(Duration::from_secs(5))
            .read_timeout(Duration::from_secs(120))
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none());
        // Replicas behind one name share one certificate; a CA regmirror made is trusted here too.
        if let TlsConfig::SelfSigned { dir, .. } = &config.tls {
            if let Ok(pem) = std::fs::read(dir.join(crate::tls::CA_CERT)) {
                if let Ok(ca) = reqwest::Certificate::from_pem(&pem) {
                    client = client.tls_certs_merge([ca]);
                }
            }
        }
        let client = client.build().map_err(|e| AuthError::SigningKey(format!("replica client: {e}")))?;
        Ok(Some(Arc::new(Cluster {
            store: store.clone(),
            node: hex::encode(rand::random::<[u8; 8]>()),
            advertise: advertise.clone(),
            peer_key,
            client,
            observed: Mutex::default(),
            metrics: metrics.clone(),
            members: members::Members::new(),
            ending: tokio::sync::watch::Sender::new(false),
            held: tokio::sync::watch::Sender::new(0),
        })))
    }

    /// What this replica writes into a lease it claims.
    fn record(&self, nonce: u64) -> LeaseRecord {
        LeaseRecord { node: self.node.clone(), url: self.advertise.clone(), nonce, beat: 0 }
    }

    /// Take the lease of the fill of `d`, or learn who holds it.
    pub async fn claim_fill(&self, d: &Digest) -> std::io::Result<Claim> {
        let claim = self.claim(&fill_lease(d)).await?;
        if let Claim::Owned(lease) = &claim {
            if lease.taken_over {
                self.metrics.fill_takeovers.inc();
            }
        }
        Ok(claim)
    }

    /// The eviction lease, when no other replica holds it: one eviction pass at a time for the
    /// whole bucket.
    pub async fn claim_eviction(&self) -> std::io::Result<Option<Lease>> {
        Ok(match self.claim("eviction").await? {
            Claim::Owned(lease) => Some(lease),
            Claim::Held { .. } => None,
        })
    }

    /// Whether the replica at `url` still holds and renews `d`'s fill lease (`false` once the
    /// lease is gone, has changed hands, or has not been renewed for `EXPIRY`).
    pub async fn fill_owner_alive(&self, d: &Digest, url: &str) -> std::io::Result<bool> {
        let name = fill_lease(d);
        Ok(match self.store.read_lease(&name).await? {
            Some((content, version)) => {
                let holder = serde_json::from_slice::<LeaseRecord>(&content).map(|r| r.url).unwrap_or_default();
                holder == url && !self.stale(&name, &version)
            }
            None => false,
        })
    }

    async fn claim(&self, name: &str) -> std::io::Result<Claim> {
        // The process ends: no new fill or eviction pass is taken on here.
        if *self.ending.borrow() {
            return Err(std::io::Error::other(crate::storage::Unavailable("this replica is shutting down".into())));
        }
        // Every claim writes a fresh nonce: two generations of a lease never look alike (an ETag
        // is the content's MD5 on most stores), so an observer never mistakes a new holder for
        // one that stopped renewing.
        let nonce: u64 = rand::random();
        // Each round ends in an answer unless another replica changed the lease in between; a
        // store that keeps contradicting itself is an error, not a reason to spin.
        for _ in 0..CLAIM_ROUNDS {
            if let Some(version) =
                self.store.write_lease(name, &self.record(nonce).to_bytes(), Condition::Absent).await?
            {
                lock(&self.observed).remove(name);
                return Ok(Claim::Owned(self.hold(name, version, self.record(nonce), false)));
            }
            let Some((content, version)) = self.store.read_lease(name).await? else {
                continue; // released in between: try to take it again
            };
            let holder = serde_json::from_slice::<LeaseRecord>(&content).ok();
            let url = holder.as_ref().map(|r| r.url.clone()).unwrap_or_default();
            // Left by this process (a lease released while it was read): nobody else uses it.
            // (Not matched by address: replicas wrongly given one `advertise` would steal each
            // other's leases; an earlier run of this replica's lease expires like any other.)
            let ours = holder.as_ref().is_some_and(|r| r.node == self.node);
            if !ours && !self.stale(name, &version) {
                return Ok(Claim::Held { url });
            }
            // Nobody renews it: take it over, unless another replica is quicker.
            if let Some(new) =
                self.store.write_lease(name, &self.record(nonce).to_bytes(), Condition::Unchanged(version)).await?
            {
                lock(&self.observed).remove(name);
                if !ours {
                    tracing::warn!(lease = name, previous = url, "took over a lease its replica stopped renewing");
                }
                return Ok(Claim::Owned(self.hold(name, new, self.record(nonce), !ours)));
            }
        }
        Err(std::io::Error::other(crate::storage::Unavailable(format!(
            "lease {name}: the object store answered inconsistently {CLAIM_ROUNDS} times"
        ))))
    }

    /// Whether `version` of lease `name` has been seen unchanged for `EXPIRY` (and remember it).
    fn stale(&self, name: &str, version: &Version) -> bool {
        let mut observed = lock(&self.observed);
        match observed.get(name) {
            Some((seen, since)) if seen == version => since.elapsed() >= EXPIRY,
            _ => {
                observed.insert(name.to_string(), (version.clone(), Instant::now()));
                false
            }
        }
    }

    /// Give up every lease this replica holds, as the process ends: the other replicas take its
    /// fills over at once rather than after [`EXPIRY`]. Bounded: the store may not answer.
    pub async fn release_leases(&self) {
        self.ending.send_replace(true);
        let mut held = self.held.subscribe();
        let _ = tokio::time::timeout(Duration::from_secs(5), held.wait_for(|n| *n == 0)).await;
    }

    /// Forget what was observed of `d`'s fill lease (the fill ended here).
    pub fn forget_fill(&self, d: &Digest) {
        lock(&self.observed).remove(&fill_lease(d));
    }

    /// Keep renewing a lease just taken, until the returned handle is dropped. A holder that
    /// cannot renew in time counts itself as having lost the lease before the others may take it
    /// over, so two replicas never both believe they hold it; so does one whose process ends.
    fn hold(&self, name: &str, version: Version, mut record: LeaseRecord, taken_over: bool) -> Lease {
        let lost = Arc::new(AtomicBool::new(false));
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let (released_tx, released) = tokio::sync::oneshot::channel::<()>();
        let (store, name, lost_flag) = (self.store.clone(), name.to_string(), lost.clone());
        let mut ending = self.ending.subscribe();
        let holding = Holding::new(&self.held);
        tokio::spawn(async move {
            let _holding = holding;
            let mut version = version;
            // The others may take the lease over EXPIRY after they last saw it change; this
            // holder counts it lost a beat before that if it could not renew it since.
            let mut deadline = tokio::time::Instant::now() + (EXPIRY - RENEW);
            let mut beats = tokio::time::interval_at(tokio::time::Instant::now() + RENEW, RENEW);
            beats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut given_up = false;
            let released_in_time = loop {
                tokio::select! {
                    _ = &mut stopped => break true,
                    // The process ends: the others need not wait for the lease to expire.
                    _ = ending_now(&mut ending) => {
                        given_up = true;
                        break true;
                    }
                    _ = beats.tick() => {}
                }
                record.beat += 1;
                let bytes = record.to_bytes();
                let renewal = store.write_lease(&name, &bytes, Condition::Unchanged(version.clone()));
                let now = tokio::time::Instant::now();
                match tokio::time::timeout(deadline.saturating_duration_since(now).min(RENEW), renewal).await {
                    Ok(Ok(Some(v))) => {
                        version = v;
                        deadline = tokio::time::Instant::now() + (EXPIRY - RENEW);
                    }
                    Ok(Ok(None)) => {
                        tracing::warn!(lease = name, "lost a lease to another replica (not renewed in time)");
                        break false;
                    }
                    _ if tokio::time::Instant::now() < deadline => {
                        tracing::warn!(lease = name, "renewing a lease failed; trying again");
                    }
                    _ => {
                        tracing::warn!(lease = name, "could not renew a lease in time; giving it up");
                        break false;
                    }
                }
            };
            if !released_in_time {
                lost_flag.store(true, Ordering::Relaxed);
                return;
            }
            // Released: removed, unless it has changed hands in the meantime. (An object store
            // has no conditional delete: a takeover in the instant between the two requests
            // loses its lease and the fill is decided again.)
            if let Ok(Some((_, current))) = store.read_lease(&name).await {
                if current == version {
                    let _ = store.remove_lease(&name).await;
                }
            }
            // Given up while the process ends: whatever still holds it acts as owner no more.
            if given_up {
                lost_flag.store(true, Ordering::Relaxed);
            }
            let _ = released_tx.send(());
        });
        Lease { lost, taken_over, stop: Some(stop), released }
    }

    /// Ask the replica at `url` for bytes of `d` from `offset` on (its running fill, or its store).
    pub async fn fetch_from_peer(&self, url: &str, d: &Digest, offset: u64) -> Result<reqwest::Response, PeerFailure> {
        let path = format!("{PEER_PATH}{d}");
        let mut req = self.client.get(format!("{url}{path}")).header(PEER_AUTH, self.sign(&path, unix_now()));
        if offset > 0 {
            req = req.header(reqwest::header::RANGE, format!("bytes={offset}-"));
        }
        let failed = |detail: String, refused: bool| {
            self.metrics.peer_failures.inc();
            PeerFailure { detail, refused }
        };
        let resp = req.send().await.map_err(|e| failed(crate::upstream::error_chain(&e.without_url()), false))?;
        let status = resp.status();
        if !status.is_success() {
            // 403: our signature is not theirs (another bucket or prefix, a signing key made
            // again, clocks apart).
            let refused = status == reqwest::StatusCode::FORBIDDEN;
            return Err(failed(format!("the replica at {url} answered {status}"), refused));
        }
        if resp.content_length().is_none() {
            return Err(failed(format!("the replica at {url} answered without a Content-Length"), false));
        }
        Ok(resp)
    }

    /// Count bytes that came from another replica.
    pub fn relayed(&self, n: u64) {
        self.metrics.relayed_bytes.inc_by(n);
    }

    /// A broken-off stream from another replica.
    pub fn peer_failed(&self) {
        self.metrics.peer_failures.inc();
    }

    fn signature(&self, path: &str, expires: u64) -> String {
        hex::encode(hmac_sha256(&self.peer_key, format!("{path}\n{expires}").as_bytes()))
    }

    fn sign(&self, path: &str, now: u64) -> String {
        let expires = now + SIGNATURE_TTL;
        format!("{expires}.{}", self.signature(path, expires))
    }

    /// Whether a request for `path` carries a valid signature of another replica.
    pub fn verify(&self, path: &str, header: Option<&str>) -> bool {
        let Some((expires, signature)) = header.and_then(|h| h.split_once('.')) else { return false };
        let Ok(expires) = expires.parse::<u64>() else { return false };
        let now = unix_now();
        if expires < now || expires > now + 2 * SIGNATURE_TTL {
            return false;
        }
        let expected = self.signature(path, expires);
        subtle::ConstantTimeEq::ct_eq(expected.as_bytes(), signature.as_bytes()).into()
    }
}

/// Why another replica's answer could not be used.
#[derive(Debug)]
pub struct PeerFailure {
    pub detail: String,
    /// It refused the request outright: asking again will not help.
    pub refused: bool,
}

/// Resolves once the process ends (never, should the cluster be gone first).
async fn ending_now(ending: &mut tokio::sync::watch::Receiver<bool>) {
    if ending.wait_for(|ending| *ending).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Counts a renewal task among the held leases from before it is spawned until it ends.
struct Holding(tokio::sync::watch::Sender<usize>);

impl Holding {
    fn new(held: &tokio::sync::watch::Sender<usize>) -> Holding {
        held.send_modify(|n| *n += 1);
        Holding(held.clone())
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// A lease this replica holds, renewed in the background; dropped, it is released.
pub struct Lease {
    lost: Arc<AtomicBool>,
    /// Taken over from a replica that stopped renewing it.
    taken_over: bool,
    /// Ends the renewals (dropping it does too).
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// Sent once the lease object is removed.
    released: tokio::sync::oneshot::Receiver<()>,
}

impl Lease {
    /// Give the lease up and wait until it is gone from the bucket (bounded: the store may not
    /// answer), so that a new claim by this process never races the removal of the old one.
    pub async fn release(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(RENEW, &mut self.released).await;
    }

    /// Another replica took the lease over (this one did not renew it in time).
    pub fn lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn signatures_bind_the_path_and_expire() {
        let store = Store::new(crate::storage::fs::FsDriver::new(tempfile::tempdir().unwrap().path()).unwrap());
        let cluster = Cluster {
            store,
            node: "a".into(),
            advertise: "http://127.0.0.1:1".into(),
            peer_key: [7; 32],
            client: reqwest::Client::new(),
            observed: Mutex::default(),
            metrics: Metrics::new(),
            members: members::Members::new(),
            ending: tokio::sync::watch::Sender::new(false),
            held: tokio::sync::watch::Sender::new(0),
        };
        let path = "/_regmirror/fills/sha256:00";
        let good = cluster.sign(path, unix_now());
        assert!(cluster.verify(path, Some(&good)));
        assert!(!cluster.verify("/_regmirror/fills/sha256:01", Some(&good)));
        assert!(!cluster.verify(path, Some(&cluster.sign(path, unix_now() - 2 * SIGNATURE_TTL))));
        assert!(!cluster.verify(path, Some("1.00")));
        assert!(!cluster.verify(path, None));
        let other = Cluster { peer_key: [8; 32], ..cluster };
        assert!(!other.verify(path, Some(&good)));
    }
}
