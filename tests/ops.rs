//! Operations: metrics that move as they should (and pass promtool), the JSON request log, the
//! systemd unit, and `check-config`.

mod common;

use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;

use common::hub::Hub;
use common::*;
use futures_util::StreamExt;

fn spawn_with(dir: &std::path::Path, toml: &str) -> (Proc, String, String) {
    let (port, metrics_port) = (free_port(), free_port());
    let config = dir.join("mirror.toml");
    std::fs::write(&config, format!("[server]\nlisten = \"127.0.0.1:{port}\"\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n[log]\nformat = \"json\"\n{toml}")).unwrap();
    let proc = Proc::spawn(&config, &dir.join("log"));
    (proc, format!("http://127.0.0.1:{port}"), format!("http://127.0.0.1:{metrics_port}/metrics"))
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_follow_a_scripted_pull_and_pass_promtool() {
    let hub = Hub::start().await;
    let layer = vec![7u8; 100_000];
    let config = b"{}".to_vec();
    let layer_digest = hub.add_blob(layer.clone());
    hub.add_blob(config.clone());
    hub.add_manifest("library/app", "latest", OCI_MANIFEST, image_manifest(&config, &[&layer]));
    let dir = tempfile::tempdir().unwrap();
    let (_proc, base, metrics_url) = spawn_with(
        dir.path(),
        &format!("[storage]\nroot = \"data\"\n[[upstream]]\nname = \"docker.io\"\nurl = \"{}\"\n", hub.url()),
    );
    wait_until_up(&format!("{base}/healthz")).await;
    let c = client();
    // miss, hit (manifest); miss, hit (blob)
    for _ in 0..2 {
        assert_eq!(c.get(format!("{base}/v2/library/app/manifests/latest")).send().await.unwrap().status(), 200);
        let r = c.get(format!("{base}/v2/library/app/blobs/{layer_digest}")).send().await.unwrap();
        assert_eq!(r.bytes().await.unwrap().len(), 100_000);
    }
    // failure: upstream content that does not match its digest
    let bad = hub.add_blob(vec![1u8; 5000]);
    hub.state.corrupt.store(true, Ordering::SeqCst);
    // The response is aborted, before or after its headers depending on timing.
    if let Ok(r) = c.get(format!("{base}/v2/library/app/blobs/{bad}")).send().await {
        assert!(r.bytes().await.is_err(), "a response completed with bad bytes");
    }
    hub.state.corrupt.store(false, Ordering::SeqCst);
    // stale: the upstream rate-limits while the tag is due for revalidation
    hub.state.rate_limited.store(true, Ordering::SeqCst);
    let tag = dir.path().join("data/repositories/docker.io/library/app/_manifests/tags/latest/current");
    let mut rec: regmirror::storage::TagRecord = serde_json::from_slice(&std::fs::read(&tag).unwrap()).unwrap();
    rec.fetched_at -= 3600;
    std::fs::write(&tag, serde_json::to_vec(&rec).unwrap()).unwrap();
    assert_eq!(c.get(format!("{base}/v2/library/app/manifests/latest")).send().await.unwrap().status(), 200);

    let text = c.get(&metrics_url).send().await.unwrap().text().await.unwrap();
    let m = |series: &str| metric(&text, series);
    assert_eq!(m(r#"regmirror_cache_requests_total{kind="manifest",outcome="miss",upstream="docker.io"}"#), 1.0);
    assert_eq!(m(r#"regmirror_cache_requests_total{kind="manifest",outcome="hit",upstream="docker.io"}"#), 1.0);
    assert_eq!(m(r#"regmirror_cache_requests_total{kind="manifest",outcome="stale",upstream="docker.io"}"#), 1.0);
    assert_eq!(m(r#"regmirror_cache_requests_total{kind="blob",outcome="hit",upstream="docker.io"}"#), 1.0);
    assert_eq!(m(r#"regmirror_cache_requests_total{kind="blob",outcome="miss",upstream="docker.io"}"#), 2.0);
    assert_eq!(m(r#"regmirror_upstream_failures_total{cause="digest_mismatch",upstream="docker.io"}"#), 1.0);
    assert_eq!(m(r#"regmirror_upstream_failures_total{cause="429",upstream="docker.io"}"#), 1.0);
    assert_eq!(m(r#"regmirror_served_bytes_total{source="cache"}"#), 100_000.0);
    assert!(m(r#"regmirror_served_bytes_total{source="fill"}"#) >= 100_000.0);
    assert_eq!(
        m(r#"regmirror_requests_total{method="GET",route="/v2/{name}/manifests/{reference}",status="200"}"#),
        3.0
    );
    assert_eq!(m("regmirror_store_objects"), 2.0, "the manifest and the layer: {text}");
    assert_eq!(m("regmirror_fills_in_flight"), 0.0);
    assert!(!text.contains("library/app"), "a repository name leaked into a label");

    if require("promtool") {
        let mut child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_json_log_line_per_request_with_every_field() {
    let dir = tempfile::tempdir().unwrap();
    let (proc, base, _) = spawn_with(
        dir.path(),
        "[storage]\nroot = \"data\"\n[[upstream]]\nname = \"docker.io\"\nurl = \"http://127.0.0.1:9\"\n",
    );
    wait_until_up(&format!("{base}/healthz")).await;
    let c = client();
    let d = push_blob(&c, &base, "private/logged", b"log me").await;
    let r = c.get(format!("{base}/v2/private/logged/blobs/{d}")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // Read to the end: the log counts what was really sent.
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"log me");
    assert_eq!(c.get(format!("{base}/v2/library/down/manifests/1.0")).send().await.unwrap().status(), 503);
    drop(proc);
    let log = std::fs::read_to_string(dir.path().join("log")).unwrap();
    let requests: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "request")
        .collect();
    let get = requests
        .iter()
        .find(|v| v["method"] == "GET" && v["route"] == "/v2/{name}/blobs/{digest}")
        .expect("request line for the blob GET");
    assert_eq!(get["repository"], "private/logged");
    assert_eq!(get["reference"], d.as_str());
    assert_eq!(get["status"], 200);
    assert_eq!(get["bytes"], 6);
    assert!(get["duration_ms"].as_f64().is_some());
    let failed = requests
        .iter()
        .find(|v| v["route"] == "/v2/{name}/manifests/{reference}")
        .expect("request line for the mirrored GET");
    assert_eq!(failed["upstream"], "docker.io");
    assert_eq!(failed["repository"], "docker.io/library/down");
    assert_eq!(failed["cache"], "error");
    assert!(failed["error"].as_str().unwrap().contains("UNAVAILABLE"), "{failed}");
}

#[test]
fn the_systemd_unit_verifies() {
    if !require("systemd-analyze") {
        return;
    }
    // The unit names the installed path; verify a copy that points at the binary under test.
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/regmirror.service")).unwrap();
    for needle in [
        "DynamicUser=yes",
        "StateDirectory=regmirror",
        "ConfigurationDirectory=regmirror",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "CAP_NET_BIND_SERVICE",
        "SystemCallFilter=@system-service",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ] {
        assert!(unit.contains(needle), "unit lacks {needle}");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("regmirror.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/regmirror", env!("CARGO_BIN_EXE_regmirror"))).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("regmirror.service"), "warnings about the unit: {stderr}");
}

#[test]
fn check_config_prints_every_problem_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = \"nowhere\"\n[cache]\ntag_ttl = \"soon\"\n[[upstream]]\nname = \"a.io\"\nurl = \"a.io\"\n",
    )
    .unwrap();
    let out =
        Command::new(env!("CARGO_BIN_EXE_regmirror")).args(["check-config", "--config"]).arg(&path).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("3 problem(s)"), "{err}");
    assert!(err.contains("server.listen = \"nowhere\" is not an address"), "{err}");
    assert!(err.contains("cache.tag_ttl = \"soon\" is not a duration"), "{err}");
    assert!(err.contains("upstream[0].url = \"a.io\" is not a valid URL"), "{err}");
    let ok = Command::new(env!("CARGO_BIN_EXE_regmirror"))
        .args(["check-config", "--config", concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/mirror.toml")])
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
}

/// The request lines of a JSON log so far.
fn request_lines(log: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "request")
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_request_log_times_a_download_to_its_last_byte_and_shows_an_abort() {
    let dir = tempfile::tempdir().unwrap();
    let (_proc, base, _) = spawn_with(
        dir.path(),
        "[storage]\nroot = \"data\"\n[[upstream]]\nname = \"docker.io\"\nurl = \"http://127.0.0.1:9\"\n",
    );
    wait_until_up(&format!("{base}/healthz")).await;
    let c = client();
    let size = 64 * MIB;
    let d = push_blob(&c, &base, "private/timed", &blob_of(size, 3)).await;
    let url = format!("{base}/v2/private/timed/blobs/{d}");
    let blob_lines = |log: &std::path::Path| -> Vec<serde_json::Value> {
        request_lines(log).into_iter().filter(|v| v["method"] == "GET" && v["reference"] == d.as_str()).collect()
    };
    let log = dir.path().join("log");

    // The whole blob: the line counts every byte, and its time covers the transfer, not the
    // headers only. The client holds off reading for 300 ms after the first chunk: 64 MiB do not
    // fit in the socket buffers, so the last byte leaves the server after that pause.
    let mut resp = c.get(&url).send().await.unwrap();
    let mut got = resp.chunk().await.unwrap().map_or(0, |b| b.len());
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    while let Some(b) = resp.chunk().await.unwrap() {
        got += b.len();
    }
    assert_eq!(got, size);
    eventually("the download is logged", || blob_lines(&log).len() == 1).await;
    let line = &blob_lines(&log)[0];
    assert_eq!(line["bytes"], size as u64, "{line}");
    assert_eq!(line["aborted"], false, "{line}");
    let logged_ms = line["duration_ms"].as_f64().unwrap();
    assert!(logged_ms >= 300.0, "logged {logged_ms} ms for a download the client paused for 300 ms");

    // A small JSON answer is whole too (hyper never polls such a body to its end).
    assert_eq!(c.get(format!("{base}/v2/")).send().await.unwrap().status(), 200);
    eventually("the /v2/ request is logged", || request_lines(&log).iter().any(|v| v["route"] == "/v2/")).await;
    let base_line = request_lines(&log).into_iter().find(|v| v["route"] == "/v2/").unwrap();
    assert_eq!(base_line["aborted"], false, "{base_line}");
    assert_eq!(base_line["bytes"], 2, "{base_line}");

    // A client that leaves after the first chunk: logged as aborted, with what was really sent.
    let mut body = c.get(&url).send().await.unwrap().bytes_stream();
    body.next().await.unwrap().unwrap();
    drop(body);
    eventually("the aborted download is logged", || blob_lines(&log).len() == 2).await;
    let line = &blob_lines(&log)[1];
    assert_eq!(line["aborted"], true, "{line}");
    assert!(line["bytes"].as_u64().unwrap() < size as u64, "{line}");
}
