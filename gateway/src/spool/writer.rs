//! Storing an object: an [`ObjectWriter`] (a DICOM object, streamed in) or an HL7 message
//! ([`Spool::store_message`], in one go), sealed segment by segment, and the commit that
//! makes it visible and queues it.
//!
//! Invariants:
//! - [`ObjectWriter::commit`] returns only after a synced write of the metadata, the queue
//!   entries and the removal of the in-progress marker; earlier segment writes are covered by
//!   the same WAL fsync.
//! - A writer marks its object in progress (the `ingest` family) before its first segment,
//!   and a dropped writer that did not commit deletes what it wrote, once any segment put
//!   still running has landed (see [`ObjectWriter`]).
//! - Segments are sealed under the study's DEK with the object's identity (object id, study,
//!   series and SOP instance UIDs, SOP class, transfer syntax) as associated data.
//! - The plaintext held in memory per object is at most one segment plus the identity
//!   prefix ([`crate::dataset::MAX_IDENTITY_PREFIX`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use keystore::{Dek, Sha256};
use tracing::{debug, warn};

use super::dedup::DedupKey;
use super::keys::KeyPin;
use super::meta::{ObjectMeta, ResolvedIdentity, meta_ad, meta_value};
use super::queue::{QueueEvent, Queued, study_tag};
use super::rocks::Cf;
use super::{ObjectId, Spool, SpoolError, blocking, now_ms, seg_key};
use crate::dataset::{self, Identity, Scan};
use crate::sop::Encoding;

/// New bytes the identity scanner waits for before it runs again (see `ObjectWriter::write`).
const SCAN_BATCH: usize = 4096;

/// Where an object came from and where it goes: everything a writer needs besides bytes.
#[derive(Debug, Clone)]
pub struct Ingest {
    /// SOP class from the request (C-STORE command or Part-10 meta).
    pub sop_class: String,
    /// SOP instance from the request.
    pub sop_instance: String,
    /// Transfer syntax of the data set.
    pub transfer_syntax: String,
    /// Calling AE title or peer node name.
    pub source: String,
    /// Destinations to queue for.
    pub routes: Vec<String>,
    /// For objects from a peer gateway: the dedup key of the transfer.
    pub dedup: Option<DedupKey>,
    /// Refuse a data set whose SOP Class or Instance UID differs from the request's
    /// (otherwise it is stored under the data set's own UIDs).
    pub strict_uid_match: bool,
}

/// One HL7 v2 message to store ([`Spool::store_message`]).
#[derive(Clone)]
pub struct MessageIngest {
    /// The patient key (see [`crate::hl7::Message::patient`]): the message's data key is
    /// the patient's, and its deliveries are ordered within the patient.
    pub patient: String,
    /// MSH-10.
    pub control_id: String,
    /// MSH-9 (`ORM^O01`).
    pub message_type: String,
    /// Where it came from: the HL7 listener's name or the peer node's.
    pub source: String,
    /// Destinations to queue for (at least one).
    pub routes: Vec<String>,
    /// Recognise an identical re-send under this key.
    pub dedup: Option<DedupKey>,
    /// The message, byte for byte.
    pub bytes: Vec<u8>,
}

impl std::fmt::Debug for MessageIngest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageIngest")
            .field("message_type", &self.message_type)
            .field("bytes", &self.bytes.len())
            .finish_non_exhaustive()
    }
}

/// What the routing rules may look at in a data set, once its identity is scanned.
#[derive(Debug, Clone, Copy)]
pub struct RouteFacts<'a> {
    /// The data set's SOP Class UID (the request's if the data set has none).
    pub sop_class: &'a str,
    /// The data set's Modality, if it has a plausible one.
    pub modality: Option<&'a str>,
}

/// Destinations for an object, decided from its [`RouteFacts`] (see `crate::routing`).
pub type RouteFn = Arc<dyn Fn(&RouteFacts<'_>) -> Vec<String> + Send + Sync>;

/// What a commit did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// Stored and queued.
    Stored(ObjectId),
    /// An identical re-send of a transfer already stored: nothing new was kept.
    Duplicate,
}

impl Spool {
    /// Start writing an object. `header` is the Part-10 header the stream starts with.
    /// Refused with [`SpoolError::Busy`] under backpressure.
    pub fn writer(&self, ingest: Ingest) -> Result<ObjectWriter, SpoolError> {
        self.admit(&ingest.routes)?;
        let encoding = encoding_of(&ingest.transfer_syntax)?;
        let header = dataset::part10_header(
            &ingest.sop_class,
            &ingest.sop_instance,
            &ingest.transfer_syntax,
            source_ae(&ingest.source),
        );
        Ok(ObjectWriter::new(self.clone(), ingest, encoding, header, 0))
    }

    /// Start writing an object whose Part-10 header arrives as part of the stream (a STOW-RS
    /// part): the header is stored as received.
    pub fn writer_for_part10(
        &self,
        ingest: Ingest,
        header_len: usize,
    ) -> Result<ObjectWriter, SpoolError> {
        self.admit(&ingest.routes)?;
        let encoding = encoding_of(&ingest.transfer_syntax)?;
        Ok(ObjectWriter::new(
            self.clone(),
            ingest,
            encoding,
            Vec::new(),
            header_len,
        ))
    }

    /// Store one HL7 v2 message and queue it for `msg.routes`, in one synced write: its
    /// segments (sealed under the patient's data key, bound to the message's identity), its
    /// metadata, its queue entries and, with a dedup key, its dedup record. Returns once that
    /// write is synced ([`Committed::Stored`]), or [`Committed::Duplicate`] for an identical
    /// message already stored under the same dedup key; the same key with other bytes is
    /// [`SpoolError::IdentityMismatch`].
    ///
    /// The patient's key id is a keyed hash (under the index key) of the patient key, the
    /// way a study's is of its Study Instance UID; the patient key itself is only ever
    /// stored inside the sealed metadata.
    ///
    /// Cancellation-safe: the work runs in a task of the spool that owns the message;
    /// dropping this future neither stops nor undoes it.
    pub async fn store_message(&self, msg: MessageIngest) -> Result<Committed, SpoolError> {
        if msg.bytes.is_empty() {
            return Err(dataset::FormatError::Malformed("empty message").into());
        }
        if msg.bytes.len() as u64 > self.inner.max_object_bytes {
            return Err(SpoolError::TooLarge(self.inner.max_object_bytes));
        }
        for s in [
            &msg.patient,
            &msg.control_id,
            &msg.message_type,
            &msg.source,
        ] {
            if s.len() > 1024 {
                return Err(dataset::FormatError::Malformed("message field too long").into());
            }
        }
        if msg.routes.is_empty() {
            return Err(SpoolError::Unrouted);
        }
        self.admit(&msg.routes)?;
        let spool = self.clone();
        let handle = self.inner.jobs.spawn(async move {
            let s2 = spool.clone();
            blocking(move || s2.store_message_blocking(msg)).await
        });
        handle
            .await
            .map_err(|e| SpoolError::Internal(e.to_string()))?
    }

    fn store_message_blocking(&self, msg: MessageIngest) -> Result<Committed, SpoolError> {
        let kid = self.inner.index.id("hl7-patient", msg.patient.as_bytes());
        // Held until this returns: the unused-key sweep keeps the patient's key meanwhile.
        let _pin = KeyPin::new(&self.inner.pins, kid);
        let dek = self.study_key(kid, true)?;
        let id = ObjectId::random()?;
        let resolved = ResolvedIdentity {
            study: msg.patient,
            series: String::new(),
            sop_instance: msg.control_id,
            sop_class: crate::hl7::SPOOL_CLASS.to_owned(),
            transfer_syntax: msg.message_type,
        };
        let aad = ObjectMeta::identity_aad(&id, &resolved);
        let mut digest = Sha256::new();
        digest.update(&msg.bytes);
        let digest = digest.finish();
        let chunks: Vec<&[u8]> = msg.bytes.chunks(self.inner.segment_bytes).collect();
        let mut sealed = Vec::with_capacity(chunks.len());
        for (i, c) in chunks.iter().enumerate() {
            let last = i + 1 == chunks.len();
            sealed.push(
                keystore::seal_segment(&dek, &aad, i as u64, last, c).map_err(SpoolError::Key)?,
            );
        }
        let meta = ObjectMeta {
            id,
            study_uid: resolved.study,
            series_uid: resolved.series,
            sop_instance_uid: resolved.sop_instance,
            sop_class_uid: resolved.sop_class,
            transfer_syntax: resolved.transfer_syntax,
            source: msg.source,
            length: msg.bytes.len() as u64,
            dataset_offset: 0,
            digest,
            segments: sealed.len() as u64,
            received_at_ms: now_ms(),
        };
        drop(chunks);
        drop(msg.bytes);
        let sealed_meta =
            keystore::seal_record(&dek, &meta_ad(&id), &meta.encode()).map_err(SpoolError::Key)?;
        let s = &self.inner.store;
        let entries = {
            let _g = self.commit_lock()?;
            fault!(
                self.inner,
                "spool::message::batch",
                Err(SpoolError::Busy(
                    "fault injected: the message commit fails".into()
                ))
            );
            if self.is_duplicate_blocking(msg.dedup, &digest)? {
                return Ok(Committed::Duplicate);
            }
            // The patient's key may have been shredded since it was loaded (see the commit
            // of an object): refuse; the sender retries and gets a new key.
            if !self.key_for_commit_blocking(&kid)? {
                return Err(SpoolError::Internal(
                    "the patient's key was deleted while this message was stored; send it again"
                        .into(),
                ));
            }
            let mut b = s.batch();
            for (i, seg) in sealed.iter().enumerate() {
                b.put(Cf::Seg, &seg_key(&id, i as u64), seg);
            }
            b.put(Cf::Meta, &id.0, &meta_value(&kid, &sealed_meta));
            let entries = self.put_entries(&mut b, id, &msg.routes);
            if let Some(key) = msg.dedup {
                self.put_dedup(&mut b, key, &digest);
            }
            self.commit_batch(b)?;
            entries
        };
        let study = study_tag(&meta.study_uid);
        for (dest, entry) in entries {
            self.notify(
                &dest,
                QueueEvent::Added(Queued {
                    entry,
                    length: meta.length,
                    received_at_ms: meta.received_at_ms,
                    budget_from_ms: None,
                    study,
                    serial: true,
                }),
            );
        }
        debug!(object = %id, bytes = meta.length, "message committed");
        Ok(Committed::Stored(id))
    }

    /// Delete an uncommitted object's segments and ingest marker (unsynced: the marker
    /// makes a lost cleanup happen again at the next open). An object with metadata is
    /// committed and is left alone, whatever its writer was told.
    fn discard_blocking(&self, id: ObjectId) -> Result<(), SpoolError> {
        fault!(self.inner, "spool::discard");
        let s = &self.inner.store;
        let _g = self.commit_lock()?;
        if s.get(Cf::Meta, &id.0)?.is_some() {
            // Committed after all: what failed was the report of the commit, not its write.
            // The object is queued and may be acknowledged by a re-send: never delete it.
            warn!(object = %id, "an object whose commit reported a failure is stored after all; it is kept and delivered");
            return Ok(());
        }
        let mut b = s.batch();
        b.delete_range(Cf::Seg, &seg_key(&id, 0), &seg_key(&id, u64::MAX));
        b.delete(Cf::Ingest, &id.0);
        s.commit(b, false)?;
        Ok(())
    }
}

/// The data set encoding of an accepted transfer syntax.
fn encoding_of(ts: &str) -> Result<Encoding, SpoolError> {
    crate::sop::encoding(ts).ok_or(SpoolError::Format(dataset::FormatError::Malformed(
        "unsupported transfer syntax",
    )))
}

/// How a writer seals, once the object's identity is known: (study key, identity AAD,
/// study key id, identity).
type Sealing = (Arc<Dek>, Vec<u8>, [u8; 16], ResolvedIdentity);

/// A storage operation of a writer that may still be running in the blocking pool.
type Pending = tokio::task::JoinHandle<Result<(), SpoolError>>;

/// Writes one object into the spool, segment by segment.
///
/// Cancellation: every `async fn` of a writer may be dropped at any `.await`.
/// - [`ObjectWriter::write`]: a segment put already handed to the blocking pool is kept as
///   `pending`; dropping the writer then waits for it before it discards the object, so a
///   put can never land after the cleanup (no orphan segments).
/// - [`ObjectWriter::commit`]: once identity is known, the commit runs in a task of the
///   spool's tracker that owns everything it touches. Dropping the future that awaits it
///   changes nothing: the object is committed (and its dedup record written) or discarded
///   by that task alone.
///
/// Dropping a writer that was not committed deletes what it wrote.
pub struct ObjectWriter {
    spool: Spool,
    id: Option<ObjectId>,
    ingest: Ingest,
    encoding: Encoding,
    /// Plaintext not yet sealed (starts with the Part-10 header).
    buf: Vec<u8>,
    /// Offset of the data set in the stream.
    dataset_offset: usize,
    /// True when the Part-10 header was written by us (and may be rebuilt from the data
    /// set's own UIDs); false when it arrived in the stream (a STOW part).
    own_header: bool,
    /// Study key, identity AAD and key id, once the identity is known.
    sealing: Option<Sealing>,
    /// The incremental identity scanner, until the identity is known.
    scanner: Option<Box<dataset::IdentityScanner>>,
    /// End (in `buf`) of the bytes already fed to `scanner`.
    scanned_to: usize,
    next_index: u64,
    written: u64,
    digest: Sha256,
    /// The ingest marker may have been written: a drop must clean up.
    started: bool,
    /// The commit task owns the object now: a drop must not touch it.
    pub(super) committing: bool,
    /// The last storage operation, if it may still be running.
    pending: Option<Pending>,
    /// The data set's SOP Class or Instance UID differs from the request's.
    uid_mismatch: bool,
    /// Routing rules to apply once the identity is known (adds to `ingest.routes`).
    router: Option<RouteFn>,
    /// The hold on the study key, from before its lookup (handed to the commit task).
    key_pin: Option<KeyPin>,
}

impl ObjectWriter {
    fn new(
        spool: Spool,
        ingest: Ingest,
        encoding: Encoding,
        header: Vec<u8>,
        header_len: usize,
    ) -> Self {
        // A header we wrote ourselves, or one arriving in the stream (`header_len`).
        let own_header = !header.is_empty();
        let dataset_offset = if own_header { header.len() } else { header_len };
        let mut digest = Sha256::new();
        digest.update(&header);
        let written = header.len() as u64;
        ObjectWriter {
            spool,
            id: None,
            ingest,
            encoding,
            buf: header,
            dataset_offset,
            own_header,
            sealing: None,
            scanner: None,
            scanned_to: 0,
            next_index: 0,
            written,
            digest,
            started: false,
            committing: false,
            pending: None,
            uid_mismatch: false,
            router: None,
            key_pin: None,
        }
    }

    /// The object id, once the first byte was stored.
    pub fn id(&self) -> Option<ObjectId> {
        self.id
    }

    /// Bytes received so far.
    pub fn len(&self) -> u64 {
        self.written
    }

    /// True before any byte was written.
    pub fn is_empty(&self) -> bool {
        self.written == 0
    }

    /// Apply `router` once the data set's identity is scanned: its destinations are added
    /// to the ingest's `routes`, and an object that then has none is refused
    /// ([`SpoolError::Unrouted`]) before anything is stored.
    pub fn route_with(&mut self, router: Option<RouteFn>) {
        self.router = router;
    }

    /// True once the identity is known and the data set's SOP Class or Instance UID differs
    /// from the request's (the object is stored under the data set's own UIDs).
    pub fn uid_mismatch(&self) -> bool {
        self.uid_mismatch
    }

    /// Append bytes of the stream. Cancellation-safe in the sense above: dropping the future
    /// (or the writer) leaves nothing behind once the writer is dropped.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), SpoolError> {
        self.written += data.len() as u64;
        if self.written > self.spool.inner.max_object_bytes {
            return Err(SpoolError::TooLarge(self.spool.inner.max_object_bytes));
        }
        self.digest.update(data);
        self.buf.extend_from_slice(data);
        if self.sealing.is_none() {
            // Scan in batches of at least SCAN_BATCH new bytes: a trickle of tiny writes
            // (1-byte or empty PDVs) then costs about what one large write does. The commit
            // and `finish_identity` scan whatever is left.
            let scanned = self.scanned_to.max(self.dataset_offset);
            if self.buf.len().saturating_sub(scanned) < SCAN_BATCH {
                return Ok(());
            }
            self.try_resolve(false).await?;
            if self.sealing.is_none() {
                return Ok(());
            }
        }
        let seg = self.spool.inner.segment_bytes;
        while self.buf.len() > seg {
            let rest = self.buf.split_off(seg);
            let chunk = std::mem::replace(&mut self.buf, rest);
            self.seal_and_put(chunk, false).await?;
        }
        Ok(())
    }

    /// Resolve the identity now if the whole data set is buffered and it is not known yet
    /// (so that [`ObjectWriter::uid_mismatch`] can be read before the commit).
    pub async fn finish_identity(&mut self) -> Result<(), SpoolError> {
        if self.sealing.is_none() {
            self.try_resolve(true).await?;
        }
        Ok(())
    }

    /// Wait for the pending storage operation, if any.
    async fn settle(&mut self) -> Result<(), SpoolError> {
        if let Some(h) = self.pending.as_mut() {
            let r = h.await;
            self.pending = None;
            r.map_err(|e| SpoolError::Internal(e.to_string()))??;
        }
        Ok(())
    }

    /// Find the identity in the buffered prefix; resolve the study key when found.
    ///
    /// The scanner is incremental: each call feeds it only the bytes buffered since the
    /// last one, so a trickle of tiny writes costs no more than one large write. A deflated
    /// batch large enough to matter is inflated on a blocking thread, off the async workers.
    async fn try_resolve(&mut self, complete: bool) -> Result<(), SpoolError> {
        /// Deflated bytes scanned inline on the async worker; larger batches go to a
        /// blocking thread.
        const INLINE_DEFLATED: usize = 16 * 1024;
        let offset = self.dataset_offset;
        // A scanner lost with a cancelled call starts over at the data set's first byte.
        let mut scanner = match self.scanner.take() {
            Some(s) => s,
            None => {
                self.scanned_to = offset;
                Box::new(dataset::IdentityScanner::new(self.encoding))
            }
        };
        let from = self.scanned_to.max(offset);
        let fresh = self.buf.get(from..).unwrap_or(&[]);
        let to = from + fresh.len();
        let (mut scanner, scan) =
            if self.encoding == Encoding::DeflatedExplicitLe && fresh.len() > INLINE_DEFLATED {
                let fresh = fresh.to_vec();
                blocking(move || {
                    let scan = scanner.feed(&fresh);
                    Ok((scanner, scan))
                })
                .await?
            } else {
                let scan = scanner.feed(fresh);
                (scanner, scan)
            };
        self.scanned_to = to;
        let scan = match scan? {
            Scan::NeedMore if complete => scanner.finish()?,
            scan => scan,
        };
        self.scanner = Some(scanner);
        let ident = match scan {
            Scan::Done(id) => id,
            Scan::NeedMore => {
                if self.buf.len().saturating_sub(offset) > dataset::MAX_IDENTITY_PREFIX {
                    return Err(dataset::FormatError::PrefixTooLarge.into());
                }
                return Ok(());
            }
        };
        let modality = ident.modality.clone();
        let resolved = self.resolve_identity(ident)?;
        if let Some(route) = &self.router {
            let facts = RouteFacts {
                sop_class: &resolved.sop_class,
                modality: modality.as_deref(),
            };
            for d in route(&facts) {
                if !self.ingest.routes.contains(&d) {
                    self.ingest.routes.push(d);
                }
            }
        }
        if self.ingest.routes.is_empty() {
            return Err(SpoolError::Unrouted);
        }
        // The final destinations may include one whose queue is full.
        self.spool.admit(&self.ingest.routes)?;
        let kid = self
            .spool
            .inner
            .index
            .id("study", resolved.study.as_bytes());
        // Held from before the lookup until the commit task is done with the object.
        self.key_pin = Some(KeyPin::new(&self.spool.inner.pins, kid));
        let spool = self.spool.clone();
        let dek = blocking(move || spool.study_key(kid, true)).await?;
        // From here on a drop must clean up: mark the ingest in progress before the first
        // segment is written. The put is pending until it returned.
        let id = ObjectId::random()?;
        self.id = Some(id);
        self.started = true;
        let spool = self.spool.clone();
        self.pending = Some(tokio::task::spawn_blocking(move || {
            spool
                .inner
                .store
                .put_unsynced(Cf::Ingest, &id.0, &now_ms().to_be_bytes())?;
            Ok(())
        }));
        self.settle().await?;
        let aad = ObjectMeta::identity_aad(&id, &resolved);
        self.sealing = Some((dek, aad, kid, resolved));
        Ok(())
    }

    /// Check the scanned identity against the request and decide the object's UIDs.
    ///
    /// A data set whose SOP Class or Instance UID differs from the request's is refused when
    /// the ingest is strict, and otherwise stored under the data set's own UIDs; a Part-10
    /// header we wrote is then rebuilt from them (nothing is sealed before this point).
    fn resolve_identity(&mut self, ident: Identity) -> Result<ResolvedIdentity, SpoolError> {
        for uid in [
            &ident.study,
            &ident.series,
            &ident.sop_class,
            &ident.sop_instance,
        ]
        .into_iter()
        .flatten()
        {
            if !crate::dimse::is_valid_uid(uid) {
                return Err(dataset::FormatError::Malformed("invalid UID in the data set").into());
            }
        }
        let class_differs = ident
            .sop_class
            .as_ref()
            .is_some_and(|c| *c != self.ingest.sop_class);
        let instance_differs = ident
            .sop_instance
            .as_ref()
            .is_some_and(|i| *i != self.ingest.sop_instance);
        if self.ingest.strict_uid_match {
            if class_differs {
                return Err(SpoolError::IdentityMismatch("SOP Class UID"));
            }
            if instance_differs {
                return Err(SpoolError::IdentityMismatch("SOP Instance UID"));
            }
        }
        let resolved = ResolvedIdentity {
            study: ident.study.unwrap_or_default(),
            series: ident.series.unwrap_or_default(),
            sop_instance: ident
                .sop_instance
                .unwrap_or_else(|| self.ingest.sop_instance.clone()),
            sop_class: ident
                .sop_class
                .unwrap_or_else(|| self.ingest.sop_class.clone()),
            transfer_syntax: self.ingest.transfer_syntax.clone(),
        };
        if class_differs || instance_differs {
            self.uid_mismatch = true;
            if self.own_header {
                let header = dataset::part10_header(
                    &resolved.sop_class,
                    &resolved.sop_instance,
                    &resolved.transfer_syntax,
                    source_ae(&self.ingest.source),
                );
                let data = self.buf.split_off(self.dataset_offset.min(self.buf.len()));
                self.written = self.written - self.dataset_offset as u64 + header.len() as u64;
                self.dataset_offset = header.len();
                self.buf = header;
                self.buf.extend_from_slice(&data);
                self.digest = Sha256::new();
                self.digest.update(&self.buf);
            }
        }
        Ok(resolved)
    }

    async fn seal_and_put(&mut self, chunk: Vec<u8>, is_final: bool) -> Result<(), SpoolError> {
        self.settle().await?;
        // A large object must not write the volume full: check the watermark as it grows.
        if self.next_index % 8 == 7
            && let Some(d) = self.spool.check_disk()
        {
            return Err(SpoolError::Busy(d));
        }
        let (dek, aad, _, _) = self
            .sealing
            .as_ref()
            .ok_or_else(|| SpoolError::Internal("sealing before identity".into()))?;
        let id = self
            .id
            .ok_or_else(|| SpoolError::Internal("no object id".into()))?;
        let index = self.next_index;
        let sealed =
            keystore::seal_segment(dek, aad, index, is_final, &chunk).map_err(SpoolError::Key)?;
        drop(chunk);
        self.pending = Some(put_segment(self.spool.clone(), id, index, sealed));
        self.settle().await?;
        self.next_index += 1;
        Ok(())
    }

    /// The SHA-256 of everything written so far (for a STOW part, before committing).
    pub fn digest_so_far(&self) -> [u8; 32] {
        self.digest.clone().finish()
    }

    /// Seal the rest, then commit metadata and queue entries in one synced write.
    /// For a transfer with a dedup key, an identical transfer already stored makes this a
    /// [`Committed::Duplicate`] and a different one a conflict error.
    ///
    /// Cancellation-safe: once the identity is known, the work runs in a task of the spool
    /// that owns it, and dropping this future neither stops nor undoes it.
    pub async fn commit(mut self) -> Result<Committed, SpoolError> {
        if self.sealing.is_none() {
            self.try_resolve(true).await?;
        }
        let (Some(id), Some(sealing)) = (self.id, self.sealing.clone()) else {
            return Err(SpoolError::Internal("no identity".into()));
        };
        let job = CommitJob {
            spool: self.spool.clone(),
            id,
            sealing,
            rest: std::mem::take(&mut self.buf),
            next_index: self.next_index,
            length: self.written,
            dataset_offset: self.dataset_offset as u64,
            digest: self.digest.clone(),
            source: self.ingest.source.clone(),
            routes: self.ingest.routes.clone(),
            dedup: self.ingest.dedup,
            pending: self.pending.take(),
            _key_pin: self.key_pin.take(),
        };
        // The job owns the object from here on: this writer's drop must not touch it.
        self.committing = true;
        let handle = self.spool.inner.jobs.spawn(job.run());
        drop(self);
        handle
            .await
            .map_err(|e| SpoolError::Internal(e.to_string()))?
    }
}

/// The Part-10 Source AE Title we record: the calling AE title, when it is a valid one.
fn source_ae(source: &str) -> Option<&str> {
    Some(source).filter(|s| crate::config::check_ae(s).is_ok())
}

/// Put one sealed segment (unsynced: the commit's synced write covers it).
fn put_segment(spool: Spool, id: ObjectId, index: u64, sealed: Vec<u8>) -> Pending {
    tokio::task::spawn_blocking(move || {
        fault!(spool.inner, "spool::write::put");
        let r = spool
            .inner
            .store
            .put_unsynced(Cf::Seg, &seg_key(&id, index), &sealed);
        if r.is_err() {
            // A failed append leaves the log in a state RocksDB refuses to build on (it
            // stops writes with a background error): like a failed sync, nothing is
            // acknowledged until a restart recovers the log.
            spool.inner.storage_failed.store(true, Ordering::SeqCst);
        }
        r?;
        Ok(())
    })
}

/// Everything a commit needs, owned, so that it runs to its end in its own task.
struct CommitJob {
    spool: Spool,
    id: ObjectId,
    sealing: Sealing,
    /// The plaintext not sealed yet: the final segment.
    rest: Vec<u8>,
    next_index: u64,
    length: u64,
    dataset_offset: u64,
    digest: Sha256,
    source: String,
    routes: Vec<String>,
    dedup: Option<DedupKey>,
    /// A segment put that may still be running.
    pending: Option<Pending>,
    /// Keeps the study key from the unused-key sweep until the job is done.
    _key_pin: Option<KeyPin>,
}

impl CommitJob {
    /// Commit, or leave nothing behind (an interrupted cleanup is finished by the next
    /// open, through the ingest marker).
    async fn run(mut self) -> Result<Committed, SpoolError> {
        let spool = self.spool.clone();
        let id = self.id;
        let result = self.commit().await;
        if !matches!(result, Ok(Committed::Stored(_))) {
            // Our segments are referenced by nothing: an identical transfer was stored
            // earlier, or the synced write failed and applied nothing.
            let s = spool.clone();
            if let Err(e) = blocking(move || s.discard_blocking(id)).await {
                warn!(object = %id, error = %e, "could not discard an uncommitted object; it is removed at the next start");
            }
        }
        if let Err(e) = &result
            && matches!(e, SpoolError::Store(_))
        {
            spool.inner.storage_failed.store(true, Ordering::SeqCst);
        }
        result
    }

    async fn commit(&mut self) -> Result<Committed, SpoolError> {
        if let Some(h) = self.pending.take() {
            h.await.map_err(|e| SpoolError::Internal(e.to_string()))??;
        }
        let (dek, aad, kid, resolved) = self.sealing.clone();
        let id = self.id;
        let index = self.next_index;
        let rest = std::mem::take(&mut self.rest);
        let sealed =
            keystore::seal_segment(&dek, &aad, index, true, &rest).map_err(SpoolError::Key)?;
        drop(rest);
        put_segment(self.spool.clone(), id, index, sealed)
            .await
            .map_err(|e| SpoolError::Internal(e.to_string()))??;
        let digest = self.digest.clone().finish();
        let meta = ObjectMeta {
            id,
            study_uid: resolved.study,
            series_uid: resolved.series,
            sop_instance_uid: resolved.sop_instance,
            sop_class_uid: resolved.sop_class,
            transfer_syntax: resolved.transfer_syntax,
            source: self.source.clone(),
            length: self.length,
            dataset_offset: self.dataset_offset,
            digest,
            segments: index + 1,
            received_at_ms: now_ms(),
        };
        let sealed_meta =
            keystore::seal_record(&dek, &meta_ad(&id), &meta.encode()).map_err(SpoolError::Key)?;
        let meta_received = meta.received_at_ms;
        let study = study_tag(&meta.study_uid);
        let spool = self.spool.clone();
        let routes = self.routes.clone();
        let dedup = self.dedup;
        let (committed, entries) = blocking(move || {
            let s = &spool.inner.store;
            let _g = spool.commit_lock()?;
            fault!(spool.inner, "spool::commit::batch");
            if spool.is_duplicate_blocking(dedup, &digest)? {
                return Ok((Committed::Duplicate, Vec::new()));
            }
            // A purge may have shredded the study's key since this writer resolved it: an
            // object sealed under a deleted key could never be read. Refuse; the sender
            // retries, and the retry gets a new key.
            if !spool.key_for_commit_blocking(&kid)? {
                return Err(SpoolError::Internal(
                    "the study's key was deleted while this object was received; send it again"
                        .into(),
                ));
            }
            let mut b = s.batch();
            b.put(Cf::Meta, &id.0, &meta_value(&kid, &sealed_meta));
            let entries = spool.put_entries(&mut b, id, &routes);
            if let Some(key) = dedup {
                // Written in the same synced batch as the metadata, after every segment:
                // "already have it" is only ever answered for a whole, durable object.
                spool.put_dedup(&mut b, key, &digest);
            }
            b.delete(Cf::Ingest, &id.0);
            spool.commit_batch(b)?;
            fault!(spool.inner, "spool::commit::synced");
            // `return` here answers a failure for an object that is durably stored: what a
            // sender sees when the node dies between its sync and its answer.
            fault!(
                spool.inner,
                "spool::commit::answer",
                Err(SpoolError::Internal(
                    "fault injected: the answer to a synced commit is lost".into()
                ))
            );
            Ok((Committed::Stored(id), entries))
        })
        .await?;
        for (dest, entry) in entries {
            self.spool.notify(
                &dest,
                QueueEvent::Added(Queued {
                    entry,
                    length: self.length,
                    received_at_ms: meta_received,
                    budget_from_ms: None,
                    study,
                    serial: false,
                }),
            );
        }
        debug!(object = %id, bytes = self.length, "committed");
        Ok(committed)
    }
}

impl Drop for ObjectWriter {
    fn drop(&mut self) {
        if self.committing || !self.started {
            return;
        }
        let Some(id) = self.id else { return };
        let pending = self.pending.take();
        let spool = self.spool.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                // Wait for a put that may still be running, so it cannot land after the
                // cleanup; both run in a tracked task that owns what it touches.
                let tracker = spool.inner.jobs.clone();
                tracker.spawn_on(
                    async move {
                        if let Some(p) = pending {
                            let _ = p.await;
                        }
                        if let Err(e) = blocking(move || spool.discard_blocking(id)).await {
                            warn!(object = %id, error = %e, "could not discard a partial object; it is removed at the next start");
                        }
                    },
                    &rt,
                );
            }
            // No runtime: no blocking task of ours can be running.
            Err(_) => {
                if let Err(e) = spool.discard_blocking(id) {
                    warn!(object = %id, error = %e, "could not discard a partial object; it is removed at the next start");
                }
            }
        }
    }
}
