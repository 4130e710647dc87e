//! Upstream `WWW-Authenticate` challenges (Docker Hub's token flow).
#![no_main]

use libfuzzer_sys::fuzz_target;
use regmirror::upstream::auth::Challenge;

fuzz_target!(|data: &[u8]| {
    let Ok(header) = std::str::from_utf8(data) else { return };
    let parsed = Challenge::parse(header);
    assert_eq!(Challenge::parse(header.trim()), parsed);
    let Some(Challenge::Bearer { realm, service, scope }) = parsed else { return };
    let scheme = header.trim().split(' ').next().unwrap_or_default();
    assert!(scheme.eq_ignore_ascii_case("bearer"), "{header:?} parsed as Bearer");
    // Every value is a piece of the header.
    for v in [Some(&realm), service.as_ref(), scope.as_ref()].into_iter().flatten() {
        assert!(header.contains(v.as_str()), "{v:?} is not part of {header:?}");
    }
    // Written back as a registry writes it, the challenge reads the same.
    if [Some(&realm), service.as_ref(), scope.as_ref()].into_iter().flatten().all(|v| !v.contains('"')) {
        let mut again = format!("Bearer realm=\"{realm}\"");
        if let Some(s) = &service {
            again.push_str(&format!(",service=\"{s}\""));
        }
        if let Some(s) = &scope {
            again.push_str(&format!(",scope=\"{s}\""));
        }
        assert_eq!(
            Challenge::parse(&again),
            Some(Challenge::Bearer { realm: realm.clone(), service: service.clone(), scope: scope.clone() }),
            "{again:?} (from {header:?})"
        );
    }
});
