//! Listings: `tags/list`, `_catalog` (both with `n`/`last` pagination and `Link`) and referrers.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::error::{Code, RegistryError, Result};
use super::{Ctx, RequestInfo, Target};
use crate::cache::TagList;
use crate::oci::{Digest, RepoName, OCI_INDEX};

/// Default and largest page sizes.
const DEFAULT_PAGE: usize = 1000;
const MAX_PAGE: usize = 10_000;

/// The `n` and `last` of the next page, when there is one.
type Next = Option<(Option<usize>, String)>;

/// One page of a sorted list: entries after `last`, at most `n`, and whether more follow.
fn paginate(ctx: &Ctx, mut all: Vec<String>) -> Result<(Vec<String>, Next)> {
    all.sort();
    let n = match ctx.query.get("n") {
        Some(n) => n
            .parse::<usize>()
            .map_err(|_| RegistryError::new(Code::PaginationInvalid, format!("n={n:?} is not a number")))?,
        None => DEFAULT_PAGE,
    }
    .min(MAX_PAGE);
    let start = match ctx.query.get("last") {
        Some(last) => all.partition_point(|x| x.as_str() <= last.as_str()),
        None => 0,
    };
    let rest = &all[start.min(all.len())..];
    let page: Vec<String> = rest.iter().take(n).cloned().collect();
    let next = (n > 0 && rest.len() > n).then(|| (Some(n), page.last().cloned().unwrap_or_default()));
    Ok((page, next))
}

fn with_link(mut resp: Response, path: &str, next: Next) -> Response {
    if let Some((n, last)) = next {
        let n = n.map(|n| format!("n={n}&")).unwrap_or_default();
        let last = super::query_escape(&last);
        if let Ok(v) = HeaderValue::from_str(&format!("<{path}?{n}last={last}>; rel=\"next\"")) {
            resp.headers_mut().insert(header::LINK, v);
        }
    }
    resp
}

pub async fn tags(ctx: Ctx, target: Target) -> Result<Response> {
    let repo = match &target {
        Target::Mirror(m) => {
            let n = ctx.query.get("n").map(String::as_str);
            let last = ctx.query.get("last").map(String::as_str);
            return match ctx.state.cache.tags(m, n, last).await? {
                // The upstream's next page is the same page of this repository on the mirror.
                TagList::Upstream { tags, next } => {
                    let body = json!({ "name": m.local.as_str(), "tags": tags });
                    let resp = (StatusCode::OK, axum::Json(body)).into_response();
                    Ok(with_link(resp, &format!("/v2/{}/tags/list", m.local), next.map(|p| (p.n, p.last))))
                }
                TagList::Cached(all) => tags_page(&ctx, &m.local, all),
            };
        }
        Target::Local(repo) => repo,
    };
    let store = &ctx.state.store;
    let all = store.list_tags(repo).await?;
    if all.is_empty() && !store.repository_exists(repo).await? {
        return Err(RegistryError::new(Code::NameUnknown, format!("repository {repo} is not known")));
    }
    tags_page(&ctx, repo, all)
}

pub fn tags_page(ctx: &Ctx, repo: &RepoName, all: Vec<String>) -> Result<Response> {
    let (page, next) = paginate(ctx, all)?;
    let resp = (StatusCode::OK, axum::Json(json!({ "name": repo.as_str(), "tags": page }))).into_response();
    Ok(with_link(resp, &format!("/v2/{repo}/tags/list"), next))
}

pub async fn catalog(ctx: Ctx) -> Result<Response> {
    let all: Vec<String> = ctx
        .state
        .store
        .list_repositories()
        .await?
        .into_iter()
        .filter(|r| ctx.state.access.may_pull(&ctx.principal, r))
        .map(String::from)
        .collect();
    let (page, next) = paginate(&ctx, all)?;
    let resp = (StatusCode::OK, axum::Json(json!({ "repositories": page }))).into_response();
    Ok(with_link(resp, "/v2/_catalog", next))
}

pub async fn referrers(ctx: Ctx, target: Target, digest: &str, info: &mut RequestInfo) -> Result<Response> {
    let subject: Digest = digest.parse()?;
    let filter = ctx.query.get("artifactType").cloned();
    let listed: Vec<serde_json::Value> = match &target {
        Target::Mirror(m) => {
            let found = ctx.state.cache.referrers(m, &subject).await;
            info.cache = Some(found.as_ref().map_or("error", |r| r.obtained.label()));
            found?.manifests.clone()
        }
        Target::Local(repo) => {
            let mut out = Vec::new();
            for (d, meta) in ctx.state.store.referrers(repo, &subject).await? {
                let mut desc = json!({ "mediaType": meta.media_type, "digest": d.to_string(), "size": meta.size });
                if let Some(t) = &meta.artifact_type {
                    desc["artifactType"] = json!(t);
                }
                if let Some(a) = &meta.annotations {
                    desc["annotations"] = json!(a);
                }
                out.push(desc);
            }
            out
        }
    };
    // The filter is applied here, for local and mirrored content alike (an upstream's list is
    // kept whole), so the header is always true.
    let manifests: Vec<serde_json::Value> = listed
        .into_iter()
        .filter(|d| filter.as_ref().is_none_or(|f| d.get("artifactType").and_then(|t| t.as_str()) == Some(f.as_str())))
        .collect();
    let body = json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests });
    let mut resp = (StatusCode::OK, axum::Json(body)).into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(OCI_INDEX));
    if filter.is_some() {
        resp.headers_mut().insert("oci-filters-applied", HeaderValue::from_static("artifactType"));
    }
    Ok(resp)
}
