//! The queues: one per destination, of entries that each wait for the delivery of one
//! object ([`QueueEntry`]), and what the dispatchers hear of them ([`QueueEvent`]); their
//! delivery, failures, dead letters, replay and purge; and the retention of delivered objects
//! for an operator's resend ([`Retained`], [`Spool::resend_study`]).
//!
//! Invariants:
//! - An object is kept while an entry of a queue is waiting for it (the `refs` family
//!   names them) or while it is retained. Removing its last entry deletes it, or, when it
//!   was delivered and `[spool] retention` is set, puts it in the retention index until the
//!   retention sweep deletes it.
//! - Completions, dead letters, replays, purges and resends are synced; a failure record
//!   is not (losing the last one in a crash costs one extra attempt, never an object).
//! - A replay or a resend starts a fresh retry budget, stored with the entry, so that a
//!   restart keeps it fresh.
//! - An object's size and age are not stored in the clear: [`Queued`] holds them in memory,
//!   read from the sealed metadata.

use std::sync::atomic::Ordering;

use tokio::sync::mpsc;
use tracing::info;

use super::keys::lock_pins;
use super::meta::FailureRecord;
use super::rocks::{Batch, Cf};
use super::{ObjectId, Spool, SpoolError, blocking, now_ms, seg_key};

/// Queue entry flag: a dead letter (refused permanently or out of retry budget; kept for an
/// operator). The same bit marked "parked" entries in earlier versions.
const FLAG_DEAD: u8 = 1;
/// Queue entry flag: an operator's resend of a retained object (`queue resend`). Its
/// transfer id carries the entry's sequence, so that the next hop stores it anew rather
/// than deduplicate it against the first delivery.
const FLAG_RESEND: u8 = 2;

/// Objects the retention sweep deletes per synced batch.
const EXPIRE_BATCH: usize = 256;

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

    /// The stored value: the object id, then the flag byte.
    fn value(&self) -> Vec<u8> {
        let mut v = self.object.0.to_vec();
        v.push(self.flags());
        v
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

fn queue_key(dest: &str, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(dest.len() + 9);
    k.extend_from_slice(dest.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
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

impl Spool {
    /// Add to `b` a queue entry of object `id` for each of `routes`, with its reference, and
    /// return them, to be announced once `b` is committed.
    pub(super) fn put_entries(
        &self,
        b: &mut Batch<'_>,
        id: ObjectId,
        routes: &[String],
    ) -> Vec<(String, QueueEntry)> {
        let mut entries = Vec::with_capacity(routes.len());
        for dest in routes {
            let seq = self.inner.next_seq.fetch_add(1, Ordering::SeqCst);
            let entry = QueueEntry {
                seq,
                object: id,
                state: EntryState::Queued,
                resend: false,
            };
            b.put(Cf::Queue, &queue_key(dest, seq), &entry.value());
            b.put(Cf::Refs, &ref_key(&id, dest), &seq.to_be_bytes());
            entries.push((dest.clone(), entry));
        }
        entries
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
    pub fn queue_len_blocking(&self, dest: &str) -> Result<usize, SpoolError> {
        let mut prefix = dest.as_bytes().to_vec();
        prefix.push(0);
        Ok(self
            .inner
            .store
            .scan_prefix(Cf::Queue, &prefix, usize::MAX)?
            .len())
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
    pub fn failure_blocking(
        &self,
        dest: &str,
        seq: u64,
    ) -> Result<Option<FailureRecord>, SpoolError> {
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
            let v = QueueEntry {
                state: EntryState::Dead,
                ..entry
            }
            .value();
            let mut b = s.batch();
            b.put(Cf::Queue, &key, &v);
            b.put(Cf::Fail, &key, &value);
            spool.commit_batch(b)
        })
        .await
    }

    /// Quarantine object `id`, which failed verification: every queue entry of it that is
    /// not a dead letter yet becomes one, with `reason` added to its attempt history, and its
    /// dispatcher stops considering it (one it is sending now finds the same damage and
    /// dead-letters it itself). Synced. Returns the entries changed. Blocking.
    pub fn quarantine_blocking(&self, id: ObjectId, reason: &str) -> Result<usize, SpoolError> {
        let s = &self.inner.store;
        let mut changed = Vec::new();
        {
            // Under the lock that `complete` takes: an entry is never brought back after
            // its removal.
            let _g = self.commit_lock()?;
            let mut b = s.batch();
            for (k, v) in s.scan_prefix(Cf::Refs, &id.0, usize::MAX)? {
                let (Some(dest), Some(seq)) = (
                    k.get(16..).and_then(|d| std::str::from_utf8(d).ok()),
                    <[u8; 8]>::try_from(&v[..]).ok().map(u64::from_be_bytes),
                ) else {
                    continue;
                };
                let key = queue_key(dest, seq);
                let Some(q) = s.get(Cf::Queue, &key)? else {
                    continue;
                };
                let flags = q.get(16).copied().unwrap_or(0);
                if flags & FLAG_DEAD != 0 {
                    continue;
                }
                let mut record = match s.get(Cf::Fail, &key)? {
                    Some(r) => FailureRecord::decode(&r).unwrap_or_default(),
                    None => FailureRecord::default(),
                };
                record.push(reason);
                let entry = QueueEntry {
                    seq,
                    object: id,
                    state: EntryState::Dead,
                    resend: flags & FLAG_RESEND != 0,
                };
                b.put(Cf::Queue, &key, &entry.value());
                b.put(Cf::Fail, &key, &record.encode());
                changed.push((dest.to_owned(), seq));
            }
            if changed.is_empty() {
                return Ok(0);
            }
            self.commit_batch(b)?;
        }
        for (dest, seq) in &changed {
            self.notify(dest, QueueEvent::Removed(*seq));
        }
        Ok(changed.len())
    }

    /// Put a dead letter back in its queue with a fresh retry budget. Synced; the
    /// destination's dispatcher hears of it at once.
    pub async fn replay(&self, dest: &str, entry: QueueEntry) -> Result<(), SpoolError> {
        let spool = self.clone();
        let key = queue_key(dest, entry.seq);
        let d = dest.to_owned();
        blocking(move || {
            let s = &spool.inner.store;
            let v = QueueEntry {
                state: EntryState::Queued,
                ..entry
            }
            .value();
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
    pub fn retained_count_blocking(&self) -> Result<usize, SpoolError> {
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
                    b.put(Cf::Queue, &queue_key(dest, seq), &entry.value());
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
    pub(super) async fn expire_retained_at(
        &self,
        now: u64,
        limit: usize,
    ) -> Result<usize, SpoolError> {
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
    fn forget_objects(&self, b: &mut Batch<'_>, ids: &[ObjectId]) -> Result<(), SpoolError> {
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

    pub(super) fn notify(&self, dest: &str, event: QueueEvent) {
        if let Ok(l) = self.inner.listeners.lock()
            && let Some(tx) = l.get(dest)
        {
            let _ = tx.send(event);
        }
    }
}
