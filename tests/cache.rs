//! The pull-through cache against a Docker-Hub-like test upstream (tokens, CDN redirects, 429,
//! faults) and against the reference registry (Debian's docker-registry).

mod common;

use std::sync::atomic::Ordering;

use common::hub::Hub;
use common::*;
use futures_util::StreamExt;
use regmirror::cache::fill::Phase;
use regmirror::oci::RepoName;
use serde_json::{json, Value};

fn config(upstream: &str) -> String {
    format!("[storage]\nroot = \"data\"\n[[upstream]]\nname = \"docker.io\"\nurl = \"{upstream}\"\n[cache]\ntag_ttl = \"5m\"\nupstream_timeout = \"5s\"\n")
}

#[tokio::test]
async fn docker_hub_token_flow_library_names_and_cdn_redirects() {
    let hub = Hub::start().await;
    let (blob_digest, manifest_digest, m) = hub_image(&hub, "hello", "latest", blob_of(300_000, 1));
    let s = TestServer::start(&config(&hub.url())).await;
    let c = client();

    // dockerd sends `library/hello`, a bare name gets `library/` too; dockerd also forwards its
    // Docker Hub credentials, which must be ignored.
    for name in ["library/hello", "hello"] {
        let r = c
            .get(s.url(&format!("/v2/{name}/manifests/latest")))
            .header("authorization", "Bearer some-docker-hub-token")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["docker-content-digest"], manifest_digest.as_str());
        assert_eq!(r.headers()["content-type"], OCI_MANIFEST);
        assert_eq!(r.bytes().await.unwrap().as_ref(), &m[..]);
    }
    let r = c.get(s.url(&format!("/v2/library/hello/blobs/{blob_digest}"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(sha256(&r.bytes().await.unwrap()), blob_digest);
    assert!(!hub.state.counters.cdn_saw_authorization.load(Ordering::SeqCst), "credentials leaked to the CDN host");
    // One token for the scope, reused for the blob.
    assert_eq!(hub.count(&hub.state.counters.token_requests), 1);
    assert_eq!(hub.count(&hub.state.counters.manifest_gets), 1);

    // By digest, and the same content through the path prefix and ?ns=.
    let r = c.get(s.url(&format!("/v2/docker.io/library/hello/manifests/{manifest_digest}"))).send().await.unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), &m[..]);
    let r = c.get(s.url(&format!("/v2/library/hello/blobs/{blob_digest}?ns=docker.io"))).send().await.unwrap();
    assert_eq!(sha256(&r.bytes().await.unwrap()), blob_digest);
    assert_eq!(hub.count(&hub.state.counters.manifest_gets), 1);
    assert_eq!(hub.count(&hub.state.counters.cdn_gets), 1);

    // Another scope needs its own token; a token the upstream no longer accepts is replaced.
    let (_, _, _) = hub_image(&hub, "second", "v1", blob_of(10, 2));
    let r = c.get(s.url("/v2/library/second/manifests/v1")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(hub.count(&hub.state.counters.token_requests), 2);
    hub.state.token_epoch.fetch_add(1, Ordering::SeqCst);
    let (_, _, _) = hub_image(&hub, "second", "v2", blob_of(10, 3));
    let r = c.get(s.url("/v2/library/second/manifests/v2")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(hub.count(&hub.state.counters.token_requests), 3);

    let metrics = s.metrics();
    assert_eq!(
        metric(&metrics, r#"regmirror_cache_requests_total{kind="manifest",outcome="miss",upstream="docker.io"}"#),
        3.0
    );
    assert_eq!(
        metric(&metrics, r#"regmirror_cache_requests_total{kind="blob",outcome="hit",upstream="docker.io"}"#),
        1.0
    );
    assert!(metric(&metrics, r#"regmirror_upstream_token_fetches_total{upstream="docker.io"}"#) >= 2.0);
}

#[tokio::test]
async fn unknown_upstream_content_is_a_404() {
    let hub = Hub::start().await;
    let s = TestServer::start(&config(&hub.url())).await;
    let r = client().get(s.url("/v2/library/absent/manifests/latest")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["errors"][0]["code"], "MANIFEST_UNKNOWN");
    let r = client().get(s.url(&format!("/v2/library/absent/blobs/{}", sha256(b"x")))).send().await.unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn tags_are_trusted_for_the_ttl_then_revalidated_with_one_head() {
    let hub = Hub::start().await;
    let (_, manifest_digest, _) = hub_image(&hub, "ttl", "latest", blob_of(100, 3));
    let s = TestServer::start(&config(&hub.url())).await;
    let c = client();
    let url = s.url("/v2/library/ttl/manifests/latest");
    assert_eq!(c.get(&url).send().await.unwrap().status(), 200);
    let before = (hub.count(&hub.state.counters.manifest_gets), hub.count(&hub.state.counters.manifest_heads));
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (c, url) = (c.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..100 {
                let r = c.get(&url).send().await.unwrap();
                assert_eq!(r.status(), 200);
                r.bytes().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        (hub.count(&hub.state.counters.manifest_gets), hub.count(&hub.state.counters.manifest_heads)),
        before,
        "1000 GETs within the TTL went upstream"
    );

    // Age the tag past the TTL: one HEAD, no GET, and the tag is fresh again.
    s.state.cache.clock.advance(std::time::Duration::from_secs(301));
    for _ in 0..5 {
        let r = c.get(&url).send().await.unwrap();
        assert_eq!(r.headers()["docker-content-digest"], manifest_digest.as_str());
    }
    assert_eq!(hub.count(&hub.state.counters.manifest_heads), before.1 + 1);
    assert_eq!(hub.count(&hub.state.counters.manifest_gets), before.0);

    // The tag moves upstream: after the TTL the new manifest is fetched.
    let (_, new_digest, _) = hub_image(&hub, "ttl", "latest", blob_of(100, 4));
    s.state.cache.clock.advance(std::time::Duration::from_secs(301));
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.headers()["docker-content-digest"], new_digest.as_str());
}

/// A hub with `library/<name>` holding one blob of `size` bytes, a mirror of it, and the
/// blob's URL on the mirror.
async fn fill_fixture(name: &str, size: usize, seed: u8) -> (Hub, TestServer, reqwest::Client, String, String) {
    let hub = Hub::start().await;
    let (blob_digest, _, _) = hub_image(&hub, name, "latest", blob_of(size, seed));
    let s = TestServer::start(&config(&hub.url())).await;
    let url = s.url(&format!("/v2/library/{name}/blobs/{blob_digest}"));
    (hub, s, client(), url, blob_digest)
}

#[tokio::test]
async fn thirty_two_clients_one_upstream_get() {
    let (hub, _s, c, url, blob_digest) = fill_fixture("big", 64 << 20, 5).await;
    // Hold the body back until all 32 requests are in, so they truly overlap.
    hub.state.gate.send_replace(1 << 20);
    // Every client has its response headers, so has joined the fill, before bytes flow on.
    let (joined_tx, mut joined) = tokio::sync::mpsc::channel::<()>(32);
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (c, url, joined_tx) = (c.clone(), url.clone(), joined_tx.clone());
        tasks.push(tokio::spawn(async move {
            let r = c.get(&url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            joined_tx.send(()).await.unwrap();
            sha256(&r.bytes().await.unwrap())
        }));
    }
    for _ in 0..32 {
        joined.recv().await.unwrap();
    }
    hub.state.gate.send_replace(u64::MAX);
    for t in tasks {
        assert_eq!(t.await.unwrap(), blob_digest);
    }
    assert_eq!(hub.count(&hub.state.counters.blob_gets), 1);
    assert_eq!(hub.count(&hub.state.counters.cdn_gets), 1);
}

#[tokio::test]
async fn a_client_arriving_mid_fill_gets_the_whole_blob() {
    // Large enough that the start has left the fill's in-memory window: the second client reads
    // it back from the staging file, then catches up with the bytes in memory.
    let size = 32 << 20;
    let (hub, _s, c, url, blob_digest) = fill_fixture("join", size, 6).await;
    hub.state.gate.send_replace((size / 2) as u64);

    // The first client reads half the blob, then a second arrives: it starts at byte 0.
    let mut first = c.get(&url).send().await.unwrap().bytes_stream();
    let mut got = Vec::new();
    while got.len() < size / 2 {
        got.extend_from_slice(&first.next().await.unwrap().unwrap());
    }
    let second = tokio::spawn({
        let (c, url) = (c.clone(), url.clone());
        async move { sha256(&c.get(&url).send().await.unwrap().bytes().await.unwrap()) }
    });
    hub.state.gate.send_replace(u64::MAX);
    while let Some(chunk) = first.next().await {
        got.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(sha256(&got), blob_digest);
    assert_eq!(second.await.unwrap(), blob_digest);
    // Served from the cache afterwards; one upstream fetch in all.
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(sha256(&r.bytes().await.unwrap()), blob_digest);
    assert_eq!(hub.count(&hub.state.counters.cdn_gets), 1);
}

#[tokio::test]
async fn a_client_that_leaves_at_ten_percent_does_not_stop_the_fill() {
    let size = 8 << 20;
    let (hub, s, c, url, blob_digest) = fill_fixture("leave", size, 7).await;
    hub.state.gate.send_replace((size / 5) as u64);
    let mut only = c.get(&url).send().await.unwrap().bytes_stream();
    let mut n = 0;
    while n < size / 10 {
        n += only.next().await.unwrap().unwrap().len();
    }
    drop(only);
    hub.state.gate.send_replace(u64::MAX);
    // Whether the next client joins the fill still running or reads the finished blob, the
    // upstream was asked once: a fill stopped by its only client would have to start over.
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(sha256(&r.bytes().await.unwrap()), blob_digest);
    assert_eq!(hub.count(&hub.state.counters.cdn_gets), 1);
    let repo = RepoName::parse("docker.io/library/leave").unwrap();
    assert!(s.state.store.is_blob_linked(&repo, &blob_digest.parse().unwrap()).await.unwrap());
}

#[tokio::test]
async fn a_client_that_stops_reading_does_not_hold_the_fill() {
    let size = 32 << 20;
    let (hub, s, c, url, blob_digest) = fill_fixture("stall", size, 9).await;
    // The fill keeps pace with its fastest reader; this one reads a little, then stops reading
    // but keeps its connection.
    let mut stalled = c.get(&url).send().await.unwrap().bytes_stream();
    let mut got = stalled.next().await.unwrap().unwrap().to_vec();
    let digest = blob_digest.parse().unwrap();
    if let Some(mut progress) = s.state.cache.fills.progress(&digest) {
        let done = progress.wait_for(|p| !matches!(p.phase, Phase::Streaming(_) | Phase::Connecting));
        let phase = tokio::time::timeout(std::time::Duration::from_secs(30), done)
            .await
            .expect("the fill finished while its only client was not reading")
            .map(|p| p.phase.clone());
        assert!(matches!(phase, Ok(Phase::Done { .. }) | Err(_)), "{phase:?}");
    }
    let repo = RepoName::parse("docker.io/library/stall").unwrap();
    assert!(s.state.store.is_blob_linked(&repo, &digest).await.unwrap());
    // The client that stalled still gets the whole blob.
    while let Some(chunk) = stalled.next().await {
        got.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(sha256(&got), blob_digest);
    assert_eq!(hub.count(&hub.state.counters.cdn_gets), 1);
}

#[tokio::test]
async fn ranges_on_a_blob_being_filled() {
    let hub = Hub::start().await;
    let blob = blob_of(4 << 20, 8);
    let (blob_digest, _, _) = hub_image(&hub, "range", "latest", blob.clone());
    let s = TestServer::start(&config(&hub.url())).await;
    let r = client()
        .get(s.url(&format!("/v2/library/range/blobs/{blob_digest}")))
        .header("range", "bytes=3000000-3000099")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-range"], format!("bytes 3000000-3000099/{}", 4 << 20).as_str());
    assert_eq!(r.bytes().await.unwrap().as_ref(), &blob[3_000_000..3_000_100]);
}

#[tokio::test]
async fn wrong_bytes_are_never_cached_and_the_next_request_fetches_again() {
    let (hub, s, c, url, blob_digest) = fill_fixture("bad", 1 << 20, 9).await;
    hub.state.corrupt.store(true, Ordering::SeqCst);
    // The response is aborted: before its headers, or (when they were already sent) before the
    // body completes.
    if let Ok(r) = c.get(&url).send().await {
        assert!(r.bytes().await.is_err(), "a response completed with bad bytes");
    }
    let d = blob_digest.parse().unwrap();
    assert!(s.state.store.blob_size(&d).await.unwrap().is_none());
    assert!(
        metric(&s.metrics(), r#"regmirror_upstream_failures_total{cause="digest_mismatch",upstream="docker.io"}"#)
            >= 1.0
    );

    hub.state.corrupt.store(false, Ordering::SeqCst);
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(sha256(&r.bytes().await.unwrap()), blob_digest);
    assert_eq!(hub.count(&hub.state.counters.cdn_gets), 2);
}

#[tokio::test]
async fn a_broken_upstream_connection_is_resumed_with_a_range() {
    let (hub, _s, c, url, blob_digest) = fill_fixture("reset", 4 << 20, 10).await;
    hub.state.reset_after.store(1 << 20, Ordering::SeqCst);
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(sha256(&r.bytes().await.unwrap()), blob_digest);
    assert_eq!(hub.count(&hub.state.counters.cdn_range_gets), 1);
    assert_eq!(hub.count(&hub.state.counters.cdn_gets), 2);
}

#[tokio::test]
async fn rate_limits_serve_the_cache_or_pass_429_on() {
    let hub = Hub::start().await;
    let (_, manifest_digest, _) = hub_image(&hub, "limited", "latest", blob_of(10, 11));
    let s = TestServer::start(&config(&hub.url())).await;
    let c = client();
    assert_eq!(c.get(s.url("/v2/library/limited/manifests/latest")).send().await.unwrap().status(), 200);
    hub.state.rate_limited.store(true, Ordering::SeqCst);
    // Uncached: TOOMANYREQUESTS with Retry-After passed on.
    let r = c.get(s.url("/v2/library/other/manifests/latest")).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "42");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["errors"][0]["code"], "TOOMANYREQUESTS");
    // Cached but due for revalidation: the last known digest is served.
    s.state.cache.clock.advance(std::time::Duration::from_secs(3600));
    let r = c.get(s.url("/v2/library/limited/manifests/latest")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], manifest_digest.as_str());
    assert_eq!(
        metric(&s.metrics(), r#"regmirror_cache_requests_total{kind="manifest",outcome="stale",upstream="docker.io"}"#),
        1.0
    );
}

/// Seed the reference registry with a single-arch image, an OCI index and a Docker manifest list.
async fn seed(base: &str) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let c = client();
    let single = push_image(&c, base, "library/hello", "latest", "hello").await;
    let amd = push_image(&c, base, "library/multi", "amd64-only", "amd").await;
    let arm_config = br#"{"architecture":"arm64","os":"linux"}"#;
    push_blob(&c, base, "library/multi", arm_config).await;
    push_blob(&c, base, "library/multi", b"arm layer").await;
    let arm = image_manifest(arm_config, &[b"arm layer"]);
    assert_eq!(put_manifest(&c, base, "library/multi", &sha256(&arm), OCI_MANIFEST, &arm).await.status(), 201);
    let index = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": sha256(&amd), "size": amd.len(), "platform": {"os": "linux", "architecture": "amd64"}},
        {"mediaType": OCI_MANIFEST, "digest": sha256(&arm), "size": arm.len(), "platform": {"os": "linux", "architecture": "arm64"}}]}))
    .unwrap();
    assert_eq!(put_manifest(&c, base, "library/multi", "latest", OCI_INDEX, &index).await.status(), 201);
    let docker_m = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": sha256(arm_config), "size": arm_config.len()},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": sha256(b"arm layer"), "size": 9}]}))
    .unwrap();
    assert_eq!(
        put_manifest(
            &c,
            base,
            "library/multi",
            &sha256(&docker_m),
            "application/vnd.docker.distribution.manifest.v2+json",
            &docker_m
        )
        .await
        .status(),
        201
    );
    let list = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.list.v2+json", "manifests": [
        {"mediaType": "application/vnd.docker.distribution.manifest.v2+json", "digest": sha256(&docker_m), "size": docker_m.len(), "platform": {"os": "linux", "architecture": "arm64"}}]}))
    .unwrap();
    assert_eq!(
        put_manifest(
            &c,
            base,
            "library/multi",
            "list",
            "application/vnd.docker.distribution.manifest.list.v2+json",
            &list
        )
        .await
        .status(),
        201
    );
    (single, index, list)
}

/// Fetch a manifest and, recursively, its children and blobs through `base`; check every digest.
async fn pull_all(c: &reqwest::Client, base: &str, repo: &str, reference: &str, query: &str) -> Vec<u8> {
    let r = c.get(format!("{base}/v2/{repo}/manifests/{reference}{query}")).send().await.unwrap();
    assert_eq!(r.status(), 200, "{repo}:{reference}");
    let bytes = r.bytes().await.unwrap().to_vec();
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    for child in v["manifests"].as_array().into_iter().flatten() {
        let d = child["digest"].as_str().unwrap();
        let b = Box::pin(pull_all(c, base, repo, d, query)).await;
        assert_eq!(sha256(&b), d);
    }
    let blobs = v["config"]
        .as_object()
        .into_iter()
        .chain(v["layers"].as_array().into_iter().flatten().filter_map(Value::as_object));
    for b in blobs {
        let d = b["digest"].as_str().unwrap();
        let r = c.get(format!("{base}/v2/{repo}/blobs/{d}{query}")).send().await.unwrap();
        assert_eq!(sha256(&r.bytes().await.unwrap()), d);
    }
    bytes
}

#[tokio::test]
async fn pulls_through_the_reference_registry_are_byte_identical_and_survive_its_outage() {
    if !require("docker-registry") {
        return;
    }
    let mut upstream = RefRegistry::start(None).await;
    let (single, index, list) = seed(&upstream.url()).await;
    let toml = format!(
        "[storage]\nroot = \"data\"\n[[upstream]]\nname = \"docker.io\"\nurl = \"{}\"\n[[upstream]]\nname = \"ghcr.io\"\nurl = \"{}\"\n[cache]\nupstream_timeout = \"2s\"\n",
        upstream.url(),
        upstream.url()
    );
    let s = TestServer::start(&toml).await;
    let c = client();
    let base = s.url("");
    // Default upstream (dockerd's form), by tag and by digest.
    assert_eq!(pull_all(&c, &base, "library/hello", "latest", "").await, single);
    assert_eq!(pull_all(&c, &base, "hello", &sha256(&single), "").await, single);
    assert_eq!(pull_all(&c, &base, "library/multi", "latest", "").await, index);
    assert_eq!(pull_all(&c, &base, "library/multi", "list", "").await, list);
    // containerd's ?ns= and the path prefix (the ghcr.io stand-in is the same registry here).
    assert_eq!(pull_all(&c, &base, "library/multi", "latest", "?ns=ghcr.io").await, index);
    assert_eq!(pull_all(&c, &base, "ghcr.io/library/hello", "latest", "").await, single);
    // An index first seen through its tag is served locally by digest.
    let gets_before =
        metric(&s.metrics(), r#"regmirror_upstream_requests_total{kind="manifest",status="200",upstream="docker.io"}"#);
    let r = c.get(s.url(&format!("/v2/library/multi/manifests/{}", sha256(&index)))).send().await.unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), &index[..]);
    assert_eq!(
        metric(&s.metrics(), r#"regmirror_upstream_requests_total{kind="manifest",status="200",upstream="docker.io"}"#),
        gets_before
    );

    let v: Value = c.get(s.url("/v2/_catalog")).send().await.unwrap().json().await.unwrap();
    assert!(v["repositories"].as_array().unwrap().contains(&json!("docker.io/library/hello")));

    // Upstream gone, tags due for revalidation, regmirror restarted: still served.
    upstream.stop();
    let repo = RepoName::parse("docker.io/library/multi").unwrap();
    let mut rec = s.state.store.tag(&repo, "latest").await.unwrap().unwrap();
    rec.fetched_at -= 3600;
    s.state.store.set_tag(&repo, "latest", &rec).await.unwrap();
    let dir = s.stop().await;
    let s = TestServer::start_in(dir, &toml).await;
    let base = s.url("");
    assert_eq!(pull_all(&c, &base, "library/multi", "latest", "").await, index);
    assert_eq!(pull_all(&c, &base, "library/hello", "latest", "").await, single);
    assert!(
        metric(&s.metrics(), r#"regmirror_cache_requests_total{kind="manifest",outcome="stale",upstream="docker.io"}"#)
            >= 1.0
    );
    // Never cached and upstream down: an error, never a 400.
    let r = c.get(s.url("/v2/library/never/manifests/latest")).send().await.unwrap();
    assert_eq!(r.status(), 503);
}

// ---- One upstream request per thing (issue 12) ----

/// 50 clients at once on `url`, while the upstream holds its answer until every one of them
/// waits on the mirror's single request. Returns each client's digest header.
async fn fifty_at_once(hub: &Hub, s: &TestServer, url: &str) -> Vec<String> {
    let c = client();
    hub.hold();
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (c, url) = (c.clone(), url.to_string());
            tokio::spawn(async move {
                let r = c.get(&url).send().await.unwrap();
                assert_eq!(r.status(), 200);
                r.headers()["docker-content-digest"].to_str().unwrap().to_string()
            })
        })
        .collect();
    hub.wait_held(1).await;
    eventually("all 50 clients wait on one manifest request", || s.state.cache.manifest_flights.waiting() == 50).await;
    hub.release();
    let mut digests = Vec::new();
    for t in tasks {
        digests.push(t.await.unwrap());
    }
    digests
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_clients_on_an_uncached_tag_cost_one_upstream_request_and_so_do_fifty_revalidations() {
    let hub = Hub::start().await;
    let (_, manifest_digest, _) = hub_image(&hub, "rollout", "latest", blob_of(100, 20));
    let s = TestServer::start(&config(&hub.url())).await;
    let url = s.url("/v2/library/rollout/manifests/latest");
    let counts = || (hub.count(&hub.state.counters.manifest_gets), hub.count(&hub.state.counters.manifest_heads));

    let digests = fifty_at_once(&hub, &s, &url).await;
    assert!(digests.iter().all(|d| d == &manifest_digest));
    assert_eq!(counts(), (1, 0), "50 clients on an uncached tag: one upstream GET");

    // Past the TTL: 50 clients again, one revalidating HEAD.
    s.state.cache.clock.advance(std::time::Duration::from_secs(301));
    let digests = fifty_at_once(&hub, &s, &url).await;
    assert!(digests.iter().all(|d| d == &manifest_digest));
    assert_eq!(counts(), (1, 1), "50 revalidations: one upstream HEAD");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fill_through_a_repository_without_the_blob_fails_only_its_own_clients() {
    let hub = Hub::start().await;
    let blob = blob_of(2 << 20, 21);
    let d = hub.add_blob(blob.clone());
    hub.state.absent_repos.lock().unwrap().insert("evil/nothere".into());
    let s = TestServer::start(&config(&hub.url())).await;
    let c = client();

    // An anonymous client starts the fill through a repository that does not have the blob;
    // its upstream request is held back.
    hub.hold();
    let bad = tokio::spawn({
        let (c, url) = (c.clone(), s.url(&format!("/v2/evil/nothere/blobs/{d}")));
        async move { c.get(&url).send().await.unwrap() }
    });
    hub.wait_held(1).await;
    // A legitimate pull of the same blob through a repository that has it joins that fill.
    let good = tokio::spawn({
        let (c, url) = (c.clone(), s.url(&format!("/v2/evil/good/blobs/{d}")));
        async move {
            let r = c.get(&url).send().await.unwrap();
            (r.status(), sha256(&r.bytes().await.unwrap()))
        }
    });
    let digest = d.parse().unwrap();
    let good_repo = RepoName::parse("docker.io/evil/good").unwrap();
    eventually("the good client joined the fill", || !s.state.cache.fills.runs_without(&digest, &good_repo)).await;
    hub.release();

    let bad = bad.await.unwrap();
    assert_eq!(bad.status(), 404);
    let v: Value = bad.json().await.unwrap();
    assert_eq!(v["errors"][0]["code"], "BLOB_UNKNOWN");
    assert_eq!(good.await.unwrap(), (reqwest::StatusCode::OK, d.clone()));
    assert_eq!(hub.count(&hub.state.counters.cdn_gets), 1, "one upstream fetch of the bytes");
    let bad_repo = RepoName::parse("docker.io/evil/nothere").unwrap();
    assert!(!s.state.store.is_blob_linked(&bad_repo, &digest).await.unwrap());
    assert!(s.state.store.is_blob_linked(&good_repo, &digest).await.unwrap());
}

#[tokio::test]
async fn resumes_back_off_and_outlast_a_short_upstream_outage() {
    let (hub, _s, c, url, blob_digest) = fill_fixture("blip", 4 << 20, 22).await;
    // The connection breaks at 1 MiB, then the next five range requests fail with 503.
    hub.state.reset_after.store(1 << 20, Ordering::SeqCst);
    hub.state.fail_ranges.store(5, Ordering::SeqCst);
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(sha256(&r.bytes().await.unwrap()), blob_digest);
    let attempts = hub.state.range_attempts.lock().unwrap().clone();
    assert_eq!(attempts.len(), 6, "five failed resumes, then one that worked");
    let gaps: Vec<_> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.windows(2).all(|g| g[1] > g[0]), "the waits between resumes do not grow: {gaps:?}");
    assert!(attempts[5] - attempts[0] >= std::time::Duration::from_millis(1500), "{gaps:?}");
}

#[tokio::test]
async fn head_of_an_uncached_blob_gives_its_size_also_during_a_fill() {
    let size = 3 << 20;
    let (hub, _s, c, url, _) = fill_fixture("sized", size, 23).await;
    let r = c.head(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], size.to_string().as_str());
    // While a fill of it is running.
    hub.state.gate.send_replace(1 << 20);
    let mut filling = c.get(&url).send().await.unwrap().bytes_stream();
    filling.next().await.unwrap().unwrap();
    let r = c.head(&url).send().await.unwrap();
    assert_eq!(r.headers()["content-length"], size.to_string().as_str());
    hub.state.gate.send_replace(u64::MAX);
    while filling.next().await.is_some() {}
}

#[tokio::test]
async fn head_through_the_reference_registry_gives_the_blob_size() {
    if !require("docker-registry") {
        return;
    }
    let upstream = RefRegistry::start(None).await;
    let c = client();
    let blob = blob_of(123_456, 24);
    let d = push_blob(&c, &upstream.url(), "library/sized", &blob).await;
    let s = TestServer::start(&config(&upstream.url())).await;
    let r = c.head(s.url(&format!("/v2/library/sized/blobs/{d}"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "123456");
}

#[tokio::test]
async fn a_pushed_blob_is_never_served_through_a_mirrored_name_on_the_upstreams_word() {
    let hub = Hub::start().await;
    hub.state.permissive_heads.store(true, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    regmirror::auth::set_password(&htpasswd, "alice", "alice-secret-pw").unwrap();
    let toml = format!(
        "{}[auth]\nhtpasswd = \"{}\"\n[[auth.grant]]\nusers = [\"alice\"]\nrepositories = [\"private/*\"]\naccess = \"push\"\n",
        config(&hub.url()),
        htpasswd.display()
    );
    let s = TestServer::start_in(dir, &toml).await;
    let c = client();
    let secret = b"a private layer nobody outside may read".to_vec();
    let d = sha256(&secret);
    let r = c
        .post(s.url(&format!("/v2/private/x/blobs/uploads/?digest={d}")))
        .basic_auth("alice", Some("alice-secret-pw"))
        .body(secret.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(c.get(s.url(&format!("/v2/private/x/blobs/{d}"))).send().await.unwrap().status(), 401);

    // The upstream claims every digest but never delivers these bytes: the mirror asks for them
    // and gets nothing, so the anonymous caller gets nothing either.
    let r = c.get(s.url(&format!("/v2/library/anything/blobs/{d}"))).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert!(!r.bytes().await.unwrap().windows(secret.len()).any(|w| w == &secret[..]));

    // When the upstream really has the same bytes, it delivers them (verified) once, and from then
    // on the stored copy serves its repositories.
    hub.add_blob(secret.clone());
    for repo in ["library/anything", "library/other"] {
        let r = c.get(s.url(&format!("/v2/{repo}/blobs/{d}"))).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().await.unwrap().as_ref(), &secret[..]);
    }
    assert_eq!(hub.count(&hub.state.counters.cdn_gets), 1);
}

#[tokio::test]
async fn a_chunked_manifest_over_the_limit_is_refused_while_it_is_read() {
    let hub = Hub::start().await;
    *hub.state.huge_manifest_repo.lock().unwrap() = Some("library/huge".into());
    let s = TestServer::start(&config(&hub.url())).await;
    let r = client().get(s.url("/v2/library/huge/manifests/latest")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["errors"][0]["code"], "UNAVAILABLE");
    assert!(v["errors"][0]["detail"].as_str().unwrap().contains("larger than the limit"), "{v}");
    // The mirror stopped reading near the 4 MiB limit (what the sockets buffer aside), not at 64 MiB.
    let sent = hub.state.huge_sent.load(Ordering::SeqCst);
    assert!(sent < 24 << 20, "{sent} bytes were read for a 4 MiB limit");
    let repo = RepoName::parse("docker.io/library/huge").unwrap();
    assert!(s.state.store.tag(&repo, "latest").await.unwrap().is_none());
}

#[tokio::test]
async fn tag_list_links_lead_to_the_next_page_on_the_mirror_never_elsewhere() {
    let hub = Hub::start().await;
    for tag in ["a", "b", "c"] {
        hub_image(&hub, "paged", tag, blob_of(10, 25));
    }
    *hub.state.link_base.lock().unwrap() = "https://evil.example".into();
    let s = TestServer::start(&config(&hub.url())).await;
    let c = client();
    let r = c.get(s.url("/v2/library/paged/tags/list?n=1")).send().await.unwrap();
    let link = r.headers()["link"].to_str().unwrap().to_string();
    assert_eq!(link, "</v2/docker.io/library/paged/tags/list?n=1&last=a>; rel=\"next\"");
    let next = link.trim_start_matches('<').split('>').next().unwrap();
    let v: Value = c.get(s.url(next)).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["tags"], json!(["b"]));
}

#[tokio::test]
async fn tag_list_links_of_another_upstream_stay_on_that_upstream() {
    if !require("docker-registry") {
        return;
    }
    let upstream = RefRegistry::start(None).await;
    let c = client();
    for tag in ["v1", "v2", "v3"] {
        push_image(&c, &upstream.url(), "org/tool", tag, tag).await;
    }
    let toml = format!("[storage]\nroot = \"data\"\n[[upstream]]\nname = \"ghcr.io\"\nurl = \"{}\"\n", upstream.url());
    let s = TestServer::start(&toml).await;
    let mut url = s.url("/v2/ghcr.io/org/tool/tags/list?n=1");
    let mut seen = Vec::new();
    loop {
        let r = c.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200, "{url}: {:?}", r.headers());
        let link = r.headers().get("link").map(|l| l.to_str().unwrap().to_string());
        let v: Value = r.json().await.unwrap();
        seen.extend(v["tags"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()));
        let Some(link) = link else { break };
        assert!(link.starts_with("</v2/ghcr.io/org/tool/tags/list?"), "{link}");
        url = s.url(link.trim_start_matches('<').split('>').next().unwrap());
    }
    assert_eq!(seen, ["v1", "v2", "v3"]);
}

#[tokio::test]
async fn the_clients_accept_header_decides_as_the_upstream_would() {
    if !require("docker-registry") {
        return;
    }
    let upstream = RefRegistry::start(None).await;
    seed(&upstream.url()).await;
    let s = TestServer::start(&config(&upstream.url())).await;
    let c = client();
    let docker_only = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";
    let get = |accept: &'static str, tag: &'static str| {
        let (c, url) = (c.clone(), s.url(&format!("/v2/library/multi/manifests/{tag}")));
        async move { c.get(&url).header("accept", accept).send().await.unwrap() }
    };
    // Uncached: the client's Accept goes upstream, which has only an OCI index under the tag.
    let r = get(docker_only, "latest").await;
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["errors"][0]["code"], "MANIFEST_UNKNOWN");
    let r = get(OCI_INDEX, "latest").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], OCI_INDEX);
    // Cached now: still not for a client that cannot read it.
    assert_eq!(get(docker_only, "latest").await.status(), 404);
    // A Docker manifest list is what that client asked for.
    assert_eq!(get(docker_only, "list").await.status(), 200);

    // A client that reads no lists at all gets what the upstream gives it (distribution picks the
    // linux/amd64 image of a list), and that answer never becomes the tag for everyone else.
    let c2 = client();
    let arm_config = br#"{"architecture":"arm64","os":"linux"}"#;
    let docker_m = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": sha256(arm_config), "size": arm_config.len()},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": sha256(b"arm layer"), "size": 9}]}))
    .unwrap();
    let list = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": [
        {"mediaType": "application/vnd.docker.distribution.manifest.v2+json", "digest": sha256(&docker_m), "size": docker_m.len(), "platform": {"os": "linux", "architecture": "amd64"}}]}))
    .unwrap();
    assert_eq!(put_manifest(&c2, &upstream.url(), "library/multi", "amd", DOCKER_LIST, &list).await.status(), 201);
    let v2_only = "application/vnd.docker.distribution.manifest.v2+json";
    let r = get(v2_only, "amd").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &docker_m[..], "the upstream's answer for this client");
    let r = get(DOCKER_LIST, "amd").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &list[..], "the tag was taken over by one client's answer");
}

const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

#[tokio::test]
async fn an_upstream_that_stalls_after_its_headers_is_resumed_within_the_timeout() {
    let hub = Hub::start().await;
    let (blob_digest, _, _) = hub_image(&hub, "stalled", "latest", blob_of(4 << 20, 26));
    let toml = config(&hub.url()).replace("upstream_timeout = \"5s\"", "upstream_timeout = \"1s\"");
    let s = TestServer::start(&toml).await;
    hub.state.stall_after.store(1 << 20, Ordering::SeqCst);
    let started = std::time::Instant::now();
    let r = client().get(s.url(&format!("/v2/library/stalled/blobs/{blob_digest}"))).send().await.unwrap();
    assert_eq!(sha256(&r.bytes().await.unwrap()), blob_digest);
    // One silent second, then a range request finished the blob.
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "{:?}", started.elapsed());
    assert_eq!(hub.count(&hub.state.counters.cdn_range_gets), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_waiting_on_its_upstream_outlives_the_idle_timeout() {
    let hub = Hub::start().await;
    let (blob_digest, _, _) = hub_image(&hub, "patient", "latest", blob_of(1 << 20, 27));
    let s = TestServer::start(&format!("[server]\nidle_timeout = \"1s\"\n{}", config(&hub.url()))).await;
    hub.hold();
    let waiting = tokio::spawn({
        let url = s.url(&format!("/v2/library/patient/blobs/{blob_digest}"));
        async move { client().get(url).send().await.map(|r| r.status()) }
    });
    hub.wait_held(1).await;
    // No byte moves on the client's connection for longer than idle_timeout: the mirror is busy
    // with the upstream, which is not idleness.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    hub.release();
    assert_eq!(waiting.await.unwrap().expect("the connection was cut while its request was handled"), 200);
}
