//! Deliver: hand objects to their destinations.
//!
//! [`Sender`] is the one interface the dispatcher uses; each kind lives in its own module:
//! [`dicom`] (C-STORE SCU to a PACS), [`folder`] (Part-10 files for hand-off), and the peer
//! gateway sender in [`crate::relay::client`]. Invariant: `send` returns `Ok` only when the
//! destination has durably accepted the object.

pub mod dicom;
pub mod folder;

use crate::dispatch::SendError;
use crate::relay::client::GatewaySender;
use crate::spool::ObjectReader;

/// A destination's sender.
pub enum Sender {
    /// A peer gateway over the site link.
    Gateway {
        /// The sender.
        sender: GatewaySender,
        /// Requests in flight.
        in_flight: usize,
    },
    /// A DICOM node (PACS).
    Dicom(dicom::DicomSender),
    /// A hand-off folder.
    Folder(folder::FolderSender),
}

impl Sender {
    /// How many sends may run at once.
    pub fn concurrency(&self) -> usize {
        match self {
            Sender::Gateway { in_flight, .. } => *in_flight,
            Sender::Dicom(d) => d.associations(),
            Sender::Folder(_) => 2,
        }
    }

    /// Send one object.
    pub async fn send(&self, reader: ObjectReader) -> Result<(), SendError> {
        match self {
            Sender::Gateway { sender, .. } => sender.send(reader).await,
            Sender::Dicom(d) => d.send(reader).await,
            Sender::Folder(f) => f.send(reader).await,
        }
    }

    /// Release pooled connections.
    pub async fn close(&self) {
        if let Sender::Dicom(d) = self {
            d.close().await;
        }
    }
}
