//! The status page (`GET /`) and `/api/status`: in a real browser (headless Chromium through
//! chromedriver), against the metrics; who sees what; the history surviving a restart.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::hub::Hub;
use common::*;
use fantoccini::wd::WebDriverCompatibleCommand;
use serde_json::Value;

fn mirror_config(hub: &Hub, extra: &str) -> String {
    format!(
        "[storage]\nroot = \"data\"\nmax_size = \"1GiB\"\n[[upstream]]\nname = \"docker.io\"\nurl = \"{}\"\n[cache]\nupstream_timeout = \"5s\"\n{extra}",
        hub.url()
    )
}

/// The sum of a family's series whose labels include `label` (all of them when empty), read from
/// the `/metrics` text.
fn series_sum(metrics: &str, family: &str, label: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{family}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn status_json(c: &reqwest::Client, s: &TestServer, query: &str) -> Value {
    let r = c.get(s.url(&format!("/api/status{query}"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// Poll `/api/status` (bounded) until `cond` holds; fails the test when it never does.
async fn status_until(c: &reqwest::Client, s: &TestServer, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let j = status_json(c, s, "").await;
        if cond(&j) {
            return j;
        }
        assert!(std::time::Instant::now() < deadline, "timed out waiting until {what}: {j}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Pull a mirrored image: its manifest by tag, then every blob. Returns the blob bytes.
async fn pull(c: &reqwest::Client, s: &TestServer, repo: &str, tag: &str) -> u64 {
    let accept = "application/vnd.oci.image.manifest.v1+json";
    let r = c.get(s.url(&format!("/v2/{repo}/manifests/{tag}"))).header("accept", accept).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let m: Value = r.json().await.unwrap();
    let mut digests = vec![m["config"]["digest"].as_str().unwrap().to_string()];
    digests.extend(m["layers"].as_array().unwrap().iter().map(|l| l["digest"].as_str().unwrap().to_string()));
    let mut total = 0;
    for d in digests {
        let r = c.get(s.url(&format!("/v2/{repo}/blobs/{d}"))).send().await.unwrap();
        assert_eq!(r.status(), 200);
        total += r.bytes().await.unwrap().len() as u64;
    }
    total
}

/// chromedriver on a free loopback port, killed when dropped.
struct Driver {
    child: Child,
    port: u16,
    _profile: tempfile::TempDir,
}

impl Driver {
    fn start() -> Driver {
        let port = free_port();
        let profile = tempfile::tempdir().unwrap();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver");
        Driver { child, port, _profile: profile }
    }

    /// A headless Chromium session, `javascript` on or off.
    async fn session(&self, javascript: bool, width: u32) -> fantoccini::Client {
        let profile = tempfile::tempdir_in(self._profile.path()).unwrap().keep();
        let mut prefs = serde_json::Map::new();
        if !javascript {
            prefs.insert("profile.managed_default_content_settings.javascript".into(), 2.into());
        }
        let caps = serde_json::json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--no-first-run", "--disable-extensions", "--disable-background-networking",
                         "--disable-sync", "--disable-component-update", "--disable-default-apps",
                         format!("--user-data-dir={}", profile.display()),
                         format!("--window-size={width},1600")],
                "prefs": prefs,
                // Chromium's windows are at least 500 px wide: a phone's viewport is emulated.
                "mobileEmulation": {"deviceMetrics": {"width": width, "height": 1600, "pixelRatio": 1.0}},
            },
            "goog:loggingPrefs": {"browser": "ALL"},
        });
        let caps = caps.as_object().unwrap().clone();
        let url = format!("http://127.0.0.1:{}", self.port);
        // chromedriver takes a moment to listen.
        for _ in 0..100 {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match fantoccini::ClientBuilder::new(connector).capabilities(caps.clone()).connect(&url).await {
                Ok(c) => return c,
                Err(
                    fantoccini::error::NewSessionError::NotW3C(_)
                    | fantoccini::error::NewSessionError::SessionNotCreated(_),
                ) => {
                    panic!("chromium refused the session")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        panic!("chromedriver did not answer on {url}");
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// chromedriver's browser log (console messages): `POST /session/{id}/se/log`.
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(&self, base: &reqwest::Url, session: Option<&str>) -> Result<reqwest::Url, url_parse::ParseError> {
        base.join(&format!("session/{}/se/log", session.unwrap_or_default()))
    }
    fn method_and_body(&self, _: &reqwest::Url) -> (axum::http::Method, Option<String>) {
        (axum::http::Method::POST, Some(r#"{"type":"browser"}"#.into()))
    }
}

mod url_parse {
    pub use reqwest::Url;
    pub type ParseError = <Url as std::str::FromStr>::Err;
}

async fn console_errors(b: &fantoccini::Client) -> Vec<String> {
    let log = b.issue_cmd(BrowserLog).await.expect("browser log");
    log.as_array()
        .map(|entries| {
            entries
                .iter()
                .filter(|e| e["level"] == "SEVERE" || e["level"] == "ERROR")
                .map(|e| e["message"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

async fn text_of(b: &fantoccini::Client, id: &str) -> (String, String) {
    let el = b.find(fantoccini::Locator::Id(id)).await.unwrap_or_else(|e| panic!("#{id}: {e}"));
    (el.text().await.unwrap(), el.attr("data-value").await.unwrap().unwrap_or_default())
}

/// Horizontal overflow of the page, measured by the browser (0 = none).
async fn overflow(b: &fantoccini::Client) -> f64 {
    let v = b
        .execute("return document.documentElement.scrollWidth - document.documentElement.clientWidth;", vec![])
        .await
        .unwrap();
    v.as_f64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_status_page_in_a_real_browser_agrees_with_the_metrics_and_the_json() {
    if !require("chromedriver") || !require("chromium") {
        return;
    }
    let hub = Hub::start().await;
    let (_, _, _) = hub_image(&hub, "app", "1", blob_of(300_000, 1));
    let (big, _, _) = hub_image(&hub, "big", "1", blob_of(6 << 20, 2));
    let s = TestServer::start(&mirror_config(&hub, "[private]\nnamespaces = [\"private\"]\n")).await;
    let c = client();

    // Known traffic: one cold pull, two warm ones, a private push.
    let first = pull(&c, &s, "library/app", "1").await;
    pull(&c, &s, "library/app", "1").await;
    pull(&c, &s, "library/app", "1").await;
    push_image(&c, &s.url(""), "private/team-app", "v1", "team").await;

    // A fill in progress: the CDN sends a third of the big blob, then waits.
    let third = (6u64 << 20) / 3;
    hub.state.gate.send_replace(third);
    let r = c.get(s.url(&format!("/v2/library/big/blobs/{big}"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let fills = &s.state.cache.fills;
    eventually("the fill has received its third", || fills.list().first().is_some_and(|f| f.received >= third - 65536))
        .await;

    // A forced failure: the upstream rate-limits the next manifest request.
    hub.state.rate_limited.store(true, Ordering::SeqCst);
    let r = c.get(s.url("/v2/library/other/manifests/1")).send().await.unwrap();
    assert!(r.status().is_server_error() || r.status() == 429, "{}", r.status());

    // The repository summary is rebuilt in the background after changes.
    for _ in 0..200 {
        let j = status_json(&c, &s, "").await;
        if j["repositories"]["total"] == 2
            && j["repositories"]["items"].as_array().unwrap().iter().all(|r| r["size_bytes"].as_u64() > Some(0))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let driver = Driver::start();
    let b = driver.session(true, 1280).await;
    b.goto(&s.url("/")).await.unwrap();
    let metrics = s.metrics();
    let json = status_json(&c, &s, "").await;

    // Savings: the page, the JSON and /metrics read the same counters.
    let served = metric(&metrics, "regmirror_served_bytes_total{source=\"cache\"}")
        + metric(&metrics, "regmirror_served_bytes_total{source=\"fill\"}");
    let (_, served_on_page) = text_of(&b, "served-bytes").await;
    assert!(served_on_page.parse::<f64>().unwrap() <= served, "page {served_on_page} vs metrics {served}");
    assert!(served_on_page.parse::<f64>().unwrap() >= (3 * first) as f64, "three pulls of {first} bytes at least");
    let hits: f64 = ["hit", "revalidated", "stale"]
        .iter()
        .map(|o| series_sum(&metrics, "regmirror_cache_requests_total", &format!("outcome=\"{o}\"")))
        .sum();
    let lookups = series_sum(&metrics, "regmirror_cache_requests_total", "");
    let (ratio_text, ratio) = text_of(&b, "hit-ratio").await;
    assert!((ratio.parse::<f64>().unwrap() - hits / lookups).abs() < 1e-3, "page {ratio} vs metrics {hits}/{lookups}");
    assert!(ratio_text.ends_with('%'), "{ratio_text}");
    assert!((json["savings"]["hit_ratio"].as_f64().unwrap() - hits / lookups).abs() < 1e-3);
    assert!(hits >= 6.0, "two warm pulls of a manifest and two blobs: {hits}");

    // Store figures.
    let store_bytes = metric(&s.metrics(), "regmirror_store_bytes");
    let (_, page_bytes) = text_of(&b, "store-bytes").await;
    assert_eq!(page_bytes.parse::<f64>().unwrap(), store_bytes);
    assert_eq!(json["store"]["bytes"].as_f64().unwrap(), store_bytes);
    let (_, blobs) = text_of(&b, "store-blobs").await;
    assert_eq!(blobs.parse::<f64>().unwrap(), metric(&s.metrics(), "regmirror_store_objects"));
    let (_, repos) = text_of(&b, "store-repositories").await;
    // library/app and private/team-app; library/big only once its fill has delivered.
    assert_eq!(repos, "2");

    // The fill: its progress and its client.
    let row = b.find(fantoccini::Locator::Css("tr.fill")).await.expect("a fill row");
    assert_eq!(row.attr("data-digest").await.unwrap().as_deref(), Some(big.as_str()));
    let received: u64 = row.attr("data-received").await.unwrap().unwrap().parse().unwrap();
    assert!(received >= third - 65536 && received <= third, "{received} of a third {third}");
    assert_eq!(row.attr("data-total").await.unwrap().as_deref(), Some((6u64 << 20).to_string().as_str()));
    assert_eq!(row.attr("data-clients").await.unwrap().as_deref(), Some("1"));
    assert_eq!(json["fills"][0]["digest"], big.as_str());
    assert_eq!(json["fills"][0]["clients"], 1);
    // A lone replica lists no replicas.
    assert!(json["replicas"].is_null());

    // The upstream after the forced failure, and the allowance it announced.
    let state = b.find(fantoccini::Locator::Css("tr[data-upstream=\"docker.io\"] td[data-state]")).await.unwrap();
    assert_eq!(state.attr("data-state").await.unwrap().as_deref(), Some("rate-limited"));
    assert!(state.text().await.unwrap().starts_with("rate-limited until in "), "{}", state.text().await.unwrap());
    assert_eq!(json["upstreams"][0]["state"], "rate-limited");
    // Retry-After: 42 from the moment of the 429.
    let until = json["upstreams"][0]["until"].as_u64().unwrap();
    let now = json["generated_at"].as_u64().unwrap();
    assert!(until > now && until <= now + 42, "until {until}, now {now}");
    assert_eq!(json["upstreams"][0]["ratelimit_limit"], 100, "from the ratelimit-limit header");
    assert_eq!(json["upstreams"][0]["ratelimit_window_seconds"], 21600);
    let remaining = b.find(fantoccini::Locator::Css("tr[data-upstream=\"docker.io\"] [data-remaining]")).await.unwrap();
    assert_eq!(remaining.attr("data-remaining").await.unwrap(), Some("0".into()), "a 429 leaves no allowance");
    let requests = series_sum(&metrics, "regmirror_upstream_requests_total", "upstream=\"docker.io\"");
    assert_eq!(json["upstreams"][0]["requests"].as_f64().unwrap(), requests);

    // Repositories: searchable, sortable, paged.
    b.goto(&s.url("/?q=team")).await.unwrap();
    let names = b.find_all(fantoccini::Locator::Css("tr.repository")).await.unwrap();
    assert_eq!(names.len(), 1);
    assert_eq!(names[0].attr("data-name").await.unwrap().as_deref(), Some("private/team-app"));
    b.goto(&s.url("/?sort=size&desc=1&per_page=2")).await.unwrap();
    let rows = b.find_all(fantoccini::Locator::Css("tr.repository")).await.unwrap();
    assert_eq!(rows.len(), 2);
    let first_size: u64 = rows[0].attr("data-size").await.unwrap().unwrap().parse().unwrap();
    let second_size: u64 = rows[1].attr("data-size").await.unwrap().unwrap().parse().unwrap();
    assert!(first_size >= second_size);
    assert!(b.find(fantoccini::Locator::Css("a[rel=next]")).await.is_err(), "2 repositories fit on a page of 2");
    b.goto(&s.url("/?sort=name&per_page=1")).await.unwrap();
    assert!(b.find(fantoccini::Locator::Css("a[rel=next]")).await.is_ok(), "2 repositories, 1 per page");

    // A screenshot of the whole page, as an artifact.
    b.goto(&s.url("/")).await.unwrap();
    let png = b.screenshot().await.unwrap();
    let artifacts = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    std::fs::write(artifacts.join("status-page.png"), &png).unwrap();
    assert!(png.starts_with(b"\x89PNG"));
    let errors = console_errors(&b).await;
    assert!(errors.is_empty(), "console errors: {errors:?}");
    let scripted = b.execute("return document.documentElement.getAttribute('data-refreshing');", vec![]).await.unwrap();
    assert_eq!(scripted, "on", "the refresh script ran");
    b.close().await.unwrap();

    // Without JavaScript it reads fully, and at 390 px nothing overflows sideways.
    let b = driver.session(false, 390).await;
    b.goto(&s.url("/")).await.unwrap();
    let scripted = b.execute("return document.documentElement.getAttribute('data-refreshing');", vec![]).await.unwrap();
    assert_eq!(scripted, Value::Null, "JavaScript is off: the page's script did not run");
    for id in ["served-bytes", "hit-ratio", "store-bytes", "store-blobs", "repository-count", "client-setup"] {
        let (text, _) = text_of(&b, id).await;
        assert!(!text.trim().is_empty(), "#{id} is empty without JavaScript");
    }
    assert!(b.find(fantoccini::Locator::Css("tr.fill")).await.is_ok());
    let viewport = b.execute("return window.innerWidth;", vec![]).await.unwrap();
    assert_eq!(viewport.as_f64(), Some(390.0), "the viewport is a phone's");
    assert_eq!(overflow(&b).await, 0.0, "horizontal overflow at 390 px");
    let png = b.screenshot().await.unwrap();
    std::fs::write(artifacts.join("status-page-390px.png"), &png).unwrap();
    let errors = console_errors(&b).await;
    assert!(errors.is_empty(), "console errors without JavaScript: {errors:?}");
    b.close().await.unwrap();

    // Let the fill finish; the page then shows none.
    hub.state.gate.send_replace(u64::MAX);
    hub.state.rate_limited.store(false, Ordering::SeqCst);
    eventually("the fill is done", || fills.in_flight() == 0).await;
    assert!(status_json(&c, &s, "").await["fills"].as_array().unwrap().is_empty());
}

fn auth_config(hub: &Hub, dir: &std::path::Path) -> String {
    let htpasswd = dir.join("htpasswd");
    regmirror::auth::set_password(&htpasswd, "alice", "alice-secret-pw").unwrap();
    mirror_config(
        hub,
        &format!(
            "[private]\nnamespaces = [\"private\"]\n[auth]\nhtpasswd = \"{}\"\nanonymous = \"pull-mirror\"\n[[auth.grant]]\nusers = [\"alice\"]\nrepositories = [\"private/*\"]\naccess = \"push\"\n",
            htpasswd.display()
        ),
    )
}

fn basic_client(user: &str, password: &str) -> reqwest::Client {
    use base64::Engine;
    let mut h = reqwest::header::HeaderMap::new();
    let v = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    h.insert("authorization", format!("Basic {v}").parse().unwrap());
    reqwest::Client::builder().default_headers(h).build().unwrap()
}

#[tokio::test]
async fn anonymous_visitors_never_see_private_repository_names() {
    let hub = Hub::start().await;
    hub_image(&hub, "app", "1", blob_of(1000, 3));
    let dir = tempfile::tempdir().unwrap();
    let toml = auth_config(&hub, dir.path());
    let s = TestServer::start_in(dir, &toml).await;
    let alice = basic_client("alice", "alice-secret-pw");
    push_image(&alice, &s.url(""), "private/secret-project-x", "v1", "x").await;
    let anon = client();
    pull(&anon, &s, "library/app", "1").await;

    // The logged-in user sees both, once the summary caught up.
    let seen = status_until(&alice, &s, "alice sees both repositories", |j| j["repositories"]["total"] == 2).await;
    assert_eq!(seen["user"], "alice");
    let names: Vec<&str> =
        seen["repositories"]["items"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["docker.io/library/app", "private/secret-project-x"]);
    let page = alice.get(s.url("/")).send().await.unwrap().text().await.unwrap();
    assert!(page.contains("private/secret-project-x"));

    // Anonymous: not in the HTML, not in the JSON, not through a search.
    for path in ["/", "/?q=secret", "/?sort=size&desc=1", "/api/status", "/api/status?q=secret"] {
        let r = anon.get(s.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let body = r.text().await.unwrap();
        assert!(!body.contains("secret-project"), "{path} shows a private name to an anonymous visitor");
    }
    let j = status_json(&anon, &s, "").await;
    assert_eq!(j["user"], Value::Null);
    assert_eq!(j["repositories"]["total"], 1);
    assert_eq!(j["store"]["repositories"], 1);

    // Logging in from a browser: Basic challenge; wrong passwords get it again.
    let r = anon.get(s.url("/?login=1")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers()["www-authenticate"].to_str().unwrap().starts_with("Basic realm="));
    for path in ["/api/status", "/"] {
        let r = basic_client("alice", "wrong").get(s.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
        assert!(!r.text().await.unwrap().contains("secret-project"));
    }
    let r = alice.get(s.url("/?login=1")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let page = r.text().await.unwrap();
    assert!(page.contains("signed in as <b id=\"user\">alice</b>") && page.contains("private/secret-project-x"));

    // One of regmirror's bearer tokens works as well as the password.
    let r = alice
        .get(s.url("/auth/token?service=regmirror&scope=repository:private/secret-project-x:pull"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let token = r.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_string();
    let j: Value = anon.get(s.url("/api/status")).bearer_auth(&token).send().await.unwrap().json().await.unwrap();
    assert_eq!(j["user"], "alice");
    assert_eq!(j["repositories"]["total"], 2);
}

#[tokio::test]
async fn what_visitors_send_is_escaped_and_the_page_is_locked_down() {
    let hub = Hub::start().await;
    let s = TestServer::start(&mirror_config(&hub, "")).await;
    let c = client();
    let r = c
        .get(s.url("/?q=%3Cscript%3Ealert(1)%3C%2Fscript%3E%22%27&sort=%3Cx%3E&desc=%22"))
        .header("host", "evil\"><script>x</script>")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let h = r.headers().clone();
    let page = r.text().await.unwrap();
    assert!(!page.contains("<script>alert"), "the search is echoed escaped");
    assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#39;"));
    assert!(!page.contains("evil\""), "an implausible Host is not echoed");
    assert_eq!(page.matches("<script>").count(), 1, "only the page's own script");
    let csp = h["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'sha256-"), "{csp}");
    assert!(!csp.contains("unsafe-eval") && !csp.contains("script-src 'unsafe-inline'"), "{csp}");
    assert_eq!(h["cache-control"], "no-store");
    assert_eq!(h["vary"], "Authorization");
    assert_eq!(h["x-frame-options"], "DENY");
    // The script the policy allows is the script the page carries.
    use base64::Engine;
    use sha2::Digest as _;
    let script = page.split("<script>").nth(1).unwrap().split("</script>").next().unwrap();
    let hash = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(script.as_bytes()));
    assert!(csp.contains(&format!("'sha256-{hash}'")), "{csp}");
}

#[tokio::test]
async fn the_page_and_json_can_be_turned_off() {
    let hub = Hub::start().await;
    let s = TestServer::start(&mirror_config(&hub, "[ui]\nenabled = false\n")).await;
    let c = client();
    for path in ["/", "/api/status"] {
        assert_eq!(c.get(s.url(path)).send().await.unwrap().status(), 404, "{path}");
    }
    assert_eq!(c.get(s.url("/v2/")).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn hourly_savings_survive_a_restart() {
    let hub = Hub::start().await;
    hub_image(&hub, "app", "1", blob_of(200_000, 4));
    let toml = mirror_config(&hub, "");
    let s = TestServer::start(&toml).await;
    let c = client();
    let bytes = pull(&c, &s, "library/app", "1").await;
    let before = status_until(&c, &s, "the pulled repository is summarised", |j| j["repositories"]["total"] == 1).await;
    let hour = before["savings"]["history"].as_array().unwrap().last().unwrap().clone();
    assert!(hour["served_bytes"].as_u64().unwrap() >= bytes);
    assert!(before["repositories"]["items"][0]["last_pull"].is_u64());
    // More traffic after the last sample: the shutdown keeps it too.
    pull(&c, &s, "library/app", "1").await;
    let dir = s.stop().await;

    let s = TestServer::start_in(dir, &toml).await;
    let after = status_json(&c, &s, "").await;
    // Counters restart at zero; the hour's bucket kept what the last run saw.
    assert_eq!(after["savings"]["served_bytes"], 0);
    let kept = after["savings"]["history"].as_array().unwrap().iter().find(|b| b["hour"] == hour["hour"]).cloned();
    let kept = kept.expect("the hour of the pulls is still among the last 24");
    // Both pulls: the second one reached the store only at shutdown.
    assert_eq!(kept["served_bytes"].as_u64().unwrap(), 2 * bytes, "{kept}");
    assert_eq!(kept["upstream_bytes"], hour["upstream_bytes"]);
    let j = status_until(&c, &s, "the summary after the restart", |j| j["repositories"]["total"] == 1).await;
    assert!(j["repositories"]["items"][0]["last_pull"].is_u64(), "the last pull time survives the restart");
}
