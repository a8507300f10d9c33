//! Deduplication of re-sends: a link transfer (its peer and transfer id) or an HL7 message
//! (its listener, sender and control id) is remembered under a keyed hash ([`DedupKey`]) for
//! the dedup window, with a MAC of what it held, so that an identical re-send is answered as
//! stored and another one under the same key is refused.
//!
//! Invariants:
//! - A dedup record is written in the same synced batch as the metadata of the object it
//!   names, after every segment: "already have it" is only ever answered for a whole,
//!   durable object.
//! - The disk never holds the SHA-256 of an object (it would confirm that a known image
//!   passed through): a record keeps a MAC of it under the index key, bound to the transfer.
//!   Records of version 1 (the plain digest) are still read until they expire.
//! - An unreadable record counts as never seen, not as a conflict.

use super::rocks::{Batch, Cf};
use super::{Spool, SpoolError, now_ms};

/// Version byte of a dedup record: 2 = keyed digest (16) ‖ stored-at ms (8). Records of
/// version 1 had no version byte: the plaintext SHA-256 (32) ‖ stored-at (8); they are still
/// read until they expire.
const DEDUP_VERSION: u8 = 2;

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

/// Compare without an early exit (the time taken does not tell where two MACs differ).
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len()
        && std::hint::black_box(a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y))) == 0
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

impl Spool {
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
    pub fn dedup_state_blocking(
        &self,
        key: DedupKey,
        digest: &[u8; 32],
    ) -> Result<DedupState, SpoolError> {
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

    /// For a commit, under the commit lock: is an identical transfer under `key` stored
    /// already (`Ok(true)`)? Another one under the same key is refused.
    pub(super) fn is_duplicate_blocking(
        &self,
        key: Option<DedupKey>,
        digest: &[u8; 32],
    ) -> Result<bool, SpoolError> {
        let Some(key) = key else {
            return Ok(false);
        };
        match self.dedup_state_blocking(key, digest)? {
            DedupState::New => Ok(false),
            DedupState::Identical => Ok(true),
            DedupState::Conflict => Err(SpoolError::IdentityMismatch("content of this transfer")),
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

    /// Add to `b` the dedup record of transfer `key`, whose content has `digest`, stored now.
    pub(super) fn put_dedup(&self, b: &mut Batch<'_>, key: DedupKey, digest: &[u8; 32]) {
        let mut v = vec![DEDUP_VERSION];
        v.extend_from_slice(&self.dedup_mac(key, digest));
        v.extend_from_slice(&now_ms().to_be_bytes());
        b.put(Cf::Dedup, &key.0, &v);
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
}
