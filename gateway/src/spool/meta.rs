//! What the spool stores about an object and about a queue entry's failed attempts: the
//! metadata record ([`ObjectMeta`]) and the failure record ([`FailureRecord`]), and their
//! byte encodings.
//!
//! Invariants:
//! - An object's metadata is stored sealed under its study key and bound to its object id
//!   (`meta_ad`), after a version byte and the study key id, which are the only parts in
//!   the clear.
//! - Every record starts with a version byte; a decoder answers `None` for what it does not
//!   know or what is malformed, never a panic. A failure record's optional trailer keeps the
//!   records written before it readable.
//! - A failure record is kept in the clear: it holds our own words and status codes only, at
//!   most `MAX_HISTORY` reasons of at most `MAX_REASON` bytes each, without control
//!   characters.

use std::sync::Arc;

use keystore::Dek;

use super::rocks::Cf;
use super::{ObjectId, Spool, SpoolError, blocking, now_ms};

/// Version byte of a metadata record.
const META_VERSION: u8 = 1;

/// Version byte of a failure record.
const FAIL_VERSION: u8 = 1;
/// Failure reasons kept per entry (the attempt history).
pub(super) const MAX_HISTORY: usize = 8;
/// Longest reason kept, in bytes.
const MAX_REASON: usize = 240;

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
    pub(super) fn identity_aad(id: &ObjectId, ident: &ResolvedIdentity) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + 5 * 66);
        out.extend_from_slice(&id.0);
        for s in [
            &ident.study,
            &ident.series,
            &ident.sop_instance,
            &ident.sop_class,
            &ident.transfer_syntax,
        ] {
            push_str(&mut out, s);
        }
        out
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
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
            push_str(&mut out, s);
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

    pub(crate) fn decode(id: ObjectId, b: &[u8]) -> Option<ObjectMeta> {
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

    pub(super) fn resolved(&self) -> ResolvedIdentity {
        ResolvedIdentity {
            study: self.study_uid.clone(),
            series: self.series_uid.clone(),
            sop_instance: self.sop_instance_uid.clone(),
            sop_class: self.sop_class_uid.clone(),
            transfer_syntax: self.transfer_syntax.clone(),
        }
    }
}

/// Append `s` with its length (u16 BE) in front.
fn push_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
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
pub(super) struct ResolvedIdentity {
    pub(super) study: String,
    pub(super) series: String,
    pub(super) sop_instance: String,
    pub(super) sop_class: String,
    pub(super) transfer_syntax: String,
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

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = vec![FAIL_VERSION];
        out.extend_from_slice(&self.attempts.to_be_bytes());
        out.push(self.history.len() as u8);
        for a in &self.history {
            out.extend_from_slice(&a.at_ms.to_be_bytes());
            push_str(&mut out, &a.reason);
        }
        // An optional trailer, so records written before it existed still decode.
        if let Some(t) = self.budget_from_ms {
            out.extend_from_slice(&t.to_be_bytes());
        }
        out
    }

    pub(crate) fn decode(b: &[u8]) -> Option<FailureRecord> {
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

pub(super) fn meta_ad(id: &ObjectId) -> Vec<u8> {
    let mut v = b"meta".to_vec();
    v.extend_from_slice(&id.0);
    v
}

/// The stored value of an object's metadata: the version byte, the study key id and the
/// sealed metadata.
pub(super) fn meta_value(kid: &[u8; 16], sealed_meta: &[u8]) -> Vec<u8> {
    let mut value = vec![META_VERSION];
    value.extend_from_slice(kid);
    value.extend_from_slice(sealed_meta);
    value
}

impl Spool {
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
}
