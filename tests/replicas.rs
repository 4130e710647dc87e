//! Replicas on one bucket (SeaweedFS): one upstream fetch per blob across replicas, with the
//! bytes streamed between them as they arrive; a replica killed mid-fill and its fill taken over.

mod common;

use std::time::{Duration, Instant};

use common::hub::Hub;
use common::s3::Seaweed;
use common::*;
use futures_util::StreamExt;
use sha2::Digest as _;

/// The two tests that move hundreds of MiB run one after the other: the takeover test measures
/// time, and a 2-core machine busy hashing 4 GiB for the other would blur it.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn prefix() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// A replica's configuration: the store under `prefix`, advertised at `advertise` (`@SELF@`: the
/// test server's own address).
fn replica_config(server: &Seaweed, prefix: &str, upstream: &str, advertise: &str) -> String {
    format!(
        "[storage]\nroot = \"local\"\nbackend = \"s3\"\n[storage.s3]\n{}[cluster]\nadvertise = \"{advertise}\"\n[[upstream]]\nname = \"docker.io\"\nurl = \"{upstream}\"\n[cache]\nupstream_timeout = \"5s\"\n",
        server.storage(prefix)
    )
}

/// A client's download: sends on `first` when its first bytes arrived, returns the digest.
async fn download(c: reqwest::Client, url: String, first: tokio::sync::mpsc::Sender<Instant>) -> String {
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200, "{url}");
    let mut h = sha2::Sha256::new();
    let mut body = r.bytes_stream();
    let mut told = false;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.unwrap();
        if !told && !chunk.is_empty() {
            first.send(Instant::now()).await.unwrap();
            told = true;
        }
        h.update(&chunk);
    }
    format!("sha256:{}", hex::encode(h.finalize()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_clients_on_two_replicas_cost_one_upstream_get_and_the_second_replica_streams_early() {
    let Some(server) = common::s3::shared() else { return };
    let _alone = HEAVY.lock().await;
    let size = 256 << 20;
    let hub = Hub::start().await;
    let (blob_digest, _, _) = hub_image(&hub, "big", "1", blob_of(size, 41));
    let prefix = prefix();
    let a = TestServer::start(&replica_config(server, &prefix, &hub.url(), "@SELF@")).await;
    let b = TestServer::start(&replica_config(server, &prefix, &hub.url(), "@SELF@")).await;
    let c = client();
    let path = format!("/v2/library/big/blobs/{blob_digest}");
    // The upstream sends a quarter, then holds the rest back until the test says so: the fill
    // cannot end before then.
    hub.state.gate.send_replace((size / 4) as u64);

    let (a_first_tx, mut a_first) = tokio::sync::mpsc::channel(8);
    let (b_first_tx, mut b_first) = tokio::sync::mpsc::channel(8);
    let mut clients = Vec::new();
    // A starts the fill (and takes its lease) ...
    clients.push(tokio::spawn(download(c.clone(), a.url(&path), a_first_tx.clone())));
    a_first.recv().await.unwrap();
    // ... then seven more on A and eight on B.
    for _ in 0..7 {
        clients.push(tokio::spawn(download(c.clone(), a.url(&path), a_first_tx.clone())));
    }
    for _ in 0..8 {
        clients.push(tokio::spawn(download(c.clone(), b.url(&path), b_first_tx.clone())));
    }
    for _ in 0..8 {
        b_first.recv().await.unwrap();
    }
    // Every client of B has bytes while the upstream still holds back three quarters.
    let fetched = metric(&a.metrics(), "regmirror_upstream_bytes_total{kind=\"blob\",upstream=\"docker.io\"}");
    assert!(fetched > 0.0 && fetched as usize <= size / 4, "{fetched}");
    hub.state.gate.send_replace(u64::MAX);
    for client in clients {
        assert_eq!(client.await.unwrap(), blob_digest);
    }
    assert_eq!(hub.count(&hub.state.counters.blob_gets), 1, "one upstream GET for the site");
    assert_eq!(hub.count(&hub.state.counters.cdn_gets), 1);
    // B took every byte from A, none from the upstream.
    assert_eq!(metric(&b.metrics(), "regmirror_cluster_relayed_bytes_total") as usize, size);
    assert_eq!(metric(&b.metrics(), "regmirror_upstream_bytes_total{kind=\"blob\",upstream=\"docker.io\"}"), 0.0);
    // Stored once, and both replicas serve it from the bucket now.
    let blob_keys: Vec<String> =
        server.keys(&prefix).into_iter().filter(|k| k.ends_with(&format!("{}/data", &blob_digest[7..]))).collect();
    assert_eq!(blob_keys.len(), 1, "{blob_keys:?}");
    let r = c.get(b.url(&path)).send().await.unwrap();
    assert_eq!(download_digest(r).await, blob_digest);
    assert_eq!(hub.count(&hub.state.counters.cdn_gets), 1);
}

/// A fill run by replica A, a process of its own (to be stopped), with one client of A and
/// eight of B following it through A; set up until B has a third of the blob, the upstream held
/// there.
struct FollowedFill {
    hub: Hub,
    a: Proc,
    b: TestServer,
    a_client: tokio::task::JoinHandle<bool>,
    b_clients: Vec<tokio::task::JoinHandle<String>>,
    blob_digest: String,
    path: String,
    prefix: String,
    _dir: tempfile::TempDir,
}

async fn fill_followed_through_b(server: &Seaweed, repo: &str, seed: u8, server_toml: &str) -> FollowedFill {
    let size = 96 << 20;
    let hub = Hub::start().await;
    let (blob_digest, _, _) = hub_image(&hub, repo, "1", blob_of(size, seed));
    let prefix = prefix();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let a_url = format!("http://127.0.0.1:{port}");
    let config = dir.path().join("mirror.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n{server_toml}{}",
            replica_config(server, &prefix, &hub.url(), &a_url)
        ),
    )
    .unwrap();
    let a = Proc::spawn(&config, &dir.path().join("a.log"));
    wait_until_up(&format!("{a_url}/healthz")).await;
    let b = TestServer::start(&replica_config(server, &prefix, &hub.url(), "@SELF@")).await;
    let c = client();
    let path = format!("/v2/library/{repo}/blobs/{blob_digest}");
    hub.state.gate.send_replace((size / 3) as u64);

    // A's client starts the fill; B's eight follow it through A.
    let (a_first_tx, mut a_first) = tokio::sync::mpsc::channel(1);
    let a_client = tokio::spawn({
        let (c, url) = (c.clone(), format!("{a_url}{path}"));
        async move {
            let r = c.get(&url).send().await.unwrap();
            a_first_tx.send(()).await.unwrap();
            r.bytes().await.is_ok()
        }
    });
    a_first.recv().await.unwrap();
    let (b_first_tx, mut b_first) = tokio::sync::mpsc::channel(8);
    let b_clients: Vec<_> =
        (0..8).map(|_| tokio::spawn(download(c.clone(), b.url(&path), b_first_tx.clone()))).collect();
    for _ in 0..8 {
        b_first.recv().await.unwrap();
    }
    // A third of the blob has reached B through A.
    eventually("B has a third of the blob", || {
        metric(&b.metrics(), "regmirror_cluster_relayed_bytes_total") as usize >= size / 3
    })
    .await;
    FollowedFill { hub, a, b, a_client, b_clients, blob_digest, path, prefix, _dir: dir }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fill_owner_killed_mid_fill_is_taken_over_and_every_client_of_the_other_replica_completes() {
    let Some(server) = common::s3::shared() else { return };
    let _alone = HEAVY.lock().await;
    let FollowedFill { hub, mut a, b, a_client, b_clients, blob_digest, path, prefix, _dir } =
        fill_followed_through_b(server, "taken", 42, "").await;
    let c = client();

    a.child.kill().unwrap();
    a.child.wait().unwrap();
    let killed = Instant::now();
    hub.state.gate.send_replace(u64::MAX);
    eventually_async("B took the fill over", || async {
        metric(&b.metrics(), "regmirror_cluster_fill_takeovers_total") == 1.0
    })
    .await;
    let took = killed.elapsed();
    eprintln!("B took the fill over {took:?} after A was killed");
    assert!(took <= Duration::from_secs(10), "the lease outlived its owner by {took:?}");
    for client in b_clients {
        assert_eq!(client.await.unwrap(), blob_digest);
    }
    assert!(!a_client.await.unwrap(), "A's client completed although A was killed");
    // B went on from the byte it had.
    assert!(hub.count(&hub.state.counters.cdn_range_gets) >= 1);
    // The lease goes with the fill: it is removed just after the clients have their last byte.
    eventually("the fill's lease is gone from the bucket", || {
        !server.keys(&prefix).iter().any(|k| k.contains("cluster/leases/fill-"))
    })
    .await;
    // The bucket holds the blob once, verified, and nothing partial.
    let keys = server.keys(&prefix);
    let blob_keys: Vec<&String> = keys.iter().filter(|k| k.ends_with(&format!("{}/data", &blob_digest[7..]))).collect();
    assert_eq!(blob_keys.len(), 1, "{keys:?}");
    assert!(!keys.iter().any(|k| k.contains("/tmp/") || k.contains(".parts")), "{keys:?}");
    let r = c.get(b.url(&path)).send().await.unwrap();
    assert_eq!(download_digest(r).await, blob_digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fill_owner_stopped_cleanly_hands_its_fill_over_without_waiting_for_the_lease_to_expire() {
    let Some(server) = common::s3::shared() else { return };
    let _alone = HEAVY.lock().await;
    // A drains for a second at most, then ends, giving its leases up.
    let FollowedFill { hub, mut a, b, b_clients, blob_digest, prefix, _dir, .. } =
        fill_followed_through_b(server, "handed", 44, "shutdown_timeout = \"1s\"\n").await;
    a.signal("TERM");
    let stopped = Instant::now();
    let exit = a.child.wait().unwrap();
    assert!(exit.success(), "A ended with {exit}");
    hub.state.gate.send_replace(u64::MAX);
    // B goes on from the byte it had as soon as the lease is free. A lease left to expire could
    // be taken no sooner than EXPIRY after B last saw it renewed, which was at most RENEW
    // before A was told to stop.
    eventually("B asked the upstream for the rest", || hub.count(&hub.state.counters.cdn_range_gets) >= 1).await;
    let took = stopped.elapsed();
    eprintln!("B went on {took:?} after A was told to stop");
    let expiry = regmirror::cluster::EXPIRY - regmirror::cluster::RENEW;
    assert!(took < expiry, "B waited {took:?}: the lease was left to expire");
    for client in b_clients {
        assert_eq!(client.await.unwrap(), blob_digest);
    }
    // Handed over, not taken over; A fetched the first part of the blob, B only the rest.
    assert_eq!(metric(&b.metrics(), "regmirror_cluster_fill_takeovers_total"), 0.0);
    assert_eq!(hub.count(&hub.state.counters.cdn_gets), 2);
    assert_eq!(hub.count(&hub.state.counters.cdn_range_gets), 1);
    let keys = server.keys(&prefix);
    assert!(keys.iter().any(|k| k.ends_with(&format!("{}/data", &blob_digest[7..]))), "{keys:?}");
}

/// `/api/status` of `s`, as alice (signed in) or anonymously.
async fn status_of(c: &reqwest::Client, s: &TestServer, signed_in: bool) -> serde_json::Value {
    let mut req = c.get(s.url("/api/status"));
    if signed_in {
        req = req.basic_auth("alice", Some("alice-secret-pw"));
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// The other replica as `s` lists it, if it lists exactly one other.
fn the_other(status: &serde_json::Value) -> Option<serde_json::Value> {
    match status["replicas"].as_array()?.as_slice() {
        [own, other] if own["this"] == true && other["this"] == false => Some(other.clone()),
        _ => None,
    }
}

#[tokio::test]
async fn each_replica_lists_the_others_and_one_shut_down_cleanly_leaves_the_list() {
    let Some(server) = common::s3::shared() else { return };
    let hub = Hub::start().await;
    let prefix = prefix();
    let work = tempfile::tempdir().unwrap();
    let htpasswd = work.path().join("htpasswd");
    regmirror::auth::set_password(&htpasswd, "alice", "alice-secret-pw").unwrap();
    let config = format!(
        "{}[auth]\nhtpasswd = {:?}\nanonymous = \"pull-mirror\"\n",
        replica_config(server, &prefix, &hub.url(), "@SELF@"),
        htpasswd
    );
    let a = TestServer::start(&config).await;
    let b = TestServer::start(&config).await;
    let c = client();
    eventually_async("A lists B, up", || async {
        the_other(&status_of(&c, &a, true).await).is_some_and(|other| other["up"] == true)
    })
    .await;
    let status = status_of(&c, &a, true).await;
    assert_eq!(status["replicas"][0]["advertise"], a.url(""));
    let other = the_other(&status).unwrap();
    assert_eq!(other["advertise"], b.url(""));
    assert_eq!(other["version"], env!("CARGO_PKG_VERSION"));
    let b_node = other["node"].as_str().unwrap().to_string();
    let page = c.get(a.url("/")).basic_auth("alice", Some("alice-secret-pw")).send().await.unwrap();
    let page = page.text().await.unwrap();
    assert!(page.contains(&format!("data-replica=\"{b_node}\" data-up=\"true\"")), "{page}");
    assert!(page.contains(&b.url("")));
    // Anonymous visitors see the replicas, not where they are.
    let anonymous = status_of(&c, &a, false).await;
    assert!(the_other(&anonymous).is_some_and(|other| other["advertise"].is_null()), "{anonymous}");
    assert!(anonymous["replicas"][0]["advertise"].is_null());
    let page = c.get(a.url("/")).send().await.unwrap().text().await.unwrap();
    assert!(page.contains(&format!("data-replica=\"{b_node}\"")) && !page.contains(&b.url("")));

    // B shuts down cleanly: its record leaves the bucket at once, and A's list at A's next look.
    b.stop().await;
    assert!(!server.keys(&prefix).iter().any(|k| k.ends_with(&format!("cluster/replicas/{b_node}"))));
    eventually_async("A no longer lists B", || async {
        status_of(&c, &a, true).await["replicas"].as_array().is_some_and(|r| r.len() == 1)
    })
    .await;
    // B's announcements go on in the background, and do not bring its record back.
    assert!(!server.keys(&prefix).iter().any(|k| k.ends_with(&format!("cluster/replicas/{b_node}"))));
}

#[tokio::test]
async fn a_replica_refuses_unsigned_requests_for_its_fills() {
    let Some(server) = common::s3::shared() else { return };
    let hub = Hub::start().await;
    let (blob_digest, _, _) = hub_image(&hub, "secret", "1", blob_of(1 << 20, 43));
    let a = TestServer::start(&replica_config(server, &prefix(), &hub.url(), "@SELF@")).await;
    let c = client();
    let r = c.get(a.url(&format!("/v2/library/secret/blobs/{blob_digest}"))).send().await.unwrap();
    assert_eq!(download_digest(r).await, blob_digest);
    for auth in [None, Some("4102444800.00"), Some("garbage")] {
        let mut req = c.get(a.url(&format!("/_regmirror/fills/{blob_digest}")));
        if let Some(auth) = auth {
            req = req.header("x-regmirror-peer", auth);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 403);
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["errors"][0]["code"], "DENIED");
    }
}

fn skopeo(args: &[&str]) -> String {
    let out = std::process::Command::new("skopeo").args(args).output().expect("skopeo");
    assert!(out.status.success(), "skopeo {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_multi_arch_image_pushed_through_one_replica_comes_back_identical_through_the_other() {
    let Some(server) = common::s3::shared() else { return };
    if !require("skopeo") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let htpasswd = work.path().join("htpasswd");
    regmirror::auth::set_password(&htpasswd, "alice", "alice-secret-pw").unwrap();
    let auth = format!(
        "[auth]\nhtpasswd = \"{}\"\nanonymous = \"none\"\n[[auth.grant]]\nusers = [\"alice\"]\nrepositories = [\"private/*\"]\naccess = \"delete\"\n",
        htpasswd.display()
    );
    let prefix = prefix();
    let config = format!("{}{auth}", replica_config(server, &prefix, "http://127.0.0.1:9", "@SELF@"));
    let a = TestServer::start(&config).await;
    let b = TestServer::start(&config).await;
    let layout = work.path().join("multi");
    let index_digest = write_oci_layout(&layout, "v1", &[("linux", "amd64"), ("linux", "arm64")], "replicas");
    let (on_a, on_b) =
        (format!("docker://{}/private/multi:v1", a.addr), format!("docker://{}/private/multi:v1", b.addr));
    let creds = "alice:alice-secret-pw";
    skopeo(&[
        "copy",
        "--all",
        "--dest-tls-verify=false",
        "--dest-creds",
        creds,
        &format!("oci:{}:v1", layout.display()),
        &on_a,
    ]);
    let back = work.path().join("back");
    skopeo(&[
        "copy",
        "--all",
        "--src-tls-verify=false",
        "--src-creds",
        creds,
        &on_b,
        &format!("dir:{}", back.display()),
    ]);
    // The index and every manifest and blob of both platforms, byte for byte.
    assert_eq!(sha256(&std::fs::read(back.join("manifest.json")).unwrap()), index_digest);
    let mut checked = 0;
    for entry in std::fs::read_dir(&back).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if let Some(hex) = name.strip_suffix(".manifest.json").or(Some(name.as_str())).filter(|n| n.len() == 64) {
            assert_eq!(sha256(&std::fs::read(&path).unwrap()), format!("sha256:{hex}"), "{name}");
            checked += 1;
        }
    }
    assert!(checked >= 6, "only {checked} manifests and blobs came back");

    // A token A issued is accepted by B (one signing key in the bucket).
    let c = client();
    let token: serde_json::Value = c
        .get(a.url("/auth/token?service=regmirror&scope=repository:private/multi:pull,delete"))
        .basic_auth("alice", Some("alice-secret-pw"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = token["token"].as_str().unwrap().to_string();
    let manifest_on = |s: &TestServer| {
        c.get(s.url("/v2/private/multi/manifests/v1"))
            .bearer_auth(&token)
            .header("accept", "application/vnd.oci.image.index.v1+json")
            .send()
    };
    assert_eq!(manifest_on(&b).await.unwrap().status(), 200);
    // A tag deleted through B is gone on A at once.
    let r = c.delete(b.url("/v2/private/multi/manifests/v1")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let r = manifest_on(&a).await.unwrap();
    assert_eq!(r.status(), 404);
    // The manifest itself is still there by digest, on both.
    let r = c
        .get(a.url(&format!("/v2/private/multi/manifests/{index_digest}")))
        .bearer_auth(&token)
        .header("accept", "application/vnd.oci.image.index.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// The bytes of blob content in the bucket under `prefix`.
fn blob_bytes(server: &Seaweed, prefix: &str) -> u64 {
    server
        .objects(&format!("{prefix}/blobs"))
        .iter()
        .filter(|(k, ..)| k.ends_with("/data"))
        .map(|(_, size, _)| size)
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn eviction_keeps_the_bucket_under_max_size_and_counts_uses_on_every_replica() {
    let Some(server) = common::s3::shared() else { return };
    let hub = Hub::start().await;
    let blobs: Vec<String> =
        (0..5u8).map(|i| hub_image(&hub, &format!("e{i}"), "1", blob_of(3 << 20, 70 + i)).0).collect();
    let prefix = prefix();
    let config = replica_config(server, &prefix, &hub.url(), "@SELF@")
        .replace("[storage]\n", "[storage]\nmax_size = \"14MiB\"\n");
    let a = TestServer::start(&config).await;
    let b = TestServer::start(&config).await;
    let c = client();
    let pull = |s: &TestServer, i: usize| {
        let url = s.url(&format!("/v2/library/e{i}/blobs/{}", blobs[i]));
        let c = c.clone();
        async move { download_digest(c.get(url).send().await.unwrap()).await }
    };
    // Four images through A, then the layer of e1 pushed into a private repository through B:
    // private now, never to be evicted (A still has it as mirrored content). 12 MiB in all.
    for (i, blob) in blobs.iter().enumerate().take(4) {
        assert_eq!(pull(&a, i).await, *blob);
    }
    let private = push_blob(&c, &b.url(""), "private/keep", &blob_of(3 << 20, 71)).await;
    assert_eq!(private, blobs[1]);
    let marker = format!("{}/data.touched", &blobs[0][7..]);
    let touched_at = |server: &Seaweed| {
        server.objects(&prefix).into_iter().find(|(k, ..)| k.ends_with(&marker)).map_or(0, |(_, _, t)| t)
    };
    let first_use = touched_at(server);
    // The bucket keeps times in seconds: B's use of e0 must fall in a later second than A's.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(pull(&b, 0).await, blobs[0]);
    eventually("B's use of e0 is recorded in the bucket", || touched_at(server) > first_use).await;

    // A fifth image through A passes the bound: one least recently used blob goes, and neither
    // e0 (A last used it before the others, but B used it since) nor the private e1 is it.
    assert_eq!(pull(&a, 4).await, blobs[4]);
    // An eviction deletes the blob's data key first and counts once the rest of it is gone.
    let evictions =
        || metric(&a.metrics(), "regmirror_evictions_total") + metric(&b.metrics(), "regmirror_evictions_total");
    eventually("the bucket is back under max_size, the eviction counted", || {
        blob_bytes(server, &prefix) <= 14 << 20 && evictions() >= 1.0
    })
    .await;
    let keys = server.keys(&prefix);
    let present = |d: &str| keys.iter().any(|k| k.ends_with(&format!("{}/data", &d[7..])));
    assert!(present(&blobs[0]), "e0 was evicted although B used it last");
    assert!(present(&private), "private content was evicted");
    assert!(present(&blobs[4]));
    assert_eq!(blobs[2..4].iter().filter(|d| !present(d)).count(), 1, "{keys:?}");
    assert_eq!(evictions(), 1.0);
}

#[tokio::test]
async fn a_pushed_blob_is_never_served_for_a_mirrored_repository_on_the_upstreams_word() {
    let Some(server) = common::s3::shared() else { return };
    let hub = Hub::start().await;
    // An upstream that answers every blob HEAD with 200 but has none of these bytes.
    hub.state.permissive_heads.store(true, std::sync::atomic::Ordering::SeqCst);
    let prefix = prefix();
    let a = TestServer::start(&replica_config(server, &prefix, &hub.url(), "@SELF@")).await;
    let b = TestServer::start(&replica_config(server, &prefix, &hub.url(), "@SELF@")).await;
    let c = client();
    let pushed = push_blob(&c, &a.url(""), "private/secret", &blob_of(1 << 20, 90)).await;
    for s in [&a, &b] {
        let r = c.get(s.url(&format!("/v2/library/anything/blobs/{pushed}"))).send().await.unwrap();
        assert_eq!(r.status(), 404, "a private blob was served as mirrored content");
    }
    assert!(hub.count(&hub.state.counters.blob_gets) >= 1, "the upstream was never asked for the bytes");
}
