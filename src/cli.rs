//! The command line: `serve` and the operator's subcommands. `main` only parses and calls `run`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Config, LogFormat, TlsConfig, DEFAULT_CONFIG_PATH};

/// A pull-through caching mirror for container registries, with a private namespace.
///
/// regmirror speaks the Registry v2 / OCI Distribution API. Docker (registry-mirrors), containerd
/// (hosts.toml) and podman (registries.conf) pull through it: each blob and manifest is fetched
/// from the upstream once, verified against its digest, stored, and served locally from then on,
/// also while the upstream is down. Repositories under the private namespaces accept pushes from
/// authorised users.
///
/// Every subcommand reads one configuration file: --config, else $REGMIRROR_CONFIG, else
/// ./mirror.toml (the Debian package installs /etc/regmirror/mirror.toml). Environment variables
/// override common keys (listed at the end of --help). RUST_LOG sets the log level.
/// `regmirror check-config` names every problem.
///
/// Signals: SIGHUP reloads the TLS certificate; SIGTERM drains requests (server.shutdown_timeout)
/// and stops. Full documentation: /usr/share/doc/regmirror/README.md.
#[derive(Parser)]
#[command(version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

impl Cli {
    /// The command line as clap sees it, with the environment overrides listed from the table
    /// that applies them, so the help and the behaviour cannot drift apart.
    pub fn command_with_env_help() -> clap::Command {
        let vars: Vec<String> = crate::config::ENV_OVERRIDES
            .iter()
            .map(|o| format!("  {:<28} {}{}", o.var, o.key, if o.list { " (comma-separated)" } else { "" }))
            .collect();
        <Cli as clap::CommandFactory>::command().after_long_help(format!(
            "Environment overrides, each over one key of the file (an empty value counts as unset):\n{}",
            vars.join("\n")
        ))
    }

    /// Parse the process's arguments (exits with clap's message on an error, or after --help).
    pub fn parse_args() -> Cli {
        use clap::FromArgMatches;
        Cli::from_arg_matches(&Self::command_with_env_help().get_matches()).unwrap_or_else(|e| e.exit())
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the registry mirror.
    Serve {
        /// Configuration file.
        #[arg(long, env = "REGMIRROR_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Validate the configuration and print every problem.
    CheckConfig {
        #[arg(long, env = "REGMIRROR_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Create the CA and server certificate (self-signed mode) now, or re-issue the server
    /// certificate when the names changed.
    GenCerts {
        #[arg(long, env = "REGMIRROR_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Add a user to the htpasswd file, or change their password (bcrypt). The password is read
    /// from the terminal without echo, or as one line from standard input.
    Passwd {
        user: String,
        #[arg(long, env = "REGMIRROR_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// The htpasswd file (default: auth.htpasswd from the configuration).
        #[arg(long)]
        htpasswd: Option<PathBuf>,
    },
    /// Pull images through a running mirror so its cache is warm before a rollout.
    Prefetch {
        /// Images, e.g. docker.io/library/nginx:1.27 or ghcr.io/org/tool:2.0.
        #[arg(required = true)]
        images: Vec<String>,
        #[arg(long, env = "REGMIRROR_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// The mirror's URL (default: https://localhost:PORT from the configuration).
        #[arg(long)]
        mirror: Option<String>,
        /// Only this platform of multi-platform images, e.g. linux/arm64 (default: all).
        #[arg(long)]
        platform: Option<String>,
        /// Also every referrer (signatures, SBOMs, attestations) of every manifest, recursively.
        #[arg(long)]
        referrers: bool,
    },
    /// Remove blobs no manifest references any more (after private manifests were deleted).
    /// Safe while the server runs.
    Gc {
        #[arg(long, env = "REGMIRROR_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Say what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Blobs younger than this are kept (uploads in progress, blobs pushed before their manifest).
        #[arg(long, default_value = "1h")]
        grace: String,
    },
    /// Ask the server on this configuration's listen address for /healthz; exit 0 when healthy.
    /// For container HEALTHCHECKs and scripts.
    Healthcheck {
        #[arg(long, env = "REGMIRROR_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Ask this URL instead (default: the listen address on loopback).
        #[arg(long)]
        url: Option<String>,
    },
    /// Write the manual pages (regmirror.1, regmirror-SUBCOMMAND.1) into a folder.
    #[command(hide = true)]
    Man { dir: PathBuf },
    /// Print how docker, containerd, podman and skopeo come to trust and use this mirror.
    ClientSetup {
        #[arg(long, env = "REGMIRROR_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// The address clients use, HOST:PORT (default: this machine's hostname and the port).
        #[arg(long)]
        host: Option<String>,
    },
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::FAILURE
    })
}

/// Run one subcommand to its end.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::GenCerts { config } => {
            let config = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let TlsConfig::SelfSigned { dir, hosts } = &config.tls else {
                eprintln!("gen-certs needs [tls] mode = \"self-signed\" in the configuration");
                return ExitCode::FAILURE;
            };
            match crate::tls::ensure_self_signed(dir, hosts) {
                Ok(issued) => {
                    println!(
                        "CA: {}{}",
                        dir.join(crate::tls::CA_CERT).display(),
                        if issued.new_ca { " (new)" } else { " (kept)" }
                    );
                    println!(
                        "server certificate: {} for {}",
                        if issued.new_leaf { "issued" } else { "kept" },
                        issued.names.join(", ")
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Passwd { user, config, htpasswd } => match passwd(&user, &config, htpasswd) {
            Ok(path) => {
                println!("{user}: password set in {}", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("regmirror passwd: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Prefetch { images, config, mirror, platform, referrers } => {
            let config = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let tls = !matches!(config.tls, TlsConfig::Off);
            let base = mirror.unwrap_or_else(|| {
                format!("{}://localhost:{}", if tls { "https" } else { "http" }, config.listen.port())
            });
            let ca = match &config.tls {
                TlsConfig::SelfSigned { dir, .. } => std::fs::read(dir.join(crate::tls::CA_CERT)).ok(),
                _ => None,
            };
            let base = match reqwest::Url::parse(&base) {
                Ok(u) => u,
                Err(e) => {
                    eprintln!("--mirror {base:?}: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let result = tokio::runtime::Runtime::new().map_err(|e| e.to_string()).and_then(|rt| {
                rt.block_on(crate::prefetch::run(base, ca, &images, platform.as_deref(), referrers))
                    .map_err(|e| e.to_string())
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("regmirror prefetch: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Gc { config, dry_run, grace } => {
            let config = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let Some(grace) = crate::config::parse_duration(&grace) else {
                eprintln!(
                    "--grace {grace:?} is not a duration: use a number with a unit ms, s, m, h or d, such as \"1h\""
                );
                return ExitCode::FAILURE;
            };
            let result = tokio::runtime::Runtime::new().map_err(|e| e.to_string()).and_then(|rt| {
                rt.block_on(async {
                    let store = crate::storage::open(&config, false, &crate::metrics::Metrics::new())
                        .map_err(|e| e.to_string())?;
                    crate::gc::run(&store, &config.namespaces(), grace, dry_run).await.map_err(|e| e.to_string())
                })
            });
            match result {
                Ok(report) => {
                    for (d, size) in &report.removed {
                        println!("{} {d} {size} bytes", if dry_run { "would remove" } else { "removed" });
                    }
                    println!(
                        "{} {} blob(s), {} bytes{}",
                        if dry_run { "would free" } else { "freed" },
                        report.removed.len(),
                        report.freed_bytes,
                        if dry_run { " (dry run: nothing removed)" } else { "" }
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("regmirror gc: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::ClientSetup { config, host } => {
            let config = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let host = host.unwrap_or_else(|| crate::tls::default_client_host(&config));
            match &config.tls {
                TlsConfig::SelfSigned { dir, .. } => print!("{}", crate::tls::client_setup(&host, &dir.join(crate::tls::CA_CERT))),
                TlsConfig::Files { cert, .. } => print!("{}", crate::tls::client_setup(&host, cert)),
                TlsConfig::Off => println!("TLS is off: clients must be told {host} is an insecure registry (or put a TLS-terminating proxy in front)."),
            }
            ExitCode::SUCCESS
        }
        Command::Healthcheck { config, url } => {
            let config = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let url = url.unwrap_or_else(|| healthz_url(&config));
            match healthcheck(&url) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("regmirror healthcheck: {url}: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Man { dir } => match clap_mangen::generate_to(Cli::command_with_env_help(), &dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("regmirror man: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Serve { config } => {
            let config = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            init_tracing(config.log_format);
            let runtime = match serving_runtime() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(serve(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("regmirror: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// /healthz on the listen address as seen from this machine: an unspecified address (0.0.0.0,
/// ::) is asked on loopback.
fn healthz_url(config: &Config) -> String {
    let scheme = if matches!(config.tls, TlsConfig::Off) { "http" } else { "https" };
    let ip = match config.listen.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    format!("{scheme}://{}/healthz", std::net::SocketAddr::new(ip, config.listen.port()))
}

fn healthcheck(url: &str) -> Result<(), String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    // A liveness probe of our own listener, usually on loopback: the certificate names the
    // public host, not 127.0.0.1, and the answer carries nothing secret, so it is not verified.
    // Never through a proxy: containers often have HTTPS_PROXY set for the upstreams.
    let client = reqwest::Client::builder()
        .no_proxy()
        .danger_accept_invalid_certs(true)
        .timeout(std::time::Duration::from_secs(5))
        .build()
        .map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let resp = client.get(url).send().await.map_err(|e| crate::upstream::error_chain(&e))?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(format!("{}", resp.status()))
        }
    })
}

/// The runtime `serve` runs on. Its blocking pool (file operations) is bounded: tokio's default
/// of 512 threads lets a burst of concurrent requests leave a hundred or more threads, and their
/// memory, behind. Blob writes and bcrypt have threads and bounds of their own.
fn serving_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().max_blocking_threads(BLOCKING_THREADS).build()
}

/// Threads for blocking file operations while serving.
const BLOCKING_THREADS: usize = 64;

fn passwd(user: &str, config: &std::path::Path, htpasswd: Option<PathBuf>) -> Result<PathBuf, String> {
    use std::io::IsTerminal;
    let path = match htpasswd {
        Some(p) => p,
        None => Config::load(config)
            .map_err(|e| e.to_string())?
            .auth
            .map(|a| a.htpasswd)
            .ok_or("the configuration has no [auth] section: add one, or name the file with --htpasswd")?,
    };
    let password = if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password(format!("password for {user}: ")).map_err(|e| e.to_string())?;
        let again = rpassword::prompt_password("again: ").map_err(|e| e.to_string())?;
        if first != again {
            return Err("the passwords differ".into());
        }
        first
    } else {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map_err(|e| e.to_string())?;
        line.trim_end_matches(['\n', '\r']).to_string()
    };
    if password.is_empty() {
        return Err("empty password".into());
    }
    crate::auth::set_password(&path, user, &password).map_err(|e| e.to_string())?;
    Ok(path)
}

fn init_tracing(format: LogFormat) {
    use std::io::IsTerminal;
    // rustls warns once per connection about clients that send an IP address as SNI.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rustls=error"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

async fn serve(config: Config) -> Result<(), String> {
    use crate::server::{run, shutdown_signal, Listener};
    let drain = config.shutdown_timeout;
    let state = crate::app::start(config.clone()).await.map_err(|e| e.to_string())?;
    match (&config.auth, &config.tls) {
        (None, _) => tracing::warn!("no [auth] section: this is an open registry; anyone who can reach it may pull and push to the private namespace"),
        (Some(_), TlsConfig::Off) => tracing::warn!("[auth] is on but TLS is off: passwords and tokens cross the network in clear text unless a TLS-terminating proxy is in front"),
        _ => {}
    }
    let app = crate::app::router(state.clone());
    let bind = |addr: std::net::SocketAddr| async move {
        tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("cannot listen on {addr}: {e}"))
    };

    let tls = match crate::tls::CertSource::from_config(&config.tls) {
        Some(source) => {
            let first_start =
                matches!(&config.tls, TlsConfig::SelfSigned { dir, .. } if !dir.join(crate::tls::CA_CERT).exists());
            let server = std::sync::Arc::new(crate::tls::TlsServer::new(source).map_err(|e| e.to_string())?);
            server.spawn_reloader();
            if first_start {
                if let TlsConfig::SelfSigned { dir, .. } = &config.tls {
                    tracing::info!(
                        "first start: clients trust the new CA once. {}",
                        crate::tls::client_setup(
                            &crate::tls::default_client_host(&config),
                            &dir.join(crate::tls::CA_CERT)
                        )
                    );
                }
            }
            Some(server)
        }
        None => None,
    };
    let mut listeners = vec![Listener { tcp: bind(config.listen).await?, tls: tls.clone(), app: app.clone() }];
    tracing::info!(address = %config.listen, tls = tls.is_some(), "regmirror listening");
    if let Some(addr) = config.http_listen {
        listeners.push(Listener { tcp: bind(addr).await?, tls: None, app: app.clone() });
        tracing::info!(address = %addr, "plain HTTP listener");
    }
    if let Some(addr) = config.metrics_listen {
        listeners.push(Listener { tcp: bind(addr).await?, tls: None, app: crate::app::metrics_router(state.clone()) });
        tracing::info!(address = %addr, "metrics on /metrics");
    }
    let limits = config.limits.clone();
    let result =
        run(listeners, state.metrics.clone(), shutdown_signal(), drain, limits).await.map_err(|e| e.to_string());
    crate::app::shutdown(&state).await;
    result
}

#[cfg(test)]
mod help_tests {
    use super::*;

    #[test]
    fn the_long_help_lists_every_environment_override() {
        let help = Cli::command_with_env_help().render_long_help().to_string();
        for o in crate::config::ENV_OVERRIDES {
            assert!(help.contains(o.var) && help.contains(o.key), "{} missing from --help", o.var);
        }
    }
}
