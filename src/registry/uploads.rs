//! Blob uploads: monolithic POST, chunked sessions (PATCH with `Content-Range` checks), finishing
//! PUT with digest verification, status, cancel, and cross-repository mounts. Session data lives
//! in the store, so a session survives a restart; the running hash is only an in-memory shortcut.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use super::error::{Code, RegistryError, Result};
use super::response::located;
use super::{Ctx, Target};
use crate::oci::{Algorithm, Digest, Hasher, RepoName};
use crate::storage::{unix_now, Store, UploadInfo};

/// Per-session state kept in memory: a lock so two PATCHes never interleave, and the hash of
/// the bytes received so far (lost on restart, then recomputed from the data file).
#[derive(Default)]
pub struct Sessions {
    inner: Mutex<HashMap<String, Slot>>,
}

/// One session's lock, guarding the running hash: `(bytes hashed, hasher)`.
type Slot = Arc<tokio::sync::Mutex<Option<(u64, Hasher)>>>;

impl Sessions {
    fn slot(&self, id: &str) -> Slot {
        let mut map = crate::lock(&self.inner);
        map.entry(id.to_string()).or_default().clone()
    }

    fn forget(&self, id: &str) {
        crate::lock(&self.inner).remove(id);
    }
}

fn session_location(repo: &RepoName, id: &str) -> String {
    format!("/v2/{repo}/blobs/uploads/{id}")
}

/// 202/204 with the session's `Location`, `Range` and id.
fn session_response(status: StatusCode, repo: &RepoName, id: &str, size: u64) -> Response {
    let mut resp = located(status, &session_location(repo, id), None);
    let h = resp.headers_mut();
    let end = size.saturating_sub(1);
    if let Ok(v) = HeaderValue::from_str(&format!("0-{end}")) {
        h.insert(header::RANGE, v);
    }
    if let Ok(v) = HeaderValue::from_str(id) {
        h.insert("docker-upload-uuid", v);
    }
    resp
}

fn created(repo: &RepoName, d: &Digest) -> Response {
    located(StatusCode::CREATED, &format!("/v2/{repo}/blobs/{d}"), Some(d))
}

fn query_digest(ctx: &Ctx) -> Result<Option<Digest>> {
    Ok(ctx.query.get("digest").map(|d| d.parse()).transpose()?)
}

pub async fn start(ctx: Ctx, target: Target) -> Result<Response> {
    let repo = target.require_local()?.clone();
    let store = &ctx.state.store;
    if let Some(mount) = ctx.query.get("mount") {
        let d: Digest = mount.parse()?;
        if let Some(from) = ctx.query.get("from") {
            // `from` as the client names it: `library/nginx` is the mirrored docker.io/library/nginx.
            if let Ok(from) = super::resolve_target(&ctx.state, from, None).map(|t| t.local().clone()) {
                let _hold = ctx.state.cache.lru.hold_for_write(&d).await;
                let readable = ctx.state.access.may_pull(&ctx.principal, &from);
                if readable && store.is_blob_linked(&from, &d).await? && store.blob_size(&d).await?.is_some() {
                    store.link_blob(&repo, &d).await?;
                    ctx.state.cache.lru.protect(&d);
                    return Ok(created(&repo, &d));
                }
            }
        }
        // Not mountable: fall through to an ordinary upload session, as the spec asks.
    } else if let Some(d) = query_digest(&ctx)? {
        let expected = content_length(&ctx);
        let limit = ctx.state.config.limits.max_upload_size;
        if let (Some(len), Some(limit)) = (expected, limit) {
            check_size(len, limit)?;
        }
        let _hold = ctx.state.cache.lru.hold_for_write(&d).await;
        let mut writer = store.begin_blob(d.algorithm()).await?;
        let mut body = ctx.take_body().into_data_stream();
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(c) => {
                    if let Some(limit) = limit {
                        if let Err(e) = check_size(writer.written() + c.len() as u64, limit) {
                            writer.abort().await;
                            return Err(e);
                        }
                    }
                    writer.write(c).await?
                }
                Err(e) => {
                    writer.abort().await;
                    return Err(RegistryError::new(Code::BlobUploadInvalid, format!("reading request body: {e}")));
                }
            }
        }
        writer.commit(&d, expected).await.map_err(RegistryError::from)?;
        store.link_blob(&repo, &d).await?;
        ctx.state.cache.lru.protect(&d);
        return Ok(created(&repo, &d));
    }
    let id = store.create_upload(&repo).await?;
    Ok(session_response(StatusCode::ACCEPTED, &repo, &id, 0))
}

/// A blob of `size` bytes against `server.max_upload_size`.
fn check_size(size: u64, limit: u64) -> Result<()> {
    if size > limit {
        return Err(RegistryError::new(
            Code::UploadTooLarge,
            format!("the upload exceeds server.max_upload_size ({limit} bytes)"),
        ));
    }
    Ok(())
}

fn content_length(ctx: &Ctx) -> Option<u64> {
    ctx.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())
}

/// Where a session stands for a request about `repo`.
#[derive(PartialEq)]
enum Standing {
    Live,
    /// No activity for `storage.upload_expiry`.
    Expired,
    /// No such session, or another repository's.
    Unknown,
}

async fn standing(ctx: &Ctx, repo: &RepoName, id: &str) -> Result<Standing> {
    let store = &ctx.state.store;
    Ok(match store.upload_info(id).await? {
        Some(info) if &info.repository == repo => {
            match expired(store, id, &info, ctx.state.config.upload_expiry).await? {
                true => Standing::Expired,
                false => Standing::Live,
            }
        }
        _ => Standing::Unknown,
    })
}

fn unknown_upload(repo: &RepoName, id: &str) -> RegistryError {
    RegistryError::new(Code::BlobUploadUnknown, format!("upload {id} is not known in {repo}"))
}

/// The session's id, checked to belong to `repo` and not to have expired. An expired session
/// nobody is using right now is removed on the spot (the purge task would remove it soon anyway).
async fn session(ctx: &Ctx, repo: &RepoName, id: &str) -> Result<()> {
    match standing(ctx, repo, id).await? {
        Standing::Live => return Ok(()),
        Standing::Expired => {
            let slot = ctx.state.sessions.slot(id);
            if let Ok(_idle) = slot.try_lock() {
                ctx.state.store.delete_upload(id).await?;
                ctx.state.sessions.forget(id);
            };
        }
        Standing::Unknown => {}
    }
    Err(unknown_upload(repo, id))
}

/// `session`, for a request that holds the session's lock: when the session is gone (finished,
/// cancelled or expired while the request waited), its in-memory slot goes too.
async fn session_locked(ctx: &Ctx, repo: &RepoName, id: &str) -> Result<()> {
    if standing(ctx, repo, id).await? == Standing::Live {
        return Ok(());
    }
    ctx.state.sessions.forget(id);
    Err(unknown_upload(repo, id))
}

/// The in-memory slot of an existing session (checked first, so unknown ids leave nothing
/// behind in memory).
async fn existing_slot(ctx: &Ctx, repo: &RepoName, id: &str) -> Result<Slot> {
    session(ctx, repo, id).await?;
    Ok(ctx.state.sessions.slot(id))
}

/// Whether a session has seen no activity (a new session, or bytes written) for `expiry`: an
/// upload that keeps sending is never cut off.
async fn expired(store: &Store, id: &str, info: &UploadInfo, expiry: std::time::Duration) -> std::io::Result<bool> {
    let last = store.upload_modified(id).await?.unwrap_or(0).max(info.started_at);
    Ok(idle_too_long(last, expiry))
}

fn idle_too_long(last_activity: u64, expiry: std::time::Duration) -> bool {
    last_activity.saturating_add(expiry.as_secs()) <= unix_now()
}

/// A chunk's `Content-Range: <start>-<end>` (the `bytes ` prefix and a `/total` suffix allowed).
pub fn parse_content_range(value: &str) -> Option<(u64, u64)> {
    let r = value.trim().trim_start_matches("bytes").trim_start_matches([' ', '=']);
    let (a, b) = r.split_once('-')?;
    let start = a.trim().parse().ok()?;
    let end = b.split('/').next()?.trim().parse().ok()?;
    (end >= start).then_some((start, end))
}

/// Append the request body to the session, after checking `Content-Range` against its size.
/// A chunk with a `Content-Range` must bring exactly the bytes it announced: anything else is
/// refused and cut off again.
async fn append(
    ctx: &mut Ctx,
    repo: &RepoName,
    id: &str,
    state: &mut Option<(u64, Hasher)>,
    algorithm: Option<Algorithm>,
) -> Result<u64> {
    let store = ctx.state.store.clone();
    let size = store.upload_size(id).await?;
    let refuse = |detail: String, size: u64| {
        let end = size.saturating_sub(1);
        RegistryError::new(Code::RangeInvalid, detail)
            .with_header(header::RANGE, &format!("0-{end}"))
            .with_header(header::LOCATION, &session_location(repo, id))
    };
    let announced = match ctx.headers.get(header::CONTENT_RANGE) {
        Some(value) => {
            let parsed = value.to_str().ok().and_then(parse_content_range);
            let length =
                parsed.filter(|(start, _)| *start == size).and_then(|(start, end)| (end - start).checked_add(1));
            let length_ok = match (length, content_length(ctx)) {
                (Some(n), Some(len)) => n == len,
                _ => true,
            };
            match length {
                Some(n) if length_ok => Some(n),
                _ => {
                    return Err(refuse(
                        format!("chunk range {value:?} does not continue the upload at byte {size}"),
                        size,
                    ))
                }
            }
        }
        None => None,
    };
    // Keep the running hash only while it covers exactly the bytes on disk.
    if state.as_ref().is_none_or(|(hashed, _)| *hashed != size) {
        *state = if size == 0 { Some((0, Hasher::new(algorithm.unwrap_or(Algorithm::Sha256)))) } else { None };
    }
    let mut file = store.append_upload(id).await?.ok_or_else(|| unknown_upload(repo, id))?;
    let limit = ctx.state.config.limits.max_upload_size;
    if let (Some(len), Some(limit)) = (content_length(ctx), limit) {
        check_size(size + len, limit)?;
    }
    let mut body = ctx.take_body().into_data_stream();
    let mut added = 0u64;
    let mut failure = None;
    let mut too_large = None;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(c) => {
                if announced.is_some_and(|n| added + c.len() as u64 > n) {
                    added += c.len() as u64;
                    break;
                }
                if let Some(e) = limit.and_then(|l| check_size(size + added + c.len() as u64, l).err()) {
                    too_large = Some(e);
                    break;
                }
                if let Err(e) = file.write_all(&c).await {
                    // A full disk: the session stays as it was before this request.
                    drop(file);
                    store.truncate_upload(id, size).await?;
                    *state = None;
                    return Err(e.into());
                }
                if let Some((hashed, h)) = state.as_mut() {
                    h.update(&c);
                    *hashed += c.len() as u64;
                }
                added += c.len() as u64;
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    // A full disk may show only now: the session stays as it was before this request.
    if let Err(e) = async {
        file.flush().await?;
        file.shutdown().await
    }
    .await
    {
        store.truncate_upload(id, size).await?;
        *state = None;
        return Err(e.into());
    }
    if let Some(e) = too_large {
        // Nothing of the request that went over the limit is kept.
        store.truncate_upload(id, size).await?;
        *state = None;
        return Err(e);
    }
    if let Some(n) = announced.filter(|n| *n != added) {
        // A chunk is whole or not at all: the client resends the range it announced.
        store.truncate_upload(id, size).await?;
        *state = None;
        if failure.is_none() {
            let got = if added > n { format!("more than {n}") } else { added.to_string() };
            return Err(refuse(format!("chunk announced {n} bytes in Content-Range but brought {got}"), size));
        }
    }
    if let Some(e) = failure {
        // Without a Content-Range what arrived is kept: the client can ask for the status and
        // resume from there.
        return Err(RegistryError::new(Code::BlobUploadInvalid, format!("reading request body: {e}")));
    }
    Ok(size + added)
}

pub async fn patch(mut ctx: Ctx, target: Target, id: &str) -> Result<Response> {
    let repo = target.require_local()?.clone();
    let slot = existing_slot(&ctx, &repo, id).await?;
    let mut state = slot.lock().await;
    // Checked again under the session's lock: a PUT that finished it while this PATCH waited wins.
    session_locked(&ctx, &repo, id).await?;
    let size = append(&mut ctx, &repo, id, &mut state, None).await?;
    Ok(session_response(StatusCode::ACCEPTED, &repo, id, size))
}

pub async fn finish(mut ctx: Ctx, target: Target, id: &str) -> Result<Response> {
    let repo = target.require_local()?.clone();
    let store = ctx.state.store.clone();
    let slot = existing_slot(&ctx, &repo, id).await?;
    let mut state = slot.lock().await;
    session_locked(&ctx, &repo, id).await?;
    let d = query_digest(&ctx)?.ok_or_else(|| {
        RegistryError::new(Code::DigestInvalid, "the digest query parameter is required to finish an upload")
    })?;
    let size = append(&mut ctx, &repo, id, &mut state, Some(d.algorithm())).await?;
    let hasher = match state.take() {
        Some((hashed, h)) if hashed == size && h.algorithm() == d.algorithm() => Some(h),
        _ => None,
    };
    let _hold = ctx.state.cache.lru.hold_for_write(&d).await;
    let outcome = store.commit_upload(id, &d, hasher).await;
    // Success or digest mismatch, the session is over and nothing of it is kept.
    store.delete_upload(id).await?;
    ctx.state.sessions.forget(id);
    outcome.map_err(RegistryError::from)?;
    store.link_blob(&repo, &d).await?;
    ctx.state.cache.lru.protect(&d);
    Ok(created(&repo, &d))
}

/// Remove every session older than `storage.upload_expiry`, with its data. A session in use right
/// now is left for the next round.
pub async fn purge_expired(state: &crate::app::AppState) -> std::io::Result<usize> {
    let store = &state.store;
    let mut removed = 0;
    for id in store.list_uploads().await? {
        let slot = state.sessions.slot(&id);
        let Ok(_busy) = slot.try_lock() else { continue };
        let expiry = state.config.upload_expiry;
        let stale = match store.upload_info(&id).await? {
            Some(info) => expired(store, &id, &info, expiry).await?,
            // No record: a session being created right now (the record is written first), or the
            // remains of one whose removal was cut short, which are gone once old enough.
            None => store.upload_modified(&id).await?.is_some_and(|t| idle_too_long(t, expiry)),
        };
        if stale {
            store.delete_upload(&id).await?;
            state.sessions.forget(&id);
            removed += 1;
        }
    }
    Ok(removed)
}

/// Purge expired sessions now and then every `PURGE_EVERY`.
pub fn spawn_purge(state: crate::app::AppState) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(PURGE_EVERY);
        loop {
            tick.tick().await;
            match purge_expired(&state).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(sessions = n, "expired upload sessions removed"),
                Err(e) => tracing::warn!(error = %e, "could not purge expired upload sessions"),
            }
            // A replica that crashed while storing a blob leaves its multipart upload behind.
            match state.store.purge_abandoned_writes(state.config.upload_expiry).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(uploads = n, "abandoned multipart uploads aborted"),
                Err(e) => tracing::warn!(error = %e, "could not look for abandoned multipart uploads"),
            }
        }
    });
}

/// How often expired upload sessions are looked for.
const PURGE_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

pub async fn status(ctx: Ctx, target: Target, id: &str) -> Result<Response> {
    let repo = target.require_local()?;
    session(&ctx, repo, id).await?;
    let size = ctx.state.store.upload_size(id).await?;
    Ok(session_response(StatusCode::NO_CONTENT, repo, id, size))
}

pub async fn cancel(ctx: Ctx, target: Target, id: &str) -> Result<Response> {
    let repo = target.require_local()?;
    let slot = existing_slot(&ctx, repo, id).await?;
    let _guard = slot.lock().await;
    session_locked(&ctx, repo, id).await?;
    ctx.state.store.delete_upload(id).await?;
    ctx.state.sessions.forget(id);
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    Ok(resp)
}
