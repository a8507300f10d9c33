//! The spool: encrypted, persistent storage of objects and per-destination queues.
//!
//! An object enters through an [`ObjectWriter`] (from the DICOM receiver or the link
//! listener), is stored as a Part-10 byte stream cut into sealed segments, and is queued for
//! every destination of its route in the same synced commit that makes it visible. It leaves
//! when the last of those destinations has confirmed it ([`Spool::complete`]).
//!
//! The parts, each owning its own records and stating its own invariants, bottom-up:
//! - `rocks`: the only file that speaks RocksDB (its column families and what their keys
//!   hold);
//! - [`kek_check`]: the KEK check values of the data directory, one per KEK version;
//! - `keys`: the study keys: their cache, the pins that keep them, creating, loading and
//!   shredding them;
//! - `rotate`: the KEK ring in use, the index key, the rewrap of stored keys to the newest
//!   KEK version and the retirement of older versions;
//! - `meta`: an object's metadata record and a queue entry's failure record, and their
//!   encodings;
//! - `dedup`: the dedup records of link transfers and HL7 messages;
//! - `queue`: the queue entries of each destination, their delivery, failures and dead
//!   letters, and the retention of delivered objects for a resend;
//! - `reader`: reading an object back ([`ObjectReader`]);
//! - `writer`: storing an object ([`ObjectWriter`]) or an HL7 message, and its commit;
//! - this file: the handle ([`Spool`]) and what the parts share (object ids, errors, the
//!   commit lock), opening with start-up recovery, and admission (backpressure).
//!
//! Invariants:
//! - An object that is not committed leaves nothing behind: a dropped writer deletes its
//!   segments, and segments of writers interrupted by a crash are deleted at the next open
//!   (the `ingest` family lists them).
//! - A function that does RocksDB I/O synchronously is named `*_blocking`, or is private and
//!   runs only inside `spawn_blocking` (through `blocking`) or a `*_blocking` function.

pub mod kek_check;
mod rocks;
mod rotate;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keystore::{IndexHasher, KekRing};
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::dataset;
pub use keys::StudyShred;
use keys::{DekCache, KekOps, KeyPins};
use rocks::{Cf, Store};
pub use rocks::{StoreError, StoreStats};
pub use rotate::{KeyVersions, RewrapStep};

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

mod dedup;
mod keys;
mod meta;
mod queue;
mod reader;
#[cfg(test)]
mod tests;
mod writer;

pub use dedup::{DedupKey, DedupState};
pub use keys::KekOpCounts;
pub use meta::{Attempt, FailureRecord, ObjectMeta};
pub use queue::{EntryState, QueueEntry, QueueEvent, Queued, Resent, Retained, study_tag};
pub use reader::{ObjectReader, VerifyFailure};
pub use writer::{Committed, Ingest, MessageIngest, ObjectWriter, RouteFacts, RouteFn};

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

/// What start-up recovery found and removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Objects whose ingest was interrupted (marker without metadata).
    pub interrupted: usize,
    /// Objects with segments but neither metadata nor an ingest marker.
    pub orphans: usize,
}

struct Inner {
    store: Store,
    /// The KEK versions in use (without retired ones); replaced whole by `rotate`, under
    /// the commit lock.
    ring: RwLock<Arc<KekRing>>,
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
    /// Stored wrapped keys per KEK version at the last count, for `kek_wrapped_keys`.
    key_versions: Mutex<std::collections::BTreeMap<u32, u64>>,
    /// A study key was deleted since the last compaction of deleted keys.
    keys_dropped: AtomicBool,
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
    /// Open the spool in `dir` with the given KEK versions (a [`keystore::Kek`] is a ring
    /// of one), removing what interrupted ingests left.
    ///
    /// Every version is checked against the directory's check values first
    /// ([`kek_check`]): another KEK, or a missing version that still holds data keys, is
    /// refused before RocksDB is opened. Versions not recorded yet (a new directory, one
    /// from before check values, a new version from `keys rotate`) are recorded once the
    /// store opened. Retired versions are left out of the ring.
    pub fn open_blocking(
        dir: &Path,
        ring: impl Into<KekRing>,
        opts: SpoolOptions,
    ) -> Result<Spool, SpoolError> {
        prepare_data_dir(dir)?;
        let ring = ring.into();
        let (ring, _) = kek_check::verify_ring_blocking(dir, ring, false)?;
        let store = Store::open(dir)?;
        let (ring, outcome) = kek_check::verify_ring_blocking(dir, ring, true)?;
        rotate::log_outcome(&outcome);
        let index = rotate::index_hasher_blocking(&store, &ring)?;
        let inner = Inner {
            store,
            ring: RwLock::new(Arc::new(ring)),
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
            key_versions: Mutex::new(std::collections::BTreeMap::new()),
            keys_dropped: AtomicBool::new(false),
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
        let drops_keys = b.drops_keys();
        let r = self.inner.store.commit(b, !self.inner.unsynced_commits);
        if r.is_err() {
            self.inner.storage_failed.store(true, Ordering::SeqCst);
        } else if drops_keys {
            // Set once the deletion is written: the next compaction of deleted keys (see
            // `keys`) covers it.
            self.inner.keys_dropped.store(true, Ordering::SeqCst);
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

    /// Segment size in bytes.
    pub fn segment_bytes(&self) -> usize {
        self.inner.segment_bytes
    }

    /// Number of objects in the spool.
    pub fn object_count_blocking(&self) -> Result<usize, SpoolError> {
        Ok(self
            .inner
            .store
            .scan_prefix(Cf::Meta, &[], usize::MAX)?
            .len())
    }

    /// Number of stored segments, committed or not (diagnostics and tests).
    pub fn segment_count_blocking(&self) -> Result<usize, SpoolError> {
        Ok(self
            .inner
            .store
            .scan_prefix(Cf::Seg, &[], usize::MAX)?
            .len())
    }
}

impl StoreError {
    fn from_io(dir: &Path, e: std::io::Error) -> StoreError {
        StoreError::new(format!("{}: {e}", dir.display()))
    }
}
