//! Who may pull and push: users from an htpasswd file (bcrypt), grants per repository glob, and
//! the registry token flow clients already speak with Docker Hub: a `401` with a Bearer challenge
//! on `/v2/`, a token endpoint that takes Basic credentials (or none, for anonymous pulls), and
//! short-lived signed tokens. Without an `[auth]` section regmirror is an open registry, as
//! distribution is by default.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use axum::http::{header, HeaderMap};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use hmac::{KeyInit, Mac};
use sha2::Digest as _;
use subtle::ConstantTimeEq;

use crate::config::{Action, Anonymous, AuthConfig, Namespaces, TrustedProxies};
use crate::metrics::Metrics;
use crate::oci::RepoName;
use crate::storage::{fs::atomic_write, unix_now, Meta, Store};

/// Why access control could not be set up or changed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("auth.htpasswd = {path:?} cannot be read: {source}")]
    Htpasswd { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("the token signing key in the store (meta/token.key) cannot be used: {0}")]
    SigningKey(String),
    #[error("the token signing key in the store (meta/token.key) cannot be read or made: {0}")]
    SigningKeyStore(std::io::Error),
    #[error("{0:?} is not a valid user name (no ':' or spaces)")]
    UserName(String),
    #[error("hashing the password: {0}")]
    Hashing(String),
}

/// The token service name in challenges and tokens.
const SERVICE: &str = "regmirror";
/// Failed attempts from one address before answers to it are slowed down.
const FREE_FAILURES: u32 = 5;

/// Who is asking.
#[derive(Clone, Debug, PartialEq)]
pub enum Principal {
    Anonymous,
    User(String),
}

/// What authenticating a request found.
pub struct Authn {
    pub principal: Principal,
    /// Credentials were presented and were wrong (or expired).
    pub rejected: bool,
    /// Valid credentials or one of our tokens (an anonymous token included) came with it.
    pub authenticated: bool,
    /// What the token it came with allows; `None` without a token (Basic credentials carry the
    /// user's whole rights).
    pub token_access: Option<Vec<AccessEntry>>,
}

impl Authn {
    fn anonymous() -> Authn {
        Authn { principal: Principal::Anonymous, rejected: false, authenticated: false, token_access: None }
    }

    /// Whether the request's token (if any) covers `action` on the repository the client calls
    /// `name` (stored as `local`).
    pub fn token_permits(&self, name: &str, local: &str, action: Action) -> bool {
        let Some(access) = &self.token_access else { return true };
        access.iter().any(|e| (e.name == name || e.local == local) && e.actions.iter().any(|a| a == action.as_str()))
    }
}

/// One entry of a token's `access` claim (the Docker token specification's), plus the local
/// repository the name resolved to when the token was issued.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct AccessEntry {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub local: String,
    pub actions: Vec<String>,
}

/// What a token of ours says: who, until when, and what it allows.
#[derive(serde::Serialize, serde::Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    access: Vec<AccessEntry>,
}

/// Whether the connection is TLS, and the peer: set by the server on every request.
#[derive(Clone, Copy, Debug)]
pub struct ConnInfo {
    pub tls: bool,
    pub peer: SocketAddr,
}

struct Users {
    path: PathBuf,
    modified: Option<SystemTime>,
    hashes: HashMap<String, String>,
}

pub struct Access {
    config: Option<AuthConfig>,
    users: RwLock<Users>,
    /// Signs tokens. Kept in the store (`meta/token.key`), so tokens outlive a restart.
    key: [u8; 32],
    /// Password checks and their bookkeeping.
    checks: PasswordChecks,
    /// Which repositories hold mirrored content.
    namespaces: Namespaces,
    /// Whose forwarded headers count (the realm, the address failures are counted for).
    proxies: TrustedProxies,
}

/// The token signing key kept in the store (so tokens outlive a restart and, on a shared store,
/// are accepted by every replica), made (readable by the owner only) when there is none yet.
pub async fn signing_key(store: &Store) -> Result<[u8; 32], AuthError> {
    let broken = AuthError::SigningKeyStore;
    if let Some(bytes) = store.read_meta(Meta::TokenKey).await.map_err(broken)? {
        return <[u8; 32]>::try_from(bytes.as_slice())
            .map_err(|_| AuthError::SigningKey("not 32 bytes; remove it and a new one is made".into()));
    }
    let key: [u8; 32] = rand::random();
    if store.create_meta(Meta::TokenKey, &key).await.map_err(broken)? {
        return Ok(key);
    }
    // Another replica made one at the same moment: every replica must sign with the same key.
    let bytes = store.read_meta(Meta::TokenKey).await.map_err(broken)?.unwrap_or_default();
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| AuthError::SigningKey("not 32 bytes".into()))
}

/// Password checks: bcrypt on blocking threads, a few at a time and a few per address, answers
/// remembered, failures counted and slowed down per address. A cheap `Clone`: every part is shared.
#[derive(Clone)]
struct PasswordChecks {
    /// Successful checks, so bcrypt runs once per (user, password) and not per request.
    verified: moka::sync::Cache<[u8; 32], String>,
    /// Recently rejected (user, password) pairs: a client retrying the same wrong password costs
    /// no further bcrypt.
    rejected: moka::sync::Cache<[u8; 32], ()>,
    /// bcrypt runs on blocking threads, this many at a time: a flood of guesses never occupies
    /// the threads that serve pulls.
    hashing: Arc<tokio::sync::Semaphore>,
    failures: moka::sync::Cache<IpAddr, u32>,
    /// Checks queued or running per address: one address cannot fill the queue.
    in_flight: Arc<Mutex<HashMap<IpAddr, usize>>>,
    /// Identical checks at once (a node pulling several images with one login) share one bcrypt.
    checking: Arc<crate::cache::flight::Flights<[u8; 32], bool>>,
    metrics: Metrics,
}

/// Checks one address may have queued or running at once; more are refused unchecked.
const CHECKS_PER_ADDRESS: usize = 4;

/// An address's place among the checks in flight, given back when dropped.
struct InFlight {
    map: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut map = crate::lock(&self.map);
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

impl PasswordChecks {
    /// Check `user`'s password against `hash` (`None`: an unknown user, checked against a dummy
    /// hash so it costs the same), after slowing down an address that failed too often.
    async fn check(&self, user: String, password: String, hash: Option<String>, client: Option<IpAddr>) -> bool {
        let key: [u8; 32] = sha2::Sha256::digest(format!("{user}\0{password}").as_bytes()).into();
        // Known good: answered from memory, without a place in the queue.
        if let Some(u) = self.verified.get(&key) {
            return bool::from(u.as_bytes().ct_eq(user.as_bytes()));
        }
        let this = self.clone();
        let checked =
            self.checking.run(key, move || async move { this.check_now(key, user, password, hash, client).await });
        checked.await.unwrap_or(false)
    }

    /// The check itself: a place among the address's checks, the slowdown, then bcrypt.
    async fn check_now(
        &self,
        key: [u8; 32],
        user: String,
        password: String,
        hash: Option<String>,
        client: Option<IpAddr>,
    ) -> bool {
        let _slot = match client {
            Some(ip) => match self.enter(ip) {
                Some(slot) => Some(slot),
                None => {
                    tracing::warn!(user, address = %ip, "too many password checks from one address; refused unchecked");
                    return false;
                }
            },
            None => None,
        };
        self.throttle(client).await;
        let ok = if self.rejected.contains_key(&key) {
            false
        } else {
            let known = hash.is_some();
            let hash = hash.unwrap_or_else(|| DUMMY_HASH.to_string());
            let Ok(permit) = self.hashing.clone().acquire_owned().await else { return false };
            self.metrics.password_checks.inc();
            let matched = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                bcrypt::verify(password, &hash).unwrap_or(false)
            })
            .await
            .unwrap_or(false);
            let ok = matched && known;
            if ok {
                self.verified.insert(key, user.clone());
            } else {
                self.rejected.insert(key, ());
            }
            ok
        };
        if !ok {
            self.failed(&user, client);
        }
        ok
    }

    fn enter(&self, ip: IpAddr) -> Option<InFlight> {
        let mut map = crate::lock(&self.in_flight);
        let n = map.entry(ip).or_default();
        if *n >= CHECKS_PER_ADDRESS {
            return None;
        }
        *n += 1;
        Some(InFlight { map: self.in_flight.clone(), ip })
    }

    /// Slow down an address that failed too often, before its next password is checked.
    async fn throttle(&self, client: Option<IpAddr>) {
        let Some(ip) = client else { return };
        let n = self.failures.get(&ip).unwrap_or(0);
        if n >= FREE_FAILURES {
            let delay = Duration::from_millis(250 << (n + 1 - FREE_FAILURES).min(5));
            tokio::time::sleep(delay).await;
        }
    }

    /// Record a failed attempt; repeated failures from one address are answered ever more slowly.
    fn failed(&self, user: &str, client: Option<IpAddr>) {
        self.metrics.auth_failures.inc();
        let address = client.map_or_else(|| "unknown".to_string(), |ip| ip.to_string());
        tracing::warn!(user, address, "authentication failed");
        if let Some(ip) = client {
            let n = self.failures.get(&ip).unwrap_or(0) + 1;
            self.failures.insert(ip, n);
        }
    }
}

/// How many bcrypt checks may run at once: half the cores, so pulls always have the other half.
fn hashing_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

/// A bcrypt hash of a random password: unknown users cost the same time as known ones.
const DUMMY_HASH: &str = "$2y$10$7EqJtq98hPqEX7fNZaFWoOhi5BWX4Z9dVfOmDnM1vbNL3aS5j4dQS";

impl Access {
    /// `key` signs tokens (see [`signing_key`]).
    pub fn new(
        config: Option<AuthConfig>,
        key: [u8; 32],
        namespaces: Namespaces,
        proxies: TrustedProxies,
        metrics: Metrics,
    ) -> Result<Access, AuthError> {
        let path = config.as_ref().map(|c| c.htpasswd.clone()).unwrap_or_default();
        let users = Users { path, modified: None, hashes: HashMap::new() };
        let access = Access {
            config,
            users: RwLock::new(users),
            key,
            checks: PasswordChecks {
                verified: moka::sync::Cache::builder()
                    .max_capacity(10_000)
                    .time_to_live(Duration::from_secs(300))
                    .build(),
                rejected: moka::sync::Cache::builder()
                    .max_capacity(100_000)
                    .time_to_live(Duration::from_secs(600))
                    .build(),
                hashing: Arc::new(tokio::sync::Semaphore::new(hashing_threads())),
                failures: moka::sync::Cache::builder()
                    .max_capacity(100_000)
                    .time_to_idle(Duration::from_secs(600))
                    .build(),
                in_flight: Arc::default(),
                checking: Arc::default(),
                metrics: metrics.clone(),
            },
            namespaces,
            proxies,
        };
        if let Some(config) = &access.config {
            access.reload_users()?;
            warn_if_world_readable(&config.htpasswd);
        }
        Ok(access)
    }

    pub fn enabled(&self) -> bool {
        self.config.is_some()
    }

    /// Re-read the htpasswd file when it changed on disk (`regmirror passwd` takes effect at once).
    fn reload_users(&self) -> Result<(), AuthError> {
        let path = self.users.read().unwrap_or_else(|e| e.into_inner()).path.clone();
        let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        if modified.is_some() && modified == self.users.read().unwrap_or_else(|e| e.into_inner()).modified {
            return Ok(());
        }
        let hashes = match std::fs::read_to_string(&path) {
            Ok(text) => parse_htpasswd(&text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
            Err(source) => return Err(AuthError::Htpasswd { path, source }),
        };
        let mut users = self.users.write().unwrap_or_else(|e| e.into_inner());
        users.modified = modified;
        users.hashes = hashes;
        self.checks.verified.invalidate_all();
        self.checks.rejected.invalidate_all();
        Ok(())
    }

    /// Whether `user` is in the htpasswd file now.
    fn user_exists(&self, user: &str) -> bool {
        let _ = self.reload_users();
        self.users.read().unwrap_or_else(|e| e.into_inner()).hashes.contains_key(user)
    }

    /// Who sent this request. Our own tokens name a user (or anonymous) and what they allow.
    /// Basic credentials are checked only when `identity_needed`: where anonymous callers may do
    /// the same, credentials meant for another registry (dockerd forwards its Docker Hub login)
    /// are ignored, cost no bcrypt and count as no failure. Anything else (no header, a token
    /// another registry issued) is anonymous.
    pub async fn authenticate(&self, headers: &HeaderMap, conn: Option<ConnInfo>, identity_needed: bool) -> Authn {
        if !self.enabled() {
            return Authn::anonymous();
        }
        let Some(value) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
            return Authn::anonymous();
        };
        if let Some(token) = value.strip_prefix("Bearer ") {
            return match self.verify_token(token.trim()) {
                Some((principal, access)) => {
                    Authn { principal, rejected: false, authenticated: true, token_access: Some(access) }
                }
                None => Authn::anonymous(),
            };
        }
        let Some((user, password)) = basic_credentials(value) else { return Authn::anonymous() };
        if !identity_needed {
            return Authn::anonymous();
        }
        // Behind a trusted proxy, the client it forwards for is the one slowed down.
        let client = conn.map(|c| self.proxies.client(headers, c.peer.ip()));
        let _ = self.reload_users();
        let hash = self.users.read().unwrap_or_else(|e| e.into_inner()).hashes.get(&user).cloned();
        // Checked in a task of its own: a client that hangs up mid-check neither frees a hashing
        // slot early nor escapes being counted.
        let (checks, claimed) = (self.checks.clone(), user.clone());
        let checked = tokio::spawn(async move { checks.check(claimed, password, hash, client).await });
        if checked.await.unwrap_or(false) {
            return Authn {
                principal: Principal::User(user),
                rejected: false,
                authenticated: true,
                token_access: None,
            };
        }
        Authn { principal: Principal::Anonymous, rejected: true, authenticated: false, token_access: None }
    }

    /// May `who` do `action` on `repo` (a local name; `mirrored` when it comes from an upstream)?
    pub fn allowed(&self, who: &Principal, repo: &str, mirrored: bool, action: Action) -> bool {
        let Some(config) = &self.config else { return true };
        if action == Action::Pull {
            let anonymous_ok = match config.anonymous {
                Anonymous::Pull => true,
                Anonymous::PullMirror => mirrored,
                Anonymous::None => false,
            };
            // Mirrored public images: anyone logged in may pull them too.
            if anonymous_ok || (mirrored && matches!(who, Principal::User(_))) {
                return true;
            }
        }
        let Principal::User(user) = who else { return false };
        config.grants.iter().any(|g| {
            g.access >= action && g.users.iter().any(|u| u == user) && g.repositories.iter().any(|p| p.matches(repo))
        })
    }

    /// The `WWW-Authenticate` value that tells a client where to get a token (for `scope`).
    pub fn challenge(&self, headers: &HeaderMap, conn: Option<ConnInfo>, scope: Option<String>) -> String {
        let realm = self.realm(headers, conn);
        let mut value = format!("Bearer realm=\"{realm}\",service=\"{SERVICE}\"");
        if let Some(scope) = scope {
            value.push_str(&format!(",scope=\"{scope}\""));
        }
        value
    }

    fn sign(&self, payload: &str) -> String {
        let mut mac =
            <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(payload.as_bytes());
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    }

    pub fn issue_token(&self, who: &Principal, ttl: Duration, access: Vec<AccessEntry>) -> String {
        let sub = match who {
            Principal::Anonymous => String::new(),
            Principal::User(u) => u.clone(),
        };
        let claims = Claims { sub, exp: unix_now().saturating_add(ttl.as_secs()), access };
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap_or_default());
        let sig = self.sign(&payload);
        format!("{payload}.{sig}")
    }

    /// The principal and grants of a valid token of ours. A token of a user who has since been
    /// removed from the htpasswd file is no longer valid.
    pub fn verify_token(&self, token: &str) -> Option<(Principal, Vec<AccessEntry>)> {
        let (payload, sig) = token.rsplit_once('.')?;
        if !bool::from(self.sign(payload).as_bytes().ct_eq(sig.as_bytes())) {
            return None;
        }
        let claims: Claims = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
        if claims.exp <= unix_now() {
            return None;
        }
        if claims.sub.is_empty() {
            return Some((Principal::Anonymous, claims.access));
        }
        if self.config.is_some() && !self.user_exists(&claims.sub) {
            return None;
        }
        Some((Principal::User(claims.sub), claims.access))
    }

    /// `GET /auth/token?service=…&scope=…`, with Basic credentials or none. `scopes` are the
    /// requested repositories, resolved to local names.
    /// The token for a request to the token endpoint (`GET /auth/token?service=…&scope=…`), with
    /// Basic credentials or none. `scopes` are the requested repositories, resolved to local names.
    pub async fn grant(
        &self,
        headers: &HeaderMap,
        conn: Option<ConnInfo>,
        scopes: Vec<Scope>,
    ) -> Result<Grant, Refused> {
        let Some(config) = &self.config else { return Err(Refused::Disabled) };
        // A login (no scope) or a request anonymous callers may not make needs the credentials;
        // an anonymous-readable pull does not, so foreign credentials cannot slow it down.
        let anonymous_suffices = !scopes.is_empty()
            && scopes
                .iter()
                .all(|s| s.actions.iter().all(|a| self.allowed(&Principal::Anonymous, &s.local, s.mirrored, *a)));
        let authn = self.authenticate(headers, conn, !anonymous_suffices).await;
        let who = authn.principal;
        if authn.rejected || (who == Principal::Anonymous && config.anonymous == Anonymous::None) {
            return Err(Refused::Unauthenticated);
        }
        // The token carries what was asked for and may be granted, nothing more.
        let access = scopes
            .into_iter()
            .map(|s| {
                let actions = s
                    .actions
                    .iter()
                    .filter(|a| self.allowed(&who, &s.local, s.mirrored, **a))
                    .map(|a| a.as_str().to_string())
                    .collect();
                AccessEntry { kind: "repository".into(), name: s.name, local: s.local, actions }
            })
            .collect();
        Ok(Grant { token: self.issue_token(&who, config.token_ttl, access), expires_in: config.token_ttl })
    }

    /// The token endpoint's absolute URL, as the client reached us. Behind a trusted
    /// TLS-terminating proxy, its `X-Forwarded-Proto` / `X-Forwarded-Host` win; anyone else's are
    /// ignored (they would let a caller send clients' passwords to a host of its choosing).
    fn realm(&self, headers: &HeaderMap, conn: Option<ConnInfo>) -> String {
        let header = |name: &str| {
            headers.get(name).and_then(|v| v.to_str().ok()).map(|v| v.split(',').next().unwrap_or(v).trim().to_string())
        };
        let forwarded = |name: &str| header(name).filter(|_| conn.is_some_and(|c| self.proxies.trusts(c.peer.ip())));
        let host = forwarded("x-forwarded-host").or_else(|| header("host")).unwrap_or_else(|| "localhost".into());
        let scheme = forwarded("x-forwarded-proto").filter(|p| p == "http" || p == "https").unwrap_or_else(|| {
            if conn.is_some_and(|c| c.tls) {
                "https".into()
            } else {
                "http".into()
            }
        });
        format!("{scheme}://{host}/auth/token")
    }

    pub fn may_pull(&self, who: &Principal, repo: &RepoName) -> bool {
        self.allowed(who, repo.as_str(), self.namespaces.is_mirrored(repo), Action::Pull)
    }
}

/// A token the token endpoint hands out.
pub struct Grant {
    pub token: String,
    pub expires_in: Duration,
}

/// Why the token endpoint gives no token.
#[derive(Debug, PartialEq)]
pub enum Refused {
    /// There is no `[auth]`: nothing to log in to.
    Disabled,
    /// Wrong credentials, or none where they are needed: the client must log in.
    Unauthenticated,
}

/// A repository scope of a token request: the name as the client wrote it, resolved to the
/// local repository.
pub struct Scope {
    pub name: String,
    pub local: String,
    pub mirrored: bool,
    pub actions: Vec<Action>,
}

/// `repository:library/nginx:pull,push` → (name, actions).
pub fn parse_scope(scope: &str) -> Option<(String, Vec<Action>)> {
    let rest = scope.strip_prefix("repository:")?;
    let (name, actions) = rest.rsplit_once(':')?;
    let actions = actions
        .split(',')
        .filter_map(|a| match a {
            "pull" => Some(Action::Pull),
            "push" => Some(Action::Push),
            "delete" | "*" => Some(Action::Delete),
            _ => None,
        })
        .collect();
    Some((name.to_string(), actions))
}

fn basic_credentials(value: &str) -> Option<(String, String)> {
    let encoded = value.strip_prefix("Basic ").or_else(|| value.strip_prefix("basic "))?;
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

/// bcrypt hashes can be attacked offline: say so when every user of the machine can read them.
fn warn_if_world_readable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o004 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{mode:o}"),
                "auth.htpasswd is readable by every user of this machine: `chmod o-r` it (the systemd unit gives it to the service's group)"
            );
        }
    }
}

/// `user:$2y$...` lines; comments and blank lines ignored.
pub fn parse_htpasswd(text: &str) -> HashMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once(':'))
        .map(|(u, h)| (u.to_string(), h.to_string()))
        .collect()
}

/// Add or replace `user` in the htpasswd file at `path` (bcrypt, as `htpasswd -B` writes it).
pub fn set_password(path: &Path, user: &str, password: &str) -> Result<(), AuthError> {
    if user.is_empty() || user.contains(':') || user.contains(char::is_whitespace) {
        return Err(AuthError::UserName(user.to_string()));
    }
    let hash = bcrypt::hash_with_result(password, 10)
        .map_err(|e| AuthError::Hashing(e.to_string()))?
        .format_for_version(bcrypt::Version::TwoY);
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut lines: Vec<String> =
        text.lines().filter(|l| l.split_once(':').map(|(u, _)| u) != Some(user)).map(str::to_string).collect();
    lines.push(format!("{user}:{hash}"));
    // The new file keeps the old one's mode and group, so a service that could read it still can.
    let (mode, group) = {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        match std::fs::metadata(path) {
            Ok(m) => (m.permissions().mode() & 0o777, Some(m.gid())),
            Err(_) => (0o600, None),
        }
    };
    let failed = |source| AuthError::Write { path: path.to_path_buf(), source };
    atomic_write(path, (lines.join("\n") + "\n").as_bytes(), mode).map_err(failed)?;
    if let Some(gid) = group {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(failed)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_and_htpasswd() {
        assert_eq!(
            parse_scope("repository:private/a:pull,push"),
            Some(("private/a".into(), vec![Action::Pull, Action::Push]))
        );
        assert_eq!(parse_scope("registry:catalog:*"), None);
        let users = parse_htpasswd("# comment\nalice:$2y$05$abc\n\nbob:$2y$05$def\n");
        assert_eq!(users.len(), 2);
    }

    #[test]
    fn tokens_are_signed_and_expire() {
        let namespaces = crate::config::Config::parse("", Path::new("/x")).unwrap().namespaces();
        let a = Access::new(None, rand::random(), namespaces.clone(), Default::default(), Metrics::new()).unwrap();
        let access = vec![AccessEntry {
            kind: "repository".into(),
            name: "private/a".into(),
            local: "private/a".into(),
            actions: vec!["pull".into()],
        }];
        let t = a.issue_token(&Principal::User("alice".into()), Duration::from_secs(60), access.clone());
        assert_eq!(a.verify_token(&t), Some((Principal::User("alice".into()), access.clone())));
        // Any change to the payload breaks the signature.
        let (payload, sig) = t.rsplit_once('.').unwrap();
        let mut claims: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        claims["sub"] = "admin".into();
        let forged = format!("{}.{sig}", URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap()));
        assert_eq!(a.verify_token(&forged), None);
        let expired = a.issue_token(&Principal::User("alice".into()), Duration::ZERO, access);
        assert_eq!(a.verify_token(&expired), None);
        let other = Access::new(None, rand::random(), namespaces, Default::default(), Metrics::new()).unwrap();
        assert_eq!(other.verify_token(&t), None);
    }
}
