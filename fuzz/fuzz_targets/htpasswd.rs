//! htpasswd files (`user:$2y$...` lines).
#![no_main]

use libfuzzer_sys::fuzz_target;
use regmirror::auth::parse_htpasswd;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let users = parse_htpasswd(text);
    assert!(users.len() <= text.lines().count());
    for (user, hash) in &users {
        assert!(!user.contains(':') && !user.contains('\n') && !hash.contains('\n'));
        assert!(!user.starts_with('#') && !user.starts_with(char::is_whitespace));
        assert!(!hash.ends_with(char::is_whitespace) || hash.is_empty());
        assert!(text.contains(&format!("{user}:{hash}")));
    }
    // Written back one `user:hash` line each, the file reads the same.
    let written: String = users.iter().map(|(u, h)| format!("{u}:{h}\n")).collect();
    assert_eq!(parse_htpasswd(&written), users);
});
