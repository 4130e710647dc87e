//! The pull-through cache: mirrored manifests (tag TTL, revalidation, stale serving, one upstream
//! request per manifest at a time) and blobs (one shared fill per digest, streamed to every
//! waiting client).

pub mod blobs;
pub mod evict;
pub mod fill;
pub mod flight;
pub mod lru;
pub mod manifests;
pub mod pins;

use std::sync::Arc;

use axum::http::header;

use crate::app::AppState;
use crate::registry::error::{Code, RegistryError};
use crate::registry::Target;
use crate::upstream::UpstreamError;

/// Why the cache could not answer, by where it failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum CacheError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("storage: {0}")]
    Storage(Arc<std::io::Error>),
    #[error("{0}")]
    Internal(String),
}

impl From<std::io::Error> for CacheError {
    fn from(e: std::io::Error) -> Self {
        CacheError::Storage(Arc::new(e))
    }
}

/// Count a cache lookup outcome (`hit`, `miss`, `stale`, `revalidated`, `error`).
pub fn count(state: &AppState, target: &Target, kind: &str, outcome: &str) {
    if let Some(upstream) = target.upstream_name() {
        state.metrics.cache.with_label_values(&[kind, upstream, outcome]).inc();
    }
}

/// How a cache failure reaches the client. Never a 400: containerd treats it as fatal.
pub fn to_registry_error(e: &CacheError, not_found: Code) -> RegistryError {
    let e = match e {
        CacheError::Upstream(e) => e,
        CacheError::Storage(_) | CacheError::Internal(_) => return RegistryError::internal(e),
    };
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
