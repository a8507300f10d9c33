//! The spool: encrypted, persistent storage of objects and per-destination queues.
//!
//! An object enters through an [`ObjectWriter`] (from the DICOM receiver or the link
//! listener), is stored as a Part-10 byte stream cut into sealed segments, and is queued for
//! every destination of its route in the same synced commit that makes it visible. It leaves
//! when the last of those destinations has confirmed it ([`Spool::complete`]).
//!
//! Invariants:
//! - [`ObjectWriter::commit`] returns only after a synced write of the metadata, the queue
//!   entries and the removal of the in-progress marker; earlier segment writes are covered by
//!   the same WAL fsync.
//! - An object that is not committed leaves nothing behind: a dropped writer deletes its
//!   segments, and segments of writers interrupted by a crash are deleted at the next open
//!   (the `ingest` family lists them).
//! - Segments are sealed under the study's DEK with the object's identity (object id, study,
//!   series and SOP instance UIDs, SOP class, transfer syntax) as associated data.
//! - The plaintext held in memory per object is at most one segment plus the identity
//!   prefix ([`crate::dataset::MAX_IDENTITY_PREFIX`]).

mod rocks;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keystore::{Dek, IndexHasher, Kek, Sha256};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::dataset::{self, Identity, Scan};
use crate::sop::Encoding;
pub use rocks::StoreError;
use rocks::{Cf, Store};

/// Version byte of a metadata record.
const META_VERSION: u8 = 1;
/// Queue entry flag: parked (refused permanently; kept for an operator).
const FLAG_PARKED: u8 = 1;

/// A random 128-bit object id. Not derived from any UID.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectId(pub [u8; 16]);

impl ObjectId {
    fn random() -> Result<ObjectId, SpoolError> {
        let mut b = [0u8; 16];
        keystore::random_bytes(&mut b).map_err(SpoolError::Key)?;
        Ok(ObjectId(b))
    }
    /// Lower-case hex, safe for logs and file names.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl std::fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.hex())
    }
}
impl std::fmt::Display for ObjectId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.hex())
    }
}

/// Why the spool refused or failed an operation.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// RocksDB failed (I/O error, disk full...).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A key operation failed (unwrap with a wrong KEK, RNG failure...).
    #[error("key error: {0}")]
    Key(keystore::KeystoreError),
    /// Stored bytes failed authentication or are malformed.
    #[error("object {0} failed to open: {1}")]
    Corrupt(ObjectId, String),
    /// The object is not in the spool.
    #[error("object {0} not found")]
    NotFound(ObjectId),
    /// The data set could not be scanned for its identity.
    #[error("malformed object: {0}")]
    Format(#[from] dataset::FormatError),
    /// The data set's SOP class or instance differs from the request's.
    #[error("the data set's {0} differs from the request's")]
    IdentityMismatch(&'static str),
    /// The object exceeds the configured maximum.
    #[error("object larger than {0} bytes")]
    TooLarge(u64),
    /// A blocking task failed.
    #[error("internal: {0}")]
    Internal(String),
}

/// What the spool knows about a stored object. Held encrypted on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// The object id.
    pub id: ObjectId,
    /// (0020,000D), empty if the data set had none.
    pub study_uid: String,
    /// (0020,000E), empty if the data set had none.
    pub series_uid: String,
    /// SOP Instance UID.
    pub sop_instance_uid: String,
    /// SOP Class UID.
    pub sop_class_uid: String,
    /// Transfer syntax UID.
    pub transfer_syntax: String,
    /// Who sent it: the calling AE title or the peer node's name.
    pub source: String,
    /// Total stored bytes (the Part-10 stream).
    pub length: u64,
    /// Offset of the data set in the stored stream.
    pub dataset_offset: u64,
    /// SHA-256 of the stored Part-10 stream.
    pub digest: [u8; 32],
    /// Number of segments.
    pub segments: u64,
    /// When it was committed (ms since the epoch).
    pub received_at_ms: u64,
}

impl ObjectMeta {
    /// The associated data every segment of this object is sealed with.
    fn identity_aad(id: &ObjectId, ident: &ResolvedIdentity) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + 5 * 66);
        out.extend_from_slice(&id.0);
        for s in [
            &ident.study,
            &ident.series,
            &ident.sop_instance,
            &ident.sop_class,
            &ident.transfer_syntax,
        ] {
            out.extend_from_slice(&(s.len() as u16).to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        out
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(512);
        out.push(META_VERSION);
        for s in [
            &self.study_uid,
            &self.series_uid,
            &self.sop_instance_uid,
            &self.sop_class_uid,
            &self.transfer_syntax,
            &self.source,
        ] {
            out.extend_from_slice(&(s.len() as u16).to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        for n in [
            self.length,
            self.dataset_offset,
            self.segments,
            self.received_at_ms,
        ] {
            out.extend_from_slice(&n.to_be_bytes());
        }
        out.extend_from_slice(&self.digest);
        out
    }

    fn decode(id: ObjectId, b: &[u8]) -> Option<ObjectMeta> {
        let mut r = Reader(b);
        if r.take(1)? != [META_VERSION] {
            return None;
        }
        let mut strings = Vec::with_capacity(6);
        for _ in 0..6 {
            let len = u16::from_be_bytes(r.take(2)?.try_into().ok()?) as usize;
            strings.push(String::from_utf8(r.take(len)?.to_vec()).ok()?);
        }
        let mut nums = [0u64; 4];
        for n in &mut nums {
            *n = u64::from_be_bytes(r.take(8)?.try_into().ok()?);
        }
        let digest: [u8; 32] = r.take(32)?.try_into().ok()?;
        let [
            study_uid,
            series_uid,
            sop_instance_uid,
            sop_class_uid,
            transfer_syntax,
            source,
        ] = <[String; 6]>::try_from(strings).ok()?;
        Some(ObjectMeta {
            id,
            study_uid,
            series_uid,
            sop_instance_uid,
            sop_class_uid,
            transfer_syntax,
            source,
            length: nums[0],
            dataset_offset: nums[1],
            segments: nums[2],
            received_at_ms: nums[3],
            digest,
        })
    }

    fn resolved(&self) -> ResolvedIdentity {
        ResolvedIdentity {
            study: self.study_uid.clone(),
            series: self.series_uid.clone(),
            sop_instance: self.sop_instance_uid.clone(),
            sop_class: self.sop_class_uid.clone(),
            transfer_syntax: self.transfer_syntax.clone(),
        }
    }
}

struct Reader<'a>(&'a [u8]);
impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
}

#[derive(Debug, Clone)]
struct ResolvedIdentity {
    study: String,
    series: String,
    sop_instance: String,
    sop_class: String,
    transfer_syntax: String,
}

/// A queue entry: one object waiting for one destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueEntry {
    /// Position in the destination's queue (FIFO order).
    pub seq: u64,
    /// The object.
    pub object: ObjectId,
    /// Refused permanently and kept for an operator.
    pub parked: bool,
}

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
}

/// Identifies one transfer from a peer gateway, for deduplicating retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupKey(pub [u8; 16]);

/// The result of looking up a transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DedupState {
    /// Never seen (or forgotten after the dedup window).
    New,
    /// Seen with the same digest: an identical re-send.
    Identical,
    /// Seen with a different digest: refuse.
    Conflict,
}

/// What a commit did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// Stored and queued.
    Stored(ObjectId),
    /// An identical re-send of a transfer already stored: nothing new was kept.
    Duplicate,
}

struct Inner {
    store: Store,
    kek: Kek,
    index: IndexHasher,
    next_seq: AtomicU64,
    /// Serialises read-modify-write sequences: study key creation, dedup check-and-set,
    /// and the reference counting in `complete`.
    lock: Mutex<()>,
    segment_bytes: usize,
    max_object_bytes: u64,
    dedup_window: Duration,
    /// Dispatchers listening for new queue entries, by destination.
    listeners: Mutex<HashMap<String, mpsc::UnboundedSender<QueueEntry>>>,
}

/// The spool handle. Cheap to clone.
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

/// Spool settings.
#[derive(Debug, Clone)]
pub struct SpoolOptions {
    /// Plaintext bytes per segment.
    pub segment_bytes: usize,
    /// Largest object accepted.
    pub max_object_bytes: u64,
    /// How long link transfers are remembered for deduplication.
    pub dedup_window: Duration,
}

impl Default for SpoolOptions {
    fn default() -> Self {
        Self {
            segment_bytes: 1 << 20,
            max_object_bytes: 16 << 30,
            dedup_window: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn seg_key(id: &ObjectId, index: u64) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..16].copy_from_slice(&id.0);
    k[16..].copy_from_slice(&index.to_be_bytes());
    k
}

fn queue_key(dest: &str, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(dest.len() + 9);
    k.extend_from_slice(dest.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn ref_key(id: &ObjectId, dest: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(16 + dest.len());
    k.extend_from_slice(&id.0);
    k.extend_from_slice(dest.as_bytes());
    k
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SpoolError> + Send + 'static,
) -> Result<T, SpoolError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SpoolError::Internal(e.to_string()))?
}

impl Spool {
    /// Open the spool in `dir` with the given KEK, removing what interrupted ingests left.
    pub fn open(dir: &Path, kek: Kek, opts: SpoolOptions) -> Result<Spool, SpoolError> {
        std::fs::create_dir_all(dir).map_err(|e| SpoolError::Store(StoreError::from_io(dir, e)))?;
        let store = Store::open(dir)?;
        let index = kek.index_hasher();
        let inner = Inner {
            store,
            kek,
            index,
            next_seq: AtomicU64::new(0),
            lock: Mutex::new(()),
            segment_bytes: opts.segment_bytes,
            max_object_bytes: opts.max_object_bytes,
            dedup_window: opts.dedup_window,
            listeners: Mutex::new(HashMap::new()),
        };
        let spool = Spool {
            inner: Arc::new(inner),
        };
        spool.recover()?;
        Ok(spool)
    }

    /// Startup recovery: drop segments of uncommitted objects, and find the next sequence.
    fn recover(&self) -> Result<(), SpoolError> {
        let s = &self.inner.store;
        let orphans = s.scan_prefix(Cf::Ingest, &[], usize::MAX)?;
        if !orphans.is_empty() {
            let mut b = s.batch();
            for (k, _) in &orphans {
                if let Ok(id) = <[u8; 16]>::try_from(&k[..]) {
                    let id = ObjectId(id);
                    b.delete_range(Cf::Seg, &seg_key(&id, 0), &seg_key(&id, u64::MAX));
                }
                b.delete(Cf::Ingest, k);
            }
            s.commit(b, true)?;
            warn!(
                count = orphans.len(),
                "removed partial objects left by an interrupted ingest"
            );
        }
        let mut max_seq = 0u64;
        for (_, v) in s.scan_prefix(Cf::Refs, &[], usize::MAX)? {
            if let Ok(b) = <[u8; 8]>::try_from(&v[..]) {
                max_seq = max_seq.max(u64::from_be_bytes(b));
            }
        }
        self.inner.next_seq.store(max_seq + 1, Ordering::SeqCst);
        Ok(())
    }

    /// How many handles to this spool exist (the database closes when the last drops).
    pub fn handles(&self) -> usize {
        Arc::strong_count(&self.inner)
    }

    /// Segment size in bytes.
    pub fn segment_bytes(&self) -> usize {
        self.inner.segment_bytes
    }

    /// Start writing an object. `header` is the Part-10 header the stream starts with.
    pub fn writer(&self, ingest: Ingest) -> Result<ObjectWriter, SpoolError> {
        let encoding = encoding_of(&ingest.transfer_syntax)?;
        let header = dataset::part10_header(
            &ingest.sop_class,
            &ingest.sop_instance,
            &ingest.transfer_syntax,
            Some(&ingest.source)
                .filter(|s| crate::config::check_ae(s).is_ok())
                .map(|s| s.as_str()),
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
        let encoding = encoding_of(&ingest.transfer_syntax)?;
        Ok(ObjectWriter::new(
            self.clone(),
            ingest,
            encoding,
            Vec::new(),
            header_len,
        ))
    }

    /// Register to hear about new queue entries for `dest`, then read the queue as stored.
    /// Entries committed between the two may appear in both; callers key them by `seq`.
    pub fn subscribe(
        &self,
        dest: &str,
    ) -> Result<(Vec<QueueEntry>, mpsc::UnboundedReceiver<QueueEntry>), SpoolError> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.inner
            .listeners
            .lock()
            .map_err(|_| SpoolError::Internal("listener lock poisoned".into()))?
            .insert(dest.to_owned(), tx);
        let mut prefix = dest.as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        for (k, v) in self
            .inner
            .store
            .scan_prefix(Cf::Queue, &prefix, usize::MAX)?
        {
            let seq = k
                .get(prefix.len()..)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes);
            let obj = v.get(..16).and_then(|b| <[u8; 16]>::try_from(b).ok());
            if let (Some(seq), Some(obj)) = (seq, obj) {
                out.push(QueueEntry {
                    seq,
                    object: ObjectId(obj),
                    parked: v.get(16).is_some_and(|f| f & FLAG_PARKED != 0),
                });
            }
        }
        Ok((out, rx))
    }

    /// Number of objects queued for `dest` (stored view).
    pub fn queue_len(&self, dest: &str) -> Result<usize, SpoolError> {
        let mut prefix = dest.as_bytes().to_vec();
        prefix.push(0);
        Ok(self
            .inner
            .store
            .scan_prefix(Cf::Queue, &prefix, usize::MAX)?
            .len())
    }

    /// Number of objects in the spool.
    pub fn object_count(&self) -> Result<usize, SpoolError> {
        Ok(self
            .inner
            .store
            .scan_prefix(Cf::Meta, &[], usize::MAX)?
            .len())
    }

    /// Number of stored segments, committed or not (diagnostics and tests).
    pub fn segment_count(&self) -> Result<usize, SpoolError> {
        Ok(self
            .inner
            .store
            .scan_prefix(Cf::Seg, &[], usize::MAX)?
            .len())
    }

    /// Read an object's metadata.
    pub async fn meta(&self, id: ObjectId) -> Result<(ObjectMeta, Arc<Dek>), SpoolError> {
        let spool = self.clone();
        blocking(move || spool.meta_blocking(id)).await
    }

    fn meta_blocking(&self, id: ObjectId) -> Result<(ObjectMeta, Arc<Dek>), SpoolError> {
        let raw = self
            .inner
            .store
            .get(Cf::Meta, &id.0)?
            .ok_or(SpoolError::NotFound(id))?;
        let (ver, rest) = raw
            .split_first()
            .ok_or_else(|| SpoolError::Corrupt(id, "empty metadata".into()))?;
        if *ver != META_VERSION || rest.len() < 16 {
            return Err(SpoolError::Corrupt(id, "unknown metadata version".into()));
        }
        let (kid, sealed) = rest.split_at(16);
        let kid: [u8; 16] = kid
            .try_into()
            .map_err(|_| SpoolError::Corrupt(id, "bad key id".into()))?;
        let dek = self.study_key(kid, false)?;
        let plain = keystore::open_record(&dek, &meta_ad(&id), sealed)
            .map_err(|e| SpoolError::Corrupt(id, e.to_string()))?;
        let meta = ObjectMeta::decode(id, &plain)
            .ok_or_else(|| SpoolError::Corrupt(id, "metadata does not decode".into()))?;
        Ok((meta, Arc::new(dek)))
    }

    /// Open an object for reading.
    pub async fn open_object(&self, id: ObjectId) -> Result<ObjectReader, SpoolError> {
        let (meta, dek) = self.meta(id).await?;
        let aad = ObjectMeta::identity_aad(&id, &meta.resolved());
        Ok(ObjectReader {
            spool: self.clone(),
            dek,
            aad: Arc::new(aad),
            meta,
            next: 0,
            done: false,
        })
    }

    /// Get (creating if `create`) the DEK of a study, by its key id.
    fn study_key(&self, kid: [u8; 16], create: bool) -> Result<Dek, SpoolError> {
        let s = &self.inner.store;
        if let Some(w) = s.get(Cf::Keys, &kid)? {
            return self.inner.kek.unwrap(&w, &kid).map_err(SpoolError::Key);
        }
        if !create {
            return Err(SpoolError::Corrupt(
                ObjectId([0; 16]),
                "study key missing".into(),
            ));
        }
        let _g = self
            .inner
            .lock
            .lock()
            .map_err(|_| SpoolError::Internal("lock poisoned".into()))?;
        if let Some(w) = s.get(Cf::Keys, &kid)? {
            return self.inner.kek.unwrap(&w, &kid).map_err(SpoolError::Key);
        }
        let dek = Dek::generate().map_err(SpoolError::Key)?;
        let wrapped = self.inner.kek.wrap(&dek, &kid).map_err(SpoolError::Key)?;
        let mut b = s.batch();
        b.put(Cf::Keys, &kid, &wrapped);
        s.commit(b, true)?;
        Ok(dek)
    }

    /// The dedup key of a transfer from `peer` with the sender's transfer id.
    pub fn dedup_key(&self, peer: &str, transfer_id: &str) -> DedupKey {
        let mut v = peer.as_bytes().to_vec();
        v.push(0);
        v.extend_from_slice(transfer_id.as_bytes());
        DedupKey(self.inner.index.id("link-transfer", &v))
    }

    /// Look a transfer up.
    pub fn dedup_state(&self, key: DedupKey, digest: &[u8; 32]) -> Result<DedupState, SpoolError> {
        match self.inner.store.get(Cf::Dedup, &key.0)? {
            None => Ok(DedupState::New),
            Some(v) => {
                let stored_at = v
                    .get(32..40)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(u64::from_be_bytes)
                    .unwrap_or(0);
                if now_ms().saturating_sub(stored_at) > self.inner.dedup_window.as_millis() as u64 {
                    Ok(DedupState::New)
                } else if v.get(..32) == Some(&digest[..]) {
                    Ok(DedupState::Identical)
                } else {
                    Ok(DedupState::Conflict)
                }
            }
        }
    }

    /// Mark an object delivered to `dest`. Deletes the object once no destination waits for
    /// it. Synced.
    pub async fn complete(&self, dest: &str, entry: QueueEntry) -> Result<bool, SpoolError> {
        let spool = self.clone();
        let dest = dest.to_owned();
        blocking(move || {
            let s = &spool.inner.store;
            let _g = spool
                .inner
                .lock
                .lock()
                .map_err(|_| SpoolError::Internal("lock poisoned".into()))?;
            let id = entry.object;
            let mut b = s.batch();
            b.delete(Cf::Queue, &queue_key(&dest, entry.seq));
            b.delete(Cf::Refs, &ref_key(&id, &dest));
            let others = s
                .scan_prefix(Cf::Refs, &id.0, 2)?
                .into_iter()
                .filter(|(k, _)| k[16..] != *dest.as_bytes())
                .count();
            let deleted = others == 0;
            if deleted {
                b.delete(Cf::Meta, &id.0);
                b.delete_range(Cf::Seg, &seg_key(&id, 0), &seg_key(&id, u64::MAX));
            }
            s.commit(b, true)?;
            Ok(deleted)
        })
        .await
    }

    /// Park a queue entry: refused permanently, kept for an operator. Synced.
    pub async fn park(&self, dest: &str, entry: QueueEntry) -> Result<(), SpoolError> {
        let spool = self.clone();
        let dest = dest.to_owned();
        blocking(move || {
            let s = &spool.inner.store;
            let mut v = entry.object.0.to_vec();
            v.push(FLAG_PARKED);
            let mut b = s.batch();
            b.put(Cf::Queue, &queue_key(&dest, entry.seq), &v);
            s.commit(b, true)?;
            Ok(())
        })
        .await
    }

    fn notify(&self, dest: &str, entry: QueueEntry) {
        if let Ok(l) = self.inner.listeners.lock()
            && let Some(tx) = l.get(dest)
        {
            let _ = tx.send(entry);
        }
    }
}

/// The data set encoding of an accepted transfer syntax.
fn encoding_of(ts: &str) -> Result<Encoding, SpoolError> {
    crate::sop::encoding(ts).ok_or(SpoolError::Format(dataset::FormatError::Malformed(
        "unsupported transfer syntax",
    )))
}

fn meta_ad(id: &ObjectId) -> Vec<u8> {
    let mut v = b"meta".to_vec();
    v.extend_from_slice(&id.0);
    v
}

impl StoreError {
    fn from_io(dir: &Path, e: std::io::Error) -> StoreError {
        StoreError::new(format!("{}: {e}", dir.display()))
    }
}

/// How a writer seals, once the object's identity is known: (study key, identity AAD,
/// study key id, identity).
type Sealing = (Arc<Dek>, Vec<u8>, [u8; 16], ResolvedIdentity);

/// Writes one object into the spool, segment by segment.
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
    /// Study key, identity AAD and key id, once the identity is known.
    sealing: Option<Sealing>,
    /// The incremental identity scanner, until the identity is known.
    scanner: Option<Box<dataset::IdentityScanner>>,
    /// End (in `buf`) of the bytes already fed to `scanner`.
    scanned_to: usize,
    next_index: u64,
    written: u64,
    digest: Sha256,
    started: bool,
    committed: bool,
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
        let dataset_offset = if header.is_empty() {
            header_len
        } else {
            header.len()
        };
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
            sealing: None,
            scanner: None,
            scanned_to: 0,
            next_index: 0,
            written,
            digest,
            started: false,
            committed: false,
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

    /// Append bytes of the stream.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), SpoolError> {
        self.written += data.len() as u64;
        if self.written > self.spool.inner.max_object_bytes {
            return Err(SpoolError::TooLarge(self.spool.inner.max_object_bytes));
        }
        self.digest.update(data);
        self.buf.extend_from_slice(data);
        if self.sealing.is_none() {
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
        self.check_identity(&ident)?;
        let resolved = ResolvedIdentity {
            study: ident.study.unwrap_or_default(),
            series: ident.series.unwrap_or_default(),
            sop_instance: self.ingest.sop_instance.clone(),
            sop_class: self.ingest.sop_class.clone(),
            transfer_syntax: self.ingest.transfer_syntax.clone(),
        };
        let kid = self
            .spool
            .inner
            .index
            .id("study", resolved.study.as_bytes());
        let spool = self.spool.clone();
        let id = ObjectId::random()?;
        let dek = blocking(move || {
            let dek = spool.study_key(kid, true)?;
            // Mark the ingest in progress before the first segment is written.
            spool
                .inner
                .store
                .put_unsynced(Cf::Ingest, &id.0, &now_ms().to_be_bytes())?;
            Ok(dek)
        })
        .await?;
        self.id = Some(id);
        self.started = true;
        let aad = ObjectMeta::identity_aad(&id, &resolved);
        self.sealing = Some((Arc::new(dek), aad, kid, resolved));
        Ok(())
    }

    fn check_identity(&self, ident: &Identity) -> Result<(), SpoolError> {
        if let Some(c) = &ident.sop_class
            && *c != self.ingest.sop_class
        {
            return Err(SpoolError::IdentityMismatch("SOP Class UID"));
        }
        if let Some(i) = &ident.sop_instance
            && *i != self.ingest.sop_instance
        {
            return Err(SpoolError::IdentityMismatch("SOP Instance UID"));
        }
        for uid in [&ident.study, &ident.series].into_iter().flatten() {
            if !crate::dimse::is_valid_uid(uid) {
                return Err(dataset::FormatError::Malformed("invalid study or series UID").into());
            }
        }
        Ok(())
    }

    async fn seal_and_put(&mut self, chunk: Vec<u8>, is_final: bool) -> Result<(), SpoolError> {
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
        let spool = self.spool.clone();
        blocking(move || {
            spool
                .inner
                .store
                .put_unsynced(Cf::Seg, &seg_key(&id, index), &sealed)?;
            Ok(())
        })
        .await?;
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
    pub async fn commit(mut self) -> Result<Committed, SpoolError> {
        if self.sealing.is_none() {
            self.try_resolve(true).await?;
        }
        let rest = std::mem::take(&mut self.buf);
        self.seal_and_put(rest, true).await?;
        let (dek, _, kid, resolved) = self
            .sealing
            .clone()
            .ok_or_else(|| SpoolError::Internal("no identity".into()))?;
        let id = self
            .id
            .ok_or_else(|| SpoolError::Internal("no object id".into()))?;
        let digest = self.digest.clone().finish();
        let meta = ObjectMeta {
            id,
            study_uid: resolved.study,
            series_uid: resolved.series,
            sop_instance_uid: resolved.sop_instance,
            sop_class_uid: resolved.sop_class,
            transfer_syntax: resolved.transfer_syntax,
            source: self.ingest.source.clone(),
            length: self.written,
            dataset_offset: self.dataset_offset as u64,
            digest,
            segments: self.next_index,
            received_at_ms: now_ms(),
        };
        let sealed_meta =
            keystore::seal_record(&dek, &meta_ad(&id), &meta.encode()).map_err(SpoolError::Key)?;
        let spool = self.spool.clone();
        let routes = self.ingest.routes.clone();
        let dedup = self.ingest.dedup;
        let result = blocking(move || {
            let s = &spool.inner.store;
            let _g = spool
                .inner
                .lock
                .lock()
                .map_err(|_| SpoolError::Internal("lock poisoned".into()))?;
            if let Some(key) = dedup {
                match spool.dedup_state(key, &digest)? {
                    DedupState::New => {}
                    DedupState::Identical => return Ok((Committed::Duplicate, Vec::new())),
                    DedupState::Conflict => {
                        return Err(SpoolError::IdentityMismatch("content of this transfer"));
                    }
                }
            }
            let mut b = s.batch();
            let mut value = vec![META_VERSION];
            value.extend_from_slice(&kid);
            value.extend_from_slice(&sealed_meta);
            b.put(Cf::Meta, &id.0, &value);
            let mut entries = Vec::with_capacity(routes.len());
            for dest in &routes {
                let seq = spool.inner.next_seq.fetch_add(1, Ordering::SeqCst);
                let mut qv = id.0.to_vec();
                qv.push(0);
                b.put(Cf::Queue, &queue_key(dest, seq), &qv);
                b.put(Cf::Refs, &ref_key(&id, dest), &seq.to_be_bytes());
                entries.push((
                    dest.clone(),
                    QueueEntry {
                        seq,
                        object: id,
                        parked: false,
                    },
                ));
            }
            if let Some(key) = dedup {
                let mut v = digest.to_vec();
                v.extend_from_slice(&now_ms().to_be_bytes());
                b.put(Cf::Dedup, &key.0, &v);
            }
            b.delete(Cf::Ingest, &id.0);
            s.commit(b, true)?;
            Ok((Committed::Stored(id), entries))
        })
        .await;
        match result {
            Ok((c, entries)) => {
                // A duplicate leaves its segments to the drop cleanup.
                if matches!(c, Committed::Stored(_)) {
                    self.committed = true;
                }
                for (dest, e) in entries {
                    self.spool.notify(&dest, e);
                }
                debug!(object = %id, bytes = self.written, "committed");
                Ok(c)
            }
            Err(e) => Err(e),
        }
    }
}

impl Drop for ObjectWriter {
    fn drop(&mut self) {
        if self.committed || !self.started {
            return;
        }
        let Some(id) = self.id else { return };
        // Best effort: a crash here is handled at the next open via the ingest marker.
        let s = &self.spool.inner.store;
        let mut b = s.batch();
        b.delete_range(Cf::Seg, &seg_key(&id, 0), &seg_key(&id, u64::MAX));
        b.delete(Cf::Ingest, &id.0);
        if let Err(e) = s.commit(b, false) {
            warn!(object = %id, error = %e, "could not discard a partial object; it is removed at the next start");
        }
    }
}

/// Reads an object back, segment by segment, verifying each.
pub struct ObjectReader {
    spool: Spool,
    dek: Arc<Dek>,
    aad: Arc<Vec<u8>>,
    /// The object's metadata.
    pub meta: ObjectMeta,
    next: u64,
    done: bool,
}

impl ObjectReader {
    /// The next plaintext segment, or `None` after the final one.
    pub async fn next_segment(&mut self) -> Result<Option<Vec<u8>>, SpoolError> {
        if self.done {
            return Ok(None);
        }
        let id = self.meta.id;
        let index = self.next;
        let spool = self.spool.clone();
        let dek = self.dek.clone();
        let aad = self.aad.clone();
        let (plain, is_final) = blocking(move || {
            let sealed = spool
                .inner
                .store
                .get(Cf::Seg, &seg_key(&id, index))?
                .ok_or_else(|| {
                    SpoolError::Corrupt(id, format!("segment {index} missing (truncated)"))
                })?;
            keystore::open_segment(&dek, &aad, index, &sealed)
                .map_err(|e| SpoolError::Corrupt(id, e.to_string()))
        })
        .await?;
        self.next += 1;
        if is_final {
            self.done = true;
            if self.next != self.meta.segments {
                return Err(SpoolError::Corrupt(
                    id,
                    "segment count differs from metadata".into(),
                ));
            }
        }
        Ok(Some(plain))
    }

    /// Read the whole object into memory (tests and small objects only).
    pub async fn read_all(&mut self) -> Result<Vec<u8>, SpoolError> {
        let mut out = Vec::with_capacity(self.meta.length as usize);
        while let Some(s) = self.next_segment().await? {
            out.extend_from_slice(&s);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::{DemoObject, generate_object};

    fn open(dir: &Path) -> Spool {
        let opts = SpoolOptions {
            segment_bytes: 64 * 1024,
            ..SpoolOptions::default()
        };
        Spool::open(dir, Kek::from_bytes([3; 32]), opts).unwrap()
    }

    fn ingest(o: &DemoObject, routes: &[&str], dedup: Option<DedupKey>) -> Ingest {
        Ingest {
            sop_class: o.sop_class.clone(),
            sop_instance: o.sop_instance.clone(),
            transfer_syntax: o.transfer_syntax.clone(),
            source: "TEST".into(),
            routes: routes.iter().map(|s| s.to_string()).collect(),
            dedup,
        }
    }

    async fn store(spool: &Spool, o: &DemoObject, routes: &[&str]) -> ObjectId {
        let mut w = spool.writer(ingest(o, routes, None)).unwrap();
        for c in o.dataset.chunks(10_000) {
            w.write(c).await.unwrap();
        }
        match w.commit().await.unwrap() {
            Committed::Stored(id) => id,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn round_trip_queues_and_deletion_after_the_last_destination() {
        let dir = tempfile::tempdir().unwrap();
        let spool = open(dir.path());
        let o = generate_object("1.2.3", "1.2.3.1", 1, "ROUND^TRIP", 300_000).unwrap();
        let id = store(&spool, &o, &["x", "y"]).await;
        let mut r = spool.open_object(id).await.unwrap();
        assert_eq!(r.meta.study_uid, "1.2.3");
        assert_eq!(r.meta.series_uid, "1.2.3.1");
        assert_eq!(r.meta.sop_instance_uid, o.sop_instance);
        assert!(r.meta.segments > 4, "several segments expected");
        let all = r.read_all().await.unwrap();
        assert_eq!(&all[r.meta.dataset_offset as usize..], &o.dataset[..]);
        let (qx, _) = spool.subscribe("x").unwrap();
        let (qy, _) = spool.subscribe("y").unwrap();
        assert_eq!((qx.len(), qy.len()), (1, 1));
        assert!(!spool.complete("x", qx[0]).await.unwrap());
        assert_eq!(spool.object_count().unwrap(), 1);
        assert!(spool.complete("y", qy[0]).await.unwrap());
        assert_eq!(spool.object_count().unwrap(), 0);
        assert_eq!(spool.segment_count().unwrap(), 0);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_segment_moved_to_another_object_fails_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let spool = open(dir.path());
        let a = generate_object("1.2.3", "1.2.3.1", 1, "SWAP^A", 100_000).unwrap();
        let b = generate_object("1.2.3", "1.2.3.1", 2, "SWAP^B", 100_000).unwrap();
        let ia = store(&spool, &a, &["x"]).await;
        let ib = store(&spool, &b, &["x"]).await;
        let s = &spool.inner.store;
        let seg_b = s.get(Cf::Seg, &seg_key(&ib, 1)).unwrap().unwrap();
        s.put_unsynced(Cf::Seg, &seg_key(&ia, 1), &seg_b).unwrap();
        let mut r = spool.open_object(ia).await.unwrap();
        let err = r
            .read_all()
            .await
            .expect_err("swapped segment must not open");
        assert!(matches!(err, SpoolError::Corrupt(..)), "{err}");
        // and a dropped final segment is a truncation, not a short read
        let last = spool.open_object(ib).await.unwrap().meta.segments - 1;
        let mut b2 = s.batch();
        b2.delete(Cf::Seg, &seg_key(&ib, last));
        s.commit(b2, true).unwrap();
        let err = spool
            .open_object(ib)
            .await
            .unwrap()
            .read_all()
            .await
            .expect_err("truncated");
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_interrupted_ingest_is_removed_at_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let spool = open(dir.path());
            let o = generate_object("1.2.3", "1.2.3.1", 1, "CRASH^MID", 400_000).unwrap();
            let mut w = spool.writer(ingest(&o, &["x"], None)).unwrap();
            w.write(&o.dataset[..300_000]).await.unwrap();
            assert!(spool.segment_count().unwrap() > 0);
            // A crash: the writer's cleanup never runs.
            w.committed = true;
            drop(w);
        }
        let spool = open(dir.path());
        assert_eq!(spool.segment_count().unwrap(), 0);
        assert_eq!(spool.object_count().unwrap(), 0);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn link_transfers_deduplicate_and_refuse_conflicts() {
        let dir = tempfile::tempdir().unwrap();
        let spool = open(dir.path());
        let o = generate_object("1.2.3", "1.2.3.1", 1, "DEDUP^X", 10_000).unwrap();
        let key = spool.dedup_key("site-a", "<abc@site-a>");
        let commit = |bytes: Vec<u8>| {
            let spool = spool.clone();
            let ing = ingest(&o, &["x"], Some(key));
            async move {
                let mut w = spool.writer(ing).unwrap();
                w.write(&bytes).await.unwrap();
                w.commit().await
            }
        };
        assert!(matches!(
            commit(o.dataset.clone()).await,
            Ok(Committed::Stored(_))
        ));
        assert!(matches!(
            commit(o.dataset.clone()).await,
            Ok(Committed::Duplicate)
        ));
        let mut other = o.dataset.clone();
        let n = other.len();
        other[n - 1] ^= 1;
        assert!(matches!(
            commit(other).await,
            Err(SpoolError::IdentityMismatch(_))
        ));
        assert_eq!(spool.object_count().unwrap(), 1);
        assert_eq!(spool.queue_len("x").unwrap(), 1);
        // nothing of the refused copies is left behind
        let stored = spool
            .open_object(spool.subscribe("x").unwrap().0[0].object)
            .await
            .unwrap();
        assert_eq!(spool.segment_count().unwrap() as u64, stored.meta.segments);
    }
}
