//! A driver that counts the backend's failures by operation (`regmirror_storage_errors_total`):
//! an object store that is down or erroring shows in the metrics by what it was asked to do.
//! Failures to reach the store count; answers such as "not found" do not.

use std::io;

use async_trait::async_trait;
use prometheus::IntCounterVec;

use super::{ByteStream, Condition, Driver, Reader, StagedFile, Version, Writer};
use crate::oci::Digest;

pub struct Counted<D> {
    inner: D,
    errors: IntCounterVec,
}

impl<D: Driver> Counted<D> {
    pub fn new(inner: D, errors: IntCounterVec) -> Self {
        Counted { inner, errors }
    }

    fn count<T>(&self, operation: &str, result: io::Result<T>) -> io::Result<T> {
        if let Err(e) = &result {
            if super::is_unavailable(e) {
                self.errors.with_label_values(&[operation]).inc();
            }
        }
        result
    }
}

#[async_trait]
impl<D: Driver> Driver for Counted<D> {
    async fn get(&self, path: &str) -> io::Result<Option<Vec<u8>>> {
        self.count("get", self.inner.get(path).await)
    }
    async fn put(&self, path: &str, content: &[u8]) -> io::Result<()> {
        self.count("put", self.inner.put(path, content).await)
    }
    async fn put_private(&self, path: &str, content: &[u8]) -> io::Result<()> {
        self.count("put", self.inner.put_private(path, content).await)
    }
    async fn delete(&self, path: &str) -> io::Result<()> {
        self.count("delete", self.inner.delete(path).await)
    }
    async fn list(&self, path: &str) -> io::Result<Vec<String>> {
        self.count("list", self.inner.list(path).await)
    }
    async fn size(&self, path: &str) -> io::Result<Option<u64>> {
        self.count("head", self.inner.size(path).await)
    }
    async fn stat(&self, path: &str) -> io::Result<Option<(u64, u64)>> {
        self.count("head", self.inner.stat(path).await)
    }
    async fn open_read(&self, path: &str, offset: u64) -> io::Result<Option<Reader>> {
        self.count("read", self.inner.open_read(path, offset).await)
    }
    async fn read_at(&self, path: &str, offset: u64, len: usize) -> io::Result<Option<bytes::Bytes>> {
        self.count("read", self.inner.read_at(path, offset, len).await)
    }
    async fn open_append(&self, path: &str) -> io::Result<Writer> {
        self.count("append", self.inner.open_append(path).await)
    }
    async fn truncate(&self, path: &str, len: u64) -> io::Result<()> {
        self.count("append", self.inner.truncate(path, len).await)
    }
    async fn create_staged(&self, path: &str) -> io::Result<Box<dyn StagedFile>> {
        self.inner.create_staged(path).await
    }
    fn discard_staged(&self, path: &str) {
        self.inner.discard_staged(path)
    }
    async fn touch(&self, path: &str) -> io::Result<()> {
        self.count("put", self.inner.touch(path).await)
    }
    async fn commit(&self, from: &str, to: &str, expected: &Digest) -> io::Result<()> {
        self.count("upload", self.inner.commit(from, to, expected).await)
    }
    fn staging_path(&self) -> String {
        self.inner.staging_path()
    }
    fn available(&self) -> io::Result<Option<u64>> {
        self.inner.available()
    }
    async fn get_versioned(&self, path: &str) -> io::Result<Option<(Vec<u8>, Version)>> {
        self.count("get", self.inner.get_versioned(path).await)
    }
    async fn put_if(&self, path: &str, content: &[u8], condition: Condition) -> io::Result<Option<Version>> {
        self.count("put", self.inner.put_if(path, content, condition).await)
    }
    async fn list_tree(&self, path: &str) -> io::Result<Option<Vec<(String, u64, u64)>>> {
        self.count("list", self.inner.list_tree(path).await)
    }
    async fn stream_range(&self, path: &str, range: std::ops::Range<u64>) -> io::Result<Option<ByteStream>> {
        use futures_util::{StreamExt, TryStreamExt};
        let stream = self.count("read", self.inner.stream_range(path, range).await)?;
        // A store that fails halfway through a body counts as well as one that fails at the start.
        let errors = self.errors.with_label_values(&["read"]);
        Ok(stream.map(|s| {
            s.inspect_err(move |e| {
                if super::is_unavailable(e) {
                    errors.inc();
                }
            })
            .boxed()
        }))
    }
    async fn purge_abandoned_writes(&self, age: std::time::Duration) -> io::Result<usize> {
        self.count("list", self.inner.purge_abandoned_writes(age).await)
    }
    async fn presigned_get(&self, path: &str, ttl: std::time::Duration) -> io::Result<Option<String>> {
        self.count("presign", self.inner.presigned_get(path, ttl).await)
    }
}
