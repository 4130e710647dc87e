//! Repository names, references, digests and tags: the grammar every `/v2/` path goes through.
#![no_main]

use libfuzzer_sys::fuzz_target;
use regmirror::oci::{valid_tag, Algorithm, Digest, Reference, RepoName};

fuzz_target!(|data: &[u8]| {
    // Hashing any bytes gives a digest that parses back to itself.
    for alg in [Algorithm::Sha256, Algorithm::Sha512] {
        let d = Digest::of(alg, data);
        assert_eq!(d.to_string().parse::<Digest>().as_ref(), Ok(&d));
    }
    let Ok(s) = std::str::from_utf8(data) else { return };

    if let Ok(n) = RepoName::parse(s) {
        assert_eq!(n.as_str(), s);
        assert_eq!(RepoName::parse(&n.to_string()).as_ref(), Ok(&n));
        assert!(!s.is_empty() && s.len() <= 255);
        assert!(n.components().all(|c| !c.is_empty()));
        assert!(s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/".contains(&b)));
        assert!(n.is_under(n.first_component()) && n.is_under(s));
        if let Some(rest) = n.strip_first() {
            assert_eq!(RepoName::parse(rest.as_str()).as_ref(), Ok(&rest));
            assert_eq!(format!("{}/{rest}", n.first_component()), s);
        }
        // Both halves are valid, so only the length limit can refuse the prefixed name.
        assert_eq!(n.prefixed("library").is_ok(), s.len() + "library/".len() <= 255);
        // serde goes through the same parser (stored metadata is read back this way).
        let back: RepoName = serde_json::from_value(serde_json::to_value(&n).unwrap()).unwrap();
        assert_eq!(back, n);
    }
    let via_serde: Result<RepoName, _> = serde_json::from_value(serde_json::Value::String(s.to_string()));
    assert_eq!(via_serde.is_ok(), RepoName::parse(s).is_ok());

    match Reference::parse(s) {
        Ok(r) => {
            assert_eq!(r.to_string(), s);
            assert_eq!(Reference::parse(&r.to_string()).as_ref(), Ok(&r));
            match &r {
                Reference::Tag(t) => assert!(valid_tag(t) && !t.contains(':')),
                Reference::Digest(d) => assert_eq!(d.to_string(), s),
            }
        }
        Err(_) => assert!(!valid_tag(s)),
    }
    if valid_tag(s) {
        assert!(!s.is_empty() && s.len() <= 128 && !s.starts_with(['.', '-']));
        assert_eq!(Reference::parse(s), Ok(Reference::Tag(s.to_string())));
    }

    match s.parse::<Digest>() {
        Ok(d) => {
            assert_eq!(d.to_string(), s);
            assert_eq!(d.to_string().parse::<Digest>().as_ref(), Ok(&d));
            let want = match d.algorithm() {
                Algorithm::Sha256 => 64,
                Algorithm::Sha512 => 128,
            };
            assert_eq!(d.hex().len(), want);
            assert!(d.hex().bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
            assert_eq!(format!("{}:{}", d.algorithm().as_str(), d.hex()), s);
            let back: Digest = serde_json::from_value(serde_json::to_value(&d).unwrap()).unwrap();
            assert_eq!(back, d);
        }
        Err(_) => {
            let via_serde: Result<Digest, _> = serde_json::from_value(serde_json::Value::String(s.to_string()));
            assert!(via_serde.is_err());
        }
    }
});
