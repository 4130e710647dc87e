//! `regmirror prefetch`: every layer of every platform warmed through a running mirror, with
//! progress shown.

mod common;

use common::hub::Hub;
use common::*;

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
}
