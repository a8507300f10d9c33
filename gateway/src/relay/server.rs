//! The link listener: a STOW-RS endpoint over HTTP/2, TLS 1.3 and mutual authentication.
//!
//! Invariants:
//! - the TLS handshake itself rejects a client without a certificate, with one from another
//!   CA, or without a DNS SAN listed in `allowed_peers` (see [`crate::tls`]);
//! - a part is stored through a spool writer, its digest checked against `Content-Digest`,
//!   and committed (synced) before the response; a failed part leaves nothing behind;
//! - an identical re-send of a transfer (same peer, same `Content-ID`, same digest) is a
//!   success without a second copy; the same transfer with other bytes is refused with 409;
//! - every resource a peer can hold has a cap and every wait a deadline
//!   (`[[link_listener]]` keys, defaults in brackets): at most `max_handshakes` [32]
//!   connections in the TLS handshake, each for at most 10 s; at most `max_connections`
//!   [16] authenticated connections, each with at most `max_streams_per_connection` [32]
//!   streams; at most `max_requests` [64] requests processed at once across all
//!   connections, each within `request_timeout` [15m] from its headers to its
//!   response.
//! - memory is bounded by what those caps allow: per connection, the HTTP/2 receive
//!   window ([`CONNECTION_WINDOW`], 16 MiB) however many streams it carries; per request
//!   processed, one identity prefix ([`dataset::MAX_IDENTITY_PREFIX`], 4 MiB), one
//!   segment and the bytes outside parts ([`MAX_OUTSIDE_PARTS`]). With the defaults that
//!   is 16 × 16 MiB + 64 × 6.1 MiB, about 650 MiB at the very worst.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::TryStreamExt;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyStream, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::LinkListener;
use crate::dataset;
use crate::metrics::{ActiveGuard, Metrics, tls_failure_reason};
use crate::spool::{Committed, DedupState, Ingest, Spool, SpoolError};

pub(crate) mod framing;
mod hl7;

/// Bytes a request may carry outside part bodies (preamble, boundaries, part headers).
/// One HTTP/2 frame (at most 1 MiB) may straddle a header and a body, hence the margin.
const MAX_OUTSIDE_PARTS: u64 = (1 << 20) + 64 * 1024;

/// HTTP/2 receive window of a whole connection: the most a peer can make us buffer on one
/// connection, whatever its number of streams.
pub const CONNECTION_WINDOW: u32 = 16 << 20;
/// HTTP/2 receive window of one stream.
const STREAM_WINDOW: u32 = 2 << 20;
/// Deadline for a TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest `Content-ID` accepted.
const MAX_CONTENT_ID: usize = 200;

/// A link listener, ready to serve.
pub struct LinkServer {
    cfg: LinkListener,
    /// The TLS config for new handshakes (replaced by the reloader when files change).
    tls: watch::Receiver<Arc<rustls::ServerConfig>>,
    /// Rebuilds `tls` when the certificate, key, CA or CRL files change.
    reloader: Option<crate::tls::ServerConfigReloader>,
    spool: Spool,
    metrics: Arc<Metrics>,
    max_object_bytes: u64,
    router: crate::routing::Router,
    /// Requests processed at once, across connections (`max_requests`).
    requests: Arc<Semaphore>,
    /// The destinations of `route_to` that take DICOM objects, and those that take HL7
    /// messages (see [`LinkServer::with_protocols`]).
    dicom_routes: Vec<String>,
    hl7_routes: Vec<String>,
}

/// What one link connection carried, for its log line.
#[derive(Debug, Default)]
struct ConnStats {
    objects: AtomicU64,
    bytes: AtomicU64,
    refused: AtomicU64,
}

/// The outcome of one part.
#[derive(Debug)]
pub(crate) enum PartResult {
    /// Stored, with its size in bytes.
    Stored(u64),
    Duplicate,
    Conflict(String),
    BadRequest(String),
    Unavailable(String),
}

impl LinkServer {
    /// Prepare a listener (does not bind).
    pub fn new(
        cfg: LinkListener,
        tls: Arc<rustls::ServerConfig>,
        spool: Spool,
        metrics: Arc<Metrics>,
        max_object_bytes: u64,
    ) -> LinkServer {
        LinkServer {
            requests: Arc::new(Semaphore::new(cfg.max_requests)),
            dicom_routes: cfg.route_to.clone(),
            hl7_routes: cfg.route_to.clone(),
            cfg,
            tls: watch::channel(tls).1,
            reloader: None,
            spool,
            metrics,
            max_object_bytes,
            router: crate::routing::Router::default(),
        }
    }

    /// Apply the `[[route]]` rules to what this listener receives.
    pub fn with_router(mut self, router: crate::routing::Router) -> LinkServer {
        self.router = router;
        self
    }

    /// Split `route_to` by protocol with the destinations of `cfg`: each DICOM object goes
    /// to the destinations that take DICOM, each HL7 message to those that take HL7.
    pub fn with_protocols(mut self, cfg: &crate::config::Config) -> LinkServer {
        use crate::config::Protocol;
        let takes = |p: Protocol| {
            self.cfg
                .route_to
                .iter()
                .filter(|r| {
                    cfg.destination
                        .iter()
                        .any(|d| &d.name == *r && d.kind.carries(p))
                })
                .cloned()
                .collect::<Vec<_>>()
        };
        self.dicom_routes = takes(Protocol::Dicom);
        self.hl7_routes = takes(Protocol::Hl7);
        self
    }

    /// Rebuild the TLS config from `tls` whenever its files change (checked every
    /// [`crate::tls::RELOAD_INTERVAL`]): new handshakes use the new certificate, sessions in flight go
    /// on, and a broken file keeps the old config (logged and counted).
    pub fn reload_from(
        mut self,
        tls: &crate::config::TlsSection,
    ) -> Result<LinkServer, crate::tls::TlsError> {
        let (reloader, rx) = crate::tls::ServerConfigReloader::new(tls, &self.cfg.allowed_peers)?;
        self.tls = rx;
        self.reloader = Some(reloader);
        Ok(self)
    }

    /// Serve until `shutdown`; in-flight requests are allowed to finish.
    pub async fn run(mut self, listener: TcpListener, shutdown: CancellationToken) {
        let tasks = tokio_util::task::TaskTracker::new();
        if let Some(r) = self.reloader.take() {
            tasks.spawn(crate::tls::reload(
                r,
                self.cfg.name.clone(),
                self.metrics.clone(),
                shutdown.clone(),
            ));
        }
        let server = Arc::new(self);
        let handshakes = Arc::new(Semaphore::new(server.cfg.max_handshakes));
        let connections = Arc::new(Semaphore::new(server.cfg.max_connections));
        loop {
            let (socket, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                a = listener.accept() => match a {
                    Ok(x) => x,
                    Err(e) => {
                        warn!(listener = %server.cfg.name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(slot) = handshakes.clone().try_acquire_owned() else {
                warn!(listener = %server.cfg.name, %peer, "too many link handshakes; closing connection");
                server
                    .metrics
                    .associations
                    .with_label_values(&[&server.cfg.name, "over_limit"])
                    .inc();
                drop(socket);
                continue;
            };
            let server = server.clone();
            let shutdown = shutdown.clone();
            let exec = TrackedExecutor(tasks.clone());
            let connections = connections.clone();
            tasks.spawn(async move {
                server
                    .connection(socket, peer, exec, slot, &connections, shutdown)
                    .await;
            });
        }
        // Close the socket now, not when the drain ends: a new connection is refused at
        // once (and its sender retries elsewhere or later) instead of waiting in the
        // kernel's backlog for a node that will never accept it.
        drop(listener);
        tasks.close();
        tasks.wait().await;
    }

    async fn connection(
        self: Arc<Self>,
        socket: TcpStream,
        addr: std::net::SocketAddr,
        exec: TrackedExecutor,
        slot: OwnedSemaphorePermit,
        connections: &Arc<Semaphore>,
        shutdown: CancellationToken,
    ) {
        let name = self.cfg.name.clone();
        let _ = socket.set_nodelay(true);
        let acceptor = TlsAcceptor::from(self.tls.borrow().clone());
        let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(socket)).await;
        drop(slot);
        let tls = match handshake {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let reason = tls_failure_reason(&e);
                info!(listener = %name, peer = %addr, reason = %reason, error = %e, "link handshake failed");
                self.metrics
                    .associations
                    .with_label_values(&[&name, "handshake_failed"])
                    .inc();
                self.metrics
                    .tls_handshake_failures
                    .with_label_values(&[&name, reason])
                    .inc();
                return;
            }
            Err(_) => {
                info!(listener = %name, peer = %addr, "link handshake timed out");
                self.metrics
                    .associations
                    .with_label_values(&[&name, "timeout"])
                    .inc();
                self.metrics
                    .tls_handshake_failures
                    .with_label_values(&[&name, "timeout"])
                    .inc();
                return;
            }
        };
        let peer = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| crate::tls::peer_name(c, &self.cfg.allowed_peers));
        let Some(peer) = peer else {
            // The verifier already refused such peers; this is a second line.
            self.metrics
                .associations
                .with_label_values(&[&name, "rejected"])
                .inc();
            return;
        };
        let Ok(_permit) = connections.clone().try_acquire_owned() else {
            warn!(listener = %name, %peer, "too many link connections; closing the new one");
            self.metrics
                .associations
                .with_label_values(&[&name, "over_limit"])
                .inc();
            return;
        };
        self.metrics
            .associations
            .with_label_values(&[&name, "accepted"])
            .inc();
        let _active =
            ActiveGuard::new(self.metrics.associations_active.with_label_values(&[&name]));
        let started = Instant::now();
        debug!(listener = %name, %peer, "link connection");
        let stats = Arc::new(ConnStats::default());
        let server = self.clone();
        let peer2 = peer.clone();
        let stats2 = stats.clone();
        let svc = service_fn(move |req| {
            let server = server.clone();
            let peer = peer2.clone();
            let stats = stats2.clone();
            async move { Ok::<_, std::convert::Infallible>(server.limited(req, &peer, &stats).await) }
        });
        let mut builder = hyper::server::conn::http2::Builder::new(exec);
        builder
            .timer(TokioTimer::new())
            .max_concurrent_streams(self.cfg.max_streams_per_connection)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(1 << 20)
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20));
        let conn = builder.serve_connection(TokioIo::new(tls), svc);
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    debug!(listener = %name, %peer, error = %e, "link connection ended");
                }
            }
            _ = shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
            }
        }
        // One line per link connection (a connection carries many objects).
        info!(
            listener = %name,
            peer = %peer,
            address = %addr,
            objects = stats.objects.load(Ordering::Relaxed),
            bytes = stats.bytes.load(Ordering::Relaxed),
            refused = stats.refused.load(Ordering::Relaxed),
            duration_ms = started.elapsed().as_millis() as u64,
            "link connection ended"
        );
    }

    /// One request within its deadline and a processing slot. A request that misses its
    /// deadline is dropped where it stands (its writer removes what it stored) and answered
    /// 503, so the sender retries.
    async fn limited(
        &self,
        req: Request<Incoming>,
        peer: &str,
        stats: &ConnStats,
    ) -> Response<Full<Bytes>> {
        let deadline = self.cfg.request_timeout;
        let work = async {
            let _slot = self
                .requests
                .acquire()
                .await
                .map_err(|_| "listener closing")?;
            Ok::<_, &'static str>(self.handle(req, peer, stats).await)
        };
        match tokio::time::timeout(deadline, work).await {
            Ok(Ok(r)) => r,
            Ok(Err(why)) => text(StatusCode::SERVICE_UNAVAILABLE, why),
            Err(_) => {
                warn!(listener = %self.cfg.name, %peer, "link request deadline passed");
                stats.refused.fetch_add(1, Ordering::Relaxed);
                self.metrics
                    .link_parts
                    .with_label_values(&[&self.cfg.name, "timeout"])
                    .inc();
                text(StatusCode::SERVICE_UNAVAILABLE, "request deadline passed")
            }
        }
    }

    async fn handle(
        &self,
        req: Request<Incoming>,
        peer: &str,
        stats: &ConnStats,
    ) -> Response<Full<Bytes>> {
        if req.uri().path() == super::HL7_PATH {
            return self.hl7_message(req, peer, stats).await;
        }
        if req.uri().path() != super::STOW_PATH {
            return text(StatusCode::NOT_FOUND, "not found");
        }
        if req.method() != Method::POST {
            return text(StatusCode::METHOD_NOT_ALLOWED, "POST only");
        }
        let ct = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let boundary = match framing::stow_boundary(&ct) {
            Ok(b) => b,
            Err((status, why)) => return text(status, why),
        };
        let body = BodyStream::new(req.into_body())
            .try_filter_map(|frame| async move { Ok(frame.into_data().ok()) });
        let part_limit = self.max_object_bytes + dataset::MAX_META_BYTES as u64 + 1024;
        let mut parts = framing::StowParts::new(body, boundary, part_limit);
        let mut results = Vec::new();
        loop {
            match parts.next_part().await {
                Ok(Some(field)) => results.push(self.part(field, peer).await),
                Ok(None) => break,
                Err(failure) => {
                    results.push(failure);
                    break;
                }
            }
        }
        for r in &results {
            match r {
                PartResult::Stored(bytes) => {
                    stats.objects.fetch_add(1, Ordering::Relaxed);
                    stats.bytes.fetch_add(*bytes, Ordering::Relaxed);
                }
                PartResult::Duplicate => {}
                _ => {
                    stats.refused.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        self.respond(results)
    }

    fn respond(&self, results: Vec<PartResult>) -> Response<Full<Bytes>> {
        let name = &self.cfg.name;
        let m = &self.metrics;
        if results.is_empty() {
            return text(StatusCode::BAD_REQUEST, "no parts");
        }
        let mut ok = 0;
        let mut worst = StatusCode::OK;
        let mut refused = 0;
        for r in &results {
            let (code, msg, reason) = match r {
                PartResult::Stored(_) => {
                    ok += 1;
                    m.link_parts.with_label_values(&[name, "stored"]).inc();
                    continue;
                }
                PartResult::Duplicate => {
                    ok += 1;
                    m.link_parts.with_label_values(&[name, "duplicate"]).inc();
                    continue;
                }
                PartResult::Conflict(s) => (StatusCode::CONFLICT, s, "conflict"),
                PartResult::BadRequest(s) => (StatusCode::BAD_REQUEST, s, "bad_request"),
                PartResult::Unavailable(s) => (StatusCode::SERVICE_UNAVAILABLE, s, "unavailable"),
            };
            m.link_parts.with_label_values(&[name, reason]).inc();
            warn!(listener = %name, status = code.as_u16(), reason = %msg, "STOW part refused");
            refused += 1;
            // 503 outranks 409 outranks 400: a retry is worth it if anything was transient.
            let rank = |c: StatusCode| match c.as_u16() {
                503 => 3,
                409 => 2,
                400 => 1,
                _ => 0,
            };
            if rank(code) > rank(worst) {
                worst = code;
            }
        }
        if refused == 0 {
            return json(StatusCode::OK, ok, 0);
        }
        let status = if ok > 0 { StatusCode::ACCEPTED } else { worst };
        json(status, ok, results.len() - ok)
    }

    async fn part(&self, mut field: multer::Field<'static>, peer: &str) -> PartResult {
        let framing::PartHeaders {
            transfer_id,
            digest,
        } = match framing::part_headers(field.headers()) {
            Ok(h) => h,
            Err(refused) => return refused,
        };
        let key = self.spool.dedup_key(peer, &transfer_id);
        let spool = self.spool.clone();
        let state = tokio::task::spawn_blocking(move || spool.dedup_state_blocking(key, &digest))
            .await
            .unwrap_or_else(|e| Err(SpoolError::Internal(format!("dedup lookup: {e}"))));
        match state {
            Ok(DedupState::New) => {}
            Ok(DedupState::Identical) => {
                // Already stored: drain without keeping anything.
                while let Ok(Some(_)) = field.chunk().await {}
                return PartResult::Duplicate;
            }
            Ok(DedupState::Conflict) => {
                return PartResult::Conflict(
                    "this transfer was stored earlier with different content".into(),
                );
            }
            Err(e) => return PartResult::Unavailable(e.to_string()),
        }

        let (head, meta) = match framing::read_part10_head(&mut field).await {
            Ok(x) => x,
            Err(refused) => return refused,
        };
        if let Err(refused) = framing::check_storable(&meta) {
            return refused;
        }
        let ingest = Ingest {
            sop_class: meta.sop_class,
            sop_instance: meta.sop_instance,
            transfer_syntax: meta.transfer_syntax,
            source: peer.to_owned(),
            routes: self.dicom_routes.clone(),
            dedup: Some(key),
            strict_uid_match: false,
        };
        let mut writer = match self.spool.writer_for_part10(ingest, meta.dataset_offset) {
            Ok(w) => w,
            Err(e) => return spool_failure(e),
        };
        writer.route_with(self.router.for_origin(crate::routing::Origin {
            listener: self.cfg.name.clone(),
            link: true,
            peer: Some(peer.to_owned()),
            ..Default::default()
        }));
        if let Err(e) = writer.write(&head).await {
            return spool_failure(e);
        }
        drop(head);
        loop {
            match field.chunk().await {
                Ok(Some(c)) => {
                    if let Err(e) = writer.write(&c).await {
                        return spool_failure(e);
                    }
                }
                Ok(None) => break,
                Err(e) => return multipart_failure(&e, "part interrupted"),
            }
        }
        if writer.digest_so_far() != digest {
            self.metrics
                .integrity_failures
                .with_label_values(&["link_digest"])
                .inc();
            return PartResult::BadRequest("Content-Digest does not match the part".into());
        }
        let bytes = writer.len();
        // The part's last byte is in: from here to the commit is this part's ack latency.
        let started = Instant::now();
        let committed = writer.commit().await;
        self.metrics
            .store_duration
            .with_label_values(&[&self.cfg.name])
            .observe(started.elapsed().as_secs_f64());
        match committed {
            Ok(Committed::Stored(id)) => {
                self.metrics
                    .received_objects
                    .with_label_values(&[&self.cfg.name])
                    .inc();
                self.metrics
                    .received_bytes
                    .with_label_values(&[&self.cfg.name])
                    .inc_by(bytes);
                debug!(listener = %self.cfg.name, object = %id, bytes, "stored from link");
                PartResult::Stored(bytes)
            }
            Ok(Committed::Duplicate) => PartResult::Duplicate,
            Err(SpoolError::IdentityMismatch("content of this transfer")) => PartResult::Conflict(
                "this transfer was stored earlier with different content".into(),
            ),
            Err(e) => spool_failure(e),
        }
    }
}

/// Runs hyper's per-stream tasks in the listener's tracker, so that shutdown waits for every
/// request handler (and the spool handles they hold).
#[derive(Clone)]
struct TrackedExecutor(tokio_util::task::TaskTracker);

impl<F> hyper::rt::Executor<F> for TrackedExecutor
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        self.0.spawn(fut);
    }
}

/// The `boundary` parameter of a multipart content type (RFC 2046: 1 to 70 characters).
fn boundary_of(content_type: &str) -> Option<String> {
    content_type.split(';').skip(1).find_map(|param| {
        let (k, v) = param.split_once('=')?;
        if !k.trim().eq_ignore_ascii_case("boundary") {
            return None;
        }
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(v);
        (!v.is_empty() && v.len() <= 70 && v.bytes().all(|b| b.is_ascii_graphic() || b == b' '))
            .then(|| v.to_owned())
    })
}

/// A multipart error: a body that ended before its closing boundary is the transfer's
/// failure, not the object's (503: the sender retries); anything else, our own bounds on
/// what a peer may send included, is malformed input (400: the sender dead-letters it).
fn multipart_failure(e: &multer::Error, what: &str) -> PartResult {
    match e {
        multer::Error::IncompleteStream => {
            PartResult::Unavailable(format!("{what}: the transfer ended early ({e}); retry"))
        }
        _ => PartResult::BadRequest(format!("{what}: {e}")),
    }
}

fn spool_failure(e: SpoolError) -> PartResult {
    match e {
        SpoolError::Format(_)
        | SpoolError::IdentityMismatch(_)
        | SpoolError::TooLarge(_)
        | SpoolError::Unrouted => PartResult::BadRequest(e.to_string()),
        _ => PartResult::Unavailable(e.to_string()),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    if status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut()
            .insert(header::RETRY_AFTER, http::HeaderValue::from_static("5"));
    }
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    r
}

/// A minimal STOW-RS response body. It carries counts only: the sender knows what it sent.
fn json(status: StatusCode, stored: usize, failed: usize) -> Response<Full<Bytes>> {
    let body = format!("{{\"stored\":{stored},\"failed\":{failed}}}");
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if status == StatusCode::SERVICE_UNAVAILABLE {
        // The sender's circuit waits this long before its next probe.
        r.headers_mut()
            .insert(header::RETRY_AFTER, http::HeaderValue::from_static("5"));
    }
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

#[cfg(test)]
mod tests {
    #[test]
    fn boundaries() {
        use super::boundary_of;
        let ct = "multipart/related; type=\"application/dicom\"; boundary=abc-123";
        assert_eq!(boundary_of(ct).as_deref(), Some("abc-123"));
        assert_eq!(
            boundary_of("multipart/related; boundary=\"q r\"").as_deref(),
            Some("q r")
        );
        assert_eq!(boundary_of("multipart/related"), None);
        assert_eq!(
            boundary_of(&format!("multipart/related; boundary={}", "x".repeat(71))),
            None
        );
    }
}
