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
//! - A study key lives while an object of the study is stored or a writer holds it (a
//!   [`KeyPin`], taken before the key is looked up and kept by the commit task until the
//!   commit is done). [`Spool::shred_unused_keys_blocking`] deletes every other key, so
//!   a study's key is gone within a sweep of its last object's deletion, whatever deleted
//!   it (delivery, expiry, purge).

pub mod kek_check;
mod rocks;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keystore::{Dek, IndexHasher, Kek, Sha256};
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::dataset::{self, Identity, Scan};
use crate::sop::Encoding;
use rocks::{Cf, Store};
pub use rocks::{StoreError, StoreStats};

/// Version byte of a metadata record.
const META_VERSION: u8 = 1;
/// Queue entry flag: a dead letter (refused permanently or out of retry budget; kept for an
/// operator). The same bit marked "parked" entries in earlier versions.
const FLAG_DEAD: u8 = 1;
/// Queue entry flag: an operator's resend of a retained object (`queue resend`). Its
/// transfer id carries the entry's sequence, so that the next hop stores it anew rather
/// than deduplicate it against the first delivery.
const FLAG_RESEND: u8 = 2;
/// Version byte of a dedup record: 2 = keyed digest (16) ‖ stored-at ms (8). Records of
/// version 1 had no version byte: the plaintext SHA-256 (32) ‖ stored-at (8); they are still
/// read until they expire.
const DEDUP_VERSION: u8 = 2;
/// New bytes the identity scanner waits for before it runs again (see `ObjectWriter::write`).
const SCAN_BATCH: usize = 4096;
/// Objects the retention sweep deletes per synced batch.
const EXPIRE_BATCH: usize = 256;
/// Version byte of a failure record.
const FAIL_VERSION: u8 = 1;
/// Failure reasons kept per entry (the attempt history).
const MAX_HISTORY: usize = 8;
/// Longest reason kept, in bytes.
const MAX_REASON: usize = 240;

/// Evaluate a fault-injection point (tests only: it does nothing unless the build has the
/// `failpoints` feature *and* the spool was opened with [`SpoolOptions::failpoints`]).
/// With a third argument, a `return` action makes the enclosing function return it.
macro_rules! fault {
    ($inner:expr, $name:literal) => {
        if $inner.failpoints {
            fail::fail_point!($name);
        }
    };
    ($inner:expr, $name:literal, $ret:expr) => {
        if $inner.failpoints {
            fail::fail_point!($name, |_| $ret);
        }
    };
}

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
    /// A segment of a stored object is missing (the object is truncated).
    #[error("object {0}: segment {1} missing (truncated)")]
    MissingSegment(ObjectId, u64),
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
    /// New objects are refused for now (disk under the watermark, a destination's queue
    /// full, or storage failed); nothing accepted is affected.
    #[error("not accepting objects now: {0}")]
    Busy(String),
    /// The KEK does not match the data directory (or its check value is unreadable);
    /// a configuration error (exit code 78). Nothing was changed.
    #[error(transparent)]
    KekCheck(#[from] kek_check::KekCheckError),
    /// The data directory is open to other users (or to a group that is not the
    /// process's own); a configuration error (exit code 78). Nothing was opened.
    #[error(
        "the data directory {} has mode {mode:04o}, group {gid}: others may read the spool. Run `chmod 700 {}` (or `chmod 750` with the gateway's own group, {own_gid}, as Kubernetes' fsGroup sets it), then start again",
        path.display(),
        path.display()
    )]
    DataDirPermissions {
        /// The directory.
        path: std::path::PathBuf,
        /// Its permission bits.
        mode: u32,
        /// Its group.
        gid: u32,
        /// The process's effective group.
        own_gid: u32,
    },
    /// No destination takes the object: no `[[route]]` matches it and its listener has no
    /// `route_to`. Refused before anything is stored.
    #[error(
        "no route takes this object (no [[route]] matches it and the listener has no route_to)"
    )]
    Unrouted,
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
    /// True for an HL7 v2 message (stored by [`Spool::store_message`]); false for a DICOM
    /// object.
    pub fn is_hl7(&self) -> bool {
        self.sop_class_uid == crate::hl7::SPOOL_CLASS
    }

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
    /// Waiting for delivery, or a dead letter.
    pub state: EntryState,
    /// An operator's resend of a retained object (see [`Spool::resend_study`]).
    pub resend: bool,
}

impl QueueEntry {
    /// The stored flag byte.
    fn flags(&self) -> u8 {
        let dead = if self.state == EntryState::Dead {
            FLAG_DEAD
        } else {
            0
        };
        dead | if self.resend { FLAG_RESEND } else { 0 }
    }
}

/// The stored state of a queue entry. (Being in flight is the dispatcher's business.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryState {
    /// Waiting for (another) delivery attempt.
    Queued,
    /// Refused permanently or out of retry budget: kept for an operator, never retried
    /// until replayed.
    Dead,
}

impl EntryState {
    /// `queued` or `dead`.
    pub fn as_str(self) -> &'static str {
        match self {
            EntryState::Queued => "queued",
            EntryState::Dead => "dead",
        }
    }
}

/// A queue entry with what the dispatcher needs to know of its object (held in memory only:
/// sizes and times are not stored in the clear).
#[derive(Debug, Clone, Copy)]
pub struct Queued {
    /// The entry.
    pub entry: QueueEntry,
    /// The object's stored bytes.
    pub length: u64,
    /// When the object was committed here (ms since the epoch).
    pub received_at_ms: u64,
    /// For an operator's replay or resend: when it started a fresh retry budget, which
    /// then counts from here rather than from `received_at_ms`.
    pub budget_from_ms: Option<u64>,
    /// Its study, as a [`study_tag`] (for the dispatcher's in-study order); for an HL7
    /// message, its patient's.
    pub study: u64,
    /// An HL7 message: delivered strictly in order within its patient (one at a time, the
    /// next only once the previous one is delivered or a dead letter).
    pub serial: bool,
}

/// A study's tag for grouping in memory: a hash of the Study Instance UID under a key
/// drawn at process start. It is never stored or logged, and means nothing in another
/// process. An object whose study is unknown gets a tag of its own ([`object_tag`]).
pub fn study_tag(study_uid: &str) -> u64 {
    use std::hash::BuildHasher;
    static KEY: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    KEY.get_or_init(Default::default).hash_one(study_uid)
}

/// The tag of an object whose study is not known (its metadata does not open): its own.
fn object_tag(id: &ObjectId) -> u64 {
    study_tag(&format!("object:{id}"))
}

/// A delivered object kept for `[spool] retention`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retained {
    /// The object.
    pub object: ObjectId,
    /// When the retention sweep deletes it (ms since the epoch).
    pub expires_at_ms: u64,
    /// The destinations it was delivered to.
    pub destinations: Vec<String>,
}

/// A retained object queued again by [`Spool::resend_study`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resent {
    /// The object.
    pub object: ObjectId,
    /// The destinations it was queued for.
    pub destinations: Vec<String>,
}

/// What a destination's dispatcher hears from the spool.
#[derive(Debug, Clone, Copy)]
pub enum QueueEvent {
    /// An entry was committed, or a dead letter replayed.
    Added(Queued),
    /// An entry was purged by an operator.
    Removed(u64),
}

/// One failed delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// When it failed (ms since the epoch).
    pub at_ms: u64,
    /// Why (our own words and status codes; never patient data or a peer's free text).
    pub reason: String,
}

/// The failure history of one queue entry, kept on disk so that a restart neither resets
/// a retry budget nor loses a dead letter's reason.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FailureRecord {
    /// Failed attempts so far.
    pub attempts: u32,
    /// The most recent failures, oldest first (at most 8).
    pub history: Vec<Attempt>,
    /// Where the retry time budget (`max_age`) counts from, when not from the object's
    /// reception here: an operator's replay of a dead letter or resend of a retained study
    /// starts a fresh budget, and storing its start keeps it fresh across a restart.
    pub budget_from_ms: Option<u64>,
}

impl FailureRecord {
    /// A fresh budget that counts from now (a replay or a resend).
    pub fn fresh_from_now() -> FailureRecord {
        FailureRecord {
            budget_from_ms: Some(now_ms()),
            ..FailureRecord::default()
        }
    }

    /// The last reason, if any.
    pub fn last_reason(&self) -> Option<&str> {
        self.history.last().map(|a| a.reason.as_str())
    }

    /// Add a failure.
    pub fn push(&mut self, reason: &str) {
        self.attempts = self.attempts.saturating_add(1);
        let mut r: String = reason.chars().filter(|c| !c.is_control()).collect();
        if r.len() > MAX_REASON {
            let mut end = MAX_REASON;
            while !r.is_char_boundary(end) {
                end -= 1;
            }
            r.truncate(end);
        }
        self.history.push(Attempt {
            at_ms: now_ms(),
            reason: r,
        });
        if self.history.len() > MAX_HISTORY {
            self.history.remove(0);
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = vec![FAIL_VERSION];
        out.extend_from_slice(&self.attempts.to_be_bytes());
        out.push(self.history.len() as u8);
        for a in &self.history {
            out.extend_from_slice(&a.at_ms.to_be_bytes());
            out.extend_from_slice(&(a.reason.len() as u16).to_be_bytes());
            out.extend_from_slice(a.reason.as_bytes());
        }
        // An optional trailer, so records written before it existed still decode.
        if let Some(t) = self.budget_from_ms {
            out.extend_from_slice(&t.to_be_bytes());
        }
        out
    }

    fn decode(b: &[u8]) -> Option<FailureRecord> {
        let mut r = Reader(b);
        if r.take(1)? != [FAIL_VERSION] {
            return None;
        }
        let attempts = u32::from_be_bytes(r.take(4)?.try_into().ok()?);
        let n = (r.take(1)?[0] as usize).min(MAX_HISTORY);
        let mut history = Vec::with_capacity(n);
        for _ in 0..n {
            let at_ms = u64::from_be_bytes(r.take(8)?.try_into().ok()?);
            let len = u16::from_be_bytes(r.take(2)?.try_into().ok()?) as usize;
            let reason = String::from_utf8(r.take(len)?.to_vec()).ok()?;
            history.push(Attempt { at_ms, reason });
        }
        let budget_from_ms = match r.0.len() {
            0 => None,
            _ => Some(u64::from_be_bytes(r.take(8)?.try_into().ok()?)),
        };
        Some(FailureRecord {
            attempts,
            history,
            budget_from_ms,
        })
    }
}

/// What start-up recovery found and removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Objects whose ingest was interrupted (marker without metadata).
    pub interrupted: usize,
    /// Objects with segments but neither metadata nor an ingest marker.
    pub orphans: usize,
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
    listeners: Mutex<HashMap<String, mpsc::UnboundedSender<QueueEvent>>>,
    /// Commit and cleanup tasks: work that must finish runs here, owning what it touches.
    jobs: TaskTracker,
    /// A synced write failed: the store may be read-only, so nothing is acknowledged until
    /// an operator restarts the node (RocksDB refuses writes after a failed sync).
    storage_failed: AtomicBool,
    /// What start-up recovery removed.
    recovery: Recovery,
    /// Evaluate fault-injection points (tests only).
    failpoints: bool,
    /// Test-only sabotage: commit without syncing. Exists so that the durability test can
    /// prove it notices; never set by configuration.
    unsynced_commits: bool,
    /// Backpressure: why new objects are refused for now.
    admission: Mutex<Admission>,
    /// The data directory (for the free-space check).
    dir: std::path::PathBuf,
    /// See [`SpoolOptions::min_free`].
    min_free: u64,
    /// See [`SpoolOptions::retention`].
    retention: Duration,
    /// Unwrapped study keys, bounded and short-lived (see [`DekCache`]).
    dek_cache: Mutex<DekCache>,
    /// Study keys in use by writers, and those committed to since the last key sweep.
    pins: Arc<Mutex<KeyPins>>,
    /// Key-encryption-key operations since open, for `kek_operations_total`.
    kek_ops: KekOps,
}

/// Counts of key-encryption-key operations: study keys wrapped (created), unwrapped
/// (loaded into the cache) and shredded (deleted, counted once the deletion is written).
#[derive(Debug, Default)]
struct KekOps {
    wrap: AtomicU64,
    unwrap: AtomicU64,
    shred: AtomicU64,
}

/// A snapshot of [`KekOps`], with the id of the KEK they used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KekOpCounts {
    /// The KEK's id (`kek_version` in metrics).
    pub kek_id: u32,
    /// Study keys wrapped (created).
    pub wrap: u64,
    /// Study keys unwrapped.
    pub unwrap: u64,
    /// Study keys shredded.
    pub shred: u64,
}

/// Study keys that the unused-key sweep must keep although no stored object uses them.
#[derive(Debug, Default)]
struct KeyPins {
    /// Writers (and their commit tasks) holding each key.
    held: HashMap<[u8; 16], usize>,
    /// Keys that a commit used since the sweep began (its scan of the metadata may have
    /// missed that commit).
    touched: std::collections::HashSet<[u8; 16]>,
}

fn lock_pins(pins: &Mutex<KeyPins>) -> std::sync::MutexGuard<'_, KeyPins> {
    // The map stays consistent whatever a panicking holder did: each change is one step.
    pins.lock().unwrap_or_else(|e| e.into_inner())
}

/// A writer's hold on its study key: while it exists the key is not shredded by the
/// unused-key sweep or a purge (see the module invariants).
struct KeyPin {
    pins: Arc<Mutex<KeyPins>>,
    kid: [u8; 16],
}

impl KeyPin {
    fn new(pins: &Arc<Mutex<KeyPins>>, kid: [u8; 16]) -> KeyPin {
        *lock_pins(pins).held.entry(kid).or_insert(0) += 1;
        KeyPin {
            pins: pins.clone(),
            kid,
        }
    }
}

impl Clone for KeyPin {
    fn clone(&self) -> KeyPin {
        KeyPin::new(&self.pins, self.kid)
    }
}

impl Drop for KeyPin {
    fn drop(&mut self) {
        let mut p = lock_pins(&self.pins);
        if let Some(n) = p.held.get_mut(&self.kid) {
            *n -= 1;
            if *n == 0 {
                p.held.remove(&self.kid);
            }
        }
    }
}

/// Backpressure state, set by the disk monitor and the dispatchers.
#[derive(Debug, Default)]
struct Admission {
    /// The disk is under the watermark (with the detail).
    low_disk: Option<String>,
    /// Destinations whose queue is full.
    full: std::collections::BTreeSet<String>,
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
    /// Evaluate fault-injection points (only in builds with the `failpoints` feature; tests).
    pub failpoints: bool,
    /// Sabotage for tests: commit without syncing the WAL. Never set this in production.
    pub unsynced_commits: bool,
    /// Free bytes the data directory's filesystem must keep; under it new objects are
    /// refused. 0 disables the check.
    pub min_free: u64,
    /// How long a delivered object is kept (encrypted) for `queue resend`; zero deletes it
    /// as soon as its last destination confirmed it.
    pub retention: Duration,
}

impl Default for SpoolOptions {
    fn default() -> Self {
        Self {
            segment_bytes: 1 << 20,
            max_object_bytes: 16 << 30,
            dedup_window: Duration::from_secs(7 * 24 * 3600),
            failpoints: false,
            unsynced_commits: false,
            min_free: 0,
            retention: Duration::ZERO,
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

/// Compare without an early exit (the time taken does not tell where two MACs differ).
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len()
        && std::hint::black_box(a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y))) == 0
}

/// Unwrapped study keys: at most [`DekCache::MAX`] of them, each for at most
/// [`DekCache::TTL`] since it was unwrapped, so that reading an object does not unwrap its
/// key again while the key does not stay in memory for long. An entry leaves when its study
/// key is deleted. Evicted keys are zeroized when their last user drops them.
#[derive(Default)]
struct DekCache {
    map: HashMap<[u8; 16], (Arc<Dek>, std::time::Instant)>,
}

impl DekCache {
    const MAX: usize = 1024;
    const TTL: Duration = Duration::from_secs(300);

    fn get(&mut self, kid: &[u8; 16]) -> Option<Arc<Dek>> {
        match self.map.get(kid) {
            Some((d, at)) if at.elapsed() < Self::TTL => Some(d.clone()),
            Some(_) => {
                self.map.remove(kid);
                None
            }
            None => None,
        }
    }

    fn put(&mut self, kid: [u8; 16], dek: Arc<Dek>) {
        self.map.retain(|_, (_, at)| at.elapsed() < Self::TTL);
        if self.map.len() >= Self::MAX
            && let Some(oldest) = self
                .map
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(k, _)| *k)
        {
            self.map.remove(&oldest);
        }
        self.map.insert(kid, (dek, std::time::Instant::now()));
    }

    fn remove(&mut self, kid: &[u8; 16]) {
        self.map.remove(kid);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }
}

/// The digest part of a dedup record.
enum DedupDigest {
    Keyed([u8; 16]),
    Legacy([u8; 32]),
}

/// A dedup record: (digest, stored-at ms), either version.
fn parse_dedup(v: &[u8]) -> Option<(DedupDigest, u64)> {
    let at = |b: &[u8]| <[u8; 8]>::try_from(b).ok().map(u64::from_be_bytes);
    match v.len() {
        25 if v[0] == DEDUP_VERSION => Some((
            DedupDigest::Keyed(<[u8; 16]>::try_from(&v[1..17]).ok()?),
            at(&v[17..25])?,
        )),
        40 => Some((
            DedupDigest::Legacy(<[u8; 32]>::try_from(&v[..32]).ok()?),
            at(&v[32..40])?,
        )),
        _ => None,
    }
}

/// Key of the retention index: expiry first, so that the sweep reads only what is due.
fn expiry_key(expiry_ms: u64, id: &ObjectId) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..8].copy_from_slice(&expiry_ms.to_be_bytes());
    k[8..].copy_from_slice(&id.0);
    k
}

/// The first key after every key that starts with `id` (an exclusive range end).
fn id_upper(id: &ObjectId) -> Vec<u8> {
    let mut k = id.0.to_vec();
    k.push(0xff);
    k.extend_from_slice(&[0xff; 8]);
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

/// May a data directory with these permission bits and group be used? Nothing for others,
/// and group access only for the process's own group (Kubernetes' `fsGroup`).
pub fn data_dir_mode_allowed(mode: u32, dir_gid: u32, own_gid: u32) -> bool {
    mode & 0o007 == 0 && (mode & 0o070 == 0 || dir_gid == own_gid)
}

/// Create the data directory (and missing parents) with mode 0700, whatever the umask, or
/// check an existing one with [`data_dir_mode_allowed`].
fn prepare_data_dir(dir: &Path) -> Result<(), SpoolError> {
    use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
    let io = |e| SpoolError::Store(StoreError::from_io(dir, e));
    if dir.exists() && !dir.is_dir() {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::NotADirectory,
            "not a directory",
        )));
    }
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
        // The umask may have taken bits away, never added them; make it exactly 0700.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    let meta = std::fs::metadata(dir).map_err(io)?;
    let mode = meta.permissions().mode() & 0o7777;
    let own_gid = rustix::process::getegid().as_raw();
    if !data_dir_mode_allowed(mode, meta.gid(), own_gid) {
        return Err(SpoolError::DataDirPermissions {
            path: dir.to_owned(),
            mode,
            gid: meta.gid(),
            own_gid,
        });
    }
    Ok(())
}

/// Bytes available to an unprivileged writer on the filesystem holding `dir` (a `statvfs`).
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(dir)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

impl Spool {
    /// Open the spool in `dir` with the given KEK, removing what interrupted ingests left.
    ///
    /// The KEK is checked against the directory's check value first
    /// ([`kek_check`]): another KEK is refused before RocksDB is opened. A directory
    /// without one (new, or from a version before check values) gets the KEK's value
    /// once the store opened.
    pub fn open(dir: &Path, kek: Kek, opts: SpoolOptions) -> Result<Spool, SpoolError> {
        prepare_data_dir(dir)?;
        if dir.join(kek_check::FILE_NAME).exists() {
            kek_check::verify_or_store_blocking(dir, &kek)?;
        }
        let store = Store::open(dir)?;
        if kek_check::verify_or_store_blocking(dir, &kek)? == kek_check::Outcome::Written {
            info!(
                "stored the KEK check value in the data directory ({})",
                kek_check::FILE_NAME
            );
        }
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
            jobs: TaskTracker::new(),
            storage_failed: AtomicBool::new(false),
            recovery: Recovery::default(),
            failpoints: opts.failpoints,
            unsynced_commits: opts.unsynced_commits,
            admission: Mutex::new(Admission::default()),
            dir: dir.to_owned(),
            min_free: opts.min_free,
            retention: opts.retention,
            dek_cache: Mutex::new(DekCache::default()),
            pins: Arc::new(Mutex::new(KeyPins::default())),
            kek_ops: KekOps::default(),
        };
        let mut inner = inner;
        inner.recovery = Self::recover(&inner)?;
        let spool = Spool {
            inner: Arc::new(inner),
        };
        Ok(spool)
    }

    /// What start-up recovery removed.
    pub fn recovery(&self) -> Recovery {
        self.inner.recovery
    }

    /// True after a synced write failed: the node must not acknowledge anything until it
    /// is restarted.
    pub fn storage_failed(&self) -> bool {
        self.inner.storage_failed.load(Ordering::SeqCst)
    }

    /// Compare the data volume's free space with the watermark, record the result for
    /// admission and readiness, and log a change. A `statvfs`: cheap enough per object.
    pub fn check_disk(&self) -> Option<String> {
        let min = self.inner.min_free;
        if min == 0 {
            return None;
        }
        let detail = match free_bytes(&self.inner.dir) {
            Ok(free) => (free < min).then(|| {
                format!(
                    "free space on the data volume ({} MiB) is under spool.min_free ({} MiB)",
                    free >> 20,
                    min >> 20
                )
            }),
            // Cannot tell: refuse rather than risk writing into a full disk.
            Err(e) => Some(format!("cannot read the data volume's free space: {e}")),
        };
        let Ok(mut a) = self.inner.admission.lock() else {
            return detail;
        };
        if a.low_disk.is_some() != detail.is_some() {
            match &detail {
                Some(d) => {
                    warn!(detail = %d, "refusing new objects (0xA700, link 503) until space returns; nothing accepted is affected")
                }
                None => info!("data volume above the watermark again: accepting objects"),
            }
        }
        a.low_disk.clone_from(&detail);
        detail
    }

    /// The watermark detail while the disk is under it.
    pub fn low_disk(&self) -> Option<String> {
        self.inner
            .admission
            .lock()
            .ok()
            .and_then(|a| a.low_disk.clone())
    }

    /// Record whether `dest`'s queue is full.
    pub fn set_destination_full(&self, dest: &str, full: bool) {
        if let Ok(mut a) = self.inner.admission.lock() {
            if full {
                a.full.insert(dest.to_owned());
            } else {
                a.full.remove(dest);
            }
        }
    }

    /// May a new object for `routes` be accepted now?
    pub fn admit(&self, routes: &[String]) -> Result<(), SpoolError> {
        if let Some(d) = self.check_disk() {
            return Err(SpoolError::Busy(d));
        }
        if self.storage_failed() {
            return Err(SpoolError::Busy(
                "the gateway's storage failed; it acknowledges nothing until restarted".into(),
            ));
        }
        let a = self
            .inner
            .admission
            .lock()
            .map_err(|_| SpoolError::Internal("admission lock poisoned".into()))?;
        if let Some(full) = routes.iter().find(|r| a.full.contains(*r)) {
            return Err(SpoolError::Busy(format!(
                "the queue of destination {full} is full"
            )));
        }
        Ok(())
    }

    /// Wait until every commit and cleanup task started so far has finished. Used by
    /// shutdown (before the database closes) and by tests.
    pub async fn quiesce(&self) {
        let jobs = &self.inner.jobs;
        jobs.close();
        jobs.wait().await;
        jobs.reopen();
    }

    /// Apply a batch that must be durable: synced, and a failure marks the store failed.
    fn commit_batch(&self, b: rocks::Batch<'_>) -> Result<(), SpoolError> {
        let r = self.inner.store.commit(b, !self.inner.unsynced_commits);
        if r.is_err() {
            self.inner.storage_failed.store(true, Ordering::SeqCst);
        }
        Ok(r?)
    }

    /// The lock serialising read-modify-write sequences (study key creation, dedup
    /// check-and-set, reference counting).
    fn commit_lock(&self) -> Result<std::sync::MutexGuard<'_, ()>, SpoolError> {
        self.inner
            .lock
            .lock()
            .map_err(|_| SpoolError::Internal("lock poisoned".into()))
    }

    /// Flush memtables to disk (shutdown; the WAL already holds everything).
    pub fn flush_blocking(&self) -> Result<(), SpoolError> {
        Ok(self.inner.store.flush()?)
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

    /// Startup recovery: drop segments of interrupted ingests and of objects that have
    /// neither metadata nor an ingest marker (orphans), and find the next sequence.
    ///
    /// Orphans are found without reading segment values: between two consecutive live
    /// objects, a bounded seek finds any segment key in the gap.
    fn recover(inner: &Inner) -> Result<Recovery, SpoolError> {
        let s = &inner.store;
        let mut report = Recovery::default();
        let markers = s.scan_prefix(Cf::Ingest, &[], usize::MAX)?;
        if !markers.is_empty() {
            let mut b = s.batch();
            for (k, _) in &markers {
                if let Ok(id) = <[u8; 16]>::try_from(&k[..]) {
                    let id = ObjectId(id);
                    b.delete_range(Cf::Seg, &seg_key(&id, 0), &seg_key(&id, u64::MAX));
                }
                b.delete(Cf::Ingest, k);
            }
            s.commit(b, true)?;
            report.interrupted = markers.len();
            warn!(
                count = markers.len(),
                "removed partial objects left by an interrupted ingest"
            );
        }
        let mut live: Vec<[u8; 16]> = s
            .scan_keys(Cf::Meta)?
            .iter()
            .filter_map(|k| <[u8; 16]>::try_from(&k[..]).ok())
            .collect();
        live.sort_unstable();
        let mut b = s.batch();
        let mut lower: Vec<u8> = Vec::new();
        let bounds = live
            .iter()
            .map(|id| Some(ObjectId(*id)))
            .chain(std::iter::once(None));
        for next in bounds {
            let upper = match next {
                Some(id) => seg_key(&id, 0).to_vec(),
                None => vec![0xFF; 25],
            };
            while let Some(k) = s.first_key_in(Cf::Seg, &lower, &upper)? {
                let Some(orphan) = k.get(..16).and_then(|b| <[u8; 16]>::try_from(b).ok()) else {
                    break;
                };
                let orphan = ObjectId(orphan);
                b.delete_range(Cf::Seg, &seg_key(&orphan, 0), &seg_key(&orphan, u64::MAX));
                report.orphans += 1;
                lower = seg_key(&orphan, u64::MAX).to_vec();
            }
            if let Some(id) = next {
                lower = seg_key(&id, u64::MAX).to_vec();
            }
        }
        if report.orphans > 0 {
            s.commit(b, true)?;
            warn!(
                count = report.orphans,
                "removed orphan segments (no metadata and no ingest marker)"
            );
        }
        let mut max_seq = 0u64;
        for (_, v) in s.scan_prefix(Cf::Refs, &[], usize::MAX)? {
            if let Ok(b) = <[u8; 8]>::try_from(&v[..]) {
                max_seq = max_seq.max(u64::from_be_bytes(b));
            }
        }
        inner.next_seq.store(max_seq + 1, Ordering::SeqCst);
        Ok(report)
    }

    /// How many handles to this spool exist (the database closes when the last drops).
    pub fn handles(&self) -> usize {
        Arc::strong_count(&self.inner)
    }

    /// RocksDB's counters (background errors, size, pending compaction), for metrics. The
    /// probe does not keep the spool open: it answers `None` once the spool is closed.
    pub fn stats_probe(&self) -> impl Fn() -> Option<StoreStats> + Send + Sync + 'static {
        let inner = Arc::downgrade(&self.inner);
        move || inner.upgrade().map(|i| i.store.stats())
    }

    /// Key-encryption-key operation counts, for metrics; like [`Spool::stats_probe`], the
    /// probe does not keep the spool open.
    pub fn kek_ops_probe(&self) -> impl Fn() -> Option<KekOpCounts> + Send + Sync + 'static {
        let inner = Arc::downgrade(&self.inner);
        move || {
            inner.upgrade().map(|i| KekOpCounts {
                kek_id: i.kek.kek_id(),
                wrap: i.kek_ops.wrap.load(Ordering::Relaxed),
                unwrap: i.kek_ops.unwrap.load(Ordering::Relaxed),
                shred: i.kek_ops.shred.load(Ordering::Relaxed),
            })
        }
    }

    /// Segment size in bytes.
    pub fn segment_bytes(&self) -> usize {
        self.inner.segment_bytes
    }

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
            if let Some(key) = msg.dedup {
                match self.dedup_state(key, &digest)? {
                    DedupState::New => {}
                    DedupState::Identical => return Ok(Committed::Duplicate),
                    DedupState::Conflict => {
                        return Err(SpoolError::IdentityMismatch("content of this transfer"));
                    }
                }
            }
            // The patient's key may have been shredded since it was loaded (see the commit
            // of an object): refuse; the sender retries and gets a new key.
            if s.get(Cf::Keys, &kid)?.is_none() {
                self.uncache_key(&kid);
                return Err(SpoolError::Internal(
                    "the patient's key was deleted while this message was stored; send it again"
                        .into(),
                ));
            }
            lock_pins(&self.inner.pins).touched.insert(kid);
            let mut b = s.batch();
            for (i, seg) in sealed.iter().enumerate() {
                b.put(Cf::Seg, &seg_key(&id, i as u64), seg);
            }
            let mut value = vec![META_VERSION];
            value.extend_from_slice(&kid);
            value.extend_from_slice(&sealed_meta);
            b.put(Cf::Meta, &id.0, &value);
            let mut entries = Vec::with_capacity(msg.routes.len());
            for dest in &msg.routes {
                let seq = self.inner.next_seq.fetch_add(1, Ordering::SeqCst);
                let mut qv = id.0.to_vec();
                qv.push(0);
                b.put(Cf::Queue, &queue_key(dest, seq), &qv);
                b.put(Cf::Refs, &ref_key(&id, dest), &seq.to_be_bytes());
                entries.push((
                    dest.clone(),
                    QueueEntry {
                        seq,
                        object: id,
                        state: EntryState::Queued,
                        resend: false,
                    },
                ));
            }
            if let Some(key) = msg.dedup {
                let mut v = vec![DEDUP_VERSION];
                v.extend_from_slice(&self.dedup_mac(key, &digest));
                v.extend_from_slice(&now_ms().to_be_bytes());
                b.put(Cf::Dedup, &key.0, &v);
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

    /// Register to hear about new queue entries for `dest`, then read the queue as stored
    /// (with each object's size and age, from its sealed metadata). Entries committed
    /// between the two may appear in both; callers key them by `seq`.
    pub async fn subscribe(
        &self,
        dest: &str,
    ) -> Result<(Vec<Queued>, mpsc::UnboundedReceiver<QueueEvent>), SpoolError> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.inner
            .listeners
            .lock()
            .map_err(|_| SpoolError::Internal("listener lock poisoned".into()))?
            .insert(dest.to_owned(), tx);
        let spool = self.clone();
        let dest = dest.to_owned();
        let stored = blocking(move || {
            let entries = spool.entries_blocking(&dest)?;
            Ok(entries
                .into_iter()
                .map(|entry| spool.queued_blocking(entry))
                .collect())
        })
        .await?;
        Ok((stored, rx))
    }

    /// `dest`'s queue entries as stored, in order.
    pub fn entries_blocking(&self, dest: &str) -> Result<Vec<QueueEntry>, SpoolError> {
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
                let flags = v.get(16).copied().unwrap_or(0);
                out.push(QueueEntry {
                    seq,
                    object: ObjectId(obj),
                    state: if flags & FLAG_DEAD != 0 {
                        EntryState::Dead
                    } else {
                        EntryState::Queued
                    },
                    resend: flags & FLAG_RESEND != 0,
                });
            }
        }
        Ok(out)
    }

    /// An entry with its object's size and age. An object whose metadata does not open is
    /// reported with size 0, received now: sending it fails as an integrity error.
    fn queued_blocking(&self, entry: QueueEntry) -> Queued {
        match self.meta_blocking(entry.object) {
            Ok((m, _)) => Queued {
                entry,
                length: m.length,
                received_at_ms: m.received_at_ms,
                budget_from_ms: None,
                study: study_tag(&m.study_uid),
                serial: m.is_hl7(),
            },
            Err(_) => Queued {
                study: object_tag(&entry.object),
                entry,
                length: 0,
                received_at_ms: now_ms(),
                budget_from_ms: None,
                serial: false,
            },
        }
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

    /// Read an object's metadata (blocking: call from a blocking task).
    pub fn meta_blocking(&self, id: ObjectId) -> Result<(ObjectMeta, Arc<Dek>), SpoolError> {
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
        Ok((meta, dek))
    }

    /// Open an object for reading.
    pub async fn open_object(&self, id: ObjectId) -> Result<ObjectReader, SpoolError> {
        fault!(
            self.inner,
            "spool::read::open",
            Err(SpoolError::Internal(
                "fault injected: the spool cannot read".into()
            ))
        );
        let (meta, dek) = self.meta(id).await?;
        let aad = ObjectMeta::identity_aad(&id, &meta.resolved());
        Ok(ObjectReader {
            spool: self.clone(),
            dek,
            aad: Arc::new(aad),
            meta,
            next: 0,
            done: false,
            resend_seq: None,
        })
    }

    /// Get (creating if `create`) the DEK of a study, by its key id: from the cache, or
    /// unwrapped from its stored form (and cached).
    fn study_key(&self, kid: [u8; 16], create: bool) -> Result<Arc<Dek>, SpoolError> {
        if let Some(d) = self
            .inner
            .dek_cache
            .lock()
            .ok()
            .and_then(|mut c| c.get(&kid))
        {
            return Ok(d);
        }
        let dek = Arc::new(self.load_study_key(kid, create)?);
        if let Ok(mut c) = self.inner.dek_cache.lock() {
            c.put(kid, dek.clone());
        }
        Ok(dek)
    }

    /// Forget a study key from the cache (it is being deleted).
    fn uncache_key(&self, kid: &[u8; 16]) {
        if let Ok(mut c) = self.inner.dek_cache.lock() {
            c.remove(kid);
        }
    }

    fn load_study_key(&self, kid: [u8; 16], create: bool) -> Result<Dek, SpoolError> {
        let s = &self.inner.store;
        if let Some(w) = s.get(Cf::Keys, &kid)? {
            self.inner.kek_ops.unwrap.fetch_add(1, Ordering::Relaxed);
            return self.inner.kek.unwrap(&w, &kid).map_err(SpoolError::Key);
        }
        if !create {
            return Err(SpoolError::Corrupt(
                ObjectId([0; 16]),
                "study key missing".into(),
            ));
        }
        let _g = self.commit_lock()?;
        if let Some(w) = s.get(Cf::Keys, &kid)? {
            self.inner.kek_ops.unwrap.fetch_add(1, Ordering::Relaxed);
            return self.inner.kek.unwrap(&w, &kid).map_err(SpoolError::Key);
        }
        let dek = Dek::generate().map_err(SpoolError::Key)?;
        let wrapped = self.inner.kek.wrap(&dek, &kid).map_err(SpoolError::Key)?;
        let mut b = s.batch();
        b.put(Cf::Keys, &kid, &wrapped);
        s.commit(b, true)?;
        self.inner.kek_ops.wrap.fetch_add(1, Ordering::Relaxed);
        Ok(dek)
    }

    /// The dedup key of a transfer from `peer` with the sender's transfer id.
    pub fn dedup_key(&self, peer: &str, transfer_id: &str) -> DedupKey {
        let mut v = peer.as_bytes().to_vec();
        v.push(0);
        v.extend_from_slice(transfer_id.as_bytes());
        DedupKey(self.inner.index.id("link-transfer", &v))
    }

    /// The dedup key of an HL7 message from a sender: its listener, MSH-3/MSH-4 (sending
    /// application and facility) and MSH-10 (control id), as a keyed hash.
    pub fn message_dedup_key(&self, listener: &str, sender: &str, control_id: &str) -> DedupKey {
        let mut v = listener.as_bytes().to_vec();
        v.push(0);
        v.extend_from_slice(sender.as_bytes());
        v.push(0);
        v.extend_from_slice(control_id.as_bytes());
        DedupKey(self.inner.index.id("hl7-message", &v))
    }

    /// Look a transfer up.
    pub fn dedup_state(&self, key: DedupKey, digest: &[u8; 32]) -> Result<DedupState, SpoolError> {
        match self.inner.store.get(Cf::Dedup, &key.0)? {
            None => Ok(DedupState::New),
            Some(v) => {
                let Some((stored, stored_at)) = parse_dedup(&v) else {
                    // Unreadable: treat as unknown rather than refuse the transfer.
                    return Ok(DedupState::New);
                };
                if now_ms().saturating_sub(stored_at) > self.inner.dedup_window.as_millis() as u64 {
                    return Ok(DedupState::New);
                }
                let same = match stored {
                    DedupDigest::Keyed(mac) => ct_eq(&mac, &self.dedup_mac(key, digest)),
                    DedupDigest::Legacy(d) => ct_eq(&d, digest),
                };
                Ok(if same {
                    DedupState::Identical
                } else {
                    DedupState::Conflict
                })
            }
        }
    }

    /// What a dedup record keeps of a transfer's digest: a MAC under the index key, bound
    /// to the transfer, so that the disk never holds the SHA-256 of an object (which would
    /// confirm that a known image passed through).
    fn dedup_mac(&self, key: DedupKey, digest: &[u8; 32]) -> [u8; 16] {
        let mut v = key.0.to_vec();
        v.extend_from_slice(digest);
        self.inner.index.id("dedup-digest", &v)
    }

    /// Delete the dedup records older than the dedup window (as if the time were `now`, ms
    /// since the epoch). Unsynced: a deletion lost in a crash is done again at the next
    /// sweep. Returns how many were deleted.
    pub fn expire_dedup_blocking(&self, now: u64) -> Result<usize, SpoolError> {
        let s = &self.inner.store;
        let window = self.inner.dedup_window.as_millis() as u64;
        let mut b = s.batch();
        let mut n = 0;
        for (k, v) in s.scan_prefix(Cf::Dedup, &[], usize::MAX)? {
            let expired = parse_dedup(&v).is_none_or(|(_, at)| now.saturating_sub(at) > window);
            if expired {
                b.delete(Cf::Dedup, &k);
                n += 1;
            }
        }
        if n > 0 {
            s.commit(b, false)?;
        }
        Ok(n)
    }

    /// Mark an object delivered to `dest`. Deletes the object once no destination waits for
    /// it. Synced.
    pub async fn complete(&self, dest: &str, entry: QueueEntry) -> Result<bool, SpoolError> {
        let spool = self.clone();
        let dest = dest.to_owned();
        blocking(move || spool.remove_entry_blocking(&dest, entry, false, true)).await
    }

    /// Remove `dest`'s queue entry (its failure record too); when no other destination
    /// waits for the object, delete it, or, when it was `delivered` and the spool retains
    /// delivered objects, put it in the retention index. With `shred_study`, a deleted
    /// object's study key goes too when no object of the study is left. Returns whether the
    /// object was deleted.
    fn remove_entry_blocking(
        &self,
        dest: &str,
        entry: QueueEntry,
        shred_study: bool,
        delivered: bool,
    ) -> Result<bool, SpoolError> {
        let s = &self.inner.store;
        let _g = self.commit_lock()?;
        let id = entry.object;
        let qk = queue_key(dest, entry.seq);
        let mut shredded = 0;
        let mut b = s.batch();
        b.delete(Cf::Queue, &qk);
        b.delete(Cf::Fail, &qk);
        b.delete(Cf::Refs, &ref_key(&id, dest));
        let others = s
            .scan_prefix(Cf::Refs, &id.0, 2)?
            .into_iter()
            .filter(|(k, _)| k[16..] != *dest.as_bytes())
            .count();
        let retain = delivered && !self.inner.retention.is_zero();
        if retain {
            b.put(Cf::Done, &ref_key(&id, dest), &now_ms().to_be_bytes());
        }
        let deleted = others == 0 && !retain;
        if others == 0 && retain {
            let expiry = now_ms().saturating_add(self.inner.retention.as_millis() as u64);
            b.put(Cf::Expiry, &expiry_key(expiry, &id), &[]);
        }
        if deleted {
            b.delete_range(Cf::Done, &id.0, &id_upper(&id));
            let kid = s
                .get(Cf::Meta, &id.0)?
                .and_then(|v| v.get(1..17).and_then(|k| <[u8; 16]>::try_from(k).ok()));
            b.delete(Cf::Meta, &id.0);
            b.delete_range(Cf::Seg, &seg_key(&id, 0), &seg_key(&id, u64::MAX));
            if shred_study && let Some(kid) = kid {
                let study_left = s
                    .scan_prefix(Cf::Meta, &[], usize::MAX)?
                    .iter()
                    .any(|(k, v)| k[..] != id.0[..] && v.get(1..17) == Some(&kid[..]));
                // A key a writer holds stays; the unused-key sweep takes it later.
                if !study_left && !lock_pins(&self.inner.pins).held.contains_key(&kid) {
                    b.delete(Cf::Keys, &kid);
                    self.uncache_key(&kid);
                    shredded = 1;
                }
            }
        }
        self.commit_batch(b)?;
        self.inner
            .kek_ops
            .shred
            .fetch_add(shredded, Ordering::Relaxed);
        Ok(deleted)
    }

    /// The failure record of `dest`'s entry `seq`, if it failed before.
    pub fn failure(&self, dest: &str, seq: u64) -> Result<Option<FailureRecord>, SpoolError> {
        Ok(self
            .inner
            .store
            .get(Cf::Fail, &queue_key(dest, seq))?
            .and_then(|v| FailureRecord::decode(&v)))
    }

    /// Record a failed attempt (unsynced: losing the last record in a crash costs one
    /// extra attempt, never an object).
    pub async fn record_failure(
        &self,
        dest: &str,
        seq: u64,
        record: &FailureRecord,
    ) -> Result<(), SpoolError> {
        let spool = self.clone();
        let key = queue_key(dest, seq);
        let value = record.encode();
        blocking(move || Ok(spool.inner.store.put_unsynced(Cf::Fail, &key, &value)?)).await
    }

    /// Make `dest`'s entry a dead letter, with its failure record. Synced.
    pub async fn dead_letter(
        &self,
        dest: &str,
        entry: QueueEntry,
        record: &FailureRecord,
    ) -> Result<(), SpoolError> {
        let spool = self.clone();
        let key = queue_key(dest, entry.seq);
        let value = record.encode();
        blocking(move || {
            let s = &spool.inner.store;
            let mut v = entry.object.0.to_vec();
            v.push(
                QueueEntry {
                    state: EntryState::Dead,
                    ..entry
                }
                .flags(),
            );
            let mut b = s.batch();
            b.put(Cf::Queue, &key, &v);
            b.put(Cf::Fail, &key, &value);
            spool.commit_batch(b)
        })
        .await
    }

    /// Put a dead letter back in its queue with a fresh retry budget. Synced; the
    /// destination's dispatcher hears of it at once.
    pub async fn replay(&self, dest: &str, entry: QueueEntry) -> Result<(), SpoolError> {
        let spool = self.clone();
        let key = queue_key(dest, entry.seq);
        let d = dest.to_owned();
        blocking(move || {
            let s = &spool.inner.store;
            let mut v = entry.object.0.to_vec();
            v.push(
                QueueEntry {
                    state: EntryState::Queued,
                    ..entry
                }
                .flags(),
            );
            // A fresh budget: no attempts, and max_age counts from now, not from the
            // object's reception (which may be far past max_age by now).
            let fresh = FailureRecord::fresh_from_now();
            let mut b = s.batch();
            b.put(Cf::Queue, &key, &v);
            b.put(Cf::Fail, &key, &fresh.encode());
            spool.commit_batch(b)?;
            let mut q = spool.queued_blocking(QueueEntry {
                state: EntryState::Queued,
                ..entry
            });
            q.budget_from_ms = fresh.budget_from_ms;
            spool.notify(&d, QueueEvent::Added(q));
            Ok(())
        })
        .await
    }

    /// Delete `dest`'s entry for good, and the object (and its study key, when nothing of
    /// the study is left) once no other destination waits for it. Synced.
    pub async fn purge(&self, dest: &str, entry: QueueEntry) -> Result<bool, SpoolError> {
        let spool = self.clone();
        let dest = dest.to_owned();
        blocking(move || {
            let deleted = spool.remove_entry_blocking(&dest, entry, true, false)?;
            spool.notify(&dest, QueueEvent::Removed(entry.seq));
            Ok(deleted)
        })
        .await
    }

    /// The retained (delivered, kept for `[spool] retention`) objects: each one's id, expiry
    /// (ms since the epoch) and the destinations it was delivered to.
    pub fn retained_blocking(&self) -> Result<Vec<Retained>, SpoolError> {
        let s = &self.inner.store;
        let mut out = Vec::new();
        for k in s.scan_keys(Cf::Expiry)? {
            let (Some(expiry), Some(id)) = (
                k.get(..8)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(u64::from_be_bytes),
                k.get(8..24).and_then(|b| <[u8; 16]>::try_from(b).ok()),
            ) else {
                continue;
            };
            let id = ObjectId(id);
            let destinations = s
                .scan_prefix(Cf::Done, &id.0, usize::MAX)?
                .iter()
                .filter_map(|(k, _)| std::str::from_utf8(k.get(16..)?).ok().map(str::to_owned))
                .collect();
            out.push(Retained {
                object: id,
                expires_at_ms: expiry,
                destinations,
            });
        }
        Ok(out)
    }

    /// Number of retained objects.
    pub fn retained_count(&self) -> Result<usize, SpoolError> {
        Ok(self.inner.store.scan_keys(Cf::Expiry)?.len())
    }

    /// Queue the retained objects of study `study_uid` again, each for the destinations it
    /// was delivered to that `wanted` accepts (the caller passes the configured ones, or
    /// the one an operator named). Each becomes a fresh queue entry marked as a resend (a
    /// new transfer for the next hop) and leaves the retention index until it is delivered
    /// again. Synced; the dispatchers hear of it at once. Returns what was queued.
    pub async fn resend_study(
        &self,
        study_uid: String,
        wanted: impl Fn(&str) -> bool + Send + 'static,
    ) -> Result<Vec<Resent>, SpoolError> {
        let spool = self.clone();
        blocking(move || {
            // Find the study's objects by their sealed metadata, without the lock.
            let mut found = Vec::new();
            for r in spool.retained_blocking()? {
                let Ok((meta, _)) = spool.meta_blocking(r.object) else {
                    continue;
                };
                if meta.study_uid == study_uid && !meta.is_hl7() {
                    let dests: Vec<String> =
                        r.destinations.into_iter().filter(|d| wanted(d)).collect();
                    if !dests.is_empty() {
                        found.push((
                            r.object,
                            r.expires_at_ms,
                            dests,
                            meta.length,
                            meta.received_at_ms,
                        ));
                    }
                }
            }
            let tag = study_tag(&study_uid);
            let s = &spool.inner.store;
            let _g = spool.commit_lock()?;
            let mut b = s.batch();
            let mut out = Vec::new();
            let mut events = Vec::new();
            // A resend is new work: its budget counts from now, stored with the entry.
            let fresh = FailureRecord::fresh_from_now();
            let fresh_value = fresh.encode();
            for (id, expiry, dests, length, received_at_ms) in found {
                let ek = expiry_key(expiry, &id);
                // Expired or resent meanwhile.
                if s.get(Cf::Expiry, &ek)?.is_none() {
                    continue;
                }
                b.delete(Cf::Expiry, &ek);
                for dest in &dests {
                    let seq = spool.inner.next_seq.fetch_add(1, Ordering::SeqCst);
                    let entry = QueueEntry {
                        seq,
                        object: id,
                        state: EntryState::Queued,
                        resend: true,
                    };
                    let mut qv = id.0.to_vec();
                    qv.push(entry.flags());
                    b.put(Cf::Queue, &queue_key(dest, seq), &qv);
                    b.put(Cf::Fail, &queue_key(dest, seq), &fresh_value);
                    b.put(Cf::Refs, &ref_key(&id, dest), &seq.to_be_bytes());
                    events.push((
                        dest.clone(),
                        Queued {
                            entry,
                            length,
                            received_at_ms,
                            budget_from_ms: fresh.budget_from_ms,
                            study: tag,
                            serial: false,
                        },
                    ));
                }
                out.push(Resent {
                    object: id,
                    destinations: dests,
                });
            }
            spool.commit_batch(b)?;
            for (dest, q) in events {
                spool.notify(&dest, QueueEvent::Added(q));
            }
            Ok(out)
        })
        .await
    }

    /// Delete the retained copies of study `study_uid` now (an operator's purge), and the
    /// study key when nothing of the study is left. Synced. Returns how many were deleted.
    pub async fn purge_retained_study(&self, study_uid: String) -> Result<usize, SpoolError> {
        let spool = self.clone();
        blocking(move || {
            let mut found = Vec::new();
            for r in spool.retained_blocking()? {
                if let Ok((meta, _)) = spool.meta_blocking(r.object)
                    && meta.study_uid == study_uid
                {
                    found.push((r.object, r.expires_at_ms));
                }
            }
            let s = &spool.inner.store;
            let _g = spool.commit_lock()?;
            let mut b = s.batch();
            let mut ids = Vec::new();
            for (id, expiry) in found {
                let ek = expiry_key(expiry, &id);
                // Resent (queued again) or expired meanwhile: not a retained copy any more.
                if s.get(Cf::Expiry, &ek)?.is_some() {
                    b.delete(Cf::Expiry, &ek);
                    ids.push(id);
                }
            }
            if ids.is_empty() {
                return Ok(0);
            }
            spool.forget_objects(&mut b, &ids)?;
            spool.commit_batch(b)?;
            Ok(ids.len())
        })
        .await
    }

    /// Delete the retained objects whose retention has run out (and each study key whose
    /// study has nothing left), at most `limit`. Synced. Returns how many were deleted.
    pub async fn expire_retained(&self, limit: usize) -> Result<usize, SpoolError> {
        self.expire_retained_at(now_ms(), limit).await
    }

    /// [`Spool::expire_retained`] as if the time were `now` (ms since the epoch).
    async fn expire_retained_at(&self, now: u64, limit: usize) -> Result<usize, SpoolError> {
        let spool = self.clone();
        blocking(move || {
            let mut done = 0;
            while done < limit {
                let s = &spool.inner.store;
                let _g = spool.commit_lock()?;
                let due: Vec<Box<[u8]>> = s
                    .scan_prefix(Cf::Expiry, &[], EXPIRE_BATCH.min(limit - done))?
                    .into_iter()
                    .map(|(k, _)| k)
                    .take_while(|k| {
                        k.get(..8)
                            .and_then(|b| <[u8; 8]>::try_from(b).ok())
                            .is_some_and(|e| u64::from_be_bytes(e) <= now)
                    })
                    .collect();
                if due.is_empty() {
                    break;
                }
                let ids: Vec<ObjectId> = due
                    .iter()
                    .filter_map(|k| k.get(8..24).and_then(|b| <[u8; 16]>::try_from(b).ok()))
                    .map(ObjectId)
                    .collect();
                let mut b = s.batch();
                for k in &due {
                    b.delete(Cf::Expiry, k);
                }
                spool.forget_objects(&mut b, &ids)?;
                spool.commit_batch(b)?;
                done += due.len();
            }
            if done > 0 {
                info!(
                    objects = done,
                    "retention: deleted delivered objects past `spool.retention`"
                );
            }
            Ok(done)
        })
        .await
    }

    /// Add to `b` the deletion of `ids` (metadata, segments, delivery records), and of each
    /// of their study keys that no other object uses. Call with the commit lock held.
    fn forget_objects(&self, b: &mut rocks::Batch<'_>, ids: &[ObjectId]) -> Result<(), SpoolError> {
        let s = &self.inner.store;
        let gone: std::collections::HashSet<[u8; 16]> = ids.iter().map(|i| i.0).collect();
        let mut kids = std::collections::HashSet::new();
        for id in ids {
            if let Some(kid) = s
                .get(Cf::Meta, &id.0)?
                .and_then(|v| v.get(1..17).and_then(|k| <[u8; 16]>::try_from(k).ok()))
            {
                kids.insert(kid);
            }
            b.delete(Cf::Meta, &id.0);
            b.delete_range(Cf::Seg, &seg_key(id, 0), &seg_key(id, u64::MAX));
            b.delete_range(Cf::Done, &id.0, &id_upper(id));
        }
        // One pass over the metadata: the study keys still in use by another object.
        for (k, v) in s.scan_prefix(Cf::Meta, &[], usize::MAX)? {
            let Some(key) = <[u8; 16]>::try_from(&k[..]).ok() else {
                continue;
            };
            if gone.contains(&key) {
                continue;
            }
            if let Some(kid) = v.get(1..17).and_then(|k| <[u8; 16]>::try_from(k).ok()) {
                kids.remove(&kid);
            }
        }
        // A key that a writer holds stays (its object would be sealed under a deleted key);
        // the unused-key sweep takes it once nothing holds or uses it.
        let pins = lock_pins(&self.inner.pins);
        for kid in kids {
            if pins.held.contains_key(&kid) {
                continue;
            }
            b.delete(Cf::Keys, &kid);
            self.uncache_key(&kid);
        }
        Ok(())
    }

    /// Delete every study key that no stored object uses and no writer holds (synced).
    /// Returns how many were deleted.
    ///
    /// The metadata is scanned without the commit lock, so that acknowledgements do not
    /// wait on it; a commit that the scan missed marks its key `touched`, and touched keys
    /// are kept until the next sweep.
    pub fn shred_unused_keys_blocking(&self) -> Result<usize, SpoolError> {
        let used = self.used_keys_blocking()?;
        self.shred_keys_except_blocking(&used)
    }

    /// The first half of a key sweep: forget what was touched, then scan the metadata for
    /// the keys in use.
    fn used_keys_blocking(&self) -> Result<std::collections::HashSet<[u8; 16]>, SpoolError> {
        {
            let _g = self.commit_lock()?;
            lock_pins(&self.inner.pins).touched.clear();
        }
        let mut used = std::collections::HashSet::new();
        for (_, v) in self.inner.store.scan_prefix(Cf::Meta, &[], usize::MAX)? {
            if let Some(kid) = v.get(1..17).and_then(|k| <[u8; 16]>::try_from(k).ok()) {
                used.insert(kid);
            }
        }
        Ok(used)
    }

    /// The second half: delete the keys neither `used`, held nor touched since the first.
    fn shred_keys_except_blocking(
        &self,
        used: &std::collections::HashSet<[u8; 16]>,
    ) -> Result<usize, SpoolError> {
        let s = &self.inner.store;
        let _g = self.commit_lock()?;
        // Held until the deletion is committed: a writer that pins one of these keys
        // meanwhile waits, then finds it gone and makes a new one.
        let pins = lock_pins(&self.inner.pins);
        let mut b = s.batch();
        let mut shredded = Vec::new();
        for (k, _) in s.scan_prefix(Cf::Keys, &[], usize::MAX)? {
            let Ok(kid) = <[u8; 16]>::try_from(&k[..]) else {
                continue;
            };
            if used.contains(&kid) || pins.held.contains_key(&kid) || pins.touched.contains(&kid) {
                continue;
            }
            b.delete(Cf::Keys, &kid);
            self.uncache_key(&kid);
            shredded.push(kid);
        }
        if shredded.is_empty() {
            return Ok(0);
        }
        self.commit_batch(b)?;
        self.inner
            .kek_ops
            .shred
            .fetch_add(shredded.len() as u64, Ordering::Relaxed);
        // A reader that raced the deletion may have cached one again.
        for kid in &shredded {
            self.uncache_key(kid);
        }
        Ok(shredded.len())
    }

    /// Study keys stored (for status and tests).
    pub fn study_key_count(&self) -> Result<usize, SpoolError> {
        Ok(self.inner.store.scan_keys(Cf::Keys)?.len())
    }

    fn notify(&self, dest: &str, event: QueueEvent) {
        if let Ok(l) = self.inner.listeners.lock()
            && let Some(tx) = l.get(dest)
        {
            let _ = tx.send(event);
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
    committing: bool,
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
            if let Some(key) = dedup {
                match spool.dedup_state(key, &digest)? {
                    DedupState::New => {}
                    DedupState::Identical => return Ok((Committed::Duplicate, Vec::new())),
                    DedupState::Conflict => {
                        return Err(SpoolError::IdentityMismatch("content of this transfer"));
                    }
                }
            }
            // A purge may have shredded the study's key since this writer resolved it: an
            // object sealed under a deleted key could never be read. Refuse; the sender
            // retries, and the retry gets a new key.
            if s.get(Cf::Keys, &kid)?.is_none() {
                spool.uncache_key(&kid);
                return Err(SpoolError::Internal(
                    "the study's key was deleted while this object was received; send it again"
                        .into(),
                ));
            }
            lock_pins(&spool.inner.pins).touched.insert(kid);
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
                        state: EntryState::Queued,
                        resend: false,
                    },
                ));
            }
            if let Some(key) = dedup {
                // Written in the same synced batch as the metadata, after every segment:
                // "already have it" is only ever answered for a whole, durable object.
                let mut v = vec![DEDUP_VERSION];
                v.extend_from_slice(&spool.dedup_mac(key, &digest));
                v.extend_from_slice(&now_ms().to_be_bytes());
                b.put(Cf::Dedup, &key.0, &v);
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

/// Reads an object back, segment by segment, verifying each.
pub struct ObjectReader {
    spool: Spool,
    dek: Arc<Dek>,
    aad: Arc<Vec<u8>>,
    /// The object's metadata.
    pub meta: ObjectMeta,
    next: u64,
    done: bool,
    /// For an operator's resend: the queue entry's sequence, which a link sender puts in
    /// the transfer id so that the next hop stores the object anew (set by the dispatcher).
    pub resend_seq: Option<u64>,
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
                .ok_or(SpoolError::MissingSegment(id, index))?;
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

    /// A fresh reader of the same object, from its first segment.
    pub async fn reopen(&self) -> Result<ObjectReader, SpoolError> {
        self.spool.open_object(self.meta.id).await
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

    /// A temporary directory the spool accepts as its data directory (mode 0700; the
    /// crate's default follows the umask).
    fn private_tempdir() -> tempfile::TempDir {
        use std::os::unix::fs::PermissionsExt as _;
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        d
    }

    fn open(dir: &Path) -> Spool {
        let opts = SpoolOptions {
            segment_bytes: 64 * 1024,
            ..SpoolOptions::default()
        };
        Spool::open(dir, Kek::from_bytes([3; 32]), opts).unwrap()
    }

    /// Issue 11, part 1.1: a spool written under one KEK refuses another KEK at open,
    /// before RocksDB is touched; a directory from before check values gets one.
    #[test]
    fn another_kek_is_refused_at_open_and_old_dirs_get_a_check_value() {
        let dir = private_tempdir();
        drop(open(dir.path()));
        let check = dir.path().join(kek_check::FILE_NAME);
        assert!(check.exists());
        let err = Spool::open(
            dir.path(),
            Kek::from_bytes([4; 32]),
            SpoolOptions::default(),
        )
        .err()
        .expect("another KEK must be refused");
        assert!(
            matches!(
                err,
                SpoolError::KekCheck(kek_check::KekCheckError::Mismatch { .. })
            ),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("does not match the data directory")
        );
        // The right KEK still opens it.
        drop(open(dir.path()));
        // A directory of an older version (no check value) gets one at its first open.
        std::fs::remove_file(&check).unwrap();
        drop(open(dir.path()));
        assert!(check.exists());
        assert!(
            Spool::open(
                dir.path(),
                Kek::from_bytes([4; 32]),
                SpoolOptions::default()
            )
            .is_err()
        );
    }

    fn ingest(o: &DemoObject, routes: &[&str], dedup: Option<DedupKey>) -> Ingest {
        Ingest {
            sop_class: o.sop_class.clone(),
            sop_instance: o.sop_instance.clone(),
            transfer_syntax: o.transfer_syntax.clone(),
            source: "TEST".into(),
            routes: routes.iter().map(|s| s.to_string()).collect(),
            dedup,
            strict_uid_match: false,
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
        let dir = private_tempdir();
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
        let (qx, _) = spool.subscribe("x").await.unwrap();
        let (qy, _) = spool.subscribe("y").await.unwrap();
        assert_eq!((qx.len(), qy.len()), (1, 1));
        assert_eq!(qx[0].length, r.meta.length);
        assert!(!spool.complete("x", qx[0].entry).await.unwrap());
        assert_eq!(spool.object_count().unwrap(), 1);
        assert!(spool.complete("y", qy[0].entry).await.unwrap());
        assert_eq!(spool.object_count().unwrap(), 0);
        assert_eq!(spool.segment_count().unwrap(), 0);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_segment_moved_to_another_object_fails_to_open() {
        let dir = private_tempdir();
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
        // Delivery makes it a dead letter at once: replaying cannot repair our copy.
        let d = crate::deliver::DeliveryError::from_spool(err);
        assert_eq!((d.kind(), d.reason()), ("permanent", "integrity"), "{d}");
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
        assert!(
            matches!(err, SpoolError::MissingSegment(id, i) if id == ib && i == last),
            "{err}"
        );
        let d = crate::deliver::DeliveryError::from_spool(err);
        assert_eq!((d.kind(), d.reason()), ("permanent", "missing_data"), "{d}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_interrupted_ingest_is_removed_at_the_next_open() {
        let dir = private_tempdir();
        {
            let spool = open(dir.path());
            let o = generate_object("1.2.3", "1.2.3.1", 1, "CRASH^MID", 400_000).unwrap();
            let mut w = spool.writer(ingest(&o, &["x"], None)).unwrap();
            w.write(&o.dataset[..300_000]).await.unwrap();
            assert!(spool.segment_count().unwrap() > 0);
            // A crash: the writer's cleanup never runs.
            w.committing = true;
            drop(w);
        }
        let spool = open(dir.path());
        assert_eq!(spool.segment_count().unwrap(), 0);
        assert_eq!(spool.object_count().unwrap(), 0);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn link_transfers_deduplicate_and_refuse_conflicts() {
        let dir = private_tempdir();
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
            .open_object(spool.subscribe("x").await.unwrap().0[0].entry.object)
            .await
            .unwrap();
        assert_eq!(spool.segment_count().unwrap() as u64, stored.meta.segments);
        // The disk never holds the object's SHA-256 (it would confirm a known image).
        let digest = stored.meta.digest;
        drop(stored);
        spool.flush_blocking().unwrap();
        let mut hits = Vec::new();
        for e in std::fs::read_dir(dir.path()).unwrap().flatten() {
            let raw = std::fs::read(e.path()).unwrap_or_default();
            if raw.windows(32).any(|w| w == &digest[..]) {
                hits.push(e.path());
            }
        }
        assert!(
            hits.is_empty(),
            "the plaintext digest is on disk in {hits:?}"
        );
        // Records expire after the dedup window, and a re-send is then stored anew.
        assert_eq!(spool.expire_dedup_blocking(now_ms()).unwrap(), 0);
        let later = now_ms() + 8 * 24 * 3600 * 1000;
        assert_eq!(spool.expire_dedup_blocking(later).unwrap(), 1);
        assert!(matches!(
            spool.dedup_state(key, &digest).unwrap(),
            DedupState::New
        ));
    }

    #[test]
    fn the_key_cache_is_bounded() {
        let mut c = DekCache::default();
        for i in 0..(DekCache::MAX + 10) {
            let mut kid = [0u8; 16];
            kid[..8].copy_from_slice(&(i as u64).to_be_bytes());
            c.put(kid, Arc::new(Dek::generate().unwrap()));
        }
        assert_eq!(c.len(), DekCache::MAX);
        // The oldest went first.
        assert!(c.get(&[0u8; 16]).is_none());
        let mut last = [0u8; 16];
        last[..8].copy_from_slice(&((DekCache::MAX + 9) as u64).to_be_bytes());
        assert!(c.get(&last).is_some());
        c.remove(&last);
        assert!(c.get(&last).is_none());
    }

    #[test]
    fn dedup_records_of_the_old_format_are_still_read() {
        let dir = private_tempdir();
        let spool = open(dir.path());
        let key = spool.dedup_key("site-a", "<old@site-a>");
        let digest = [7u8; 32];
        let mut v = digest.to_vec();
        v.extend_from_slice(&now_ms().to_be_bytes());
        spool
            .inner
            .store
            .put_unsynced(Cf::Dedup, &key.0, &v)
            .unwrap();
        assert!(matches!(
            spool.dedup_state(key, &digest).unwrap(),
            DedupState::Identical
        ));
        assert!(matches!(
            spool.dedup_state(key, &[8; 32]).unwrap(),
            DedupState::Conflict
        ));
    }

    /// Every segment of every stored object, and nothing else: the spool is whole.
    async fn assert_whole(spool: &Spool) -> usize {
        spool.quiesce().await;
        let mut segments = 0;
        for (k, _) in spool
            .inner
            .store
            .scan_prefix(Cf::Meta, &[], usize::MAX)
            .unwrap()
        {
            let id = ObjectId(<[u8; 16]>::try_from(&k[..]).unwrap());
            let mut r = spool.open_object(id).await.unwrap();
            r.read_all()
                .await
                .unwrap_or_else(|e| panic!("a committed object does not read back: {e}"));
            segments += r.meta.segments as usize;
        }
        assert_eq!(
            spool.segment_count().unwrap(),
            segments,
            "segments that belong to no committed object"
        );
        assert_eq!(
            spool
                .inner
                .store
                .scan_prefix(Cf::Ingest, &[], 10)
                .unwrap()
                .len(),
            0,
            "ingest markers left behind"
        );
        spool.object_count().unwrap()
    }

    /// Pause the first thread that reaches fault point `name`, report it, and hold it until
    /// released. Returns (reached, release).
    fn pause_at(name: &str) -> (std::sync::mpsc::Receiver<()>, std::sync::mpsc::Sender<()>) {
        let (reached_tx, reached) = std::sync::mpsc::channel();
        let (release, release_rx) = std::sync::mpsc::channel::<()>();
        let reached_tx = Mutex::new(Some(reached_tx));
        let release_rx = Mutex::new(release_rx);
        fail::cfg_callback(name, move || {
            let first = reached_tx.lock().unwrap().take();
            if let Some(tx) = first {
                let _ = tx.send(());
                let _ = release_rx.lock().unwrap().recv();
            }
        })
        .unwrap();
        (reached, release)
    }

    fn open_with_faults(dir: &Path) -> Spool {
        let opts = SpoolOptions {
            segment_bytes: 64 * 1024,
            failpoints: true,
            ..SpoolOptions::default()
        };
        Spool::open(dir, Kek::from_bytes([3; 32]), opts).unwrap()
    }

    /// The regression test of the lost acknowledged object: a link request whose future is
    /// dropped (a client reset) at each step of its commit, then retried by the sender.
    /// Afterwards the spool holds the object exactly once, whole, and nothing else.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_commit_cancelled_at_any_step_then_retried_stores_the_object_once() {
        let _scenario = fail::FailScenario::setup();
        for point in [
            "spool::write::put",
            "spool::commit::batch",
            "spool::commit::synced",
        ] {
            let dir = private_tempdir();
            let spool = open_with_faults(dir.path());
            let o = generate_object("1.2.3", "1.2.3.1", 7, "CANCEL^ME", 300_000).unwrap();
            let key = spool.dedup_key("site-a", "<cancel@site-a>");
            let send = |spool: Spool| {
                let ing = ingest(&o, &["pacs"], Some(key));
                let data = o.dataset.clone();
                async move {
                    let mut w = spool.writer(ing).unwrap();
                    for c in data.chunks(50_000) {
                        w.write(c).await?;
                    }
                    w.commit().await
                }
            };
            let (reached, release) = pause_at(point);
            let request = tokio::spawn(send(spool.clone()));
            // The premise: the request really is inside that step when it is cancelled.
            tokio::task::spawn_blocking(move || {
                reached
                    .recv_timeout(Duration::from_secs(20))
                    .expect("the fault point was not reached")
            })
            .await
            .unwrap();
            request.abort();
            assert!(request.await.unwrap_err().is_cancelled(), "{point}");
            fail::remove(point);
            release.send(()).unwrap();
            assert_whole(&spool).await;
            // The sender retries the same transfer.
            let retried = send(spool.clone()).await.unwrap();
            assert!(
                matches!(retried, Committed::Stored(_) | Committed::Duplicate),
                "{point}: {retried:?}"
            );
            assert_eq!(
                assert_whole(&spool).await,
                1,
                "{point}: stored exactly once"
            );
            let (q, _) = spool.subscribe("pacs").await.unwrap();
            assert_eq!(q.len(), 1, "{point}: queued exactly once");
            let mut r = spool.open_object(q[0].entry.object).await.unwrap();
            let all = r.read_all().await.unwrap();
            assert_eq!(
                &all[r.meta.dataset_offset as usize..],
                &o.dataset[..],
                "{point}"
            );
        }
    }

    /// A write cancelled while its segment put is in the blocking pool leaves no orphan
    /// segment once the put lands.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_write_cancelled_mid_put_leaves_no_orphan() {
        let _scenario = fail::FailScenario::setup();
        let dir = private_tempdir();
        let spool = open_with_faults(dir.path());
        let o = generate_object("1.2.3", "1.2.3.1", 8, "ORPHAN^X", 400_000).unwrap();
        let (reached, release) = pause_at("spool::write::put");
        let ing = ingest(&o, &["x"], None);
        let data = o.dataset.clone();
        let s2 = spool.clone();
        let request = tokio::spawn(async move {
            let mut w = s2.writer(ing).unwrap();
            for c in data.chunks(100_000) {
                w.write(c).await.unwrap();
            }
        });
        tokio::task::spawn_blocking(move || {
            reached
                .recv_timeout(Duration::from_secs(20))
                .expect("the fault point was not reached")
        })
        .await
        .unwrap();
        // Hear of the cleanup if it starts. It must not start while the put is pending: give
        // it half a second to show it would (a cleanup that does not wait always does).
        let (cleanup_tx, cleanup_rx) = std::sync::mpsc::channel();
        let cleanup_tx = Mutex::new(cleanup_tx);
        fail::cfg_callback("spool::discard", move || {
            let _ = cleanup_tx.lock().unwrap().send(());
        })
        .unwrap();
        request.abort();
        let _ = request.await;
        let early = tokio::task::spawn_blocking(move || {
            let early = cleanup_rx.recv_timeout(Duration::from_millis(500)).is_ok();
            (early, cleanup_rx)
        })
        .await
        .unwrap();
        assert!(
            !early.0,
            "the cleanup ran while a segment put was still pending"
        );
        fail::remove("spool::write::put");
        release.send(()).unwrap();
        early
            .1
            .recv_timeout(Duration::from_secs(20))
            .expect("the cleanup runs once the put has landed");
        fail::remove("spool::discard");
        assert_eq!(assert_whole(&spool).await, 0);
        assert_eq!(spool.segment_count().unwrap(), 0);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn orphan_segments_are_removed_and_counted_at_the_next_open() {
        let dir = private_tempdir();
        let kept;
        {
            let spool = open(dir.path());
            let a = generate_object("1.2.3", "1.2.3.1", 1, "KEEP^A", 200_000).unwrap();
            kept = store(&spool, &a, &["x"]).await;
            // Segments of objects with neither metadata nor an ingest marker, before, between
            // and after the live object's keys.
            for first in [0x00u8, 0x7f, 0xff] {
                let mut id = [first; 16];
                id[15] = 1;
                for i in 0..3 {
                    spool
                        .inner
                        .store
                        .put_unsynced(Cf::Seg, &seg_key(&ObjectId(id), i), &[1u8; 5000])
                        .unwrap();
                }
            }
        }
        let spool = open(dir.path());
        assert_eq!(spool.recovery().orphans, 3);
        assert_eq!(assert_whole(&spool).await, 1);
        assert!(spool.open_object(kept).await.is_ok());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_uid_mismatch_is_stored_under_the_data_sets_uids_unless_strict() {
        let dir = private_tempdir();
        let spool = open(dir.path());
        let o = generate_object("1.2.3", "1.2.3.1", 9, "MISMATCH^X", 10_000).unwrap();
        let mut ing = ingest(&o, &["x"], None);
        ing.sop_instance = "1.2.3.999".into();
        let mut w = spool.writer(ing.clone()).unwrap();
        w.write(&o.dataset).await.unwrap();
        w.finish_identity().await.unwrap();
        assert!(w.uid_mismatch());
        let Committed::Stored(id) = w.commit().await.unwrap() else {
            panic!("not stored")
        };
        let mut r = spool.open_object(id).await.unwrap();
        assert_eq!(r.meta.sop_instance_uid, o.sop_instance);
        let all = r.read_all().await.unwrap();
        let header = dataset::parse_part10_header(&all).unwrap().unwrap();
        assert_eq!(
            header.sop_instance, o.sop_instance,
            "the Part-10 header follows"
        );
        assert_eq!(&all[header.dataset_offset..], &o.dataset[..]);
        ing.strict_uid_match = true;
        let mut w = spool.writer(ing).unwrap();
        let r = match w.write(&o.dataset).await {
            Ok(()) => w.commit().await.map(|_| ()),
            Err(e) => Err(e),
        };
        assert!(
            matches!(r, Err(SpoolError::IdentityMismatch("SOP Instance UID"))),
            "{r:?}"
        );
        assert_eq!(assert_whole(&spool).await, 1);
    }

    #[test]
    fn the_data_directory_is_created_private_and_an_open_one_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = private_tempdir();
        // Created 0700 (parents too), whatever the umask.
        let dir = tmp.path().join("a/b/spool");
        drop(open(&dir));
        for d in [&dir, &tmp.path().join("a/b")] {
            let mode = std::fs::metadata(d).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", d.display());
        }
        // Others may read: refused, naming the fix; nothing is opened.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = Spool::open(&dir, Kek::from_bytes([3; 32]), SpoolOptions::default())
            .err()
            .expect("an open data directory must be refused");
        assert!(
            matches!(e, SpoolError::DataDirPermissions { mode: 0o755, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("chmod 700"), "{e}");
        // Group access for the process's own group (fsGroup) is allowed.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o770)).unwrap();
        drop(open(&dir));
        let own = rustix::process::getegid().as_raw();
        assert!(data_dir_mode_allowed(0o2770, own, own));
        assert!(!data_dir_mode_allowed(0o750, own.wrapping_add(1), own));
        assert!(!data_dir_mode_allowed(0o701, own, own));
        assert!(data_dir_mode_allowed(0o700, own.wrapping_add(1), own));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn retention_keeps_delivered_objects_for_a_resend_then_expires_them() {
        let dir = private_tempdir();
        let opts = SpoolOptions {
            segment_bytes: 64 * 1024,
            retention: Duration::from_secs(3600),
            ..SpoolOptions::default()
        };
        let spool = Spool::open(dir.path(), Kek::from_bytes([3; 32]), opts.clone()).unwrap();
        let a = generate_object("1.2.7", "1.2.7.1", 1, "KEEP^A", 150_000).unwrap();
        let b = generate_object("1.2.7", "1.2.7.1", 2, "KEEP^B", 10_000).unwrap();
        let other = generate_object("1.2.8", "1.2.8.1", 1, "KEEP^C", 10_000).unwrap();
        let ida = store(&spool, &a, &["x", "y"]).await;
        let idb = store(&spool, &b, &["x"]).await;
        let idc = store(&spool, &other, &["x"]).await;
        let (qx, _rx) = spool.subscribe("x").await.unwrap();
        let (qy, mut ry) = spool.subscribe("y").await.unwrap();
        for (dest, q) in qx
            .iter()
            .map(|q| ("x", q))
            .chain(qy.iter().map(|q| ("y", q)))
        {
            assert!(!q.entry.resend);
            spool.complete(dest, q.entry).await.unwrap();
        }
        // Delivered everywhere, and kept.
        assert_eq!(
            spool.queue_len("x").unwrap() + spool.queue_len("y").unwrap(),
            0
        );
        assert_eq!(spool.object_count().unwrap(), 3);
        assert_eq!(spool.retained_count().unwrap(), 3);
        let kept = spool.retained_blocking().unwrap();
        let of_a = kept.iter().find(|r| r.object == ida).unwrap();
        assert_eq!(of_a.destinations, vec!["x".to_owned(), "y".to_owned()]);
        // A sweep now deletes nothing.
        assert_eq!(spool.expire_retained(100).await.unwrap(), 0);

        // Resend study 1.2.7 to y only: object a (b never went to y).
        let resent = spool
            .resend_study("1.2.7".into(), |d| d == "y")
            .await
            .unwrap();
        assert_eq!(
            resent,
            vec![Resent {
                object: ida,
                destinations: vec!["y".into()]
            }]
        );
        let Ok(QueueEvent::Added(q)) = ry.try_recv() else {
            panic!("the dispatcher hears of a resend")
        };
        assert!(q.entry.resend && q.entry.object == ida);
        // Stored as a resend (a restart remembers it), and no longer in the index.
        drop(spool);
        let spool = Spool::open(dir.path(), Kek::from_bytes([3; 32]), opts).unwrap();
        let (qy, _ry) = spool.subscribe("y").await.unwrap();
        assert_eq!(qy.len(), 1);
        assert!(qy[0].entry.resend, "the resend flag survives a restart");
        assert_eq!(spool.retained_count().unwrap(), 2);
        // A dead letter and its replay keep the flag.
        spool
            .dead_letter("y", qy[0].entry, &FailureRecord::default())
            .await
            .unwrap();
        let (qy, _ry) = spool.subscribe("y").await.unwrap();
        assert!(qy[0].entry.resend && qy[0].entry.state == EntryState::Dead);
        spool.replay("y", qy[0].entry).await.unwrap();
        let (qy, _ry) = spool.subscribe("y").await.unwrap();
        assert!(qy[0].entry.resend && qy[0].entry.state == EntryState::Queued);
        // Resending again while it is queued finds nothing more of the study for y.
        assert!(
            spool
                .resend_study("1.2.7".into(), |d| d == "y")
                .await
                .unwrap()
                .is_empty()
        );
        spool.complete("y", qy[0].entry).await.unwrap();
        assert_eq!(
            spool.retained_count().unwrap(),
            3,
            "retained again after delivery"
        );
        let mut r = spool.open_object(ida).await.unwrap();
        let all = r.read_all().await.unwrap();
        assert_eq!(&all[r.meta.dataset_offset as usize..], &a.dataset[..]);

        // An operator's purge of a study deletes its retained copies (and its key) now.
        let other_only = generate_object("1.2.6", "1.2.6.1", 1, "KEEP^D", 10_000).unwrap();
        let idd = store(&spool, &other_only, &["x"]).await;
        let (qx, _rx) = spool.subscribe("x").await.unwrap();
        let qd = qx.iter().find(|q| q.entry.object == idd).unwrap();
        spool.complete("x", qd.entry).await.unwrap();
        assert_eq!(spool.retained_count().unwrap(), 4);
        let keys_before = spool.inner.store.scan_keys(Cf::Keys).unwrap().len();
        assert_eq!(spool.purge_retained_study("1.2.6".into()).await.unwrap(), 1);
        assert_eq!(spool.retained_count().unwrap(), 3);
        assert!(matches!(
            spool.meta(idd).await,
            Err(SpoolError::NotFound(_))
        ));
        assert_eq!(
            spool.inner.store.scan_keys(Cf::Keys).unwrap().len(),
            keys_before - 1,
            "the purged study's key is shredded"
        );
        assert_eq!(spool.purge_retained_study("1.2.6".into()).await.unwrap(), 0);
        let kid_d = spool.inner.index.id("study", b"1.2.6");
        assert!(
            spool.inner.dek_cache.lock().unwrap().get(&kid_d).is_none(),
            "a shredded study key stays in no cache"
        );
        // A writer that resolved the key before the shred cannot commit under it.
        let late = generate_object("1.2.6", "1.2.6.1", 2, "KEEP^E", 10_000).unwrap();
        let mut w = spool.writer(ingest(&late, &["x"], None)).unwrap();
        w.write(&late.dataset).await.unwrap();
        w.finish_identity().await.unwrap();
        let kid_now = spool.inner.store.get(Cf::Keys, &kid_d).unwrap();
        assert!(kid_now.is_some(), "the writer made the study a new key");
        let mut b = spool.inner.store.batch();
        b.delete(Cf::Keys, &kid_d);
        spool.inner.store.commit(b, true).unwrap();
        spool.uncache_key(&kid_d);
        assert!(
            matches!(w.commit().await, Err(SpoolError::Internal(_))),
            "a commit under a deleted study key must be refused"
        );

        // Past the retention every object goes, and with them both study keys.
        let later = now_ms() + 2 * 3600 * 1000;
        assert_eq!(spool.expire_retained_at(later, 2).await.unwrap(), 2);
        assert_eq!(spool.object_count().unwrap(), 1);
        assert_eq!(spool.expire_retained_at(later, 100).await.unwrap(), 1);
        assert_eq!(spool.object_count().unwrap(), 0);
        assert_eq!(spool.segment_count().unwrap(), 0);
        assert_eq!(spool.retained_count().unwrap(), 0);
        assert!(spool.inner.store.scan_keys(Cf::Done).unwrap().is_empty());
        assert!(
            spool.inner.store.scan_keys(Cf::Keys).unwrap().is_empty(),
            "study keys are shredded with their studies' last objects"
        );
        let _ = (idb, idc);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn dead_letters_keep_their_history_and_replay_or_purge() {
        let dir = private_tempdir();
        let spool = open(dir.path());
        let a = generate_object("1.2.9", "1.2.9.1", 1, "DEAD^A", 10_000).unwrap();
        let b = generate_object("1.2.9", "1.2.9.1", 2, "DEAD^B", 10_000).unwrap();
        store(&spool, &a, &["x"]).await;
        store(&spool, &b, &["x"]).await;
        let (q, mut rx) = spool.subscribe("x").await.unwrap();
        let mut rec = FailureRecord::default();
        for i in 0..10 {
            rec.push(&format!(
                "attempt {i}: peer answered C-STORE with status 0xA900"
            ));
        }
        assert_eq!(rec.attempts, 10);
        assert_eq!(rec.history.len(), MAX_HISTORY);
        spool.dead_letter("x", q[0].entry, &rec).await.unwrap();
        drop(spool);
        let spool = open(dir.path());
        let (q, _) = spool.subscribe("x").await.unwrap();
        assert_eq!(
            q[0].entry.state,
            EntryState::Dead,
            "dead letters survive a restart"
        );
        assert_eq!(
            spool.failure("x", q[0].entry.seq).unwrap(),
            Some(rec.clone())
        );
        let (_, mut replays) = spool.subscribe("x").await.unwrap();
        let before = now_ms();
        spool.replay("x", q[0].entry).await.unwrap();
        // A replay is a fresh budget: no attempts, and max_age counting from the replay,
        // announced to the dispatcher and stored, so a restart keeps it fresh.
        let Ok(QueueEvent::Added(announced)) = replays.try_recv() else {
            panic!("a replay is announced");
        };
        let from = announced.budget_from_ms.expect("a fresh budget");
        assert!(from >= before && from <= now_ms());
        drop(spool);
        let spool = open(dir.path());
        let (q, mut rx2) = spool.subscribe("x").await.unwrap();
        assert_eq!(q[0].entry.state, EntryState::Queued);
        let fresh = spool.failure("x", q[0].entry.seq).unwrap().expect("stored");
        assert_eq!((fresh.attempts, fresh.history.len()), (0, 0));
        assert_eq!(fresh.budget_from_ms, Some(from));
        // A record written before budgets were stored still decodes, without one.
        let old = rec.encode();
        assert_eq!(FailureRecord::decode(&old).unwrap().budget_from_ms, None);
        let mut with = rec.clone();
        with.budget_from_ms = Some(from);
        assert_eq!(FailureRecord::decode(&with.encode()), Some(with));
        // Purging both objects of the study deletes the objects and the study key.
        spool.purge("x", q[0].entry).await.unwrap();
        assert!(matches!(rx2.try_recv(), Ok(QueueEvent::Removed(_))));
        assert_eq!(
            spool
                .inner
                .store
                .scan_prefix(Cf::Keys, &[], 10)
                .unwrap()
                .len(),
            1
        );
        spool.purge("x", q[1].entry).await.unwrap();
        assert_eq!(spool.object_count().unwrap(), 0);
        assert_eq!(spool.segment_count().unwrap(), 0);
        assert_eq!(
            spool
                .inner
                .store
                .scan_prefix(Cf::Keys, &[], 10)
                .unwrap()
                .len(),
            0,
            "the study key is shredded with its last object"
        );
        let _ = rx.try_recv();
    }

    /// A study key is shredded by the sweep once no stored object uses it, but never while a
    /// writer holds it, nor when a commit used it after the sweep's scan.
    #[tokio::test(flavor = "multi_thread")]
    async fn study_keys_are_shredded_once_unused_but_never_under_a_writer() {
        let dir = private_tempdir();
        let spool = open(dir.path());
        let a = generate_object("1.3.1", "1.3.1.1", 1, "SHRED^A", 10_000).unwrap();
        let b = generate_object("1.3.1", "1.3.1.1", 2, "SHRED^B", 10_000).unwrap();
        let c = generate_object("1.3.2", "1.3.2.1", 1, "SHRED^C", 10_000).unwrap();
        let ida = store(&spool, &a, &["x"]).await;
        let idc = store(&spool, &c, &["x"]).await;
        assert_eq!(spool.study_key_count().unwrap(), 2);
        let kek_ops = spool.kek_ops_probe();
        let before = kek_ops().unwrap();
        assert_eq!((before.kek_id, before.wrap, before.shred), (1, 2, 0));
        assert_eq!(
            spool.shred_unused_keys_blocking().unwrap(),
            0,
            "both in use"
        );

        // A writer of study 1.3.1 has its key; the study's only stored object is delivered
        // and deleted; a sweep runs before the writer commits.
        let mut w = spool.writer(ingest(&b, &["x"], None)).unwrap();
        w.write(&b.dataset).await.unwrap();
        w.finish_identity().await.unwrap();
        let (q, _rx) = spool.subscribe("x").await.unwrap();
        let qa = q.iter().find(|q| q.entry.object == ida).unwrap();
        assert!(spool.complete("x", qa.entry).await.unwrap());
        assert_eq!(
            spool.shred_unused_keys_blocking().unwrap(),
            0,
            "a key a writer holds must stay"
        );
        w.commit().await.expect("the writer commits under its key");
        let idb = spool
            .subscribe("x")
            .await
            .unwrap()
            .0
            .iter()
            .map(|q| q.entry.object)
            .find(|id| *id != idc)
            .unwrap();
        let mut r = spool.open_object(idb).await.unwrap();
        let all = r.read_all().await.unwrap();
        assert_eq!(&all[r.meta.dataset_offset as usize..], &b.dataset[..]);

        // Everything delivered: deletion alone shreds nothing; the next sweep does.
        let (q, _rx) = spool.subscribe("x").await.unwrap();
        for e in &q {
            spool.complete("x", e.entry).await.unwrap();
        }
        assert_eq!(spool.object_count().unwrap(), 0);
        assert_eq!(spool.study_key_count().unwrap(), 2);
        assert_eq!(spool.shred_unused_keys_blocking().unwrap(), 2);
        assert_eq!(spool.study_key_count().unwrap(), 0);
        assert_eq!(
            kek_ops().unwrap().shred,
            2,
            "kek_operations_total counts shreds"
        );
        let kid = spool.inner.index.id("study", b"1.3.1");
        assert!(spool.inner.dek_cache.lock().unwrap().get(&kid).is_none());

        // A commit between the sweep's scan and its deletion keeps its key.
        let used = spool.used_keys_blocking().unwrap();
        assert!(used.is_empty());
        let ida2 = store(&spool, &a, &["x"]).await;
        assert_eq!(
            spool.shred_keys_except_blocking(&used).unwrap(),
            0,
            "a key committed to after the scan must stay"
        );
        let mut r = spool.open_object(ida2).await.unwrap();
        r.read_all().await.expect("readable");
        assert_eq!(spool.shred_unused_keys_blocking().unwrap(), 0, "in use");
    }

    fn message(
        patient: &str,
        control: &str,
        bytes: &[u8],
        dedup: Option<DedupKey>,
    ) -> MessageIngest {
        MessageIngest {
            patient: patient.into(),
            control_id: control.into(),
            message_type: "ORM^O01".into(),
            source: "ris-in".into(),
            routes: vec!["ris".into()],
            dedup,
            bytes: bytes.to_vec(),
        }
    }

    /// An HL7 message round-trips byte for byte (across several segments), is queued as
    /// serial under its patient's tag, is keyed under the patient (two messages of one
    /// patient share a key, another patient gets another); identical re-sends are
    /// duplicates, other bytes a conflict.
    #[tokio::test(flavor = "multi_thread")]
    async fn hl7_messages_round_trip_under_a_key_per_patient() {
        let dir = private_tempdir();
        let spool = open(dir.path());
        let big: Vec<u8> = (0..200_000u32).map(|i| b'A' + (i % 26) as u8).collect();
        let (_, mut rx) = spool.subscribe("ris").await.unwrap();
        let Committed::Stored(a) = spool
            .store_message(message("P1", "C1", &big, None))
            .await
            .unwrap()
        else {
            panic!("stored")
        };
        let Committed::Stored(_) = spool
            .store_message(message("P1", "C2", b"MSH|2", None))
            .await
            .unwrap()
        else {
            panic!("stored")
        };
        let Committed::Stored(_) = spool
            .store_message(message("P2", "C3", b"MSH|3", None))
            .await
            .unwrap()
        else {
            panic!("stored")
        };
        let mut r = spool.open_object(a).await.unwrap();
        assert!(r.meta.is_hl7() && r.meta.segments > 2);
        assert_eq!(r.meta.sop_instance_uid, "C1");
        assert_eq!(r.read_all().await.unwrap(), big);
        let Some(QueueEvent::Added(q)) = rx.recv().await else {
            panic!("an event")
        };
        assert!(q.serial && q.study == study_tag("P1"));
        assert_eq!(
            spool.inner.store.scan_keys(Cf::Keys).unwrap().len(),
            2,
            "one key per patient"
        );
        // Delivered: gone.
        for e in spool.entries_blocking("ris").unwrap() {
            spool.complete("ris", e).await.unwrap();
        }
        assert_eq!(spool.object_count().unwrap(), 0);
        // Dedup: identical is a duplicate, other bytes a conflict.
        let key = spool.message_dedup_key("ris-in", "RIS^HOSP", "D1");
        assert!(matches!(
            spool
                .store_message(message("P3", "D1", b"MSH|d", Some(key)))
                .await,
            Ok(Committed::Stored(_))
        ));
        assert!(matches!(
            spool
                .store_message(message("P3", "D1", b"MSH|d", Some(key)))
                .await,
            Ok(Committed::Duplicate)
        ));
        assert!(matches!(
            spool
                .store_message(message("P3", "D1", b"MSH|e", Some(key)))
                .await,
            Err(SpoolError::IdentityMismatch(_))
        ));
        assert!(matches!(
            spool.store_message(message("P3", "D1", b"", None)).await,
            Err(SpoolError::Format(_))
        ));
    }
}
