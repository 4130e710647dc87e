//! Referrers of mirrored images (signatures, SBOMs, attestations): the upstream's referrers API,
//! or, where it has none (404 on the endpoint, as distribution 2.8 answers), the tag-schema
//! fallback the spec defines (a tag `<alg>-<hex>` holding an index of referrers). The answer is
//! kept like a tag: trusted for `tag_ttl`, asked again after, served stale when the upstream fails,
//! one upstream request at a time per subject.

use std::sync::Arc;

use serde_json::Value;

use super::flight::Flights;
use super::manifests::fetch;
use super::{Cache, CacheError, Content, Mirrored, Obtained};
use crate::oci::{Digest, RepoName, OCI_INDEX};
use crate::storage::UpstreamReferrers;
use crate::upstream::UpstreamError;

/// The referrers of a subject, unfiltered, and how the answer was obtained.
pub struct Referrers {
    /// Descriptors as the upstream listed them.
    pub manifests: Vec<Value>,
    pub obtained: Obtained,
}

/// (upstream, repository, subject).
type Key = (String, RepoName, Digest);

pub type ReferrerFlights = Flights<Key, Result<Arc<Referrers>, CacheError>>;

impl Cache {
    /// The referrers of `subject` in a mirrored repository.
    pub async fn referrers(&self, m: &Mirrored, subject: &Digest) -> Result<Arc<Referrers>, CacheError> {
        let found = self.find_referrers(m, subject).await;
        self.count(m, "referrers", found.as_ref().map_or("error", |r| r.obtained.label()));
        found
    }

    async fn find_referrers(&self, m: &Mirrored, subject: &Digest) -> Result<Arc<Referrers>, CacheError> {
        if let Some(fresh) = self.fresh_referrers(&m.local, subject).await? {
            return Ok(Arc::new(fresh));
        }
        let key = (m.upstream.name().to_string(), m.remote.clone(), subject.clone());
        let (cache, m, subject) = (self.clone(), m.clone(), subject.clone());
        self.referrer_flights
            .run(key, move || async move { refresh(&cache, &m, &subject).await.map(Arc::new) })
            .await
            .unwrap_or_else(|| Err(CacheError::Internal("referrers fetch task failed".into())))
    }

    /// The stored answer while it is younger than `tag_ttl`.
    async fn fresh_referrers(&self, local: &RepoName, subject: &Digest) -> Result<Option<Referrers>, CacheError> {
        let ttl = self.policy.tag_ttl.as_secs();
        Ok(self
            .store
            .upstream_referrers(local, subject)
            .await?
            .filter(|r| self.clock.now().saturating_sub(r.fetched_at) < ttl)
            .map(|r| Referrers { manifests: r.manifests, obtained: Obtained::Hit }))
    }
}

async fn refresh(cache: &Cache, m: &Mirrored, subject: &Digest) -> Result<Referrers, CacheError> {
    if let Some(fresh) = cache.fresh_referrers(&m.local, subject).await? {
        return Ok(fresh);
    }
    let known = cache.store.upstream_referrers(&m.local, subject).await?;
    match ask_upstream(cache, m, subject).await {
        Ok(manifests) => {
            let obtained = match &known {
                Some(k) if k.manifests == manifests => Obtained::Revalidated,
                _ => Obtained::Miss,
            };
            let record = UpstreamReferrers { manifests, fetched_at: cache.clock.now() };
            cache.store.set_upstream_referrers(&m.local, subject, &record).await?;
            Ok(Referrers { manifests: record.manifests, obtained })
        }
        Err(e) => match known {
            Some(k) if cache.policy.serve_stale && e.is_outage() => {
                tracing::warn!(upstream = m.upstream.name(), repository = %m.local, %subject, error = %e, "upstream failed; serving the last known referrers");
                Ok(Referrers { manifests: k.manifests, obtained: Obtained::Stale })
            }
            _ => Err(CacheError::upstream(Content::Manifest, e)),
        },
    }
}

/// The upstream's list: its referrers API, else the tag schema's index, else nothing.
async fn ask_upstream(cache: &Cache, m: &Mirrored, subject: &Digest) -> Result<Vec<Value>, UpstreamError> {
    let limit = cache.policy.max_manifest_size;
    let upstream = &m.upstream;
    let index = match upstream.referrers(&m.remote, subject).await {
        Ok(resp) => upstream.read_limited(resp, limit, "referrers list").await?,
        Err(e) if e.is_not_found() => {
            let tag = format!("{}-{}", subject.algorithm().as_str(), subject.hex());
            match fetch(upstream, &m.remote, &tag, None, OCI_INDEX, limit).await {
                Ok(f) => f.bytes,
                Err(e) if e.is_absent() => return Ok(Vec::new()),
                Err(e) => return Err(e),
            }
        }
        Err(e) => return Err(e),
    };
    let parsed: Value = serde_json::from_slice(&index).map_err(|e| UpstreamError::Reset {
        upstream: upstream.name().to_string(),
        detail: format!("referrers of {subject} are not JSON: {e}"),
    })?;
    match parsed.get("manifests") {
        Some(Value::Array(list)) => {
            Ok(list.iter().filter(|d| d.get("digest").is_some_and(Value::is_string)).cloned().collect())
        }
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(_) => Err(upstream.failed(UpstreamError::Reset {
            upstream: upstream.name().to_string(),
            detail: format!("referrers of {subject}: `manifests` is not a list"),
        })),
    }
}
