//! `/v2/...` paths (parsed from the end, names of any depth) and query strings.
#![no_main]

use libfuzzer_sys::fuzz_target;
use regmirror::registry::{query_escape, Route};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    // Like a request target: the path, then an optional query.
    let (path, query) = s.split_once('?').unwrap_or((s, ""));

    if let Some(route) = Route::parse(path) {
        assert!(route.template().starts_with("/v2"));
        if let Some(name) = route.name() {
            assert!(path.contains(name), "name {name:?} is not part of {path:?}");
        }
        // The route says exactly what the path was: rebuild it.
        let rebuilt: Vec<String> = match route {
            Route::Base => vec!["/v2".into(), "/v2/".into()],
            Route::Catalog => vec!["/v2/_catalog".into()],
            Route::Tags(n) => vec![format!("/v2/{n}/tags/list")],
            Route::UploadStart(n) => vec![format!("/v2/{n}/blobs/uploads"), format!("/v2/{n}/blobs/uploads/")],
            Route::Manifest(n, r) => vec![format!("/v2/{n}/manifests/{r}")],
            Route::Blob(n, d) => vec![format!("/v2/{n}/blobs/{d}")],
            Route::Referrers(n, d) => vec![format!("/v2/{n}/referrers/{d}")],
            Route::Upload(n, id) => vec![format!("/v2/{n}/blobs/uploads/{id}")],
        };
        assert!(rebuilt.iter().any(|p| p == path), "{route:?} does not rebuild {path:?}");
        match route {
            Route::Manifest(_, last) | Route::Blob(_, last) | Route::Referrers(_, last) | Route::Upload(_, last) => {
                assert!(!last.contains('/'))
            }
            _ => {}
        }
    } else {
        assert!(!(path == "/v2" || path == "/v2/" || path == "/v2/_catalog"));
    }

    // Query strings as the handlers read them (a map, last value wins), and query_escape's output
    // reads back as what it escaped.
    let pairs: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes()).into_owned().collect();
    let again: String = form_urlencoded::Serializer::new(String::new()).extend_pairs(&pairs).finish();
    let reparsed: Vec<(String, String)> = form_urlencoded::parse(again.as_bytes()).into_owned().collect();
    assert_eq!(pairs, reparsed);
    let escaped = query_escape(s);
    let q = format!("ns={escaped}&n=1");
    let back: Vec<(String, String)> = form_urlencoded::parse(q.as_bytes()).into_owned().collect();
    assert_eq!(back, vec![("ns".to_string(), s.to_string()), ("n".to_string(), "1".to_string())]);
});
