//! The real binary as a process: crash safety under kill -9, memory with a 1 GiB blob, graceful
//! shutdown during a download, and TLS (trust, restarts, reload without dropping connections).

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use futures_util::StreamExt;
use sha2::Digest as _;

fn write_config(dir: &Path, port: u16, extra: &str) -> std::path::PathBuf {
    let path = dir.join("mirror.toml");
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nshutdown_timeout = \"30s\"\n[storage]\nroot = \"data\"\n[[upstream]]\nname = \"docker.io\"\nurl = \"http://127.0.0.1:9\"\n{extra}"
    );
    std::fs::write(&path, toml).unwrap();
    path
}

/// Deterministic pseudo-random bytes, generated in chunks so nothing large sits in memory.
fn chunk(seed: u64, index: u64, len: usize) -> Vec<u8> {
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

fn streamed_body(seed: u64, chunks: u64, chunk_len: usize) -> (reqwest::Body, String) {
    let mut h = sha2::Sha256::new();
    for i in 0..chunks {
        h.update(chunk(seed, i, chunk_len));
    }
    let digest = format!("sha256:{}", hex::encode(h.finalize()));
    let stream = futures_util::stream::iter(0..chunks).map(move |i| Ok::<_, std::io::Error>(chunk(seed, i, chunk_len)));
    (reqwest::Body::wrap_stream(stream), digest)
}

/// Upload a streamed blob monolithically to `repo`; returns its digest.
async fn upload_streamed(
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

async fn download_digest(resp: reqwest::Response) -> String {
    let mut h = sha2::Sha256::new();
    let mut s = resp.bytes_stream();
    while let Some(c) = s.next().await {
        h.update(c.unwrap());
    }
    format!("sha256:{}", hex::encode(h.finalize()))
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_during_concurrent_uploads_keeps_every_completed_blob_and_exposes_nothing_partial() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, "");
    let log = dir.path().join("log");
    let mut proc = Proc::spawn(&config, &log);
    let base = format!("http://127.0.0.1:{port}");
    wait_until_up(&format!("{base}/v2/")).await;
    let c = client();
    let completed = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let (enough_tx, mut enough_rx) = tokio::sync::watch::channel(0usize);
    let enough_tx = Arc::new(enough_tx);
    let mut tasks = Vec::new();
    for worker in 0..16u64 {
        let (c, base, completed, enough_tx) = (c.clone(), base.clone(), completed.clone(), enough_tx.clone());
        tasks.push(tokio::spawn(async move {
            for n in 0..1000u64 {
                let seed = worker * 10_000 + n;
                let (body, digest) = streamed_body(seed, 8, 64 << 10);
                // Alternate monolithic and chunked uploads.
                let ok = if n % 2 == 0 {
                    c.post(format!("{base}/v2/private/crash/blobs/uploads/?digest={digest}"))
                        .body(body)
                        .send()
                        .await
                        .map(|r| r.status() == 201)
                } else {
                    match c.post(format!("{base}/v2/private/crash/blobs/uploads/")).send().await {
                        Ok(r) if r.status() == 202 => {
                            let loc = r.headers()["location"].to_str().unwrap().to_string();
                            c.put(format!("{base}{loc}?digest={digest}"))
                                .body(body)
                                .send()
                                .await
                                .map(|r| r.status() == 201)
                        }
                        Ok(_) => Ok(false),
                        Err(e) => Err(e),
                    }
                };
                match ok {
                    Ok(true) => {
                        let mut done = completed.lock().unwrap();
                        done.push(digest);
                        enough_tx.send_replace(done.len());
                    }
                    _ => return,
                }
            }
        }));
    }
    enough_rx.wait_for(|n| *n >= 100).await.unwrap();
    proc.child.kill().unwrap();
    proc.child.wait().unwrap();
    for t in tasks {
        let _ = t.await;
    }
    let completed = completed.lock().unwrap().clone();
    assert!(completed.len() >= 100);

    // Restart on the same store: every completed upload is intact.
    let proc = Proc::spawn(&config, &log);
    wait_until_up(&format!("{base}/v2/")).await;
    for d in &completed {
        let r = c.get(format!("{base}/v2/private/crash/blobs/{d}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "completed blob {d} lost");
        assert_eq!(&download_digest(r).await, d);
    }
    // Nothing partial is visible: every file in the blob tree matches its name.
    let mut checked = 0;
    for entry in walk(&dir.path().join("data/blobs/sha256")) {
        let name = entry.parent().unwrap().file_name().unwrap().to_string_lossy().to_string();
        let bytes = std::fs::read(&entry).unwrap();
        assert_eq!(hex::encode(sha2::Sha256::digest(&bytes)), name, "{} does not match its digest", entry.display());
        checked += 1;
    }
    assert!(checked >= completed.len());
    drop(proc);
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return out };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_1_gib_blob_streams_through_in_constant_memory() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, "");
    let proc = Proc::spawn(&config, &dir.path().join("log"));
    let base = format!("http://127.0.0.1:{port}");
    wait_until_up(&format!("{base}/v2/")).await;
    let c = client();
    let digest = upload_streamed(&c, &base, "private/big", 42, 1024, 1 << 20).await;
    let r = c.get(format!("{base}/v2/private/big/blobs/{digest}")).send().await.unwrap();
    assert_eq!(r.content_length(), Some(1 << 30));
    assert_eq!(download_digest(r).await, digest);
    let peak = proc.peak_rss_kib();
    println!("peak RSS after a 1 GiB upload and download: {:.1} MiB", peak as f64 / 1024.0);
    assert!(peak > 0 && peak < 64 * 1024, "peak RSS {peak} KiB is over 64 MiB");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_a_256_mib_download_finish_then_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, "");
    let mut proc = Proc::spawn(&config, &dir.path().join("log"));
    let base = format!("http://127.0.0.1:{port}");
    wait_until_up(&format!("{base}/v2/")).await;
    let c = client();
    let digest = upload_streamed(&c, &base, "private/term", 7, 256, 1 << 20).await;
    let r = c.get(format!("{base}/v2/private/term/blobs/{digest}")).send().await.unwrap();
    let mut stream = r.bytes_stream();
    let mut h = sha2::Sha256::new();
    let first = stream.next().await.unwrap().unwrap();
    h.update(&first);
    proc.signal("TERM");
    while let Some(c) = stream.next().await {
        h.update(c.unwrap());
    }
    assert_eq!(format!("sha256:{}", hex::encode(h.finalize())), digest);
    let status = proc.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    // The store is intact after the restart.
    let _proc = Proc::spawn(&config, &dir.path().join("log"));
    wait_until_up(&format!("{base}/v2/")).await;
    let r = c.get(format!("{base}/v2/private/term/blobs/{digest}")).send().await.unwrap();
    assert_eq!(download_digest(r).await, digest);
}

fn tls_client(cas: &[&Path]) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let certs = cas.iter().map(|p| reqwest::Certificate::from_pem(&std::fs::read(p).unwrap()).unwrap());
    reqwest::Client::builder().tls_certs_only(certs).tls_info(true).build().unwrap()
}

fn peer_cert(r: &reqwest::Response) -> Vec<u8> {
    r.extensions().get::<reqwest::tls::TlsInfo>().and_then(|i| i.peer_certificate()).unwrap().to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn self_signed_tls_is_trusted_through_the_ca_only_and_survives_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let tls = "[tls]\nmode = \"self-signed\"\ndir = \"certs\"\nhosts = [\"mirror.example.internal\"]\n";
    let config = write_config(dir.path(), port, tls);
    let mut proc = Proc::spawn(&config, &dir.path().join("log"));
    let ca = dir.path().join("certs/ca.crt");
    let url = format!("https://localhost:{port}/v2/");
    wait_until_up(&url).await;
    let trusted = tls_client(&[&ca]);
    let r = trusted.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let first_leaf = peer_cert(&r);
    // Push and pull over TLS verified through the CA alone.
    let base = format!("https://localhost:{port}");
    let d = sha256(b"over tls");
    let r =
        trusted.post(format!("{base}/v2/private/tls/blobs/uploads/?digest={d}")).body("over tls").send().await.unwrap();
    assert_eq!(r.status(), 201);
    let r = trusted.get(format!("{base}/v2/private/tls/blobs/{d}")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "over tls");
    assert_eq!(
        trusted.get(format!("https://127.0.0.1:{port}/ca.crt")).send().await.unwrap().bytes().await.unwrap(),
        std::fs::read(&ca).unwrap()
    );
    // Without the CA: a certificate error.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let untrusted = reqwest::Client::builder().tls_certs_only([]).build().unwrap();
    let err = untrusted.get(&url).send().await.unwrap_err();
    assert!(format!("{:?}", err).to_lowercase().contains("certificate"), "{err:?}");
    // The SANs carry the configured host.
    let pem = std::fs::read_to_string(dir.path().join("certs/server.crt")).unwrap();
    let text = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut ch| {
            use std::io::Write;
            ch.stdin.take().unwrap().write_all(pem.as_bytes())?;
            ch.wait_with_output()
        });
    if let Ok(out) = text {
        let sans = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(sans.contains("DNS:mirror.example.internal") && sans.contains("IP Address:127.0.0.1"), "{sans}");
    }

    // A restart reuses CA and leaf; a changed `hosts` re-issues the leaf from the same CA.
    let ca_before = std::fs::read(&ca).unwrap();
    proc.signal("TERM");
    proc.child.wait().unwrap();
    let mut proc = Proc::spawn(&config, &dir.path().join("log"));
    wait_until_up(&url).await;
    assert_eq!(std::fs::read(&ca).unwrap(), ca_before);
    assert_eq!(peer_cert(&trusted.get(&url).send().await.unwrap()), first_leaf);
    proc.signal("TERM");
    proc.child.wait().unwrap();
    let config = write_config(dir.path(), port, &tls.replace("mirror.example.internal", "other.example.internal"));
    let _proc = Proc::spawn(&config, &dir.path().join("log"));
    wait_until_up(&url).await;
    assert_eq!(std::fs::read(&ca).unwrap(), ca_before, "the CA changed");
    let r = tls_client(&[&ca]).get(&url).send().await.unwrap();
    assert_ne!(peer_cert(&r), first_leaf, "the leaf was not re-issued");
    assert!(std::fs::read_to_string(dir.path().join("certs/server.json")).unwrap().contains("other.example.internal"));
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_swaps_a_files_mode_certificate_without_dropping_a_download() {
    let dir = tempfile::tempdir().unwrap();
    // Two independent certificate sets; the server starts with A.
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    regmirror::tls::ensure_self_signed(&a, &[]).unwrap();
    regmirror::tls::ensure_self_signed(&b, &[]).unwrap();
    let live = dir.path().join("live");
    std::fs::create_dir_all(&live).unwrap();
    for f in ["server.crt", "server.key"] {
        std::fs::copy(a.join(f), live.join(f)).unwrap();
    }
    let port = free_port();
    let config = write_config(
        dir.path(),
        port,
        "[tls]\nmode = \"files\"\ncert = \"live/server.crt\"\nkey = \"live/server.key\"\n",
    );
    let proc = Proc::spawn(&config, &dir.path().join("log"));
    let base = format!("https://localhost:{port}");
    wait_until_up(&format!("{base}/v2/")).await;
    let c = tls_client(&[&a.join("ca.crt"), &b.join("ca.crt")]);
    let digest = upload_streamed(&c, &base, "private/tls", 9, 64, 1 << 20).await;
    let r = c.get(format!("{base}/v2/private/tls/blobs/{digest}")).send().await.unwrap();
    let old_cert = peer_cert(&r);
    let mut download = r.bytes_stream();
    let mut h = sha2::Sha256::new();
    h.update(download.next().await.unwrap().unwrap());

    for f in ["server.crt", "server.key"] {
        std::fs::copy(b.join(f), live.join(f)).unwrap();
    }
    proc.signal("HUP");
    // A new connection sees the new certificate (the reload is asynchronous: poll, bounded).
    let fresh = || tls_client(&[&a.join("ca.crt"), &b.join("ca.crt")]);
    let mut swapped = false;
    for _ in 0..100 {
        let r = fresh().get(format!("{base}/v2/")).send().await.unwrap();
        if peer_cert(&r) != old_cert {
            swapped = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(swapped, "the certificate was not swapped");
    // The open download completes.
    while let Some(c) = download.next().await {
        h.update(c.unwrap());
    }
    assert_eq!(format!("sha256:{}", hex::encode(h.finalize())), digest);
}
