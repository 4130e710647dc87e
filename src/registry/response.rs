//! Building blocks shared by the handlers: byte ranges, blob bodies, bounded body reads.

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use futures_util::StreamExt;

use super::error::{Code, RegistryError, Result};
use crate::oci::{Digest, ManifestMeta};
use crate::storage::{Store, CHUNK};

/// An inclusive byte range `[start, end]` within a blob of known size.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

impl ByteRange {
    #[allow(clippy::len_without_is_empty)] // a range holds at least one byte
    pub fn len(&self) -> u64 {
        self.end - self.start + 1
    }
}

/// Parse a `Range: bytes=...` header against `size`. `Ok(None)`: serve the whole blob.
/// A single range only; a multi-range or unsatisfiable request is a 416.
pub fn parse_range(headers: &HeaderMap, size: u64) -> Result<Option<ByteRange>> {
    let Some(value) = headers.get(header::RANGE) else {
        return Ok(None);
    };
    let unsatisfiable = || {
        RegistryError::new(
            Code::RangeInvalid,
            format!("range {value:?} cannot be satisfied for a blob of {size} bytes"),
        )
        .with_header(header::CONTENT_RANGE, &format!("bytes */{size}"))
    };
    let spec = value.to_str().ok().and_then(|v| v.trim().strip_prefix("bytes=")).ok_or_else(unsatisfiable)?;
    let (a, b) = spec.split_once('-').ok_or_else(unsatisfiable)?;
    let range = match (a.trim(), b.trim()) {
        ("", suffix) => {
            let n: u64 = suffix.parse().map_err(|_| unsatisfiable())?;
            if n == 0 || size == 0 {
                return Err(unsatisfiable());
            }
            ByteRange { start: size.saturating_sub(n), end: size - 1 }
        }
        (start, end) => {
            let start: u64 = start.parse().map_err(|_| unsatisfiable())?;
            let end: u64 =
                if end.is_empty() { size.saturating_sub(1) } else { end.parse().map_err(|_| unsatisfiable())? };
            if start >= size || end < start {
                return Err(unsatisfiable());
            }
            ByteRange { start, end: end.min(size - 1) }
        }
    };
    Ok(Some(range))
}

/// Headers every blob response carries.
pub fn blob_response(status: StatusCode, digest: &Digest, size: u64, range: Option<ByteRange>, body: Body) -> Response {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    let len = range.map_or(size, |r| r.len());
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    insert_digest(h, digest);
    if let Ok(v) = HeaderValue::from_str(&format!("\"{digest}\"")) {
        h.insert(header::ETAG, v);
    }
    if let Some(r) = range {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {}-{}/{size}", r.start, r.end)) {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    resp
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

pub fn insert_digest(h: &mut HeaderMap, digest: &Digest) {
    if let Ok(v) = HeaderValue::from_str(&digest.to_string()) {
        h.insert("docker-content-digest", v);
    }
}

/// Stream bytes `[offset, offset + len)` of a stored blob in large chunks.
/// `keep` lives as long as the response body (a guard that keeps the blob from eviction).
pub fn blob_body(
    store: Store,
    digest: Digest,
    offset: u64,
    len: u64,
    on_bytes: impl Fn(u64) + Send + 'static,
    keep: impl Send + Sync + 'static,
) -> Body {
    let end = offset + len;
    let on_bytes = move |n| {
        let _ = &keep;
        on_bytes(n)
    };
    // An object store serves the range best as one GET; a filesystem in large chunks.
    enum Source {
        Unopened,
        Stream(crate::storage::ByteStream),
        Chunks,
    }
    let ended_early = |digest: &Digest| std::io::Error::other(format!("blob {digest} ended early"));
    let stream = futures_util::stream::unfold(
        (offset, Source::Unopened, store, digest, on_bytes),
        move |(pos, mut source, store, digest, on_bytes)| async move {
            if pos >= end {
                return None;
            }
            loop {
                match source {
                    Source::Unopened => match store.blob_stream(&digest, pos, end - pos).await {
                        Ok(Some(s)) => source = Source::Stream(s),
                        Ok(None) => source = Source::Chunks,
                        Err(e) => return Some((Err(e), (end, Source::Chunks, store, digest, on_bytes))),
                    },
                    Source::Stream(mut s) => {
                        let next = s.next().await;
                        return match next {
                            Some(Ok(chunk)) if pos + chunk.len() as u64 <= end => {
                                on_bytes(chunk.len() as u64);
                                let pos = pos + chunk.len() as u64;
                                Some((Ok(chunk), (pos, Source::Stream(s), store, digest, on_bytes)))
                            }
                            Some(Err(e)) => Some((Err(e), (end, Source::Chunks, store, digest, on_bytes))),
                            // Short or long: abort the response rather than complete it wrong.
                            _ => Some((Err(ended_early(&digest)), (end, Source::Chunks, store, digest, on_bytes))),
                        };
                    }
                    Source::Chunks => {
                        let want = (end - pos).min(CHUNK as u64) as usize;
                        return match store.read_blob_at(&digest, pos, want).await {
                            Ok(Some(chunk)) if chunk.len() == want => {
                                on_bytes(want as u64);
                                Some((Ok(chunk), (pos + want as u64, Source::Chunks, store, digest, on_bytes)))
                            }
                            // The file ended early or vanished: abort the response rather than
                            // complete it short.
                            Ok(_) => Some((Err(ended_early(&digest)), (end, Source::Chunks, store, digest, on_bytes))),
                            Err(e) => Some((Err(e), (end, Source::Chunks, store, digest, on_bytes))),
                        };
                    }
                }
            }
        },
    );
    Body::from_stream(stream)
}

/// Read a whole request body, refusing more than `limit` bytes.
pub async fn read_body_limited(body: Body, limit: u64, too_large: impl FnOnce() -> RegistryError) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| RegistryError::new(Code::BlobUploadInvalid, format!("reading request body: {e}")))?;
        if out.len() as u64 + chunk.len() as u64 > limit {
            return Err(too_large());
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// A 201/202/204 with a `Location` and optional digest.
pub fn located(status: StatusCode, location: &str, digest: Option<&Digest>) -> Response {
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(location) {
        h.insert(header::LOCATION, v);
    }
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
    if let Some(d) = digest {
        insert_digest(h, d);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(v: &str, size: u64) -> Result<Option<ByteRange>> {
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, HeaderValue::from_str(v).unwrap());
        parse_range(&h, size)
    }

    #[test]
    fn ranges() {
        assert_eq!(range("bytes=0-9", 100).unwrap(), Some(ByteRange { start: 0, end: 9 }));
        assert_eq!(range("bytes=90-", 100).unwrap(), Some(ByteRange { start: 90, end: 99 }));
        assert_eq!(range("bytes=-10", 100).unwrap(), Some(ByteRange { start: 90, end: 99 }));
        assert_eq!(range("bytes=50-500", 100).unwrap(), Some(ByteRange { start: 50, end: 99 }));
        assert!(range("bytes=100-", 100).is_err());
        assert!(range("bytes=5-2", 100).is_err());
        assert!(range("items=0-1", 100).is_err());
        assert!(range("bytes=0-1,5-6", 100).is_err());
    }
}
