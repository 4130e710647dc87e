//! `mirror.toml`: TOML, then validation of every section (sizes, durations, addresses, URLs,
//! globs, pins), and what the server builds from a configuration that passed.
#![no_main]

use std::path::Path;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use regmirror::auth::{Access, Principal};
use regmirror::config::{parse_duration, parse_size, Config, Origin};
use regmirror::metrics::Metrics;
use regmirror::oci::RepoName;

const BASE: &str = "/nonexistent-base";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // password_file and htpasswd are read: keep the fuzzer away from device files that never
    // end (/dev/zero), and from escapes that could spell such a path.
    if ["/dev", "/proc", "/sys", "\\u", "\\U"].iter().any(|p| text.contains(p)) {
        return;
    }

    // The value parsers alone, on the whole input.
    if let Some(n) = parse_size(text) {
        assert!(text.trim().starts_with(|c: char| c.is_ascii_digit()), "{text:?} -> {n}");
    }
    if parse_duration(text).is_some() {
        assert!(text.trim().starts_with(|c: char| c.is_ascii_digit()));
    }

    let config = match Config::parse(text, Path::new(BASE)) {
        Ok(c) => c,
        Err(problems) => {
            assert!(!problems.is_empty(), "an error without a problem");
            return;
        }
    };
    assert!(config.storage_root.is_absolute());
    assert!(!config.upstreams.is_empty());
    for (i, u) in config.upstreams.iter().enumerate() {
        assert!(!u.name.is_empty() && !u.name.contains('/') && u.name == u.name.to_ascii_lowercase());
        assert!(config.upstreams[..i].iter().all(|x| x.name != u.name));
        assert!(u.url.scheme() == "http" || u.url.scheme() == "https");
        assert!(u.url.username().is_empty() && u.url.password().is_none());
        // The password never shows in debug output.
        if let Some(p) = u.password.as_deref().filter(|p| p.len() >= 8) {
            assert!(!format!("{u:?}").contains(p));
        }
    }
    for ns in &config.private_namespaces {
        assert!(RepoName::parse(ns).is_ok());
    }
    for p in &config.pins {
        assert!(config.upstreams.iter().any(|u| u.name == p.upstream));
        assert!(RepoName::parse(&p.repository).is_ok());
    }

    // Routing with these namespaces: a mirrored name is kept under its upstream's name.
    let namespaces = config.namespaces();
    let mut names: Vec<String> = vec!["nginx".into(), "library/nginx".into(), "private/a/b".into()];
    names.extend(config.upstreams.iter().map(|u| format!("{}/org/img", u.name)));
    names.extend(config.private_namespaces.iter().map(|ns| format!("{ns}/x")));
    for name in &names {
        let Ok(name) = RepoName::parse(name) else { continue };
        match namespaces.route(name.clone(), None) {
            Ok(Origin::Local(n)) => {
                assert_eq!(n, name);
                assert!(!namespaces.is_mirrored(&n) || n.strip_first().is_some());
            }
            Ok(Origin::Mirrored { upstream, remote, local }) => {
                assert!(config.upstreams.iter().any(|u| u.name == upstream));
                assert_eq!(local.as_str(), format!("{upstream}/{remote}"));
                assert!(namespaces.is_mirrored(&local));
            }
            Err(_) => {}
        }
    }

    // With [auth], the tokens the server hands out must verify for their lifetime.
    if let Some(auth) = &config.auth {
        let ttl = auth.token_ttl;
        // (Config::parse bounds token_ttl to 1 s..7 d: found by reading this target's inputs.)
        assert!(ttl >= std::time::Duration::from_secs(1) && ttl <= std::time::Duration::from_secs(7 * 86400));
        let Ok(access) =
            Access::new(Some(auth.clone()), [7; 32], namespaces, config.trusted_proxies.clone(), Metrics::new())
        else {
            return;
        };
        let token = access.issue_token(&Principal::Anonymous, ttl, Vec::new());
        if ttl >= Duration::from_secs(2) {
            assert_eq!(access.verify_token(&token), Some((Principal::Anonymous, Vec::new())), "token_ttl {ttl:?}");
        }
    }
});
