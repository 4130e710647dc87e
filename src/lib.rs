//! regmirror: a pull-through caching mirror for container registries, with a private namespace.
//!
//! # Layout
//!
//! Layers, top to bottom. A module uses only the layers below it (`tests/layers.rs` checks this):
//!
//! ```text
//! main, cli            argument parsing, subcommands
//! app, server          the state handle and router; listeners, TLS accept, graceful shutdown
//! registry/, status/   the OCI Distribution API: routes, handlers, the token endpoint, the one
//!                      error table; the status page and its JSON — the places that build
//!                      HTTP responses
//! cache/, auth,        what to serve and who may: manifest and blob lookups (single flights,
//! cluster              fills), eviction and pins; users, grants and tokens; replicas on one
//!                      bucket (leases, signed requests between them) — content, not responses
//! storage/, upstream/  where bytes live and where they come from, each with its own errors;
//! gc, prefetch         gc works on the store alone; prefetch is a client of a running mirror
//! oci/, config,        vocabulary (digests, names, references, media types, the manifest
//! metrics, tls         parser), settings, counters, certificates
//! ```
//!
//! - [`cli`]: subcommands; [`app`]: [`app::AppState`], [`app::start`] and the router;
//!   [`server`]: listeners and shutdown.
//! - [`registry`]: the API (paths, handlers, [`registry::error`]); [`status`]: `GET /` and
//!   `/api/status`.
//! - [`cache`]: mirrored manifests and blobs ([`cache::Cache`]); [`auth`]: access control;
//!   [`cluster`]: replicas on one bucket.
//! - [`storage`]: the content-addressed store; [`upstream`]: upstream clients and tokens.
//! - [`gc`], [`prefetch`]: operator commands.
//! - [`oci`]: the spec's vocabulary; [`config`]: `mirror.toml`; [`metrics`]; [`tls`].

pub mod app;
pub mod auth;
pub mod cache;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod gc;
pub mod metrics;
pub mod oci;
pub mod prefetch;
pub mod registry;
pub mod server;
pub mod status;
pub mod storage;
pub mod tls;
pub mod upstream;

/// A mutex's guard, also when a panic elsewhere poisoned it: every value behind these mutexes is
/// left consistent between statements (maps and counters), so a panic in one request must not
/// take every later request that touches the same map down with it.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
