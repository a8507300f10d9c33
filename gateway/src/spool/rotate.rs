//! KEK rotation inside the spool: the ring of KEK versions in use, the index key, the
//! rewrap of stored keys to the newest version, and the retirement of older versions.
//!
//! Invariants:
//! - The ring is replaced only under the commit lock, and a study key is created under
//!   that lock with the ring of that moment: every key is written under the newest version
//!   held when it is written.
//! - The index key (which keys the dedup, study and object ids, so that no UID is stored in
//!   the clear) is stored wrapped in the `secrets` family, so that it outlives the KEK
//!   version it came from. A data directory created under version 1 uses the key derived
//!   from version 1, as directories did before rotation existed; it is stored at the first
//!   open.
//! - A rewrap batch replaces a stored key only if it still holds the bytes the batch read
//!   and the newest version is still the one the batch wrapped under (both checked under
//!   the commit lock). Each batch is one synced write, and an old and a new wrapping of a
//!   key are both valid while both versions are held: a rewrap can be killed at any point,
//!   and started again, without losing or doubling anything.
//! - A version is retired only once no stored key is under it (checked under the commit
//!   lock), after the families holding wrapped keys were compacted so that its old
//!   wrappings are gone from the database's files; then it is recorded as retired
//!   ([`super::kek_check`]) and left out of the ring.

use std::collections::BTreeMap;
use std::sync::Arc;

use keystore::{IndexHasher, IndexKey, KekRing, wrapped_kek_id};
use tracing::{info, warn};

use super::kek_check;
use super::rocks::{Cf, Store};
use super::{Spool, SpoolError};

/// The index key's name in the `secrets` family.
const INDEX_KEY: &[u8] = b"index-key";

/// Log what the check of the KEK versions found at open or on a reload.
pub(super) fn log_outcome(o: &kek_check::Outcome) {
    for v in &o.written {
        info!(
            kek_version = v,
            "recorded KEK version {v} in the data directory ({})",
            kek_check::FILE_NAME
        );
    }
    for v in &o.retired_present {
        warn!(
            kek_version = v,
            "KEK version {v} is retired: no key is wrapped under it any more and it is not used; destroy its file"
        );
    }
}

/// The index hasher of the directory: its stored index key, or at the first open the key
/// derived from KEK version 1 (a fresh random key if there is no version 1 and nothing is
/// stored yet), stored wrapped under the newest version.
pub(super) fn index_hasher_blocking(
    store: &Store,
    ring: &KekRing,
) -> Result<IndexHasher, SpoolError> {
    if let Some(w) = store.get(Cf::Secrets, INDEX_KEY)? {
        return Ok(ring.unwrap_index_key(&w).map_err(SpoolError::Key)?.hasher());
    }
    let key = match ring.get(1) {
        Some(v1) => v1.derived_index_key(),
        None => {
            for cf in [Cf::Meta, Cf::Keys, Cf::Dedup] {
                if !store.scan_prefix(cf, &[], 1)?.is_empty() {
                    // Its ids were keyed under version 1's derived key.
                    return Err(SpoolError::Key(
                        keystore::KeystoreError::KekVersionMissing { version: 1 },
                    ));
                }
            }
            IndexKey::generate().map_err(SpoolError::Key)?
        }
    };
    let wrapped = ring.wrap_index_key(&key).map_err(SpoolError::Key)?;
    let mut b = store.batch();
    b.put(Cf::Secrets, INDEX_KEY, &wrapped);
    store.commit(b, true)?;
    Ok(key.hasher())
}

/// Stored wrapped keys (study keys and the index key) per KEK version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyVersions {
    /// Keys per version.
    pub by_version: BTreeMap<u32, u64>,
    /// The newest version held.
    pub newest: u32,
}

impl KeyVersions {
    /// Keys under any version older than the newest: what a rewrap still has to move.
    pub fn pending(&self) -> u64 {
        self.by_version
            .iter()
            .filter(|(v, _)| **v != self.newest)
            .map(|(_, n)| n)
            .sum()
    }
}

/// What one [`Spool::rewrap_batch_blocking`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RewrapStep {
    /// Keys moved to the newest version.
    pub moved: usize,
    /// Keys that fail authentication under their own version (tampered or damaged): they
    /// cannot be moved, and keep their version from being retired.
    pub failed: usize,
    /// Keys left under older versions beyond this batch (not counting `failed`).
    pub remaining: u64,
}

impl Spool {
    /// The KEK versions in use.
    pub fn ring(&self) -> Arc<KekRing> {
        match self.inner.ring.read() {
            Ok(r) => r.clone(),
            // Replaced whole in one step: a panicking writer left a complete ring.
            Err(e) => e.into_inner().clone(),
        }
    }

    fn set_ring(&self, ring: KekRing) {
        let mut w = match self.inner.ring.write() {
            Ok(w) => w,
            Err(e) => e.into_inner(),
        };
        *w = Arc::new(ring);
    }

    /// Use `ring` (the versions found on disk now) from here on: every version is checked
    /// against the directory's check values and new ones are recorded first (see
    /// [`kek_check::verify_ring_blocking`]); retired versions are left out.
    ///
    /// # Errors
    ///
    /// [`SpoolError::KekCheck`] if a version does not match or one still in use is
    /// missing; the ring in use is then unchanged.
    pub fn install_ring_blocking(&self, ring: KekRing) -> Result<kek_check::Outcome, SpoolError> {
        // The file write (and its fsync) happens before the lock is taken.
        let (ring, outcome) = kek_check::verify_ring_blocking(&self.inner.dir, ring, true)?;
        let _g = self.commit_lock()?;
        self.set_ring(ring);
        drop(_g);
        log_outcome(&outcome);
        Ok(outcome)
    }

    /// Count the stored wrapped keys per KEK version (and remember the counts for
    /// `kek_wrapped_keys`).
    pub fn key_versions_blocking(&self) -> Result<KeyVersions, SpoolError> {
        let mut out = KeyVersions {
            newest: self.ring().newest().kek_id(),
            ..KeyVersions::default()
        };
        for cf in [Cf::Secrets, Cf::Keys] {
            for (_, v) in self.inner.store.scan_prefix(cf, &[], usize::MAX)? {
                *out.by_version
                    .entry(wrapped_kek_id(&v).unwrap_or(0))
                    .or_insert(0) += 1;
            }
        }
        if let Ok(mut k) = self.inner.key_versions.lock() {
            k.clone_from(&out.by_version);
        }
        Ok(out)
    }

    /// The last counts of [`Spool::key_versions_blocking`], for metrics; like
    /// [`Spool::stats_probe`], the probe does not keep the spool open.
    pub fn key_versions_probe(
        &self,
    ) -> impl Fn() -> Option<BTreeMap<u32, u64>> + Send + Sync + 'static {
        let inner = Arc::downgrade(&self.inner);
        move || {
            inner
                .upgrade()
                .and_then(|i| i.key_versions.lock().ok().map(|k| k.clone()))
        }
    }

    /// Move at most `max` stored keys from older KEK versions to the newest (one synced
    /// write; see the module invariants).
    ///
    /// # Errors
    ///
    /// [`SpoolError::Store`] if reading or the write fails.
    pub fn rewrap_batch_blocking(&self, max: usize) -> Result<RewrapStep, SpoolError> {
        let ring = self.ring();
        let newest = ring.newest().kek_id();
        let s = &self.inner.store;
        let mut step = RewrapStep::default();
        let mut todo = Vec::new();
        for cf in [Cf::Secrets, Cf::Keys] {
            for (k, v) in s.scan_prefix(cf, &[], usize::MAX)? {
                if wrapped_kek_id(&v) == Some(newest) {
                    continue;
                }
                if todo.len() >= max {
                    step.remaining += 1;
                    continue;
                }
                let moved = if cf == Cf::Secrets {
                    ring.rewrap_index_key(&v)
                } else {
                    ring.rewrap(&v, &k)
                };
                match moved {
                    Ok(Some(new)) => todo.push((cf, k, v, new)),
                    Ok(None) => {}
                    Err(_) => step.failed += 1,
                }
            }
        }
        if todo.is_empty() {
            return Ok(step);
        }
        let _g = self.commit_lock()?;
        if self.ring().newest().kek_id() != newest {
            // A newer version came in meanwhile: the next batch wraps under it.
            step.remaining += todo.len() as u64;
            return Ok(step);
        }
        let mut b = s.batch();
        for (cf, k, old, new) in &todo {
            if s.get(*cf, k)?.as_deref() == Some(&old[..]) {
                b.put(*cf, k, new);
                step.moved += 1;
            }
        }
        if step.moved > 0 {
            self.commit_batch(b)?;
            self.inner
                .kek_ops
                .rewrap
                .fetch_add(step.moved as u64, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(step)
    }

    /// Retire every version older than the newest, if no stored key is under one of them
    /// any more (see the module invariants). Returns the versions retired (none if a key
    /// is still under an older version, or there is no older version).
    ///
    /// # Errors
    ///
    /// [`SpoolError::Store`] or [`SpoolError::KekCheck`] if the compaction or the record
    /// fails; a later call does it again.
    pub fn retire_old_versions_blocking(&self) -> Result<Vec<u32>, SpoolError> {
        let ring = self.ring();
        let newest = ring.newest().kek_id();
        let old: Vec<u32> = ring.versions().filter(|v| *v != newest).collect();
        if old.is_empty() {
            return Ok(old);
        }
        {
            let _g = self.commit_lock()?;
            if self.ring().newest().kek_id() != newest {
                return Ok(Vec::new());
            }
            for cf in [Cf::Secrets, Cf::Keys] {
                for (_, v) in self.inner.store.scan_prefix(cf, &[], usize::MAX)? {
                    if wrapped_kek_id(&v).is_some_and(|id| old.contains(&id)) {
                        return Ok(Vec::new());
                    }
                }
            }
        }
        // Nothing is under the old versions now, and nothing will be again (new keys and
        // rewraps go under the newest). Their earlier wrappings go from the files first.
        self.inner
            .store
            .compact_away_old_values(&[Cf::Secrets, Cf::Keys])?;
        kek_check::retire_blocking(&self.inner.dir, &old)?;
        let _g = self.commit_lock()?;
        let next = self
            .ring()
            .without(|v| old.contains(&v))
            .map_err(SpoolError::Key)?;
        self.set_ring(next);
        drop(_g);
        for v in &old {
            info!(
                kek_version = v,
                "retired KEK version {v}: no key is wrapped under it any more and its old wrappings were compacted out of the database; its file can now be destroyed"
            );
        }
        Ok(old)
    }
}
