//! The pull-through cache: mirrored manifests (tag TTL, revalidation, stale serving) and blobs
//! (one shared fill per digest, streamed to every waiting client).

pub mod blobs;
pub mod evict;
pub mod fill;
pub mod lru;
pub mod manifests;
pub mod pins;

use axum::http::header;

use crate::app::AppState;
use crate::registry::error::{Code, RegistryError};
use crate::registry::Target;
use crate::upstream::UpstreamError;

/// Count a cache lookup outcome (`hit`, `miss`, `stale`, `revalidated`, `error`).
pub fn count(state: &AppState, target: &Target, kind: &str, outcome: &str) {
    if let Some(upstream) = target.upstream_name() {
        state.metrics.cache.with_label_values(&[kind, upstream, outcome]).inc();
    }
}

/// How an upstream failure reaches the client. Never a 400: containerd treats it as fatal.
pub fn to_registry_error(e: &UpstreamError, not_found: Code) -> RegistryError {
    match e {
        UpstreamError::Status { status: 404, .. } => RegistryError::new(not_found, e.to_string()),
        // Docker Hub answers 401 for a repository that does not exist.
        UpstreamError::Status { status: 401 | 403, .. } => RegistryError::new(not_found, e.to_string()),
        UpstreamError::TooManyRequests { retry_after, .. } => {
            let err = RegistryError::new(Code::TooManyRequests, e.to_string());
            match retry_after {
                Some(r) => err.with_header(header::RETRY_AFTER, r),
                None => err,
            }
        }
        _ => RegistryError::new(Code::Unavailable, e.to_string()),
    }
}
