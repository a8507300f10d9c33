//! The `gateway` destination: the STOW-RS sender towards a peer gateway (the client side
//! of [`crate::relay`]).
//!
//! Keeps one HTTP/2 connection per destination and multiplexes requests over it; the
//! dispatcher decides how many are in flight. When the client TLS config is reloaded (a
//! rotated certificate, key, CA or CRL), the next request opens a new connection with it;
//! requests in flight finish on the old one, which closes when they are done. Each request
//! streams the object from the spool segment by segment through a small channel, so memory
//! stays bounded by a couple of segments per request, whatever the object size.
//!
//! Invariants:
//! - [`GatewaySender::send`] returns `Ok` only for a 200 from the peer, which the peer sends
//!   after its synced commit;
//! - every wait has a deadline: connect, TLS and HTTP/2 handshakes, and a request that makes
//!   no progress (no body bytes taken, no response) for `send_timeout` is abandoned;
//! - failures map to [`DeliveryError`] by what they concern: the connection (unavailable),
//!   this object (409 and 4xx are permanent, 5xx transient), or our own copy;
//! - every task it spawns (connection drivers, body producers) is in its tracker; a body
//!   producer is aborted when its request future is dropped, and
//!   [`GatewaySender::close`] ends the connection and waits for the rest, so no task of it
//!   outlives the dispatcher holding a reader of the spool.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::{Mutex, mpsc};
use tokio_rustls::TlsConnector;
use tracing::{debug, info, warn};

use std::sync::atomic::{AtomicU64, Ordering};

use crate::deliver::DeliveryError;
use crate::spool::ObjectReader;

type Body = BoxBody<Bytes, std::io::Error>;

/// Sends objects to one peer gateway.
pub struct GatewaySender {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    /// Our node name, part of every transfer id.
    node: String,
    conn: Mutex<Conn>,
    /// Deadline of each handshake.
    timeout: Duration,
    /// The connection drivers and body producers: every task this sender spawns.
    tasks: tokio_util::task::TaskTracker,
    /// Ends the connection drivers ([`GatewaySender::close`]).
    closing: tokio_util::sync::CancellationToken,
    /// Longest a request may go without progress.
    send_timeout: Duration,
    /// Requests in flight at once.
    max_in_flight: usize,
}

/// The pooled connection and the TLS config that new connections use.
struct Conn {
    send: Option<SendRequest<Body>>,
    tls: tokio::sync::watch::Receiver<Arc<rustls::ClientConfig>>,
}

fn unavailable(reason: &'static str, detail: impl Into<String>) -> DeliveryError {
    DeliveryError::unavailable(reason, detail)
}

impl GatewaySender {
    /// A sender to `url` whose certificate must carry `peer_name`, with a fixed TLS config.
    pub fn new(
        url: &str,
        peer_name: &str,
        tls: Arc<rustls::ClientConfig>,
        node: &str,
        max_in_flight: usize,
        send_timeout: Duration,
    ) -> Result<GatewaySender, String> {
        let (_fixed, rx) = tokio::sync::watch::channel(tls);
        Self::reloading(url, peer_name, rx, node, max_in_flight, send_timeout)
    }

    /// A sender whose new connections use the TLS config `tls` holds at the time (see
    /// [`crate::tls::ClientConfigReloader`]).
    pub fn reloading(
        url: &str,
        peer_name: &str,
        tls: tokio::sync::watch::Receiver<Arc<rustls::ClientConfig>>,
        node: &str,
        max_in_flight: usize,
        send_timeout: Duration,
    ) -> Result<GatewaySender, String> {
        let (host, port) = crate::config::parse_https_url(url)?;
        let server_name = ServerName::try_from(peer_name.to_owned())
            .map_err(|e| format!("peer_name {peer_name:?}: {e}"))?;
        Ok(GatewaySender {
            host,
            port,
            server_name,
            node: node.to_owned(),
            conn: Mutex::new(Conn { send: None, tls }),
            tasks: tokio_util::task::TaskTracker::new(),
            closing: tokio_util::sync::CancellationToken::new(),
            timeout: Duration::from_secs(15),
            send_timeout,
            max_in_flight,
        })
    }

    /// Requests in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }

    /// Close the link connection and wait (at most 5 s) for every task of this sender:
    /// after it returns, none of them holds a reader of the spool.
    pub async fn close(&self) {
        self.conn.lock().await.send.take();
        self.closing.cancel();
        self.tasks.close();
        if tokio::time::timeout(Duration::from_secs(5), self.tasks.wait())
            .await
            .is_err()
        {
            warn!(host = %self.host, "link tasks still running 5 s after close");
        }
    }

    async fn connection(&self) -> Result<SendRequest<Body>, DeliveryError> {
        let mut guard = self.conn.lock().await;
        // A reloaded TLS config: new requests go on a new connection. (A fixed config's
        // channel has no sender: never a change.)
        if guard.tls.has_changed().unwrap_or(false) && guard.send.take().is_some() {
            info!(host = %self.host, port = self.port, "TLS config reloaded; new requests use a new link connection");
        }
        if let Some(s) = guard.send.as_ref()
            && !s.is_closed()
        {
            return Ok(s.clone());
        }
        guard.send = None;
        let connector = TlsConnector::from(guard.tls.borrow_and_update().clone());
        let addr = (self.host.as_str(), self.port);
        let tcp = tokio::time::timeout(self.timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| unavailable("connect", "connect timed out"))?
            .map_err(|e| unavailable("connect", format!("connect: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio::time::timeout(
            self.timeout,
            connector.connect(self.server_name.clone(), tcp),
        )
        .await
        .map_err(|_| unavailable("tls", "TLS handshake timed out"))?
        .map_err(|e| unavailable("tls", format!("TLS handshake: {e}")))?;
        let mut b = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .initial_stream_window_size(2 << 20)
            .initial_connection_window_size(64 << 20)
            .max_frame_size(1 << 20)
            .max_send_buf_size(1 << 20)
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20));
        let (sender, conn) = tokio::time::timeout(self.timeout, b.handshake(TokioIo::new(tls)))
            .await
            .map_err(|_| unavailable("http2", "HTTP/2 handshake timed out"))?
            .map_err(|e| unavailable("http2", format!("HTTP/2 handshake: {e}")))?;
        let host = self.host.clone();
        let closing = self.closing.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                r = conn => if let Err(e) = r {
                    debug!(%host, error = %e, "link connection closed");
                },
                _ = closing.cancelled() => {}
            }
        });
        info!(host = %self.host, port = self.port, "link connected");
        guard.send = Some(sender.clone());
        Ok(sender)
    }

    /// Send one object; `Ok` once the peer confirmed its synced commit.
    pub async fn send(&self, mut reader: ObjectReader) -> Result<(), DeliveryError> {
        if reader.meta.is_hl7() {
            return self.send_message(reader).await;
        }
        let mut sender = self.connection().await?;
        tokio::time::timeout(self.timeout, sender.ready())
            .await
            .map_err(|_| unavailable("link", "link not ready in time"))?
            .map_err(|e| unavailable("link", format!("link not ready: {e}")))?;
        let mut rnd = [0u8; 12];
        keystore::random_bytes(&mut rnd).map_err(|e| DeliveryError::Local {
            detail: e.to_string(),
        })?;
        let boundary = format!("dicomgw-{}", hex::encode(rnd));
        let meta = &reader.meta;
        // The transfer id: the object id, and for an operator's resend also the queue
        // entry's sequence (a new transfer, stable across its own retries).
        let transfer = match reader.resend_seq {
            Some(seq) => format!("{}.r{seq}", meta.id.hex()),
            None => meta.id.hex(),
        };
        let preamble = format!(
            "--{boundary}\r\nContent-Type: application/dicom\r\nContent-ID: <{transfer}@{}>\r\nContent-Digest: {}\r\n\r\n",
            self.node,
            crate::relay::content_digest(&meta.digest),
        );
        let epilogue = format!("\r\n--{boundary}--\r\n");
        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(2);
        // Progress: the last time the body gave hyper a frame (ms on a monotonic clock).
        let start = tokio::time::Instant::now();
        let progress = Arc::new(AtomicU64::new(0));
        let read_error: Arc<std::sync::Mutex<Option<DeliveryError>>> = Arc::default();
        let (progress2, read_error2) = (progress.clone(), read_error.clone());
        // Aborted when this future is dropped too: it holds a reader of the spool.
        let producer = tokio_util::task::AbortOnDropHandle::new(self.tasks.spawn(async move {
            if tx
                .send(Ok(Frame::data(Bytes::from(preamble))))
                .await
                .is_err()
            {
                return;
            }
            loop {
                match reader.next_segment().await {
                    Ok(Some(seg)) => {
                        if tx.send(Ok(Frame::data(Bytes::from(seg)))).await.is_err() {
                            return;
                        }
                        progress2.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let msg = e.to_string();
                        if let Ok(mut slot) = read_error2.lock() {
                            *slot = Some(DeliveryError::from_spool(e));
                        }
                        let _ = tx.send(Err(std::io::Error::other(msg))).await;
                        return;
                    }
                }
            }
            let _ = tx.send(Ok(Frame::data(Bytes::from(epilogue)))).await;
        }));
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        let body: Body = StreamBody::new(stream).boxed();
        let req = Request::post(format!(
            "https://{}:{}{}",
            self.host,
            self.port,
            crate::relay::STOW_PATH
        ))
        .header(
            header::CONTENT_TYPE,
            format!("multipart/related; type=\"application/dicom\"; boundary={boundary}"),
        )
        .header(header::ACCEPT, "application/json")
        .body(body)
        .map_err(|e| DeliveryError::Local {
            detail: format!("request: {e}"),
        })?;
        let result = tokio::select! {
            r = sender.send_request(req) => Some(r),
            _ = stalled(start, &progress, self.send_timeout) => None,
        };
        producer.abort();
        if let Some(e) = read_error.lock().ok().and_then(|mut e| e.take()) {
            return Err(e);
        }
        let resp = match result {
            Some(Ok(r)) => r,
            Some(Err(e)) => return Err(self.request_failed(e).await),
            None => {
                return Err(DeliveryError::transient(
                    "timeout",
                    format!(
                        "no progress for {} s (send_timeout)",
                        self.send_timeout.as_secs()
                    ),
                ));
            }
        };
        self.answer(resp).await
    }

    /// A request the connection did not carry: the link is unavailable, and a closed
    /// connection is dropped so that the next request opens a new one.
    async fn request_failed(&self, e: hyper::Error) -> DeliveryError {
        if e.is_closed() || e.is_canceled() {
            self.conn.lock().await.send.take();
        }
        unavailable("link", format!("link request failed: {e}"))
    }

    /// The peer's answer to a STOW or HL7 request, by the failure taxonomy ([`classify`]).
    async fn answer(
        &self,
        resp: http::Response<hyper::body::Incoming>,
    ) -> Result<(), DeliveryError> {
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|s| Duration::from_secs(s.min(3600)));
        // Bound what we read of the body, and how long: it is a short status document.
        let body = tokio::time::timeout(
            self.timeout,
            http_body_util::Limited::new(resp.into_body(), 64 * 1024).collect(),
        )
        .await
        .ok()
        .and_then(|r| r.ok())
        .map(|b| b.to_bytes())
        .unwrap_or_default();
        // The peer is a gateway of ours; still, keep only printable text.
        let detail = String::from_utf8_lossy(&body)
            .chars()
            .filter(|c| !c.is_control())
            .take(200)
            .collect::<String>();
        classify(status, retry_after, detail)
    }
}

impl GatewaySender {
    /// Send one HL7 v2 message (`POST` [`crate::relay::HL7_PATH`], the message as the
    /// body, with the same `Content-ID` and `Content-Digest` as a STOW part); `Ok` once the
    /// peer confirmed its synced commit. The statuses mean what they mean for a STOW
    /// request ([`classify`]).
    async fn send_message(&self, mut reader: ObjectReader) -> Result<(), DeliveryError> {
        let body = reader.read_all().await.map_err(DeliveryError::from_spool)?;
        let meta = &reader.meta;
        let transfer = match reader.resend_seq {
            Some(seq) => format!("{}.r{seq}", meta.id.hex()),
            None => meta.id.hex(),
        };
        let mut sender = self.connection().await?;
        tokio::time::timeout(self.timeout, sender.ready())
            .await
            .map_err(|_| unavailable("link", "link not ready in time"))?
            .map_err(|e| unavailable("link", format!("link not ready: {e}")))?;
        let body: Body = http_body_util::Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed();
        let req = Request::post(format!(
            "https://{}:{}{}",
            self.host,
            self.port,
            crate::relay::HL7_PATH
        ))
        .header(header::CONTENT_TYPE, crate::relay::HL7_MEDIA_TYPE)
        .header("content-id", format!("<{transfer}@{}>", self.node))
        .header("content-digest", crate::relay::content_digest(&meta.digest))
        .body(body)
        .map_err(|e| DeliveryError::Local {
            detail: format!("request: {e}"),
        })?;
        let resp = match tokio::time::timeout(self.send_timeout, sender.send_request(req)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(self.request_failed(e).await),
            Err(_) => {
                return Err(DeliveryError::transient(
                    "timeout",
                    format!(
                        "no answer within {} s (send_timeout)",
                        self.send_timeout.as_secs()
                    ),
                ));
            }
        };
        self.answer(resp).await
    }
}

/// The failure taxonomy of the link's HTTP statuses.
fn classify(
    status: StatusCode,
    retry_after: Option<Duration>,
    detail: String,
) -> Result<(), DeliveryError> {
    let detail = format!("peer answered {}: {detail}", status.as_u16());
    match status.as_u16() {
        200 => Ok(()),
        409 => Err(DeliveryError::permanent("conflict", detail)),
        // The peer judged this object (malformed, too large, wrong media type): a retry
        // would get the same answer.
        400 | 413 | 415 | 422 => Err(DeliveryError::permanent("refused", detail)),
        // Backpressure or a peer that cannot store right now: the destination waits.
        503 | 429 => Err(DeliveryError::Unavailable {
            reason: "busy",
            detail,
            retry_after,
        }),
        // A wrong URL or a peer that is not a gateway: nothing gets through.
        401 | 403 | 404 | 405 => Err(DeliveryError::unavailable("rejected", detail)),
        _ => Err(DeliveryError::transient("http_status", detail)),
    }
}

/// Resolves once `progress` (ms since `start`) is older than `limit`.
async fn stalled(start: tokio::time::Instant, progress: &AtomicU64, limit: Duration) {
    loop {
        let last = Duration::from_millis(progress.load(Ordering::Relaxed));
        let idle = start.elapsed().saturating_sub(last);
        if idle >= limit {
            return;
        }
        tokio::time::sleep(limit - idle).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_statuses_map_to_the_taxonomy() {
        let k = |s: u16| {
            classify(StatusCode::from_u16(s).unwrap(), None, String::new())
                .err()
                .map(|e| e.kind())
        };
        assert_eq!(k(200), None);
        assert_eq!(k(409), Some("permanent"));
        assert_eq!(k(400), Some("permanent"));
        assert_eq!(k(413), Some("permanent"));
        assert_eq!(k(503), Some("unavailable"));
        assert_eq!(k(404), Some("unavailable"));
        assert_eq!(k(500), Some("transient"));
    }
}
