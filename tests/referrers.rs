//! Signatures, SBOMs and attestations of mirrored images: the referrers API through the mirror,
//! against an upstream with the API (a regmirror of its own) and one without (Debian's
//! docker-registry, with the tag-schema fallback); cosign's tags; warming ahead of time and
//! serving with the upstream gone; a real client (oras-py) pulling an artifact.

mod common;

use common::*;
use serde_json::{json, Value};

const SBOM: &str = "application/spdx+json";
const SIG: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";
const EMPTY: &str = "application/vnd.oci.empty.v1+json";

fn mirror_config(upstream: &str) -> String {
    format!("[storage]\nroot = \"data\"\n[[upstream]]\nname = \"docker.io\"\nurl = \"{upstream}\"\n")
}

/// An artifact manifest: an empty config, one layer, a subject.
fn artifact(artifact_type: &str, layer: &[u8], title: &str, subject: &[u8], which: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type,
        "config": {"mediaType": EMPTY, "digest": sha256(b"{}"), "size": 2},
        "layers": [{"mediaType": "application/octet-stream", "digest": sha256(layer), "size": layer.len(),
                    "annotations": {"org.opencontainers.image.title": title}}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": sha256(subject), "size": subject.len()},
        "annotations": {"org.example.which": which}
    }))
    .unwrap()
}

/// What one upstream holds: an image, an SBOM and a signature of it, a signature of the SBOM,
/// and a buildx-style index with an attestation manifest.
struct Published {
    image: Vec<u8>,
    sbom: Vec<u8>,
    sig: Vec<u8>,
    sbom_sig: Vec<u8>,
    index: Vec<u8>,
}

async fn publish(c: &reqwest::Client, base: &str, repo: &str) -> Published {
    let image = push_image(c, base, repo, "v1", "app").await;
    push_blob(c, base, repo, b"{}").await;
    let (sbom_layer, sig_layer, sbom_sig_layer) = (
        b"{\"spdxVersion\":\"SPDX-2.3\"}".to_vec(),
        b"signature of the image".to_vec(),
        b"signature of the sbom".to_vec(),
    );
    for layer in [&sbom_layer, &sig_layer, &sbom_sig_layer] {
        push_blob(c, base, repo, layer).await;
    }
    let sbom = artifact(SBOM, &sbom_layer, "sbom.spdx.json", &image, "sbom");
    let sig = artifact(SIG, &sig_layer, "signature", &image, "sig");
    let sbom_sig = artifact(SIG, &sbom_sig_layer, "signature", &sbom, "sbom-sig");
    for m in [&sbom, &sig, &sbom_sig] {
        let r = put_manifest(c, base, repo, &sha256(m), OCI_MANIFEST, m).await;
        assert!(r.status().is_success(), "{}", r.text().await.unwrap_or_default());
    }
    // buildx: an index with the image and an attestation manifest for platform unknown/unknown.
    let attestation = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(b"{}"), "size": 2},
        "layers": [{"mediaType": "application/vnd.in-toto+json", "digest": sha256(&sbom_layer), "size": sbom_layer.len(),
                    "annotations": {"in-toto.io/predicate-type": "https://spdx.dev/Document"}}]
    }))
    .unwrap();
    assert!(put_manifest(c, base, repo, &sha256(&attestation), OCI_MANIFEST, &attestation).await.status().is_success());
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": sha256(&image), "size": image.len(), "platform": {"os": "linux", "architecture": "amd64"}},
            {"mediaType": OCI_MANIFEST, "digest": sha256(&attestation), "size": attestation.len(),
             "platform": {"os": "unknown", "architecture": "unknown"},
             "annotations": {"vnd.docker.reference.type": "attestation-manifest", "vnd.docker.reference.digest": sha256(&image)}}
        ]
    }))
    .unwrap();
    assert!(put_manifest(c, base, repo, "v2", OCI_INDEX, &index).await.status().is_success());
    Published { image, sbom, sig, sbom_sig, index }
}

/// (digest, artifactType, which) of every descriptor in a referrers list, sorted.
fn listed(v: &Value) -> Vec<(String, String, String)> {
    let mut out: Vec<_> = v["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["digest"].as_str().unwrap().to_string(),
                d["artifactType"].as_str().unwrap_or_default().to_string(),
                d["annotations"]["org.example.which"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

fn expected(p: &Published) -> Vec<(String, String, String)> {
    let mut e = vec![
        (sha256(&p.sbom), SBOM.to_string(), "sbom".to_string()),
        (sha256(&p.sig), SIG.to_string(), "sig".to_string()),
    ];
    e.sort();
    e
}

async fn get_json(c: &reqwest::Client, url: String) -> (reqwest::header::HeaderMap, Value) {
    let r = c.get(url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let headers = r.headers().clone();
    (headers, r.json().await.unwrap())
}

/// Every artifact's manifest and blobs through the mirror, byte for byte.
async fn pull_artifacts(c: &reqwest::Client, mirror: &str, p: &Published) {
    for m in [&p.image, &p.sbom, &p.sig, &p.sbom_sig, &p.index] {
        let r = c.get(format!("{mirror}/v2/library/app/manifests/{}", sha256(m))).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().await.unwrap().as_ref(), &m[..]);
        let v: Value = serde_json::from_slice(m).unwrap();
        let blobs = std::iter::once(&v["config"]).chain(v["layers"].as_array().into_iter().flatten());
        for b in blobs.filter(|b| b.is_object()) {
            let d = b["digest"].as_str().unwrap();
            let r = c.get(format!("{mirror}/v2/library/app/blobs/{d}")).send().await.unwrap();
            assert_eq!(sha256(&r.bytes().await.unwrap()), d);
        }
        for child in v["manifests"].as_array().into_iter().flatten() {
            let d = child["digest"].as_str().unwrap();
            let r = c.get(format!("{mirror}/v2/library/app/manifests/{d}")).send().await.unwrap();
            assert_eq!(sha256(&r.bytes().await.unwrap()), d, "a child of the attestation index");
        }
    }
}

/// A regmirror with `library/*` as its private namespace: an upstream with the referrers API.
async fn upstream_with_the_api() -> TestServer {
    TestServer::start("[storage]\nroot = \"data\"\n[private]\nnamespaces = [\"library\"]\n[[upstream]]\nname = \"quay.io\"\nurl = \"http://127.0.0.1:9\"\n").await
}

#[tokio::test]
async fn referrers_come_through_from_an_upstream_with_the_api_filtered_and_byte_exact() {
    let upstream = upstream_with_the_api().await;
    let c = client();
    let p = publish(&c, &upstream.url(""), "library/app").await;
    let mirror = TestServer::start(&mirror_config(&upstream.url(""))).await;
    let base = mirror.url("");
    let subject = sha256(&p.image);

    let (_, theirs) = get_json(&c, upstream.url(&format!("/v2/library/app/referrers/{subject}"))).await;
    let (headers, ours) = get_json(&c, format!("{base}/v2/library/app/referrers/{subject}")).await;
    assert_eq!(headers["content-type"], OCI_INDEX);
    assert_eq!(listed(&ours), listed(&theirs));
    assert_eq!(listed(&ours), expected(&p));
    // Filtered here, and said so.
    // (`+` in a query string is a space: clients escape it.)
    let filter = SBOM.replace('+', "%2B");
    let (headers, sboms) =
        get_json(&c, format!("{base}/v2/library/app/referrers/{subject}?artifactType={filter}")).await;
    assert_eq!(headers["oci-filters-applied"], "artifactType");
    assert_eq!(listed(&sboms), vec![(sha256(&p.sbom), SBOM.to_string(), "sbom".to_string())]);
    let (headers, _) = get_json(&c, format!("{base}/v2/library/app/referrers/{subject}")).await;
    assert!(headers.get("oci-filters-applied").is_none());
    // A signature of the SBOM is the SBOM's referrer.
    let (_, of_sbom) = get_json(&c, format!("{base}/v2/library/app/referrers/{}", sha256(&p.sbom))).await;
    assert_eq!(listed(&of_sbom), vec![(sha256(&p.sbom_sig), SIG.to_string(), "sbom-sig".to_string())]);
    pull_artifacts(&c, &base, &p).await;
    // Asked once within the TTL.
    let asked = metric(
        &mirror.metrics(),
        r#"regmirror_upstream_requests_total{kind="referrers",status="200",upstream="docker.io"}"#,
    );
    get_json(&c, format!("{base}/v2/library/app/referrers/{subject}")).await;
    assert_eq!(
        metric(
            &mirror.metrics(),
            r#"regmirror_upstream_requests_total{kind="referrers",status="200",upstream="docker.io"}"#
        ),
        asked
    );
}

#[tokio::test]
async fn an_upstream_without_the_api_is_read_through_the_tag_schema_and_cosign_tags_pull_through() {
    if !require("docker-registry") {
        return;
    }
    let upstream = RefRegistry::start(None).await;
    let c = client();
    let p = publish(&c, &upstream.url(), "library/app").await;
    let subject = sha256(&p.image);
    // The fallback the spec defines: a tag <alg>-<hex> holding an index of the referrers.
    let descriptor = |m: &Vec<u8>, t: &str, which: &str| {
        json!({"mediaType": OCI_MANIFEST, "digest": sha256(m), "size": m.len(), "artifactType": t,
               "annotations": {"org.example.which": which}})
    };
    let fallback = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [descriptor(&p.sbom, SBOM, "sbom"), descriptor(&p.sig, SIG, "sig")]
    }))
    .unwrap();
    let tag = subject.replace(':', "-");
    assert!(put_manifest(&c, &upstream.url(), "library/app", &tag, OCI_INDEX, &fallback).await.status().is_success());
    // cosign's own convention: sha256-<hex>.sig, a plain tag.
    assert!(put_manifest(&c, &upstream.url(), "library/app", &format!("{tag}.sig"), OCI_MANIFEST, &p.sig)
        .await
        .status()
        .is_success());

    let mirror = TestServer::start(&mirror_config(&upstream.url())).await;
    let base = mirror.url("");
    // distribution 2.8 has no referrers API.
    let r = c.get(format!("{}/v2/library/app/referrers/{subject}", upstream.url())).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let (_, ours) = get_json(&c, format!("{base}/v2/library/app/referrers/{subject}")).await;
    assert_eq!(listed(&ours), expected(&p));
    let r = c.get(format!("{base}/v2/library/app/manifests/{tag}.sig")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &p.sig[..]);
    pull_artifacts(&c, &base, &p).await;
    // No referrers at all: an empty list, not an error.
    let (_, none) = get_json(&c, format!("{base}/v2/library/app/referrers/{}", sha256(&p.sig))).await;
    assert_eq!(none["manifests"], json!([]));
}

#[tokio::test(flavor = "multi_thread")]
async fn after_prefetch_with_referrers_everything_is_served_with_the_upstream_gone() {
    let upstream = upstream_with_the_api().await;
    let c = client();
    let p = publish(&c, &upstream.url(""), "library/app").await;
    let mirror = TestServer::start(&mirror_config(&upstream.url(""))).await;
    let base = mirror.url("");
    let config = mirror.dir.path().join("mirror.toml");
    std::fs::write(&config, mirror_config(&upstream.url(""))).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_regmirror"))
        .args(["prefetch", "--referrers", "--mirror", &base, "--config"])
        .arg(&config)
        .arg("docker.io/library/app:v1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("3 referrer(s)"), "{}", String::from_utf8_lossy(&out.stdout));

    // The upstream is gone, and the TTL has passed: the last answer is served.
    upstream.stop().await;
    mirror.state.cache.clock.advance(std::time::Duration::from_secs(3600));
    let subject = sha256(&p.image);
    let (_, ours) = get_json(&c, format!("{base}/v2/library/app/referrers/{subject}")).await;
    assert_eq!(listed(&ours), expected(&p));
    let (_, of_sbom) = get_json(&c, format!("{base}/v2/library/app/referrers/{}", sha256(&p.sbom))).await;
    assert_eq!(listed(&of_sbom).len(), 1);
    let filter = SIG.replace('+', "%2B");
    let (headers, sigs) =
        get_json(&c, format!("{base}/v2/library/app/referrers/{subject}?artifactType={filter}")).await;
    assert_eq!(headers["oci-filters-applied"], "artifactType");
    assert_eq!(listed(&sigs), vec![(sha256(&p.sig), SIG.to_string(), "sig".to_string())]);
    for m in [&p.sbom, &p.sig, &p.sbom_sig] {
        let r = c.get(format!("{base}/v2/library/app/manifests/{}", sha256(m))).send().await.unwrap();
        assert_eq!(r.bytes().await.unwrap().as_ref(), &m[..]);
        let v: Value = serde_json::from_slice(m).unwrap();
        let layer = v["layers"][0]["digest"].as_str().unwrap();
        let r = c.get(format!("{base}/v2/library/app/blobs/{layer}")).send().await.unwrap();
        assert_eq!(sha256(&r.bytes().await.unwrap()), layer);
    }
    assert!(
        metric(
            &mirror.metrics(),
            r#"regmirror_cache_requests_total{kind="referrers",outcome="stale",upstream="docker.io"}"#
        ) >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_client_pulls_an_artifact_through_the_mirror() {
    // The test command puts oras-py in a venv of its own and says where.
    let python = std::env::var("REGMIRROR_PYTHON").unwrap_or_else(|_| "python3".into());
    let have_oras =
        std::process::Command::new(&python).args(["-c", "import oras.client"]).status().is_ok_and(|s| s.success());
    if !have_oras {
        if std::env::var("REGMIRROR_E2E").as_deref() == Ok("skip") {
            return;
        }
        panic!("oras-py is not installed (pip install oras): run the README's test command, or set REGMIRROR_E2E=skip");
    }
    let upstream = upstream_with_the_api().await;
    let c = client();
    let p = publish(&c, &upstream.url(""), "library/app").await;
    let mirror = TestServer::start(&mirror_config(&upstream.url(""))).await;
    let out_dir = tempfile::tempdir().unwrap();
    let script = format!(
        "import oras.client\nc = oras.client.OrasClient(hostname='{addr}', insecure=True)\nprint(c.pull(target='{addr}/library/app@{d}', outdir='{out}'))\n",
        addr = mirror.addr,
        d = sha256(&p.sbom),
        out = out_dir.path().display()
    );
    let out = std::process::Command::new(&python).args(["-c", &script]).output().unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let pulled = std::fs::read(out_dir.path().join("sbom.spdx.json")).unwrap();
    assert_eq!(pulled, b"{\"spdxVersion\":\"SPDX-2.3\"}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pinned_image_keeps_its_referrers() {
    let upstream = upstream_with_the_api().await;
    let c = client();
    let p = publish(&c, &upstream.url(""), "library/app").await;
    let toml = format!(
        "{}[cache]\npin = [\"docker.io/library/app:v1\"]\npin_referrers = true\n",
        mirror_config(&upstream.url("")).replace("root = \"data\"\n", "root = \"data\"\nmax_size = \"1MiB\"\n")
    );
    let mirror = TestServer::start(&toml).await;
    let state = &mirror.state;
    regmirror::cache::pins::refresh(&state.cache, &state.upstreams, &state.config.pins, true).await;
    // Evict everything that may go: the pinned image and every referrer, recursively, stay.
    regmirror::cache::evict::pass(&state.cache, 1).await;
    for m in [&p.image, &p.sbom, &p.sig, &p.sbom_sig] {
        assert!(blob_present(&mirror, &sha256(m)), "a pinned manifest or referrer was evicted");
        let v: Value = serde_json::from_slice(m).unwrap();
        for layer in v["layers"].as_array().unwrap() {
            assert!(blob_present(&mirror, layer["digest"].as_str().unwrap()), "a referrer's layer was evicted");
        }
    }
}
