//! The bounded cache: LRU eviction under `storage.max_size`, private and pinned content kept,
//! downloads in progress safe, order kept across restarts; gc; prefetch.

mod common;

use std::sync::atomic::Ordering;

use common::hub::Hub;
use common::*;
use futures_util::StreamExt;
use regmirror::cache::{evict, pins};

const MIB: usize = 1 << 20;

fn blob_of(size: usize, seed: u8) -> Vec<u8> {
    (0..size).map(|i| ((i * 131) as u8).wrapping_add(seed).wrapping_mul(7)).collect()
}

/// `library/<name>:latest` on the hub with one layer of `size` bytes; returns the layer digest.
fn hub_image(hub: &Hub, name: &str, size: usize, seed: u8) -> String {
    let layer = blob_of(size, seed);
    let config = format!("{{\"os\":\"linux\",\"name\":\"{name}\"}}").into_bytes();
    let d = hub.add_blob(layer.clone());
    hub.add_blob(config.clone());
    hub.add_manifest(&format!("library/{name}"), "latest", OCI_MANIFEST, image_manifest(&config, &[&layer]));
    d
}

fn blobs_on_disk(root: &std::path::Path) -> u64 {
    fn walk(p: &std::path::Path) -> u64 {
        std::fs::read_dir(p).map_or(0, |rd| {
            rd.flatten()
                .map(|e| if e.path().is_dir() { walk(&e.path()) } else { e.metadata().map_or(0, |m| m.len()) })
                .sum()
        })
    }
    walk(&root.join("data/blobs"))
}

async fn pull(c: &reqwest::Client, s: &TestServer, name: &str, layer: &str) {
    let r = c.get(s.url(&format!("/v2/library/{name}/manifests/latest"))).send().await.unwrap();
    assert_eq!(r.status(), 200, "{name}");
    let r = c.get(s.url(&format!("/v2/library/{name}/blobs/{layer}"))).send().await.unwrap();
    assert_eq!(sha256(&r.bytes().await.unwrap()), layer, "{name}");
}

fn blob_present(s: &TestServer, d: &str) -> bool {
    let hex = d.trim_start_matches("sha256:");
    s.dir.path().join(format!("data/blobs/sha256/{}/{hex}/data", &hex[..2])).exists()
}

#[tokio::test(flavor = "multi_thread")]
async fn eviction_keeps_the_bound_in_lru_order_and_spares_private_pinned_and_in_use_content() {
    let hub = Hub::start().await;
    let max = 200 * MIB as u64;
    let layers: Vec<String> = (0..8).map(|i| hub_image(&hub, &format!("img{i}"), 32 * MIB, i as u8)).collect();
    let pinned_layer = hub_image(&hub, "pinned", 32 * MIB, 99);
    let toml = format!(
        "[storage]\nroot = \"data\"\nmax_size = \"200MiB\"\n[[upstream]]\nname = \"docker.io\"\nurl = \"{}\"\n[cache]\npin = [\"docker.io/library/pinned:latest\"]\n",
        hub.url()
    );
    let s = TestServer::start(&toml).await;
    evict::load(&s.state).await.unwrap();
    let c = client();
    // Private content: 40 MiB, pushed.
    let private = blob_of(40 * MIB, 200);
    let private_digest = push_blob(&c, &s.url(""), "private/big", &private).await;
    let config = b"{\"os\":\"linux\"}";
    push_blob(&c, &s.url(""), "private/big", config).await;
    assert_eq!(
        put_manifest(&c, &s.url(""), "private/big", "v1", OCI_MANIFEST, &image_manifest(config, &[&private]))
            .await
            .status(),
        201
    );
    pins::refresh(&s.state).await;
    assert!(blob_present(&s, &pinned_layer));

    // img0 is used again and again; the others once each, in order.
    for (i, layer) in layers.iter().enumerate() {
        pull(&c, &s, &format!("img{i}"), layer).await;
        pull(&c, &s, "img0", &layers[0]).await;
        evict::pass(&s.state, max).await;
        let on_disk = blobs_on_disk(s.dir.path());
        assert!(on_disk <= max, "store holds {on_disk} bytes after pulling img{i}, bound {max}");
    }
    // 40 private + 32 pinned + img0 leave room for about three more: the oldest went first.
    assert!(blob_present(&s, &private_digest), "private content was evicted");
    assert!(blob_present(&s, &pinned_layer), "a pinned image was evicted");
    assert!(blob_present(&s, &layers[0]), "the most used image was evicted");
    assert!(blob_present(&s, &layers[7]), "the image just pulled was evicted");
    assert!(!blob_present(&s, &layers[1]) && !blob_present(&s, &layers[2]), "the least recently used were kept");
    assert!(metric(&s.metrics(), "regmirror_evictions_total") >= 2.0);

    // An evicted image comes back from upstream.
    let before = hub.count(&hub.state.counters.cdn_gets);
    pull(&c, &s, "img1", &layers[1]).await;
    assert_eq!(hub.count(&hub.state.counters.cdn_gets), before + 1);

    // A download in progress survives a pass that would evict everything it may.
    let r = c.get(s.url(&format!("/v2/library/img7/blobs/{}", layers[7]))).send().await.unwrap();
    let mut stream = r.bytes_stream();
    let mut got = stream.next().await.unwrap().unwrap().to_vec();
    evict::pass(&s.state, 1).await;
    while let Some(chunk) = stream.next().await {
        got.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(sha256(&got), layers[7]);
    assert!(blob_present(&s, &private_digest) && blob_present(&s, &pinned_layer));
    assert_eq!(metric(&s.metrics(), "regmirror_store_over_limit"), 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn lru_order_survives_a_restart() {
    let hub = Hub::start().await;
    let a = hub_image(&hub, "a", MIB, 1);
    let b = hub_image(&hub, "b", MIB, 2);
    let toml = format!("[storage]\nroot = \"data\"\n[[upstream]]\nname = \"docker.io\"\nurl = \"{}\"\n", hub.url());
    let s = TestServer::start(&toml).await;
    let c = client();
    evict::load(&s.state).await.unwrap();
    pull(&c, &s, "b", &b).await;
    pull(&c, &s, "a", &a).await;
    // b is used again last: a is now the least recently used, although fetched later.
    pull(&c, &s, "b", &b).await;
    s.state.lru.persist().unwrap();
    let dir = s.stop().await;
    let s = TestServer::start_in(dir, &toml).await;
    evict::load(&s.state).await.unwrap();
    let victims = s.state.lru.take_victims(1);
    assert_eq!(victims.len(), 1);
    // The manifests are older than both layers' last use; skip them.
    let mut victims = victims;
    while victims[0].1 < MIB as u64 {
        victims = s.state.lru.take_victims(1);
    }
    assert_eq!(victims[0].0.to_string(), a);
}

#[tokio::test(flavor = "multi_thread")]
async fn gc_removes_unique_blobs_of_deleted_manifests_and_keeps_shared_and_young_ones() {
    let s = TestServer::start(
        "[storage]\nroot = \"data\"\n[[upstream]]\nname = \"docker.io\"\nurl = \"http://127.0.0.1:9\"\n",
    )
    .await;
    let c = client();
    let base = s.url("");
    let (config, unique, shared, other) =
        (b"{\"os\":\"linux\"}".to_vec(), b"unique layer".to_vec(), b"shared layer".to_vec(), b"other layer".to_vec());
    for (repo, layers) in [("private/a", vec![&unique, &shared]), ("private/b", vec![&shared, &other])] {
        push_blob(&c, &base, repo, &config).await;
        for l in &layers {
            push_blob(&c, &base, repo, l).await;
        }
        let refs: Vec<&[u8]> = layers.iter().map(|l| l.as_slice()).collect();
        assert_eq!(
            put_manifest(&c, &base, repo, "v1", OCI_MANIFEST, &image_manifest(&config, &refs)).await.status(),
            201
        );
    }
    let m_a = sha256(&image_manifest(&config, &[&unique, &shared]));
    assert_eq!(c.delete(s.url(&format!("/v2/private/a/manifests/{m_a}"))).send().await.unwrap().status(), 202);
    // A blob pushed before its manifest, moments ago.
    let pending = push_blob(&c, &base, "private/c", b"pushed before its manifest").await;

    let privates = vec!["private".to_string()];
    // With a grace period, young blobs are kept: nothing goes yet.
    let report =
        regmirror::gc::run(&s.state.store, &privates, std::time::Duration::from_secs(3600), false).await.unwrap();
    assert!(report.removed.is_empty(), "{report:?}");
    // Without one: the deleted manifest's unique blob and the manifest itself go; shared stay.
    let report = regmirror::gc::run(&s.state.store, &privates, std::time::Duration::ZERO, true).await.unwrap();
    let removed: Vec<String> = report.removed.iter().map(|(d, _)| d.to_string()).collect();
    assert!(removed.contains(&sha256(&unique)) && removed.contains(&m_a), "{removed:?}");
    assert!(
        !removed.contains(&sha256(&shared))
            && !removed.contains(&sha256(&other))
            && !removed.contains(&sha256(&config))
    );
    assert!(blob_present(&s, &sha256(&unique)), "dry run removed something");
    let report = regmirror::gc::run(&s.state.store, &privates, std::time::Duration::ZERO, false).await.unwrap();
    assert!(report.freed_bytes > 0);
    assert!(!blob_present(&s, &sha256(&unique)));
    assert!(blob_present(&s, &sha256(&shared)) && blob_present(&s, &sha256(&other)));
    let r = c.get(s.url("/v2/private/b/manifests/v1")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // (the young blob without a manifest went too: grace zero) — pushes racing a gc with grace:
    let _ = pending;
    let gc_store = s.state.store.clone();
    let racing = tokio::spawn(async move {
        for _ in 0..20 {
            regmirror::gc::run(&gc_store, &["private".to_string()], std::time::Duration::from_secs(3600), false)
                .await
                .unwrap();
        }
    });
    for i in 0..20 {
        push_image(&c, &base, "private/race", &format!("t{i}"), &format!("race {i}")).await;
    }
    racing.await.unwrap();
    for i in 0..20 {
        let r = c.get(s.url(&format!("/v2/private/race/manifests/t{i}"))).send().await.unwrap();
        let m: serde_json::Value = r.json().await.unwrap();
        for l in m["layers"].as_array().unwrap() {
            let d = l["digest"].as_str().unwrap();
            assert_eq!(c.get(s.url(&format!("/v2/private/race/blobs/{d}"))).send().await.unwrap().status(), 200);
        }
    }
}

fn multi_arch_on_hub(hub: &Hub) -> Vec<String> {
    let mut children = Vec::new();
    let mut layers = Vec::new();
    for (i, arch) in ["amd64", "arm64"].iter().enumerate() {
        let layer = blob_of(2 * MIB, 50 + i as u8);
        let config = format!("{{\"os\":\"linux\",\"architecture\":\"{arch}\"}}").into_bytes();
        layers.push(hub.add_blob(layer.clone()));
        hub.add_blob(config.clone());
        let m = image_manifest(&config, &[&layer]);
        let d = hub.add_manifest("library/multi", &format!("child-{arch}"), OCI_MANIFEST, m.clone());
        children.push(serde_json::json!({"mediaType": OCI_MANIFEST, "digest": d, "size": m.len(), "platform": {"os": "linux", "architecture": arch}}));
    }
    let index =
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children}))
            .unwrap();
    hub.add_manifest("library/multi", "latest", OCI_INDEX, index);
    layers
}

#[tokio::test(flavor = "multi_thread")]
async fn prefetch_warms_every_layer_and_shows_progress() {
    let hub = Hub::start().await;
    let layers = multi_arch_on_hub(&hub);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("mirror.toml");
    std::fs::write(&config, format!("[server]\nlisten = \"127.0.0.1:{port}\"\n[storage]\nroot = \"data\"\n[[upstream]]\nname = \"docker.io\"\nurl = \"{}\"\n", hub.url())).unwrap();
    let _proc = Proc::spawn(&config, &dir.path().join("log"));
    let base = format!("http://127.0.0.1:{port}");
    wait_until_up(&format!("{base}/v2/")).await;
    let bin = env!("CARGO_BIN_EXE_regmirror");
    // Not a terminal: plain lines.
    let out = std::process::Command::new(bin)
        .args(["prefetch", "--config"])
        .arg(&config)
        .arg("docker.io/library/multi:latest")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains(&format!("{} {} bytes ok", layers[0], 2 * MIB))
            && stdout.contains("docker.io/library/multi:latest: done"),
        "{stdout}"
    );

    // Everything is cached: a full pull of both platforms costs the upstream nothing.
    let counters = &hub.state.counters;
    let before = (
        hub.count(&counters.manifest_gets),
        hub.count(&counters.blob_gets),
        hub.count(&counters.cdn_gets),
        hub.count(&counters.manifest_heads),
    );
    let c = client();
    let index: serde_json::Value = c
        .get(format!("{base}/v2/library/multi/manifests/latest"))
        .header("accept", OCI_INDEX)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for child in index["manifests"].as_array().unwrap() {
        let m: serde_json::Value = c
            .get(format!("{base}/v2/library/multi/manifests/{}", child["digest"].as_str().unwrap()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for b in std::iter::once(&m["config"]).chain(m["layers"].as_array().unwrap()) {
            let r =
                c.get(format!("{base}/v2/library/multi/blobs/{}", b["digest"].as_str().unwrap())).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.bytes().await.unwrap();
        }
    }
    let after = (
        hub.count(&counters.manifest_gets),
        hub.count(&counters.blob_gets),
        hub.count(&counters.cdn_gets),
        hub.count(&counters.manifest_heads),
    );
    assert_eq!(before, after, "a pull after prefetch went upstream");

    // On a terminal (a pseudo-terminal from `script`): progress bars.
    if require("script") {
        let cmd = format!(
            "{bin} prefetch --config {} --platform linux/arm64 docker.io/library/multi:latest",
            config.display()
        );
        let out = std::process::Command::new("script").args(["-qec", &cmd, "/dev/null"]).output().unwrap();
        let tty = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{tty}");
        assert!(tty.contains("2.00 MiB/2.00 MiB") && tty.contains('['), "no progress bar on a terminal: {tty:?}");
        assert!(!tty.contains(&layers[0]), "--platform linux/arm64 fetched amd64: {tty}");
    }
    // A failure exits non-zero.
    let out = std::process::Command::new(bin)
        .args(["prefetch", "--config"])
        .arg(&config)
        .arg("docker.io/library/absent:1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let _ = Ordering::SeqCst;
}
