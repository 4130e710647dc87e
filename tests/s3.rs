//! The object-store backend against a real S3 server (SeaweedFS): what a replica finds in the
//! bucket alone, that nothing unverified lands under a blob key, and an object store that stops
//! answering. (The whole API suite also runs on this backend: REGMIRROR_TEST_BACKEND=s3.)

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::hub::Hub;
use common::s3::Seaweed;
use common::*;

fn s3_config(server: &Seaweed, prefix: &str, upstream: &str) -> String {
    format!(
        "[storage]\nroot = \"local\"\nbackend = \"s3\"\n[storage.s3]\n{}[[upstream]]\nname = \"docker.io\"\nurl = \"{upstream}\"\n[cache]\nupstream_timeout = \"3s\"\n",
        server.storage(prefix)
    )
}

fn prefix() -> String {
    format!("{:016x}", rand::random::<u64>())
}

async fn pull_blob(c: &reqwest::Client, s: &TestServer, repo: &str, d: &str) -> reqwest::Response {
    c.get(s.url(&format!("/v2/{repo}/blobs/{d}"))).send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_with_an_empty_local_folder_serves_the_bucket_with_the_upstream_gone() {
    let Some(server) = common::s3::shared() else { return };
    let hub = Hub::start().await;
    let blob = blob_of(3 << 20, 7);
    let (blob_digest, manifest_digest, manifest) = hub_image(&hub, "app", "1", blob.clone());
    let prefix = prefix();
    let a = TestServer::start(&s3_config(server, &prefix, &hub.url())).await;
    let c = client();
    let r = c
        .get(a.url("/v2/library/app/manifests/1"))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(download_digest(pull_blob(&c, &a, "library/app", &blob_digest).await).await, blob_digest);
    // The content is in the bucket, not on A's disk.
    assert!(server.keys(&prefix).iter().any(|k| k.ends_with(&format!("{}/data", &blob_digest[7..]))));
    assert!(!a.dir.path().join("local/blobs").exists(), "blobs on the local disk");
    assert_eq!(std::fs::read_dir(a.dir.path().join("local/tmp")).map_or(0, |d| d.count()), 0);
    a.stop().await;

    // B: a fresh folder, the same bucket, an upstream nobody listens on.
    let b = TestServer::start(&s3_config(server, &prefix, "http://127.0.0.1:9")).await;
    let r = c
        .get(b.url("/v2/library/app/manifests/1"))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], manifest_digest.as_str());
    assert_eq!(r.bytes().await.unwrap(), manifest);
    let r = pull_blob(&c, &b, "library/app", &blob_digest).await;
    assert_eq!(r.status(), 200);
    assert_eq!(download_digest(r).await, blob_digest);
    // A range, as clients resume.
    let r = c
        .get(b.url(&format!("/v2/library/app/blobs/{blob_digest}")))
        .header("range", "bytes=1000-1999")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(&r.bytes().await.unwrap()[..], &blob[1000..2000]);
}

#[tokio::test]
async fn corrupt_upstream_bytes_leave_nothing_under_the_blob_keys() {
    let Some(server) = common::s3::shared() else { return };
    let hub = Hub::start().await;
    let (blob_digest, _, _) = hub_image(&hub, "app", "1", blob_of(2 << 20, 9));
    hub.state.corrupt.store(true, Ordering::SeqCst);
    let prefix = prefix();
    let s = TestServer::start(&s3_config(server, &prefix, &hub.url())).await;
    let c = client();
    let r = pull_blob(&c, &s, "library/app", &blob_digest).await;
    // The error shows at the end of the body at the latest: never complete with bad bytes.
    let complete = r.status() == 200 && r.bytes().await.is_ok_and(|b| common::sha256(&b) == blob_digest);
    assert!(!complete, "corrupt bytes were served as the blob");
    let blob_keys: Vec<String> = server.keys(&format!("{prefix}/blobs")).into_iter().collect();
    assert!(blob_keys.is_empty(), "blob keys after a corrupt fill: {blob_keys:?}");
    // Nothing staged is left on the local disk either.
    assert_eq!(std::fs::read_dir(s.dir.path().join("local/tmp")).map_or(0, |d| d.count()), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_object_store_that_stops_answering_gives_503_then_service_resumes() {
    let Some(server) = common::s3::own() else { return };
    let hub = Hub::start().await;
    let (blob_digest, _, _) = hub_image(&hub, "app", "1", blob_of(1 << 20, 5));
    let prefix = prefix();
    let s = TestServer::start(&s3_config(&server, &prefix, &hub.url())).await;
    let c = client();
    assert_eq!(download_digest(pull_blob(&c, &s, "library/app", &blob_digest).await).await, blob_digest);
    assert_eq!(c.get(s.url("/readyz")).send().await.unwrap().status(), 200);

    server.signal("STOP");
    // Requests end within the timeout bounds (3 s per attempt, two retries), with error JSON.
    let started = Instant::now();
    let r = pull_blob(&c, &s, "library/app", &blob_digest).await;
    let waited = started.elapsed();
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "UNAVAILABLE");
    assert!(!body.to_string().contains(common::s3::SECRET_KEY));
    assert!(waited < Duration::from_secs(15), "answered after {waited:?}");
    assert_eq!(c.get(s.url("/readyz")).send().await.unwrap().status(), 503);
    // Health is the process's own: still alive.
    assert_eq!(c.get(s.url("/healthz")).send().await.unwrap().status(), 200);

    server.signal("CONT");
    eventually_async("the store answers again", || async {
        c.get(s.url("/readyz")).send().await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    let r = pull_blob(&c, &s, "library/app", &blob_digest).await;
    assert_eq!(r.status(), 200);
    assert_eq!(download_digest(r).await, blob_digest);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_started_while_the_store_is_away_waits_for_it_and_then_serves() {
    let Some(server) = common::s3::own() else { return };
    let hub = Hub::start().await;
    let (blob_digest, _, _) = hub_image(&hub, "app", "1", blob_of(1 << 20, 7));
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("mirror.toml");
    let prefix = prefix();
    std::fs::write(
        &config,
        format!("[server]\nlisten = \"127.0.0.1:{port}\"\n{}", s3_config(&server, &prefix, &hub.url()))
            .replace("root = \"local\"", &format!("root = {:?}", dir.path().join("local")))
            // Each attempt gives up on the stopped store sooner.
            .replace("upstream_timeout = \"3s\"", "upstream_timeout = \"1s\""),
    )
    .unwrap();
    server.signal("STOP");
    let mut replica = Proc::spawn(&config, &dir.path().join("replica.log"));
    let log = || std::fs::read_to_string(dir.path().join("replica.log")).unwrap_or_default();
    eventually("the replica says it waits for the store", || {
        log().matches("the object store cannot be used").count() >= 2
    })
    .await;
    assert!(replica.child.try_wait().unwrap().is_none(), "the replica exited: {}", log());
    assert!(!log().contains(common::s3::SECRET_KEY) && !log().contains("X-Amz-Signature"), "{}", log());

    server.signal("CONT");
    let url = format!("http://127.0.0.1:{port}");
    let c = client();
    eventually_async("the replica serves once the store is back", || async {
        c.get(format!("{url}/readyz")).send().await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    let r = c.get(format!("{url}/v2/library/app/blobs/{blob_digest}")).send().await.unwrap();
    assert_eq!(download_digest(r).await, blob_digest);
    replica.child.kill().unwrap();
    replica.child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_lost_in_the_middle_of_a_body_aborts_it_and_the_failure_is_counted() {
    let Some(server) = common::s3::own() else { return };
    let hub = Hub::start().await;
    let size = 64 << 20;
    let (blob_digest, _, _) = hub_image(&hub, "big", "1", blob_of(size, 6));
    let prefix = prefix();
    let s = TestServer::start(&s3_config(&server, &prefix, &hub.url())).await;
    let c = client();
    assert_eq!(download_digest(pull_blob(&c, &s, "library/big", &blob_digest).await).await, blob_digest);
    let read_errors = || metric(&s.metrics(), r#"regmirror_storage_errors_total{operation="read"}"#);
    assert_eq!(read_errors(), 0.0);

    // A stored blob is being served from the bucket when the object store dies.
    let mut r = pull_blob(&c, &s, "library/big", &blob_digest).await;
    assert_eq!(r.status(), 200);
    let mut received = r.chunk().await.unwrap().map_or(0, |b| b.len());
    server.signal("KILL");
    let ended = loop {
        match r.chunk().await {
            Ok(Some(bytes)) => received += bytes.len(),
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    // Cut short, never ended as if complete; and counted as a failed read of the store.
    assert!(ended.is_err() && received < size, "the body ended normally after {received} bytes");
    assert!(read_errors() >= 1.0, "a store lost mid-body was not counted");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chunked_push_started_on_one_replica_is_finished_on_another() {
    let Some(server) = common::s3::shared() else { return };
    let prefix = prefix();
    let a = TestServer::start(&s3_config(server, &prefix, "http://127.0.0.1:9")).await;
    let b = TestServer::start(&s3_config(server, &prefix, "http://127.0.0.1:9")).await;
    let c = client();
    let first = blob_of(3 << 20, 1);
    let second = blob_of(1 << 20, 2);
    let whole: Vec<u8> = first.iter().chain(second.iter()).copied().collect();
    let digest = common::sha256(&whole);
    let r = c.post(a.url("/v2/private/app/blobs/uploads/")).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let r = c
        .patch(a.url(&loc))
        .header("content-range", format!("0-{}", first.len() - 1))
        .body(first.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // The next chunk and the end go to B (a load balancer's choice).
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let r = c.get(b.url(&loc)).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["range"], format!("0-{}", first.len() - 1).as_str());
    let r = c
        .patch(b.url(&loc))
        .header("content-range", format!("{}-{}", first.len(), whole.len() - 1))
        .body(second.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = c.put(b.url(&format!("{loc}{sep}digest={digest}"))).send().await.unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    // Either replica serves it; the session's parts are gone.
    for s in [&a, &b] {
        let r = c.get(s.url(&format!("/v2/private/app/blobs/{digest}"))).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(download_digest(r).await, digest);
    }
    let left = server.keys(&format!("{prefix}/uploads"));
    assert!(left.is_empty(), "{left:?}");

    // A chunked push whose bytes do not match its digest leaves no blob key.
    let r = c.post(a.url("/v2/private/app/blobs/uploads/")).send().await.unwrap();
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let r = c.patch(a.url(&loc)).body(b"not what the digest says".to_vec()).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let wrong = common::sha256(b"something else");
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = c.put(b.url(&format!("{loc}{sep}digest={wrong}"))).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let actual = common::sha256(b"not what the digest says");
    let blob_keys = server.keys(&format!("{prefix}/blobs"));
    assert!(blob_keys.iter().all(|k| !k.contains(&wrong[7..]) && !k.contains(&actual[7..])), "{blob_keys:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_seconds_without_the_object_store_under_a_light_pull_load() {
    let Some(server) = common::s3::own() else { return };
    let hub = Hub::start().await;
    let images: Vec<(String, String)> = (0..4u8)
        .map(|i| {
            let (blob, _, _) = hub_image(&hub, &format!("app{i}"), "1", blob_of(1 << 20, 50 + i));
            (format!("library/app{i}"), blob)
        })
        .collect();
    let prefix = prefix();
    let s = std::sync::Arc::new(TestServer::start(&s3_config(&server, &prefix, &hub.url())).await);
    let c = client();
    // Two images cached before the outage, two pulled for the first time during it.
    for (repo, blob) in &images[..2] {
        assert_eq!(download_digest(pull_blob(&c, &s, repo, blob).await).await, *blob);
    }

    // The load: one pull after another, round the images, every answer recorded.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let outage_started = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answers = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(u16, Duration, String)>::new()));
    let load = tokio::spawn({
        let (s, c, stop, answers, images) = (s.clone(), c.clone(), stop.clone(), answers.clone(), images.clone());
        let outage_started = outage_started.clone();
        async move {
            // Before the outage: the two cached images in turn. From its start: the two
            // uncached ones first, then round all four.
            let (mut before, mut since) = (0usize, 0usize);
            loop {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let (repo, blob) = if outage_started.load(Ordering::SeqCst) {
                    since += 1;
                    &images[(1 + since) % images.len()]
                } else {
                    before += 1;
                    &images[before % 2]
                };
                let started = Instant::now();
                let r = pull_blob(&c, &s, repo, blob).await;
                let status = r.status().as_u16();
                let body = match status {
                    // A fill the outage cuts short aborts its body: recorded as status 0.
                    200 => match r.bytes().await {
                        Ok(bytes) => sha256(&bytes),
                        Err(e) => {
                            answers.lock().unwrap().push((0, started.elapsed(), e.to_string()));
                            continue;
                        }
                    },
                    _ => r.text().await.unwrap_or_default(),
                };
                answers.lock().unwrap().push((status, started.elapsed(), body));
                tokio::time::sleep(Duration::from_millis(100)).await; // the pace of the load, not a wait
            }
        }
    });
    eventually("the load runs", || answers.lock().unwrap().len() >= 4).await;
    server.signal("STOP");
    outage_started.store(true, Ordering::SeqCst);
    let outage = Instant::now();
    eventually_async("/readyz says not ready", || async {
        c.get(s.url("/readyz")).send().await.is_ok_and(|r| r.status() == 503)
    })
    .await;
    // The outage lasts 10 s (the scenario, not a synchronisation).
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(outage.elapsed())).await;
    let during = answers.lock().unwrap().len();
    server.signal("CONT");
    eventually_async("/readyz is ready again", || async {
        c.get(s.url("/readyz")).send().await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    eventually("eight pulls in a row succeeded", || {
        let a = answers.lock().unwrap();
        a.len() >= during + 8 && a[a.len() - 8..].iter().all(|(status, _, _)| *status == 200)
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    load.await.unwrap();

    // The failures are counted by operation.
    let store_errors: f64 = s
        .metrics()
        .lines()
        .filter(|l| l.starts_with("regmirror_storage_errors_total{operation="))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(store_errors > 0.0, "no storage errors counted");
    let answers = std::mem::take(&mut *answers.lock().unwrap());
    let unavailable: Vec<_> = answers.iter().filter(|(status, _, _)| *status == 503).collect();
    assert!(!unavailable.is_empty(), "no 503 during the outage");
    for (status, took, body) in answers.iter() {
        match status {
            200 => assert!(images.iter().any(|(_, blob)| blob == body), "a pull returned other bytes: {body}"),
            503 => {
                let v: serde_json::Value = serde_json::from_str(body).unwrap();
                assert_eq!(v["errors"][0]["code"], "UNAVAILABLE");
                assert!(!body.contains(common::s3::SECRET_KEY));
            }
            0 => {} // aborted, never completed with wrong bytes
            other => panic!("answered {other}: {body}"),
        }
        assert!(*took < Duration::from_secs(15), "an answer took {took:?}");
    }
    // Every image pulls now, the ones first pulled during the outage too.
    for (repo, blob) in &images {
        assert_eq!(download_digest(pull_blob(&c, &s, repo, blob).await).await, *blob);
    }
    // Every blob in the bucket matches its digest; nothing partial is there.
    let keys = server.keys(&prefix);
    let blob_keys: Vec<&String> = keys.iter().filter(|k| k.contains("/blobs/") && k.ends_with("/data")).collect();
    assert!(blob_keys.len() >= images.len(), "{keys:?}");
    for key in blob_keys {
        let hex = key.trim_end_matches("/data").rsplit('/').next().unwrap();
        assert_eq!(sha256(&server.get(key)), format!("sha256:{hex}"), "{key}");
    }
    assert!(!keys.iter().any(|k| k.contains(".parts") || k.contains("/tmp/")), "{keys:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_redirect_cached_blobs_are_fetched_from_the_bucket_and_the_replica_serves_no_blob_bytes() {
    let Some(server) = common::s3::shared() else { return };
    let hub = Hub::start().await;
    let blob = blob_of(3 << 20, 60);
    let (blob_digest, _, _) = hub_image(&hub, "app", "1", blob.clone());
    let prefix = prefix();
    let config = s3_config(server, &prefix, &hub.url()).replace("[storage.s3]\n", "[storage.s3]\nredirect = true\n");
    let s = TestServer::start(&config).await;
    let c = client();
    let manual = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    // The first pull runs the fill (streamed by the replica: the blob is not in the bucket yet).
    assert_eq!(download_digest(pull_blob(&c, &s, "library/app", &blob_digest).await).await, blob_digest);
    let served_by_fill = metric(&s.metrics(), "regmirror_served_bytes_total{source=\"fill\"}");
    assert_eq!(served_by_fill, (3 << 20) as f64);
    // From then on: a 307 to a presigned URL of the bucket, which serves the bytes (ranges too).
    let url = s.url(&format!("/v2/library/app/blobs/{blob_digest}"));
    let r = manual.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 307);
    assert_eq!(r.headers()["docker-content-digest"], blob_digest.as_str());
    let location = r.headers()["location"].to_str().unwrap().to_string();
    assert!(location.starts_with(&server.endpoint) && location.contains("X-Amz-Signature"), "{location}");
    assert_eq!(download_digest(manual.get(&location).send().await.unwrap()).await, blob_digest);
    // A client that follows redirects, asking for a range.
    let follows = reqwest::Client::new();
    let r = follows.get(&url).header("range", "bytes=100-199").send().await.unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(&r.bytes().await.unwrap()[..], &blob[100..200]);
    // HEAD is still answered by the replica.
    let r = manual.head(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], (3 << 20).to_string().as_str());
    // A pushed blob too.
    let pushed = push_blob(&c, &s.url(""), "private/app", &blob_of(1 << 20, 61)).await;
    let r = manual.get(s.url(&format!("/v2/private/app/blobs/{pushed}"))).send().await.unwrap();
    assert_eq!(r.status(), 307);
    let text = s.metrics();
    assert_eq!(metric(&text, "regmirror_served_bytes_total{source=\"cache\"}"), 0.0, "the replica served blob bytes");
    assert_eq!(metric(&text, "regmirror_served_bytes_total{source=\"fill\"}"), served_by_fill);
    assert_eq!(metric(&text, "regmirror_blob_redirects_total"), 3.0);
}

#[tokio::test]
async fn multipart_uploads_a_crash_left_behind_are_aborted_once_old() {
    let Some(server) = common::s3::shared() else { return };
    let prefix = prefix();
    let s = TestServer::start(&s3_config(server, &prefix, "http://127.0.0.1:9")).await;
    // A replica killed while it stored a blob leaves its multipart upload open; another bucket
    // user's, outside the prefix, is none of regmirror's business.
    server.start_multipart(&format!("{prefix}/blobs/sha256/00/{}/data", "0".repeat(64)));
    let other = format!("not-{prefix}/x");
    server.start_multipart(&other);
    assert_eq!(server.multipart_uploads(&prefix).len(), 1);
    // Younger than the age given: kept (it may be a blob being stored right now).
    assert_eq!(s.state.store.purge_abandoned_writes(Duration::from_secs(3600)).await.unwrap(), 0);
    assert_eq!(server.multipart_uploads(&prefix).len(), 1);
    // Older: aborted.
    tokio::time::sleep(Duration::from_millis(1100)).await; // the upload's age is the scenario
    assert_eq!(s.state.store.purge_abandoned_writes(Duration::from_secs(1)).await.unwrap(), 1);
    assert!(server.multipart_uploads(&prefix).is_empty());
    assert_eq!(server.multipart_uploads(&other), vec![other.clone()]);
}
