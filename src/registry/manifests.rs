//! Manifests: GET/HEAD/PUT/DELETE by tag or digest, for every manifest media type. The exact bytes
//! pushed are stored and served.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;

use super::error::{Code, RegistryError, Result};
use super::response::{located, manifest_response, read_body_limited};
use super::{Ctx, RequestInfo, Target};
use crate::cache::manifests::load;
use crate::oci::{acceptable, describe, Algorithm, Digest, Reference, RepoName};
use crate::storage::TagRecord;

fn unknown(repo: &RepoName, reference: &str) -> RegistryError {
    RegistryError::new(Code::ManifestUnknown, format!("manifest {repo}:{reference} is not known"))
}

pub async fn get(ctx: Ctx, target: Target, reference: &str, info: &mut RequestInfo) -> Result<Response> {
    // A reference that is no valid tag names no manifest: 404, as the conformance suite, zot and
    // distribution have it (a PUT under it is still a 400).
    let reference = match Reference::parse(reference) {
        Err(crate::oci::Error::TagInvalid(_)) => return Err(unknown(target.local(), reference)),
        parsed => parsed?,
    };
    let repo = match &target {
        Target::Mirror(m) => {
            let client_accept = accept_header(&ctx.headers);
            let found = ctx.state.cache.manifest(m, &reference, client_accept.as_deref()).await;
            info.cache = Some(found.as_ref().map_or("error", |r| r.obtained.label()));
            let resolved = found?;
            // As distribution does: a client that cannot read this media type is told it is not here.
            if !acceptable(&resolved.meta.media_type, client_accept.as_deref()) {
                return Err(RegistryError::new(
                    Code::ManifestUnknown,
                    format!(
                        "{}:{reference} is a {}, which the request's Accept header does not include",
                        m.local, resolved.meta.media_type
                    ),
                ));
            }
            if !ctx.is_head() {
                ctx.state.cache.pulled(&m.local);
            }
            return Ok(manifest_response(&resolved.digest, &resolved.meta, resolved.bytes.clone(), ctx.is_head()));
        }
        Target::Local(repo) => repo,
    };
    let digest = match &reference {
        Reference::Digest(d) => d.clone(),
        Reference::Tag(t) => ctx.state.store.tag(repo, t).await?.ok_or_else(|| unknown(repo, t))?.digest,
    };
    let (meta, bytes) =
        load(&ctx.state.store, repo, &digest).await?.ok_or_else(|| unknown(repo, &reference.to_string()))?;
    if !ctx.is_head() {
        ctx.state.cache.pulled(repo);
    }
    Ok(manifest_response(&digest, &meta, bytes, ctx.is_head()))
}

/// Every `Accept` header of a request, as one list.
fn accept_header(headers: &axum::http::HeaderMap) -> Option<String> {
    let values: Vec<&str> = headers.get_all(header::ACCEPT).iter().filter_map(|v| v.to_str().ok()).collect();
    (!values.is_empty()).then(|| values.join(", "))
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
    let _hold = ctx.state.cache.lru.hold_for_write(&digest).await;
    store.put_manifest(&repo, &digest, &described.meta, &bytes).await?;
    // Private content is never evicted, mirrored blobs it uses included.
    ctx.state.cache.lru.protect(&digest);
    for b in described.blobs.iter().chain(&described.children) {
        ctx.state.cache.lru.protect(b);
    }
    if let Reference::Tag(t) = &reference {
        store.set_tag(&repo, t, &TagRecord::now(&digest)).await?;
    }
    tracing::debug!(repository = %repo, %digest, "manifest stored");
    let mut resp = located(StatusCode::CREATED, &format!("/v2/{repo}/manifests/{digest}"), Some(&digest));
    if let Some(subject) = &described.meta.subject {
        if let Ok(v) = HeaderValue::from_str(&subject.to_string()) {
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
