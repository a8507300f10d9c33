//! The only file that speaks RocksDB. Everything else uses the spool's own terms.
//!
//! Column families and what their keys hold (no key contains patient data: object ids are
//! random, study and dedup keys are keyed hashes, destination names come from the config):
//!
//! | family   | key                                   | value                                   |
//! |----------|---------------------------------------|-----------------------------------------|
//! | `meta`   | object id (16)                        | version, study key id, sealed metadata  |
//! | `seg`    | object id (16) ‖ index (u64 BE)        | sealed segment                          |
//! | `keys`   | study key id (16)                     | DEK wrapped by the KEK                  |
//! | `secrets`| name (`index-key`)                    | the index key wrapped by the KEK        |
//! | `queue`  | destination ‖ 0x00 ‖ seq (u64 BE)      | object id (16) ‖ flags (1)              |
//! | `refs`   | object id (16) ‖ destination           | seq (u64 BE)                            |
//! | `ingest` | object id (16)                        | start time (u64 BE, ms): in-progress    |
//! | `dedup`  | transfer key id (16)                  | digest (32) ‖ stored at (u64 BE, ms)    |
//! | `fail`   | destination ‖ 0x00 ‖ seq (u64 BE)      | failure record: attempts, last reasons  |
//!
//! Invariant: a write that must survive a crash goes through [`Store::commit`] with
//! `sync = true`, which fsyncs the WAL and with it every earlier unsynced write.

use std::path::Path;

use rocksdb::{
    ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, ReadOptions, WriteBatch,
    WriteOptions,
};

/// A column family of the spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cf {
    Meta,
    Seg,
    Keys,
    Queue,
    Refs,
    Ingest,
    Dedup,
    Fail,
    /// Delivered objects kept for `[spool] retention`: object id + destination → delivery
    /// time (ms).
    Done,
    /// The retention index: expiry (ms, big-endian) + object id → nothing.
    Expiry,
    /// Node-wide secrets wrapped by the KEK (the index key).
    Secrets,
}

impl Cf {
    const ALL: [Cf; 11] = [
        Cf::Meta,
        Cf::Seg,
        Cf::Keys,
        Cf::Queue,
        Cf::Refs,
        Cf::Ingest,
        Cf::Dedup,
        Cf::Fail,
        Cf::Done,
        Cf::Expiry,
        Cf::Secrets,
    ];
    fn name(self) -> &'static str {
        match self {
            Cf::Meta => "meta",
            Cf::Seg => "seg",
            Cf::Keys => "keys",
            Cf::Queue => "queue",
            Cf::Refs => "refs",
            Cf::Ingest => "ingest",
            Cf::Dedup => "dedup",
            Cf::Fail => "fail",
            Cf::Done => "done",
            Cf::Expiry => "expiry",
            Cf::Secrets => "secrets",
        }
    }
}

/// A storage-engine failure (I/O error, disk full, corruption).
#[derive(Debug, thiserror::Error)]
#[error("storage: {0}")]
pub struct StoreError(String);

impl StoreError {
    pub(crate) fn new(msg: String) -> StoreError {
        StoreError(msg)
    }
}

impl From<rocksdb::Error> for StoreError {
    fn from(e: rocksdb::Error) -> Self {
        StoreError(e.into_string())
    }
}

/// A key and its value, as read.
pub(crate) type Pair = (Box<[u8]>, Box<[u8]>);

/// RocksDB's own counters, read for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Background errors since open (flush, compaction); above 0 the database is read-only.
    pub background_errors: u64,
    /// Bytes in SST and blob files, over every column family.
    pub live_bytes: u64,
    /// Bytes compaction estimates it still has to rewrite.
    pub pending_compaction_bytes: u64,
}

/// The RocksDB handle.
pub(crate) struct Store {
    db: DB,
}

/// A set of writes applied atomically.
pub(crate) struct Batch<'a> {
    store: &'a Store,
    batch: WriteBatch,
    /// It deletes from the `keys` family (see [`Batch::drops_keys`]).
    drops_keys: bool,
}

impl Batch<'_> {
    pub(crate) fn put(&mut self, cf: Cf, key: &[u8], value: &[u8]) {
        if let Some(h) = self.store.db.cf_handle(cf.name()) {
            self.batch.put_cf(h, key, value);
        }
    }
    /// Whether this batch deletes a study key (its wrapped bytes then stay in the
    /// database's files until [`Store::compact_away_old_values`]).
    pub(crate) fn drops_keys(&self) -> bool {
        self.drops_keys
    }
    pub(crate) fn delete(&mut self, cf: Cf, key: &[u8]) {
        self.drops_keys |= cf == Cf::Keys;
        if let Some(h) = self.store.db.cf_handle(cf.name()) {
            self.batch.delete_cf(h, key);
        }
    }
    /// Delete keys in `[from, to)`.
    pub(crate) fn delete_range(&mut self, cf: Cf, from: &[u8], to: &[u8]) {
        self.drops_keys |= cf == Cf::Keys;
        if let Some(h) = self.store.db.cf_handle(cf.name()) {
            self.batch.delete_range_cf(h, from, to);
        }
    }
}

impl Store {
    /// Open (or create) the spool database in `dir`.
    pub(crate) fn open(dir: &Path) -> Result<Store, StoreError> {
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_keep_log_file_num(4);
        db_opts.set_max_total_wal_size(256 << 20);

        let cfs = Cf::ALL.iter().map(|cf| {
            let mut o = Options::default();
            // Small memtables keep RSS flat (see docs/format.md and the performance notes).
            o.set_write_buffer_size(16 << 20);
            o.set_max_write_buffer_number(3);
            if *cf == Cf::Seg {
                // Segments are large values: keep them in blob files, out of the LSM tree.
                o.set_enable_blob_files(true);
                o.set_min_blob_size(4096);
                o.set_blob_file_size(256 << 20);
                o.set_enable_blob_gc(true);
            }
            ColumnFamilyDescriptor::new(cf.name(), o)
        });
        // The default family holds nothing, but its write buffer size counts in how much
        // RocksDB preallocates for the first WAL file (1.1 times the largest family's):
        // RocksDB's 64 MiB default would reserve 72 MiB of the data volume at the first
        // write, which counts against `spool.min_free`.
        let mut default_cf = Options::default();
        default_cf.set_write_buffer_size(16 << 20);
        let cfs = cfs.chain(std::iter::once(ColumnFamilyDescriptor::new(
            rocksdb::DEFAULT_COLUMN_FAMILY_NAME,
            default_cf,
        )));
        let db = DB::open_cf_descriptors(&db_opts, dir, cfs)?;
        Ok(Store { db })
    }

    fn cf(&self, cf: Cf) -> Result<&rocksdb::ColumnFamily, StoreError> {
        self.db
            .cf_handle(cf.name())
            .ok_or_else(|| StoreError(format!("column family {} missing", cf.name())))
    }

    pub(crate) fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get_cf(self.cf(cf)?, key)?)
    }

    /// A write that need not be durable by itself (a later synced commit covers it).
    pub(crate) fn put_unsynced(&self, cf: Cf, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let mut wo = WriteOptions::default();
        wo.set_sync(false);
        Ok(self.db.put_cf_opt(self.cf(cf)?, key, value, &wo)?)
    }

    pub(crate) fn batch(&self) -> Batch<'_> {
        Batch {
            store: self,
            batch: WriteBatch::default(),
            drops_keys: false,
        }
    }

    /// Apply a batch; with `sync`, fsync the WAL before returning.
    pub(crate) fn commit(&self, batch: Batch<'_>, sync: bool) -> Result<(), StoreError> {
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        Ok(self.db.write_opt(batch.batch, &wo)?)
    }

    /// Flush every column family's memtable.
    pub(crate) fn flush(&self) -> Result<(), StoreError> {
        for cf in Cf::ALL {
            self.db.flush_cf(self.cf(cf)?)?;
        }
        Ok(())
    }

    /// Rewrite `cfs` so that values deleted or overwritten in them are gone from the
    /// database's files: every memtable is flushed first (the WAL files that held the old
    /// writes then become obsolete, and RocksDB deletes them), then each family is compacted
    /// whole, its bottommost level included, which leaves only live values in its SST
    /// files and deletes the old ones.
    pub(crate) fn compact_away_old_values(&self, cfs: &[Cf]) -> Result<(), StoreError> {
        self.flush()?;
        self.db.flush_wal(true)?;
        let mut opts = rocksdb::CompactOptions::default();
        opts.set_exclusive_manual_compaction(true);
        opts.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
        for cf in cfs {
            self.db
                .compact_range_cf_opt(self.cf(*cf)?, None::<&[u8]>, None::<&[u8]>, &opts);
        }
        Ok(())
    }

    /// At most `limit` keys of `cf` from `from` (inclusive), in order (values are not
    /// copied out).
    pub(crate) fn keys_from(
        &self,
        cf: Cf,
        from: &[u8],
        limit: usize,
    ) -> Result<Vec<Box<[u8]>>, StoreError> {
        let mut it = self.db.raw_iterator_cf(self.cf(cf)?);
        it.seek(from);
        let mut out = Vec::new();
        while let Some(k) = it.key() {
            if out.len() >= limit {
                break;
            }
            out.push(k.into());
            it.next();
        }
        it.status()?;
        Ok(out)
    }

    /// Every key of `cf`, in order (values are not copied out).
    pub(crate) fn scan_keys(&self, cf: Cf) -> Result<Vec<Box<[u8]>>, StoreError> {
        let mut it = self.db.raw_iterator_cf(self.cf(cf)?);
        it.seek_to_first();
        let mut out = Vec::new();
        while let Some(k) = it.key() {
            out.push(k.into());
            it.next();
        }
        it.status()?;
        Ok(out)
    }

    /// The first key in `[lower, upper)`, if any. The bounds are given to RocksDB, so an
    /// empty range costs a seek and reads no value (with blob files, no blob either).
    pub(crate) fn first_key_in(
        &self,
        cf: Cf,
        lower: &[u8],
        upper: &[u8],
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(lower.to_vec());
        ro.set_iterate_upper_bound(upper.to_vec());
        let mut it = self.db.raw_iterator_cf_opt(self.cf(cf)?, ro);
        it.seek(lower);
        let k = it.key().map(<[u8]>::to_vec);
        it.status()?;
        Ok(k)
    }

    /// Every (key, value) whose key starts with `prefix`, in key order, at most `limit`.
    pub(crate) fn scan_prefix(
        &self,
        cf: Cf,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<Pair>, StoreError> {
        let mut out = Vec::new();
        let iter = self
            .db
            .iterator_cf(self.cf(cf)?, IteratorMode::From(prefix, Direction::Forward));
        for item in iter {
            let (k, v) = item?;
            if !k.starts_with(prefix) || out.len() >= limit {
                break;
            }
            out.push((k, v));
        }
        Ok(out)
    }

    /// RocksDB's counters (in-memory properties, no I/O).
    pub(crate) fn stats(&self) -> StoreStats {
        let sum = |name: &str| -> u64 {
            Cf::ALL
                .iter()
                .filter_map(|cf| self.db.cf_handle(cf.name()))
                .filter_map(|h| self.db.property_int_value_cf(h, name).ok().flatten())
                .sum()
        };
        StoreStats {
            background_errors: self
                .db
                .property_int_value("rocksdb.background-errors")
                .ok()
                .flatten()
                .unwrap_or(0),
            live_bytes: sum("rocksdb.total-sst-files-size") + sum("rocksdb.total-blob-file-size"),
            pending_compaction_bytes: sum("rocksdb.estimate-pending-compaction-bytes"),
        }
    }
}
