//! `Range` (blob GETs) and `Content-Range` (chunked uploads) headers.
#![no_main]

use http::{header, HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use regmirror::registry::response::parse_range;
use regmirror::registry::uploads::parse_content_range;

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    // The blob size: first byte picks small (where edge cases are) or any u64.
    let raw = u64::from_le_bytes(data[1..9].try_into().unwrap());
    let size = match data[0] % 4 {
        0 => raw % 16,
        1 => raw % 100_000,
        2 => u64::MAX - (raw % 16),
        _ => raw,
    };
    let value = &data[9..];

    let mut headers = HeaderMap::new();
    assert!(matches!(parse_range(&headers, size), Ok(None)));
    if let Ok(v) = HeaderValue::from_bytes(value) {
        headers.insert(header::RANGE, v);
        match parse_range(&headers, size) {
            Ok(Some(r)) => {
                assert!(r.start <= r.end && r.end < size, "{r:?} for size {size} from {value:?}");
                assert!(r.len() >= 1 && r.len() <= size);
            }
            Ok(None) => panic!("a Range header was ignored: {value:?}"),
            Err(_) => {}
        }
    }

    if let Ok(s) = std::str::from_utf8(value) {
        if let Some((a, b)) = parse_content_range(s) {
            assert!(a <= b, "{a}-{b} from {s:?}");
            // What the upload handler computes from it must not overflow.
            let _ = (b - a).checked_add(1);
        }
    }
});
