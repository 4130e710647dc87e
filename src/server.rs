//! Listeners and graceful shutdown: SIGTERM / SIGINT stop accepting, in-flight requests get
//! `server.shutdown_timeout` to finish.

use std::future::Future;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::app::{router, AppState};

/// Serve the registry on `listener` until `shutdown` resolves, then drain for at most `drain`.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain: Duration,
) -> std::io::Result<()> {
    let app = router(state);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let mut stop_rx = stop_rx;
    let serving = tokio::spawn(async move { server.await });
    let _ = stop_rx.wait_for(|s| *s).await;
    tracing::info!(
        deadline_s = drain.as_secs(),
        "shutting down: no new connections; draining requests in flight"
    );
    match tokio::time::timeout(drain, serving).await {
        Ok(Ok(result)) => result,
        Ok(Err(join)) => Err(std::io::Error::other(join)),
        Err(_) => {
            tracing::warn!("drain deadline reached; closing the remaining connections");
            Ok(())
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
