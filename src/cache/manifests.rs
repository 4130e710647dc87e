//! Mirrored manifests. By digest: immutable, cached for good. By tag: the tag→digest answer is
//! trusted for `tag_ttl`, then revalidated with a HEAD (free against Docker Hub's rate limit); when
//! the upstream fails, the last known digest is served if `serve_stale` allows.
//!
//! Every trip to the upstream is a single flight per (upstream, repository, reference, accepted
//! types): 200 nodes rolling out a new tag at once cost one counted pull, not 200.

use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;

use super::flight::Flights;
use super::{Cache, CacheError, Clock, Content, Mirrored, Obtained};
use crate::oci::{
    acceptable, describe, upstream_accept, Algorithm, Digest, ManifestMeta, Reference, RepoName, ACCEPT_ALL,
};
use crate::storage::{Store, TagRecord};
use crate::upstream::{Upstream, UpstreamError};

/// Largest tags list read from an upstream (Docker Hub pages hold at most 10,000 tags).
const TAGS_LIMIT: u64 = 8 << 20;

/// A manifest as the cache has it: exact bytes, meta, digest, and how it was obtained.
pub struct Resolved {
    pub digest: Digest,
    pub meta: ManifestMeta,
    pub bytes: Vec<u8>,
    pub obtained: Obtained,
}

/// What identifies one upstream manifest request.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FlightKey {
    upstream: String,
    remote: RepoName,
    reference: String,
    accept: String,
}

pub type ManifestFlights = Flights<FlightKey, Result<Arc<Resolved>, CacheError>>;

impl Cache {
    /// A mirrored manifest for a client whose `Accept` header is `client_accept`: from the store
    /// while it is fresh, otherwise through the one upstream request for it. Whether the client
    /// may be given its media type is the caller's decision.
    pub async fn manifest(
        &self,
        m: &Mirrored,
        reference: &Reference,
        client_accept: Option<&str>,
    ) -> Result<Arc<Resolved>, CacheError> {
        let found = match resolve(self, m, reference).await {
            // What the tag points to is not a type this client reads. The upstream, asked with the
            // client's own Accept, may have another answer for it (distribution picks one platform
            // of a manifest list for a client that cannot read lists): ask it, but never let that
            // narrower answer stand for the tag for everyone.
            Ok(r) if r.obtained != Obtained::Hit && !acceptable(&r.meta.media_type, client_accept) => match reference {
                Reference::Tag(_) => narrow(self, m, reference, client_accept).await,
                Reference::Digest(_) => Ok(r),
            },
            found => found,
        };
        match &found {
            Ok(r) => {
                self.count(m, "manifest", r.obtained.label());
                self.lru.touch(&r.digest, r.bytes.len() as u64);
            }
            Err(_) => self.count(m, "manifest", "error"),
        }
        found
    }

    /// Keep a manifest fetched from the upstream; a referrer is tied to its subject for eviction.
    pub(crate) async fn store_manifest(&self, local: &RepoName, f: &Fetched) -> std::io::Result<()> {
        self.store.put_manifest(local, &f.digest, &f.meta, &f.bytes).await?;
        if let Some(subject) = &f.meta.subject {
            self.lru.relate(subject, &f.digest);
        }
        Ok(())
    }

    /// The tags of a mirrored repository: the upstream's page, or the cached tags when it is down.
    pub async fn tags(&self, m: &Mirrored, n: Option<&str>, last: Option<&str>) -> Result<TagList, CacheError> {
        let listed = match m.upstream.tags(&m.remote, n, last).await {
            Ok(resp) => {
                let link = resp.headers().get("link").and_then(|v| v.to_str().ok()).map(str::to_string);
                m.upstream.read_limited(resp, TAGS_LIMIT, "tags list").await.map(|body| (body, link))
            }
            Err(e) => Err(e),
        };
        match listed {
            Ok((body, link)) => {
                let body: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
                    CacheError::Upstream(UpstreamError::Reset {
                        upstream: m.upstream.name().to_string(),
                        detail: format!("tags list is not JSON: {e}"),
                    })
                })?;
                let tags = body
                    .get("tags")
                    .and_then(|t| t.as_array())
                    .map(|t| t.iter().filter_map(|t| t.as_str().map(str::to_string)).collect())
                    .unwrap_or_default();
                Ok(TagList::Upstream { tags, next: link.as_deref().and_then(next_page) })
            }
            Err(e) if e.is_outage() => Ok(TagList::Cached(self.store.list_tags(&m.local).await?)),
            Err(e) => Err(CacheError::upstream(Content::Repository, e)),
        }
    }
}

/// A repository's tags as the cache found them.
pub enum TagList {
    /// One page from the upstream, and where the next starts (if there is one).
    Upstream { tags: Vec<String>, next: Option<NextPage> },
    /// The upstream is down: every tag the store knows, for the caller to page through.
    Cached(Vec<String>),
}

/// Where the next page of a tags list starts: `?n=<n>&last=<last>`.
#[derive(Debug, PartialEq)]
pub struct NextPage {
    pub n: Option<usize>,
    pub last: String,
}

/// Find a mirrored manifest: in the store while it is fresh, otherwise through one shared
/// upstream request that asks for every manifest type, so the tag always records what it
/// really points to.
async fn resolve(cache: &Cache, m: &Mirrored, reference: &Reference) -> Result<Arc<Resolved>, CacheError> {
    let ttl = cache.policy.tag_ttl;
    if let Some(found) = cached(&cache.store, &cache.clock, &m.local, reference, ttl).await? {
        return Ok(Arc::new(found));
    }
    let (cache_, m_, reference_) = (cache.clone(), m.clone(), reference.clone());
    flight(cache, m, reference, ACCEPT_ALL, async move {
        refresh(&cache_, &m_, &reference_, ACCEPT_ALL).await.map(Arc::new)
    })
    .await
}

/// Run `work` as the one upstream request for (`m`, `reference`, `accept`), or wait for the one
/// running.
async fn flight(
    cache: &Cache,
    m: &Mirrored,
    reference: &Reference,
    accept: &str,
    work: impl std::future::Future<Output = Result<Arc<Resolved>, CacheError>> + Send + 'static,
) -> Result<Arc<Resolved>, CacheError> {
    let key = FlightKey {
        upstream: m.upstream.name().to_string(),
        remote: m.remote.clone(),
        reference: reference.to_string(),
        accept: accept.to_string(),
    };
    cache
        .manifest_flights
        .run(key, move || work)
        .await
        .unwrap_or_else(|| Err(CacheError::Internal("manifest fetch task failed".into())))
}

/// The upstream's answer for a client that reads only the types in `client_accept`: kept by
/// digest (content is content), never under the tag. One request per distinct Accept at a time.
async fn narrow(
    cache: &Cache,
    m: &Mirrored,
    reference: &Reference,
    client_accept: Option<&str>,
) -> Result<Arc<Resolved>, CacheError> {
    let accept = upstream_accept(client_accept);
    let (cache_, m_, reference_, accept_) = (cache.clone(), m.clone(), reference.to_string(), accept.clone());
    let limit = cache.policy.max_manifest_size;
    flight(cache, m, reference, &accept, async move {
        let f = fetch(&m_.upstream, &m_.remote, &reference_, None, &accept_, limit)
            .await
            .map_err(|e| CacheError::upstream(Content::Manifest, e))?;
        cache_.store_manifest(&m_.local, &f).await?;
        Ok(Arc::new(Resolved { digest: f.digest, meta: f.meta, bytes: f.bytes, obtained: Obtained::Miss }))
    })
    .await
}

/// The manifest from the store when it may be served without asking the upstream: by digest
/// always, by tag while the tag is younger than `ttl`.
async fn cached(
    store: &Store,
    clock: &Clock,
    local: &RepoName,
    reference: &Reference,
    ttl: Duration,
) -> Result<Option<Resolved>, CacheError> {
    match reference {
        Reference::Digest(d) => Ok(load(store, local, d).await?.map(|(meta, bytes)| Resolved {
            digest: d.clone(),
            meta,
            bytes,
            obtained: Obtained::Hit,
        })),
        Reference::Tag(tag) => Ok(known_tag(store, local, tag)
            .await?
            .filter(|(rec, ..)| clock.now().saturating_sub(rec.fetched_at) < ttl.as_secs())
            .map(|(_, digest, meta, bytes)| Resolved { digest, meta, bytes, obtained: Obtained::Hit })),
    }
}

/// What the store knows of a tag: its record and the manifest it points to.
async fn known_tag(
    store: &Store,
    local: &RepoName,
    tag: &str,
) -> Result<Option<(TagRecord, Digest, ManifestMeta, Vec<u8>)>, CacheError> {
    let Some(rec) = store.tag(local, tag).await? else { return Ok(None) };
    let d = rec.digest.clone();
    Ok(load(store, local, &d).await?.map(|(meta, bytes)| (rec, d, meta, bytes)))
}

/// The bytes and meta of a manifest in `repo`, or `None`.
pub async fn load(store: &Store, repo: &RepoName, d: &Digest) -> std::io::Result<Option<(ManifestMeta, Vec<u8>)>> {
    let Some(meta) = store.manifest_meta(repo, d).await? else {
        return Ok(None);
    };
    let Some(bytes) = store.read_blob(d).await? else {
        return Ok(None);
    };
    Ok(Some((meta, bytes)))
}

/// One flight: ask the upstream, store what it says, and fall back to the last known answer
/// when it fails.
async fn refresh(cache: &Cache, m: &Mirrored, reference: &Reference, accept: &str) -> Result<Resolved, CacheError> {
    let (store, policy) = (&cache.store, cache.policy);
    let Mirrored { upstream, remote, local } = m;
    let missing = |e| CacheError::upstream(Content::Manifest, e);
    // Another flight may have finished between our look at the store and this one's start.
    if let Some(found) = cached(store, &cache.clock, local, reference, policy.tag_ttl).await? {
        return Ok(found);
    }
    let limit = policy.max_manifest_size;
    let tag = match reference {
        Reference::Digest(d) => {
            let f = fetch(upstream, remote, &d.to_string(), Some(d), accept, limit).await.map_err(missing)?;
            cache.store_manifest(local, &f).await?;
            return Ok(Resolved { digest: f.digest, meta: f.meta, bytes: f.bytes, obtained: Obtained::Miss });
        }
        Reference::Tag(tag) => tag,
    };
    let now = |digest: &Digest| TagRecord { digest: digest.clone(), fetched_at: cache.clock.now() };
    let known = known_tag(store, local, tag).await?;
    let result = match &known {
        Some((_, d, ..)) => revalidate(upstream, remote, tag, d, accept, limit).await,
        None => fetch(upstream, remote, tag, None, accept, limit).await.map(Some),
    };
    match (result, known) {
        // Unchanged upstream: no GET, just a fresh timestamp.
        (Ok(None), Some((_, digest, meta, bytes))) => {
            store.set_tag(local, tag, &now(&digest)).await?;
            Ok(Resolved { digest, meta, bytes, obtained: Obtained::Revalidated })
        }
        (Ok(Some(f)), _) => {
            cache.store_manifest(local, &f).await?;
            store.set_tag(local, tag, &now(&f.digest)).await?;
            Ok(Resolved { digest: f.digest, meta: f.meta, bytes: f.bytes, obtained: Obtained::Miss })
        }
        (Err(e), Some((_, digest, meta, bytes))) if policy.serve_stale && e.is_outage() => {
            tracing::warn!(upstream = upstream.name(), repository = %local, tag, error = %e, "upstream failed; serving the last known digest");
            Ok(Resolved { digest, meta, bytes, obtained: Obtained::Stale })
        }
        (Err(e), _) => Err(missing(e)),
        (Ok(None), None) => Err(CacheError::Internal("revalidation without a cached manifest".into())),
    }
}

pub struct Fetched {
    pub digest: Digest,
    pub meta: ManifestMeta,
    pub bytes: Vec<u8>,
}

/// `None` when the upstream still points the tag at `current`; otherwise the new manifest.
async fn revalidate(
    upstream: &Upstream,
    remote: &RepoName,
    tag: &str,
    current: &Digest,
    accept: &str,
    limit: u64,
) -> Result<Option<Fetched>, UpstreamError> {
    // What the tag points to now, whatever its type: whether the client may read it is decided
    // after, against its own Accept.
    let resp = upstream.manifest(Method::HEAD, remote, tag, ACCEPT_ALL).await?;
    let advertised = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<Digest>().ok());
    if advertised.as_ref() == Some(current) {
        return Ok(None);
    }
    fetch(upstream, remote, tag, None, accept, limit).await.map(Some)
}

/// GET a manifest from upstream (at most `limit` bytes) and verify its digest. Bytes are kept
/// exactly as sent.
pub async fn fetch(
    upstream: &Upstream,
    remote: &RepoName,
    reference: &str,
    expected: Option<&Digest>,
    accept: &str,
    limit: u64,
) -> Result<Fetched, UpstreamError> {
    let resp = upstream.manifest(Method::GET, remote, reference, accept).await?;
    let content_type = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).map(str::to_string);
    let advertised = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<Digest>().ok());
    let bytes = upstream.read_limited(resp, limit, "manifest").await?;
    upstream.metrics().upstream_bytes.with_label_values(&[upstream.name(), "manifest"]).inc_by(bytes.len() as u64);
    let algorithm = expected.or(advertised.as_ref()).map_or(Algorithm::Sha256, Digest::algorithm);
    let digest = Digest::of(algorithm, &bytes);
    let mismatch = expected.is_some_and(|e| e != &digest)
        || advertised.as_ref().is_some_and(|a| a.algorithm() == algorithm && a != &digest);
    if mismatch {
        return Err(upstream.failed(UpstreamError::DigestMismatch {
            upstream: upstream.name().to_string(),
            digest: expected.map_or_else(|| reference.to_string(), Digest::to_string),
        }));
    }
    let meta = match describe(&bytes, content_type.as_deref()) {
        Ok(d) => d.meta,
        // Old or unusual manifests are still served exactly as the upstream sent them.
        Err(_) => ManifestMeta {
            media_type: content_type.unwrap_or_else(|| "application/json".into()),
            size: bytes.len() as u64,
            artifact_type: None,
            subject: None,
            annotations: None,
        },
    };
    Ok(Fetched { digest, meta, bytes })
}

/// The next page an upstream's `Link: <…?n=N&last=L>; rel="next"` names, or `None` when it names
/// no next page we understand. Only the page position is kept: the link's host and path are the
/// upstream's (or anyone's), never passed on.
fn next_page(link: &str) -> Option<NextPage> {
    let (target, params) = link.split_once(';')?;
    if !params.split(';').any(|p| p.trim().replace(' ', "") == "rel=\"next\"" || p.trim() == "rel=next") {
        return None;
    }
    let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
    let query = target.split_once('?')?.1;
    let mut n = None;
    let mut last = None;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "n" => n = v.parse::<usize>().ok(),
            "last" => last = Some(v.into_owned()),
            _ => {}
        }
    }
    Some(NextPage { n, last: last? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_page_position_of_an_upstream_link_is_kept() {
        assert_eq!(
            next_page("</v2/org/tool/tags/list?last=v1.2&n=2>; rel=\"next\""),
            Some(NextPage { n: Some(2), last: "v1.2".into() })
        );
        assert_eq!(
            next_page("<https://evil.example/x?n=5&last=a%0d%0aSet-Cookie>; rel=\"next\""),
            Some(NextPage { n: Some(5), last: "a\r\nSet-Cookie".into() })
        );
        assert_eq!(next_page("<https://evil.example/x>; rel=\"next\""), None);
        assert_eq!(next_page("</v2/x/tags/list?last=a>; rel=\"prev\""), None);
        assert_eq!(next_page("garbage"), None);
    }
}
