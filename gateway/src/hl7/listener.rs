//! The `[[hl7_listener]]`: an MLLP acceptor that stores each HL7 v2 message in the spool.
//!
//! Owns the connections of one listener. Invariants:
//! - **AA only after a synced commit**: a message is acknowledged with AA only once
//!   [`Spool::store_message`] returned (the message, its metadata and a queue entry per
//!   destination in one synced write), or for an identical re-send of a message already
//!   stored (same sender, MSH-10 and bytes), which keeps no second copy;
//! - AE when the message cannot be stored now (disk under `spool.min_free`, a destination's
//!   queue full, storage failed): sending it again later may succeed;
//! - AR for what no retry can fix: a message that does not parse ([`crate::hl7::parse`]),
//!   one over `max_message_size` (answered before more than that is buffered, then the
//!   connection is closed), a control id already used by another message of the sender;
//! - every peer-controlled quantity is bounded: `max_connections` connections, each
//!   message at most `max_message_size` bytes, `timeout` of silence between messages and
//!   `timeout` for one message from its start block to its end; a framing error closes the
//!   connection;
//! - nothing read from a message is logged at info level or used as a metric label (the
//!   counters are by listener name and fixed result words).
//!
//! Cancellation: a commit runs in a spool task that owns the message, so a connection that
//! drops (or a shutdown) while its message is being stored changes nothing; the message is
//! stored and the sender, having had no ACK, sends it again and gets AA for the duplicate.
//! At shutdown each connection finishes the message it is storing, answers it, and closes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::Hl7Listener;
use crate::hl7::{self, AckCode, AckContext, FrameError};
use crate::metrics::{ActiveGuard, Metrics};
use crate::spool::{Committed, MessageIngest, Spool, SpoolError};

/// Store one HL7 message for the listener `listener` (an HL7 or a link listener): the time
/// to its synced commit goes to `store_duration_seconds`, and a message stored (not a
/// duplicate) to `received_objects_total` and `received_bytes_total`, all with
/// `protocol="hl7"`.
pub(crate) async fn store_counted(
    spool: &Spool,
    metrics: &Metrics,
    listener: &str,
    ingest: MessageIngest,
) -> Result<Committed, SpoolError> {
    let bytes = ingest.bytes.len() as u64;
    let started = Instant::now();
    let committed = spool.store_message(ingest).await;
    metrics
        .store_duration
        .protocol("hl7", &[listener])
        .observe(started.elapsed().as_secs_f64());
    if let Ok(Committed::Stored(_)) = &committed {
        metrics.received_objects.protocol("hl7", &[listener]).inc();
        metrics
            .received_bytes
            .protocol("hl7", &[listener])
            .inc_by(bytes);
    }
    committed
}

/// An HL7 listener, ready to serve.
pub struct Hl7Server {
    /// Its configuration.
    cfg: Hl7Listener,
    /// Where messages are stored.
    spool: Spool,
    /// Counters (`hl7_messages_total`, `associations_total`).
    metrics: Arc<Metrics>,
}

/// How one message was answered.
struct Answer {
    /// The ACK to send.
    ack: Vec<u8>,
    /// The `hl7_messages_total` result word.
    result: &'static str,
}

impl Hl7Server {
    /// Prepare a listener (does not bind).
    pub fn new(cfg: Hl7Listener, spool: Spool, metrics: Arc<Metrics>) -> Hl7Server {
        Hl7Server {
            cfg,
            spool,
            metrics,
        }
    }

    /// Serve until `shutdown`; each connection finishes the message in hand.
    pub async fn run(self, listener: TcpListener, shutdown: CancellationToken) {
        let server = Arc::new(self);
        let tasks = tokio_util::task::TaskTracker::new();
        let slots = Arc::new(Semaphore::new(server.cfg.max_connections));
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
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                warn!(listener = %server.cfg.name, %peer, "too many HL7 connections; closing the new one");
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
            tasks.spawn(async move {
                let _permit = permit;
                server.connection(socket, peer, shutdown).await;
            });
        }
        // Close the socket now, not when the drain ends, so new connections are refused.
        drop(listener);
        tasks.close();
        tasks.wait().await;
    }

    async fn connection(
        &self,
        mut socket: TcpStream,
        addr: SocketAddr,
        shutdown: CancellationToken,
    ) {
        let name = self.cfg.name.as_str();
        let _ = socket.set_nodelay(true);
        self.metrics
            .associations
            .with_label_values(&[name, "accepted"])
            .inc();
        let _active = ActiveGuard::new(self.metrics.associations_active.with_label_values(&[name]));
        let started = Instant::now();
        let max = self.cfg.max_message_size.as_u64() as usize;
        let timeout = self.cfg.timeout;
        let (mut accepted, mut refused) = (0u64, 0u64);
        let mut ended = "closed";
        loop {
            let frame = tokio::select! {
                _ = shutdown.cancelled() => { ended = "shutdown"; break }
                f = hl7::read_frame(&mut socket, max, timeout, timeout) => f,
            };
            let (answer, close) = match frame {
                Ok(raw) => (self.message(raw).await, false),
                Err(FrameError::TooLarge { prefix, .. }) => (
                    Answer {
                        ack: hl7::ack(
                            &AckContext::salvage(&prefix),
                            AckCode::Reject,
                            &format!("message larger than max_message_size ({max} bytes)"),
                            &ack_id(),
                        ),
                        result: "too_large",
                    },
                    true,
                ),
                Err(FrameError::Framing) => (
                    Answer {
                        ack: hl7::ack(
                            &AckContext::default(),
                            AckCode::Reject,
                            "MLLP framing error",
                            &ack_id(),
                        ),
                        result: "rejected",
                    },
                    true,
                ),
                Err(FrameError::Closed) => break,
                Err(e) => {
                    debug!(listener = %name, peer = %addr, error = %e, "HL7 connection ends");
                    ended = "timeout_or_error";
                    break;
                }
            };
            self.metrics
                .hl7_messages
                .with_label_values(&[name, answer.result])
                .inc();
            if matches!(answer.result, "accepted" | "duplicate") {
                accepted += 1;
            } else {
                refused += 1;
            }
            let sent =
                tokio::time::timeout(timeout, hl7::write_frame(&mut socket, &answer.ack)).await;
            if !matches!(sent, Ok(Ok(()))) {
                ended = "write_failed";
                break;
            }
            if close {
                ended = "refused";
                linger(&mut socket).await;
                break;
            }
        }
        // One line per connection; nothing from the messages.
        info!(
            listener = %name,
            peer = %addr,
            accepted,
            refused,
            ended,
            duration_ms = started.elapsed().as_millis() as u64,
            "HL7 connection ended"
        );
    }

    /// Store one message and say how to answer it.
    async fn message(&self, raw: Vec<u8>) -> Answer {
        let reject = |raw: &[u8], why: &str, result| Answer {
            ack: hl7::ack(&AckContext::salvage(raw), AckCode::Reject, why, &ack_id()),
            result,
        };
        let msg = match hl7::parse(&raw) {
            Ok(m) => m,
            Err(e) => return reject(&raw, &e.to_string(), "rejected"),
        };
        let ctx = AckContext::of(&msg);
        let answer = |code, why: &str, result| Answer {
            ack: hl7::ack(&ctx, code, why, &ack_id()),
            result,
        };
        let sender = format!("{}^{}", msg.sending_app, msg.sending_facility);
        let dedup = self
            .spool
            .message_dedup_key(&self.cfg.name, &sender, &msg.control_id);
        let ingest = MessageIngest {
            patient: msg.patient.clone(),
            control_id: msg.control_id.clone(),
            message_type: msg.message_type.clone(),
            source: self.cfg.name.clone(),
            routes: self.cfg.route_to.clone(),
            dedup: Some(dedup),
            bytes: raw,
        };
        // The frame is in and parsed: from here to the commit is the ack latency.
        let committed = store_counted(&self.spool, &self.metrics, &self.cfg.name, ingest).await;
        match committed {
            Ok(Committed::Stored(id)) => {
                debug!(listener = %self.cfg.name, object = %id, "HL7 message stored");
                answer(AckCode::Accept, "", "accepted")
            }
            Ok(Committed::Duplicate) => answer(AckCode::Accept, "", "duplicate"),
            Err(SpoolError::IdentityMismatch(_)) => answer(
                AckCode::Reject,
                "this control id was used for another message",
                "conflict",
            ),
            Err(SpoolError::TooLarge(_)) => {
                answer(AckCode::Reject, "message too large", "too_large")
            }
            Err(SpoolError::Format(_) | SpoolError::Unrouted) => {
                answer(AckCode::Reject, "message refused", "rejected")
            }
            Err(e) => {
                warn!(listener = %self.cfg.name, error = %e, "HL7 message not stored (AE)");
                answer(
                    AckCode::Error,
                    "the gateway cannot store messages now; send again later",
                    "error",
                )
            }
        }
    }
}

/// Close a connection we refused so that the peer reads our AR: end our side, then read
/// and discard what it is still sending (at most 1 MiB, for at most 2 s). Closing with
/// unread bytes would make the kernel reset the connection, and the peer could lose the AR.
async fn linger(socket: &mut TcpStream) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let _ = socket.shutdown().await;
    let drain = async {
        let mut buf = vec![0u8; 16 * 1024];
        let mut left: usize = 1 << 20;
        while left > 0 {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
}

/// A control id for one of our ACKs (MSH-10): random, never derived from the message.
fn ack_id() -> String {
    let mut b = [0u8; 8];
    if keystore::random_bytes(&mut b).is_err() {
        return "GW".to_owned();
    }
    format!("GW{}", hex::encode(b))
}
