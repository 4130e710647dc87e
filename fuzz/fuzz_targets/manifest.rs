//! Manifest bodies (pushed by clients, fetched from upstreams) with the Content-Type they came
//! with, and the Accept negotiation around them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use regmirror::oci::{
    acceptable, describe, upstream_accept, Digest, ManifestMeta, ACCEPT_ALL, DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX,
    OCI_MANIFEST,
};

const KNOWN: [&str; 4] = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];

fuzz_target!(|data: &[u8]| {
    let Some((&choice, rest)) = data.split_first() else { return };
    // The Content-Type: none, a known type, a generic one, or a string taken from the input
    // (a length byte, then that many bytes).
    let (content_type, body): (Option<String>, &[u8]) = match choice % 8 {
        0 => (None, rest),
        1..=4 => (Some(KNOWN[(choice % 8 - 1) as usize].to_string()), rest),
        5 => (Some("application/json; charset=utf-8".to_string()), rest),
        _ => {
            let Some((&n, rest)) = rest.split_first() else { return };
            let n = (n as usize).min(rest.len());
            let Ok(ct) = std::str::from_utf8(&rest[..n]) else { return };
            (Some(ct.to_string()), &rest[n..])
        }
    };

    if let Ok(d) = describe(body, content_type.as_deref()) {
        let meta = &d.meta;
        assert_eq!(meta.size, body.len() as u64);
        // An index references child manifests, anything else blobs: never both.
        assert!(d.blobs.is_empty() || d.children.is_empty());
        for digest in d.blobs.iter().chain(&d.children).chain(&meta.subject) {
            assert_eq!(digest.to_string().parse::<Digest>().as_ref(), Ok(digest));
        }
        // A body that is accepted describes the same way again.
        let again = describe(body, content_type.as_deref()).expect("describe is deterministic");
        assert_eq!(&again.meta, meta);
        // The meta is stored as JSON and read back.
        let stored = serde_json::to_vec(meta).expect("meta serialises");
        let back: ManifestMeta = serde_json::from_slice(&stored).expect("stored meta reads back");
        assert_eq!(back.media_type, meta.media_type);
        assert_eq!(back.size, meta.size);
        assert_eq!(back.artifact_type, meta.artifact_type);
        assert_eq!(back.subject, meta.subject);
        assert_eq!(
            back.annotations.as_ref().map(|a| a.keys().cloned().collect::<Vec<_>>()),
            meta.annotations.as_ref().map(|a| a.keys().cloned().collect::<Vec<_>>())
        );
        // The same body with its own media type as Content-Type is accepted too (a type that
        // is not a plain token cannot survive the header's parameter stripping).
        let mt = meta.media_type.as_str();
        if content_type.is_none() && !mt.is_empty() && !mt.contains(';') && mt.trim() == mt {
            let with_header = describe(body, Some(mt)).expect("a body's own media type is accepted as Content-Type");
            assert_eq!(&with_header.meta, meta);
        }
    }

    // Accept headers: the same free-form string as an Accept value.
    if let Some(accept) = content_type.as_deref() {
        let up = upstream_accept(Some(accept));
        if up != ACCEPT_ALL {
            for t in up.split(", ") {
                assert!(acceptable(t, Some(accept)), "{t:?} asked upstream for but not acceptable to {accept:?}");
            }
        }
        for t in KNOWN {
            let _ = acceptable(t, Some(accept));
        }
    }
    assert!(acceptable(OCI_INDEX, None));
    assert_eq!(upstream_accept(None), ACCEPT_ALL);
});
