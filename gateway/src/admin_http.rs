//! The admin HTTP endpoint: `GET /healthz`, `/readyz`, `/metrics`.
//!
//! Invariants: read-only; `/healthz` is 200 while the process serves at all; `/readyz` is
//! 200 only while the node acknowledges new objects: after start-up recovery and once every
//! listener is bound, and not while draining for shutdown or after a synced write failed
//! (see [`Readiness`]); `/metrics` exposes only the metrics of [`crate::metrics`] (no patient
//! data).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::spool::Spool;

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

/// Whether the node acknowledges new objects. Shared by `/readyz`, the admin socket and
/// the listeners.
#[derive(Debug, Default)]
pub struct Readiness {
    /// Recovery is done and every listener is bound.
    started: AtomicBool,
    /// Shutdown began: listeners stop accepting.
    draining: AtomicBool,
}

impl Readiness {
    /// Start-up finished.
    pub fn set_started(&self) {
        self.started.store(true, Ordering::SeqCst);
    }

    /// Shutdown began.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Has shutdown begun?
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// (ready, why): the one place readiness is decided.
    pub fn check(&self, spool: &Spool) -> (bool, String) {
        if !self.started.load(Ordering::SeqCst) {
            (false, "starting".into())
        } else if self.draining.load(Ordering::SeqCst) {
            (false, "draining".into())
        } else if let Some(d) = spool.low_disk() {
            (false, format!("not accepting objects: {d}"))
        } else if spool.storage_failed() {
            (
                false,
                "storage failed: a synced write failed, nothing is acknowledged; check the disk and restart the node".into(),
            )
        } else {
            (true, "ready".into())
        }
    }
}

/// Serve the admin endpoint until `shutdown`.
pub async fn run(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    ready: Arc<Readiness>,
    spool: Spool,
    tasks: tokio_util::task::TaskTracker,
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
        let spool = spool.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            let svc = service_fn(move |req| {
                let metrics = metrics.clone();
                let ready = ready.clone();
                let spool = spool.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(route(req, &metrics, ready.check(&spool)))
                }
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

fn route(
    req: Request<Incoming>,
    metrics: &Metrics,
    (ready, why): (bool, String),
) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match (req.method().as_str(), req.uri().path()) {
        ("GET", "/healthz") => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        ("GET", "/readyz") if ready => (StatusCode::OK, "text/plain", "ready\n".to_owned()),
        ("GET", "/readyz") => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            format!("{why}\n"),
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
