//! What the OCI distribution-spec conformance suite (v1.1.1) checks and `api.rs` does not: one
//! test per expectation, against the private namespace, so the repository's own tests hold the
//! spec even where the suite is not run.

mod common;

use common::*;
use serde_json::{json, Value};

const CONFIG: &str = r#"
[storage]
root = "data"
[[upstream]]
name = "docker.io"
url = "http://127.0.0.1:9"
"#;

const V: &str = "private/conformance";

fn location(r: &reqwest::Response) -> String {
    r.headers()["location"].to_str().unwrap().to_string()
}

async fn code(r: reqwest::Response) -> String {
    let v: Value = r.json().await.unwrap();
    v["errors"][0]["code"].as_str().unwrap().to_string()
}

async fn server() -> (TestServer, reqwest::Client, String) {
    let s = TestServer::start(CONFIG).await;
    let base = s.url("");
    (s, client(), base)
}

#[tokio::test]
async fn a_reference_that_is_no_tag_names_no_manifest() {
    let (s, c, _) = server().await;
    let url = s.url(&format!("/v2/{V}/manifests/.INVALID_MANIFEST_NAME"));
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(code(r).await, "MANIFEST_UNKNOWN");
    assert_eq!(c.head(&url).send().await.unwrap().status(), 404);
    // Pushing under it is still a bad request.
    let r = c.put(&url).header("content-type", OCI_MANIFEST).body("{}").send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(code(r).await, "MANIFEST_INVALID");
    // A malformed digest is a bad request too; an unknown tag is not there, also for HEAD.
    let r = c.get(s.url(&format!("/v2/{V}/manifests/sha256:totallywrong"))).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(code(r).await, "DIGEST_INVALID");
    assert_eq!(c.head(s.url(&format!("/v2/{V}/manifests/no-such-tag"))).send().await.unwrap().status(), 404);
}

#[tokio::test]
async fn blob_uploads_answer_with_locations_and_digests() {
    let (s, c, base) = server().await;
    // Monolithic: 201 with the blob's Location; HEAD names its digest.
    let body = b"monolithic blob".to_vec();
    let d = sha256(&body);
    let r = c.post(s.url(&format!("/v2/{V}/blobs/uploads/?digest={d}"))).body(body.clone()).send().await.unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(location(&r), format!("/v2/{V}/blobs/{d}"));
    let r = c.head(s.url(&format!("/v2/{V}/blobs/{d}"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], d.as_str());

    // POST, then one PUT with the whole body (how the suite pushes every blob).
    let body = b"put in one go".to_vec();
    let d = sha256(&body);
    let loc = location(&c.post(s.url(&format!("/v2/{V}/blobs/uploads/"))).send().await.unwrap());
    let r = c
        .put(format!("{base}{loc}?digest={d}"))
        .header("content-type", "application/octet-stream")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(location(&r), format!("/v2/{V}/blobs/{d}"));

    // A PATCH without Content-Range first, then a PUT with an empty body.
    let body = vec![7u8; 22];
    let d = sha256(&body);
    let loc = location(&c.post(s.url(&format!("/v2/{V}/blobs/uploads/"))).send().await.unwrap());
    let r = c.patch(format!("{base}{loc}")).body(body).send().await.unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["range"], "0-21");
    let next = location(&r);
    assert!(!next.is_empty());
    let r = c.put(format!("{base}{next}?digest={d}")).header("content-length", "0").send().await.unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(location(&r), format!("/v2/{V}/blobs/{d}"));
}

#[tokio::test]
async fn chunks_out_of_order_or_sent_twice_are_refused() {
    let (s, c, base) = server().await;
    let first = location(&c.post(s.url(&format!("/v2/{V}/blobs/uploads/"))).send().await.unwrap());
    // The first chunk must start at 0.
    let r =
        c.patch(format!("{base}{first}")).header("content-range", "22-41").body(vec![1u8; 20]).send().await.unwrap();
    assert_eq!(r.status(), 416);
    let r = c.patch(format!("{base}{first}")).header("content-range", "0-21").body(vec![1u8; 22]).send().await.unwrap();
    assert_eq!(r.status(), 202);
    // The same chunk again, to the session's first Location: refused.
    let r = c.patch(format!("{base}{first}")).header("content-range", "0-21").body(vec![1u8; 22]).send().await.unwrap();
    assert_eq!(r.status(), 416);
    // The status at that Location tells where the upload stands.
    let r = c.get(format!("{base}{first}")).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["range"], "0-21");
    assert!(!location(&r).is_empty());
}

#[tokio::test]
async fn a_mount_without_a_source_opens_an_upload_session() {
    let (s, c, base) = server().await;
    let held = push_blob(&c, &base, V, b"held in V").await;
    let nowhere = sha256(b"held nowhere");
    for d in [nowhere, held] {
        let r = c.post(s.url(&format!("/v2/{V}-other/blobs/uploads/?mount={d}"))).send().await.unwrap();
        assert_eq!(r.status(), 202, "{d}");
        assert!(location(&r).starts_with(&format!("/v2/{V}-other/blobs/uploads/")), "{}", location(&r));
    }
}

/// A config and an empty-layered manifest over it, written the way the suite writes them: no
/// `mediaType` in the body, extra fields in the config descriptor.
async fn push_minimal(c: &reqwest::Client, base: &str, tag: &str) -> (Vec<u8>, String) {
    let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = push_blob(c, base, V, config).await;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest, "size": config.len(),
            "data": base64_of(config),
            "newUnspecifiedField": "aGVsbG8gd29ybGQ="
        },
        "layers": []
    }))
    .unwrap();
    let r = put_manifest(c, base, V, tag, OCI_MANIFEST, &manifest).await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
    (manifest, config_digest)
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[tokio::test]
async fn manifests_are_stored_byte_exact_and_answered_with_a_location() {
    let (s, c, base) = server().await;
    let (manifest, _) = push_minimal(&c, &base, "v1").await;
    let d = sha256(&manifest);
    for tag in ["v1", "v2", "v3", "v4"] {
        let r = put_manifest(&c, &base, V, tag, OCI_MANIFEST, &manifest).await;
        assert_eq!(r.status(), 201, "{tag}");
        assert_eq!(location(&r), format!("/v2/{V}/manifests/{d}"));
    }
    let r = c.get(s.url(&format!("/v2/{V}/manifests/{d}"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &manifest[..]);

    // A deleted tag leaves the list; the last one going leaves an empty list.
    let tags = |c: reqwest::Client, url: String| async move {
        let v: Value = c.get(url).send().await.unwrap().json().await.unwrap();
        v["tags"].as_array().unwrap().len()
    };
    let list = s.url(&format!("/v2/{V}/tags/list"));
    assert_eq!(tags(c.clone(), list.clone()).await, 4);
    assert_eq!(c.delete(s.url(&format!("/v2/{V}/manifests/v4"))).send().await.unwrap().status(), 202);
    assert_eq!(tags(c.clone(), list.clone()).await, 3);
    for tag in ["v1", "v2", "v3"] {
        assert_eq!(c.delete(s.url(&format!("/v2/{V}/manifests/{tag}"))).send().await.unwrap().status(), 202);
    }
    let r = c.get(&list).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["tags"], json!([]));
}

#[tokio::test]
async fn a_blob_a_manifest_still_uses_can_be_deleted_from_the_repository() {
    let (s, c, base) = server().await;
    let (_, config) = push_minimal(&c, &base, "keep").await;
    let r = c.delete(s.url(&format!("/v2/{V}/blobs/{config}"))).send().await.unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(c.get(s.url(&format!("/v2/{V}/blobs/{config}"))).send().await.unwrap().status(), 404);
}

#[tokio::test]
async fn referrers_are_found_whatever_their_kind_and_whenever_they_were_pushed() {
    let (s, c, base) = server().await;
    let empty = b"{}";
    let empty_digest = push_blob(&c, &base, V, empty).await;
    let subject = sha256(b"a subject pushed later");
    let subject_desc = json!({"mediaType": OCI_MANIFEST, "digest": subject, "size": 22});

    // No referrers yet: an empty index, typed as one.
    let r = c.get(s.url(&format!("/v2/{V}/referrers/{subject}"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], OCI_INDEX);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["manifests"], json!([]));

    // A referrer whose subject does not exist yet; its type only in the config's mediaType.
    let bagel = "application/vnd.nhl.peanut.butter.bagel";
    let untyped = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": bagel, "digest": empty_digest, "size": 2},
        "layers": [], "subject": subject_desc,
        "annotations": {"org.example.which": "untyped"}
    }))
    .unwrap();
    let r = put_manifest(&c, &base, V, &sha256(&untyped), OCI_MANIFEST, &untyped).await;
    assert!(r.status().is_success());
    assert_eq!(r.headers()["oci-subject"], subject.as_str());

    // An index that is itself a referrer, with an artifactType and annotations.
    let (child, _) = push_minimal(&c, &base, "child").await;
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX, "artifactType": "application/vnd.example.index",
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": sha256(&child), "size": child.len()}],
        "subject": subject_desc,
        "annotations": {"org.example.which": "index"}
    }))
    .unwrap();
    let r = put_manifest(&c, &base, V, &sha256(&index), OCI_INDEX, &index).await;
    assert!(r.status().is_success());
    assert_eq!(r.headers()["oci-subject"], subject.as_str());

    // A plain artifact manifest with an artifactType.
    let typed = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/vnd.example.sbom",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty_digest, "size": 2},
        "layers": [], "subject": subject_desc,
        "annotations": {"org.example.which": "typed"}
    }))
    .unwrap();
    assert!(put_manifest(&c, &base, V, &sha256(&typed), OCI_MANIFEST, &typed).await.status().is_success());

    let r = c.get(s.url(&format!("/v2/{V}/referrers/{subject}"))).send().await.unwrap();
    let v: Value = r.json().await.unwrap();
    let listed = v["manifests"].as_array().unwrap();
    assert_eq!(listed.len(), 3);
    let mut seen: Vec<(String, String, String)> = listed
        .iter()
        .map(|m| {
            let annotations = m["annotations"].as_object().unwrap();
            assert_eq!(annotations.len(), 1, "{m}");
            (
                m["digest"].as_str().unwrap().to_string(),
                m["artifactType"].as_str().unwrap().to_string(),
                annotations["org.example.which"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    seen.sort();
    let mut expected = vec![
        (sha256(&untyped), bagel.to_string(), "untyped".to_string()),
        (sha256(&index), "application/vnd.example.index".to_string(), "index".to_string()),
        (sha256(&typed), "application/vnd.example.sbom".to_string(), "typed".to_string()),
    ];
    expected.sort();
    assert_eq!(seen, expected);

    // Filtered by the type the config gave it.
    let r = c.get(s.url(&format!("/v2/{V}/referrers/{subject}?artifactType={bagel}"))).send().await.unwrap();
    assert_eq!(r.headers()["oci-filters-applied"], "artifactType");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(v["manifests"][0]["digest"], sha256(&untyped).as_str());
}
