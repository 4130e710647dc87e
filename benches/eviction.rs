//! Time and memory of one eviction pass over a store of 100,000 blobs:
//! `cargo bench --bench eviction`. Prints the figures; asserts nothing.

use std::time::Instant;

use regmirror::app::AppState;
use regmirror::config::Config;
use regmirror::oci::Digest;

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() {
    let blobs: usize = std::env::var("BLOBS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let config = Config::parse("[storage]\nroot = \"data\"\n", dir.path()).expect("config");
        let state = AppState::new(config).await.expect("state");
        let started = Instant::now();
        for i in 0..blobs {
            let bytes = format!("blob number {i} {}", "x".repeat(1000));
            state.store.put_blob_bytes(&Digest::sha256_of(bytes.as_bytes()), bytes.as_bytes()).await.expect("write");
        }
        println!("store: {blobs} blobs written in {:.1} s", started.elapsed().as_secs_f64());
        let started = Instant::now();
        regmirror::cache::evict::load(&state.cache).await.expect("index");
        println!(
            "start-up index of {blobs} blobs: {:.2} s, RSS {} MiB",
            started.elapsed().as_secs_f64(),
            rss_kib("VmRSS:") / 1024
        );
        let total = state.store.stats().bytes.load(std::sync::atomic::Ordering::Relaxed) as u64;
        for fraction in [100, 10] {
            let total = state.store.stats().bytes.load(std::sync::atomic::Ordering::Relaxed) as u64;
            // Bound so that one pass evicts about 1/fraction of what is there (plus the 5 % margin).
            let max = total - total / fraction;
            let before = rss_kib("VmRSS:");
            let started = Instant::now();
            let evicted = regmirror::cache::evict::pass(&state.cache, max).await;
            println!(
                "eviction pass: {} blobs ({} KiB) evicted of {} in {:.1} ms; RSS {} -> {} MiB",
                evicted.blobs,
                evicted.bytes / 1024,
                state.store.stats().objects.load(std::sync::atomic::Ordering::Relaxed) + evicted.blobs as i64,
                started.elapsed().as_secs_f64() * 1000.0,
                before / 1024,
                rss_kib("VmRSS:") / 1024
            );
        }
        println!(
            "store before passes: {} MiB; peak RSS of the whole run: {} MiB",
            total >> 20,
            rss_kib("VmHWM:") / 1024
        );
    });
}
