//! regmirror: a pull-through caching mirror for container registries, with a private namespace.
//!
//! # Layout
//! - [`config`]: `mirror.toml` → validated [`config::Config`].
//! - [`app`]: the shared state handle and the router.
//! - [`server`]: listeners, graceful shutdown.
//! - [`registry`]: the OCI Distribution API (paths, handlers, the error table).
//! - [`storage`]: the content-addressed store behind a small driver trait.
//! - [`upstream`]: upstream registry clients and the bearer-token flow.
//! - [`cache`]: mirrored manifests and shared blob fills.
//! - [`auth`]: who may pull and push.
//! - [`metrics`]: Prometheus metrics.

pub mod app;
pub mod auth;
pub mod cache;
pub mod config;
pub mod gc;
pub mod metrics;
pub mod prefetch;
pub mod registry;
pub mod server;
pub mod storage;
pub mod tls;
pub mod upstream;
