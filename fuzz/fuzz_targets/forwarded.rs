//! Headers a client or a reverse proxy controls that decide who is asking and where the token
//! realm is: `X-Forwarded-For` (the client address behind a trusted proxy, which password-check
//! throttling is keyed on) and `Host` / `X-Forwarded-Host` / `X-Forwarded-Proto` (the realm in
//! every `WWW-Authenticate` challenge we send).
#![no_main]

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::LazyLock;

use arbitrary::{Arbitrary, Unstructured};
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use regmirror::auth::{Access, ConnInfo};
use regmirror::config::{Config, TrustedProxies};
use regmirror::metrics::Metrics;
use regmirror::upstream::auth::Challenge;

const NAMES: [&str; 4] = ["x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "host"];

static FIXTURE: LazyLock<(TrustedProxies, Access)> = LazyLock::new(|| {
    let text = "[server]\ntrusted_proxies = [\"10.0.0.0/8\", \"192.168.1.1\", \"::1/128\", \"fd00::/8\"]\n";
    let config = Config::parse(text, Path::new("/x")).expect("fixture config");
    let access = Access::new(None, [1; 32], config.namespaces(), config.trusted_proxies.clone(), Metrics::new())
        .expect("access");
    (config.trusted_proxies, access)
});

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    peer: IpAddr,
    port: u16,
    tls: bool,
    headers: Vec<(u8, &'a [u8])>,
    scope: Option<&'a str>,
}

fuzz_target!(|data: &[u8]| {
    let (proxies, access) = &*FIXTURE;
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else { return };
    let mut headers = HeaderMap::new();
    for (name, value) in input.headers.iter().take(16) {
        if let Ok(v) = HeaderValue::from_bytes(value) {
            headers.append(HeaderName::from_static(NAMES[*name as usize % NAMES.len()]), v);
        }
    }
    let peer = input.peer;

    // The client address: the peer itself unless the peer is a trusted proxy; then one of the
    // forwarded addresses, or the peer. Always in canonical form (no IPv4-mapped IPv6).
    let client = proxies.client(&headers, peer);
    assert_eq!(client, client.to_canonical());
    if !proxies.trusts(peer) {
        assert_eq!(client, peer.to_canonical());
    } else if client != peer.to_canonical() {
        let forwarded: Vec<IpAddr> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|a| a.trim().parse::<IpAddr>().ok())
            .map(|ip| ip.to_canonical())
            .collect();
        assert!(forwarded.contains(&client), "{client} was not forwarded: {headers:?}");
    }

    // The challenge: a Bearer challenge for our token endpoint that reads back as written.
    let conn = ConnInfo { tls: input.tls, peer: SocketAddr::new(peer, input.port) };
    let scope = input.scope.map(str::to_string);
    let value = access.challenge(&headers, Some(conn), scope.clone());
    assert!(value.starts_with("Bearer realm=\"http://") || value.starts_with("Bearer realm=\"https://"), "{value}");
    let first = |name: &str| {
        headers.get(name).and_then(|v| v.to_str().ok()).map(|v| v.split(',').next().unwrap_or(v).trim().to_string())
    };
    if !proxies.trusts(peer) {
        // Forwarded headers from anyone but our proxies change nothing.
        let host = first("host").unwrap_or_else(|| "localhost".into());
        let scheme = if input.tls { "https" } else { "http" };
        assert!(value.starts_with(&format!("Bearer realm=\"{scheme}://{host}/auth/token\"")), "{value}");
    }
    let pieces: Vec<&str> =
        ["host", "x-forwarded-host"].iter().filter_map(|n| headers.get(*n)?.to_str().ok()).collect();
    // A `"` in Host / X-Forwarded-Host (or the scope) ends the quoted realm early: the value is
    // then not ours to read back (the client only confuses its own challenge).
    let quotes = pieces.iter().any(|p| p.contains('"')) || scope.as_deref().is_some_and(|s| s.contains('"'));
    if !quotes {
        match Challenge::parse(&value) {
            Some(Challenge::Bearer { realm, service, scope: s }) => {
                assert!(realm.ends_with("/auth/token"), "{value}");
                assert_eq!(service.as_deref(), Some("regmirror"));
                assert_eq!(s, scope);
            }
            other => panic!("our challenge {value:?} parses as {other:?}"),
        }
    }
});
