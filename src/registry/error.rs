//! The one table that maps every registry failure to its OCI error code, HTTP status and JSON body.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// Error codes of the OCI Distribution Spec (plus the Docker extensions clients know).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    SizeInvalid,
    Unauthorized,
    Denied,
    Unsupported,
    TooManyRequests,
    RangeInvalid,
    PaginationInvalid,
    ManifestTooLarge,
    UploadTooLarge,
    /// The store is full (ENOSPC, or a quota).
    StorageFull,
    StoreUnavailable,
    Unavailable,
    Internal,
}

impl Code {
    /// The code string, default HTTP status and message, in one place.
    fn entry(self) -> (&'static str, StatusCode, &'static str) {
        use StatusCode as S;
        match self {
            Code::BlobUnknown => ("BLOB_UNKNOWN", S::NOT_FOUND, "blob unknown to registry"),
            Code::BlobUploadInvalid => ("BLOB_UPLOAD_INVALID", S::BAD_REQUEST, "blob upload invalid"),
            Code::BlobUploadUnknown => ("BLOB_UPLOAD_UNKNOWN", S::NOT_FOUND, "blob upload unknown to registry"),
            Code::DigestInvalid => ("DIGEST_INVALID", S::BAD_REQUEST, "provided digest did not match uploaded content"),
            Code::ManifestBlobUnknown => {
                ("MANIFEST_BLOB_UNKNOWN", S::BAD_REQUEST, "manifest references a manifest or blob unknown to registry")
            }
            Code::ManifestInvalid => ("MANIFEST_INVALID", S::BAD_REQUEST, "manifest invalid"),
            Code::ManifestUnknown => ("MANIFEST_UNKNOWN", S::NOT_FOUND, "manifest unknown to registry"),
            Code::NameInvalid => ("NAME_INVALID", S::BAD_REQUEST, "invalid repository name"),
            Code::NameUnknown => ("NAME_UNKNOWN", S::NOT_FOUND, "repository name not known to registry"),
            Code::SizeInvalid => ("SIZE_INVALID", S::BAD_REQUEST, "provided length did not match content length"),
            Code::Unauthorized => ("UNAUTHORIZED", S::UNAUTHORIZED, "authentication required"),
            Code::Denied => ("DENIED", S::FORBIDDEN, "requested access to the resource is denied"),
            Code::Unsupported => ("UNSUPPORTED", S::METHOD_NOT_ALLOWED, "the operation is unsupported"),
            Code::TooManyRequests => ("TOOMANYREQUESTS", S::TOO_MANY_REQUESTS, "too many requests"),
            Code::RangeInvalid => ("BLOB_UPLOAD_INVALID", S::RANGE_NOT_SATISFIABLE, "requested range not satisfiable"),
            Code::PaginationInvalid => {
                ("PAGINATION_NUMBER_INVALID", S::BAD_REQUEST, "invalid number of results requested")
            }
            Code::ManifestTooLarge => ("MANIFEST_INVALID", S::PAYLOAD_TOO_LARGE, "manifest exceeds the size limit"),
            Code::UploadTooLarge => ("BLOB_UPLOAD_INVALID", S::PAYLOAD_TOO_LARGE, "upload exceeds the size limit"),
            Code::StorageFull => ("UNAVAILABLE", S::INSUFFICIENT_STORAGE, "the registry's storage is full"),
            Code::StoreUnavailable => ("UNAVAILABLE", S::SERVICE_UNAVAILABLE, "the registry's storage is unavailable"),
            Code::Unavailable => ("UNAVAILABLE", S::SERVICE_UNAVAILABLE, "upstream registry unavailable"),
            Code::Internal => ("UNKNOWN", S::INTERNAL_SERVER_ERROR, "internal error"),
        }
    }

    pub fn status(self) -> StatusCode {
        self.entry().1
    }
}

/// A failure on the way to answering a registry request, rendered as OCI error JSON.
#[derive(Debug)]
pub struct RegistryError {
    pub code: Code,
    pub detail: String,
    /// Extra response headers (`Retry-After`, `WWW-Authenticate`, `Range`).
    pub headers: Vec<(header::HeaderName, HeaderValue)>,
}

impl RegistryError {
    pub fn new(code: Code, detail: impl Into<String>) -> Self {
        RegistryError { code, detail: detail.into(), headers: Vec::new() }
    }

    pub fn with_header(mut self, name: header::HeaderName, value: &str) -> Self {
        if let Ok(v) = HeaderValue::from_str(value) {
            self.headers.push((name, v));
        }
        self
    }

    pub fn internal(err: impl std::fmt::Display) -> Self {
        Self::new(Code::Internal, err.to_string())
    }

    /// The object store failed: the cause goes to the log (operators need it), the client is
    /// told to try again (it names the bucket's endpoint and keys, which are not the client's
    /// business).
    fn store_unavailable(err: &std::io::Error) -> Self {
        tracing::warn!(error = %err, "storage backend unavailable");
        Self::new(Code::StoreUnavailable, "the object store did not answer; try again".to_string())
    }
}

impl std::fmt::Display for RegistryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.entry().0, self.detail)
    }
}

impl std::error::Error for RegistryError {}

// ---- How every lower layer's failure reaches a client: the one table. ----

impl From<std::io::Error> for RegistryError {
    fn from(err: std::io::Error) -> Self {
        if crate::storage::is_full(&err) {
            return Self::new(Code::StorageFull, format!("storage: {err}"));
        }
        if crate::storage::is_unavailable(&err) {
            return Self::store_unavailable(&err);
        }
        Self::internal(format!("storage: {err}"))
    }
}

impl From<crate::oci::Error> for RegistryError {
    fn from(err: crate::oci::Error) -> Self {
        use crate::oci::Error as E;
        let code = match &err {
            E::NameInvalid(_) => Code::NameInvalid,
            E::DigestInvalid(_) => Code::DigestInvalid,
            E::TagInvalid(_) | E::ManifestInvalid(_) => Code::ManifestInvalid,
        };
        Self::new(code, err.to_string())
    }
}

impl From<crate::storage::CommitError> for RegistryError {
    fn from(err: crate::storage::CommitError) -> Self {
        use crate::storage::CommitError as E;
        match err {
            E::DigestMismatch { .. } => Self::new(Code::DigestInvalid, err.to_string()),
            E::SizeMismatch { .. } => Self::new(Code::SizeInvalid, err.to_string()),
            E::Io(io) => io.into(),
        }
    }
}

/// Never a 400 for what the upstream did: containerd treats a 400 as fatal.
impl From<crate::cache::CacheError> for RegistryError {
    fn from(err: crate::cache::CacheError) -> Self {
        use crate::cache::{CacheError as E, Content};
        use crate::upstream::UpstreamError;
        match &err {
            E::NotFound { what, .. } => {
                let code = match what {
                    Content::Manifest => Code::ManifestUnknown,
                    Content::Blob => Code::BlobUnknown,
                    Content::Repository => Code::NameUnknown,
                };
                Self::new(code, err.to_string())
            }
            E::Upstream(UpstreamError::TooManyRequests { retry_after, .. }) => {
                let limited = Self::new(Code::TooManyRequests, err.to_string());
                match retry_after {
                    Some(r) => limited.with_header(header::RETRY_AFTER, r),
                    None => limited,
                }
            }
            E::Upstream(_) => Self::new(Code::Unavailable, err.to_string()),
            E::Storage(io) if crate::storage::is_full(io) => Self::new(Code::StorageFull, err.to_string()),
            E::Storage(io) if crate::storage::is_unavailable(io) => Self::store_unavailable(io),
            E::Storage(_) | E::Internal(_) => Self::internal(err),
        }
    }
}

/// The error that reached the client, kept as a response extension so the request log can name it.
#[derive(Clone, Debug)]
pub struct LoggedError(pub String);

impl IntoResponse for RegistryError {
    fn into_response(self) -> Response {
        let (code, status, message) = self.code.entry();
        let body = serde_json::json!({
            "errors": [{ "code": code, "message": message, "detail": self.detail }]
        });
        let mut resp = (status, axum::Json(body)).into_response();
        for (name, value) in self.headers {
            resp.headers_mut().insert(name, value);
        }
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            // The body was refused unread: the client must not send its next request on this
            // connection (it would race the close), as nginx does for 413.
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp.extensions_mut().insert(LoggedError(format!("{code}: {}", self.detail)));
        resp
    }
}

pub type Result<T, E = RegistryError> = std::result::Result<T, E>;
