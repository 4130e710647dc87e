//! The registry token protocol as Docker Hub speaks it: parse a `WWW-Authenticate` challenge,
//! and cache tokens per scope until they expire.

use std::time::Duration;

use tokio::time::Instant;

use reqwest::header::HeaderValue;
use serde::Deserialize;

#[derive(Debug, PartialEq)]
pub enum Challenge {
    Bearer { realm: String, service: Option<String>, scope: Option<String> },
    Basic,
}

impl Challenge {
    /// `Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="..."`
    pub fn parse(header: &str) -> Option<Challenge> {
        let (scheme, params) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
        if scheme.eq_ignore_ascii_case("basic") {
            return Some(Challenge::Basic);
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let (mut realm, mut service, mut scope) = (None, None, None);
        for (k, v) in params_iter(params) {
            match k.to_ascii_lowercase().as_str() {
                "realm" => realm = Some(v),
                "service" => service = Some(v),
                "scope" => scope = Some(v),
                _ => {}
            }
        }
        Some(Challenge::Bearer { realm: realm?, service, scope })
    }
}

/// `k="v",k2="v2"`; values may contain commas inside quotes.
fn params_iter(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    while let Some((k, after)) = rest.split_once('=') {
        let k = k.trim().trim_start_matches(',').trim().to_string();
        let after = after.trim_start();
        let (v, remaining) = if let Some(q) = after.strip_prefix('"') {
            match q.find('"') {
                Some(end) => (q[..end].to_string(), &q[end + 1..]),
                None => (q.to_string(), ""),
            }
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_string(), &after[end..])
        };
        out.push((k, v));
        rest = remaining.trim_start().trim_start_matches(',');
    }
    out
}

#[derive(Deserialize)]
pub struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

/// Tokens by scope. Entries carry their own expiry (a token is never used past `expires_in`,
/// minus a margin for the request in flight).
pub struct TokenCache {
    cache: moka::future::Cache<String, (HeaderValue, Instant)>,
}

impl TokenCache {
    pub fn new() -> Self {
        TokenCache {
            cache: moka::future::Cache::builder().max_capacity(10_000).time_to_live(Duration::from_secs(3600)).build(),
        }
    }

    pub async fn get(&self, scope: &str) -> Option<HeaderValue> {
        let (v, expires) = self.cache.get(scope).await?;
        (Instant::now() < expires).then_some(v)
    }

    pub async fn insert(&self, scope: &str, t: TokenResponse) -> Option<HeaderValue> {
        let token = t.token.or(t.access_token).filter(|t| !t.is_empty())?;
        let mut v = HeaderValue::from_str(&format!("Bearer {token}")).ok()?;
        v.set_sensitive(true);
        // Docker Hub's default is 60 s when expires_in is absent; keep a margin.
        let lifetime = Duration::from_secs(t.expires_in.unwrap_or(60).max(10));
        let expires = Instant::now() + lifetime - Duration::from_secs(5);
        self.cache.insert(scope.to_string(), (v.clone(), expires)).await;
        Some(v)
    }
}

impl Default for TokenCache {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn tokens_are_used_until_they_expire() {
        let cache = TokenCache::new();
        let t = TokenResponse { token: Some("abc".into()), access_token: None, expires_in: Some(300) };
        cache.insert("repository:library/x:pull", t).await;
        assert!(cache.get("repository:library/x:pull").await.is_some());
        assert!(cache.get("repository:library/y:pull").await.is_none());
        tokio::time::advance(Duration::from_secs(290)).await;
        assert!(cache.get("repository:library/x:pull").await.is_some());
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(cache.get("repository:library/x:pull").await.is_none(), "an expired token was reused");
    }

    #[test]
    fn docker_hub_challenge() {
        let c = Challenge::parse(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull,push""#,
        );
        assert_eq!(
            c,
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/nginx:pull,push".into())
            })
        );
        assert_eq!(Challenge::parse(r#"Basic realm="x""#), Some(Challenge::Basic));
        assert_eq!(Challenge::parse("Negotiate"), None);
    }
}
