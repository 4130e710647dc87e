//! The status page's HTML: rendered on the server, complete without JavaScript, no external
//! assets (inline CSS and SVG). A short script refreshes the live sections in place.

use std::fmt::Write as _;
use std::sync::OnceLock;

use super::{Bucket, Status, UpstreamStatus};

/// Refresh the sections marked `data-live` every 5 s from the same URL, while the tab is visible.
const SCRIPT: &str = r#"(function () {
  document.documentElement.setAttribute("data-refreshing", "on");
  function refresh() {
    if (document.visibilityState !== "visible") return;
    fetch(location.href, { credentials: "same-origin", cache: "no-store" })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (!html) return;
        var next = new DOMParser().parseFromString(html, "text/html");
        document.querySelectorAll("[data-live]").forEach(function (el) {
          var fresh = next.getElementById(el.id);
          if (fresh) el.replaceWith(fresh);
        });
      })
      .catch(function () {});
  }
  setInterval(refresh, 5000);
})();"#;

const STYLE: &str = r#"
:root { color-scheme: light dark; --fg: #1d2330; --muted: #5b6475; --bg: #f6f7f9; --card: #fff;
  --line: #dde1e7; --accent: #2563eb; --good: #15803d; --warn: #b45309; --bad: #b91c1c; --up: #94a3b8; }
@media (prefers-color-scheme: dark) { :root { --fg: #e5e9f0; --muted: #9aa4b5; --bg: #14171c;
  --card: #1c2027; --line: #2e343e; --accent: #60a5fa; --up: #64748b; } }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  color: var(--fg); background: var(--bg); }
header { padding: 16px 20px; border-bottom: 1px solid var(--line); background: var(--card);
  display: flex; flex-wrap: wrap; gap: 8px 20px; align-items: baseline; }
header h1 { font-size: 20px; margin: 0; }
header .who { margin-left: auto; color: var(--muted); }
main { max-width: 1200px; margin: 0 auto; padding: 16px; display: grid; gap: 16px;
  grid-template-columns: repeat(auto-fit, minmax(min(100%, 420px), 1fr)); }
section { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 14px 16px;
  min-width: 0; }
section.wide { grid-column: 1 / -1; }
h2 { font-size: 16px; margin: 0 0 10px; }
.figures { display: flex; flex-wrap: wrap; gap: 10px 24px; margin-bottom: 10px; }
.figure b { display: block; font-size: 22px; font-variant-numeric: tabular-nums; }
.figure span { color: var(--muted); font-size: 13px; }
.muted { color: var(--muted); }
.bar { height: 12px; border-radius: 6px; background: var(--line); overflow: hidden; }
.bar > div { height: 100%; background: var(--accent); }
.bar.full > div { background: var(--bad); }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: 14px; }
th, td { text-align: left; padding: 6px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
th a { color: inherit; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
code, pre { font: 13px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.digest { word-break: break-all; }
.state-ok { color: var(--good); } .state-rate-limited { color: var(--warn); }
.state-failing { color: var(--bad); } .state-unknown { color: var(--muted); }
pre { white-space: pre-wrap; overflow-wrap: anywhere; background: var(--bg); padding: 10px;
  border-radius: 6px; border: 1px solid var(--line); max-height: 420px; overflow-y: auto; }
form { display: flex; flex-wrap: wrap; gap: 8px; margin-bottom: 10px; }
input[type=search] { flex: 1 1 200px; min-width: 0; padding: 6px 8px; border: 1px solid var(--line);
  border-radius: 6px; background: var(--bg); color: var(--fg); font: inherit; }
button { padding: 6px 12px; border-radius: 6px; border: 1px solid var(--line); background: var(--bg);
  color: var(--fg); font: inherit; }
nav.pages { display: flex; flex-wrap: wrap; gap: 12px; margin-top: 10px; align-items: center; }
svg { display: block; width: 100%; height: auto; }
.legend { display: flex; gap: 16px; font-size: 13px; color: var(--muted); }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 4px; }
a { color: var(--accent); }
"#;

/// The `Content-Security-Policy` of the page: nothing from elsewhere, and only our own script.
pub fn content_security_policy() -> String {
    static CSP: OnceLock<String> = OnceLock::new();
    CSP.get_or_init(|| {
        use base64::Engine;
        use sha2::Digest as _;
        let hash = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(SCRIPT.as_bytes()));
        format!(
            "default-src 'none'; style-src 'unsafe-inline'; script-src 'sha256-{hash}'; connect-src 'self'; \
             img-src 'self' data:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
        )
    })
    .clone()
}

/// Escape text for HTML content and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encode a query parameter value.
fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn utc(t: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t as i64)
        .ok()
        .and_then(|d| d.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

/// "3 min ago" / "in 2 h", with the exact UTC time as a tooltip.
fn when(t: u64, now: u64) -> String {
    let (d, future) = if t > now { (t - now, true) } else { (now - t, false) };
    let span = match d {
        0..=59 => format!("{d} s"),
        60..=3599 => format!("{} min", d / 60),
        3600..=172_799 => format!("{} h", d / 3600),
        _ => format!("{} d", d / 86_400),
    };
    let text = if future { format!("in {span}") } else { format!("{span} ago") };
    format!("<time datetime=\"{}\" title=\"{}\">{text}</time>", utc(t), utc(t))
}

fn figure(out: &mut String, id: &str, value: &str, raw: impl std::fmt::Display, label: &str) {
    let _ = write!(
        out,
        "<div class=\"figure\"><b id=\"{id}\" data-value=\"{raw}\">{}</b><span>{}</span></div>",
        esc(value),
        esc(label)
    );
}

/// The page; `login`: offer a "log in" link to anonymous visitors.
pub fn render(s: &Status, login: bool) -> String {
    let mut out = String::with_capacity(32 * 1024);
    out.push_str("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">");
    out.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">");
    // An icon of its own, so the browser does not ask for /favicon.ico.
    out.push_str("<link rel=\"icon\" href=\"data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 16 16'%3E%3Crect width='16' height='16' rx='3' fill='%232563eb'/%3E%3C/svg%3E\">");
    let _ = write!(out, "<title>regmirror {}</title><style>{STYLE}</style></head><body>", esc(s.version));
    let _ = write!(
        out,
        "<header><h1>regmirror</h1><span class=\"muted\">version {} · up {} · as of {}</span>",
        esc(s.version),
        uptime(s.uptime_seconds),
        when(s.generated_at, s.generated_at)
    );
    match (&s.user, login) {
        (Some(u), _) => {
            let _ = write!(out, "<span class=\"who\">signed in as <b id=\"user\">{}</b></span>", esc(u));
        }
        (None, true) => out.push_str(
            "<span class=\"who\">anonymous view · <a href=\"/?login=1\">log in</a> to see private repositories</span>",
        ),
        (None, false) => {}
    }
    out.push_str("</header><main>");
    savings(&mut out, s);
    store(&mut out, s);
    upstreams(&mut out, s);
    fills(&mut out, s);
    replicas(&mut out, s);
    repositories(&mut out, s);
    client(&mut out, s);
    let _ = write!(out, "</main><script>{SCRIPT}</script></body></html>");
    out
}

fn uptime(secs: u64) -> String {
    match secs {
        0..=119 => format!("{secs} s"),
        120..=7199 => format!("{} min", secs / 60),
        7200..=172_799 => format!("{} h", secs / 3600),
        _ => format!("{} d", secs / 86_400),
    }
}

fn savings(out: &mut String, s: &Status) {
    let v = &s.savings;
    out.push_str("<section id=\"savings\" data-live><h2>Savings since start</h2><div class=\"figures\">");
    figure(out, "served-bytes", &bytes(v.served_bytes), v.served_bytes, "served to clients");
    figure(out, "upstream-bytes", &bytes(v.upstream_bytes), v.upstream_bytes, "fetched upstream");
    figure(out, "hit-ratio", &format!("{:.1} %", v.hit_ratio * 100.0), format!("{:.4}", v.hit_ratio), "hit ratio");
    figure(
        out,
        "requests-avoided",
        &count(v.upstream_requests_avoided),
        v.upstream_requests_avoided,
        "upstream requests avoided",
    );
    figure(
        out,
        "manifest-requests-avoided",
        &count(v.manifest_requests_avoided),
        v.manifest_requests_avoided,
        "of them for manifests",
    );
    out.push_str("</div>");
    let _ = write!(
        out,
        "<p class=\"muted\">{} of {} lookups answered from the store; {} saved on the upstream link.</p>",
        count(v.answered_from_store),
        count(v.lookups),
        bytes(v.served_bytes.saturating_sub(v.upstream_bytes))
    );
    chart(out, &v.history);
    out.push_str("</section>");
}

/// Served against fetched bytes, one pair of bars per hour.
fn chart(out: &mut String, history: &[Bucket]) {
    let max = history.iter().map(|b| b.served_bytes.max(b.upstream_bytes)).max().unwrap_or(0).max(1) as f64;
    let (w, h, bar) = (24.0 * 14.0, 90.0, 6.0);
    let _ = write!(
        out,
        "<svg viewBox=\"0 0 {w} {}\" role=\"img\" aria-label=\"bytes served and fetched per hour, last 24 hours\">",
        h + 14.0
    );
    for (i, b) in history.iter().enumerate() {
        let x = i as f64 * 14.0 + 1.0;
        for (j, (value, color)) in
            [(b.served_bytes, "var(--accent)"), (b.upstream_bytes, "var(--up)")].iter().enumerate()
        {
            let bh = (*value as f64 / max * h).max(if *value > 0 { 1.0 } else { 0.0 });
            let _ = write!(
                out,
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{bar}\" height=\"{bh:.1}\" fill=\"{color}\"><title>{} {}: {}</title></rect>",
                x + j as f64 * bar,
                h - bh,
                utc(b.hour),
                if j == 0 { "served" } else { "fetched" },
                bytes(*value)
            );
        }
        if i % 6 == 0 {
            let _ = write!(
                out,
                "<text x=\"{x:.1}\" y=\"{}\" font-size=\"9\" fill=\"currentColor\">{}</text>",
                h + 12.0,
                &utc(b.hour).get(11..16).unwrap_or("")
            );
        }
    }
    out.push_str("</svg><div class=\"legend\"><span><i class=\"swatch\" style=\"background:var(--accent)\"></i>served</span><span><i class=\"swatch\" style=\"background:var(--up)\"></i>fetched upstream</span><span>per hour, UTC, last 24 h</span></div>");
}

fn store(out: &mut String, s: &Status) {
    let st = &s.store;
    out.push_str("<section id=\"store\" data-live><h2>Store</h2><div class=\"figures\">");
    figure(out, "store-bytes", &bytes(st.bytes), st.bytes, "stored");
    figure(out, "store-blobs", &count(st.blobs), st.blobs, "blobs");
    figure(out, "store-repositories", &count(st.repositories as u64), st.repositories, "repositories");
    figure(out, "pinned-bytes", &bytes(st.pinned_bytes), st.pinned_bytes, "pinned");
    out.push_str("</div>");
    match st.max_bytes {
        Some(max) if max > 0 => {
            let pct = (st.bytes as f64 / max as f64 * 100.0).min(100.0);
            let _ = write!(
                out,
                "<div class=\"bar{}\" title=\"{pct:.1} %\"><div style=\"width:{pct:.1}%\"></div></div><p class=\"muted\">{} of {} (storage.max_size)</p>",
                if pct >= 95.0 { " full" } else { "" },
                bytes(st.bytes),
                bytes(max)
            );
        }
        _ => out.push_str("<p class=\"muted\">No storage.max_size: the store grows until the disk is full.</p>"),
    }
    match &st.last_eviction {
        Some(e) => {
            let _ = write!(
                out,
                "<p>Last eviction {}: {} blobs, {}.</p>",
                when(e.at, s.generated_at),
                count(e.blobs),
                bytes(e.bytes)
            );
        }
        None => out.push_str("<p class=\"muted\">No eviction since start.</p>"),
    }
    match &st.last_gc {
        Some(g) => {
            let at = if g.at > 0 { when(g.at, s.generated_at) } else { "(time not recorded)".into() };
            let _ = write!(out, "<p>Last gc {at}; {} runs freed {}.</p>", count(g.runs), bytes(g.freed_bytes));
        }
        None => out.push_str("<p class=\"muted\">regmirror gc has never run on this store.</p>"),
    }
    out.push_str("</section>");
}

fn upstream_state(u: &UpstreamStatus, now: u64) -> String {
    match u.state {
        "rate-limited" => format!("rate-limited until {}", u.until.map(|t| when(t, now)).unwrap_or_default()),
        "failing" => format!("failing since {}", u.since.map(|t| when(t, now)).unwrap_or_default()),
        other => other.to_string(),
    }
}

fn upstreams(out: &mut String, s: &Status) {
    out.push_str("<section id=\"upstreams\" data-live class=\"wide\"><h2>Upstreams</h2><div class=\"scroll\"><table><thead><tr><th>Name</th><th>State</th><th class=\"num\">Requests</th><th class=\"num\">Errors</th><th>Rate limit</th><th>Last error</th></tr></thead><tbody>");
    for u in &s.upstreams {
        let ratelimit = match (u.ratelimit_remaining, u.ratelimit_limit) {
            (Some(r), Some(l)) => {
                let window = u.ratelimit_window_seconds.map(|w| format!(" per {}", uptime(w))).unwrap_or_default();
                format!("<span data-remaining=\"{r}\" data-limit=\"{l}\">{r} of {l} left{window}</span>")
            }
            (Some(r), None) => format!("<span data-remaining=\"{r}\">{r} left</span>"),
            _ => "<span class=\"muted\">not announced</span>".into(),
        };
        let error = match (&u.last_error, u.last_error_at) {
            (Some(e), Some(at)) => format!("{}<br><span class=\"muted\">{}</span>", esc(e), when(at, s.generated_at)),
            _ => "<span class=\"muted\">none</span>".into(),
        };
        let _ = write!(
            out,
            "<tr data-upstream=\"{name}\"><td><b>{name}</b><br><span class=\"muted\">{url}</span></td><td class=\"state-{state}\" data-state=\"{state}\">{label}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{ratelimit}</td><td>{error}</td></tr>",
            count(u.requests),
            count(u.errors),
            name = esc(&u.name),
            url = esc(&u.url),
            state = u.state,
            label = upstream_state(u, s.generated_at),
        );
    }
    out.push_str("</tbody></table></div></section>");
}

fn fills(out: &mut String, s: &Status) {
    out.push_str("<section id=\"fills\" data-live class=\"wide\"><h2>Fills in progress</h2>");
    if s.fills.is_empty() {
        out.push_str(
            "<p class=\"muted\" id=\"no-fills\">Nothing is being fetched from an upstream right now.</p></section>",
        );
        return;
    }
    out.push_str("<div class=\"scroll\"><table><thead><tr><th>Repository and blob</th><th>Progress</th><th class=\"num\">Speed</th><th class=\"num\">Clients</th></tr></thead><tbody>");
    for f in &s.fills {
        let (pct, of) = match f.total {
            Some(t) if t > 0 => ((f.received as f64 / t as f64 * 100.0).min(100.0), bytes(t)),
            _ => (0.0, "?".into()),
        };
        let _ = write!(
            out,
            "<tr class=\"fill\" data-digest=\"{digest}\" data-received=\"{}\" data-total=\"{}\" data-clients=\"{}\"><td><b>{}</b> <span class=\"muted\">({})</span><br><code class=\"digest\">{digest}</code></td><td><div class=\"bar\"><div style=\"width:{pct:.1}%\"></div></div>{} of {of} ({pct:.0} %)</td><td class=\"num\">{}/s</td><td class=\"num\">{}</td></tr>",
            f.received,
            f.total.map(|t| t.to_string()).unwrap_or_default(),
            f.clients,
            esc(&f.repository),
            esc(&f.upstream),
            bytes(f.received),
            bytes(f.bytes_per_second),
            f.clients,
            digest = esc(&f.digest),
        );
    }
    out.push_str("</tbody></table></div></section>");
}

/// Only where there are replicas (`[cluster]`).
fn replicas(out: &mut String, s: &Status) {
    let Some(replicas) = &s.replicas else { return };
    out.push_str("<section id=\"replicas\" data-live class=\"wide\"><h2>Replicas on the bucket</h2><div class=\"scroll\"><table><thead><tr><th>Replica</th><th>State</th><th>Version</th><th>Started</th></tr></thead><tbody>");
    for r in replicas {
        let (state, label) = match (r.this, r.up) {
            (true, _) => ("ok", "this replica".to_string()),
            (false, true) => ("ok", format!("up · seen {} s ago", r.last_seen_seconds)),
            (false, false) => ("failing", format!("gone · last seen {} ago", uptime(r.last_seen_seconds))),
        };
        let address = r.advertise.as_deref().map(|a| format!("<br><span class=\"muted\">{}</span>", esc(a)));
        let _ = write!(
            out,
            "<tr data-replica=\"{node}\" data-up=\"{up}\"><td><code>{node}</code>{address}</td><td class=\"state-{state}\">{label}</td><td>{version}</td><td>{started}</td></tr>",
            node = esc(&r.node),
            up = r.up,
            address = address.unwrap_or_default(),
            version = esc(&r.version),
            started = when(r.started_at, s.generated_at),
        );
    }
    out.push_str("</tbody></table></div></section>");
}

fn repositories(out: &mut String, s: &Status) {
    let r = &s.repositories;
    let link = |sort: &str, desc: bool, page: usize| {
        let mut q = format!("/?sort={sort}&desc={}", if desc { 1 } else { 0 });
        if !r.query.is_empty() {
            q.push_str("&q=");
            q.push_str(&enc(&r.query));
        }
        if page > 1 {
            let _ = write!(q, "&page={page}");
        }
        if r.per_page != super::PER_PAGE {
            let _ = write!(q, "&per_page={}", r.per_page);
        }
        esc(&q)
    };
    let header = |key: &str, label: &str, class: &str| {
        let active = r.sort == key;
        let desc = if active { !r.descending } else { key != "name" };
        let arrow = if active {
            if r.descending {
                " ↓"
            } else {
                " ↑"
            }
        } else {
            ""
        };
        format!("<th{class}><a href=\"{}\">{label}{arrow}</a></th>", link(key, desc, 1))
    };
    let _ = write!(
        out,
        "<section id=\"repositories\" class=\"wide\"><h2>Repositories</h2><form method=\"get\" action=\"/\" role=\"search\"><input type=\"search\" name=\"q\" value=\"{}\" placeholder=\"Search repositories\" aria-label=\"Search repositories\"><input type=\"hidden\" name=\"sort\" value=\"{}\"><input type=\"hidden\" name=\"desc\" value=\"{}\"><button type=\"submit\">Search</button></form>",
        esc(&r.query),
        r.sort,
        if r.descending { 1 } else { 0 }
    );
    if r.items.is_empty() {
        out.push_str("<p class=\"muted\" id=\"no-repositories\">No repositories to show.</p>");
    } else {
        let _ = write!(
            out,
            "<div class=\"scroll\"><table id=\"repository-table\"><thead><tr>{}<th>Kind</th>{}<th class=\"num\">Blobs</th>{}<th>Pinned</th></tr></thead><tbody>",
            header("name", "Name", ""),
            header("size", "Size", " class=\"num\""),
            header("pulled", "Last pull", "")
        );
        for item in &r.items {
            let _ = write!(
                out,
                "<tr class=\"repository\" data-name=\"{name}\" data-size=\"{size}\"><td>{name}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td><td>{}</td></tr>",
                item.kind,
                bytes(item.size_bytes),
                item.blobs,
                item.last_pull.map(|t| when(t, s.generated_at)).unwrap_or_else(|| "<span class=\"muted\">not recorded</span>".into()),
                if item.pinned { "pinned" } else { "" },
                name = esc(&item.name),
                size = item.size_bytes,
            );
        }
        out.push_str("</tbody></table></div>");
    }
    let pages = r.total.div_ceil(r.per_page).max(1);
    let _ = write!(
        out,
        "<nav class=\"pages\"><span id=\"repository-count\" data-value=\"{}\">{} repositories{}</span>",
        r.total,
        count(r.total as u64),
        if r.query.is_empty() { String::new() } else { format!(" matching “{}”", esc(&r.query)) }
    );
    if r.page > 1 {
        let _ = write!(out, "<a href=\"{}\" rel=\"prev\">← previous</a>", link(r.sort, r.descending, r.page - 1));
    }
    let _ = write!(out, "<span>page {} of {pages}</span>", r.page);
    if r.page < pages {
        let _ = write!(out, "<a href=\"{}\" rel=\"next\">next →</a>", link(r.sort, r.descending, r.page + 1));
    }
    let _ = write!(
        out,
        "<span class=\"muted\">sizes as of {}</span></nav></section>",
        if r.as_of == 0 { "(summarising…)".to_string() } else { when(r.as_of, s.generated_at) }
    );
}

fn client(out: &mut String, s: &Status) {
    let c = &s.client;
    out.push_str("<section id=\"connect\" class=\"wide\"><h2>Connect a client</h2>");
    if let Some(url) = &c.ca_url {
        let _ = write!(out, "<p><a href=\"{}\" download=\"ca.crt\">Download the CA certificate</a>", esc(url));
        if let Some(fp) = &c.ca_sha256 {
            let _ =
                write!(out, " · SHA-256 fingerprint <code class=\"digest\" id=\"ca-fingerprint\">{}</code>", esc(fp));
        }
        out.push_str("</p>");
    }
    let _ = write!(out, "<pre id=\"client-setup\">{}</pre></section>", esc(&c.setup));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_for_html() {
        assert_eq!(esc("<a href=\"x\">'&'</a>"), "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;");
    }

    #[test]
    fn figures_read_as_people_write_them() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
        assert_eq!(count(1234567), "1,234,567");
        assert_eq!(count(12), "12");
    }
}
