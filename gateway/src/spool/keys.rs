//! Study keys (one DEK per study, and per patient for HL7 messages): creating and loading
//! them, the cache of unwrapped keys ([`DekCache`]), the pins that keep a key that a writer
//! holds ([`KeyPin`]), and shredding the keys nothing uses any more.
//!
//! Invariants:
//! - A study key is stored only wrapped under the KEK and bound to its key id (the `keys`
//!   family); it is created once, under the commit lock.
//! - A study key lives while an object of the study is stored or a writer holds it (a
//!   [`KeyPin`], taken before the key is looked up and kept by the commit task until the
//!   commit is done). [`Spool::shred_unused_keys_blocking`] deletes every other key, so
//!   a study's key is gone within a sweep of its last object's deletion, whatever deleted
//!   it (delivery, expiry, purge).
//! - A deleted key is only a tombstone until its family is compacted: every commit that
//!   deletes one marks the spool, and [`Spool::compact_deleted_keys_blocking`] (run by the
//!   node after each sweep, and by a `keys shred`) then compacts the `keys` family whole
//!   after flushing every memtable, so that the wrapped bytes leave the SST files and the
//!   WAL files that held them are deleted: within one sweep interval of the deletion.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keystore::Dek;

use super::rocks::Cf;
use super::{ObjectId, Spool, SpoolError};

/// Counts of key-encryption-key operations: study keys wrapped (created), rewrapped (moved
/// to the newest KEK version), unwrapped (loaded into the cache) and shredded (deleted,
/// counted once the deletion is written).
#[derive(Debug, Default)]
pub(super) struct KekOps {
    pub(super) wrap: AtomicU64,
    pub(super) rewrap: AtomicU64,
    pub(super) unwrap: AtomicU64,
    pub(super) shred: AtomicU64,
}

/// A snapshot of [`KekOps`], with the id of the KEK they used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KekOpCounts {
    /// The newest KEK version's id (`kek_version` in metrics).
    pub kek_id: u32,
    /// Study keys wrapped (created).
    pub wrap: u64,
    /// Stored keys moved to the newest KEK version.
    pub rewrap: u64,
    /// Study keys unwrapped.
    pub unwrap: u64,
    /// Study keys shredded.
    pub shred: u64,
}

/// What [`Spool::shred_study_key_blocking`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StudyShred {
    /// The study's key was stored and is deleted now.
    pub key_deleted: bool,
    /// Objects of the study still stored: unreadable from now on.
    pub objects_left: usize,
}

/// Study keys that the unused-key sweep must keep although no stored object uses them.
#[derive(Debug, Default)]
pub(super) struct KeyPins {
    /// Writers (and their commit tasks) holding each key.
    pub(super) held: HashMap<[u8; 16], usize>,
    /// Keys that a commit used since the sweep began (its scan of the metadata may have
    /// missed that commit).
    pub(super) touched: std::collections::HashSet<[u8; 16]>,
}

pub(super) fn lock_pins(pins: &Mutex<KeyPins>) -> std::sync::MutexGuard<'_, KeyPins> {
    // The map stays consistent whatever a panicking holder did: each change is one step.
    pins.lock().unwrap_or_else(|e| e.into_inner())
}

/// A writer's hold on its study key: while it exists the key is not shredded by the
/// unused-key sweep or a purge (see the module invariants).
pub(super) struct KeyPin {
    pins: Arc<Mutex<KeyPins>>,
    kid: [u8; 16],
}

impl KeyPin {
    pub(super) fn new(pins: &Arc<Mutex<KeyPins>>, kid: [u8; 16]) -> KeyPin {
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

/// Unwrapped study keys: at most [`DekCache::MAX`] of them, each for at most
/// [`DekCache::TTL`] since it was unwrapped, so that reading an object does not unwrap its
/// key again while the key does not stay in memory for long. An entry leaves when its study
/// key is deleted. Evicted keys are zeroized when their last user drops them.
#[derive(Default)]
pub(super) struct DekCache {
    map: HashMap<[u8; 16], (Arc<Dek>, std::time::Instant)>,
}

impl DekCache {
    const MAX: usize = 1024;
    const TTL: Duration = Duration::from_secs(300);

    pub(super) fn get(&mut self, kid: &[u8; 16]) -> Option<Arc<Dek>> {
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

impl Spool {
    /// Key-encryption-key operation counts, for metrics; like [`Spool::stats_probe`], the
    /// probe does not keep the spool open.
    pub fn kek_ops_probe(&self) -> impl Fn() -> Option<KekOpCounts> + Send + Sync + 'static {
        let inner = Arc::downgrade(&self.inner);
        move || {
            inner.upgrade().map(|i| KekOpCounts {
                kek_id: i
                    .ring
                    .read()
                    .map(|r| r.newest().kek_id())
                    .unwrap_or_default(),
                wrap: i.kek_ops.wrap.load(Ordering::Relaxed),
                rewrap: i.kek_ops.rewrap.load(Ordering::Relaxed),
                unwrap: i.kek_ops.unwrap.load(Ordering::Relaxed),
                shred: i.kek_ops.shred.load(Ordering::Relaxed),
            })
        }
    }

    /// Get (creating if `create`) the DEK of a study, by its key id: from the cache, or
    /// unwrapped from its stored form (and cached).
    pub(super) fn study_key(&self, kid: [u8; 16], create: bool) -> Result<Arc<Dek>, SpoolError> {
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
    pub(super) fn uncache_key(&self, kid: &[u8; 16]) {
        if let Ok(mut c) = self.inner.dek_cache.lock() {
            c.remove(kid);
        }
    }

    /// For a commit, under the commit lock: is study key `kid` still stored? A purge or the
    /// unused-key sweep may have shredded it since the writer loaded it (it then leaves the
    /// cache too). A key still stored is marked touched, so that a sweep whose scan missed
    /// this commit keeps it.
    pub(super) fn key_for_commit_blocking(&self, kid: &[u8; 16]) -> Result<bool, SpoolError> {
        if self.inner.store.get(Cf::Keys, kid)?.is_none() {
            self.uncache_key(kid);
            return Ok(false);
        }
        lock_pins(&self.inner.pins).touched.insert(*kid);
        Ok(true)
    }

    fn load_study_key(&self, kid: [u8; 16], create: bool) -> Result<Dek, SpoolError> {
        let s = &self.inner.store;
        if let Some(w) = s.get(Cf::Keys, &kid)? {
            self.inner.kek_ops.unwrap.fetch_add(1, Ordering::Relaxed);
            return self.ring().unwrap(&w, &kid).map_err(SpoolError::Key);
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
            return self.ring().unwrap(&w, &kid).map_err(SpoolError::Key);
        }
        let dek = Dek::generate().map_err(SpoolError::Key)?;
        // Read under the commit lock, which a ring change also holds: a key is wrapped
        // under the newest version of the moment it is written.
        let wrapped = self.ring().wrap(&dek, &kid).map_err(SpoolError::Key)?;
        let mut b = s.batch();
        b.put(Cf::Keys, &kid, &wrapped);
        s.commit(b, true)?;
        self.inner.kek_ops.wrap.fetch_add(1, Ordering::Relaxed);
        Ok(dek)
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
    pub(super) fn used_keys_blocking(
        &self,
    ) -> Result<std::collections::HashSet<[u8; 16]>, SpoolError> {
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
    pub(super) fn shred_keys_except_blocking(
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

    /// If a study key was deleted since the last call, make its wrapped bytes unrecoverable
    /// from the database's files (see the module invariants). Returns whether it compacted.
    ///
    /// # Errors
    ///
    /// [`SpoolError::Store`] if the flush fails; the next call tries again.
    pub fn compact_deleted_keys_blocking(&self) -> Result<bool, SpoolError> {
        if !self.inner.keys_dropped.swap(false, Ordering::SeqCst) {
            return Ok(false);
        }
        if let Err(e) = self.inner.store.compact_away_old_values(&[Cf::Keys]) {
            self.inner.keys_dropped.store(true, Ordering::SeqCst);
            return Err(e.into());
        }
        Ok(true)
    }

    /// Is a key of study `study_uid` stored? Blocking.
    pub fn study_key_exists_blocking(&self, study_uid: &str) -> Result<bool, SpoolError> {
        let kid = self.inner.index.id("study", study_uid.as_bytes());
        Ok(self.inner.store.get(Cf::Keys, &kid)?.is_some())
    }

    /// `keys shred`: destroy the key of study `study_uid` now, whatever still uses it, and
    /// compact it out of the files. Objects of the study still stored can then be read by
    /// no one (the caller purges them first). A writer holding the key finds it gone at its
    /// commit and refuses its object.
    ///
    /// # Errors
    ///
    /// [`SpoolError::Store`] if the deletion or the compaction fails.
    pub fn shred_study_key_blocking(&self, study_uid: &str) -> Result<StudyShred, SpoolError> {
        let kid = self.inner.index.id("study", study_uid.as_bytes());
        let s = &self.inner.store;
        let mut out = StudyShred::default();
        {
            let _g = self.commit_lock()?;
            for (_, v) in s.scan_prefix(Cf::Meta, &[], usize::MAX)? {
                if v.get(1..17) == Some(&kid[..]) {
                    out.objects_left += 1;
                }
            }
            if s.get(Cf::Keys, &kid)?.is_some() {
                let mut b = s.batch();
                b.delete(Cf::Keys, &kid);
                self.commit_batch(b)?;
                self.inner.kek_ops.shred.fetch_add(1, Ordering::Relaxed);
                out.key_deleted = true;
            }
            self.uncache_key(&kid);
        }
        // A reader that raced the deletion may have cached it again.
        self.uncache_key(&kid);
        self.compact_deleted_keys_blocking()?;
        Ok(out)
    }

    /// Study keys stored (for status and tests).
    pub fn study_key_count_blocking(&self) -> Result<usize, SpoolError> {
        // Only study keys live in this family (the index key has its own).
        Ok(self.inner.store.scan_keys(Cf::Keys)?.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
