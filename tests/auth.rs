//! Access control: the token flow, grants per namespace, 401 versus 403, the filtered catalog,
//! anonymous mirrored pulls with foreign credentials, and secrets that never reach the log.

mod common;

use common::hub::Hub;
use common::*;
use serde_json::Value;

fn auth_config(dir: &std::path::Path, upstream: &str) -> String {
    let htpasswd = dir.join("htpasswd");
    regmirror::auth::set_password(&htpasswd, "alice", "alice-secret-pw").unwrap();
    regmirror::auth::set_password(&htpasswd, "carol", "carol-secret-pw").unwrap();
    format!(
        r#"[storage]
root = "data"
[[upstream]]
name = "docker.io"
url = "{upstream}"
[auth]
htpasswd = "{}"
anonymous = "pull-mirror"
[[auth.grant]]
users = ["alice"]
repositories = ["private/team-a/*"]
access = "delete"
"#,
        htpasswd.display()
    )
}

async fn token(c: &reqwest::Client, base: &str, creds: Option<(&str, &str)>, scope: &str) -> reqwest::Response {
    let mut req = c.get(format!("{base}/auth/token?service=regmirror&scope={scope}"));
    if let Some((u, p)) = creds {
        req = req.basic_auth(u, Some(p));
    }
    req.send().await.unwrap()
}

async fn bearer(c: &reqwest::Client, base: &str, user: &str, pw: &str, scope: &str) -> String {
    let r = token(c, base, Some((user, pw)), scope).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    v["token"].as_str().unwrap().to_string()
}

async fn push_as(c: &reqwest::Client, base: &str, repo: &str, auth: Option<&str>) -> reqwest::StatusCode {
    let body = format!("content for {repo}");
    let d = sha256(body.as_bytes());
    let mut req = c.post(format!("{base}/v2/{repo}/blobs/uploads/?digest={d}")).body(body);
    if let Some(t) = auth {
        req = req.bearer_auth(t);
    }
    req.send().await.unwrap().status()
}

#[tokio::test]
async fn grants_decide_who_pushes_and_pulls() {
    let hub = Hub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let toml = auth_config(dir.path(), &hub.url());
    let s = TestServer::start_in(dir, &toml).await;
    let c = client();
    let base = s.url("");

    // Anonymous push: 401 with a challenge that names the token endpoint.
    let r = c.post(s.url("/v2/private/team-a/x/blobs/uploads/")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let challenge = r.headers()["www-authenticate"].to_str().unwrap().to_string();
    assert!(challenge.starts_with("Bearer realm=\"http://") && challenge.contains("/auth/token\""), "{challenge}");
    assert!(challenge.contains("scope=\"repository:private/team-a/x:pull,push\""), "{challenge}");
    assert_eq!(c.get(s.url("/v2/")).send().await.unwrap().status(), 401);

    // Wrong password: 401.
    let r = token(&c, &base, Some(("alice", "wrong")), "repository:private/team-a/x:pull,push").await;
    assert_eq!(r.status(), 401);
    assert_eq!(metric(&s.metrics(), "regmirror_auth_failures_total"), 1.0);

    // alice may push to team-a, not team-b.
    let t = bearer(&c, &base, "alice", "alice-secret-pw", "repository:private/team-a/x:pull,push").await;
    assert_eq!(c.get(s.url("/v2/")).bearer_auth(&t).send().await.unwrap().status(), 200);
    assert_eq!(push_as(&c, &base, "private/team-a/x", Some(&t)).await, 201);
    let m = {
        let config = b"{\"os\":\"linux\"}";
        let r = c
            .post(s.url(&format!("/v2/private/team-a/x/blobs/uploads/?digest={}", sha256(config))))
            .bearer_auth(&t)
            .body(config.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let m = image_manifest(config, &[b"content for private/team-a/x"]);
        let r = c
            .put(s.url("/v2/private/team-a/x/manifests/v1"))
            .bearer_auth(&t)
            .header("content-type", OCI_MANIFEST)
            .body(m.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        m
    };
    let r = c.post(s.url("/v2/private/team-b/x/blobs/uploads/")).bearer_auth(&t).send().await.unwrap();
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["errors"][0]["code"], "DENIED");

    // Basic credentials work directly too (some clients send them up front).
    let r = c
        .get(s.url("/v2/private/team-a/x/manifests/v1"))
        .basic_auth("alice", Some("alice-secret-pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), &m[..]);

    // carol has no grant: 403 on the private repository; anonymous: 401.
    let carol = bearer(&c, &base, "carol", "carol-secret-pw", "repository:private/team-a/x:pull").await;
    assert_eq!(
        c.get(s.url("/v2/private/team-a/x/manifests/v1")).bearer_auth(&carol).send().await.unwrap().status(),
        403
    );
    assert_eq!(c.get(s.url("/v2/private/team-a/x/manifests/v1")).send().await.unwrap().status(), 401);

    // The catalog shows each caller what they may pull.
    let (_, _, _) = {
        let blob = b"mirrored layer".to_vec();
        let config = b"{}".to_vec();
        hub.add_blob(blob.clone());
        hub.add_blob(config.clone());
        let mm = image_manifest(&config, &[&blob]);
        ((), (), hub.add_manifest("library/pub", "latest", OCI_MANIFEST, mm))
    };
    // Anonymous pull of a mirrored image, even with a foreign token (dockerd forwards Docker Hub's).
    let r = c
        .get(s.url("/v2/library/pub/manifests/latest"))
        .bearer_auth("a-docker-hub-token.not.ours")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // And dockerd's Docker Hub password sent to our token endpoint does not break it either.
    let r = token(&c, &base, Some(("someone", "docker-hub-password")), "repository:library/pub:pull").await;
    assert_eq!(r.status(), 200);
    let anon: Value = r.json().await.unwrap();
    let r = c
        .get(s.url("/v2/library/pub/manifests/latest"))
        .bearer_auth(anon["token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let cat = |auth: Option<String>| {
        let c = c.clone();
        let url = s.url("/v2/_catalog");
        async move {
            let mut req = c.get(url);
            if let Some(t) = auth {
                req = req.bearer_auth(t);
            }
            let v: Value = req.send().await.unwrap().json().await.unwrap();
            v["repositories"].as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect::<Vec<_>>()
        }
    };
    assert_eq!(cat(Some(t.clone())).await, vec!["docker.io/library/pub", "private/team-a/x"]);
    assert_eq!(cat(Some(carol)).await, vec!["docker.io/library/pub"]);
    assert_eq!(cat(None).await, vec!["docker.io/library/pub"]);

    // Delete needs the delete right, which alice has, in a token asked for it.
    let r = c.delete(s.url("/v2/private/team-a/x/manifests/v1")).bearer_auth(&t).send().await.unwrap();
    assert_eq!(r.status(), 401, "a pull,push token deleted");
    let d = bearer(&c, &base, "alice", "alice-secret-pw", "repository:private/team-a/x:delete").await;
    let r = c.delete(s.url("/v2/private/team-a/x/manifests/v1")).bearer_auth(&d).send().await.unwrap();
    assert_eq!(r.status(), 202);
}

#[tokio::test]
async fn tokens_outlive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let toml = auth_config(dir.path(), "http://127.0.0.1:9");
    let s = TestServer::start_in(dir, &toml).await;
    let c = client();
    let both = "repository:private/team-a/x:pull,push&scope=repository:private/team-a/y:pull,push";
    let t = bearer(&c, &s.url(""), "alice", "alice-secret-pw", both).await;
    assert_eq!(push_as(&c, &s.url(""), "private/team-a/x", Some(&t)).await, 201);
    let key = s.dir.path().join("data").join(regmirror::storage::Meta::TokenKey.path());
    let dir = s.stop().await;
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "only the owner may read the signing key");
    }
    // The same store, a new process: the token a client holds still works.
    let s = TestServer::start_in(dir, &toml).await;
    assert_eq!(push_as(&c, &s.url(""), "private/team-a/y", Some(&t)).await, 201);
    // A token signed by another key does not.
    let other = TestServer::start_in(tempfile::tempdir().unwrap(), &toml).await;
    let forged = bearer(&c, &other.url(""), "alice", "alice-secret-pw", "repository:private/team-a/x:pull,push").await;
    assert_eq!(push_as(&c, &s.url(""), "private/team-a/z", Some(&forged)).await, 401);
}

#[tokio::test]
async fn anonymous_none_requires_a_login_for_everything() {
    let dir = tempfile::tempdir().unwrap();
    let toml = auth_config(dir.path(), "http://127.0.0.1:9").replace("pull-mirror", "none");
    let s = TestServer::start_in(dir, &toml).await;
    let c = client();
    assert_eq!(c.get(s.url("/v2/library/x/manifests/latest")).send().await.unwrap().status(), 401);
    assert_eq!(token(&c, &s.url(""), None, "repository:library/x:pull").await.status(), 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn no_secret_ever_reaches_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n[log]\nformat = \"json\"\n{}",
        auth_config(dir.path(), "http://127.0.0.1:9")
    );
    let config = dir.path().join("mirror.toml");
    std::fs::write(&config, toml).unwrap();
    let log = dir.path().join("log");
    let proc = Proc::spawn(&config, &log);
    let base = format!("http://127.0.0.1:{port}");
    wait_until_up(&format!("{base}/healthz")).await;
    let c = client();
    let t = bearer(&c, &base, "alice", "alice-secret-pw", "repository:private/team-a/x:pull,push").await;
    assert_eq!(push_as(&c, &base, "private/team-a/x", Some(&t)).await, 201);
    assert_eq!(
        token(&c, &base, Some(("alice", "wrong-password-123")), "repository:private/team-a/x:push").await.status(),
        401
    );
    assert_eq!(
        c.get(format!("{base}/v2/private/team-a/x/tags/list"))
            .basic_auth("alice", Some("alice-secret-pw"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    drop(proc);
    let text = std::fs::read_to_string(&log).unwrap();
    let hash_line = std::fs::read_to_string(dir.path().join("htpasswd")).unwrap();
    let alice_hash =
        hash_line.lines().find(|l| l.starts_with("alice:")).unwrap().trim_start_matches("alice:").to_string();
    for secret in ["alice-secret-pw", "wrong-password-123", t.as_str(), alice_hash.as_str(), "YWxpY2U6"] {
        assert!(!text.contains(secret), "the log contains a secret: {secret}");
    }
    assert!(
        text.contains("authentication failed") && text.contains("\"user\":\"alice\""),
        "failed login not logged:\n{text}"
    );
}

// ---- Credentials under abuse, and what a token may do (issue 12) ----

/// A mirror with auth whose hub serves `library/pub:latest`, pulled once so it is cached.
async fn mirror_with_cached_image() -> (Hub, TestServer) {
    let hub = Hub::start().await;
    let blob = b"mirrored layer".to_vec();
    let config = b"{}".to_vec();
    hub.add_blob(blob.clone());
    hub.add_blob(config.clone());
    hub.add_manifest("library/pub", "latest", OCI_MANIFEST, image_manifest(&config, &[&blob]));
    let dir = tempfile::tempdir().unwrap();
    let toml = auth_config(dir.path(), &hub.url());
    let s = TestServer::start_in(dir, &toml).await;
    let r = client().get(s.url("/v2/library/pub/manifests/latest")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    (hub, s)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_password_guessing_flood_leaves_health_checks_and_cached_pulls_alone() {
    let (_hub, s) = mirror_with_cached_image().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // 16 guessers, each from its own loopback address, each password new (nothing to remember).
    let flood: Vec<_> = (0..16u8)
        .map(|i| {
            let stop = stop.clone();
            let url = s.url("/auth/token?service=regmirror");
            tokio::spawn(async move {
                let c = reqwest::Client::builder()
                    .local_address(std::net::IpAddr::from([127, 0, 1, i + 1]))
                    .build()
                    .unwrap();
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let r = c.get(&url).basic_auth("alice", Some(format!("guess-{i}-{n}"))).send().await.unwrap();
                    assert_eq!(r.status(), 401);
                    n += 1;
                }
            })
        })
        .collect();
    eventually("the flood is under way", || metric(&s.metrics(), "regmirror_auth_failures_total") >= 16.0).await;
    let c = client();
    let mut slowest = std::time::Duration::ZERO;
    for _ in 0..20 {
        let started = std::time::Instant::now();
        assert_eq!(c.get(s.url("/healthz")).send().await.unwrap().status(), 200);
        let r = c.get(s.url("/v2/library/pub/manifests/latest")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
        slowest = slowest.max(started.elapsed());
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for f in flood {
        f.await.unwrap();
    }
    assert!(slowest < std::time::Duration::from_millis(500), "a health check and a cached pull took {slowest:?}");
}

#[tokio::test]
async fn foreign_credentials_on_an_anonymous_pull_cost_nothing_and_rejected_ones_are_remembered() {
    let (_hub, s) = mirror_with_cached_image().await;
    let c = client();
    let base = s.url("");
    // dockerd sends its Docker Hub login to our token endpoint with every pull.
    let started = std::time::Instant::now();
    for _ in 0..20 {
        let r = token(&c, &base, Some(("someone", "docker-hub-password")), "repository:library/pub:pull").await;
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        let t = v["token"].as_str().unwrap();
        let r = c.get(s.url("/v2/library/pub/manifests/latest")).bearer_auth(t).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(3), "slowed down: {:?}", started.elapsed());
    assert_eq!(metric(&s.metrics(), "regmirror_auth_failures_total"), 0.0);
    assert_eq!(metric(&s.metrics(), "regmirror_password_checks_total"), 0.0);

    // Where they are needed (a login), wrong credentials fail, and a repeat costs no second bcrypt.
    for n in 1..=2 {
        assert_eq!(token(&c, &base, Some(("someone", "docker-hub-password")), "").await.status(), 401);
        assert_eq!(metric(&s.metrics(), "regmirror_auth_failures_total"), n as f64);
    }
    assert_eq!(metric(&s.metrics(), "regmirror_password_checks_total"), 1.0);
}

#[tokio::test]
async fn a_token_allows_its_scope_only_and_dies_with_its_user() {
    let hub = Hub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    let toml = auth_config(dir.path(), &hub.url());
    let s = TestServer::start_in(dir, &toml).await;
    let c = client();
    let base = s.url("");
    let t = bearer(&c, &base, "alice", "alice-secret-pw", "repository:private/team-a/a:pull,push").await;
    assert_eq!(push_as(&c, &base, "private/team-a/a", Some(&t)).await, 201);
    // alice may push to team-a/b, but this token was not issued for it.
    let r = c.post(s.url("/v2/private/team-a/b/blobs/uploads/")).bearer_auth(&t).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let challenge = r.headers()["www-authenticate"].to_str().unwrap();
    assert!(challenge.contains("scope=\"repository:private/team-a/b:pull,push\""), "{challenge}");
    // A token asked for more than its user may do carries only what was granted.
    let partial = bearer(&c, &base, "alice", "alice-secret-pw", "repository:private/team-b/x:pull,push").await;
    let r = c.post(s.url("/v2/private/team-b/x/blobs/uploads/")).bearer_auth(&partial).send().await.unwrap();
    assert_eq!(r.status(), 403);

    // alice leaves: her token stops working at once.
    let text = std::fs::read_to_string(&htpasswd).unwrap();
    let kept: String = text.lines().filter(|l| !l.starts_with("alice:")).map(|l| format!("{l}\n")).collect();
    std::fs::write(&htpasswd, kept).unwrap();
    assert_eq!(push_as(&c, &base, "private/team-a/a", Some(&t)).await, 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn forwarded_headers_count_only_from_trusted_proxies() {
    let hub = Hub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let toml = format!("[server]\ntrusted_proxies = [\"127.0.0.2\"]\n{}", auth_config(dir.path(), &hub.url()));
    let s = TestServer::start_in(dir, &toml).await;
    let from = |ip: [u8; 4]| reqwest::Client::builder().local_address(std::net::IpAddr::from(ip)).build().unwrap();
    let challenge = |c: reqwest::Client| {
        let url = s.url("/v2/");
        async move {
            let r = c
                .get(url)
                .header("x-forwarded-proto", "https")
                .header("x-forwarded-host", "mirror.example")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 401);
            r.headers()["www-authenticate"].to_str().unwrap().to_string()
        }
    };
    // Anyone else's forwarded headers are ignored: the realm is where the client really is.
    let direct = challenge(from([127, 0, 0, 1])).await;
    assert!(direct.starts_with(&format!("Bearer realm=\"http://{}/auth/token\"", s.addr)), "{direct}");
    // The proxy's are believed.
    let proxied = challenge(from([127, 0, 0, 2])).await;
    assert!(proxied.starts_with("Bearer realm=\"https://mirror.example/auth/token\""), "{proxied}");

    // Behind the proxy, failed logins slow down the client that failed, not everyone behind it.
    let proxy = from([127, 0, 0, 2]);
    let login = |client: &'static str, pw: String| {
        let (proxy, url) = (proxy.clone(), s.url("/auth/token?service=regmirror"));
        async move {
            let started = std::time::Instant::now();
            let r =
                proxy.get(url).header("x-forwarded-for", client).basic_auth("alice", Some(pw)).send().await.unwrap();
            assert_eq!(r.status(), 401);
            started.elapsed()
        }
    };
    for n in 0..6 {
        login("10.1.1.1", format!("guess {n}")).await;
    }
    let guesser = login("10.1.1.1", "guess again".into()).await;
    let neighbour = login("10.1.1.2", "a typo".into()).await;
    assert!(guesser >= std::time::Duration::from_millis(400), "the guesser was not slowed down: {guesser:?}");
    assert!(neighbour < std::time::Duration::from_millis(400), "a client behind the same proxy was: {neighbour:?}");
}
