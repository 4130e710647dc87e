//! The pull-through cache: mirrored manifests (tag TTL, revalidation, stale serving, one upstream
//! request per manifest at a time) and blobs (one shared fill per digest, streamed to every
//! waiting client), the eviction order and pins.
//!
//! It answers in content, never in HTTP responses: a blob lookup says where the bytes are (stored,
//! or arriving through a fill), a manifest lookup gives bytes, media type, digest and how they
//! were obtained. The API layer turns either into a response. It works on narrow handles (the
//! store, the fills, the eviction index, the metrics) gathered in [`Cache`].

pub mod blobs;
pub mod evict;
pub mod fill;
pub mod flight;
pub mod lru;
pub mod manifests;
pub mod pins;
pub mod referrers;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, Namespaces};
use crate::metrics::Metrics;
use crate::oci::RepoName;
use crate::storage::{unix_now, Store};
use crate::upstream::{Upstream, UpstreamError};

pub use blobs::BlobSource;
pub use manifests::{Resolved, TagList};

/// A mirrored repository: where its content comes from and where it is kept.
#[derive(Clone)]
pub struct Mirrored {
    pub upstream: Arc<Upstream>,
    /// The repository's name on the upstream (`library/nginx`).
    pub remote: RepoName,
    /// Where the mirror keeps it (`docker.io/library/nginx`).
    pub local: RepoName,
}

/// The settings lookups follow.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    pub tag_ttl: Duration,
    pub serve_stale: bool,
    pub max_manifest_size: u64,
    /// Mirrored content above this is evicted.
    pub max_size: Option<u64>,
}

/// Unix seconds as the cache sees them. Real time, plus an offset tests may advance to age
/// tags without touching the store.
#[derive(Default)]
pub struct Clock {
    offset: AtomicU64,
}

impl Clock {
    pub fn now(&self) -> u64 {
        unix_now() + self.offset.load(Ordering::Relaxed)
    }

    /// Move this clock forward (tests).
    pub fn advance(&self, by: Duration) {
        self.offset.fetch_add(by.as_secs(), Ordering::Relaxed);
    }
}

/// The cache's handles, shared (a cheap `Clone`).
#[derive(Clone)]
pub struct Cache(Arc<Shared>);

pub struct Shared {
    pub store: Store,
    pub fills: fill::Fills,
    pub manifest_flights: manifests::ManifestFlights,
    pub referrer_flights: referrers::ReferrerFlights,
    pub lru: Arc<lru::Lru>,
    pub metrics: Metrics,
    pub policy: Policy,
    pub namespaces: Namespaces,
    pub clock: Clock,
    /// Wakes the eviction task (a fill finished).
    pub evict_wakeup: tokio::sync::Notify,
    /// One eviction pass at a time.
    pub evicting: tokio::sync::Mutex<()>,
    /// The eviction index is loaded.
    pub loaded: AtomicBool,
    /// When the store being over its bound was last logged (Unix seconds).
    over_limit_logged: AtomicU64,
    /// The last eviction that removed anything, for the status page.
    pub last_eviction: std::sync::Mutex<Option<EvictionRecord>>,
    /// When each repository's manifests were last pulled (Unix seconds), for the status page.
    pub last_pulls: std::sync::Mutex<std::collections::HashMap<RepoName, u64>>,
    /// The other replicas on the same bucket, when there are any (`[cluster] advertise`).
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

/// One eviction that removed something.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct EvictionRecord {
    /// Unix seconds.
    pub at: u64,
    pub blobs: u64,
    pub bytes: u64,
}

impl std::ops::Deref for Cache {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl Cache {
    pub fn new(
        config: &Config,
        store: Store,
        metrics: Metrics,
        cluster: Option<Arc<crate::cluster::Cluster>>,
    ) -> Cache {
        Cache(Arc::new(Shared {
            store,
            fills: Default::default(),
            manifest_flights: Default::default(),
            referrer_flights: Default::default(),
            lru: Arc::new(lru::Lru::new(&config.storage_root)),
            metrics,
            policy: Policy {
                tag_ttl: config.tag_ttl,
                serve_stale: config.serve_stale,
                max_manifest_size: config.max_manifest_size,
                max_size: config.max_size,
            },
            namespaces: config.namespaces(),
            clock: Clock::default(),
            evict_wakeup: tokio::sync::Notify::new(),
            evicting: tokio::sync::Mutex::new(()),
            loaded: AtomicBool::new(false),
            over_limit_logged: AtomicU64::new(0),
            last_eviction: Default::default(),
            last_pulls: Default::default(),
            cluster,
        }))
    }

    /// A client pulled a manifest of `repo`.
    pub fn pulled(&self, repo: &RepoName) {
        let now = self.clock.now();
        let mut pulls = crate::lock(&self.last_pulls);
        match pulls.get_mut(repo) {
            Some(t) => *t = now,
            None => {
                pulls.insert(repo.clone(), now);
            }
        }
    }

    /// Whether to log, now, that the store is over its bound: once a minute at most (downloads in
    /// progress can keep it over for a while; the metric says so all along).
    fn over_limit_reported(&self) -> bool {
        let now = unix_now();
        let last = self.over_limit_logged.load(Ordering::Relaxed);
        now >= last + 60
            && self.over_limit_logged.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    }

    /// Count a lookup of mirrored content by outcome.
    fn count(&self, m: &Mirrored, kind: &str, outcome: &str) {
        self.metrics.cache.with_label_values(&[kind, m.upstream.name(), outcome]).inc();
    }
}

/// How an answer was obtained (the `outcome` label of the cache metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Obtained {
    /// From the store, without asking the upstream for the content.
    Hit,
    /// Fetched from the upstream.
    Miss,
    /// The upstream confirmed (with a HEAD) that the cached tag is current.
    Revalidated,
    /// The upstream failed; the last known answer was served.
    Stale,
}

impl Obtained {
    pub fn label(self) -> &'static str {
        match self {
            Obtained::Hit => "hit",
            Obtained::Miss => "miss",
            Obtained::Revalidated => "revalidated",
            Obtained::Stale => "stale",
        }
    }
}

/// What a lookup was for, so "not found" can say what was not found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Content {
    Manifest,
    Blob,
    Repository,
}

/// Why the cache could not answer, by where it failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum CacheError {
    /// The upstream says the repository does not have it (404, or 401/403, which Docker Hub
    /// answers for a repository that does not exist).
    #[error("{cause}")]
    NotFound { what: Content, cause: UpstreamError },
    /// The upstream failed or misbehaved.
    #[error(transparent)]
    Upstream(UpstreamError),
    /// The store failed (a full disk, a broken mount).
    #[error("storage: {0}")]
    Storage(Arc<std::io::Error>),
    #[error("{0}")]
    Internal(String),
}

impl CacheError {
    /// An upstream failure while looking for `what`.
    pub fn upstream(what: Content, e: UpstreamError) -> CacheError {
        if e.is_absent() {
            CacheError::NotFound { what, cause: e }
        } else {
            CacheError::Upstream(e)
        }
    }

    /// The metrics label of the failure's cause.
    pub fn cause(&self) -> &'static str {
        match self {
            CacheError::NotFound { cause, .. } | CacheError::Upstream(cause) => cause.cause(),
            CacheError::Storage(_) => "storage",
            CacheError::Internal(_) => "internal",
        }
    }

    /// A failure of the upstream itself, not an answer about the content: stale content may
    /// be served instead.
    pub fn is_outage(&self) -> bool {
        matches!(self, CacheError::Upstream(e) if e.is_outage())
    }
}

impl From<std::io::Error> for CacheError {
    fn from(e: std::io::Error) -> Self {
        CacheError::Storage(Arc::new(e))
    }
}
