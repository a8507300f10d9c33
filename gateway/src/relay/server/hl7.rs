//! The link listener's HL7 v2 request type: `POST /hl7/v2/messages`.
//!
//! Owns the receiving side of an HL7 message on the site link. Invariants:
//! - the body is read bounded ([`crate::hl7::MAX_MESSAGE_BYTES`]) within the request's
//!   deadline, and its SHA-256 checked against `Content-Digest` before anything is stored;
//! - 200 only after the message is committed (synced) to the spool under its patient's key
//!   and queued for the listener's HL7 destinations, or for an identical re-send of a
//!   transfer already stored (same peer, `Content-ID` and digest), which keeps no second
//!   copy;
//! - the same transfer with other bytes is 409, a message that does not parse (or that no
//!   HL7 destination takes) 422, a body over the limit 413: the sender dead-letters those;
//!   backpressure and storage failures are 503 with `Retry-After`.

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use tracing::{debug, warn};

use super::{ConnStats, LinkServer, MAX_CONTENT_ID, json};
use crate::hl7;
use crate::spool::{Committed, DedupState, MessageIngest, SpoolError};

impl LinkServer {
    /// Receive one HL7 message from `peer` (see the module docs).
    pub(super) async fn hl7_message(
        &self,
        req: Request<Incoming>,
        peer: &str,
        stats: &ConnStats,
    ) -> Response<Full<Bytes>> {
        let (status, result) = self.hl7_inner(req, peer).await;
        let name = self.cfg.name.as_str();
        self.metrics
            .hl7_messages
            .with_label_values(&[name, result])
            .inc();
        if status == StatusCode::OK {
            if result == "accepted" {
                stats
                    .objects
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            return json(StatusCode::OK, 1, 0);
        }
        stats
            .refused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        warn!(listener = %name, status = status.as_u16(), result, "HL7 message refused");
        json(status, 0, 1)
    }

    async fn hl7_inner(&self, req: Request<Incoming>, peer: &str) -> (StatusCode, &'static str) {
        if req.method() != Method::POST {
            return (StatusCode::METHOD_NOT_ALLOWED, "rejected");
        }
        let h = req.headers();
        let ct = h
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .unwrap_or("")
            .trim();
        if !ct.eq_ignore_ascii_case(crate::relay::HL7_MEDIA_TYPE) {
            return (StatusCode::UNSUPPORTED_MEDIA_TYPE, "rejected");
        }
        let Some(transfer_id) = h
            .get("content-id")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| {
                !v.is_empty()
                    && v.len() <= MAX_CONTENT_ID
                    && v.bytes().all(|b| b.is_ascii_graphic())
            })
            .map(str::to_owned)
        else {
            return (StatusCode::BAD_REQUEST, "rejected");
        };
        let Some(digest) = h
            .get("content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(crate::relay::parse_content_digest)
        else {
            return (StatusCode::BAD_REQUEST, "rejected");
        };
        let key = self.spool.dedup_key(peer, &transfer_id);
        let spool = self.spool.clone();
        let state =
            tokio::task::spawn_blocking(move || spool.dedup_state_blocking(key, &digest)).await;
        match state.unwrap_or_else(|e| Err(SpoolError::Internal(format!("dedup lookup: {e}")))) {
            Ok(DedupState::New) => {}
            Ok(DedupState::Identical) => return (StatusCode::OK, "duplicate"),
            Ok(DedupState::Conflict) => return (StatusCode::CONFLICT, "conflict"),
            Err(_) => return (StatusCode::SERVICE_UNAVAILABLE, "error"),
        }
        let body = match http_body_util::Limited::new(req.into_body(), hl7::MAX_MESSAGE_BYTES)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(e)
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some() =>
            {
                return (StatusCode::PAYLOAD_TOO_LARGE, "too_large");
            }
            // The transfer broke off: the sender retries.
            Err(_) => return (StatusCode::SERVICE_UNAVAILABLE, "error"),
        };
        let mut sha = keystore::Sha256::new();
        sha.update(&body);
        if sha.finish() != digest {
            self.metrics
                .integrity_failures
                .with_label_values(&["link_digest"])
                .inc();
            return (StatusCode::BAD_REQUEST, "rejected");
        }
        let msg = match hl7::parse(&body) {
            Ok(m) => m,
            Err(e) => {
                debug!(listener = %self.cfg.name, reason = %e, "HL7 message does not parse");
                return (StatusCode::UNPROCESSABLE_ENTITY, "rejected");
            }
        };
        if self.hl7_routes.is_empty() {
            return (StatusCode::UNPROCESSABLE_ENTITY, "rejected");
        }
        let ingest = MessageIngest {
            patient: msg.patient,
            control_id: msg.control_id,
            message_type: msg.message_type,
            source: peer.to_owned(),
            routes: self.hl7_routes.clone(),
            dedup: Some(key),
            bytes: body.to_vec(),
        };
        // The message is in and checked: from here to the commit is its ack latency.
        let committed =
            crate::hl7::listener::store_counted(&self.spool, &self.metrics, &self.cfg.name, ingest)
                .await;
        match committed {
            Ok(Committed::Stored(id)) => {
                debug!(listener = %self.cfg.name, object = %id, "HL7 message stored from link");
                (StatusCode::OK, "accepted")
            }
            Ok(Committed::Duplicate) => (StatusCode::OK, "duplicate"),
            Err(SpoolError::IdentityMismatch(_)) => (StatusCode::CONFLICT, "conflict"),
            Err(SpoolError::TooLarge(_)) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            Err(SpoolError::Format(_) | SpoolError::Unrouted) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "rejected")
            }
            Err(e) => {
                warn!(listener = %self.cfg.name, error = %e, "HL7 message not stored");
                (StatusCode::SERVICE_UNAVAILABLE, "error")
            }
        }
    }
}
