//! Shared test helpers: regmirror in-process on 127.0.0.1:0, the real binary as a child process,
//! and small builders for blobs, manifests and OCI image layouts.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use futures_util::StreamExt;
use regmirror::app::{router, start, AppState};
use regmirror::config::Config;
use regmirror::server::{run, Listener};
use serde_json::json;
use sha2::Digest as _;

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// The test's configuration on the backend the run asks for: REGMIRROR_TEST_BACKEND=s3 puts the
/// store in the shared SeaweedFS (under a key prefix of its own), anything else leaves it as is.
pub fn with_test_backend(toml: &str, base: &Path) -> String {
    if std::env::var("REGMIRROR_TEST_BACKEND").as_deref() != Ok("s3") {
        return toml.to_string();
    }
    let Some(server) = s3::shared() else { return toml.to_string() };
    let mut table: toml::Table = toml.parse().expect("test configuration");
    if table.get("storage").and_then(|s| s.get("backend")).is_some() {
        return toml.to_string(); // the test chose its backend itself
    }
    let storage = table.entry("storage").or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let storage = storage.as_table_mut().expect("[storage] is a table");
    storage.insert("backend".into(), "s3".into());
    storage.insert("s3".into(), toml::Value::Table(s3::storage_toml(server, base).parse().expect("[storage.s3]")));
    toml::to_string(&table).expect("toml")
}

/// regmirror running inside the test process.
pub struct TestServer {
    pub addr: SocketAddr,
    pub state: AppState,
    pub dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    /// Start with `storage.root` in a fresh temp dir plus the given TOML.
    pub async fn start(toml: &str) -> TestServer {
        Self::start_in(tempfile::tempdir().unwrap(), toml).await
    }

    /// `@SELF@` in the TOML becomes the server's own URL (`[cluster] advertise`).
    pub async fn start_in(dir: tempfile::TempDir, toml: &str) -> TestServer {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let toml = &with_test_backend(&toml.replace("@SELF@", &format!("http://{addr}")), dir.path());
        let config = Config::parse(toml, dir.path()).unwrap_or_else(|e| panic!("config: {e:?}"));
        // The same start as `regmirror serve`: store indexed, background tasks running.
        let state = start(config).await.unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let listeners = vec![Listener { tcp, tls: None, app: router(state.clone()) }];
        let metrics = state.metrics.clone();
        let limits = state.config.limits.clone();
        let task = tokio::spawn(async move {
            let _ = run(
                listeners,
                metrics,
                async {
                    let _ = stopped.await;
                },
                std::time::Duration::from_secs(1),
                limits,
            )
            .await;
        });
        TestServer { addr, state, dir, stop: Some(stop), task: Some(task) }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Stop serving; the store stays in `dir`.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        // As `regmirror serve` ends.
        regmirror::app::shutdown(&self.state).await;
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, dir)
    }

    pub fn metrics(&self) -> String {
        self.state.metrics.render()
    }
}

/// The value of one metric series (exact label set, in the order rendered), or 0.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

pub fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

/// Push a blob monolithically; returns its digest.
pub async fn push_blob(c: &reqwest::Client, base: &str, repo: &str, bytes: &[u8]) -> String {
    let d = sha256(bytes);
    let r = c.post(format!("{base}/v2/{repo}/blobs/uploads/?digest={d}")).body(bytes.to_vec()).send().await.unwrap();
    let r = if r.status() == 202 {
        // distribution 2.8 opens a session instead of taking the body: finish it with a PUT.
        let loc = r.headers()["location"].to_str().unwrap().to_string();
        let url = if loc.starts_with("http") { loc } else { format!("{base}{loc}") };
        let sep = if url.contains('?') { '&' } else { '?' };
        c.put(format!("{url}{sep}digest={d}")).body(bytes.to_vec()).send().await.unwrap()
    } else {
        r
    };
    assert_eq!(r.status(), 201, "push blob to {repo}: {}", r.text().await.unwrap_or_default());
    d
}

pub async fn put_manifest(
    c: &reqwest::Client,
    base: &str,
    repo: &str,
    reference: &str,
    media_type: &str,
    body: &[u8],
) -> reqwest::Response {
    c.put(format!("{base}/v2/{repo}/manifests/{reference}"))
        .header("content-type", media_type)
        .body(body.to_vec())
        .send()
        .await
        .unwrap()
}

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// An OCI image manifest over a config and layers that are already pushed.
pub fn image_manifest(config: &[u8], layers: &[&[u8]]) -> Vec<u8> {
    let layers: Vec<_> = layers.iter().map(|l| json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha256(l), "size": l.len()})).collect();
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(config), "size": config.len()},
        "layers": layers,
    }))
    .unwrap()
}

/// Push a small image (config + one layer) and tag it; returns the manifest bytes.
pub async fn push_image(c: &reqwest::Client, base: &str, repo: &str, tag: &str, seed: &str) -> Vec<u8> {
    let config = format!("{{\"architecture\":\"amd64\",\"os\":\"linux\",\"seed\":\"{seed}\"}}").into_bytes();
    let layer = format!("layer of {seed}").into_bytes();
    push_blob(c, base, repo, &config).await;
    push_blob(c, base, repo, &layer).await;
    let m = image_manifest(&config, &[&layer]);
    let r = put_manifest(c, base, repo, tag, OCI_MANIFEST, &m).await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
    m
}

/// A gzip'd tar holding one file: a real layer for real clients.
pub fn tar_gz_layer(name: &str, content: &[u8]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(content.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_cksum();
    tar.append_data(&mut header, name, content).unwrap();
    let tar = tar.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    gz.finish().unwrap()
}

/// Write an OCI image layout at `dir` with tag `tag`: a single-arch image, or (with several
/// platforms) an index over one image per platform. Returns the top manifest's digest.
pub fn write_oci_layout(dir: &Path, tag: &str, platforms: &[(&str, &str)], seed: &str) -> String {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| -> String {
        let d = sha256(bytes);
        std::fs::write(blobs.join(d.trim_start_matches("sha256:")), bytes).unwrap();
        d
    };
    let mut descriptors = Vec::new();
    for (os, arch) in platforms {
        let layer = tar_gz_layer("hello.txt", format!("hello from {seed} {os}/{arch}\n").as_bytes());
        let diff_id = {
            let mut d = flate2::read::GzDecoder::new(&layer[..]);
            let mut raw = Vec::new();
            std::io::Read::read_to_end(&mut d, &mut raw).unwrap();
            sha256(&raw)
        };
        let config = serde_json::to_vec(&json!({
            "architecture": arch, "os": os,
            "config": {"Cmd": ["/hello"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }))
        .unwrap();
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(&config), "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": put(&layer), "size": layer.len()}],
        }))
        .unwrap();
        descriptors.push(json!({"mediaType": OCI_MANIFEST, "digest": put(&manifest), "size": manifest.len(), "platform": {"os": os, "architecture": arch}}));
    }
    let top = if descriptors.len() == 1 {
        descriptors.remove(0)
    } else {
        let index =
            serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors})).unwrap();
        json!({"mediaType": OCI_INDEX, "digest": put(&index), "size": index.len()})
    };
    let mut top_ref = top.clone();
    top_ref["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [top_ref]})).unwrap(),
    )
    .unwrap();
    top["digest"].as_str().unwrap().to_string()
}

/// True when a command exists; tests that need it fail loudly (never silently pass) without it,
/// unless REGMIRROR_E2E=skip.
pub fn require(cmd: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found && std::env::var("REGMIRROR_E2E").as_deref() != Ok("skip") {
        panic!("{cmd} is not installed: run the README's test command (it installs it), or set REGMIRROR_E2E=skip to skip tests with real clients");
    }
    found
}

/// Wait (bounded) until `cond` holds: for states a test cannot be told about directly.
pub async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
}

/// `eventually` for a condition that must be awaited (a request).
pub async fn eventually_async<F, Fut>(what: &str, cond: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !cond().await {
        assert!(std::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Poll `url` until it answers (bounded); for servers started as processes.
pub async fn wait_until_up(url: &str) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let c = reqwest::Client::builder().danger_accept_invalid_certs(true).build().unwrap();
    for _ in 0..200 {
        if c.get(url).send().await.is_ok() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("{url} did not come up");
}

/// Debian's docker-registry (distribution 2.8) on 127.0.0.1, optionally as a proxy.
pub struct RefRegistry {
    pub child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl RefRegistry {
    pub async fn start(proxy_of: Option<&str>) -> RefRegistry {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let proxy = proxy_of.map(|u| format!("proxy:\n  remoteurl: {u}\n")).unwrap_or_default();
        let cfg = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{proxy}",
            dir.path().join("data").display()
        );
        let cfg_path = dir.path().join("config.yml");
        std::fs::write(&cfg_path, cfg).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry");
        wait_until_up(&format!("http://127.0.0.1:{port}/v2/")).await;
        RefRegistry { child, port, dir }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RefRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The regmirror binary as a child process (for restarts, signals and kill -9).
pub struct Proc {
    pub child: Child,
    pub config: PathBuf,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(config: &Path, log: &Path) -> Proc {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_regmirror"))
            .arg("serve")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Proc { child, config: config.to_path_buf(), log: log.to_path_buf() }
    }

    pub fn signal(&self, sig: &str) {
        Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status().unwrap();
    }

    /// Peak resident memory (VmHWM) in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
pub mod hub;
pub mod s3;

pub const MIB: usize = 1 << 20;

/// `size` bytes that differ with `seed`.
pub fn blob_of(size: usize, seed: u8) -> Vec<u8> {
    (0..size).map(|i| ((i * 31) as u8).wrapping_add(seed)).collect()
}

/// A blob and an image manifest over it, published on the hub as `library/<repo>:<tag>`:
/// (blob digest, manifest digest, manifest bytes).
pub fn hub_image(hub: &hub::Hub, repo: &str, tag: &str, blob: Vec<u8>) -> (String, String, Vec<u8>) {
    let config = format!("{{\"architecture\":\"amd64\",\"os\":\"linux\",\"repo\":\"{repo}\"}}").into_bytes();
    let blob_digest = hub.add_blob(blob.clone());
    hub.add_blob(config.clone());
    let m = image_manifest(&config, &[&blob]);
    let d = hub.add_manifest(&format!("library/{repo}"), tag, OCI_MANIFEST, m.clone());
    (blob_digest, d, m)
}

/// Bytes of blob content a regmirror store under `dir` holds on disk.
pub fn blobs_on_disk(dir: &Path) -> u64 {
    fn walk(p: &Path) -> u64 {
        std::fs::read_dir(p).map_or(0, |rd| {
            rd.flatten()
                .map(|e| if e.path().is_dir() { walk(&e.path()) } else { e.metadata().map_or(0, |m| m.len()) })
                .sum()
        })
    }
    walk(&dir.join("data/blobs"))
}

/// Whether the store of `s` holds blob `d`.
pub fn blob_present(s: &TestServer, d: &str) -> bool {
    let hex = d.trim_start_matches("sha256:");
    s.dir.path().join(format!("data/blobs/sha256/{}/{hex}/data", &hex[..2])).exists()
}

// ---- The binary as a process: configs, streamed bodies ----

pub fn write_config(dir: &Path, port: u16, extra: &str) -> std::path::PathBuf {
    let path = dir.join("mirror.toml");
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nshutdown_timeout = \"30s\"\n[storage]\nroot = \"data\"\n[[upstream]]\nname = \"docker.io\"\nurl = \"http://127.0.0.1:9\"\n{extra}"
    );
    std::fs::write(&path, toml).unwrap();
    path
}

/// Deterministic pseudo-random bytes, generated in chunks so nothing large sits in memory.
pub fn chunk(seed: u64, index: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) ^ index.wrapping_mul(0xBF58476D1CE4E5B9) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn streamed_body(seed: u64, chunks: u64, chunk_len: usize) -> (reqwest::Body, String) {
    let mut h = sha2::Sha256::new();
    for i in 0..chunks {
        h.update(chunk(seed, i, chunk_len));
    }
    let digest = format!("sha256:{}", hex::encode(h.finalize()));
    let stream = futures_util::stream::iter(0..chunks).map(move |i| Ok::<_, std::io::Error>(chunk(seed, i, chunk_len)));
    (reqwest::Body::wrap_stream(stream), digest)
}

/// Upload a streamed blob monolithically to `repo`; returns its digest.
pub async fn upload_streamed(
    c: &reqwest::Client,
    base: &str,
    repo: &str,
    seed: u64,
    chunks: u64,
    chunk_len: usize,
) -> String {
    let (body, digest) = streamed_body(seed, chunks, chunk_len);
    let r = c.post(format!("{base}/v2/{repo}/blobs/uploads/?digest={digest}")).body(body).send().await.unwrap();
    assert_eq!(r.status(), 201);
    digest
}

pub async fn download_digest(resp: reqwest::Response) -> String {
    let mut h = sha2::Sha256::new();
    let mut s = resp.bytes_stream();
    while let Some(c) = s.next().await {
        h.update(c.unwrap());
    }
    format!("sha256:{}", hex::encode(h.finalize()))
}
