//! TLS as clients meet it: a self-signed CA trusted on its own, certificates that survive
//! restarts and follow the configured names, and a files-mode certificate swapped on SIGHUP
//! without dropping a download.

mod common;

use std::path::Path;

use common::*;
use futures_util::StreamExt;
use sha2::Digest as _;

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
