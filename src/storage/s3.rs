//! The object-store driver (S3 and compatible servers, through the `object_store` crate): every
//! path becomes a key under the configured prefix. Staged writes (`tmp/…`) stay on the local disk
//! and become objects only when they are committed, verified, with one (multipart) upload, so no
//! partial object is ever visible. Upload sessions (`uploads/…`) live in the bucket, so any
//! replica can continue one: each appended request body becomes a part object
//! (`<path>.parts/<offset>`), and the parts are read back in order.

use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as Key;
use object_store::{
    ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
    UpdateVersion, WriteMultipart,
};
use tokio::io::AsyncWrite;

use super::fs::{unique_name, FsDriver};
use super::{Condition, Driver, Reader, StagedFile, Version, Writer};
use crate::config::S3Config;
use crate::oci::{Digest, Hasher};

/// Paths under this prefix are staged writes: on the local disk.
const LOCAL: &str = "tmp/";
/// Paths under this prefix are appended to: kept as part objects.
const APPENDED: &str = "uploads/";
/// Multipart uploads send parts this large (S3 wants at least 5 MiB but for the last).
const PART: usize = 16 << 20;
/// Parts uploaded at once by one commit.
const PARTS_IN_FLIGHT: usize = 2;
/// The longest any one request may take, a large part's upload included.
const WHOLE_REQUEST: Duration = Duration::from_secs(3600);

pub struct S3Driver {
    bucket: Arc<AmazonS3>,
    /// For the one request object_store does not make (listing multipart uploads).
    http: reqwest::Client,
    /// Key prefix inside the bucket, empty or ending in `/`.
    prefix: String,
    /// Staged writes, under the node-local storage root.
    local: FsDriver,
}

/// Why the bucket could not be used: reported as "unavailable", never with credentials.
fn backend(e: object_store::Error) -> io::Error {
    match e {
        object_store::Error::NotFound { .. } => io::Error::new(io::ErrorKind::NotFound, "not in the object store"),
        e => io::Error::other(super::Unavailable(format!("object store: {e}"))),
    }
}

/// The request got no answer from the store (connection refused or broken, timed out), as
/// against an answer that refused it.
fn unanswered(e: &object_store::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<object_store::client::HttpError>() {
            return true;
        }
        source = s.source();
    }
    false
}

fn backend_message(message: &str) -> io::Error {
    io::Error::other(super::Unavailable(format!("object store: {message}")))
}

/// A GET of bytes `range` of an object.
fn in_range(range: Range<u64>) -> GetOptions {
    GetOptions { range: Some(GetRange::Bounded(range)), ..Default::default() }
}

/// An object's modification time, in Unix seconds.
fn modified(meta: &object_store::ObjectMeta) -> u64 {
    meta.last_modified.timestamp().max(0) as u64
}

fn not_found_is_none<T>(r: object_store::Result<T>) -> io::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(backend(e)),
    }
}

impl S3Driver {
    /// Connect (lazily: nothing is sent until the first request). `timeout` bounds each request.
    pub fn new(config: &S3Config, local: FsDriver, timeout: Duration) -> io::Result<S3Driver> {
        use object_store::aws::AmazonS3ConfigKey as K;
        // A stalled store is caught by the read timeout; a whole request (a large part) may take
        // longer.
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_client_options(
                ClientOptions::new()
                    .with_read_timeout(timeout)
                    .with_connect_timeout(timeout.min(Duration::from_secs(10)))
                    .with_timeout(WHOLE_REQUEST),
            )
            .with_retry(RetryConfig { max_retries: 1, retry_timeout: timeout * 2, ..Default::default() });
        if let Some(endpoint) = &config.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        // An http:// endpoint, from the file or from AWS_ENDPOINT.
        if builder.get_config_value(&K::Endpoint).is_some_and(|e| e.to_ascii_lowercase().starts_with("http://")) {
            builder = builder.with_allow_http(true);
        }
        if let Some(id) = &config.access_key_id {
            builder = builder.with_access_key_id(id);
        }
        if let Some(secret) = &config.secret_access_key {
            builder = builder.with_secret_access_key(secret);
        }
        let bucket = builder.build().map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let prefix = match config.prefix.trim_matches('/') {
            "" => String::new(),
            p => format!("{p}/"),
        };
        let http = reqwest::Client::builder()
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .read_timeout(timeout)
            .build()
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(S3Driver { bucket: Arc::new(bucket), http, prefix, local })
    }

    fn key(&self, path: &str) -> Key {
        Key::from(format!("{}{}", self.prefix, path.trim_matches('/')))
    }

    fn parts_key(&self, path: &str) -> Key {
        self.key(&format!("{}.parts", path.trim_matches('/')))
    }

    fn local(path: &str) -> bool {
        path.starts_with(LOCAL)
    }

    fn appended(path: &str) -> bool {
        path.starts_with(APPENDED)
    }

    /// The part objects of an appended file, in order: (key, first offset, size, modified).
    async fn parts(&self, path: &str) -> io::Result<Vec<(Key, u64, u64, u64)>> {
        let prefix = self.parts_key(path);
        let mut parts: Vec<(Key, u64, u64, u64)> = self
            .bucket
            .list(Some(&prefix))
            .map_ok(|m| {
                // `<offset>-<unique>`: two appends racing at one offset never overwrite each other.
                let offset = m
                    .location
                    .filename()
                    .and_then(|f| f.split('-').next())
                    .and_then(|o| o.parse::<u64>().ok())
                    .unwrap_or(u64::MAX);
                let modified = modified(&m);
                (m.location, offset, m.size, modified)
            })
            .try_collect()
            .await
            .map_err(backend)?;
        parts.sort_by_key(|p| p.1);
        Ok(parts)
    }

    /// Bytes `range` of one object (clipped at its end).
    async fn get_range(&self, key: &Key, range: Range<u64>) -> io::Result<Option<Bytes>> {
        if range.is_empty() {
            return Ok(self.head(key).await?.map(|_| Bytes::new()));
        }
        let options = in_range(range.clone());
        match self.bucket.get_opts(key, options).await {
            Ok(r) => Ok(Some(r.bytes().await.map_err(backend)?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            // A store that did not answer would not answer a HEAD either: no second wait.
            Err(e) if unanswered(&e) => Err(backend(e)),
            // A range starting at or past the end (an empty object included).
            Err(e) => match self.head(key).await? {
                Some(size) if size <= range.start => Ok(Some(Bytes::new())),
                _ => Err(backend(e)),
            },
        }
    }

    async fn head(&self, key: &Key) -> io::Result<Option<u64>> {
        Ok(not_found_is_none(self.bucket.head(key).await)?.map(|m| m.size))
    }

    /// Everything under `prefix/`, and `prefix` itself.
    async fn delete_tree(&self, key: &Key) -> io::Result<()> {
        let below: Vec<Key> =
            self.bucket.list(Some(key)).map_ok(|m| m.location).try_collect().await.map_err(backend)?;
        for k in below.iter().chain(std::iter::once(key)) {
            match self.bucket.delete(k).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(backend(e)),
            }
        }
        Ok(())
    }

    /// A reader over the bytes of `path` from `offset`: one object, or the parts of an
    /// appended file in order.
    async fn reader(&self, path: &str, offset: u64) -> io::Result<Option<Reader>> {
        let mut pieces: Vec<(Key, Range<u64>)> = Vec::new();
        let key = self.key(path);
        let Some(size) = self.head(&key).await? else { return Ok(None) };
        let mut start = 0;
        let mut objects = vec![(key, 0, size)];
        if Self::appended(path) {
            objects.extend(self.parts(path).await?.into_iter().map(|(k, offset, len, _)| (k, offset, len)));
        }
        // Each part must start where the ones before it end: a gap or two parts at one offset
        // mean requests raced (on two replicas); such a session is refused, never guessed at.
        let mut expected = 0;
        for (_, offset, len) in objects.iter().skip(1) {
            if *offset != size + expected {
                return Err(io::Error::other(format!(
                    "{path}: the upload session was changed by concurrent requests; start the upload again"
                )));
            }
            expected += len;
        }
        for (k, _, len) in objects {
            let end = start + len;
            if end > offset && len > 0 {
                pieces.push((k, offset.max(start) - start..len));
            }
            start = end;
        }
        let bucket = self.bucket.clone();
        let stream = futures_util::stream::iter(pieces)
            .then(move |(k, range)| {
                let bucket = bucket.clone();
                async move {
                    let options = in_range(range);
                    bucket.get_opts(&k, options).await.map(|r| r.into_stream()).map_err(backend)
                }
            })
            .map_ok(|s| s.map_err(backend))
            .try_flatten();
        Ok(Some(Box::new(tokio_util::io::StreamReader::new(Box::pin(stream)))))
    }
}

#[async_trait]
impl Driver for S3Driver {
    async fn get(&self, path: &str) -> io::Result<Option<Vec<u8>>> {
        if Self::local(path) {
            return self.local.get(path).await;
        }
        let Some(r) = not_found_is_none(self.bucket.get(&self.key(path)).await)? else { return Ok(None) };
        Ok(Some(r.bytes().await.map_err(backend)?.to_vec()))
    }

    async fn put(&self, path: &str, content: &[u8]) -> io::Result<()> {
        if Self::local(path) {
            return self.local.put(path, content).await;
        }
        self.bucket.put(&self.key(path), PutPayload::from(content.to_vec())).await.map(|_| ()).map_err(backend)
    }

    async fn put_private(&self, path: &str, content: &[u8]) -> io::Result<()> {
        // Objects are private to the bucket's credentials.
        self.put(path, content).await
    }

    async fn delete(&self, path: &str) -> io::Result<()> {
        if Self::local(path) {
            return self.local.delete(path).await;
        }
        self.delete_tree(&self.key(path)).await
    }

    async fn list(&self, path: &str) -> io::Result<Vec<String>> {
        let listed = self.bucket.list_with_delimiter(Some(&self.key(path))).await.map_err(backend)?;
        let mut names: Vec<String> = listed
            .common_prefixes
            .iter()
            .chain(listed.objects.iter().map(|m| &m.location))
            .filter_map(|k| k.filename().map(str::to_string))
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    async fn size(&self, path: &str) -> io::Result<Option<u64>> {
        if Self::local(path) {
            return self.local.size(path).await;
        }
        let Some(size) = self.head(&self.key(path)).await? else { return Ok(None) };
        if !Self::appended(path) {
            return Ok(Some(size));
        }
        Ok(Some(size + self.parts(path).await?.iter().map(|p| p.2).sum::<u64>()))
    }

    async fn stat(&self, path: &str) -> io::Result<Option<(u64, u64)>> {
        if Self::local(path) {
            return self.local.stat(path).await;
        }
        let Some(meta) = not_found_is_none(self.bucket.head(&self.key(path)).await)? else { return Ok(None) };
        let mut size = meta.size;
        let mut mtime = modified(&meta);
        if Self::appended(path) {
            for (_, _, len, modified) in self.parts(path).await? {
                size += len;
                mtime = mtime.max(modified);
            }
        }
        // `touch` leaves a marker: objects cannot have their time changed.
        if let Some(touched) = not_found_is_none(self.bucket.head(&self.key(&format!("{path}.touched"))).await)? {
            mtime = mtime.max(modified(&touched));
        }
        Ok(Some((size, mtime)))
    }

    async fn open_read(&self, path: &str, offset: u64) -> io::Result<Option<Reader>> {
        if Self::local(path) {
            return self.local.open_read(path, offset).await;
        }
        self.reader(path, offset).await
    }

    async fn read_at(&self, path: &str, offset: u64, len: usize) -> io::Result<Option<Bytes>> {
        if Self::local(path) {
            return self.local.read_at(path, offset, len).await;
        }
        if !Self::appended(path) {
            return self.get_range(&self.key(path), offset..offset + len as u64).await;
        }
        use tokio::io::AsyncReadExt;
        let Some(r) = self.reader(path, offset).await? else { return Ok(None) };
        let mut buf = Vec::with_capacity(len);
        r.take(len as u64).read_to_end(&mut buf).await?;
        Ok(Some(Bytes::from(buf)))
    }

    async fn open_append(&self, path: &str) -> io::Result<Writer> {
        if !Self::appended(path) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("{path}: not appendable in an object store"),
            ));
        }
        let Some(size) = self.size(path).await? else {
            return Err(io::Error::new(io::ErrorKind::NotFound, path.to_string()));
        };
        let staging = self.local.staging_path();
        let file = tokio::fs::File::create(self.local.root().join(&staging)).await?;
        let part = self.parts_key(path).clone().join(format!("{size:020}-{}", unique_name()));
        Ok(Box::new(PartWriter {
            file: Some(file),
            staging,
            part,
            bucket: self.bucket.clone(),
            local_root: self.local.root().to_path_buf(),
            written: 0,
            upload: None,
        }))
    }

    async fn truncate(&self, path: &str, len: u64) -> io::Result<()> {
        if Self::local(path) {
            return self.local.truncate(path, len).await;
        }
        let key = self.key(path);
        let Some(first) = self.head(&key).await? else {
            return Err(io::Error::new(io::ErrorKind::NotFound, path.to_string()));
        };
        if first > len {
            let kept = self.get_range(&key, 0..len).await?.unwrap_or_default();
            self.bucket.put(&key, PutPayload::from(kept)).await.map_err(backend)?;
        }
        for (k, offset, size, _) in self.parts(path).await? {
            if offset >= len {
                self.bucket.delete(&k).await.map_err(backend)?;
            } else if offset + size > len {
                // Written anew under a key of its own, then the old one removed: a part is never
                // overwritten.
                let kept = self.get_range(&k, 0..len - offset).await?.unwrap_or_default();
                let cut = self.parts_key(path).clone().join(format!("{offset:020}-{}", unique_name()));
                self.bucket.put(&cut, PutPayload::from(kept)).await.map_err(backend)?;
                self.bucket.delete(&k).await.map_err(backend)?;
            }
        }
        Ok(())
    }

    async fn create_staged(&self, path: &str) -> io::Result<Box<dyn StagedFile>> {
        self.local.create_staged(path).await
    }

    fn discard_staged(&self, path: &str) {
        self.local.discard_staged(path)
    }

    async fn touch(&self, path: &str) -> io::Result<()> {
        if Self::local(path) {
            return self.local.touch(path).await;
        }
        if self.head(&self.key(path)).await?.is_none() {
            return Ok(());
        }
        self.put(&format!("{path}.touched"), b"").await
    }

    async fn commit(&self, from: &str, to: &str, expected: &Digest) -> io::Result<()> {
        // Hashed again on the way into the bucket (an upload session may have been changed by
        // another replica since it was checked).
        let key = self.key(to);
        let reader =
            if Self::local(from) { self.local.open_read(from, 0).await? } else { self.reader(from, 0).await? };
        let Some(reader) = reader else {
            return Err(io::Error::new(io::ErrorKind::NotFound, from.to_string()));
        };
        upload(&self.bucket, reader, &key, Some(expected)).await?;
        self.delete(from).await
    }

    fn staging_path(&self) -> String {
        format!("{LOCAL}{}", unique_name())
    }

    fn available(&self) -> io::Result<Option<u64>> {
        // A bucket has no "disk full" to foresee; staging space is checked as it is written.
        Ok(None)
    }

    async fn list_tree(&self, path: &str) -> io::Result<Option<Vec<(String, u64, u64)>>> {
        let root = self.key(path);
        let strip = format!("{root}/");
        let files = self
            .bucket
            .list(Some(&root))
            .map_ok(|m| {
                let key = m.location.to_string();
                let relative = key.strip_prefix(&strip).unwrap_or(&key).to_string();
                (relative, m.size, modified(&m))
            })
            .try_collect()
            .await
            .map_err(backend)?;
        Ok(Some(files))
    }

    async fn stream_range(&self, path: &str, range: Range<u64>) -> io::Result<Option<super::ByteStream>> {
        if Self::local(path) || Self::appended(path) || range.is_empty() {
            return Ok(None);
        }
        let options = in_range(range);
        let found = self.bucket.get_opts(&self.key(path), options).await.map_err(backend)?;
        Ok(Some(in_large_chunks(found.into_stream().map_err(backend).boxed())))
    }

    async fn get_versioned(&self, path: &str) -> io::Result<Option<(Vec<u8>, Version)>> {
        let Some(r) = not_found_is_none(self.bucket.get(&self.key(path)).await)? else { return Ok(None) };
        let version =
            r.meta.e_tag.clone().ok_or_else(|| backend_message("the object store gave no ETag for a read"))?;
        Ok(Some((r.bytes().await.map_err(backend)?.to_vec(), version)))
    }

    async fn put_if(&self, path: &str, content: &[u8], condition: Condition) -> io::Result<Option<Version>> {
        let mode = match condition {
            Condition::Absent => PutMode::Create,
            Condition::Unchanged(e_tag) => PutMode::Update(UpdateVersion { e_tag: Some(e_tag), version: None }),
        };
        let opts = PutOptions { mode, ..Default::default() };
        match self.bucket.put_opts(&self.key(path), PutPayload::from(content.to_vec()), opts).await {
            // Without an ETag the next compare-and-swap cannot be made.
            Ok(r) => r.e_tag.map(Some).ok_or_else(|| backend_message("the object store gave no ETag for a write")),
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => Ok(None),
            Err(e) => Err(backend(e)),
        }
    }

    async fn purge_abandoned_writes(&self, age: Duration) -> io::Result<usize> {
        use object_store::multipart::MultipartStore;
        use object_store::signer::{Method, SignedUrlOptions, Signer};
        // object_store cannot list multipart uploads: signed ListMultipartUploads requests, a
        // page (up to 1,000 uploads) at a time.
        let now = time::OffsetDateTime::now_utc();
        let mut aborted = 0;
        let mut after: Option<(String, String)> = None;
        for _ in 0..MAX_UPLOAD_PAGES {
            let mut query = vec![("uploads", String::new()), ("prefix", self.prefix.clone())];
            if let Some((key, upload)) = &after {
                query.push(("key-marker", key.clone()));
                if !upload.is_empty() {
                    query.push(("upload-id-marker", upload.clone()));
                }
            }
            let options = SignedUrlOptions::new().with_query(query);
            let url = self
                .bucket
                .signed_url_opts(Method::GET, &Key::from(""), Duration::from_secs(60), &options)
                .await
                .map_err(backend)?;
            // The URL carries a signature: never in an error message.
            let failed =
                |e: reqwest::Error| backend_message(&format!("listing multipart uploads: {}", e.without_url()));
            let listing = self.http.get(url).send().await.and_then(|r| r.error_for_status()).map_err(failed)?;
            let text = listing.text().await.map_err(failed)?;
            for (key, id, initiated) in multipart_uploads(&text) {
                let started = time::OffsetDateTime::parse(&initiated, &time::format_description::well_known::Rfc3339);
                if started.is_ok_and(|t| now - t >= age) {
                    match self.bucket.abort_multipart(&Key::from(key), &id).await {
                        Ok(()) => aborted += 1,
                        // Aborted by another replica in the meantime.
                        Err(object_store::Error::NotFound { .. }) => {}
                        Err(e) => return Err(backend(e)),
                    }
                }
            }
            match next_upload_page(&text) {
                // A store that names the same page again would be asked for it forever.
                Some(next) if Some(&next) != after.as_ref() => after = Some(next),
                Some(_) => {
                    tracing::warn!("the object store's multipart-upload listing does not advance; the rest waits for the next purge");
                    return Ok(aborted);
                }
                None => return Ok(aborted),
            }
        }
        tracing::info!(
            pages = MAX_UPLOAD_PAGES,
            aborted,
            "multipart uploads: the rest of the listing waits for the next purge"
        );
        Ok(aborted)
    }

    async fn presigned_get(&self, path: &str, ttl: Duration) -> io::Result<Option<String>> {
        use object_store::signer::{Method, Signer};
        let url = self.bucket.signed_url(Method::GET, &self.key(path), ttl).await.map_err(backend)?;
        Ok(Some(url.to_string()))
    }
}

/// Pages of a multipart-upload listing read in one purge: a million uploads, far more than a
/// bucket used by regmirror gathers in an `upload_expiry`; the rest wait for the next purge.
const MAX_UPLOAD_PAGES: usize = 1000;

/// The uploads in a ListMultipartUploads answer: (key, upload id, initiated). The answer is a
/// flat, well-known XML document; three fields of each `<Upload>` are all that is needed.
fn multipart_uploads(xml: &str) -> Vec<(String, String, String)> {
    xml.split("<Upload>")
        .skip(1)
        .filter_map(|block| {
            let block = block.split("</Upload>").next()?;
            Some((xml_field(block, "Key")?, xml_field(block, "UploadId")?, xml_field(block, "Initiated")?))
        })
        .collect()
}

/// Where the next page of a truncated ListMultipartUploads answer starts: (key marker, upload
/// id marker). None on the last page.
fn next_upload_page(xml: &str) -> Option<(String, String)> {
    // The markers are top-level fields; an upload's own fields come after its `<Upload>`.
    let head = xml.split("<Upload>").next().unwrap_or(xml);
    let tail = xml.rsplit("</Upload>").next().unwrap_or(xml);
    let field = |name: &str| xml_field(head, name).or_else(|| xml_field(tail, name));
    if field("IsTruncated").as_deref() != Some("true") {
        return None;
    }
    // Stores that leave the markers out mean the page's last upload (as S3 defines them).
    let last = multipart_uploads(xml).pop();
    let key = field("NextKeyMarker").filter(|k| !k.is_empty()).or_else(|| last.as_ref().map(|u| u.0.clone()))?;
    let upload = field("NextUploadIdMarker").filter(|u| !u.is_empty()).or_else(|| last.map(|u| u.1));
    Some((key, upload.unwrap_or_default()))
}

/// The text of the first `<name>` element in `xml`.
fn xml_field(xml: &str, name: &str) -> Option<String> {
    let start = xml.find(&format!("<{name}>"))? + name.len() + 2;
    let end = start + xml[start..].find(&format!("</{name}>"))?;
    Some(unescape_xml(&xml[start..end]))
}

fn unescape_xml(s: &str) -> String {
    s.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", "\"").replace("&apos;", "'").replace("&amp;", "&")
}

/// The network hands a response over in pieces of a few KiB; a response body sent on in pieces
/// of `super::CHUNK` costs far less per byte.
fn in_large_chunks(pieces: super::ByteStream) -> super::ByteStream {
    futures_util::stream::unfold(Some(pieces), |pieces| async move {
        let mut pieces = pieces?;
        let mut chunk = bytes::BytesMut::new();
        loop {
            match pieces.next().await {
                Some(Ok(piece)) if chunk.is_empty() && piece.len() >= super::CHUNK => {
                    return Some((Ok(piece), Some(pieces)));
                }
                Some(Ok(piece)) => {
                    chunk.extend_from_slice(&piece);
                    if chunk.len() >= super::CHUNK {
                        return Some((Ok(chunk.freeze()), Some(pieces)));
                    }
                }
                Some(Err(e)) => return Some((Err(e), None)),
                None if chunk.is_empty() => return None,
                None => return Some((Ok(chunk.freeze()), None)),
            }
        }
    })
    .boxed()
}

/// Stream a reader into `to` as one multipart upload, visible only once complete. With
/// `expected`, the bytes are hashed on the way and the upload completes only when they match:
/// whatever happened to the source meanwhile, a blob key never holds other content. Aborted on
/// any error, and when dropped half way (a client gone, a shutdown).
async fn upload(bucket: &AmazonS3, mut from: Reader, to: &Key, expected: Option<&Digest>) -> io::Result<()> {
    use tokio::io::AsyncReadExt;
    let upload = bucket.put_multipart(to).await.map_err(backend)?;
    let mut writer = Unfinished(Some(WriteMultipart::new_with_chunk_size(upload, PART)));
    let mut hasher = expected.map(|d| Hasher::new(d.algorithm()));
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        if let Some(h) = hasher.as_mut() {
            h.update(&buf[..n]);
        }
        let w = writer.get()?;
        w.wait_for_capacity(PARTS_IN_FLIGHT).await.map_err(backend)?;
        w.write(&buf[..n]);
    }
    if let (Some(h), Some(expected)) = (hasher, expected) {
        let actual = h.finish();
        if &actual != expected {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("content {actual} is not {expected}: not stored"),
            ));
        }
    }
    writer.finish().await
}

/// A multipart upload until it is finished: aborted when dropped before.
struct Unfinished(Option<WriteMultipart>);

impl Unfinished {
    fn get(&mut self) -> io::Result<&mut WriteMultipart> {
        self.0.as_mut().ok_or_else(|| io::Error::other("upload already finished"))
    }

    async fn finish(mut self) -> io::Result<()> {
        match self.0.take() {
            Some(w) => w.finish().await.map(|_| ()).map_err(backend),
            None => Ok(()),
        }
    }
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if let (Some(w), Ok(rt)) = (self.0.take(), tokio::runtime::Handle::try_current()) {
            rt.spawn(async move {
                if let Err(e) = w.abort().await {
                    tracing::warn!(error = %e, "could not abort a multipart upload (a bucket lifecycle rule for incomplete uploads cleans it up)");
                }
            });
        }
    }
}

/// One request body appended to an upload session: written to a local file, uploaded as the
/// session's next part object when the writer is shut down.
struct PartWriter {
    file: Option<tokio::fs::File>,
    staging: String,
    part: Key,
    bucket: Arc<AmazonS3>,
    local_root: std::path::PathBuf,
    written: u64,
    upload: Option<Pin<Box<dyn std::future::Future<Output = io::Result<()>> + Send>>>,
}

impl AsyncWrite for PartWriter {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let Some(file) = self.file.as_mut() else {
            return Poll::Ready(Err(io::Error::other("write after shutdown")));
        };
        let n = std::task::ready!(Pin::new(file).poll_write(cx, buf))?;
        self.written += n as u64;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.file.as_mut() {
            Some(f) => Pin::new(f).poll_flush(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(f) = self.file.as_mut() {
            std::task::ready!(Pin::new(f).poll_shutdown(cx))?;
            self.file = None;
            let (bucket, part, path) = (self.bucket.clone(), self.part.clone(), self.local_root.join(&self.staging));
            let empty = self.written == 0;
            self.upload = Some(Box::pin(async move {
                let result = if empty {
                    Ok(())
                } else {
                    match tokio::fs::File::open(&path).await {
                        Ok(f) => upload(&bucket, Box::new(f), &part, None).await,
                        Err(e) => Err(e),
                    }
                };
                let _ = tokio::fs::remove_file(&path).await;
                result
            }));
        }
        match self.upload.as_mut() {
            Some(upload) => {
                let result = std::task::ready!(upload.as_mut().poll(cx));
                self.upload = None;
                Poll::Ready(result)
            }
            None => Poll::Ready(Ok(())),
        }
    }
}

impl Drop for PartWriter {
    fn drop(&mut self) {
        // Never shut down, or dropped while uploading: the local copy goes either way.
        let _ = std::fs::remove_file(self.local_root.join(&self.staging));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn multipart_uploads_are_read_from_a_listing() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListMultipartUploadsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Bucket>regmirror</Bucket>
<Upload><Key>p/blobs/sha256/aa/a&amp;b/data</Key><UploadId>id-1</UploadId><Initiated>2026-11-30T04:00:00.000Z</Initiated></Upload>
<Upload><Key>p/x</Key><UploadId>id-2</UploadId></Upload>
<Upload><Key>p/y</Key><UploadId>id-3</UploadId><Initiated>2026-11-29T01:02:03Z</Initiated></Upload>
</ListMultipartUploadsResult>"#;
        assert_eq!(
            super::multipart_uploads(xml),
            vec![
                ("p/blobs/sha256/aa/a&b/data".into(), "id-1".into(), "2026-11-30T04:00:00.000Z".into()),
                ("p/y".into(), "id-3".into(), "2026-11-29T01:02:03Z".into()),
            ]
        );
        assert!(super::multipart_uploads("<Error><Code>AccessDenied</Code></Error>").is_empty());
        assert_eq!(super::next_upload_page(xml), None);
    }

    /// A client of the S3 API at `endpoint`, trying each request once.
    fn store_at(endpoint: String) -> super::AmazonS3 {
        super::AmazonS3Builder::new()
            .with_bucket_name("b")
            .with_region("us-east-1")
            .with_endpoint(endpoint)
            .with_allow_http(true)
            .with_access_key_id("id")
            .with_secret_access_key("secret")
            .with_retry(object_store::RetryConfig { max_retries: 0, ..Default::default() })
            .build()
            .unwrap()
    }

    #[tokio::test]
    async fn a_store_that_does_not_answer_is_told_from_one_that_refuses() {
        use object_store::{ObjectStore, ObjectStoreExt};
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let store = store_at(endpoint);
        let e = store.get(&super::Key::from("x")).await.unwrap_err();
        assert!(super::unanswered(&e), "{e:?}");
        // A store that answers, if only to refuse the range.
        let refusing = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", refusing.local_addr().unwrap());
        std::thread::spawn(move || {
            use std::io::{BufRead, Write};
            for stream in refusing.incoming().flatten() {
                let mut reader = std::io::BufReader::new(&stream);
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let answer = "HTTP/1.1 416 Range Not Satisfiable\r\ncontent-length: 0\r\n\r\n";
                let _ = (&stream).write_all(answer.as_bytes());
            }
        });
        let store = store_at(endpoint);
        let options = super::in_range(10..20);
        let refused = store.get_opts(&super::Key::from("x"), options).await.unwrap_err();
        assert!(!super::unanswered(&refused), "{refused:?}");
    }

    #[test]
    fn a_truncated_listing_names_where_the_next_page_starts() {
        // As AWS answers: the markers before the uploads, IsTruncated among them.
        let aws = r#"<ListMultipartUploadsResult><Bucket>b</Bucket><KeyMarker></KeyMarker><UploadIdMarker></UploadIdMarker>
<NextKeyMarker>p/k&amp;1</NextKeyMarker><NextUploadIdMarker>id-9</NextUploadIdMarker><MaxUploads>1</MaxUploads><IsTruncated>true</IsTruncated>
<Upload><Key>p/k&amp;1</Key><UploadId>id-9</UploadId><Initiated>2026-11-29T01:02:03Z</Initiated></Upload></ListMultipartUploadsResult>"#;
        assert_eq!(super::next_upload_page(aws), Some(("p/k&1".into(), "id-9".into())));
        // Fields after the uploads, and an upload whose key looks like a marker, change nothing.
        let after = r#"<ListMultipartUploadsResult><Upload><Key>IsTruncated</Key><UploadId>u</UploadId></Upload>
<NextKeyMarker>z</NextKeyMarker><NextUploadIdMarker>u</NextUploadIdMarker><IsTruncated>true</IsTruncated></ListMultipartUploadsResult>"#;
        assert_eq!(super::next_upload_page(after), Some(("z".into(), "u".into())));
        assert_eq!(super::next_upload_page("<IsTruncated>false</IsTruncated>"), None);
        // Markers left out or empty: the page's last upload, as S3 defines them.
        let bare = r#"<ListMultipartUploadsResult><NextKeyMarker></NextKeyMarker><IsTruncated>true</IsTruncated>
<Upload><Key>p/a</Key><UploadId>u1</UploadId><Initiated>2026-11-29T01:02:03Z</Initiated></Upload>
<Upload><Key>p/b</Key><UploadId>u2</UploadId><Initiated>2026-11-29T01:02:03Z</Initiated></Upload></ListMultipartUploadsResult>"#;
        assert_eq!(super::next_upload_page(bare), Some(("p/b".into(), "u2".into())));
        assert_eq!(super::next_upload_page("<IsTruncated>true</IsTruncated>"), None);
        assert_eq!(super::next_upload_page("<Error><Code>SlowDown</Code></Error>"), None);
    }
}
