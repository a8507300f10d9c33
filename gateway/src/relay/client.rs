//! The STOW-RS sender towards a peer gateway.
//!
//! Keeps one HTTP/2 connection per destination and multiplexes requests over it; the
//! dispatcher decides how many are in flight. Each request streams the object from the
//! spool segment by segment through a small channel, so memory stays bounded by a couple of
//! segments per request, whatever the object size.
//!
//! Invariant: [`GatewaySender::send`] returns `Ok` only for a 200 from the peer, which the
//! peer sends after its synced commit.

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
use tracing::{debug, info};

use crate::dispatch::SendError;
use crate::spool::ObjectReader;

type Body = BoxBody<Bytes, std::io::Error>;

/// Sends objects to one peer gateway.
pub struct GatewaySender {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    connector: TlsConnector,
    /// Our node name, part of every transfer id.
    node: String,
    conn: Mutex<Option<SendRequest<Body>>>,
    timeout: Duration,
}

impl GatewaySender {
    /// A sender to `url` whose certificate must carry `peer_name`.
    pub fn new(
        url: &str,
        peer_name: &str,
        tls: Arc<rustls::ClientConfig>,
        node: &str,
    ) -> Result<GatewaySender, String> {
        let (host, port) = crate::config::parse_https_url(url)?;
        let server_name = ServerName::try_from(peer_name.to_owned())
            .map_err(|e| format!("peer_name {peer_name:?}: {e}"))?;
        Ok(GatewaySender {
            host,
            port,
            server_name,
            connector: TlsConnector::from(tls),
            node: node.to_owned(),
            conn: Mutex::new(None),
            timeout: Duration::from_secs(15),
        })
    }

    async fn connection(&self) -> Result<SendRequest<Body>, SendError> {
        let mut guard = self.conn.lock().await;
        if let Some(s) = guard.as_ref()
            && !s.is_closed()
        {
            return Ok(s.clone());
        }
        *guard = None;
        let addr = (self.host.as_str(), self.port);
        let tcp = tokio::time::timeout(self.timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| SendError::Transient("connect timed out".into()))?
            .map_err(|e| SendError::Transient(format!("connect: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio::time::timeout(
            self.timeout,
            self.connector.connect(self.server_name.clone(), tcp),
        )
        .await
        .map_err(|_| SendError::Transient("TLS handshake timed out".into()))?
        .map_err(|e| SendError::Transient(format!("TLS handshake: {e}")))?;
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
            .map_err(|_| SendError::Transient("HTTP/2 handshake timed out".into()))?
            .map_err(|e| SendError::Transient(format!("HTTP/2 handshake: {e}")))?;
        let host = self.host.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%host, error = %e, "link connection closed");
            }
        });
        info!(host = %self.host, port = self.port, "link connected");
        *guard = Some(sender.clone());
        Ok(sender)
    }

    /// Send one object; `Ok` once the peer confirmed its synced commit.
    pub async fn send(&self, mut reader: ObjectReader) -> Result<(), SendError> {
        let mut sender = self.connection().await?;
        sender
            .ready()
            .await
            .map_err(|e| SendError::Transient(format!("link not ready: {e}")))?;
        let mut rnd = [0u8; 12];
        keystore::random_bytes(&mut rnd).map_err(|e| SendError::Transient(e.to_string()))?;
        let boundary = format!("dicomgw-{}", hex::encode(rnd));
        let meta = &reader.meta;
        let preamble = format!(
            "--{boundary}\r\nContent-Type: application/dicom\r\nContent-ID: <{}@{}>\r\nContent-Digest: {}\r\n\r\n",
            meta.id.hex(),
            self.node,
            super::content_digest(&meta.digest),
        );
        let epilogue = format!("\r\n--{boundary}--\r\n");
        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(2);
        let producer = tokio::spawn(async move {
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
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                        return;
                    }
                }
            }
            let _ = tx.send(Ok(Frame::data(Bytes::from(epilogue)))).await;
        });
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        let body: Body = StreamBody::new(stream).boxed();
        let req = Request::post(format!(
            "https://{}:{}{}",
            self.host,
            self.port,
            super::STOW_PATH
        ))
        .header(
            header::CONTENT_TYPE,
            format!("multipart/related; type=\"application/dicom\"; boundary={boundary}"),
        )
        .header(header::ACCEPT, "application/json")
        .body(body)
        .map_err(|e| SendError::Transient(format!("request: {e}")))?;
        let result = sender.send_request(req).await;
        producer.abort();
        let resp = match result {
            Ok(r) => r,
            Err(e) => {
                if e.is_closed() || e.is_canceled() {
                    self.conn.lock().await.take();
                }
                return Err(SendError::Transient(format!("link request failed: {e}")));
            }
        };
        let status = resp.status();
        // Bound what we read of the body: it is a short status document.
        let body = http_body_util::Limited::new(resp.into_body(), 64 * 1024)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let detail = String::from_utf8_lossy(&body)
            .chars()
            .take(200)
            .collect::<String>();
        match status {
            StatusCode::OK => Ok(()),
            StatusCode::CONFLICT => Err(SendError::Permanent(format!(
                "peer refused the object as conflicting with an earlier transfer: {detail}"
            ))),
            s => Err(SendError::Transient(format!("peer answered {s}: {detail}"))),
        }
    }
}
