//! The Registry v2 / OCI Distribution API: path parsing (names of any depth), the choice between
//! the local store and an upstream, and the handlers.

pub mod blobs;
pub mod error;
pub mod listing;
pub mod manifests;
pub mod response;
pub mod token;
pub mod uploads;

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::app::AppState;
use crate::auth::{Authn, ConnInfo, Principal};
use crate::cache::Mirrored;
use crate::config::{Action, Origin, RouteError};
use crate::oci::RepoName;
use error::{Code, RegistryError, Result};

/// One parsed `/v2/...` path.
#[derive(Debug, PartialEq)]
pub enum Route<'a> {
    Base,
    Catalog,
    Tags(&'a str),
    Manifest(&'a str, &'a str),
    Blob(&'a str, &'a str),
    UploadStart(&'a str),
    Upload(&'a str, &'a str),
    Referrers(&'a str, &'a str),
}

impl<'a> Route<'a> {
    /// Parse from the end of the path, so a name may have any depth and even contain `blobs`.
    pub fn parse(path: &'a str) -> Option<Route<'a>> {
        let rest = path.strip_prefix("/v2")?;
        if rest.is_empty() || rest == "/" {
            return Some(Route::Base);
        }
        let rest = rest.strip_prefix('/')?;
        if rest == "_catalog" {
            return Some(Route::Catalog);
        }
        if let Some(name) = rest.strip_suffix("/tags/list") {
            return Some(Route::Tags(name));
        }
        if let Some(name) = rest.strip_suffix("/blobs/uploads/").or_else(|| rest.strip_suffix("/blobs/uploads")) {
            return Some(Route::UploadStart(name));
        }
        let (head, last) = rest.rsplit_once('/')?;
        let (name, kind) = head.rsplit_once('/')?;
        match kind {
            "manifests" => Some(Route::Manifest(name, last)),
            "blobs" => Some(Route::Blob(name, last)),
            "referrers" => Some(Route::Referrers(name, last)),
            "uploads" => name.strip_suffix("/blobs").map(|name| Route::Upload(name, last)),
            _ => None,
        }
    }

    /// The route template: a bounded label for metrics and logs.
    pub fn template(&self) -> &'static str {
        match self {
            Route::Base => "/v2/",
            Route::Catalog => "/v2/_catalog",
            Route::Tags(_) => "/v2/{name}/tags/list",
            Route::Manifest(..) => "/v2/{name}/manifests/{reference}",
            Route::Blob(..) => "/v2/{name}/blobs/{digest}",
            Route::UploadStart(_) => "/v2/{name}/blobs/uploads/",
            Route::Upload(..) => "/v2/{name}/blobs/uploads/{id}",
            Route::Referrers(..) => "/v2/{name}/referrers/{digest}",
        }
    }

    pub fn name(&self) -> Option<&'a str> {
        match *self {
            Route::Tags(n)
            | Route::Manifest(n, _)
            | Route::Blob(n, _)
            | Route::UploadStart(n)
            | Route::Upload(n, _)
            | Route::Referrers(n, _) => Some(n),
            Route::Base | Route::Catalog => None,
        }
    }
}

/// Where a repository's content comes from.
#[derive(Clone)]
pub enum Target {
    /// The private namespace: pushes accepted, never upstream.
    Local(RepoName),
    /// Mirrored from an upstream; stored locally as `<upstream name>/<remote>`.
    Mirror(Mirrored),
}

impl Target {
    /// The repository in the local store.
    pub fn local(&self) -> &RepoName {
        match self {
            Target::Local(n) => n,
            Target::Mirror(m) => &m.local,
        }
    }

    pub fn upstream_name(&self) -> Option<&str> {
        match self {
            Target::Local(_) => None,
            Target::Mirror(m) => Some(m.upstream.name()),
        }
    }

    /// Mirrored repositories are read-only.
    pub fn require_local(&self) -> Result<&RepoName> {
        match self {
            Target::Local(n) => Ok(n),
            Target::Mirror(m) => Err(RegistryError::new(
                Code::Unsupported,
                format!(
                    "{} is mirrored from an upstream and is read-only; push to a private namespace instead",
                    m.local
                ),
            )),
        }
    }
}

/// Decide which upstream (if any) serves `name`, in the documented order.
pub fn resolve_target(state: &AppState, name: &str, ns: Option<&str>) -> Result<Target> {
    let route = state.cache.namespaces.route(RepoName::parse(name)?, ns).map_err(|e| match e {
        RouteError::Name(e) => e.into(),
        RouteError::UnknownRegistry(_) => RegistryError::new(Code::NameUnknown, e.to_string()),
    })?;
    Ok(match route {
        Origin::Local(name) => Target::Local(name),
        Origin::Mirrored { upstream, remote, local } => {
            let upstream = state.upstreams.get(&upstream).cloned().ok_or_else(|| {
                RegistryError::internal(format!("upstream {upstream} is configured but has no client"))
            })?;
            Target::Mirror(Mirrored { upstream, remote, local })
        }
    })
}

fn query_params(req: &Request) -> HashMap<String, String> {
    req.uri().query().map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect()).unwrap_or_default()
}

/// A value made safe for a query string.
pub fn query_escape(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Everything a handler needs to know about the request, parsed once.
pub struct Ctx {
    pub state: AppState,
    pub method: Method,
    pub headers: axum::http::HeaderMap,
    pub query: HashMap<String, String>,
    pub principal: Principal,
    /// Behind a mutex only so `&Ctx` is `Send` (a body is not `Sync`); taken once.
    body: std::sync::Mutex<Body>,
}

impl Ctx {
    pub fn take_body(&self) -> Body {
        std::mem::take(&mut *crate::lock(&self.body))
    }

    pub fn is_head(&self) -> bool {
        self.method == Method::HEAD
    }
}

/// What the request log records about a registry request (set as a response extension).
#[derive(Clone, Debug, Default)]
pub struct RequestInfo {
    pub route: &'static str,
    pub repository: Option<String>,
    pub reference: Option<String>,
    pub upstream: Option<String>,
    pub cache: Option<&'static str>,
}

/// The single entry point for `/v2/...`.
pub async fn handle(State(state): State<AppState>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let Some(route) = Route::parse(&path) else {
        let mut resp = RegistryError::new(Code::NameInvalid, format!("no such API endpoint: {path}")).into_response();
        *resp.status_mut() = StatusCode::NOT_FOUND;
        resp.extensions_mut().insert(RequestInfo { route: "other", ..Default::default() });
        return resp;
    };
    let query = query_params(&req);
    let method = req.method().clone();
    let (parts, body) = req.into_parts();
    let mut info =
        RequestInfo { route: route.template(), repository: route.name().map(str::to_string), ..Default::default() };
    let conn = parts.extensions.get::<ConnInfo>().copied();
    let result = async {
        let target = match route.name() {
            Some(name) => Some(resolve_target(&state, name, query.get("ns").map(String::as_str))?),
            None => None,
        };
        if let Some(t) = &target {
            info.upstream = t.upstream_name().map(str::to_string);
            info.repository = Some(t.local().to_string());
        }
        let identity_needed = identity_needed(&state, &route, target.as_ref(), &method);
        let authn = state.access.authenticate(&parts.headers, conn, identity_needed).await;
        let ctx = Ctx {
            state,
            method,
            headers: parts.headers,
            query,
            principal: authn.principal.clone(),
            body: std::sync::Mutex::new(body),
        };
        authorize(&ctx, &route, target.as_ref(), conn, &authn)?;
        dispatch(ctx, &route, target, &mut info).await
    }
    .await;
    let mut resp = result.unwrap_or_else(IntoResponse::into_response);
    resp.headers_mut().insert("docker-distribution-api-version", header::HeaderValue::from_static("registry/2.0"));
    resp.extensions_mut().insert(info);
    resp
}

/// Whether who is asking matters: always for the base endpoint (a login) and the catalog (its
/// content depends on it), otherwise only where an anonymous caller may not do the same.
fn identity_needed(state: &AppState, route: &Route<'_>, target: Option<&Target>, method: &Method) -> bool {
    match (route, target) {
        (Route::Base | Route::Catalog, _) | (_, None) => true,
        (_, Some(t)) => {
            let mirrored = matches!(t, Target::Mirror(_));
            !state.access.allowed(&Principal::Anonymous, t.local().as_str(), mirrored, required_action(route, method))
        }
    }
}

/// The right a request needs.
fn required_action(route: &Route<'_>, method: &Method) -> Action {
    match (route, method) {
        (Route::UploadStart(_) | Route::Upload(..), _) => Action::Push,
        (Route::Manifest(..), &Method::PUT) => Action::Push,
        (Route::Manifest(..) | Route::Blob(..), &Method::DELETE) => Action::Delete,
        _ => Action::Pull,
    }
}

/// 401 with a challenge for callers who may log in, 403 DENIED for users who lack the right.
fn authorize(
    ctx: &Ctx,
    route: &Route<'_>,
    target: Option<&Target>,
    conn: Option<ConnInfo>,
    authn: &Authn,
) -> Result<()> {
    let access = &ctx.state.access;
    if !access.enabled() {
        return Ok(());
    }
    let anonymous = ctx.principal == Principal::Anonymous;
    match route {
        // `docker login` and the first request of every pull learn the token realm here.
        Route::Base if !authn.authenticated => Err(unauthorized(access.challenge(&ctx.headers, conn, None))),
        Route::Base | Route::Catalog => Ok(()),
        _ => {
            let (Some(name), Some(target)) = (route.name(), target) else { return Ok(()) };
            let mirrored = matches!(target, Target::Mirror(_));
            let action = required_action(route, &ctx.method);
            let local = target.local().as_str();
            let by_anyone = access.allowed(&Principal::Anonymous, local, mirrored, action);
            let by_principal = access.allowed(&ctx.principal, local, mirrored, action);
            // A token allows what it was issued for, not everything its user may do.
            let token_covers = authn.token_permits(name, local, action);
            if by_anyone || (by_principal && token_covers) {
                Ok(())
            } else if anonymous || authn.rejected || by_principal {
                let actions =
                    if action == Action::Pull { "pull".to_string() } else { format!("pull,{}", action.as_str()) };
                Err(unauthorized(access.challenge(&ctx.headers, conn, Some(format!("repository:{name}:{actions}")))))
            } else {
                Err(RegistryError::new(
                    Code::Denied,
                    format!("{} may not {} {}", user_name(&ctx.principal), action.as_str(), target.local()),
                ))
            }
        }
    }
}

/// A 401 that tells the client where to log in.
pub fn unauthorized(challenge: String) -> RegistryError {
    RegistryError::new(Code::Unauthorized, "authentication required").with_header(header::WWW_AUTHENTICATE, &challenge)
}

fn user_name(p: &Principal) -> &str {
    match p {
        Principal::User(u) => u,
        Principal::Anonymous => "anonymous",
    }
}

async fn dispatch(ctx: Ctx, route: &Route<'_>, target: Option<Target>, info: &mut RequestInfo) -> Result<Response> {
    let unsupported = || Err(RegistryError::new(Code::Unsupported, "method not allowed on this endpoint"));
    let m = ctx.method.clone();
    match (route, target) {
        (Route::Base, _) => match m {
            Method::GET | Method::HEAD => Ok((StatusCode::OK, axum::Json(serde_json::json!({}))).into_response()),
            _ => unsupported(),
        },
        (Route::Catalog, _) if m == Method::GET => listing::catalog(ctx).await,
        (Route::Tags(_), Some(t)) if m == Method::GET => listing::tags(ctx, t).await,
        (Route::Manifest(_, reference), Some(t)) => {
            info.reference = Some(reference.to_string());
            match m {
                Method::GET | Method::HEAD => manifests::get(ctx, t, reference, info).await,
                Method::PUT => manifests::put(ctx, t, reference).await,
                Method::DELETE => manifests::delete(ctx, t, reference).await,
                _ => unsupported(),
            }
        }
        (Route::Blob(_, digest), Some(t)) => {
            info.reference = Some(digest.to_string());
            match m {
                Method::GET | Method::HEAD => blobs::get(ctx, t, digest, info).await,
                Method::DELETE => blobs::delete(ctx, t, digest).await,
                _ => unsupported(),
            }
        }
        (Route::UploadStart(_), Some(t)) if m == Method::POST => uploads::start(ctx, t).await,
        (Route::Upload(_, id), Some(t)) => match m {
            Method::GET => uploads::status(ctx, t, id).await,
            Method::PATCH => uploads::patch(ctx, t, id).await,
            Method::PUT => uploads::finish(ctx, t, id).await,
            Method::DELETE => uploads::cancel(ctx, t, id).await,
            _ => unsupported(),
        },
        (Route::Referrers(_, digest), Some(t)) if m == Method::GET => {
            info.reference = Some(digest.to_string());
            listing::referrers(ctx, t, digest, info).await
        }
        _ => unsupported(),
    }
}

#[cfg(test)]
mod tests {
    use super::Route;

    #[test]
    fn routes_parse_from_the_end() {
        assert_eq!(Route::parse("/v2/"), Some(Route::Base));
        assert_eq!(Route::parse("/v2"), Some(Route::Base));
        assert_eq!(Route::parse("/v2/_catalog"), Some(Route::Catalog));
        assert_eq!(Route::parse("/v2/a/b/c/d/e/f/g/h/i/tags/list"), Some(Route::Tags("a/b/c/d/e/f/g/h/i")));
        assert_eq!(Route::parse("/v2/library/nginx/manifests/1.27"), Some(Route::Manifest("library/nginx", "1.27")));
        assert_eq!(Route::parse("/v2/x/blobs/sha256:ab"), Some(Route::Blob("x", "sha256:ab")));
        assert_eq!(Route::parse("/v2/x/blobs/uploads/"), Some(Route::UploadStart("x")));
        assert_eq!(Route::parse("/v2/x/blobs/blobs/uploads/abc"), Some(Route::Upload("x/blobs", "abc")));
        assert_eq!(Route::parse("/v2/x/referrers/sha256:ab"), Some(Route::Referrers("x", "sha256:ab")));
        assert_eq!(Route::parse("/v2/x/uploads/abc"), None);
        assert_eq!(Route::parse("/v3/x"), None);
    }
}
