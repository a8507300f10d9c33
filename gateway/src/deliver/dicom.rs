//! The `dicom` destination: a C-STORE SCU towards a PACS or any storage SCP.
//!
//! Invariants:
//! - each object is proposed with its own SOP class and transfer syntax; nothing is
//!   transcoded, and an object is sent only on a context the peer accepted for exactly that
//!   pair;
//! - the data set is streamed from the spool in PDVs of at most
//!   `min(peer max PDU, 1 MiB) - 6` bytes (a peer max of 0 means unlimited), so memory is
//!   bounded by a segment and a PDU;
//! - associations are kept open across objects (pooled, at most `associations` of them),
//!   re-established when an object needs a context the pooled ones lack, and released after
//!   an idle period;
//! - every establish, send and receive runs under a timeout; a failure aborts the
//!   association and reports a transient error.

use std::time::{Duration, Instant};

use dicom_ul::association::client::AsyncClientAssociation;
use dicom_ul::pdu::{AbortRQSource, PDataValue, PDataValueType, PresentationContextResultReason};
use dicom_ul::{ClientAssociationOptions, Pdu};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tracing::debug;

use crate::dimse::{self, Command, MessageIds, StatusClass, field};
use crate::dispatch::SendError;
use crate::spool::ObjectReader;

/// Largest PDV payload we send, whatever the peer allows.
const MAX_SEND_PDU: u32 = 1 << 20;
/// Presentation contexts proposed at most (ids are odd bytes, 2i+1 < 256).
const MAX_CONTEXTS: usize = 127;
/// Pooled associations idle longer than this are released.
const IDLE: Duration = Duration::from_secs(30);

/// A source of an object's bytes, in order.
pub trait Chunks {
    /// The next chunk, or `None` at the end.
    fn next_chunk(
        &mut self,
    ) -> impl std::future::Future<Output = Result<Option<Vec<u8>>, SendError>> + Send;
}

impl Chunks for ObjectReader {
    async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, SendError> {
        self.next_segment()
            .await
            .map_err(|e| SendError::Transient(format!("spool: {e}")))
    }
}

/// An in-memory data set, sent in one chunk.
pub struct Bytes(pub Option<Vec<u8>>);

impl Chunks for Bytes {
    async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, SendError> {
        Ok(self.0.take())
    }
}

/// One open association as a storage SCU.
pub struct Scu {
    assoc: AsyncClientAssociation<TcpStream>,
    /// (abstract syntax, transfer syntax, context id) accepted by the peer.
    contexts: Vec<(String, String, u8)>,
    ids: MessageIds,
    timeout: Duration,
}

struct Pooled {
    scu: Scu,
    last_used: Instant,
}

/// Sends objects to one DICOM node.
pub struct DicomSender {
    address: String,
    ae_title: String,
    calling_ae_title: String,
    associations: usize,
    max_pdu_length: u32,
    timeout: Duration,
    idle: Mutex<Vec<Pooled>>,
}

fn transient(what: &str, e: impl std::fmt::Display) -> SendError {
    SendError::Transient(format!("{what}: {e}"))
}

impl DicomSender {
    /// A sender to `address` (host:port) calling `ae_title` as `calling_ae_title`.
    pub fn new(
        address: &str,
        ae_title: &str,
        calling_ae_title: &str,
        associations: usize,
        max_pdu_length: u32,
        timeout: Duration,
    ) -> DicomSender {
        DicomSender {
            address: address.to_owned(),
            ae_title: ae_title.to_owned(),
            calling_ae_title: calling_ae_title.to_owned(),
            associations,
            max_pdu_length,
            timeout,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Parallel associations.
    pub fn associations(&self) -> usize {
        self.associations
    }

    /// Release every pooled association.
    pub async fn close(&self) {
        let pooled: Vec<Pooled> = std::mem::take(&mut *self.idle.lock().await);
        for p in pooled {
            p.scu.release().await;
        }
    }

    async fn establish(&self, wanted: Vec<(String, String)>) -> Result<Pooled, SendError> {
        let scu = Scu::connect(
            &self.address,
            &self.calling_ae_title,
            &self.ae_title,
            &wanted,
            self.max_pdu_length,
            self.timeout,
        )
        .await?;
        Ok(Pooled {
            scu,
            last_used: Instant::now(),
        })
    }

    /// Take a pooled association that has an accepted context for (class, ts), or make one.
    async fn checkout(&self, class: &str, ts: &str) -> Result<(Pooled, u8, bool), SendError> {
        let mut stale = Vec::new();
        let mut found = None;
        let mut donor: Option<Vec<(String, String)>> = None;
        {
            let mut idle = self.idle.lock().await;
            let mut i = 0;
            while i < idle.len() {
                if idle[i].last_used.elapsed() > IDLE {
                    stale.push(idle.swap_remove(i));
                    continue;
                }
                if let Some(id) = idle[i].scu.context_for(class, ts) {
                    found = Some((idle.swap_remove(i), id));
                    break;
                }
                i += 1;
            }
            if found.is_none() && !idle.is_empty() {
                // Replace one pooled association by a new one that also has this context.
                let old = idle.swap_remove(0);
                donor = Some(
                    old.scu
                        .contexts
                        .iter()
                        .map(|(c, t, _)| (c.clone(), t.clone()))
                        .collect(),
                );
                stale.push(old);
            }
        }
        for p in stale {
            p.scu.release().await;
        }
        if let Some((p, id)) = found {
            return Ok((p, id, true));
        }
        let mut wanted = vec![(class.to_owned(), ts.to_owned())];
        for pair in donor.unwrap_or_default() {
            if wanted.len() >= MAX_CONTEXTS {
                break;
            }
            if !wanted.contains(&pair) {
                wanted.push(pair);
            }
        }
        let pooled = self.establish(wanted).await?;
        let Some(id) = pooled.scu.context_for(class, ts) else {
            pooled.scu.release().await;
            return Err(SendError::Transient(
                "the peer did not accept this SOP class with its transfer syntax".into(),
            ));
        };
        Ok((pooled, id, false))
    }

    /// C-STORE one object.
    pub async fn send(&self, reader: ObjectReader) -> Result<(), SendError> {
        let class = reader.meta.sop_class_uid.clone();
        let ts = reader.meta.transfer_syntax.clone();
        let (pooled, ctx, reused) = self.checkout(&class, &ts).await?;
        match self.store(pooled, ctx, reader).await {
            Ok(p) => {
                self.idle.lock().await.push(p);
                Ok(())
            }
            // A pooled association may have been closed by the peer while idle: the object
            // is still in the spool, and the dispatcher retries (with a fresh association).
            Err(e) if reused => Err(SendError::Transient(format!(
                "{e} (on a pooled association)"
            ))),
            Err(e) => Err(e),
        }
    }

    async fn store(
        &self,
        mut p: Pooled,
        ctx: u8,
        mut reader: ObjectReader,
    ) -> Result<Pooled, SendError> {
        let meta = reader.meta.clone();
        let skip = meta.dataset_offset as usize;
        match p
            .scu
            .store(
                ctx,
                &meta.sop_class_uid,
                &meta.sop_instance_uid,
                &mut reader,
                skip,
            )
            .await
        {
            Ok(()) => {
                p.last_used = Instant::now();
                Ok(p)
            }
            Err(e) => {
                p.scu.abort().await;
                Err(e)
            }
        }
    }
}

impl Scu {
    /// Open an association proposing each (SOP class, transfer syntax) pair in its own
    /// presentation context (at most [`MAX_CONTEXTS`]).
    pub async fn connect(
        address: &str,
        calling_ae_title: &str,
        called_ae_title: &str,
        pairs: &[(String, String)],
        max_pdu_length: u32,
        timeout: Duration,
    ) -> Result<Scu, SendError> {
        let mut opts = ClientAssociationOptions::new()
            .calling_ae_title(calling_ae_title.to_owned())
            .called_ae_title(called_ae_title.to_owned())
            .max_pdu_length(max_pdu_length)
            .connection_timeout(timeout)
            .read_timeout(timeout)
            .write_timeout(timeout);
        for (class, ts) in pairs.iter().take(MAX_CONTEXTS) {
            opts = opts.with_presentation_context(class.clone(), vec![ts.clone()]);
        }
        let mut assoc = tokio::time::timeout(timeout, opts.establish_async(address))
            .await
            .map_err(|_| SendError::Transient("association timed out".into()))?
            .map_err(|e| transient("association", e))?;
        let _ = assoc.inner_stream().set_nodelay(true);
        let contexts = assoc
            .presentation_contexts()
            .iter()
            .filter(|pc| pc.reason == PresentationContextResultReason::Acceptance)
            .map(|pc| {
                (
                    pc.abstract_syntax.clone(),
                    pc.transfer_syntax.clone(),
                    pc.id,
                )
            })
            .collect();
        debug!(%address, "association established");
        Ok(Scu {
            assoc,
            contexts,
            ids: MessageIds::default(),
            timeout,
        })
    }

    /// The accepted context for exactly (class, ts).
    pub fn context_for(&self, class: &str, ts: &str) -> Option<u8> {
        self.contexts
            .iter()
            .find(|(c, t, _)| c == class && t == ts)
            .map(|(_, _, id)| *id)
    }

    /// Release the association gracefully.
    pub async fn release(self) {
        let _ = tokio::time::timeout(self.timeout, self.assoc.release()).await;
    }

    /// Abort the association (A-ABORT from the service user).
    pub async fn abort(&mut self) {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.assoc.send(&Pdu::AbortRQ {
                source: AbortRQSource::ServiceUser,
            }),
        )
        .await;
    }

    /// C-STORE one data set from `chunks`, skipping its first `skip` bytes (the Part-10
    /// header of a spooled object). `Ok` on a success or warning status.
    pub async fn store(
        &mut self,
        ctx: u8,
        sop_class: &str,
        sop_instance: &str,
        chunks: &mut impl Chunks,
        mut skip: usize,
    ) -> Result<(), SendError> {
        let msg_id = self.ids.next_id();
        let rq = Command::store_rq(msg_id, sop_class, sop_instance);
        self.send_pdv(ctx, PDataValueType::Command, true, rq.encode())
            .await?;

        let peer_max = self.assoc.acceptor_max_pdu_length();
        let limit = if peer_max == 0 {
            MAX_SEND_PDU
        } else {
            peer_max.min(MAX_SEND_PDU)
        };
        let max_data = (limit as usize).saturating_sub(6).max(1024);
        let mut pending: Vec<u8> = Vec::with_capacity(max_data);
        while let Some(seg) = chunks.next_chunk().await? {
            let mut data = &seg[..];
            if skip > 0 {
                let n = skip.min(data.len());
                data = &data[n..];
                skip -= n;
            }
            while !data.is_empty() {
                if pending.len() == max_data {
                    let full = std::mem::replace(&mut pending, Vec::with_capacity(max_data));
                    self.send_pdv(ctx, PDataValueType::Data, false, full)
                        .await?;
                }
                let n = (max_data - pending.len()).min(data.len());
                pending.extend_from_slice(&data[..n]);
                data = &data[n..];
            }
        }
        self.send_pdv(ctx, PDataValueType::Data, true, pending)
            .await?;

        // Wait for the C-STORE-RSP.
        let mut command = Vec::new();
        loop {
            let pdu = tokio::time::timeout(self.timeout, self.assoc.receive())
                .await
                .map_err(|_| SendError::Transient("no C-STORE response (timeout)".into()))?
                .map_err(|e| transient("receive", e))?;
            match pdu {
                Pdu::PData { data } => {
                    for pdv in data {
                        if pdv.value_type != PDataValueType::Command {
                            return Err(SendError::Transient(
                                "unexpected data PDV in response".into(),
                            ));
                        }
                        if command.len() + pdv.data.len() > dimse::MAX_COMMAND_BYTES {
                            return Err(SendError::Transient("response command too large".into()));
                        }
                        command.extend_from_slice(&pdv.data);
                        if pdv.is_last {
                            let rsp =
                                Command::decode(&command).map_err(|e| transient("response", e))?;
                            return check_response(&rsp, msg_id);
                        }
                    }
                }
                Pdu::AbortRQ { .. } => {
                    return Err(SendError::Transient("peer aborted the association".into()));
                }
                Pdu::ReleaseRQ => {
                    let _ = self.assoc.send(&Pdu::ReleaseRP).await;
                    return Err(SendError::Transient(
                        "peer released the association before responding".into(),
                    ));
                }
                other => {
                    return Err(SendError::Transient(format!(
                        "unexpected PDU {}",
                        other.short_description()
                    )));
                }
            }
        }
    }

    async fn send_pdv(
        &mut self,
        ctx: u8,
        value_type: PDataValueType,
        is_last: bool,
        data: Vec<u8>,
    ) -> Result<(), SendError> {
        let pdu = Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: ctx,
                value_type,
                is_last,
                data,
            }],
        };
        tokio::time::timeout(self.timeout, self.assoc.send(&pdu))
            .await
            .map_err(|_| SendError::Transient("send timed out".into()))?
            .map_err(|e| transient("send", e))
    }
}

fn check_response(rsp: &Command, msg_id: u16) -> Result<(), SendError> {
    if rsp.field != field::C_STORE_RSP || rsp.responded_to != Some(msg_id) {
        return Err(SendError::Transient(format!("unexpected response {rsp}")));
    }
    let status = rsp.status.unwrap_or(0xFFFF);
    match dimse::classify(status) {
        StatusClass::Success | StatusClass::Warning => Ok(()),
        _ => {
            // A peer's error comment may name the object; keep it out of warn-level logs.
            if let Some(c) = &rsp.error_comment {
                let c: String = c.chars().filter(|c| !c.is_control()).take(64).collect();
                debug!(status = format!("0x{status:04X}"), comment = %c, "C-STORE failed");
            }
            Err(SendError::Transient(format!(
                "peer answered C-STORE with status 0x{status:04X}"
            )))
        }
    }
}
