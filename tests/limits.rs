//! What one client cannot take from the others: slow headers, connections, idle sockets, huge
//! uploads. Against the binary as a process, so the test's own sockets do not share its limits.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Room for a few hundred sockets on each side (the default soft limit is often 1024).
fn raise_open_files() {
    // SAFETY: getrlimit/setrlimit only read and write the struct handed to them.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max.min(65_536);
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn start(dir: &std::path::Path, server: &str) -> (Proc, String, std::net::SocketAddr) {
    raise_open_files();
    let port = free_port();
    let config = dir.join("mirror.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n{server}\n[storage]\nroot = \"data\"\n[[upstream]]\nname = \"docker.io\"\nurl = \"http://127.0.0.1:9\"\n"
        ),
    )
    .unwrap();
    let proc = Proc::spawn(&config, &dir.join("log"));
    (proc, format!("http://127.0.0.1:{port}"), format!("127.0.0.1:{port}").parse().unwrap())
}

/// Wait until the server closes `conn` (reads end); false if it is still open after `within`.
async fn closed_within(conn: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn five_hundred_slow_header_senders_do_not_stop_a_pull_and_are_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let (_proc, base, addr) = start(dir.path(), "header_read_timeout = \"2s\"");
    wait_until_up(&format!("{base}/healthz")).await;
    let c = client();
    let blob = blob_of(4 * MIB, 1);
    let d = push_blob(&c, &base, "private/slow", &blob).await;

    // 500 connections, each sending its request headers one byte a second.
    let request = b"GET /v2/ HTTP/1.1\r\nHost: x\r\nUser-Agent: slow\r\n";
    let mut slow = Vec::new();
    for _ in 0..500 {
        let mut conn = TcpStream::connect(addr).await.unwrap();
        conn.write_all(&request[..1]).await.unwrap();
        slow.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            for byte in &request[1..] {
                tick.tick().await;
                if conn.write_all(std::slice::from_ref(byte)).await.is_err() {
                    break;
                }
            }
            conn
        }));
    }
    // Meanwhile a client pulls.
    let started = std::time::Instant::now();
    let got = c.get(format!("{base}/v2/private/slow/blobs/{d}")).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(sha256(&got), d);
    assert!(started.elapsed() < Duration::from_secs(2), "the pull took {:?}", started.elapsed());
    // Every slow sender is cut off once its headers are overdue (2 s), long before it finishes.
    for task in slow {
        let mut conn = task.await.unwrap();
        assert!(closed_within(&mut conn, Duration::from_secs(10)).await, "a slow sender was never cut off");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_beyond_the_limit_wait_for_a_free_one() {
    let dir = tempfile::tempdir().unwrap();
    let (_proc, base, addr) = start(dir.path(), "max_connections = 4\nheader_read_timeout = \"60s\"");
    wait_until_up(&format!("{base}/healthz")).await;
    // Four idle connections hold every place.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    let c = reqwest::Client::builder().timeout(Duration::from_millis(1500)).build().unwrap();
    let waiting = c.get(format!("{base}/healthz")).send().await;
    assert!(waiting.is_err(), "a fifth connection was served: {:?}", waiting.map(|r| r.status()));
    // One leaves: the next client is served.
    drop(held.pop());
    let c = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    assert_eq!(c.get(format!("{base}/healthz")).send().await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_keep_alive_connection_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let (_proc, base, addr) = start(dir.path(), "idle_timeout = \"1s\"\nheader_read_timeout = \"60s\"");
    wait_until_up(&format!("{base}/healthz")).await;
    let mut conn = TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 1024];
    let n = conn.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Kept alive, then closed once nothing has moved for a second.
    let started = std::time::Instant::now();
    assert!(closed_within(&mut conn, Duration::from_secs(10)).await, "the idle connection stayed open");
    assert!(started.elapsed() >= Duration::from_millis(900), "closed too early: {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn uploads_over_the_limit_are_refused_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_proc, base, _) = start(dir.path(), "max_upload_size = \"1MiB\"");
    wait_until_up(&format!("{base}/healthz")).await;
    let c = client();
    let code = |r: reqwest::Response| async move {
        let v: serde_json::Value = r.json().await.unwrap();
        v["errors"][0]["code"].as_str().unwrap().to_string()
    };
    // Monolithic, with a Content-Length: refused before a byte is stored.
    let big = blob_of(2 * MIB, 2);
    let d = sha256(&big);
    let r = c.post(format!("{base}/v2/private/big/blobs/uploads/?digest={d}")).body(big.clone()).send().await.unwrap();
    assert_eq!(r.status(), 413);
    // The body was refused unread, so the connection must not be reused for the next request.
    assert_eq!(r.headers()["connection"], "close");
    assert_eq!(code(r).await, "BLOB_UPLOAD_INVALID");
    // Chunked, streamed without a length: refused when the bytes pass the limit, and the session
    // keeps only what it had.
    let r = c.post(format!("{base}/v2/private/big/blobs/uploads/")).send().await.unwrap();
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let r = c.patch(format!("{base}{loc}")).body(vec![1u8; 512 << 10]).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..8).map(|_| Ok(vec![2u8; 128 << 10])).collect();
    let r = c
        .patch(format!("{base}{loc}"))
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(chunks)))
        .send()
        .await;
    // The server answers 413 without reading the rest; a client still sending may see the
    // connection close instead of the answer.
    if let Ok(r) = r {
        assert_eq!(r.status(), 413);
    }
    // (A new client: the server closes the connection it did not read to the end.)
    let c = client();
    let r = c.get(format!("{base}{loc}")).send().await.unwrap();
    assert_eq!(r.headers()["range"], format!("0-{}", (512 << 10) - 1).as_str());
    assert!(std::fs::read_dir(dir.path().join("data/tmp")).unwrap().next().is_none(), "staging left behind");
    assert_eq!(c.head(format!("{base}/v2/private/big/blobs/{d}")).send().await.unwrap().status(), 404);
    // Under the limit, all is well.
    push_blob(&c, &base, "private/big", &blob_of(MIB / 2, 3)).await;
}
