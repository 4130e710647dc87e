//! Manifests: GET/HEAD/PUT/DELETE by tag or digest, for every manifest media type. The exact bytes
//! pushed are stored and served.

use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use serde_json::Value;

use super::error::{Code, RegistryError, Result};
use super::names::{Algorithm, Digest, Reference, RepoName};
use super::response::{insert_digest, located, read_body_limited};
use super::{Ctx, RequestInfo, Target};
use crate::storage::{ManifestMeta, TagRecord};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// What we ask upstreams for: every manifest type, so nothing is ever converted.
pub const ACCEPT_ALL: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.artifact.manifest.v1+json, application/vnd.docker.distribution.manifest.v1+prettyjws;q=0.5";

/// The media types an `Accept` header lists, without parameters; `None` when it accepts anything
/// (no header, or a wildcard).
fn accepted_types(accept: Option<&str>) -> Option<Vec<&str>> {
    let mut types: Vec<&str> = Vec::new();
    for t in accept?.split(',') {
        let t = t.split(';').next().unwrap_or_default().trim();
        if t == "*/*" || t == "application/*" {
            return None;
        }
        if !t.is_empty() && !types.contains(&t) {
            types.push(t);
        }
    }
    (!types.is_empty()).then_some(types)
}

/// May a client that sent `accept` be given a manifest of `media_type`? A request without an
/// `Accept` header, or with a wildcard, takes any type.
pub fn acceptable(media_type: &str, accept: Option<&str>) -> bool {
    accepted_types(accept).is_none_or(|types| types.contains(&media_type))
}

/// The `Accept` to send upstream for a client's request: the types it lists (sorted, so that
/// clients listing the same types share one upstream request), or every manifest type.
pub fn upstream_accept(accept: Option<&str>) -> String {
    match accepted_types(accept) {
        Some(mut types) => {
            types.sort_unstable();
            types.join(", ")
        }
        None => ACCEPT_ALL.to_string(),
    }
}

/// A parsed manifest: its meta for storage and the content it references.
pub struct Described {
    pub meta: ManifestMeta,
    /// Blobs (config, layers) that must exist in the repository.
    pub blobs: Vec<Digest>,
    /// Child manifests (of an index) that must exist in the repository.
    pub children: Vec<Digest>,
}

fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_LIST
}

/// Validate a manifest's JSON and extract what it references. `content_type` is what the client
/// or upstream said; the body's own `mediaType` is used when the header is missing or generic.
pub fn describe(bytes: &[u8], content_type: Option<&str>) -> Result<Described> {
    let invalid = |why: &str| RegistryError::new(Code::ManifestInvalid, why.to_string());
    let json: Value =
        serde_json::from_slice(bytes).map_err(|e| invalid(&format!("manifest is not valid JSON: {e}")))?;
    let obj = json.as_object().ok_or_else(|| invalid("manifest must be a JSON object"))?;
    let body_type = obj.get("mediaType").and_then(Value::as_str);
    let header_type = content_type
        .map(|c| c.split(';').next().unwrap_or_default().trim())
        .filter(|c| !c.is_empty() && *c != "application/json" && *c != "application/octet-stream");
    if let (Some(h), Some(b)) = (header_type, body_type) {
        if h != b {
            return Err(invalid(&format!("Content-Type {h:?} does not match the manifest's mediaType {b:?}")));
        }
    }
    let media_type = header_type.or(body_type).map(str::to_string).unwrap_or_else(|| {
        if obj.contains_key("manifests") {
            OCI_INDEX.to_string()
        } else {
            OCI_MANIFEST.to_string()
        }
    });
    let schema = obj.get("schemaVersion").and_then(Value::as_u64);
    if schema != Some(2) && !media_type.contains("manifest.v1") {
        return Err(invalid("schemaVersion must be 2"));
    }
    let descriptor_digest = |d: &Value, what: &str| -> Result<Digest> {
        let s = d.get("digest").and_then(Value::as_str).ok_or_else(|| invalid(&format!("{what} has no digest")))?;
        s.parse::<Digest>().map_err(|_| invalid(&format!("{what} has an invalid digest {s:?}")))
    };
    let mut blobs = Vec::new();
    let mut children = Vec::new();
    if is_index(&media_type) || obj.contains_key("manifests") {
        let list = obj
            .get("manifests")
            .and_then(Value::as_array)
            .ok_or_else(|| invalid("an index needs a manifests array"))?;
        for m in list {
            children.push(descriptor_digest(m, "manifests[]")?);
        }
    } else {
        if let Some(config) = obj.get("config") {
            blobs.push(descriptor_digest(config, "config")?);
        }
        for l in obj.get("layers").and_then(Value::as_array).into_iter().flatten() {
            // Foreign (non-distributable) layers live elsewhere and need not be here.
            if l.get("urls").is_none() {
                blobs.push(descriptor_digest(l, "layers[]")?);
            }
        }
        for b in obj.get("blobs").and_then(Value::as_array).into_iter().flatten() {
            blobs.push(descriptor_digest(b, "blobs[]")?);
        }
    }
    let subject = match obj.get("subject") {
        Some(s) => Some(descriptor_digest(s, "subject")?.to_string()),
        None => None,
    };
    // Referrers report artifactType, falling back to the config's media type (spec 1.1).
    let artifact_type = obj
        .get("artifactType")
        .and_then(Value::as_str)
        .or_else(|| obj.get("config").and_then(|c| c.get("mediaType")).and_then(Value::as_str))
        .map(str::to_string);
    let annotations = obj.get("annotations").and_then(Value::as_object).cloned();
    Ok(Described {
        meta: ManifestMeta { media_type, size: bytes.len() as u64, artifact_type, subject, annotations },
        blobs,
        children,
    })
}

/// A manifest response; HEAD carries the same headers without the body.
pub fn manifest_response(digest: &Digest, meta: &ManifestMeta, bytes: Vec<u8>, head: bool) -> Response {
    let len = bytes.len();
    let mut resp = Response::new(if head { Body::empty() } else { Body::from(bytes) });
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&meta.media_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    insert_digest(h, digest);
    if let Ok(v) = HeaderValue::from_str(&format!("\"{digest}\"")) {
        h.insert(header::ETAG, v);
    }
    resp
}

fn unknown(repo: &RepoName, reference: &str) -> RegistryError {
    RegistryError::new(Code::ManifestUnknown, format!("manifest {repo}:{reference} is not known"))
}

pub async fn get(ctx: Ctx, target: Target, reference: &str, info: &mut RequestInfo) -> Result<Response> {
    let reference = Reference::parse(reference)?;
    if let Target::Mirror { .. } = target {
        return crate::cache::manifests::get(&ctx, &target, &reference, info).await;
    }
    let repo = target.local();
    let digest = match &reference {
        Reference::Digest(d) => d.clone(),
        Reference::Tag(t) => {
            let rec = ctx.state.store.tag(repo, t).await?.ok_or_else(|| unknown(repo, t))?;
            rec.digest.parse()?
        }
    };
    let (meta, bytes) = crate::cache::manifests::load(&ctx.state.store, repo, &digest)
        .await?
        .ok_or_else(|| unknown(repo, &reference.to_string()))?;
    Ok(manifest_response(&digest, &meta, bytes, ctx.is_head()))
}

pub async fn put(ctx: Ctx, target: Target, reference: &str) -> Result<Response> {
    let repo = target.require_local()?.clone();
    let reference = Reference::parse(reference)?;
    let limit = ctx.state.config.max_manifest_size;
    let content_type = ctx.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_string);
    let bytes = read_body_limited(ctx.take_body(), limit, || {
        RegistryError::new(Code::ManifestTooLarge, format!("manifest is larger than the limit of {limit} bytes"))
    })
    .await?;
    let described = describe(&bytes, content_type.as_deref())?;
    let digest = match &reference {
        Reference::Digest(d) => {
            let actual = Digest::of(d.algorithm(), &bytes);
            if &actual != d {
                return Err(RegistryError::new(Code::DigestInvalid, format!("manifest digest is {actual}, not {d}")));
            }
            actual
        }
        Reference::Tag(_) => Digest::of(Algorithm::Sha256, &bytes),
    };
    let store = &ctx.state.store;
    for b in &described.blobs {
        if !store.is_blob_linked(&repo, b).await? {
            return Err(RegistryError::new(Code::ManifestBlobUnknown, format!("blob {b} is not in {repo}")));
        }
    }
    for c in &described.children {
        if store.manifest_meta(&repo, c).await?.is_none() {
            return Err(RegistryError::new(Code::ManifestBlobUnknown, format!("manifest {c} is not in {repo}")));
        }
    }
    let _hold = ctx.state.lru.hold_for_write(&digest).await;
    store.put_manifest(&repo, &digest, &described.meta, &bytes).await?;
    // Private content is never evicted, mirrored blobs it uses included.
    ctx.state.lru.protect(&digest);
    for b in described.blobs.iter().chain(&described.children) {
        ctx.state.lru.protect(b);
    }
    if let Reference::Tag(t) = &reference {
        store.set_tag(&repo, t, &TagRecord::now(&digest)).await?;
    }
    tracing::debug!(repository = %repo, %digest, "manifest stored");
    let mut resp = located(StatusCode::CREATED, &format!("/v2/{repo}/manifests/{digest}"), Some(&digest));
    if let Some(subject) = &described.meta.subject {
        if let Ok(v) = HeaderValue::from_str(subject) {
            resp.headers_mut().insert("oci-subject", v);
        }
    }
    Ok(resp)
}

pub async fn delete(ctx: Ctx, target: Target, reference: &str) -> Result<Response> {
    let repo = target.require_local()?;
    let store = &ctx.state.store;
    let found = match Reference::parse(reference)? {
        Reference::Digest(d) => store.delete_manifest(repo, &d).await?,
        Reference::Tag(t) => store.delete_tag(repo, &t).await?,
    };
    if !found {
        return Err(unknown(repo, reference));
    }
    Ok(located(StatusCode::ACCEPTED, &format!("/v2/{repo}/manifests/{reference}"), None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_headers() {
        let docker_only = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json;q=0.9";
        assert!(acceptable(DOCKER_LIST, Some(docker_only)));
        assert!(!acceptable(OCI_INDEX, Some(docker_only)));
        assert!(acceptable(OCI_INDEX, None));
        assert!(acceptable(OCI_INDEX, Some("application/json, */*")));
        assert_eq!(
            upstream_accept(Some(docker_only)),
            "application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json"
        );
        assert_eq!(upstream_accept(None), ACCEPT_ALL);
        assert_eq!(upstream_accept(Some("*/*")), ACCEPT_ALL);
    }
}
