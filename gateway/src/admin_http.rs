//! The admin HTTP endpoint: `GET /healthz`, `/readyz`, `/metrics`.
//!
//! Invariants: read-only; `/readyz` answers 200 only once every listener of the node is
//! bound; `/metrics` exposes only the metrics of [`crate::metrics`] (no patient data).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::metrics::Metrics;

/// Serve the admin endpoint until `shutdown`.
pub async fn run(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    shutdown: CancellationToken,
) {
    loop {
        let (socket, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => match a {
                Ok(x) => x,
                Err(_) => continue,
            },
        };
        let _ = socket.set_nodelay(true);
        let metrics = metrics.clone();
        let ready = ready.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let metrics = metrics.clone();
                let ready = ready.clone();
                async move { Ok::<_, std::convert::Infallible>(route(req, &metrics, &ready)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(socket), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => { if let Err(e) = r { debug!(error = %e, "admin connection"); } }
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

fn route(req: Request<Incoming>, metrics: &Metrics, ready: &AtomicBool) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match (req.method().as_str(), req.uri().path()) {
        ("GET", "/healthz") => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        ("GET", "/readyz") if ready.load(Ordering::SeqCst) => {
            (StatusCode::OK, "text/plain", "ready\n".to_owned())
        }
        ("GET", "/readyz") => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "starting\n".to_owned(),
        ),
        ("GET", "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics.render(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(ctype) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}
