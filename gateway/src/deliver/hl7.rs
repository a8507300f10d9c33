//! The `hl7` destination: HL7 v2 messages over MLLP to a receiving system (a RIS).
//!
//! Keeps one connection open across messages and sends one message at a time (the
//! dispatcher runs one send at once for this kind, and keeps a patient's messages in
//! order: see [`crate::dispatch`]). Each message goes out byte for byte as it was received.
//!
//! Invariants:
//! - [`Hl7Sender::send`] returns `Ok` only for an `AA` (or `CA`) whose MSA-2 is the
//!   message's control id;
//! - `AE` and `AR` (and enhanced mode's `CE`, `CR`) are permanent failures: the receiving
//!   system saw the message and refused it, so it becomes a dead letter at once, with the
//!   ACK's reason, until an operator replays it (`queue retry`) once the receiving system
//!   is fixed. No ACK within `send_timeout`, a closed connection, an unreadable answer or
//!   one naming another control id is transient (retried within the budget), and the
//!   connection is dropped so that no late ACK is taken for the next message;
//! - every wait has a deadline (connect, write, the ACK) and what is read from the peer is
//!   bounded ([`MAX_ACK`]);
//! - a failure's detail carries our own words, the ACK code and the coded part of its
//!   reason ([`hl7::AckReason`]: the table 0357 error code, severity and segment-field
//!   location), never the peer's free text, which may name the patient: the detail is
//!   logged at warn level and kept in the (unencrypted) failure record.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tracing::{debug, info};

use crate::deliver::DeliveryError;
use crate::hl7::{self, AckCode};
use crate::spool::ObjectReader;

/// Largest ACK read from a receiving system.
pub const MAX_ACK: usize = 64 * 1024;

/// A dead letter's detail for a negative ACK: `code` and the coded reason, if any.
fn refusal(code: &str, reason: &hl7::AckReason) -> String {
    let why = reason.to_string();
    if why.is_empty() {
        format!("the receiving system answered {code}")
    } else {
        format!("the receiving system answered {code}: {why}")
    }
}

/// Sends messages to one receiving system.
pub struct Hl7Sender {
    /// `host:port`.
    address: String,
    /// Deadline of the connect and of each message's ACK.
    timeout: Duration,
    /// The open connection, if any.
    conn: Mutex<Option<TcpStream>>,
}

impl Hl7Sender {
    /// A sender to `address` that waits `timeout` for each ACK.
    pub fn new(address: &str, timeout: Duration) -> Hl7Sender {
        Hl7Sender {
            address: address.to_owned(),
            timeout,
            conn: Mutex::new(None),
        }
    }

    /// Send one message; `Ok` once the receiving system answered AA.
    ///
    /// Cancellation: dropping the future drops the connection with it (the lock's guard
    /// holds it), so a half-sent message never precedes the next one on the same socket.
    pub async fn send(&self, mut reader: ObjectReader) -> Result<(), DeliveryError> {
        if !reader.meta.is_hl7() {
            return Err(DeliveryError::permanent(
                "wrong_protocol",
                "a DICOM object cannot go to an hl7 destination",
            ));
        }
        let control_id = reader.meta.sop_instance_uid.clone();
        let message = reader.read_all().await.map_err(DeliveryError::from_spool)?;
        let mut guard = self.conn.lock().await;
        // A kept connection the peer closed meanwhile is found out by the exchange; it is
        // tried once more on a new connection before the attempt counts as failed.
        let mut reused = guard.is_some();
        let (stream, answer) = loop {
            let mut stream = match guard.take() {
                Some(s) => s,
                None => self.connect().await?,
            };
            match self.exchange(&mut stream, &message).await {
                Ok(a) => break (stream, a),
                Err((e, stale)) if stale && reused => {
                    debug!(address = %self.address, error = %e, "kept HL7 connection was closed; reconnecting");
                    reused = false;
                }
                Err((e, _)) => return Err(e),
            }
        };
        let Some(ack) = hl7::parse_ack(&answer) else {
            return Err(DeliveryError::transient(
                "bad_ack",
                "the answer is not an ACK with an MSA segment",
            ));
        };
        if ack.control_id != control_id {
            return Err(DeliveryError::transient(
                "bad_ack",
                "the ACK names another message control id",
            ));
        }
        // The exchange completed: keep the connection for the next message.
        *guard = Some(stream);
        match ack.code {
            AckCode::Accept => {
                debug!(address = %self.address, "HL7 message accepted");
                Ok(())
            }
            AckCode::Error => Err(DeliveryError::permanent(
                "ack_error",
                refusal("AE (application error)", &ack.reason),
            )),
            AckCode::Reject => Err(DeliveryError::permanent(
                "ack_reject",
                refusal("AR (application reject)", &ack.reason),
            )),
        }
    }

    async fn connect(&self) -> Result<TcpStream, DeliveryError> {
        let s = tokio::time::timeout(self.timeout, TcpStream::connect(&self.address))
            .await
            .map_err(|_| DeliveryError::unavailable("connect", "connect timed out"))?
            .map_err(|e| DeliveryError::unavailable("connect", format!("connect: {e}")))?;
        let _ = s.set_nodelay(true);
        info!(address = %self.address, "HL7 destination connected");
        Ok(s)
    }

    /// Write the message and read one frame back, within the deadlines. The flag says
    /// whether the failure looks like a connection the peer had closed before we wrote.
    async fn exchange(
        &self,
        stream: &mut TcpStream,
        message: &[u8],
    ) -> Result<Vec<u8>, (DeliveryError, bool)> {
        let t = self.timeout;
        tokio::time::timeout(t, hl7::write_frame(stream, message))
            .await
            .map_err(|_| (DeliveryError::transient("link", "write timed out"), false))?
            .map_err(|e| {
                (
                    DeliveryError::transient("link", format!("write: {e}")),
                    true,
                )
            })?;
        hl7::read_frame(stream, MAX_ACK, t, t)
            .await
            .map_err(|e| match e {
                hl7::FrameError::Timeout => (
                    DeliveryError::transient("no_ack", format!("no ACK within {} s", t.as_secs())),
                    false,
                ),
                hl7::FrameError::Closed | hl7::FrameError::Io(_) => (
                    DeliveryError::transient("no_ack", format!("no ACK: {e}")),
                    true,
                ),
                other => (
                    DeliveryError::transient("no_ack", format!("no ACK: {other}")),
                    false,
                ),
            })
    }

    /// Close the connection.
    pub async fn close(&self) {
        self.conn.lock().await.take();
    }
}
