//! Bearer tokens of our own (the `Authorization: Bearer ...` of every authenticated request) and
//! token scopes (`?scope=repository:name:pull,push` at the token endpoint).
#![no_main]

use std::path::Path;
use std::sync::LazyLock;
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use regmirror::auth::{parse_scope, Access, AccessEntry, Principal};
use regmirror::config::TrustedProxies;
use regmirror::metrics::Metrics;

/// A fixed key: reproducible runs; nothing here can learn it (the comparison is constant-time).
const KEY: [u8; 32] = *b"regmirror-fuzz-token-signing-key";
const TTL: Duration = Duration::from_secs(30 * 24 * 3600);

struct Fixture {
    access: Access,
    /// Tokens issued once per process, with what they must verify as.
    issued: Vec<(String, (Principal, Vec<AccessEntry>))>,
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let namespaces = regmirror::config::Config::parse("", Path::new("/x")).unwrap().namespaces();
    let access = Access::new(None, KEY, namespaces, TrustedProxies::default(), Metrics::new()).unwrap();
    let entry = |name: &str, actions: &[&str]| AccessEntry {
        kind: "repository".into(),
        name: name.into(),
        local: format!("docker.io/{name}"),
        actions: actions.iter().map(|a| a.to_string()).collect(),
    };
    let mut issued = Vec::new();
    for (who, grants) in [
        (Principal::Anonymous, vec![entry("library/nginx", &["pull"])]),
        (Principal::User("alice".into()), vec![entry("private/a", &["pull", "push"]), entry("private/b", &[])]),
        (Principal::User("bob".into()), vec![]),
    ] {
        let t = access.issue_token(&who, TTL, grants.clone());
        assert_eq!(access.verify_token(&t), Some((who.clone(), grants.clone())));
        issued.push((t, (who, grants)));
    }
    Fixture { access, issued }
});

#[derive(Arbitrary, Debug)]
enum Op<'a> {
    /// Verify this string as it came.
    Raw(&'a str),
    /// Change one byte of an issued token.
    Flip { token: u8, at: u16, xor: u8 },
    /// Replace `at..at+len` of an issued token with `with`.
    Splice { token: u8, at: u16, len: u8, with: &'a str },
    /// Issue a token for these claims and verify it: the claims come back unchanged.
    RoundTrip { user: &'a str, access: Vec<(&'a str, &'a str, Vec<&'a str>)>, ttl_secs: u32 },
    /// A `scope` query parameter.
    Scope(&'a str),
}

fn check_foreign(f: &Fixture, candidate: &[u8]) {
    // Tokens travel in a header: only text reaches verify_token.
    let Ok(s) = std::str::from_utf8(candidate) else { return };
    if let Some(got) = f.access.verify_token(s) {
        let (_, want) = f
            .issued
            .iter()
            .find(|(t, _)| t == s)
            .unwrap_or_else(|| panic!("{s:?} is not a token we issued, yet verified as {got:?}"));
        assert_eq!(&got, want);
    }
}

fuzz_target!(|data: &[u8]| {
    let f = &*FIXTURE;
    let mut u = Unstructured::new(data);
    // A few operations per input (arbitrary keeps producing defaults once the input is used up).
    for _ in 0..8 {
        if u.is_empty() {
            break;
        }
        let Ok(op) = Op::arbitrary(&mut u) else { break };
        match op {
            Op::Raw(s) => check_foreign(f, s.as_bytes()),
            Op::Flip { token, at, xor } => {
                let (t, _) = &f.issued[token as usize % f.issued.len()];
                let mut b = t.clone().into_bytes();
                let i = at as usize % b.len();
                b[i] ^= xor;
                check_foreign(f, &b);
            }
            Op::Splice { token, at, len, with } => {
                let (t, _) = &f.issued[token as usize % f.issued.len()];
                let b = t.as_bytes();
                let start = at as usize % (b.len() + 1);
                let end = (start + len as usize).min(b.len());
                let mut out = b[..start].to_vec();
                out.extend_from_slice(with.as_bytes());
                out.extend_from_slice(&b[end..]);
                check_foreign(f, &out);
            }
            Op::RoundTrip { user, access, ttl_secs } => {
                let who = if user.is_empty() { Principal::Anonymous } else { Principal::User(user.to_string()) };
                let grants: Vec<AccessEntry> = access
                    .into_iter()
                    .map(|(name, local, actions)| AccessEntry {
                        kind: "repository".into(),
                        name: name.into(),
                        local: local.into(),
                        actions: actions.into_iter().map(str::to_string).collect(),
                    })
                    .collect();
                // At least a second left, or the token may expire before it is checked.
                let ttl = Duration::from_secs(u64::from(ttl_secs).max(2));
                let t = f.access.issue_token(&who, ttl, grants.clone());
                assert_eq!(f.access.verify_token(&t), Some((who, grants)), "token {t:?}");
            }
            Op::Scope(s) => {
                if let Some((name, actions)) = parse_scope(s) {
                    assert!(s.starts_with("repository:"));
                    assert!(s.contains(&format!("{name}:")));
                    assert!(actions.len() <= s.split(',').count());
                }
            }
        }
    }
});
