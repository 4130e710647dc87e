//! Prometheus metrics: one registry, every family prefixed `regmirror_`, labels bounded (route
//! templates, never repository names).

use prometheus::proto::MetricType;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub cache: IntCounterVec,
    pub bytes_served: IntCounterVec,
    pub upstream_requests: IntCounterVec,
    pub upstream_failures: IntCounterVec,
    pub upstream_bytes: IntCounterVec,
    pub token_fetches: IntCounterVec,
    pub fills_in_flight: IntGauge,
    pub fill_waiters: IntGauge,
    pub store_bytes: IntGauge,
    pub store_objects: IntGauge,
    pub tls_handshakes: IntCounter,
    pub tls_handshake_failures: IntCounter,
    pub auth_failures: IntCounter,
    pub password_checks: IntCounter,
    pub fill_duration: Histogram,
    pub store_max_bytes: IntGauge,
    pub pinned_bytes: IntGauge,
    pub evictions: IntCounter,
    pub evicted_bytes: IntCounter,
    pub over_limit: IntGauge,
    pub gc_runs: IntGauge,
    pub gc_freed_bytes: IntGauge,
    pub fill_takeovers: IntCounter,
    pub relayed_bytes: IntCounter,
    pub peer_failures: IntCounter,
    pub blob_redirects: IntCounter,
    pub storage_errors: IntCounterVec,
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("static metric definition");
    r.register(Box::new(c.clone())).expect("metric registered once");
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("static metric definition");
    r.register(Box::new(g.clone())).expect("metric registered once");
    g
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("static metric definition");
    r.register(Box::new(c.clone())).expect("metric registered once");
    c
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "regmirror_request_duration_seconds",
                "Time to answer a request (until headers are sent).",
            )
            .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
            &["method", "route"],
        )
        .expect("static metric definition");
        r.register(Box::new(request_duration.clone())).expect("metric registered once");
        let fill_duration = Histogram::with_opts(
            HistogramOpts::new(
                "regmirror_fill_duration_seconds",
                "Time to fetch and verify one blob from an upstream.",
            )
            .buckets(vec![0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0]),
        )
        .expect("static metric definition");
        r.register(Box::new(fill_duration.clone())).expect("metric registered once");
        Metrics {
            requests: counter_vec(
                &r,
                "regmirror_requests_total",
                "HTTP requests answered.",
                &["method", "route", "status"],
            ),
            request_duration,
            cache: counter_vec(
                &r,
                "regmirror_cache_requests_total",
                "Mirrored content lookups by outcome (hit, miss, stale).",
                &["kind", "upstream", "outcome"],
            ),
            bytes_served: counter_vec(
                &r,
                "regmirror_served_bytes_total",
                "Blob bytes sent to clients, by source.",
                &["source"],
            ),
            upstream_requests: counter_vec(
                &r,
                "regmirror_upstream_requests_total",
                "Requests sent to upstream registries.",
                &["upstream", "kind", "status"],
            ),
            upstream_failures: counter_vec(
                &r,
                "regmirror_upstream_failures_total",
                "Upstream failures by cause.",
                &["upstream", "cause"],
            ),
            upstream_bytes: counter_vec(
                &r,
                "regmirror_upstream_bytes_total",
                "Bytes received from upstream registries (blob and manifest bodies).",
                &["upstream", "kind"],
            ),
            token_fetches: counter_vec(
                &r,
                "regmirror_upstream_token_fetches_total",
                "Bearer tokens fetched from upstream token services.",
                &["upstream"],
            ),
            fills_in_flight: gauge(&r, "regmirror_fills_in_flight", "Blob fills from upstream in progress."),
            fill_waiters: gauge(&r, "regmirror_fill_waiters", "Client responses streaming from a fill in progress."),
            store_bytes: gauge(&r, "regmirror_store_bytes", "Bytes of blob content in the store."),
            store_objects: gauge(&r, "regmirror_store_objects", "Blobs in the store."),
            tls_handshakes: counter(&r, "regmirror_tls_handshakes_total", "TLS handshakes completed."),
            tls_handshake_failures: counter(
                &r,
                "regmirror_tls_handshake_failures_total",
                "TLS handshakes that failed.",
            ),
            auth_failures: counter(&r, "regmirror_auth_failures_total", "Failed authentication attempts."),
            password_checks: counter(
                &r,
                "regmirror_password_checks_total",
                "Passwords checked with bcrypt (repeats are answered from memory).",
            ),
            fill_duration,
            store_max_bytes: gauge(&r, "regmirror_store_max_bytes", "storage.max_size (0 when unbounded)."),
            pinned_bytes: gauge(&r, "regmirror_pinned_bytes", "Bytes of pinned images in the store."),
            evictions: counter(
                &r,
                "regmirror_evictions_total",
                "Blobs evicted to keep the store under storage.max_size.",
            ),
            evicted_bytes: counter(
                &r,
                "regmirror_evicted_bytes_total",
                "Bytes evicted to keep the store under storage.max_size.",
            ),
            over_limit: gauge(
                &r,
                "regmirror_store_over_limit",
                "1 when private and pinned content alone exceed storage.max_size.",
            ),
            gc_runs: gauge(&r, "regmirror_gc_runs", "Completed `regmirror gc` runs on this store."),
            gc_freed_bytes: gauge(&r, "regmirror_gc_freed_bytes", "Bytes freed by `regmirror gc` runs on this store."),
            fill_takeovers: counter(
                &r,
                "regmirror_cluster_fill_takeovers_total",
                "Fills this replica took over from a replica whose lease expired.",
            ),
            relayed_bytes: counter(
                &r,
                "regmirror_cluster_relayed_bytes_total",
                "Blob bytes received from the replica that runs the fill.",
            ),
            peer_failures: counter(
                &r,
                "regmirror_cluster_peer_failures_total",
                "Requests to another replica that failed (unreachable, broken off, refused).",
            ),
            blob_redirects: counter(
                &r,
                "regmirror_blob_redirects_total",
                "Blob GETs answered with a redirect to the object store (storage.s3.redirect).",
            ),
            storage_errors: counter_vec(
                &r,
                "regmirror_storage_errors_total",
                "Requests to the object store that failed (unreachable, timed out, erroring), by operation.",
                &["operation"],
            ),
            registry: r,
        }
    }

    /// Every family's current values, gathered once: the status page reads the same figures
    /// `/metrics` shows.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot(self.registry.gather())
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if TextEncoder::new().encode(&self.registry.gather(), &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Gathered metric families.
pub struct Snapshot(Vec<prometheus::proto::MetricFamily>);

impl Snapshot {
    /// The sum of a counter or gauge family over the series whose labels match `labels` (all
    /// series when empty).
    pub fn sum(&self, family: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|f| f.name() == family)
            .flat_map(|f| f.get_metric().iter().map(move |m| (f.get_field_type(), m)))
            .filter(|(_, m)| {
                labels.iter().all(|(k, v)| m.get_label().iter().any(|l| l.name() == *k && l.value() == *v))
            })
            .map(|(kind, m)| match kind {
                MetricType::COUNTER => m.get_counter().get_value(),
                _ => m.get_gauge().get_value(),
            })
            .sum()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
