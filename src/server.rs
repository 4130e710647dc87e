//! Listeners and graceful shutdown. Each listener runs an accept loop (TLS or plain); every
//! connection is watched so that SIGTERM / SIGINT stop accepting and in-flight requests get
//! `server.shutdown_timeout` to finish.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::auth::ConnInfo;
use crate::config::Limits;
use crate::metrics::Metrics;
use crate::tls::TlsServer;

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Listener {
    pub tcp: TcpListener,
    pub tls: Option<Arc<TlsServer>>,
    pub app: Router,
}

/// Serve every listener until `shutdown` resolves, then drain for at most `drain`. `limits`
/// bound what clients may take: connections in all, and the time a connection may take to send
/// a request's headers or stay without traffic.
pub async fn run(
    listeners: Vec<Listener>,
    metrics: Metrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain: Duration,
    limits: Limits,
) -> std::io::Result<()> {
    let graceful = Arc::new(GracefulShutdown::new());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut loops = tokio::task::JoinSet::new();
    let connections = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    for l in listeners {
        let accepting = Accepting {
            graceful: graceful.clone(),
            stop: stop_rx.clone(),
            metrics: metrics.clone(),
            connections: connections.clone(),
            limits: limits.clone(),
        };
        loops.spawn(accept_loop(l, accepting));
    }
    shutdown.await;
    let _ = stop_tx.send(true);
    while loops.join_next().await.is_some() {}
    tracing::info!(
        in_flight = graceful.count(),
        deadline_s = drain.as_secs(),
        "shutting down: no new connections; draining requests in flight"
    );
    // Every accept loop has ended, so this is the last handle.
    let Ok(graceful) = Arc::try_unwrap(graceful) else {
        return Ok(());
    };
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections closed"),
        _ = tokio::time::sleep(drain) => tracing::warn!("drain deadline reached; closing the remaining connections"),
    }
    Ok(())
}

/// What every accept loop shares.
struct Accepting {
    graceful: Arc<GracefulShutdown>,
    stop: tokio::sync::watch::Receiver<bool>,
    metrics: Metrics,
    /// One permit per connection being served, across all listeners.
    connections: Arc<tokio::sync::Semaphore>,
    limits: Limits,
}

async fn accept_loop(l: Listener, shared: Accepting) {
    let Accepting { graceful, mut stop, metrics, connections, limits } = shared;
    loop {
        // At the connection limit, new connections wait in the kernel's listen queue.
        let permit = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            p = connections.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            a = l.tcp.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let app = l.app.clone();
        let tls = l.tls.clone();
        let metrics = metrics.clone();
        let conn_watcher = graceful.watcher();
        let limits = limits.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tls {
                Some(tls) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.acceptor.accept(stream)).await {
                    Ok(Ok(s)) => {
                        metrics.tls_handshakes.inc();
                        serve_connection(s, ConnInfo { tls: true, peer }, app, conn_watcher, &limits).await
                    }
                    // A client that hangs up (often right after its handshake, while session
                    // tickets are still being sent) is not a failed handshake.
                    Ok(Err(e))
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::ConnectionReset
                                | std::io::ErrorKind::BrokenPipe
                                | std::io::ErrorKind::UnexpectedEof
                        ) =>
                    {
                        tracing::debug!(%peer, error = %e, "client left during the TLS handshake");
                    }
                    Ok(Err(e)) => {
                        metrics.tls_handshake_failures.inc();
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    }
                    Err(_) => {
                        metrics.tls_handshake_failures.inc();
                        tracing::debug!(%peer, "TLS handshake timed out");
                    }
                },
                None => serve_connection(stream, ConnInfo { tls: false, peer }, app, conn_watcher, &limits).await,
            }
        });
    }
}

async fn serve_connection<IO>(io: IO, conn: ConnInfo, app: Router, watcher: Watcher, limits: &Limits)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let last_activity = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let io = Tracked { inner: io, started, last_activity: last_activity.clone() };
    // Requests whose response has not started yet: a handler at work (a commit, a fill waiting on
    // its upstream) is not idleness.
    let handling = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let in_service = handling.clone();
    let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        // HTTP/2 carries the host in the URI, not in a Host header; handlers read one place.
        if !req.headers().contains_key(hyper::header::HOST) {
            if let Some(v) = req.uri().authority().and_then(|a| hyper::header::HeaderValue::from_str(a.as_str()).ok()) {
                req.headers_mut().insert(hyper::header::HOST, v);
            }
        }
        req.extensions_mut().insert(ConnectInfo(conn.peer));
        req.extensions_mut().insert(conn);
        let busy = Busy::new(in_service.clone());
        let response = app.clone().oneshot(req.map(axum::body::Body::new));
        async move {
            let response = response.await;
            drop(busy);
            response
        }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    let peer = conn.peer;
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    let served = watcher.watch(connection.into_owned());
    tokio::pin!(served);
    // Closed when no byte has moved either way for `idle_timeout`: an idle keep-alive connection,
    // or a client that stopped reading its download or sending its upload.
    let idle = limits.idle_timeout;
    loop {
        let quiet_since = started + Duration::from_millis(last_activity.load(Ordering::Relaxed));
        tokio::select! {
            result = &mut served => {
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = tokio::time::sleep_until((quiet_since + idle).into()) => {
                if handling.load(Ordering::Relaxed) > 0 {
                    last_activity.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                    continue;
                }
                let quiet_since = started + Duration::from_millis(last_activity.load(Ordering::Relaxed));
                if quiet_since.elapsed() >= idle {
                    tracing::debug!(%peer, "closing a connection idle for {idle:?}");
                    return;
                }
            }
        }
    }
}

/// Counts a request as in progress until its response starts (or it is dropped).
struct Busy(Arc<std::sync::atomic::AtomicUsize>);

impl Busy {
    fn new(count: Arc<std::sync::atomic::AtomicUsize>) -> Busy {
        count.fetch_add(1, Ordering::Relaxed);
        Busy(count)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection's stream that notes when bytes last moved.
struct Tracked<IO> {
    inner: IO,
    started: Instant,
    /// Milliseconds after `started`.
    last_activity: Arc<AtomicU64>,
}

impl<IO> Tracked<IO> {
    fn active(&self) {
        self.last_activity.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Tracked<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.active();
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Tracked<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.active();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.active();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
