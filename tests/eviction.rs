//! The bounded cache: LRU eviction under `storage.max_size`, private and pinned content kept,
//! downloads in progress safe, order kept across restarts.

mod common;

use common::hub::Hub;
use common::*;
use futures_util::StreamExt;
use regmirror::cache::{evict, pins};

/// `library/<name>:latest` on the hub with one layer of `size` bytes; returns the layer digest.
fn hub_layer(hub: &Hub, name: &str, size: usize, seed: u8) -> String {
    hub_image(hub, name, "latest", blob_of(size, seed)).0
}

async fn pull(c: &reqwest::Client, s: &TestServer, name: &str, layer: &str) {
    let r = c.get(s.url(&format!("/v2/library/{name}/manifests/latest"))).send().await.unwrap();
    assert_eq!(r.status(), 200, "{name}");
    let r = c.get(s.url(&format!("/v2/library/{name}/blobs/{layer}"))).send().await.unwrap();
    assert_eq!(sha256(&r.bytes().await.unwrap()), layer, "{name}");
}

#[tokio::test(flavor = "multi_thread")]
async fn eviction_keeps_the_bound_in_lru_order_and_spares_private_pinned_and_in_use_content() {
    let hub = Hub::start().await;
    let max = 200 * MIB as u64;
    let layers: Vec<String> = (0..8).map(|i| hub_layer(&hub, &format!("img{i}"), 32 * MIB, i as u8)).collect();
    let pinned_layer = hub_layer(&hub, "pinned", 32 * MIB, 99);
    let toml = format!(
        "[storage]\nroot = \"data\"\nmax_size = \"200MiB\"\n[[upstream]]\nname = \"docker.io\"\nurl = \"{}\"\n[cache]\npin = [\"docker.io/library/pinned:latest\"]\n",
        hub.url()
    );
    let s = TestServer::start(&toml).await;
    evict::load(&s.state.cache).await.unwrap();
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
    pins::refresh(&s.state.cache, &s.state.upstreams, &s.state.config.pins, false).await;
    assert!(blob_present(&s, &pinned_layer));

    // img0 is used again and again; the others once each, in order.
    for (i, layer) in layers.iter().enumerate() {
        pull(&c, &s, &format!("img{i}"), layer).await;
        pull(&c, &s, "img0", &layers[0]).await;
        evict::pass(&s.state.cache, max).await;
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
    evict::pass(&s.state.cache, 1).await;
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
    let a = hub_layer(&hub, "a", MIB, 1);
    let b = hub_layer(&hub, "b", MIB, 2);
    let toml = format!("[storage]\nroot = \"data\"\n[[upstream]]\nname = \"docker.io\"\nurl = \"{}\"\n", hub.url());
    let s = TestServer::start(&toml).await;
    let c = client();
    evict::load(&s.state.cache).await.unwrap();
    pull(&c, &s, "b", &b).await;
    pull(&c, &s, "a", &a).await;
    // b is used again last: a is now the least recently used, although fetched later.
    pull(&c, &s, "b", &b).await;
    s.state.cache.lru.persist().unwrap();
    let dir = s.stop().await;
    let s = TestServer::start_in(dir, &toml).await;
    evict::load(&s.state.cache).await.unwrap();
    let victims = s.state.cache.lru.take_victims(1);
    assert_eq!(victims.len(), 1);
    // The manifests are older than both layers' last use; skip them.
    let mut victims = victims;
    while victims[0].1 < MIB as u64 {
        victims = s.state.cache.lru.take_victims(1);
    }
    assert_eq!(victims[0].0.to_string(), a);
}
