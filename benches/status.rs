//! Server time of the status page and `/api/status` with 10,000 repositories in the store:
//! `cargo bench --bench status` (REPOSITORIES=N for another count). Prints the figures (the
//! handler's own `Server-Timing`, and the time to the whole body through the router); asserts
//! nothing.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use regmirror::config::Config;
use regmirror::oci::{Digest, RepoName};
use tower::ServiceExt;

const ROUNDS: usize = 200;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let repositories: usize = std::env::var("REPOSITORIES").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        // With [auth]: every row's visibility is decided by the anonymous policy and the grants.
        let htpasswd = dir.path().join("htpasswd");
        regmirror::auth::set_password(&htpasswd, "alice", "alice-password").expect("htpasswd");
        let toml = format!(
            "[storage]\nroot = \"data\"\nmax_size = \"100GiB\"\n[private]\nnamespaces = [\"private\"]\n[auth]\nhtpasswd = \"{}\"\nanonymous = \"pull-mirror\"\n[[auth.grant]]\nusers = [\"alice\"]\nrepositories = [\"private/team-1*\", \"private/team-2*\"]\naccess = \"pull\"\n",
            htpasswd.display()
        );
        let config = Config::parse(&toml, dir.path()).expect("config");
        // Each repository links a blob of its own and one every repository shares.
        {
            let state = regmirror::app::AppState::new(config.clone()).await.expect("state");
            let shared = b"a layer every repository has".repeat(1000);
            let shared_digest = Digest::sha256_of(&shared);
            state.store.put_blob_bytes(&shared_digest, &shared).await.expect("write");
            let started = Instant::now();
            for i in 0..repositories {
                let name =
                    if i % 10 == 0 { format!("private/team-{i}") } else { format!("docker.io/library/image-{i}") };
                let repo = RepoName::parse(&name).expect("name");
                let own = format!("blob of repository {i}").into_bytes();
                let own_digest = Digest::sha256_of(&own);
                state.store.put_blob_bytes(&own_digest, &own).await.expect("write");
                state.store.link_blob(&repo, &own_digest).await.expect("link");
                state.store.link_blob(&repo, &shared_digest).await.expect("link");
            }
            println!("store: {repositories} repositories written in {:.1} s", started.elapsed().as_secs_f64());
        }
        let state = regmirror::app::start(config).await.expect("start");
        // Every repository pulled at some time.
        for name in state.store.list_repositories_all().await.expect("list") {
            state.cache.pulled(&name);
        }
        let started = Instant::now();
        while state.status.repositories.current(&state).built_at == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        println!(
            "repository summary built in {:.2} s (in the background, after start)",
            started.elapsed().as_secs_f64()
        );
        let app = regmirror::app::router(state.clone());
        let req = Request::get("/api/status?per_page=1").body(Body::empty()).expect("request");
        let body = axum::body::to_bytes(app.clone().oneshot(req).await.expect("response").into_body(), usize::MAX)
            .await
            .expect("body");
        let json: serde_json::Value = serde_json::from_slice(&body).expect("json");
        println!(
            "repositories visible anonymously: {} (the rest are private), each with a last pull",
            json["repositories"]["total"]
        );
        println!("{:<44} {:>9} {:>9} {:>9} {:>10}", "request", "median", "p95", "max", "body");
        let alice = {
            use base64::Engine;
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("alice:alice-password"))
        };
        for (path, user) in [
            ("/", None),
            ("/?sort=size&desc=1", None),
            ("/?sort=pulled", None),
            ("/?q=image-99", None),
            ("/?page=150", None),
            ("/", Some(&alice)),
            ("/?q=team", Some(&alice)),
            ("/api/status", None),
            ("/api/status?per_page=1000", None),
        ] {
            let mut server = Vec::with_capacity(ROUNDS);
            let mut total = Vec::with_capacity(ROUNDS);
            let mut size = 0;
            for _ in 0..ROUNDS {
                let mut req = Request::get(path).header("host", "mirror.example:5000");
                if let Some(a) = user {
                    req = req.header("authorization", a.as_str());
                }
                let req = req.body(Body::empty()).expect("request");
                let t = Instant::now();
                let resp = app.clone().oneshot(req).await.expect("response");
                let timing = resp
                    .headers()
                    .get("server-timing")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.split("dur=").nth(1))
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(f64::NAN);
                let body = axum::body::to_bytes(resp.into_body(), usize::MAX).await.expect("body");
                total.push(t.elapsed().as_secs_f64() * 1000.0);
                server.push(timing);
                size = body.len();
            }
            server.sort_by(f64::total_cmp);
            total.sort_by(f64::total_cmp);
            println!(
                "{:<44} {:>7.2}ms {:>7.2}ms {:>7.2}ms {:>8}KiB",
                format!("{path}{} (server time)", if user.is_some() { " as alice" } else { "" }),
                percentile(&server, 0.5),
                percentile(&server, 0.95),
                server[server.len() - 1],
                size / 1024
            );
            println!(
                "{:<44} {:>7.2}ms {:>7.2}ms {:>7.2}ms",
                "   to the last body byte",
                percentile(&total, 0.5),
                percentile(&total, 0.95),
                total[total.len() - 1]
            );
        }
    });
}
