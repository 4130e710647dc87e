//! TLS: rustls with the ring provider, TLS 1.2 and 1.3, ALPN h2 and http/1.1. Certificates come
//! from PEM files or from a CA regmirror mints itself; either way they can be swapped at run time
//! (SIGHUP or a change on disk) without dropping open connections.

use crate::storage::fs::atomic_write;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::{Deserialize, Serialize};

use crate::config::TlsConfig;

pub const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
const SERVER_CERT: &str = "server.crt";
const SERVER_KEY: &str = "server.key";
/// What the current server certificate was issued for, so a changed `hosts` re-issues it.
const SERVER_INFO: &str = "server.json";

const CA_VALIDITY_DAYS: i64 = 3650;
const LEAF_VALIDITY_DAYS: i64 = 397;
const RENEW_BEFORE_DAYS: u64 = 30;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {what}")]
    File { path: PathBuf, what: String },
    #[error("generating certificates: {0}")]
    Generate(String),
}

fn file_err(path: &Path, what: impl std::fmt::Display) -> TlsError {
    TlsError::File { path: path.to_path_buf(), what: what.to_string() }
}

/// The SAN list of the server certificate: configured hosts, the hostname, loopback and every
/// interface address, de-duplicated and sorted so a comparison says whether it changed.
pub fn server_names(hosts: &[String]) -> Vec<String> {
    let mut names: Vec<String> = hosts.to_vec();
    if let Ok(h) = fs::read_to_string("/proc/sys/kernel/hostname") {
        let h = h.trim();
        if !h.is_empty() {
            names.push(h.to_string());
        }
    }
    names.extend(["localhost", "127.0.0.1", "::1"].map(String::from));
    if let Ok(ifaces) = if_addrs::get_if_addrs() {
        for i in ifaces {
            let ip = i.ip();
            // Link-local IPv6 needs a zone and cannot be a SAN.
            if !matches!(ip, std::net::IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80) {
                names.push(ip.to_string());
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

#[derive(Serialize, Deserialize, PartialEq)]
struct ServerInfo {
    names: Vec<String>,
    not_after: u64,
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "regmirror CA");
    dn.push(DnType::OrganizationName, "regmirror");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p.not_before = time_offset(-1);
    p.not_after = time_offset(CA_VALIDITY_DAYS);
    p
}

fn time_offset(days: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc() + time::Duration::days(days)
}

/// Write a private key readable by its owner only.
fn write_private(path: &Path, pem: &str) -> Result<(), TlsError> {
    atomic_write(path, pem.as_bytes(), 0o600).map_err(|e| file_err(path, e))
}

fn write_public(path: &Path, pem: &str) -> Result<(), TlsError> {
    atomic_write(path, pem.as_bytes(), 0o644).map_err(|e| file_err(path, e))
}

/// What `ensure_self_signed` did, for the log.
#[derive(Debug, PartialEq)]
pub struct Issued {
    pub new_ca: bool,
    pub new_leaf: bool,
    pub names: Vec<String>,
}

/// Make sure `dir` holds a CA and a current server certificate for `hosts`: create the CA when
/// missing, (re-)issue the leaf when missing, when the names changed or within 30 days of expiry.
pub fn ensure_self_signed(dir: &Path, hosts: &[String]) -> Result<Issued, TlsError> {
    fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
    let ca_key_path = dir.join(CA_KEY);
    let ca_cert_path = dir.join(CA_CERT);
    let mut new_ca = false;
    let ca_key = if ca_key_path.exists() && ca_cert_path.exists() {
        let pem = fs::read_to_string(&ca_key_path).map_err(|e| file_err(&ca_key_path, e))?;
        KeyPair::from_pem(&pem).map_err(|e| file_err(&ca_key_path, format!("not a usable CA key: {e}")))?
    } else {
        let key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| TlsError::Generate(e.to_string()))?;
        let cert = ca_params().self_signed(&key).map_err(|e| TlsError::Generate(e.to_string()))?;
        write_private(&ca_key_path, &key.serialize_pem())?;
        write_public(&ca_cert_path, &cert.pem())?;
        new_ca = true;
        key
    };
    let names = server_names(hosts);
    let info_path = dir.join(SERVER_INFO);
    let current: Option<ServerInfo> = fs::read(&info_path).ok().and_then(|b| serde_json::from_slice(&b).ok());
    let leaf_ok = !new_ca
        && dir.join(SERVER_CERT).exists()
        && dir.join(SERVER_KEY).exists()
        && current.as_ref().is_some_and(|c| c.names == names && c.not_after > unix_now() + RENEW_BEFORE_DAYS * 86400);
    if leaf_ok {
        return Ok(Issued { new_ca, new_leaf: false, names });
    }
    // The issuer is rebuilt from the same parameters and key, so the leaf chains to the CA
    // clients already trust.
    let issuer = Issuer::new(ca_params(), &ca_key);
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        names.iter().find(|n| n.parse::<std::net::IpAddr>().is_err()).cloned().unwrap_or_else(|| "regmirror".into()),
    );
    params.distinguished_name = dn;
    params.subject_alt_names = names
        .iter()
        .filter_map(|n| match n.parse::<std::net::IpAddr>() {
            Ok(ip) => Some(SanType::IpAddress(ip)),
            Err(_) => n.clone().try_into().ok().map(SanType::DnsName),
        })
        .collect();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_before = time_offset(-1);
    params.not_after = time_offset(LEAF_VALIDITY_DAYS);
    let leaf_key =
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| TlsError::Generate(e.to_string()))?;
    let leaf = params.signed_by(&leaf_key, &issuer).map_err(|e| TlsError::Generate(e.to_string()))?;
    let ca_pem = fs::read_to_string(&ca_cert_path).map_err(|e| file_err(&ca_cert_path, e))?;
    write_private(&dir.join(SERVER_KEY), &leaf_key.serialize_pem())?;
    // The chain carries the CA too, as clients that were given only the CA expect.
    write_public(&dir.join(SERVER_CERT), &format!("{}{}", leaf.pem(), ca_pem))?;
    let info = ServerInfo { names: names.clone(), not_after: unix_now() + LEAF_VALIDITY_DAYS as u64 * 86400 };
    write_public(&info_path, &serde_json::to_string_pretty(&info).unwrap_or_default())?;
    Ok(Issued { new_ca, new_leaf: true, names })
}

/// Load a PEM chain and key (PKCS#8, PKCS#1 RSA or SEC1 EC).
pub fn load_pem(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| file_err(cert, format!("cannot read: {e}")))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(cert, format!("not a PEM certificate chain: {e}")))?;
    if chain.is_empty() {
        return Err(file_err(cert, "contains no CERTIFICATE block"));
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| file_err(key, format!("no PKCS#8, RSA or EC private key found: {e}")))?;
    let provider = rustls::crypto::ring::default_provider();
    let ck = CertifiedKey::from_der(chain, key_der, &provider)
        .map_err(|e| file_err(key, format!("does not match the certificate {}: {e}", cert.display())))?;
    Ok(Arc::new(ck))
}

/// Where the certificate comes from, and how to load it again.
#[derive(Clone, Debug)]
pub struct CertSource {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Self-signed: the folder and hosts to (re-)issue for.
    pub self_signed: Option<(PathBuf, Vec<String>)>,
}

impl CertSource {
    pub fn from_config(tls: &TlsConfig) -> Option<CertSource> {
        match tls {
            TlsConfig::Off => None,
            TlsConfig::Files { cert, key } => {
                Some(CertSource { cert: cert.clone(), key: key.clone(), self_signed: None })
            }
            TlsConfig::SelfSigned { dir, hosts } => Some(CertSource {
                cert: dir.join(SERVER_CERT),
                key: dir.join(SERVER_KEY),
                self_signed: Some((dir.clone(), hosts.clone())),
            }),
        }
    }

    pub fn load(&self) -> Result<Arc<CertifiedKey>, TlsError> {
        if let Some((dir, hosts)) = &self.self_signed {
            let issued = ensure_self_signed(dir, hosts)?;
            if issued.new_ca {
                tracing::info!(ca = %dir.join(CA_CERT).display(), "created a new CA; clients must trust it once (see `regmirror client-setup`)");
            }
            if issued.new_leaf {
                tracing::info!(names = ?issued.names, "issued a server certificate");
            }
        }
        load_pem(&self.cert, &self.key)
    }

    fn mtimes(&self) -> (Option<SystemTime>, Option<SystemTime>) {
        let m = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
        (m(&self.cert), m(&self.key))
    }
}

/// The certificate in use, swappable while connections stay open.
#[derive(Debug)]
pub struct ReloadableCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

impl ReloadableCert {
    pub fn swap(&self, ck: Arc<CertifiedKey>) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = ck;
    }
}

/// A TLS acceptor and the handle to reload its certificate.
pub struct TlsServer {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub cert: Arc<ReloadableCert>,
    pub source: CertSource,
}

impl TlsServer {
    pub fn new(source: CertSource) -> Result<TlsServer, TlsError> {
        let cert = Arc::new(ReloadableCert { current: RwLock::new(source.load()?) });
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Generate(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(cert.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(TlsServer { acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)), cert, source })
    }

    pub fn reload(&self) {
        match self.source.load() {
            Ok(ck) => {
                self.cert.swap(ck);
                tracing::info!(cert = %self.source.cert.display(), "TLS certificate reloaded");
            }
            Err(e) => {
                tracing::error!(error = %e, "TLS reload failed; keeping the current certificate")
            }
        }
    }

    /// Reload on SIGHUP and whenever the certificate or key file changes on disk.
    pub fn spawn_reloader(self: &Arc<Self>) {
        let server = self.clone();
        tokio::spawn(async move {
            let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGHUP");
                    None
                }
            };
            let mut seen = server.source.mtimes();
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            loop {
                let hup_recv = async {
                    match hup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = hup_recv => {
                        tracing::info!("SIGHUP: reloading the TLS certificate");
                        server.reload();
                        seen = server.source.mtimes();
                    }
                    _ = tick.tick() => {
                        let now = server.source.mtimes();
                        if now != seen {
                            seen = now;
                            server.reload();
                        }
                    }
                }
            }
        });
    }
}

/// The address clients most likely use: the first configured TLS host, else the hostname.
pub fn default_client_host(config: &crate::config::Config) -> String {
    let port = config.listen.port();
    let host = match &config.tls {
        crate::config::TlsConfig::SelfSigned { hosts, .. } if !hosts.is_empty() => hosts[0].clone(),
        _ => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into()),
    };
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The SHA-256 fingerprint of the first certificate in a PEM file, as `openssl x509 -fingerprint
/// -sha256` prints it (colon-separated upper-case hex).
pub fn fingerprint_sha256(pem: &Path) -> Result<String, TlsError> {
    use sha2::Digest as _;
    let cert = CertificateDer::pem_file_iter(pem)
        .map_err(|e| file_err(pem, e))?
        .next()
        .ok_or_else(|| file_err(pem, "no certificate"))?
        .map_err(|e| file_err(pem, e))?;
    let sum = sha2::Sha256::digest(cert.as_ref());
    Ok(sum.iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":"))
}

/// Client setup instructions for a mirror reachable at `host` (HOST:PORT).
pub fn client_setup(host: &str, ca_path: &Path) -> String {
    let ca = ca_path.display();
    let bare = host.rsplit_once(':').map_or(host, |(h, _)| h);
    let bare = bare.trim_start_matches('[').trim_end_matches(']');
    format!(
        r#"regmirror at https://{host} — every client trusts its CA ({ca}) once.
Copy {ca} to each client machine as ca.crt (it is also served at https://{host}/ca.crt;
compare `openssl x509 -fingerprint -sha256 -noout -in ca.crt` with the same command here).

docker (dockerd uses registry-mirrors for docker.io images):
  mkdir -p /etc/docker/certs.d/{host}
  cp ca.crt /etc/docker/certs.d/{host}/ca.crt
  # /etc/docker/daemon.json, then restart dockerd:
  {{ "registry-mirrors": ["https://{host}"] }}
  docker login {host}                      # before pushing to the private namespace
  docker push {host}/private/app:1

containerd (ctr, and the CRI plugin through config_path):
  mkdir -p /etc/containerd/certs.d/docker.io
  cp ca.crt /etc/containerd/certs.d/docker.io/ca.crt
  # /etc/containerd/certs.d/docker.io/hosts.toml:
  server = "https://registry-1.docker.io"

  [host."https://{host}"]
    capabilities = ["pull", "resolve"]
    ca = "/etc/containerd/certs.d/docker.io/ca.crt"
  # the same under certs.d/ghcr.io/ with server = "https://ghcr.io" mirrors ghcr.io
  ctr images pull --hosts-dir /etc/containerd/certs.d docker.io/library/alpine:latest

podman, buildah, skopeo:
  mkdir -p /etc/containers/certs.d/{host}
  cp ca.crt /etc/containers/certs.d/{host}/ca.crt
  # /etc/containers/registries.conf:
  [[registry]]
  prefix = "docker.io"
  location = "docker.io"

  [[registry.mirror]]
  location = "{host}"

skopeo:
  skopeo copy --all docker://{host}/library/alpine:latest oci:alpine:latest

If clients reach the mirror under a name or address other than {bare}, add it to [tls] hosts and
send SIGHUP (or restart): the server certificate is re-issued from the same CA.
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_material_is_reused_and_reissued_from_the_same_ca() {
        let dir = tempfile::tempdir().unwrap();
        let first = ensure_self_signed(dir.path(), &["mirror.example.internal".into()]).unwrap();
        assert!(first.new_ca && first.new_leaf);
        assert!(first.names.contains(&"mirror.example.internal".to_string()));
        assert!(first.names.contains(&"127.0.0.1".to_string()));
        let ca = fs::read(dir.path().join(CA_CERT)).unwrap();
        let mode = fs::metadata(dir.path().join(CA_KEY)).unwrap().permissions();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.mode() & 0o777, 0o600);
        let again = ensure_self_signed(dir.path(), &["mirror.example.internal".into()]).unwrap();
        assert!(!again.new_ca && !again.new_leaf);
        let changed = ensure_self_signed(dir.path(), &["other.example.internal".into()]).unwrap();
        assert!(!changed.new_ca && changed.new_leaf);
        assert_eq!(fs::read(dir.path().join(CA_CERT)).unwrap(), ca);
        load_pem(&dir.path().join(SERVER_CERT), &dir.path().join(SERVER_KEY)).unwrap();
    }

    #[test]
    fn file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("c.pem");
        fs::write(&cert, "nothing here").unwrap();
        let err = load_pem(&cert, &dir.path().join("k.pem")).unwrap_err().to_string();
        assert!(err.contains("c.pem") && err.contains("no CERTIFICATE"), "{err}");
    }
}
