//! Deliver: hand objects to their destinations.
//!
//! [`Sender`] is the one interface the dispatcher uses; each kind lives in its own module:
//! [`gateway`] (STOW-RS to a peer gateway over the site link, and HL7 messages over the same
//! link), [`dicom`] (C-STORE SCU to a PACS), [`folder`] (Part-10 files for hand-off) and
//! [`hl7`] (MLLP to a receiving HL7 system). [`Sender::from_config`] is the one
//! place a sender is built from its `[[destination]]`.
//!
//! Invariants:
//! - `send` returns `Ok` only when the destination has durably accepted the object;
//! - every failure is a typed [`DeliveryError`] saying whom it concerns and whether a retry
//!   can help (the failure taxonomy of `docs/operations.md`): the dispatcher decides retry,
//!   circuit breaking and dead letters from the kind alone, never from message text;
//! - a failure's `reason` is a fixed word (a bounded metric label) and its `detail` carries
//!   no patient data and no free text from a peer.
//!
//! Dependency arrows: `dispatch` → `deliver` → `spool` (reading) and `dimse`; nothing here
//! imports `dispatch`.

pub mod dicom;
pub mod folder;
pub mod gateway;
pub mod hl7;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::config::{Destination, DestinationKind};
use crate::spool::{ObjectReader, SpoolError};

/// Why a delivery attempt failed, and what a retry can do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// The destination, or the way to it, is not taking objects right now (connection
    /// refused, TLS failure, association rejected, 503, link lost). Not this object's
    /// fault: it counts against the destination (circuit breaker), not the object's budget.
    #[error("destination unavailable ({reason}): {detail}")]
    Unavailable {
        /// A fixed word for metrics (`connect`, `tls`, `association_rejected`...).
        reason: &'static str,
        /// What happened, for the operator.
        detail: String,
        /// How long the destination asked us to wait (HTTP `Retry-After`), if it said.
        retry_after: Option<Duration>,
    },
    /// This object's attempt failed in a way a retry may fix (the peer aborted during it,
    /// answered "out of resources", or did not answer in time). Counts against the
    /// object's retry budget; once spent, the object becomes a dead letter.
    #[error("attempt failed ({reason}): {detail}")]
    Transient {
        /// A fixed word for metrics.
        reason: &'static str,
        /// What happened.
        detail: String,
    },
    /// Retrying cannot help (the destination refused this object, or our copy is damaged):
    /// the entry becomes a dead letter at once, with this reason.
    #[error("refused ({reason}): {detail}")]
    Permanent {
        /// A fixed word for metrics.
        reason: &'static str,
        /// What happened.
        detail: String,
    },
    /// The spool itself failed while reading the object (I/O error): stop and alert, never
    /// blame the destination or the object.
    #[error("local storage failed: {detail}")]
    Local {
        /// What happened.
        detail: String,
    },
}

impl DeliveryError {
    /// The metric reason label.
    pub fn reason(&self) -> &'static str {
        match self {
            DeliveryError::Unavailable { reason, .. }
            | DeliveryError::Transient { reason, .. }
            | DeliveryError::Permanent { reason, .. } => reason,
            DeliveryError::Local { .. } => "local_storage",
        }
    }

    /// `unavailable`, `transient`, `permanent` or `local`.
    pub fn kind(&self) -> &'static str {
        match self {
            DeliveryError::Unavailable { .. } => "unavailable",
            DeliveryError::Transient { .. } => "transient",
            DeliveryError::Permanent { .. } => "permanent",
            DeliveryError::Local { .. } => "local",
        }
    }

    /// Shorthand for [`DeliveryError::Unavailable`] without a `Retry-After`.
    pub fn unavailable(reason: &'static str, detail: impl Into<String>) -> DeliveryError {
        DeliveryError::Unavailable {
            reason,
            detail: detail.into(),
            retry_after: None,
        }
    }

    /// Shorthand for [`DeliveryError::Transient`].
    pub fn transient(reason: &'static str, detail: impl Into<String>) -> DeliveryError {
        DeliveryError::Transient {
            reason,
            detail: detail.into(),
        }
    }

    /// Shorthand for [`DeliveryError::Permanent`].
    pub fn permanent(reason: &'static str, detail: impl Into<String>) -> DeliveryError {
        DeliveryError::Permanent {
            reason,
            detail: detail.into(),
        }
    }

    /// Classify a failure to read our own copy: damage is permanent (replaying cannot
    /// repair it), anything else is the local store failing.
    pub fn from_spool(e: SpoolError) -> DeliveryError {
        match e {
            SpoolError::MissingSegment(..) => {
                DeliveryError::permanent("missing_data", e.to_string())
            }
            SpoolError::Corrupt(..) | SpoolError::NotFound(_) => {
                DeliveryError::permanent("integrity", e.to_string())
            }
            other => DeliveryError::Local {
                detail: other.to_string(),
            },
        }
    }
}

/// A destination's sender.
pub enum Sender {
    /// A peer gateway over the site link.
    Gateway(gateway::GatewaySender),
    /// A DICOM node (PACS).
    Dicom(dicom::DicomSender),
    /// A hand-off folder.
    Folder(folder::FolderSender),
    /// A receiving HL7 system (MLLP).
    Hl7(hl7::Hl7Sender),
}

impl Sender {
    /// Build the sender of a configured destination. Touches nothing outside the process
    /// (no connection, no folder created) until the first send.
    pub fn from_config(
        dest: &Destination,
        node_name: &str,
        client_tls: Option<&tokio::sync::watch::Receiver<Arc<rustls::ClientConfig>>>,
    ) -> anyhow::Result<Sender> {
        Ok(match &dest.kind {
            DestinationKind::Gateway {
                url,
                peer_name,
                max_in_flight,
            } => {
                let tls = client_tls
                    .cloned()
                    .context("a gateway destination needs [tls]")?;
                Sender::Gateway(
                    gateway::GatewaySender::reloading(
                        url,
                        peer_name,
                        tls,
                        node_name,
                        *max_in_flight,
                        dest.send_timeout,
                    )
                    .map_err(anyhow::Error::msg)?,
                )
            }
            DestinationKind::Dicom {
                address,
                ae_title,
                calling_ae_title,
                associations,
                max_pdu_length,
                timeout_secs,
                tls,
            } => {
                let sender = dicom::DicomSender::new(
                    address,
                    ae_title,
                    calling_ae_title,
                    *associations,
                    *max_pdu_length,
                    Duration::from_secs(*timeout_secs),
                );
                Sender::Dicom(match tls {
                    Some(t) => sender.with_tls(t).context("[destination.tls]")?,
                    None => sender,
                })
            }
            DestinationKind::Folder { path } => Sender::Folder(folder::FolderSender::new(path)),
            DestinationKind::Hl7 { address } => {
                Sender::Hl7(hl7::Hl7Sender::new(address, dest.send_timeout))
            }
        })
    }

    /// The reloader of a `dicom` destination's TLS config, once (the node runs it).
    pub fn take_tls_reloader(&self) -> Option<crate::tls::ClientConfigReloader> {
        match self {
            Sender::Dicom(d) => d.take_reloader(),
            _ => None,
        }
    }

    /// How many sends may run at once.
    pub fn concurrency(&self) -> usize {
        match self {
            Sender::Gateway(g) => g.max_in_flight(),
            Sender::Dicom(d) => d.associations(),
            Sender::Folder(_) => 2,
            // One message at a time, each acknowledged before the next.
            Sender::Hl7(_) => 1,
        }
    }

    /// Send one object.
    pub async fn send(&self, reader: ObjectReader) -> Result<(), DeliveryError> {
        // The config routes each protocol only to destinations that take it; this is the
        // second line.
        if reader.meta.is_hl7() && matches!(self, Sender::Dicom(_) | Sender::Folder(_)) {
            return Err(DeliveryError::permanent(
                "wrong_protocol",
                "an HL7 message cannot go to a DICOM destination",
            ));
        }
        match self {
            Sender::Gateway(g) => g.send(reader).await,
            Sender::Dicom(d) => d.send(reader).await,
            Sender::Folder(f) => f.send(reader).await,
            Sender::Hl7(h) => h.send(reader).await,
        }
    }

    /// Release pooled connections (and, for a gateway, wait for its connection tasks).
    pub async fn close(&self) {
        match self {
            Sender::Dicom(d) => d.close().await,
            Sender::Gateway(g) => g.close().await,
            Sender::Hl7(h) => h.close().await,
            Sender::Folder(_) => {}
        }
    }
}
