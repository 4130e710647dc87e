//! The real binary as a process: crash safety under kill -9, memory with a 1 GiB blob, graceful
//! shutdown during a download, and TLS (trust, restarts, reload without dropping connections).

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use futures_util::StreamExt;
use sha2::Digest as _;

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
