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
//!   association;
//! - failures are classified ([`DeliveryError`]): no connection or a rejected association
//!   is the destination's (unavailable); an abort, a timeout or a transient status during an
//!   object is that object's (transient, within its budget); a refusing status (A9xx, Cxxx,
//!   0x01xx other than 0x0110) or no accepted presentation context for the object's SOP
//!   class and transfer syntax is permanent;
//! - a failure on a pooled association before the peer answered anything is retried once
//!   on a fresh association (the peer may have closed it while idle);
//! - every association also proposes the Verification SOP class, which every SCP accepts:
//!   many SCPs (DCMTK's `storescp` among them) reject the whole association when none of
//!   its contexts is acceptable, and that must not look like an outage (it would be retried
//!   forever): with Verification accepted, an object whose own context was rejected is
//!   plainly refused;
//! - with `[destination.tls]` every association runs over DICOM TLS (PS3.15 Annex B): the
//!   node's certificate must chain to the configured CA and carry the server name exactly,
//!   and each new association uses the TLS config current at its start (reloaded when its
//!   files change), so pooled associations go on with the one they started with. A failed
//!   handshake is the destination's failure (unavailable), never an object's.

use std::time::{Duration, Instant};

use std::sync::Arc;

use dicom_ul::association::client::{AsyncClientAssociation, AsyncTlsStream};
use dicom_ul::pdu::{AbortRQSource, PDataValue, PDataValueType, PresentationContextResultReason};
use dicom_ul::{ClientAssociationOptions, Pdu};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tracing::debug;

use crate::deliver::DeliveryError;
use crate::dimse::{self, Command, MessageIds, StatusClass, field};
use crate::spool::ObjectReader;

/// Largest PDV payload we send, whatever the peer allows.
const MAX_SEND_PDU: u32 = 1 << 20;
/// Presentation contexts proposed at most (ids are odd bytes, 2i+1 < 256), Verification
/// included.
const MAX_CONTEXTS: usize = 127;
/// Implicit VR Little Endian, the transfer syntax every SCP accepts for Verification.
const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";
/// Pooled associations idle longer than this are released.
const IDLE: Duration = Duration::from_secs(30);

/// A source of an object's bytes, in order.
pub trait Chunks {
    /// The next chunk, or `None` at the end.
    fn next_chunk(
        &mut self,
    ) -> impl std::future::Future<Output = Result<Option<Vec<u8>>, DeliveryError>> + Send;
}

impl Chunks for ObjectReader {
    async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, DeliveryError> {
        self.next_segment().await.map_err(DeliveryError::from_spool)
    }
}

/// An in-memory data set, sent in one chunk.
pub struct Bytes(pub Option<Vec<u8>>);

impl Chunks for Bytes {
    async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, DeliveryError> {
        Ok(self.0.take())
    }
}

/// An association over plain TCP or over DICOM TLS.
enum Link {
    Plain(AsyncClientAssociation<TcpStream>),
    Tls(Box<AsyncClientAssociation<AsyncTlsStream>>),
}

/// `$body` with `$a` bound to the association, whichever its transport.
macro_rules! on_link {
    ($link:expr, $a:ident => $body:expr) => {
        match $link {
            Link::Plain($a) => $body,
            Link::Tls($a) => $body,
        }
    };
}

/// What a DICOM TLS association needs: the client config in use and the name the
/// node's certificate must carry.
#[derive(Clone)]
pub struct ScuTls {
    /// The client config (current at the association's start).
    pub config: Arc<rustls::ClientConfig>,
    /// The DNS SAN the node's certificate must carry.
    pub server_name: String,
}

/// One open association as a storage SCU.
pub struct Scu {
    assoc: Link,
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
    /// DICOM TLS: the client config in use (reloaded) and the server name.
    tls: Option<(crate::tls::Current<rustls::ClientConfig>, String)>,
    /// The reloader of that config, until the node takes it to run it.
    reloader: std::sync::Mutex<Option<crate::tls::ClientConfigReloader>>,
}

/// A failure of the connection during an object: this object's attempt.
fn transient(what: &str, e: impl std::fmt::Display) -> DeliveryError {
    DeliveryError::transient("dicom_io", format!("{what}: {e}"))
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
            tls: None,
            reloader: std::sync::Mutex::new(None),
        }
    }

    /// Speak DICOM TLS to the node as `tls` says: its files are loaded now (an error is a
    /// start-up error) and reloaded by the task [`DicomSender::take_reloader`] hands out.
    pub fn with_tls(
        mut self,
        tls: &crate::config::DestinationTls,
    ) -> Result<DicomSender, anyhow::Error> {
        let server_name =
            crate::config::dicom_server_name(&self.address, tls).map_err(anyhow::Error::msg)?;
        let (reloader, current) = crate::tls::ClientConfigReloader::dicom(tls)?;
        self.tls = Some((current, server_name));
        self.reloader = std::sync::Mutex::new(Some(reloader));
        Ok(self)
    }

    /// The reloader of the DICOM TLS config, once (for the node to run with
    /// [`crate::tls::reload`]); `None` without `[destination.tls]`.
    pub fn take_reloader(&self) -> Option<crate::tls::ClientConfigReloader> {
        self.reloader.lock().ok()?.take()
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

    async fn establish(&self, wanted: Vec<(String, String)>) -> Result<Pooled, DeliveryError> {
        let tls = self.tls.as_ref().map(|(current, server_name)| ScuTls {
            config: current.borrow().clone(),
            server_name: server_name.clone(),
        });
        let scu = Scu::connect(
            &self.address,
            &self.calling_ae_title,
            &self.ae_title,
            &wanted,
            self.max_pdu_length,
            self.timeout,
            tls,
        )
        .await?;
        Ok(Pooled {
            scu,
            last_used: Instant::now(),
        })
    }

    /// Take a pooled association that has an accepted context for (class, ts), or make one.
    async fn checkout(&self, class: &str, ts: &str) -> Result<(Pooled, u8, bool), DeliveryError> {
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
            if wanted.len() >= MAX_CONTEXTS - 1 {
                break;
            }
            if !wanted.contains(&pair) {
                wanted.push(pair);
            }
        }
        let pooled = self.establish(wanted).await?;
        let Some(id) = pooled.scu.context_for(class, ts) else {
            pooled.scu.release().await;
            return Err(DeliveryError::permanent(
                "no_presentation_context",
                "the peer accepted no presentation context for this SOP class with its transfer syntax",
            ));
        };
        Ok((pooled, id, false))
    }

    /// C-STORE one object. `reopen` gives the object's bytes again (for the one retry on a
    /// fresh association after a pooled one failed before the peer answered).
    pub async fn send(&self, reader: ObjectReader) -> Result<(), DeliveryError> {
        let class = reader.meta.sop_class_uid.clone();
        let ts = reader.meta.transfer_syntax.clone();
        let (pooled, ctx, reused) = self.checkout(&class, &ts).await?;
        let retry = if reused {
            Some(reader.reopen().await)
        } else {
            None
        };
        match self.store(pooled, ctx, reader).await {
            Ok(p) => {
                self.idle.lock().await.push(p);
                Ok(())
            }
            // A pooled association may have been closed by the peer while idle: try once
            // more on a fresh one before blaming the object.
            Err(Stored::BeforeResponse(_)) if retry.is_some() => {
                let reader = retry
                    .ok_or_else(|| DeliveryError::Local {
                        detail: "no reader".into(),
                    })?
                    .map_err(DeliveryError::from_spool)?;
                let pooled = self.establish(vec![(class.clone(), ts.clone())]).await?;
                let Some(ctx) = pooled.scu.context_for(&class, &ts) else {
                    pooled.scu.release().await;
                    return Err(DeliveryError::permanent(
                        "no_presentation_context",
                        "the peer accepted no presentation context for this SOP class with its transfer syntax",
                    ));
                };
                match self.store(pooled, ctx, reader).await {
                    Ok(p) => {
                        self.idle.lock().await.push(p);
                        Ok(())
                    }
                    Err(e) => Err(e.into_error()),
                }
            }
            Err(e) => Err(e.into_error()),
        }
    }

    async fn store(
        &self,
        mut p: Pooled,
        ctx: u8,
        mut reader: ObjectReader,
    ) -> Result<Pooled, Stored> {
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

/// How a C-STORE failed: before the peer answered anything (the association may simply have
/// been stale), or with or after an answer.
#[derive(Debug)]
pub enum Stored {
    /// The peer never answered.
    BeforeResponse(DeliveryError),
    /// The peer answered (a failure status, an abort, a release).
    Answered(DeliveryError),
}

impl Stored {
    /// The delivery error.
    pub fn into_error(self) -> DeliveryError {
        match self {
            Stored::BeforeResponse(e) | Stored::Answered(e) => e,
        }
    }
}

impl Scu {
    /// Open an association proposing each (SOP class, transfer syntax) pair in its own
    /// presentation context (at most [`MAX_CONTEXTS`]), over DICOM TLS with `tls`.
    pub async fn connect(
        address: &str,
        calling_ae_title: &str,
        called_ae_title: &str,
        pairs: &[(String, String)],
        max_pdu_length: u32,
        timeout: Duration,
        tls: Option<ScuTls>,
    ) -> Result<Scu, DeliveryError> {
        let mut opts = ClientAssociationOptions::new()
            .calling_ae_title(calling_ae_title.to_owned())
            .called_ae_title(called_ae_title.to_owned())
            .max_pdu_length(max_pdu_length)
            .connection_timeout(timeout)
            .read_timeout(timeout)
            .write_timeout(timeout);
        opts = opts.with_presentation_context(
            dimse::VERIFICATION_SOP_CLASS.to_owned(),
            vec![IMPLICIT_VR_LE.to_owned()],
        );
        for (class, ts) in pairs.iter().take(MAX_CONTEXTS - 1) {
            opts = opts.with_presentation_context(class.clone(), vec![ts.clone()]);
        }
        let timed_out = |_| DeliveryError::unavailable("timeout", "association timed out");
        let refused = |e: dicom_ul::association::Error| match &e {
            dicom_ul::association::Error::TlsHandshake { source, .. } => {
                DeliveryError::unavailable("tls", format!("DICOM TLS handshake: {source}"))
            }
            _ => DeliveryError::unavailable("association", format!("association: {e}")),
        };
        // The deadline covers the TCP connect, the TLS handshake and the negotiation.
        let mut assoc = match tls {
            None => {
                let a = tokio::time::timeout(timeout, opts.establish_async(address))
                    .await
                    .map_err(timed_out)?
                    .map_err(refused)?;
                Link::Plain(a)
            }
            Some(t) => {
                let opts = opts.tls_config(t.config).server_name(&t.server_name);
                let a = tokio::time::timeout(timeout, opts.establish_tls_async(address))
                    .await
                    .map_err(timed_out)?
                    .map_err(refused)?;
                Link::Tls(Box::new(a))
            }
        };
        let _ = match &mut assoc {
            Link::Plain(a) => a.inner_stream().set_nodelay(true),
            Link::Tls(a) => a.inner_stream().get_ref().0.set_nodelay(true),
        };
        let contexts = on_link!(&assoc, a => a.presentation_contexts())
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
        let _ = on_link!(self.assoc, a => tokio::time::timeout(self.timeout, a.release()).await);
    }

    /// Abort the association (A-ABORT from the service user).
    pub async fn abort(&mut self) {
        let abort = Pdu::AbortRQ {
            source: AbortRQSource::ServiceUser,
        };
        let _ = on_link!(&mut self.assoc, a => {
            tokio::time::timeout(Duration::from_secs(2), a.send(&abort)).await
        });
    }

    /// C-STORE one data set from `chunks`, skipping its first `skip` bytes (the Part-10
    /// header of a spooled object). `Ok` on a success or warning status.
    pub async fn store(
        &mut self,
        ctx: u8,
        sop_class: &str,
        sop_instance: &str,
        chunks: &mut impl Chunks,
        skip: usize,
    ) -> Result<(), Stored> {
        let msg_id = self.ids.next_id();
        self.send_object(ctx, msg_id, sop_class, sop_instance, chunks, skip)
            .await
            .map_err(Stored::BeforeResponse)?;
        self.await_response(msg_id).await
    }

    async fn send_object(
        &mut self,
        ctx: u8,
        msg_id: u16,
        sop_class: &str,
        sop_instance: &str,
        chunks: &mut impl Chunks,
        mut skip: usize,
    ) -> Result<(), DeliveryError> {
        let rq = Command::store_rq(msg_id, sop_class, sop_instance);
        self.send_pdv(ctx, PDataValueType::Command, true, rq.encode())
            .await?;

        let peer_max = on_link!(&self.assoc, a => a.acceptor_max_pdu_length());
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
            .await
    }

    /// Wait for the C-STORE-RSP.
    async fn await_response(&mut self, msg_id: u16) -> Result<(), Stored> {
        let answered = |e: DeliveryError| Stored::Answered(e);
        let mut command = dimse::CommandAssembler::default();
        loop {
            let pdu = on_link!(&mut self.assoc, a => tokio::time::timeout(self.timeout, a.receive()).await)
                .map_err(|_| {
                    answered(DeliveryError::transient(
                        "timeout",
                        "no C-STORE response (timeout)",
                    ))
                })?
                .map_err(|e| Stored::BeforeResponse(transient("receive", e)))?;
            match pdu {
                Pdu::PData { data } => {
                    for pdv in data {
                        if pdv.value_type != PDataValueType::Command {
                            return Err(answered(DeliveryError::transient(
                                "protocol",
                                "unexpected data PDV in response",
                            )));
                        }
                        match command.push(&pdv.data, pdv.is_last) {
                            Ok(None) => {}
                            Ok(Some(rsp)) => return check_response(&rsp, msg_id).map_err(answered),
                            Err(dimse::DimseError::TooLarge) => {
                                return Err(answered(DeliveryError::transient(
                                    "protocol",
                                    "response command too large",
                                )));
                            }
                            Err(e) => return Err(answered(transient("response", e))),
                        }
                    }
                }
                Pdu::AbortRQ { .. } => {
                    return Err(answered(DeliveryError::transient(
                        "aborted",
                        "peer aborted the association during this object",
                    )));
                }
                Pdu::ReleaseRQ => {
                    let _ = on_link!(&mut self.assoc, a => tokio::time::timeout(self.timeout, a.send(&Pdu::ReleaseRP)).await);
                    return Err(answered(DeliveryError::transient(
                        "released",
                        "peer released the association before responding",
                    )));
                }
                other => {
                    return Err(answered(DeliveryError::transient(
                        "protocol",
                        format!("unexpected PDU {}", other.short_description()),
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
    ) -> Result<(), DeliveryError> {
        let pdu = Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: ctx,
                value_type,
                is_last,
                data,
            }],
        };
        on_link!(&mut self.assoc, a => tokio::time::timeout(self.timeout, a.send(&pdu)).await)
            .map_err(|_| DeliveryError::transient("timeout", "send timed out"))?
            .map_err(|e| transient("send", e))
    }
}

fn check_response(rsp: &Command, msg_id: u16) -> Result<(), DeliveryError> {
    if rsp.field != field::C_STORE_RSP || rsp.responded_to != Some(msg_id) {
        return Err(DeliveryError::transient(
            "protocol",
            format!(
                "unexpected response (command 0x{:04X}, to message {:?})",
                rsp.field, rsp.responded_to
            ),
        ));
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
            Err(status_error(status))
        }
    }
}

/// The failure taxonomy of C-STORE statuses (PS3.4 Annex B and PS3.7 Annex C).
pub fn status_error(status: u16) -> DeliveryError {
    let detail = format!("peer answered C-STORE with status 0x{status:04X}");
    match status {
        // Refused: out of resources, and processing failure: the peer may take it later.
        0xA700..=0xA7FF | 0x0110 | 0x0213 => DeliveryError::transient("status_retry", detail),
        // Data set does not match SOP class, cannot understand, and the general refusals
        // (SOP class not supported, not authorized, invalid object, duplicate...): the peer
        // judged this object and will judge it the same way again.
        0xA900..=0xA9FF | 0xC000..=0xCFFF | 0x0100..=0x01FF | 0x0200..=0x02FF => {
            DeliveryError::permanent("status_refused", detail)
        }
        _ => DeliveryError::transient("status_failure", detail),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_the_taxonomy() {
        for (status, kind) in [
            (0xA700, "transient"),
            (0xA7FF, "transient"),
            (0x0110, "transient"),
            (0xA900, "permanent"),
            (0xC000, "permanent"),
            (0xC123, "permanent"),
            (0x0122, "permanent"),
            (0x0124, "permanent"),
            (0x0211, "permanent"),
            (0xFFFF, "transient"),
        ] {
            assert_eq!(status_error(status).kind(), kind, "0x{status:04X}");
        }
    }
}
