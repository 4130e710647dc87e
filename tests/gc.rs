//! `regmirror gc`: blobs no manifest references any more are removed; shared, young and mirrored
//! ones are kept, also while pushes race it.

mod common;

use common::*;

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

    let namespaces = s.state.config.namespaces();
    // With a grace period, young blobs are kept: nothing goes yet.
    let report =
        regmirror::gc::run(&s.state.store, &namespaces, std::time::Duration::from_secs(3600), false).await.unwrap();
    assert!(report.removed.is_empty(), "{report:?}");
    // Without one: the deleted manifest's unique blob and the manifest itself go; shared stay.
    let report = regmirror::gc::run(&s.state.store, &namespaces, std::time::Duration::ZERO, true).await.unwrap();
    let removed: Vec<String> = report.removed.iter().map(|(d, _)| d.to_string()).collect();
    assert!(removed.contains(&sha256(&unique)) && removed.contains(&m_a), "{removed:?}");
    assert!(
        !removed.contains(&sha256(&shared))
            && !removed.contains(&sha256(&other))
            && !removed.contains(&sha256(&config))
    );
    assert!(blob_present(&s, &sha256(&unique)), "dry run removed something");
    let report = regmirror::gc::run(&s.state.store, &namespaces, std::time::Duration::ZERO, false).await.unwrap();
    assert!(report.freed_bytes > 0);
    assert!(!blob_present(&s, &sha256(&unique)));
    assert!(blob_present(&s, &sha256(&shared)) && blob_present(&s, &sha256(&other)));
    let r = c.get(s.url("/v2/private/b/manifests/v1")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // (the young blob without a manifest went too: grace zero) — pushes racing a gc with grace:
    let _ = pending;
    let (gc_store, gc_namespaces) = (s.state.store.clone(), namespaces.clone());
    let racing = tokio::spawn(async move {
        for _ in 0..20 {
            regmirror::gc::run(&gc_store, &gc_namespaces, std::time::Duration::from_secs(3600), false).await.unwrap();
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
