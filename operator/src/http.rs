//! The operator's HTTP endpoints: `/healthz` (process alive), `/readyz` (leader or standby
//! established), `/metrics` (Prometheus, OpenMetrics text).
//!
//! ```text
//!  kubelet probes ─► /healthz, /readyz ─► Shared.ready
//!  Prometheus     ─► /metrics          ─► Shared.metrics.encode()
//! ```

use std::{net::SocketAddr, sync::Arc, sync::atomic::Ordering};

use axum::{
    Router, extract::State, http::StatusCode, http::header, response::IntoResponse, routing::get,
};

use crate::Shared;

/// Serving the HTTP endpoints failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The listen address could not be bound.
    #[error("failed to bind the metrics address {addr}")]
    Bind {
        /// Address.
        addr: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The server stopped with an error.
    #[error("the metrics server failed")]
    Serve(#[source] std::io::Error),
}

/// The router serving the three endpoints.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(shared)
}

async fn readyz(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    if shared.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "leader election not established yet",
        )
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        shared.metrics.encode(),
    )
}

/// Binds `addr` and returns the bound address and the server future.
pub async fn bind(
    addr: &str,
    shared: Arc<Shared>,
) -> Result<
    (
        SocketAddr,
        impl std::future::Future<Output = Result<(), HttpError>> + use<>,
    ),
    HttpError,
> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind {
            addr: addr.to_owned(),
            source,
        })?;
    let local = listener.local_addr().map_err(|source| HttpError::Bind {
        addr: addr.to_owned(),
        source,
    })?;
    let app = router(shared);
    Ok((local, async move {
        axum::serve(listener, app).await.map_err(HttpError::Serve)
    }))
}
