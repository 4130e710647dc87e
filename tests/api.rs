//! The Distribution API over real HTTP: every endpoint and its error cases.

mod common;

use common::*;
use serde_json::{json, Value};

/// Nothing in these tests may reach the internet: the docker.io upstream is a closed local port.
const CONFIG: &str = r#"
[storage]
root = "data"
[private]
namespaces = ["private"]
[server]
max_manifest_size = "64KiB"
[[upstream]]
name = "docker.io"
url = "http://127.0.0.1:9"
"#;

async fn error_code(r: reqwest::Response) -> String {
    let v: Value = r.json().await.unwrap();
    v["errors"][0]["code"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn base_endpoint_announces_the_api_version() {
    let s = TestServer::start(CONFIG).await;
    let r = client().get(s.url("/v2/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-distribution-api-version"], "registry/2.0");
}

#[tokio::test]
async fn blobs_monolithic_get_head_range_delete() {
    let s = TestServer::start(CONFIG).await;
    let c = client();
    let base = s.url("");
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let d = push_blob(&c, &base, "private/blobs", &data).await;

    let r = c.get(s.url(&format!("/v2/private/blobs/blobs/{d}"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], d.as_str());
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[..]);

    let r = c.head(s.url(&format!("/v2/private/blobs/blobs/{d}"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "100000");

    let r = c.get(s.url(&format!("/v2/private/blobs/blobs/{d}"))).header("range", "bytes=10-19").send().await.unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-range"], "bytes 10-19/100000");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[10..20]);

    let r = c.get(s.url(&format!("/v2/private/blobs/blobs/{d}"))).header("range", "bytes=99990-").send().await.unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[99990..]);

    let r =
        c.get(s.url(&format!("/v2/private/blobs/blobs/{d}"))).header("range", "bytes=100000-").send().await.unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(r.headers()["content-range"], "bytes */100000");

    // The blob is content-addressed but served only from repositories that hold it.
    let r = c.get(s.url(&format!("/v2/private/other/blobs/{d}"))).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UNKNOWN");

    let r = c.get(s.url("/v2/private/blobs/blobs/sha256:1234")).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "DIGEST_INVALID");

    let r = c.delete(s.url(&format!("/v2/private/blobs/blobs/{d}"))).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let r = c.get(s.url(&format!("/v2/private/blobs/blobs/{d}"))).send().await.unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn monolithic_upload_with_wrong_digest_keeps_nothing() {
    let s = TestServer::start(CONFIG).await;
    let c = client();
    let wrong = sha256(b"something else");
    let r =
        c.post(s.url(&format!("/v2/private/x/blobs/uploads/?digest={wrong}"))).body("payload").send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
    let r = c.head(s.url(&format!("/v2/private/x/blobs/{}", sha256(b"payload")))).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        std::fs::read_dir(s.dir.path().join("data/tmp"))
            .unwrap()
            .filter(|e| !e.as_ref().unwrap().file_name().to_string_lossy().starts_with('.'))
            .count(),
        0
    );
}

#[tokio::test]
async fn sha512_blobs() {
    let s = TestServer::start(CONFIG).await;
    let c = client();
    let d = format!("sha512:{}", hex::encode(<sha2::Sha512 as sha2::Digest>::digest(b"five-twelve")));
    let r =
        c.post(s.url(&format!("/v2/private/x/blobs/uploads/?digest={d}"))).body("five-twelve").send().await.unwrap();
    assert_eq!(r.status(), 201);
    let r = c.get(s.url(&format!("/v2/private/x/blobs/{d}"))).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "five-twelve");
}

fn location(r: &reqwest::Response) -> String {
    r.headers()["location"].to_str().unwrap().to_string()
}

#[tokio::test]
async fn chunked_upload_checks_ranges_and_digest() {
    let s = TestServer::start(CONFIG).await;
    let c = client();
    let r = c.post(s.url("/v2/private/chunks/blobs/uploads/")).send().await.unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["range"], "0-0");
    assert!(r.headers().contains_key("docker-upload-uuid"));
    let loc = location(&r);
    assert!(loc.starts_with("/v2/private/chunks/blobs/uploads/"));

    let r = c
        .patch(s.url(&loc))
        .header("content-range", "0-4")
        .header("content-type", "application/octet-stream")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["range"], "0-4");
    let loc = location(&r);

    // Out of order: the next chunk must start at byte 5.
    let r = c.patch(s.url(&loc)).header("content-range", "10-14").body("world").send().await.unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(error_code(r).await, "BLOB_UPLOAD_INVALID");

    let r = c.get(s.url(&loc)).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["range"], "0-4");

    // A backwards or overflowing range is refused, never a panic.
    for bad in ["5-3", "5-18446744073709551615"] {
        let r = c.patch(s.url(&loc)).header("content-range", bad).body("xx").send().await.unwrap();
        assert_eq!(r.status(), 416, "{bad}");
    }

    // A chunk without Content-Range (docker streams this way) appends.
    let r = c.patch(s.url(&loc)).body(" world").send().await.unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["range"], "0-10");

    let wrong = sha256(b"not it");
    let r = c.put(s.url(&format!("{loc}?digest={wrong}"))).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
    // The session is over and nothing was kept.
    let r = c.get(s.url(&loc)).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UPLOAD_UNKNOWN");
    let r = c.head(s.url(&format!("/v2/private/chunks/blobs/{}", sha256(b"hello world")))).send().await.unwrap();
    assert_eq!(r.status(), 404);

    // Again, finishing with a last chunk in the PUT.
    let r = c.post(s.url("/v2/private/chunks/blobs/uploads/")).send().await.unwrap();
    let loc = location(&r);
    let r = c.patch(s.url(&loc)).header("content-range", "0-5").body("hello ").send().await.unwrap();
    let loc = location(&r);
    let d = sha256(b"hello world");
    let r =
        c.put(s.url(&format!("{loc}?digest={d}"))).header("content-range", "6-10").body("world").send().await.unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(location(&r), format!("/v2/private/chunks/blobs/{d}"));
    assert_eq!(r.headers()["docker-content-digest"], d.as_str());
    let body = c.get(s.url(&format!("/v2/private/chunks/blobs/{d}"))).send().await.unwrap().text().await.unwrap();
    assert_eq!(body, "hello world");
}

#[tokio::test]
async fn upload_session_survives_a_restart() {
    let s = TestServer::start(CONFIG).await;
    let c = client();
    let r = c.post(s.url("/v2/private/resume/blobs/uploads/")).send().await.unwrap();
    let loc = location(&r);
    let r = c.patch(s.url(&loc)).header("content-range", "0-5").body("first ").send().await.unwrap();
    assert_eq!(r.status(), 202);
    let dir = s.stop().await;

    let s = TestServer::start_in(dir, CONFIG).await;
    let r = c.get(s.url(&loc)).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["range"], "0-5");
    let r = c.patch(s.url(&loc)).header("content-range", "6-11").body("second").send().await.unwrap();
    assert_eq!(r.status(), 202);
    let d = sha256(b"first second");
    let r = c.put(s.url(&format!("{loc}?digest={d}"))).send().await.unwrap();
    assert_eq!(r.status(), 201);
}

#[tokio::test]
async fn cancel_and_unknown_sessions() {
    let s = TestServer::start(CONFIG).await;
    let c = client();
    let r = c.post(s.url("/v2/private/x/blobs/uploads/")).send().await.unwrap();
    let loc = location(&r);
    let r = c.delete(s.url(&loc)).send().await.unwrap();
    assert_eq!(r.status(), 204);
    let r = c.patch(s.url(&loc)).body("x").send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UPLOAD_UNKNOWN");
    // A session belongs to its repository, and ids are never paths.
    let r = c.post(s.url("/v2/private/x/blobs/uploads/")).send().await.unwrap();
    let id = location(&r).rsplit('/').next().unwrap().to_string();
    let r = c.get(s.url(&format!("/v2/private/y/blobs/uploads/{id}"))).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let r = c.get(s.url("/v2/private/x/blobs/uploads/..%2f..%2fetc")).send().await.unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn cross_repository_mount() {
    let s = TestServer::start(CONFIG).await;
    let c = client();
    let d = push_blob(&c, &s.url(""), "private/src", b"shared layer").await;
    let r = c.post(s.url(&format!("/v2/private/dst/blobs/uploads/?mount={d}&from=private/src"))).send().await.unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(location(&r), format!("/v2/private/dst/blobs/{d}"));
    let r = c.get(s.url(&format!("/v2/private/dst/blobs/{d}"))).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "shared layer");
    // Not in the source: an ordinary upload session instead.
    let other = sha256(b"absent");
    let r =
        c.post(s.url(&format!("/v2/private/dst/blobs/uploads/?mount={other}&from=private/src"))).send().await.unwrap();
    assert_eq!(r.status(), 202);
    assert!(location(&r).contains("/blobs/uploads/"));
}

#[tokio::test]
async fn manifests_by_tag_and_digest() {
    let s = TestServer::start(CONFIG).await;
    let c = client();
    let base = s.url("");
    let m = push_image(&c, &base, "private/app", "v1", "app").await;
    let d = sha256(&m);

    for reference in ["v1", d.as_str()] {
        let r = c
            .get(s.url(&format!("/v2/private/app/manifests/{reference}")))
            .header("accept", OCI_MANIFEST)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], OCI_MANIFEST);
        assert_eq!(r.headers()["docker-content-digest"], d.as_str());
        assert_eq!(r.headers()["etag"], format!("\"{d}\"").as_str());
        assert_eq!(r.bytes().await.unwrap().as_ref(), &m[..]);
        let r = c.head(s.url(&format!("/v2/private/app/manifests/{reference}"))).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-length"], m.len().to_string().as_str());
        assert_eq!(r.headers()["docker-content-digest"], d.as_str());
    }

    let r = c.get(s.url("/v2/private/app/manifests/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");

    // Deleting a tag leaves the manifest reachable by digest.
    let r = c.delete(s.url("/v2/private/app/manifests/v1")).send().await.unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(c.get(s.url("/v2/private/app/manifests/v1")).send().await.unwrap().status(), 404);
    assert_eq!(c.get(s.url(&format!("/v2/private/app/manifests/{d}"))).send().await.unwrap().status(), 200);

    // Deleting by digest removes it, and every tag that pointed to it.
    put_manifest(&c, &base, "private/app", "v2", OCI_MANIFEST, &m).await;
    let r = c.delete(s.url(&format!("/v2/private/app/manifests/{d}"))).send().await.unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(c.get(s.url(&format!("/v2/private/app/manifests/{d}"))).send().await.unwrap().status(), 404);
    assert_eq!(c.get(s.url("/v2/private/app/manifests/v2")).send().await.unwrap().status(), 404);
    assert_eq!(c.delete(s.url(&format!("/v2/private/app/manifests/{d}"))).send().await.unwrap().status(), 404);
}

#[tokio::test]
async fn manifest_push_errors() {
    let s = TestServer::start(CONFIG).await;
    let c = client();
    let base = s.url("");
    // References a blob the repository does not have.
    let m = image_manifest(b"{}", &[b"missing layer"]);
    push_blob(&c, &base, "private/bad", b"{}").await;
    let r = put_manifest(&c, &base, "private/bad", "x", OCI_MANIFEST, &m).await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "MANIFEST_BLOB_UNKNOWN");

    let r = put_manifest(&c, &base, "private/bad", "x", OCI_MANIFEST, b"{not json").await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "MANIFEST_INVALID");

    let huge = format!("{{\"schemaVersion\":2,\"pad\":\"{}\"}}", "x".repeat(70_000));
    let r = put_manifest(&c, &base, "private/bad", "x", OCI_MANIFEST, huge.as_bytes()).await;
    assert_eq!(r.status(), 413);

    let m = push_image(&c, &base, "private/good", "a", "good").await;
    let wrong = sha256(b"other");
    let r = put_manifest(&c, &base, "private/good", &wrong, OCI_MANIFEST, &m).await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
    let r = put_manifest(&c, &base, "private/good", &sha256(&m), OCI_MANIFEST, &m).await;
    assert_eq!(r.status(), 201);

    let r = put_manifest(&c, &base, "private/good", "-bad-tag", OCI_MANIFEST, &m).await;
    assert_eq!(r.status(), 400);

    // Mirrored repositories are read-only.
    let r = put_manifest(&c, &base, "library/nginx", "x", OCI_MANIFEST, &m).await;
    assert_eq!(r.status(), 405);
    assert_eq!(error_code(r).await, "UNSUPPORTED");
    let r = c.post(s.url("/v2/library/nginx/blobs/uploads/")).send().await.unwrap();
    assert_eq!(r.status(), 405);
}

#[tokio::test]
async fn indexes_and_docker_manifest_lists() {
    let s = TestServer::start(CONFIG).await;
    let c = client();
    let base = s.url("");
    let amd = push_image(&c, &base, "private/multi", "amd64", "amd").await;
    let arm_config = br#"{"architecture":"arm64","os":"linux"}"#;
    push_blob(&c, &base, "private/multi", arm_config).await;
    push_blob(&c, &base, "private/multi", b"arm layer").await;
    let arm = image_manifest(arm_config, &[b"arm layer"]);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": sha256(&amd), "size": amd.len(), "platform": {"os": "linux", "architecture": "amd64"}},
            {"mediaType": OCI_MANIFEST, "digest": sha256(&arm), "size": arm.len(), "platform": {"os": "linux", "architecture": "arm64"}},
        ]
    }))
    .unwrap();
    // The arm64 child is not there yet.
    let r = put_manifest(&c, &base, "private/multi", "latest", OCI_INDEX, &index).await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "MANIFEST_BLOB_UNKNOWN");
    assert_eq!(put_manifest(&c, &base, "private/multi", &sha256(&arm), OCI_MANIFEST, &arm).await.status(), 201);
    assert_eq!(put_manifest(&c, &base, "private/multi", "latest", OCI_INDEX, &index).await.status(), 201);
    let r = c.get(s.url("/v2/private/multi/manifests/latest")).send().await.unwrap();
    assert_eq!(r.headers()["content-type"], OCI_INDEX);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &index[..]);

    // Docker schema 2 and a Docker manifest list.
    let docker_m = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": sha256(arm_config), "size": arm_config.len()},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": sha256(b"arm layer"), "size": 9}],
    }))
    .unwrap();
    let r = put_manifest(
        &c,
        &base,
        "private/multi",
        "docker",
        "application/vnd.docker.distribution.manifest.v2+json",
        &docker_m,
    )
    .await;
    assert_eq!(r.status(), 201);
    let list = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.list.v2+json",
        "manifests": [{"mediaType": "application/vnd.docker.distribution.manifest.v2+json", "digest": sha256(&docker_m), "size": docker_m.len(), "platform": {"os": "linux", "architecture": "arm64"}}]
    }))
    .unwrap();
    let r = put_manifest(
        &c,
        &base,
        "private/multi",
        "dlist",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        &list,
    )
    .await;
    assert_eq!(r.status(), 201);
    let r = c.get(s.url("/v2/private/multi/manifests/dlist")).send().await.unwrap();
    assert_eq!(r.headers()["content-type"], "application/vnd.docker.distribution.manifest.list.v2+json");
    assert_eq!(r.headers()["docker-content-digest"], sha256(&list).as_str());
}

#[tokio::test]
async fn artifacts_subjects_and_referrers() {
    let s = TestServer::start(CONFIG).await;
    let c = client();
    let base = s.url("");
    let subject = push_image(&c, &base, "private/art", "v1", "subject").await;
    let empty = b"{}";
    push_blob(&c, &base, "private/art", empty).await;
    push_blob(&c, &base, "private/art", b"signature").await;
    let mk = |artifact_type: &str| {
        serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha256(empty), "size": 2},
            "layers": [{"mediaType": "application/octet-stream", "digest": sha256(b"signature"), "size": 9}],
            "subject": {"mediaType": OCI_MANIFEST, "digest": sha256(&subject), "size": subject.len()},
            "annotations": {"kind": artifact_type},
        }))
        .unwrap()
    };
    let sig = mk("application/vnd.example.sig");
    let sbom = mk("application/vnd.example.sbom");
    for a in [&sig, &sbom] {
        let r = put_manifest(&c, &base, "private/art", &sha256(a), OCI_MANIFEST, a).await;
        assert_eq!(r.status(), 201);
        assert_eq!(r.headers()["oci-subject"], sha256(&subject).as_str());
    }
    let r = c.get(s.url(&format!("/v2/private/art/referrers/{}", sha256(&subject)))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], OCI_INDEX);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 2);
    let r = c
        .get(
            s.url(&format!("/v2/private/art/referrers/{}?artifactType=application/vnd.example.sbom", sha256(&subject))),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["oci-filters-applied"], "artifactType");
    let v: Value = r.json().await.unwrap();
    let list = v["manifests"].as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["digest"], sha256(&sbom).as_str());
    assert_eq!(list[0]["artifactType"], "application/vnd.example.sbom");
    assert_eq!(list[0]["annotations"]["kind"], "application/vnd.example.sbom");
    // No referrers: an empty index, not a 404.
    let r = c.get(s.url(&format!("/v2/private/art/referrers/{}", sha256(b"nothing")))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 0);
    // Deleting a referrer removes it from the list.
    c.delete(s.url(&format!("/v2/private/art/manifests/{}", sha256(&sig)))).send().await.unwrap();
    let v: Value = c
        .get(s.url(&format!("/v2/private/art/referrers/{}", sha256(&subject))))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn tags_and_catalog_paginate_in_lexical_order() {
    let s = TestServer::start(CONFIG).await;
    let c = client();
    let base = s.url("");
    let m = push_image(&c, &base, "private/tags", "d", "t").await;
    for t in ["b", "a", "c"] {
        put_manifest(&c, &base, "private/tags", t, OCI_MANIFEST, &m).await;
    }
    let r = c.get(s.url("/v2/private/tags/tags/list")).send().await.unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v, json!({"name": "private/tags", "tags": ["a", "b", "c", "d"]}));

    let r = c.get(s.url("/v2/private/tags/tags/list?n=2")).send().await.unwrap();
    assert_eq!(r.headers()["link"], "</v2/private/tags/tags/list?n=2&last=b>; rel=\"next\"");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["tags"], json!(["a", "b"]));
    let r = c.get(s.url("/v2/private/tags/tags/list?n=2&last=b")).send().await.unwrap();
    assert!(r.headers().get("link").is_none());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["tags"], json!(["c", "d"]));
    let v: Value = c.get(s.url("/v2/private/tags/tags/list?last=d")).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["tags"], json!([]));
    let v: Value = c.get(s.url("/v2/private/tags/tags/list?n=0")).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["tags"], json!([]));
    let r = c.get(s.url("/v2/private/tags/tags/list?n=x")).send().await.unwrap();
    assert_eq!(r.status(), 400);

    let r = c.get(s.url("/v2/private/nothing/tags/list")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "NAME_UNKNOWN");

    for repo in ["private/c1", "private/a1", "private/b1"] {
        push_image(&c, &base, repo, "x", repo).await;
    }
    let v: Value = c.get(s.url("/v2/_catalog")).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["repositories"], json!(["private/a1", "private/b1", "private/c1", "private/tags"]));
    let r = c.get(s.url("/v2/_catalog?n=2&last=private/a1")).send().await.unwrap();
    assert_eq!(r.headers()["link"], "</v2/_catalog?n=2&last=private%2Fc1>; rel=\"next\"");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["repositories"], json!(["private/b1", "private/c1"]));
}

#[tokio::test]
async fn names_of_any_depth_and_invalid_names() {
    let s = TestServer::start(CONFIG).await;
    let c = client();
    let base = s.url("");
    let deep = "private/a/b/c/d/e/f/g/h";
    let m = push_image(&c, &base, deep, "latest", "deep").await;
    let r = c.get(s.url(&format!("/v2/{deep}/manifests/latest"))).send().await.unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), &m[..]);
    let v: Value = c.get(s.url(&format!("/v2/{deep}/tags/list"))).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["name"], deep);
    // A repository may even contain the words the API uses.
    push_image(&c, &base, "private/blobs/manifests", "x", "words").await;
    assert_eq!(c.get(s.url("/v2/private/blobs/manifests/manifests/x")).send().await.unwrap().status(), 200);

    for bad in [
        "/v2/private/UPPER/manifests/x",
        "/v2/private//x/manifests/x",
        "/v2/private/-x/tags/list",
        "/v2/private/a__/blobs/uploads/",
    ] {
        let r = c
            .request(if bad.ends_with("uploads/") { reqwest::Method::POST } else { reqwest::Method::GET }, s.url(bad))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{bad}");
        assert_eq!(error_code(r).await, "NAME_INVALID", "{bad}");
    }
    let long = format!("private/{}", "a".repeat(250));
    let r = c.get(s.url(&format!("/v2/{long}/tags/list"))).send().await.unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn unknown_ns_is_a_404_never_a_400() {
    let s = TestServer::start(CONFIG).await;
    let r = client().get(s.url("/v2/library/x/manifests/latest?ns=quay.io")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "NAME_UNKNOWN");
}

#[tokio::test]
async fn healthz_and_readyz() {
    let s = TestServer::start(CONFIG).await;
    assert_eq!(client().get(s.url("/healthz")).send().await.unwrap().status(), 200);
    assert_eq!(client().get(s.url("/readyz")).send().await.unwrap().status(), 200);
}

// ---- Upload sessions (issue 12) ----

#[tokio::test]
async fn a_chunk_must_bring_exactly_the_bytes_its_content_range_announces() {
    let s = TestServer::start(CONFIG).await;
    let c = client();
    let r = c.post(s.url("/v2/private/exact/blobs/uploads/")).send().await.unwrap();
    let loc = location(&r);
    // Announces 10 bytes, streams 1000 (chunked: no Content-Length to compare with).
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..10).map(|_| Ok(vec![b'x'; 100])).collect();
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let r = c.patch(s.url(&loc)).header("content-range", "0-9").body(body).send().await.unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(error_code(r).await, "BLOB_UPLOAD_INVALID");
    // Announces 10, brings 4.
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(vec![Ok::<_, std::io::Error>(b"four".to_vec())]));
    let r = c.patch(s.url(&loc)).header("content-range", "0-9").body(body).send().await.unwrap();
    assert_eq!(r.status(), 416);
    // Nothing of either was kept; an overflowing range is refused, never a panic.
    let r = c.get(s.url(&loc)).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["range"], "0-0");
    let r = c.patch(s.url(&loc)).header("content-range", "0-18446744073709551615").body("xx").send().await.unwrap();
    assert_eq!(r.status(), 416);
    let r = c.patch(s.url(&loc)).header("content-range", "0-9").body("0123456789").send().await.unwrap();
    assert_eq!(r.status(), 202);
    let d = sha256(b"0123456789");
    let r = c.put(s.url(&format!("{}?digest={d}", location(&r)))).send().await.unwrap();
    assert_eq!(r.status(), 201);
}

fn upload_ids(s: &TestServer) -> Vec<String> {
    match std::fs::read_dir(s.dir.path().join("data/uploads")) {
        Ok(entries) => entries.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect(),
        Err(_) => Vec::new(),
    }
}

#[tokio::test]
async fn upload_sessions_expire_with_their_data() {
    if std::env::var("REGMIRROR_TEST_BACKEND").as_deref() == Ok("s3") {
        // It ages sessions by editing their files on disk; an object's time cannot be set back.
        eprintln!("skipped on the s3 backend: ages upload sessions through the filesystem");
        return;
    }
    let s = TestServer::start(&CONFIG.replace("root = \"data\"\n", "root = \"data\"\nupload_expiry = \"1h\"\n")).await;
    let c = client();
    let mut locations = Vec::new();
    for _ in 0..2 {
        let r = c.post(s.url("/v2/private/old/blobs/uploads/")).send().await.unwrap();
        let loc = location(&r);
        let r = c.patch(s.url(&loc)).body("some bytes").send().await.unwrap();
        assert_eq!(r.status(), 202);
        locations.push(loc);
    }
    // Both sessions started, and last received bytes, two hours ago.
    for loc in &locations {
        let id = loc.rsplit('/').next().unwrap();
        let info = s.dir.path().join(format!("data/uploads/{id}/info"));
        let mut v: Value = serde_json::from_slice(&std::fs::read(&info).unwrap()).unwrap();
        v["started_at"] = json!(v["started_at"].as_u64().unwrap() - 7200);
        std::fs::write(&info, serde_json::to_vec(&v).unwrap()).unwrap();
        let data = s.dir.path().join(format!("data/uploads/{id}/data"));
        let aged = std::process::Command::new("touch").arg("-d").arg("2 hours ago").arg(&data).status().unwrap();
        assert!(aged.success());
    }
    // One is asked about: it is gone. The other is swept by the purge.
    let r = c.patch(s.url(&locations[0])).body("more").send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UPLOAD_UNKNOWN");
    assert_eq!(upload_ids(&s).len(), 1);
    assert_eq!(regmirror::registry::uploads::purge_expired(&s.state).await.unwrap(), 1);
    assert!(upload_ids(&s).is_empty());
    // A session started long ago that is still receiving bytes is not cut off.
    let r = c.post(s.url("/v2/private/old/blobs/uploads/")).send().await.unwrap();
    let busy = location(&r);
    let id = busy.rsplit('/').next().unwrap().to_string();
    let info = s.dir.path().join(format!("data/uploads/{id}/info"));
    let mut v: Value = serde_json::from_slice(&std::fs::read(&info).unwrap()).unwrap();
    v["started_at"] = json!(v["started_at"].as_u64().unwrap() - 7200);
    std::fs::write(&info, serde_json::to_vec(&v).unwrap()).unwrap();
    assert_eq!(c.patch(s.url(&busy)).body("still sending").send().await.unwrap().status(), 202);
    assert_eq!(regmirror::registry::uploads::purge_expired(&s.state).await.unwrap(), 0);
    assert_eq!(c.delete(s.url(&busy)).send().await.unwrap().status(), 204);
    // A fresh session is not touched.
    let r = c.post(s.url("/v2/private/old/blobs/uploads/")).send().await.unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(regmirror::registry::uploads::purge_expired(&s.state).await.unwrap(), 0);
    assert_eq!(upload_ids(&s).len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_finished_session_takes_no_more_writes() {
    let s = TestServer::start(CONFIG).await;
    let c = client();
    let data = b"the whole blob".to_vec();
    let d = sha256(&data);
    // A PUT that finishes the session and a PATCH to it, racing, 20 times: whichever wins, the
    // PATCH never lands in a finished session and nothing is left behind.
    for _ in 0..20 {
        let r = c.post(s.url("/v2/private/race/blobs/uploads/")).send().await.unwrap();
        let loc = location(&r);
        let put = c.put(s.url(&format!("{loc}?digest={d}"))).body(data.clone()).send();
        let patch = c.patch(s.url(&loc)).body("late bytes").send();
        let (put, patch) = tokio::join!(put, patch);
        let (put, patch) = (put.unwrap().status(), patch.unwrap().status());
        assert!(!(put == 201 && patch == 202), "a PATCH was accepted into a finished session");
        if put == 201 {
            assert_eq!(patch, 404);
        }
        let r = c.get(s.url(&loc)).send().await.unwrap();
        assert_eq!(r.status(), 404);
    }
    assert!(upload_ids(&s).is_empty(), "left behind: {:?}", upload_ids(&s));
}
