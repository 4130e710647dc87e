//! Hostile input: paths that try to leave the store, header injection through names and query
//! values, forged and expired tokens, a world-readable htpasswd, and the TLS versions and cipher
//! suites on offer.

mod common;

use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::*;
use hmac::{KeyInit, Mac};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CONFIG: &str = "[storage]\nroot = \"data\"\n[[upstream]]\nname = \"docker.io\"\nurl = \"http://127.0.0.1:9\"\n";

/// Send `request_line` as is (no client-side normalisation of `..` or escapes) and return the
/// status and the raw response head.
async fn raw(addr: std::net::SocketAddr, method: &str, target: &[u8]) -> (u16, String) {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut request = format!("{method} ").into_bytes();
    request.extend_from_slice(target);
    request.extend_from_slice(b" HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}");
    conn.write_all(&request).await.unwrap();
    let mut response = Vec::new();
    let _ = conn.read_to_end(&mut response).await;
    let text = String::from_utf8_lossy(&response).to_string();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let head = text.split("\r\n\r\n").next().unwrap_or_default().to_string();
    (status, head)
}

/// Every file under `dir`, relative.
fn files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                pending.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn paths_that_try_to_leave_the_store_go_nowhere() {
    let outer = tempfile::tempdir().unwrap();
    let inner = tempfile::tempdir_in(outer.path()).unwrap();
    let s = TestServer::start_in(inner, CONFIG).await;
    let before = files(outer.path());
    let digest = sha256(b"x");
    let long = "a".repeat(300);
    let targets: Vec<Vec<u8>> = vec![
        b"/v2/../../../etc/passwd/manifests/latest".to_vec(),
        b"/v2/private/../../x/manifests/latest".to_vec(),
        b"/v2/private/%2e%2e/%2e%2e/x/manifests/latest".to_vec(),
        b"/v2/private/..%2f..%2fx/blobs/uploads/".to_vec(),
        b"/v2/private/x/blobs/sha256:..%2f..%2f..%2fetc%2fpasswd".to_vec(),
        format!("/v2/private/x/blobs/{}", digest.replace("sha256:", "sha256:../")).into_bytes(),
        b"/v2/private/x/blobs/uploads/..%2f..%2f..%2fmeta".to_vec(),
        b"/v2/private/x/blobs/uploads/../../meta".to_vec(),
        b"/v2/private/x%00y/manifests/latest".to_vec(),
        b"/v2/private\\..\\x/manifests/latest".to_vec(),
        b"/v2/private/x/manifests/..%5c..%5cmeta".to_vec(),
        format!("/v2/private/{long}/manifests/latest").into_bytes(),
        format!("/v2/private/x/manifests/{long}").into_bytes(),
    ];
    for target in &targets {
        for method in ["GET", "PUT", "PATCH", "DELETE", "POST"] {
            let (status, head) = raw(s.addr, method, target).await;
            assert!((400..500).contains(&status), "{method} {}: {head}", String::from_utf8_lossy(target));
        }
    }
    // Nothing was written anywhere but in the store's own places.
    let after = files(outer.path());
    let outside: Vec<_> = after
        .iter()
        .filter(|f| !before.contains(f) && !f.contains("/data/tmp/") && !f.contains("/data/meta/"))
        .collect();
    assert!(outside.is_empty(), "written: {outside:?}");
}

#[tokio::test]
async fn names_and_query_values_never_reach_a_header_raw() {
    let s = TestServer::start(CONFIG).await;
    let c = client();
    let base = s.url("");
    for tag in ["a", "b"] {
        push_image(&c, &base, "private/h", tag, tag).await;
    }
    // A `last` that tries to end the Link header and start another.
    let (status, head) = raw(s.addr, "GET", b"/v2/private/h/tags/list?n=1&last=%22%0d%0aX-Evil:%201").await;
    assert_eq!(status, 200, "{head}");
    assert!(!head.to_ascii_lowercase().contains("x-evil"), "{head}");
    // Quotes and line breaks in names and ns are refused before any header is built.
    for target in [
        &b"/v2/private/h%22%0d%0aX-Evil:%201/manifests/a"[..],
        b"/v2/private/h\"x/manifests/a",
        b"/v2/library/x/manifests/a?ns=evil%0d%0aX-Evil:%201",
    ] {
        let (status, head) = raw(s.addr, "GET", target).await;
        assert!((400..500).contains(&status), "{head}");
        assert!(!head.to_ascii_lowercase().contains("x-evil"), "{head}");
    }
}

#[tokio::test]
async fn forged_and_expired_tokens_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    regmirror::auth::set_password(&htpasswd, "alice", "alice-secret-pw").unwrap();
    let toml = format!(
        "{CONFIG}[auth]\nhtpasswd = \"{}\"\n[[auth.grant]]\nusers = [\"alice\"]\nrepositories = [\"private/*\"]\naccess = \"push\"\n",
        htpasswd.display()
    );
    let s = TestServer::start_in(dir, &toml).await;
    let key = std::fs::read(s.dir.path().join("data").join(regmirror::storage::Meta::TokenKey.path())).unwrap();
    let sign = |claims: serde_json::Value| {
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
        let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&key).unwrap();
        mac.update(payload.as_bytes());
        format!("{payload}.{}", URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
    };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let access = serde_json::json!([{"type": "repository", "name": "private/a", "local": "private/a", "actions": ["pull", "push"]}]);
    let valid = sign(serde_json::json!({"sub": "alice", "exp": now + 60, "access": access}));
    let expired = sign(serde_json::json!({"sub": "alice", "exp": now - 1, "access": access}));
    let tampered = {
        let (payload, sig) = valid.rsplit_once('.').unwrap();
        let mut sig = sig.to_string();
        let last = if sig.ends_with('A') { 'B' } else { 'A' };
        sig.pop();
        sig.push(last);
        format!("{payload}.{sig}")
    };
    let push = |token: String| {
        let url = s.url("/v2/private/a/blobs/uploads/");
        async move { client().post(url).bearer_auth(token).send().await.unwrap().status() }
    };
    assert_eq!(push(valid).await, 202, "the signing check itself is wrong");
    assert_eq!(push(expired).await, 401);
    assert_eq!(push(tampered).await, 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_world_readable_htpasswd_is_warned_about_at_start() {
    use std::os::unix::fs::PermissionsExt;
    for (mode, warned) in [(0o644, true), (0o640, false)] {
        let dir = tempfile::tempdir().unwrap();
        let htpasswd = dir.path().join("htpasswd");
        regmirror::auth::set_password(&htpasswd, "alice", "pw").unwrap();
        std::fs::set_permissions(&htpasswd, std::fs::Permissions::from_mode(mode)).unwrap();
        let port = free_port();
        let config = dir.path().join("mirror.toml");
        std::fs::write(
            &config,
            format!("[server]\nlisten = \"127.0.0.1:{port}\"\n{CONFIG}[auth]\nhtpasswd = \"{}\"\n", htpasswd.display()),
        )
        .unwrap();
        let log = dir.path().join("log");
        let proc = Proc::spawn(&config, &log);
        wait_until_up(&format!("http://127.0.0.1:{port}/healthz")).await;
        drop(proc);
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(text.contains("auth.htpasswd is readable by every user"), warned, "mode {mode:o}: {text}");
        // `regmirror passwd` keeps the mode it found.
        regmirror::auth::set_password(&htpasswd, "bob", "pw").unwrap();
        assert_eq!(std::fs::metadata(&htpasswd).unwrap().permissions().mode() & 0o777, mode);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn only_tls_1_2_and_1_3_with_strong_suites_are_offered() {
    if !require("sslscan") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("mirror.toml");
    std::fs::write(
        &config,
        format!("[server]\nlisten = \"127.0.0.1:{port}\"\n{CONFIG}[tls]\nmode = \"self-signed\"\n"),
    )
    .unwrap();
    let _proc = Proc::spawn(&config, &dir.path().join("log"));
    wait_until_up(&format!("https://127.0.0.1:{port}/healthz")).await;
    let out =
        std::process::Command::new("sslscan").args(["--no-colour", &format!("127.0.0.1:{port}")]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for (protocol, state) in [
        ("SSLv2", "disabled"),
        ("SSLv3", "disabled"),
        ("TLSv1.0", "disabled"),
        ("TLSv1.1", "disabled"),
        ("TLSv1.2", "enabled"),
        ("TLSv1.3", "enabled"),
    ] {
        assert!(
            text.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == [protocol, state]),
            "{protocol} should be {state}:\n{text}"
        );
    }
    let suites: Vec<&str> = text.lines().filter(|l| l.starts_with("Accepted") || l.starts_with("Preferred")).collect();
    assert!(!suites.is_empty(), "{text}");
    for suite in suites {
        let strong = ["GCM", "CHACHA20"].iter().any(|s| suite.contains(s));
        let weak = ["RC4", "DES", "NULL", "EXP", "MD5", "CBC", "anon"].iter().any(|w| suite.contains(w));
        assert!(strong && !weak, "weak suite offered: {suite}");
    }
}
