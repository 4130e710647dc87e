//! The token endpoint of the registry token flow (`docker login`, anonymous pulls): the HTTP side
//! of [`Access::grant`](crate::auth::Access::grant).

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::{resolve_target, unauthorized, Target};
use crate::app::AppState;
use crate::auth::{parse_scope, ConnInfo, Refused, Scope};

/// `GET /auth/token?service=…&scope=…`.
pub async fn token(State(state): State<AppState>, req: Request) -> Response {
    let conn = req.extensions().get::<ConnInfo>().copied();
    let requested: Vec<String> = req
        .uri()
        .query()
        .map(|q| {
            form_urlencoded::parse(q.as_bytes()).filter(|(k, _)| k == "scope").map(|(_, v)| v.into_owned()).collect()
        })
        .unwrap_or_default();
    let scopes = requested
        .iter()
        .filter_map(|s| parse_scope(s))
        .filter_map(|(name, actions)| {
            let target = resolve_target(&state, &name, None).ok()?;
            let mirrored = matches!(target, Target::Mirror(_));
            Some(Scope { name, local: target.local().to_string(), mirrored, actions })
        })
        .collect();
    match state.access.grant(req.headers(), conn, scopes).await {
        Ok(grant) => {
            let body = serde_json::json!({
                "token": grant.token,
                "access_token": grant.token,
                "expires_in": grant.expires_in.as_secs(),
                // Go clients (dockerd, podman, skopeo) parse this as RFC 3339 and fail on anything else.
                "issued_at": time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
            });
            let mut resp = axum::Json(body).into_response();
            resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            resp
        }
        Err(Refused::Disabled) => (StatusCode::NOT_FOUND, "authentication is not enabled\n").into_response(),
        Err(Refused::Unauthenticated) => {
            unauthorized(state.access.challenge(req.headers(), conn, None)).into_response()
        }
    }
}
