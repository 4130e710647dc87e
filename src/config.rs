//! `mirror.toml`: raw TOML (serde, unknown keys rejected) → a validated `Config`. Every problem is
//! collected, and each message names the key, the value and what is allowed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::oci::RepoName;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    storage: RawStorage,
    #[serde(default)]
    private: RawPrivate,
    #[serde(default)]
    upstream: Vec<RawUpstream>,
    #[serde(default)]
    cache: RawCache,
    tls: Option<RawTls>,
    metrics: Option<RawMetrics>,
    #[serde(default)]
    log: RawLog,
    auth: Option<RawAuth>,
    #[serde(default)]
    ui: RawUi,
    #[serde(default)]
    cluster: RawCluster,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    advertise: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    htpasswd: PathBuf,
    anonymous: Option<String>,
    token_ttl: Option<String>,
    #[serde(default)]
    grant: Vec<RawGrant>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrant {
    users: Vec<String>,
    repositories: Vec<String>,
    access: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    header_read_timeout: Option<String>,
    idle_timeout: Option<String>,
    max_connections: Option<usize>,
    max_upload_size: Option<String>,
    trusted_proxies: Option<Vec<String>>,
    http_listen: Option<String>,
    shutdown_timeout: Option<String>,
    max_manifest_size: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStorage {
    root: Option<PathBuf>,
    max_size: Option<String>,
    upload_expiry: Option<String>,
    backend: Option<String>,
    s3: Option<RawS3>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawS3 {
    bucket: String,
    endpoint: Option<String>,
    region: Option<String>,
    #[serde(default)]
    prefix: String,
    access_key_id: Option<String>,
    secret_access_key_file: Option<PathBuf>,
    redirect: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrivate {
    namespaces: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    name: String,
    url: String,
    username: Option<String>,
    password_file: Option<PathBuf>,
    password_env: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    tag_ttl: Option<String>,
    serve_stale: Option<bool>,
    upstream_timeout: Option<String>,
    #[serde(default)]
    pin: Vec<String>,
    pin_refresh: Option<String>,
    pin_referrers: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    mode: Option<String>,
    dir: Option<PathBuf>,
    #[serde(default)]
    hosts: Vec<String>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUi {
    enabled: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<String>,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    /// Reverse proxies whose `X-Forwarded-*` headers count.
    pub trusted_proxies: TrustedProxies,
    /// What one client may take of the server.
    pub limits: Limits,
    pub http_listen: Option<SocketAddr>,
    pub shutdown_timeout: Duration,
    pub max_manifest_size: u64,
    pub storage_root: PathBuf,
    /// Where content lives: the filesystem under `storage_root`, or an object store (then
    /// `storage_root` holds staged writes only).
    pub backend: StorageBackend,
    /// Mirrored content above this is evicted, least recently used first.
    pub max_size: Option<u64>,
    /// Upload sessions older than this are removed with their data.
    pub upload_expiry: Duration,
    pub private_namespaces: Vec<String>,
    pub upstreams: Vec<UpstreamConfig>,
    pub tag_ttl: Duration,
    pub serve_stale: bool,
    pub upstream_timeout: Duration,
    pub pins: Vec<Pin>,
    pub pin_refresh: Duration,
    /// Pinned images keep their referrers (signatures, SBOMs, attestations) too.
    pub pin_referrers: bool,
    pub tls: TlsConfig,
    pub metrics_listen: Option<SocketAddr>,
    pub log_format: LogFormat,
    /// `None`: an open registry (anyone may pull and push to the private namespace).
    pub auth: Option<AuthConfig>,
    /// The status page (`GET /`) and `/api/status` (`[ui] enabled`, default true).
    pub ui_enabled: bool,
    /// Where the other replicas on the same bucket reach this one (`[cluster] advertise`):
    /// set, replicas share fills through leases in the bucket.
    pub advertise: Option<String>,
}

#[derive(Clone, Debug)]
pub struct AuthConfig {
    pub htpasswd: PathBuf,
    pub anonymous: Anonymous,
    pub token_ttl: Duration,
    pub grants: Vec<Grant>,
}

/// What a caller without credentials may do.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Anonymous {
    /// Pull mirrored public images (the default).
    PullMirror,
    /// Pull everything, private namespace included.
    Pull,
    /// Nothing: every request needs a login.
    None,
}

/// Rights, each implying the ones before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    Pull,
    Push,
    Delete,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Pull => "pull",
            Action::Push => "push",
            Action::Delete => "delete",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Grant {
    pub users: Vec<String>,
    pub repositories: Vec<glob::Pattern>,
    pub access: Action,
}

#[derive(Clone)]
pub struct UpstreamConfig {
    pub name: String,
    pub url: reqwest::Url,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl std::fmt::Debug for UpstreamConfig {
    // The password never reaches a log line or an error message.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamConfig")
            .field("name", &self.name)
            .field("url", &self.url.as_str())
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// A pinned image: `docker.io/library/alpine:3.20`, or every cached tag with `:*`.
#[derive(Clone, Debug, PartialEq)]
pub struct Pin {
    pub upstream: String,
    pub repository: String,
    /// `None` for `*`: every tag the cache holds.
    pub tag: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum TlsConfig {
    Off,
    SelfSigned { dir: PathBuf, hosts: Vec<String> },
    Files { cert: PathBuf, key: PathBuf },
}

#[derive(Clone, Debug, PartialEq)]
pub enum StorageBackend {
    Fs,
    S3(S3Config),
}

/// `[storage.s3]`. Credentials: `access_key_id` and the secret read from `secret_access_key_file`,
/// or the standard `AWS_*` environment variables.
#[derive(Clone, PartialEq)]
pub struct S3Config {
    pub bucket: String,
    /// `None` for AWS itself.
    pub endpoint: Option<String>,
    pub region: String,
    /// Key prefix inside the bucket.
    pub prefix: String,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Answer cached blob GETs with a redirect to a presigned URL.
    pub redirect: bool,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("prefix", &self.prefix)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &self.secret_access_key.as_ref().map(|_| "<redacted>"))
            .field("redirect", &self.redirect)
            .finish()
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LogFormat {
    Text,
    Json,
}

pub const DEFAULT_CONFIG_PATH: &str = "mirror.toml";

/// One environment variable that sets one key of `mirror.toml`.
pub struct EnvOverride {
    pub var: &'static str,
    /// `section.key`.
    pub key: &'static str,
    /// A comma-separated value becomes a list of strings.
    pub list: bool,
}

/// The common keys, settable from the environment (the container image documents these). The
/// environment wins over the file. Relative paths still resolve against the file's folder.
pub const ENV_OVERRIDES: &[EnvOverride] = &[
    EnvOverride { var: "REGMIRROR_LISTEN", key: "server.listen", list: false },
    EnvOverride { var: "REGMIRROR_STORAGE_ROOT", key: "storage.root", list: false },
    EnvOverride { var: "REGMIRROR_MAX_SIZE", key: "storage.max_size", list: false },
    EnvOverride { var: "REGMIRROR_PRIVATE_NAMESPACES", key: "private.namespaces", list: true },
    EnvOverride { var: "REGMIRROR_TAG_TTL", key: "cache.tag_ttl", list: false },
    EnvOverride { var: "REGMIRROR_TLS_MODE", key: "tls.mode", list: false },
    EnvOverride { var: "REGMIRROR_TLS_DIR", key: "tls.dir", list: false },
    EnvOverride { var: "REGMIRROR_TLS_HOSTS", key: "tls.hosts", list: true },
    EnvOverride { var: "REGMIRROR_TLS_CERT", key: "tls.cert", list: false },
    EnvOverride { var: "REGMIRROR_TLS_KEY", key: "tls.key", list: false },
    EnvOverride { var: "REGMIRROR_AUTH_HTPASSWD", key: "auth.htpasswd", list: false },
    EnvOverride { var: "REGMIRROR_AUTH_ANONYMOUS", key: "auth.anonymous", list: false },
    EnvOverride { var: "REGMIRROR_METRICS_LISTEN", key: "metrics.listen", list: false },
    EnvOverride { var: "REGMIRROR_LOG_FORMAT", key: "log.format", list: false },
    EnvOverride { var: "REGMIRROR_CLUSTER_ADVERTISE", key: "cluster.advertise", list: false },
];

impl EnvOverride {
    fn apply(&self, table: &mut toml::Table, value: &str) {
        let (section, key) = self.key.split_once('.').unwrap_or(("", self.key));
        let value = if self.list {
            toml::Value::Array(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|v| !v.is_empty())
                    .map(|v| toml::Value::String(v.into()))
                    .collect(),
            )
        } else {
            toml::Value::String(value.to_string())
        };
        let section = table.entry(section).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let toml::Value::Table(section) = section {
            section.insert(key.to_string(), value);
        }
    }
}

/// Bounds no client can push the server past.
#[derive(Clone, Debug)]
pub struct Limits {
    /// A request's headers must have arrived within this long (slow-header attacks).
    pub header_read_timeout: Duration,
    /// A connection on which no byte moves either way for this long is closed.
    pub idle_timeout: Duration,
    /// Connections served at once; more wait in the listen queue.
    pub max_connections: usize,
    /// The largest blob a push may upload (`None`: no limit).
    pub max_upload_size: Option<u64>,
}

/// The reverse proxies in front of regmirror (addresses or CIDRs). Their `X-Forwarded-Proto`,
/// `X-Forwarded-Host` and `X-Forwarded-For` are believed; anyone else's are ignored.
#[derive(Clone, Debug, Default)]
pub struct TrustedProxies(Vec<ipnet::IpNet>);

impl TrustedProxies {
    pub fn trusts(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client behind the connection from `peer`: `peer` itself, or, when `peer` is a trusted
    /// proxy, the last address in `X-Forwarded-For` that is not one of ours.
    pub fn client(&self, headers: &axum::http::HeaderMap, peer: std::net::IpAddr) -> std::net::IpAddr {
        if !self.trusts(peer) {
            return peer.to_canonical();
        }
        let hops: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        // From the right: the first hop that is not one of ours is the client. A hop that is no
        // address ends the walk: what stands left of it is the client's own word.
        let mut client = peer;
        for hop in hops.iter().rev() {
            match hop.parse::<std::net::IpAddr>() {
                Ok(ip) if self.trusts(ip) => client = ip,
                Ok(ip) => return ip.to_canonical(),
                Err(_) => break,
            }
        }
        client.to_canonical()
    }
}

/// Where repositories come from: the one place that decides "private or mirrored?", both for
/// the names clients use (routing) and for the names the store keeps (access control, eviction,
/// gc).
#[derive(Clone, Debug)]
pub struct Namespaces {
    upstreams: Vec<String>,
    private: Vec<String>,
}

/// Where a repository a client names comes from.
#[derive(Debug, PartialEq)]
pub enum Origin {
    /// The private namespace: pushes accepted, never upstream.
    Local(RepoName),
    /// Mirrored from `upstream` (a configured name) as `remote`, kept as `local`.
    Mirrored { upstream: String, remote: RepoName, local: RepoName },
}

/// Why a name cannot be routed.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum RouteError {
    #[error(transparent)]
    Name(#[from] crate::oci::Error),
    #[error("no upstream is configured for registry {0:?}")]
    UnknownRegistry(String),
}

impl Namespaces {
    /// Route a client's repository name (and containerd's `?ns=`), in the documented order: an
    /// explicit registry; a name that starts with an upstream's name; the private namespaces;
    /// else Docker Hub (with `library/` for one-component names), if it is configured.
    pub fn route(&self, name: RepoName, ns: Option<&str>) -> Result<Origin, RouteError> {
        let mirrored = |upstream: &str, remote: RepoName| -> Result<Origin, RouteError> {
            let remote = if upstream == "docker.io" && !remote.as_str().contains('/') {
                remote.prefixed("library")?
            } else {
                remote
            };
            let local = remote.prefixed(upstream)?;
            Ok(Origin::Mirrored { upstream: upstream.to_string(), remote, local })
        };
        if let Some(ns) = ns {
            if !self.upstreams.iter().any(|u| u == ns) {
                return Err(RouteError::UnknownRegistry(ns.to_string()));
            }
            // containerd may also send the prefixed form; do not prefix twice.
            let remote = if name.first_component() == ns { name.strip_first().unwrap_or(name) } else { name };
            return mirrored(ns, remote);
        }
        if let Some(remote) = name.strip_first().filter(|_| self.is_upstream(name.first_component())) {
            return mirrored(name.first_component(), remote);
        }
        if self.private.iter().any(|ns| name.is_under(ns)) || !self.is_upstream("docker.io") {
            return Ok(Origin::Local(name));
        }
        mirrored("docker.io", name)
    }

    /// Whether a repository the store keeps holds mirrored content: it is kept as
    /// `<upstream name>/<repository>`; everything else is local (pushed, never evicted).
    pub fn is_mirrored(&self, local: &RepoName) -> bool {
        local.strip_first().is_some() && self.is_upstream(local.first_component())
    }

    fn is_upstream(&self, name: &str) -> bool {
        self.upstreams.iter().any(|u| u == name)
    }
}

impl Config {
    pub fn namespaces(&self) -> Namespaces {
        Namespaces {
            upstreams: self.upstreams.iter().map(|u| u.name.clone()).collect(),
            private: self.private_namespaces.clone(),
        }
    }
}

/// Everything wrong with a configuration, one problem per line.
#[derive(Debug)]
pub struct ConfigErrors {
    pub path: PathBuf,
    pub problems: Vec<String>,
}

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} problem(s)", self.path.display(), self.problems.len())?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl Config {
    /// Read, apply the `REGMIRROR_*` environment overrides (see [`ENV_OVERRIDES`]), validate.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let fail = |p: String| ConfigErrors { path: path.to_path_buf(), problems: vec![p] };
        let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read the file: {e}")))?;
        let env = std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)));
        Config::parse_with_env(&text, path.parent().unwrap_or(Path::new("")), env)
            .map_err(|problems| ConfigErrors { path: path.to_path_buf(), problems })
    }

    /// Parse and validate; relative paths resolve against `base` (the config file's folder).
    pub fn parse(text: &str, base: &Path) -> Result<Config, Vec<String>> {
        Config::parse_with_env(text, base, std::iter::empty())
    }

    /// [`Config::parse`] with environment variables laid over the file: each one in
    /// [`ENV_OVERRIDES`] replaces its key, so a container can be configured without a file.
    pub fn parse_with_env(
        text: &str,
        base: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, Vec<String>> {
        // An empty variable is an unset one (compose files write `REGMIRROR_MAX_SIZE=`).
        let overrides: Vec<(&EnvOverride, String)> = env
            .into_iter()
            .filter(|(_, value)| !value.trim().is_empty())
            .filter_map(|(name, value)| ENV_OVERRIDES.iter().find(|o| o.var == name).map(|o| (o, value)))
            .collect();
        // The file alone first, so its errors point at a line and column.
        let raw: RawConfig = toml::from_str(text).map_err(|e| vec![describe_toml_error(&e, text)])?;
        let raw: RawConfig = if overrides.is_empty() {
            raw
        } else {
            let mut table: toml::Table = toml::from_str(text).map_err(|e| vec![describe_toml_error(&e, text)])?;
            let mut names = Vec::new();
            for (o, value) in overrides {
                o.apply(&mut table, &value);
                names.push(o.var);
            }
            RawConfig::deserialize(toml::Value::Table(table))
                .map_err(|e| vec![format!("{} (with {} from the environment)", e.message().trim(), names.join(", "))])?
        };
        Config::validate(raw, base)
    }

    fn validate(raw: RawConfig, base: &Path) -> Result<Config, Vec<String>> {
        let mut v = Validator { problems: Vec::new(), base: base.to_path_buf() };
        let (listen, http_listen, shutdown_timeout, max_manifest_size) = v.server(&raw.server);
        let trusted_proxies = v.trusted_proxies(raw.server.trusted_proxies.as_deref().unwrap_or_default());
        let limits = v.limits(&raw.server);
        let namespaces = v.private(raw.private);
        let upstreams = v.upstreams(raw.upstream)?;
        let (tag_ttl, serve_stale, upstream_timeout, pins, pin_refresh) = v.cache(&raw.cache, &upstreams);
        let max_size = raw.storage.max_size.as_deref().map(|s| v.size("storage.max_size", s));
        let upload_expiry = v.duration("storage.upload_expiry", raw.storage.upload_expiry.as_deref().unwrap_or("24h"));
        let tls = v.tls(raw.tls);
        let metrics_listen = raw.metrics.map(|m| v.addr("metrics.listen", &m.listen));
        let log_format = v.log(&raw.log);
        let auth = raw.auth.map(|a| v.auth(a));
        let storage_root = v.resolve(raw.storage.root.unwrap_or_else(|| "data".into()));
        let backend = v.backend(raw.storage.backend.as_deref(), raw.storage.s3);
        let advertise = v.cluster(raw.cluster, &backend);
        if !v.problems.is_empty() {
            return Err(v.problems);
        }
        Ok(Config {
            listen,
            trusted_proxies,
            limits,
            http_listen,
            shutdown_timeout,
            max_manifest_size,
            storage_root,
            backend,
            max_size,
            upload_expiry,
            private_namespaces: namespaces,
            upstreams,
            tag_ttl,
            serve_stale,
            upstream_timeout,
            pins,
            pin_refresh,
            pin_referrers: raw.cache.pin_referrers.unwrap_or(false),
            tls,
            metrics_listen,
            log_format,
            auth,
            ui_enabled: raw.ui.enabled.unwrap_or(true),
            advertise,
        })
    }
}

/// toml's own message names the key; add where it is, as line and column.
fn describe_toml_error(e: &toml::de::Error, text: &str) -> String {
    let msg = e.message().trim().to_string();
    let location = e
        .span()
        .map(|s| {
            let before = &text[..s.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!(" (line {line}, column {column})")
        })
        .unwrap_or_default();
    format!("{msg}{location}")
}

struct Validator {
    problems: Vec<String>,
    /// The config file's folder: relative paths are relative to it.
    base: PathBuf,
}
/// One section of `mirror.toml` each.
impl Validator {
    /// A path from the file, relative to the file's folder.
    fn resolve(&self, p: PathBuf) -> PathBuf {
        if p.is_absolute() {
            p
        } else {
            self.base.join(p)
        }
    }

    fn server(&mut self, server: &RawServer) -> (SocketAddr, Option<SocketAddr>, Duration, u64) {
        let v = self;
        let listen = v.addr("server.listen", server.listen.as_deref().unwrap_or("0.0.0.0:5000"));
        let http_listen = server.http_listen.as_deref().map(|s| v.addr("server.http_listen", s));
        let shutdown_timeout =
            v.duration("server.shutdown_timeout", server.shutdown_timeout.as_deref().unwrap_or("30s"));
        let max_manifest_size =
            v.size("server.max_manifest_size", server.max_manifest_size.as_deref().unwrap_or("4MiB"));

        (listen, http_listen, shutdown_timeout, max_manifest_size)
    }

    fn limits(&mut self, server: &RawServer) -> Limits {
        let header_read_timeout =
            self.duration("server.header_read_timeout", server.header_read_timeout.as_deref().unwrap_or("30s"));
        let idle_timeout = self.duration("server.idle_timeout", server.idle_timeout.as_deref().unwrap_or("120s"));
        let max_connections = server.max_connections.unwrap_or(4096);
        if max_connections == 0 {
            self.problem("server.max_connections = 0 would serve nobody: use at least 1 (default 4096)".into());
        }
        for (key, d) in [("server.header_read_timeout", header_read_timeout), ("server.idle_timeout", idle_timeout)] {
            if d.is_zero() && self.problems.iter().all(|p| !p.starts_with(key)) {
                self.problem(format!("{key} must be longer than 0s"));
            }
        }
        let max_upload_size = server.max_upload_size.as_deref().map(|s| self.size("server.max_upload_size", s));
        Limits { header_read_timeout, idle_timeout, max_connections: max_connections.max(1), max_upload_size }
    }

    fn trusted_proxies(&mut self, entries: &[String]) -> TrustedProxies {
        let mut nets = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            let parsed =
                e.parse::<ipnet::IpNet>().ok().or_else(|| e.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from));
            match parsed {
                Some(net) => nets.push(net),
                None => self.problem(format!(
                    "server.trusted_proxies[{i}] = {e:?} is not an address or CIDR: use e.g. \"10.0.0.5\" or \"10.0.0.0/8\""
                )),
            }
        }
        TrustedProxies(nets)
    }

    fn private(&mut self, private: RawPrivate) -> Vec<String> {
        let v = self;
        let namespaces = private.namespaces.unwrap_or_else(|| vec!["private".to_string()]);
        for (i, ns) in namespaces.iter().enumerate() {
            if RepoName::parse(ns).is_err() {
                v.problem(format!("private.namespaces[{i}] = {ns:?} is not a valid repository name prefix (lowercase letters, digits, '.', '_', '-', separated by '/')"));
            }
        }

        namespaces
    }

    fn upstreams(&mut self, raw_upstreams: Vec<RawUpstream>) -> Result<Vec<UpstreamConfig>, Vec<String>> {
        let v = self;
        let base = v.base.clone();
        let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let mut upstreams = Vec::new();
        for (i, u) in raw_upstreams.into_iter().enumerate() {
            let key = format!("upstream[{i}]");
            if upstreams.iter().any(|x: &UpstreamConfig| x.name == u.name) {
                v.problem(format!("{key}.name = {:?} is a duplicate: each upstream needs its own name", u.name));
            }
            if u.name.is_empty() || u.name.contains('/') || u.name != u.name.to_ascii_lowercase() {
                v.problem(format!(
                    "{key}.name = {:?} must be a lowercase registry host name such as \"docker.io\"",
                    u.name
                ));
            }
            let url = match reqwest::Url::parse(&u.url) {
                Ok(url) if !url.username().is_empty() || url.password().is_some() => {
                    v.problem(format!("{key}.url must not carry credentials: use {key}.username with password_file or password_env (the URL would reach logs)"));
                    None
                }
                Ok(url) if (url.scheme() == "http" || url.scheme() == "https") && url.host().is_some() => Some(url),
                _ => {
                    v.problem(format!("{key}.url = {:?} is not a valid URL: use http:// or https:// followed by a host, such as \"https://registry-1.docker.io\"", u.url));
                    None
                }
            };
            let password = match (&u.password_file, &u.password_env) {
                (Some(_), Some(_)) => {
                    v.problem(format!("{key}: set password_file or password_env, not both"));
                    None
                }
                (Some(file), None) => match std::fs::read_to_string(resolve(file.clone())) {
                    Ok(s) => Some(s.trim_end_matches(['\n', '\r']).to_string()),
                    Err(e) => {
                        v.problem(format!("{key}.password_file = {:?} cannot be read: {e}", file.display()));
                        None
                    }
                },
                (None, Some(var)) => match std::env::var(var) {
                    Ok(s) => Some(s),
                    Err(_) => {
                        v.problem(format!("{key}.password_env = {var:?}: that environment variable is not set"));
                        None
                    }
                },
                (None, None) => None,
            };
            if password.is_some() && u.username.is_none() {
                v.problem(format!("{key}: a password is set but username is missing"));
            }
            if let Some(url) = url {
                upstreams.push(UpstreamConfig { name: u.name, url, username: u.username, password });
            }
        }
        if upstreams.is_empty() && v.problems.is_empty() {
            upstreams.push(UpstreamConfig {
                name: "docker.io".into(),
                url: reqwest::Url::parse("https://registry-1.docker.io").map_err(|e| vec![e.to_string()])?,
                username: None,
                password: None,
            });
        }

        Ok(upstreams)
    }

    #[allow(clippy::type_complexity)]
    fn cache(
        &mut self,
        cache: &RawCache,
        upstreams: &[UpstreamConfig],
    ) -> (Duration, bool, Duration, Vec<Pin>, Duration) {
        let v = self;
        let tag_ttl = v.duration("cache.tag_ttl", cache.tag_ttl.as_deref().unwrap_or("5m"));
        let upstream_timeout = v.duration("cache.upstream_timeout", cache.upstream_timeout.as_deref().unwrap_or("30s"));
        let pin_refresh = v.duration("cache.pin_refresh", cache.pin_refresh.as_deref().unwrap_or("1h"));
        let mut pins = Vec::new();
        for (i, p) in cache.pin.iter().enumerate() {
            let parsed = p.rsplit_once(':').and_then(|(name, tag)| {
                let (upstream, repository) = name.split_once('/')?;
                let known = upstreams.iter().any(|u| u.name == upstream);
                let valid_tag = tag == "*" || crate::oci::valid_tag(tag);
                (known && valid_tag && RepoName::parse(repository).is_ok()).then(|| Pin {
                    upstream: upstream.to_string(),
                    repository: repository.to_string(),
                    tag: (tag != "*").then(|| tag.to_string()),
                })
            });
            match parsed {
            Some(pin) => pins.push(pin),
            None => v.problem(format!("cache.pin[{i}] = {p:?} is not a pinnable image: use UPSTREAM/REPOSITORY:TAG (or :*) with a configured upstream name, such as \"docker.io/library/alpine:3.20\"")),
        }
        }

        (tag_ttl, cache.serve_stale.unwrap_or(true), upstream_timeout, pins, pin_refresh)
    }

    fn tls(&mut self, tls: Option<RawTls>) -> TlsConfig {
        let v = self;
        let base = v.base.clone();
        let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let tls = match tls {
            None => TlsConfig::Off,
            Some(t) => match t.mode.as_deref().unwrap_or("self-signed") {
                "off" => TlsConfig::Off,
                "self-signed" => {
                    TlsConfig::SelfSigned { dir: resolve(t.dir.unwrap_or_else(|| "certs".into())), hosts: t.hosts }
                }
                "files" => match (t.cert, t.key) {
                    (Some(cert), Some(key)) => {
                        let (cert, key) = (resolve(cert), resolve(key));
                        for (k, p) in [("tls.cert", &cert), ("tls.key", &key)] {
                            if !p.is_file() {
                                v.problem(format!("{k} = {:?}: no such file", p.display()));
                            }
                        }
                        TlsConfig::Files { cert, key }
                    }
                    _ => {
                        v.problem("tls.mode = \"files\" needs both tls.cert and tls.key (PEM files)".into());
                        TlsConfig::Off
                    }
                },
                other => {
                    v.problem(format!(
                        "tls.mode = {other:?} is not allowed: use \"self-signed\", \"files\" or \"off\""
                    ));
                    TlsConfig::Off
                }
            },
        };

        tls
    }

    fn backend(&mut self, backend: Option<&str>, s3: Option<RawS3>) -> StorageBackend {
        match (backend.unwrap_or("fs"), s3) {
            ("fs", _) => StorageBackend::Fs,
            ("s3", None) => {
                self.problem("storage.backend = \"s3\" needs a [storage.s3] section with at least bucket".into());
                StorageBackend::Fs
            }
            ("s3", Some(s3)) => {
                if s3.bucket.len() < 3 {
                    self.problem(format!(
                        "storage.s3.bucket = {:?}: a bucket name has 3 characters or more",
                        s3.bucket
                    ));
                }
                if let Some(e) = &s3.endpoint {
                    if reqwest::Url::parse(e).map_or(true, |u| !matches!(u.scheme(), "http" | "https")) {
                        self.problem(format!(
                            "storage.s3.endpoint = {e:?} is not a URL: use http:// or https:// and a host"
                        ));
                    }
                }
                let secret_access_key = s3.secret_access_key_file.map(|p| self.resolve(p)).and_then(|p| {
                    match std::fs::read_to_string(&p) {
                        Ok(s) => Some(s.trim().to_string()),
                        Err(e) => {
                            self.problem(format!("storage.s3.secret_access_key_file = {:?}: {e}", p.display()));
                            None
                        }
                    }
                });
                StorageBackend::S3(S3Config {
                    bucket: s3.bucket,
                    endpoint: s3.endpoint,
                    region: s3.region.unwrap_or_else(|| "us-east-1".into()),
                    prefix: s3.prefix,
                    access_key_id: s3.access_key_id,
                    secret_access_key,
                    redirect: s3.redirect.unwrap_or(false),
                })
            }
            (other, _) => {
                self.problem(format!("storage.backend = {other:?} is not allowed: use \"fs\" or \"s3\""));
                StorageBackend::Fs
            }
        }
    }

    fn cluster(&mut self, cluster: RawCluster, backend: &StorageBackend) -> Option<String> {
        let advertise = cluster.advertise?;
        let url = reqwest::Url::parse(&advertise).ok().filter(|u| {
            matches!(u.scheme(), "http" | "https")
                && u.host().is_some()
                && matches!(u.path(), "" | "/")
                && u.query().is_none()
                && u.fragment().is_none()
                && u.username().is_empty()
                && u.password().is_none()
        });
        if url.is_none() {
            self.problem(format!(
                "cluster.advertise = {advertise:?} is not a base URL: use http(s)://HOST:PORT, where the other replicas reach this one"
            ));
        }
        if matches!(backend, StorageBackend::Fs) {
            self.problem(
                "cluster.advertise needs storage.backend = \"s3\": replicas coordinate through a shared bucket".into(),
            );
        }
        Some(advertise.trim_end_matches('/').to_string())
    }

    fn log(&mut self, log: &RawLog) -> LogFormat {
        let v = self;
        let log_format = match log.format.as_deref().unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                v.problem(format!("log.format = {other:?} is not allowed: use \"text\" or \"json\""));
                LogFormat::Text
            }
        };

        log_format
    }

    fn auth(&mut self, a: RawAuth) -> AuthConfig {
        let v = self;
        let anonymous = match a.anonymous.as_deref().unwrap_or("pull-mirror") {
            "pull-mirror" => Anonymous::PullMirror,
            "pull" => Anonymous::Pull,
            "none" => Anonymous::None,
            other => {
                v.problem(format!(
                    "auth.anonymous = {other:?} is not allowed: use \"pull-mirror\", \"pull\" or \"none\""
                ));
                Anonymous::None
            }
        };
        let token_ttl = v.duration("auth.token_ttl", a.token_ttl.as_deref().unwrap_or("5m"));
        let (shortest, longest) = (Duration::from_secs(1), Duration::from_secs(7 * 86400));
        if (token_ttl < shortest || token_ttl > longest) && v.problems.iter().all(|p| !p.starts_with("auth.token_ttl"))
        {
            v.problem(format!(
                "auth.token_ttl = {:?} is out of range: use from \"1s\" to \"7d\" (clients fetch a new token when one expires)",
                a.token_ttl.as_deref().unwrap_or_default()
            ));
        }
        let mut grants = Vec::new();
        for (i, g) in a.grant.into_iter().enumerate() {
            let access = match g.access.as_str() {
                "pull" => Action::Pull,
                "push" => Action::Push,
                "delete" => Action::Delete,
                other => {
                    v.problem(format!(
                        "auth.grant[{i}].access = {other:?} is not allowed: use \"pull\", \"push\" or \"delete\""
                    ));
                    Action::Pull
                }
            };
            let mut repositories = Vec::new();
            for (j, r) in g.repositories.iter().enumerate() {
                match glob::Pattern::new(r) {
                    Ok(p) => repositories.push(p),
                    Err(e) => v.problem(format!("auth.grant[{i}].repositories[{j}] = {r:?} is not a valid glob: {e}")),
                }
            }
            grants.push(Grant { users: g.users, repositories, access });
        }
        AuthConfig { htpasswd: v.resolve(a.htpasswd), anonymous, token_ttl, grants }
    }
}

impl Validator {
    fn problem(&mut self, p: String) {
        self.problems.push(p);
    }

    fn addr(&mut self, key: &str, value: &str) -> SocketAddr {
        value.parse().unwrap_or_else(|_| {
            self.problem(format!(
                "{key} = {value:?} is not an address: use IP:PORT, such as \"0.0.0.0:5000\" or \"[::]:5000\""
            ));
            SocketAddr::from(([0, 0, 0, 0], 0))
        })
    }

    fn size(&mut self, key: &str, value: &str) -> u64 {
        parse_size(value).unwrap_or_else(|| {
            self.problem(format!("{key} = {value:?} is not a size: use a number with a unit B, KiB, MiB, GiB or TiB (KB, MB, GB, TB for powers of 1000), such as \"4MiB\" or \"50GiB\""));
            0
        })
    }

    fn duration(&mut self, key: &str, value: &str) -> Duration {
        parse_duration(value).unwrap_or_else(|| {
            self.problem(format!("{key} = {value:?} is not a duration: use a number with a unit ms, s, m, h or d, such as \"30s\" or \"5m\""));
            Duration::ZERO
        })
    }
}

fn split_number(s: &str) -> Option<(u64, &str)> {
    let s = s.trim();
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n = s[..end].parse().ok()?;
    Some((n, s[end..].trim()))
}

pub fn parse_size(s: &str) -> Option<u64> {
    let (n, unit) = split_number(s)?;
    let mult: u64 = match unit {
        "B" | "" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

pub fn parse_duration(s: &str) -> Option<Duration> {
    let (n, unit) = split_number(s)?;
    Some(match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60)?),
        "h" => Duration::from_secs(n.checked_mul(3600)?),
        "d" => Duration::from_secs(n.checked_mul(86400)?),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_overrides_common_keys_and_is_named_in_errors() {
        let env =
            |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>();
        let file = "[server]\nlisten = \"0.0.0.0:5000\"\n[storage]\nroot = \"data\"\n";
        let c = Config::parse_with_env(
            file,
            Path::new("/x"),
            env(&[
                ("REGMIRROR_LISTEN", "127.0.0.1:6000"),
                ("REGMIRROR_STORAGE_ROOT", "/var/lib/regmirror"),
                ("REGMIRROR_TLS_HOSTS", "mirror.example, 10.0.0.5"),
                ("REGMIRROR_MAX_SIZE", "1GiB"),
                ("REGMIRROR_UNRELATED", "x"),
            ]),
        )
        .expect("valid");
        assert_eq!(c.listen, "127.0.0.1:6000".parse().expect("addr"));
        assert_eq!(c.storage_root, PathBuf::from("/var/lib/regmirror"));
        assert_eq!(c.max_size, Some(1 << 30));
        match &c.tls {
            TlsConfig::SelfSigned { hosts, dir } => {
                assert_eq!(hosts, &["mirror.example".to_string(), "10.0.0.5".to_string()]);
                assert_eq!(dir, &PathBuf::from("/x/certs"));
            }
            other => panic!("tls.hosts alone means self-signed, got {other:?}"),
        }
        let bad = Config::parse_with_env(file, Path::new("/x"), env(&[("REGMIRROR_LISTEN", "nowhere")]))
            .expect_err("not an address");
        assert!(bad.iter().any(|p| p.contains("server.listen") && p.contains("nowhere")), "{bad:?}");
        let bad = Config::parse_with_env(file, Path::new("/x"), env(&[("REGMIRROR_TLS_MODE", "maybe")]))
            .expect_err("not a mode");
        assert!(bad.iter().any(|p| p.contains("maybe")), "{bad:?}");
        // An empty variable is unset; errors in the file still point at their line.
        let c = Config::parse_with_env(file, Path::new("/x"), env(&[("REGMIRROR_MAX_SIZE", "")])).expect("valid");
        assert_eq!(c.max_size, None);
        let bad =
            Config::parse_with_env("[server]\nlisten = 5\n", Path::new("/x"), env(&[("REGMIRROR_MAX_SIZE", "1GiB")]))
                .expect_err("listen is not a string");
        assert!(bad.iter().any(|p| p.contains("line 2")), "{bad:?}");
        // Without overrides the file alone decides.
        let c = Config::parse_with_env(file, Path::new("/x"), env(&[])).expect("valid");
        assert_eq!(c.listen, "0.0.0.0:5000".parse().expect("addr"));
    }

    fn problems(toml: &str) -> Vec<String> {
        Config::parse(toml, Path::new("/etc/regmirror")).err().unwrap_or_default()
    }

    #[test]
    fn defaults() {
        let c = Config::parse("", Path::new("/x")).unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:5000");
        assert_eq!(c.storage_root, PathBuf::from("/x/data"));
        assert_eq!(c.max_manifest_size, 4 << 20);
        assert_eq!(c.upstreams[0].name, "docker.io");
        assert_eq!(c.tls, TlsConfig::Off);
        assert_eq!(c.tag_ttl, Duration::from_secs(300));
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("4MiB"), Some(4 << 20));
        assert_eq!(parse_size("50GiB"), Some(50 << 30));
        assert_eq!(parse_size("4 MB"), Some(4_000_000));
        assert_eq!(parse_size("4mb"), None);
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("5"), None);
    }

    #[test]
    fn exact_error_texts() {
        assert_eq!(
            problems("[server]\nlisten = \"0.0.0.0:5000\"\nlisten_port = 1\n"),
            vec!["unknown field `listen_port`, expected one of `listen`, `header_read_timeout`, `idle_timeout`, `max_connections`, `max_upload_size`, `trusted_proxies`, `http_listen`, `shutdown_timeout`, `max_manifest_size` (line 3, column 1)"]
        );
        assert_eq!(
            problems("[server]\nmax_manifest_size = \"4 megs\"\n"),
            vec!["server.max_manifest_size = \"4 megs\" is not a size: use a number with a unit B, KiB, MiB, GiB or TiB (KB, MB, GB, TB for powers of 1000), such as \"4MiB\" or \"50GiB\""]
        );
        assert_eq!(
            problems("[cache]\ntag_ttl = \"5 minutes\"\n"),
            vec!["cache.tag_ttl = \"5 minutes\" is not a duration: use a number with a unit ms, s, m, h or d, such as \"30s\" or \"5m\""]
        );
        assert_eq!(
            problems("[[upstream]]\nname = \"a.io\"\nurl = \"https://a.io\"\n[[upstream]]\nname = \"b.io\"\nurl = \"ftp:/x\"\n"),
            vec!["upstream[1].url = \"ftp:/x\" is not a valid URL: use http:// or https:// followed by a host, such as \"https://registry-1.docker.io\""]
        );
        assert_eq!(
            problems("[[upstream]]\nname = \"a.io\"\nurl = \"https://a.io\"\n[[upstream]]\nname = \"a.io\"\nurl = \"https://b.io\"\n"),
            vec!["upstream[1].name = \"a.io\" is a duplicate: each upstream needs its own name"]
        );
        assert_eq!(
            problems("[[upstream]]\nname = \"a.io\"\nurl = \"https://me:secret@a.io\"\n"),
            vec!["upstream[0].url must not carry credentials: use upstream[0].username with password_file or password_env (the URL would reach logs)"]
        );
        assert_eq!(
            problems("[tls]\nmode = \"on\"\n"),
            vec!["tls.mode = \"on\" is not allowed: use \"self-signed\", \"files\" or \"off\""]
        );
        assert_eq!(
            problems("[tls]\nmode = \"files\"\ncert = \"missing.pem\"\nkey = \"/nonexistent/key.pem\"\n"),
            vec![
                "tls.cert = \"/etc/regmirror/missing.pem\": no such file",
                "tls.key = \"/nonexistent/key.pem\": no such file"
            ]
        );
    }

    #[test]
    fn pins_and_max_size() {
        let c = Config::parse(
            "[storage]\nmax_size = \"200GiB\"\n[cache]\npin = [\"docker.io/library/alpine:3.20\", \"docker.io/org/tool:*\"]\npin_refresh = \"1h\"\n",
            Path::new("/x"),
        )
        .unwrap();
        assert_eq!(c.max_size, Some(200 << 30));
        assert_eq!(
            c.pins[0],
            Pin { upstream: "docker.io".into(), repository: "library/alpine".into(), tag: Some("3.20".into()) }
        );
        assert_eq!(c.pins[1].tag, None);
        assert_eq!(
            problems("[cache]\npin = [\"quay.io/x:1\"]\n"),
            vec!["cache.pin[0] = \"quay.io/x:1\" is not a pinnable image: use UPSTREAM/REPOSITORY:TAG (or :*) with a configured upstream name, such as \"docker.io/library/alpine:3.20\""]
        );
    }

    #[test]
    fn names_route_to_their_origin() {
        let c = Config::parse(
            "[[upstream]]\nname = \"docker.io\"\nurl = \"https://a.io\"\n[[upstream]]\nname = \"ghcr.io\"\nurl = \"https://b.io\"\n",
            Path::new("/x"),
        )
        .unwrap();
        let ns = c.namespaces();
        let name = |s: &str| RepoName::parse(s).unwrap();
        let mirrored =
            |u: &str, r: &str, l: &str| Origin::Mirrored { upstream: u.into(), remote: name(r), local: name(l) };
        assert_eq!(
            ns.route(name("nginx"), None),
            Ok(mirrored("docker.io", "library/nginx", "docker.io/library/nginx"))
        );
        assert_eq!(ns.route(name("ghcr.io/org/x"), None), Ok(mirrored("ghcr.io", "org/x", "ghcr.io/org/x")));
        assert_eq!(ns.route(name("org/x"), Some("ghcr.io")), Ok(mirrored("ghcr.io", "org/x", "ghcr.io/org/x")));
        assert_eq!(ns.route(name("ghcr.io/org/x"), Some("ghcr.io")), Ok(mirrored("ghcr.io", "org/x", "ghcr.io/org/x")));
        assert_eq!(ns.route(name("private/a"), None), Ok(Origin::Local(name("private/a"))));
        assert_eq!(ns.route(name("x"), Some("quay.io")), Err(RouteError::UnknownRegistry("quay.io".into())));
        // The names the store keeps answer the same question the same way.
        assert!(ns.is_mirrored(&name("docker.io/library/nginx")) && !ns.is_mirrored(&name("private/a")));
        assert!(!ns.is_mirrored(&name("docker.io")));
        // Without a docker.io upstream, names that match nothing are local.
        let ns = Config::parse("[[upstream]]\nname = \"ghcr.io\"\nurl = \"https://b.io\"\n", Path::new("/x"))
            .unwrap()
            .namespaces();
        assert_eq!(ns.route(name("team/app"), None), Ok(Origin::Local(name("team/app"))));
    }

    #[test]
    fn token_lifetimes_are_bounded() {
        let auth = |ttl: &str| format!("[auth]\nhtpasswd = \"h\"\ntoken_ttl = \"{ttl}\"\n");
        assert_eq!(
            problems(&auth("213503982334601d")),
            vec!["auth.token_ttl = \"213503982334601d\" is out of range: use from \"1s\" to \"7d\" (clients fetch a new token when one expires)"]
        );
        assert_eq!(problems(&auth("0s")).len(), 1);
        assert!(problems(&auth("1h")).is_empty());
    }

    #[test]
    fn replicas_need_a_bucket_and_a_base_url() {
        let s3 = "[storage]\nbackend = \"s3\"\n[storage.s3]\nbucket = \"regmirror\"\n";
        let with = |storage: &str, advertise: &str| format!("{storage}[cluster]\nadvertise = \"{advertise}\"\n");
        let c = Config::parse(&with(s3, "https://10.0.0.5:5000/"), Path::new("/x")).expect("valid");
        assert_eq!(c.advertise.as_deref(), Some("https://10.0.0.5:5000"));
        assert!(Config::parse(s3, Path::new("/x")).expect("valid").advertise.is_none());
        let fs = problems(&with("", "http://10.0.0.5:5000"));
        assert!(fs.len() == 1 && fs[0].contains("needs storage.backend = \"s3\""), "{fs:?}");
        for bad in ["10.0.0.5:5000", "ftp://h:1", "http://h:1/v2", "http://h:1/?x=1", "http://u:p@h:1", "http://h:1/#f"]
        {
            assert_eq!(problems(&with(s3, bad)).len(), 1, "{bad} was taken");
        }
    }

    #[test]
    fn every_problem_is_reported() {
        let p = problems("[server]\nlisten = \"nope\"\nshutdown_timeout = \"x\"\n[log]\nformat = \"xml\"\n");
        assert_eq!(p.len(), 3, "{p:?}");
    }
}
