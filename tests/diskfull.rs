//! A full disk: the store on a small tmpfs this test mounts (root needed, as for the e2e suite).
//! Pulls and pushes that do not fit get `507` with error JSON, nothing partial is kept, cached
//! content is still served, and once there is room again the same pull and push succeed. With
//! `storage.max_size` set, eviction makes room first.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::hub::Hub;
use common::*;
use serde_json::Value;

/// A tmpfs of `mib` MiB mounted at `<dir>/data`, unmounted when dropped.
struct SmallDisk {
    mount: PathBuf,
    sudo: bool,
}

/// `program`, through `sudo -n` when the tests run as a user.
fn root_command(sudo: bool, program: &str) -> Command {
    if sudo {
        let mut c = Command::new("sudo");
        c.args(["-n", program]);
        c
    } else {
        Command::new(program)
    }
}

impl SmallDisk {
    fn mount(dir: &Path, mib: u64) -> Option<SmallDisk> {
        // SAFETY: plain queries of this process's ids.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        // The README's test command, run by a user, mounts through sudo (REGMIRROR_SUDO).
        let sudo = uid != 0 && std::env::var("REGMIRROR_SUDO").as_deref() == Ok("1");
        if uid != 0 && !sudo {
            if std::env::var("REGMIRROR_E2E").as_deref() == Ok("skip") {
                return None;
            }
            panic!("mounting a small tmpfs needs root: run the README's test command, or set REGMIRROR_E2E=skip");
        }
        let mount = dir.join("data");
        std::fs::create_dir_all(&mount).unwrap();
        let status = root_command(sudo, "mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m,uid={uid},gid={gid},mode=0755"), "tmpfs"])
            .arg(&mount)
            .status()
            .unwrap();
        assert!(status.success(), "mount tmpfs");
        Some(SmallDisk { mount, sudo })
    }

    /// Fill the disk until only `free_mib` MiB are left; returns the ballast file.
    fn leave_free(&self, free_mib: u64) -> PathBuf {
        let ballast = self.mount.join("ballast");
        let available = {
            let path = std::ffi::CString::new(self.mount.as_os_str().to_str().unwrap()).unwrap();
            let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
            assert_eq!(unsafe { libc::statvfs(path.as_ptr(), &mut stat) }, 0);
            stat.f_bavail * stat.f_frsize
        };
        let existing = std::fs::metadata(&ballast).map_or(0, |m| m.len());
        let size = (available + existing).saturating_sub(free_mib << 20);
        std::fs::write(&ballast, vec![0u8; size as usize]).unwrap();
        ballast
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = root_command(self.sudo, "umount").arg("-l").arg(&self.mount).status();
    }
}

fn staging_files(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("data/tmp")).map_or(0, |d| d.filter(|e| e.is_ok()).count())
}

async fn error(r: reqwest::Response) -> (u16, String) {
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap();
    (status, v["errors"][0]["code"].as_str().unwrap_or_default().to_string())
}

fn config(hub: &Hub, extra: &str) -> String {
    format!("[storage]\nroot = \"data\"\n{extra}\n[[upstream]]\nname = \"docker.io\"\nurl = \"{}\"\n", hub.url())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_refuses_cleanly_keeps_serving_the_cache_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = SmallDisk::mount(dir.path(), 48) else { return };
    let hub = Hub::start().await;
    let (small, _, _) = hub_image(&hub, "small", "latest", blob_of(4 * MIB, 1));
    let (big, _, _) = hub_image(&hub, "big", "latest", blob_of(12 * MIB, 2));
    let s = TestServer::start_in(dir, &config(&hub, "")).await;
    let c = client();
    let small_url = s.url(&format!("/v2/library/small/blobs/{small}"));
    assert_eq!(sha256(&c.get(&small_url).send().await.unwrap().bytes().await.unwrap()), small);

    let ballast = disk.leave_free(6);
    // A pull that does not fit: refused before any byte is sent, in words a client can read.
    let r = c.get(s.url(&format!("/v2/library/big/blobs/{big}"))).send().await.unwrap();
    assert_eq!(error(r).await, (507, "UNAVAILABLE".to_string()));
    // A push that does not fit: refused part way, nothing kept.
    let pushed = blob_of(8 * MIB, 3);
    let pushed_digest = sha256(&pushed);
    let r = c
        .post(s.url(&format!("/v2/private/full/blobs/uploads/?digest={pushed_digest}")))
        .body(pushed.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(error(r).await, (507, "UNAVAILABLE".to_string()));
    assert_eq!(staging_files(s.dir.path()), 0, "staging files left behind");
    assert!(!blob_present(&s, &big) && !blob_present(&s, &pushed_digest));
    // What is cached is still served.
    assert_eq!(sha256(&c.get(&small_url).send().await.unwrap().bytes().await.unwrap()), small);

    // Room again: the same pull and push succeed.
    std::fs::remove_file(ballast).unwrap();
    let got = c.get(s.url(&format!("/v2/library/big/blobs/{big}"))).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(sha256(&got), big);
    push_blob(&c, &s.url(""), "private/full", &pushed).await;
    assert_eq!(staging_files(s.dir.path()), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_max_size_set_eviction_makes_room_on_a_full_disk() {
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = SmallDisk::mount(dir.path(), 48) else { return };
    let hub = Hub::start().await;
    let (first, _, _) = hub_image(&hub, "first", "latest", blob_of(10 * MIB, 4));
    let (second, _, _) = hub_image(&hub, "second", "latest", blob_of(10 * MIB, 5));
    let s = TestServer::start_in(dir, &config(&hub, "max_size = \"40MiB\"")).await;
    let c = client();
    let pull = |name: &'static str, d: String| {
        let (c, url) = (c.clone(), s.url(&format!("/v2/library/{name}/blobs/{d}")));
        async move { sha256(&c.get(url).send().await.unwrap().bytes().await.unwrap()) }
    };
    assert_eq!(pull("first", first.clone()).await, first);
    // The disk fills up for other reasons, below max_size: the least recently used blob goes.
    disk.leave_free(6);
    assert_eq!(pull("second", second.clone()).await, second);
    assert!(!blob_present(&s, &first), "nothing was evicted to make room");
    assert!(metric(&s.metrics(), "regmirror_evictions_total") >= 1.0);
    // A blob larger than all that could be evicted: refused, and the cache is left alone.
    let (huge, _, _) = hub_image(&hub, "huge", "latest", blob_of(30 * MIB, 6));
    let r = c.get(s.url(&format!("/v2/library/huge/blobs/{huge}"))).send().await.unwrap();
    assert_eq!(error(r).await, (507, "UNAVAILABLE".to_string()));
    assert!(blob_present(&s, &second), "the cache was emptied for a blob that could never fit");
}
