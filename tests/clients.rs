//! Real clients against a running regmirror: skopeo pushes into the private namespace and pulls
//! back out byte-identical, and pulls mirrored images through the cache from the reference registry.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn skopeo(args: &[&str]) -> String {
    let out = Command::new("skopeo").args(args).output().expect("skopeo");
    assert!(out.status.success(), "skopeo {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn raw_manifest(reference: &str) -> Vec<u8> {
    skopeo(&["inspect", "--raw", "--tls-verify=false", reference]).into_bytes()
}

/// The digest of the top manifest a `dir:` copy wrote (skopeo keeps its bytes there).
fn dir_digest(dir: &Path) -> String {
    sha256(&std::fs::read(dir.join("manifest.json")).unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn skopeo_copies_into_the_private_namespace_and_back_byte_identical() {
    if !require("skopeo") {
        return;
    }
    let s = TestServer::start(
        "[storage]\nroot = \"data\"\n[[upstream]]\nname = \"docker.io\"\nurl = \"http://127.0.0.1:9\"\n",
    )
    .await;
    let host = s.addr.to_string();
    let work = tempfile::tempdir().unwrap();
    let single = work.path().join("single");
    let multi = work.path().join("multi");
    let single_digest = write_oci_layout(&single, "v1", &[("linux", "amd64")], "single");
    let multi_digest = write_oci_layout(&multi, "v1", &[("linux", "amd64"), ("linux", "arm64")], "multi");

    let cases = [
        (format!("oci:{}:v1", single.display()), "private/single:v1", Some(single_digest), vec![]),
        (format!("oci:{}:v1", multi.display()), "private/multi:v1", Some(multi_digest), vec!["--all"]),
        // --format v2s2 turns the index into a Docker manifest list (new digests, checked below).
        (format!("oci:{}:v1", multi.display()), "private/multilist:v1", None, vec!["--all", "--format", "v2s2"]),
    ];
    for (src, dest, digest, extra) in &cases {
        let dest_ref = format!("docker://{host}/{dest}");
        let mut args = vec!["copy", "--dest-tls-verify=false"];
        args.extend(extra.iter().copied());
        args.extend([src.as_str(), dest_ref.as_str()]);
        skopeo(&args);
        let pushed = raw_manifest(&dest_ref);
        if let Some(d) = digest {
            assert_eq!(&sha256(&pushed), d, "{dest}: manifest digest changed");
        }
        // And back out: the same manifest digest (skopeo keeps the bytes with --all).
        let back = work.path().join(dest.replace(['/', ':'], "_"));
        let back_ref = format!("dir:{}", back.display());
        let mut args = vec!["copy", "--src-tls-verify=false", "--all"];
        args.extend([dest_ref.as_str(), back_ref.as_str()]);
        skopeo(&args);
        assert_eq!(dir_digest(&back), sha256(&pushed), "{dest}: pulled back different bytes");
    }
    let list = raw_manifest(&format!("docker://{host}/private/multilist:v1"));
    let v: serde_json::Value = serde_json::from_slice(&list).unwrap();
    assert_eq!(v["mediaType"], "application/vnd.docker.distribution.manifest.list.v2+json");

    let inspect: serde_json::Value = serde_json::from_str(&skopeo(&[
        "inspect",
        "--tls-verify=false",
        &format!("docker://{host}/private/single:v1"),
    ]))
    .unwrap();
    assert_eq!(inspect["Architecture"], "amd64");
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", single.display()),
        &format!("docker://{host}/private/single:v2"),
    ]);
    let tags: serde_json::Value =
        serde_json::from_str(&skopeo(&["list-tags", "--tls-verify=false", &format!("docker://{host}/private/single")]))
            .unwrap();
    assert_eq!(tags["Tags"], serde_json::json!(["v1", "v2"]));
}

#[tokio::test(flavor = "multi_thread")]
async fn skopeo_pulls_mirrored_images_from_the_reference_registry() {
    if !require("skopeo") || !require("docker-registry") {
        return;
    }
    let upstream = RefRegistry::start(None).await;
    let work = tempfile::tempdir().unwrap();
    let multi = work.path().join("multi");
    let index_digest = write_oci_layout(&multi, "latest", &[("linux", "amd64"), ("linux", "arm64")], "mirror");
    let up = format!("127.0.0.1:{}", upstream.port);
    skopeo(&[
        "copy",
        "--all",
        "--dest-tls-verify=false",
        &format!("oci:{}:latest", multi.display()),
        &format!("docker://{up}/library/multi:latest"),
    ]);
    skopeo(&[
        "copy",
        "--all",
        "--format",
        "v2s2",
        "--dest-tls-verify=false",
        &format!("oci:{}:latest", multi.display()),
        &format!("docker://{up}/library/multilist:latest"),
    ]);
    let list_digest = sha256(&raw_manifest(&format!("docker://{up}/library/multilist:latest")));
    let single = work.path().join("single");
    let single_digest = write_oci_layout(&single, "latest", &[("linux", "amd64")], "single-mirror");
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:latest", single.display()),
        &format!("docker://{up}/library/hello:latest"),
    ]);

    let s = TestServer::start(&format!(
        "[storage]\nroot = \"data\"\n[[upstream]]\nname = \"docker.io\"\nurl = \"{}\"\n",
        upstream.url()
    ))
    .await;
    let host = s.addr.to_string();
    // All platforms, by tag and by digest, byte-identical to the upstream.
    // Default upstream (dockerd's form), and the path prefix naming the upstream.
    for (reference, digest) in [
        ("library/multi:latest", &index_digest),
        ("library/multilist:latest", &list_digest),
        ("library/hello:latest", &single_digest),
        ("docker.io/library/hello:latest", &single_digest),
        ("docker.io/library/multi:latest", &index_digest),
    ] {
        let out = work.path().join(reference.replace(['/', ':'], "_"));
        skopeo(&[
            "copy",
            "--all",
            "--src-tls-verify=false",
            &format!("docker://{host}/{reference}"),
            &format!("dir:{}", out.display()),
        ]);
        assert_eq!(&dir_digest(&out), digest);
    }
    let by_digest = work.path().join("bydigest");
    skopeo(&[
        "copy",
        "--all",
        "--src-tls-verify=false",
        &format!("docker://{host}/library/multi@{index_digest}"),
        &format!("dir:{}", by_digest.display()),
    ]);
    assert_eq!(dir_digest(&by_digest), index_digest);
    // One platform only.
    let arm = work.path().join("arm");
    skopeo(&[
        "copy",
        "--override-arch",
        "arm64",
        "--src-tls-verify=false",
        &format!("docker://{host}/library/multi:latest"),
        &format!("oci:{}:x", arm.display()),
    ]);
    let config = skopeo(&["inspect", "--config", &format!("oci:{}:x", arm.display())]);
    assert!(config.contains("\"arm64\""), "{config}");
    let metrics = s.metrics();
    assert!(
        metric(&metrics, r#"regmirror_cache_requests_total{kind="blob",outcome="miss",upstream="docker.io"}"#) >= 4.0
    );
    assert!(
        metric(&metrics, r#"regmirror_cache_requests_total{kind="manifest",outcome="hit",upstream="docker.io"}"#)
            >= 1.0
    );
}
