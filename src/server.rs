//! Listeners and graceful shutdown. Each listener runs an accept loop (TLS or plain); every
//! connection is watched so that SIGTERM / SIGINT stop accepting and in-flight requests get
//! `server.shutdown_timeout` to finish.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::auth::ConnInfo;
use crate::metrics::Metrics;
use crate::tls::TlsServer;

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Listener {
    pub tcp: TcpListener,
    pub tls: Option<Arc<TlsServer>>,
    pub app: Router,
}

/// Serve every listener until `shutdown` resolves, then drain for at most `drain`.
pub async fn run(
    listeners: Vec<Listener>,
    metrics: Metrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain: Duration,
) -> std::io::Result<()> {
    let graceful = Arc::new(GracefulShutdown::new());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut loops = tokio::task::JoinSet::new();
    for l in listeners {
        loops.spawn(accept_loop(l, graceful.clone(), stop_rx.clone(), metrics.clone()));
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

async fn accept_loop(
    l: Listener,
    graceful: Arc<GracefulShutdown>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    metrics: Metrics,
) {
    loop {
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
        tokio::spawn(async move {
            match tls {
                Some(tls) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.acceptor.accept(stream)).await {
                    Ok(Ok(s)) => {
                        metrics.tls_handshakes.inc();
                        serve_connection(s, ConnInfo { tls: true, peer }, app, conn_watcher).await
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
                None => serve_connection(stream, ConnInfo { tls: false, peer }, app, conn_watcher).await,
            }
        });
    }
}

async fn serve_connection<IO>(io: IO, conn: ConnInfo, app: Router, watcher: Watcher)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        // HTTP/2 carries the host in the URI, not in a Host header; handlers read one place.
        if !req.headers().contains_key(hyper::header::HOST) {
            if let Some(v) = req.uri().authority().and_then(|a| hyper::header::HeaderValue::from_str(a.as_str()).ok()) {
                req.headers_mut().insert(hyper::header::HOST, v);
            }
        }
        req.extensions_mut().insert(ConnectInfo(conn.peer));
        req.extensions_mut().insert(conn);
        app.clone().oneshot(req.map(axum::body::Body::new))
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let peer = conn.peer;
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    if let Err(e) = watcher.watch(connection.into_owned()).await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
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
