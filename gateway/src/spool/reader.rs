//! Reading an object back ([`ObjectReader`]), segment by segment, verifying each.
//!
//! Invariants:
//! - Every segment is opened under the study key with the object's identity, its index and
//!   its final flag as associated data, as the writer sealed it: a segment of another
//!   object, at another index or re-flagged fails to open ([`SpoolError::Corrupt`]); a
//!   missing one is [`SpoolError::MissingSegment`], never a short read.
//! - A final segment that is not the last one the metadata counts is
//!   [`SpoolError::Corrupt`], and so is a stream whose total length or SHA-256 differs from
//!   what the commit recorded: the final segment is then not handed out, so a delivery
//!   never completes an object that is not exactly what was acknowledged.
//! - [`Spool::verify_object_blocking`] (`dicom-gateway verify`) opens every segment the
//!   same way and also checks the total length and the SHA-256 of the whole stream against
//!   the metadata; the plaintext exists only one segment at a time, in memory.

use std::sync::Arc;

use keystore::Dek;

use super::meta::ObjectMeta;
use super::rocks::Cf;
use super::{ObjectId, Spool, SpoolError, blocking, seg_key};

/// Reads an object back, segment by segment, verifying each.
pub struct ObjectReader {
    spool: Spool,
    dek: Arc<Dek>,
    aad: Arc<Vec<u8>>,
    /// The object's metadata.
    pub meta: ObjectMeta,
    next: u64,
    done: bool,
    /// The stream read so far: its SHA-256 and length, checked at the final segment.
    digest: keystore::Sha256,
    length: u64,
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
        self.digest.update(&plain);
        self.length += plain.len() as u64;
        if is_final {
            self.done = true;
            if self.next != self.meta.segments {
                return Err(SpoolError::Corrupt(
                    id,
                    "segment count differs from metadata".into(),
                ));
            }
            let digest = std::mem::replace(&mut self.digest, keystore::Sha256::new()).finish();
            if self.length != self.meta.length || digest != self.meta.digest {
                return Err(SpoolError::Corrupt(
                    id,
                    "the stream's length or SHA-256 differs from the one recorded at commit".into(),
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

impl Spool {
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
            digest: keystore::Sha256::new(),
            length: 0,
            resend_seq: None,
        })
    }
}

/// Why an object failed [`Spool::verify_object_blocking`]: the reason word (as the failure
/// taxonomy of `docs/operations.md` has it) and a detail without patient data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyFailure {
    /// `integrity` (metadata, a segment, the length or the digest does not check out) or
    /// `missing_data` (a segment is gone).
    pub reason: &'static str,
    /// What failed.
    pub detail: String,
}

impl Spool {
    /// The ids of every stored object (DICOM objects and HL7 messages), in id order, after
    /// `after` (exclusive) and at most `max`. Blocking.
    pub fn object_ids_blocking(
        &self,
        after: Option<ObjectId>,
        max: usize,
    ) -> Result<Vec<ObjectId>, SpoolError> {
        let from = match after {
            Some(a) => {
                let mut k = a.0.to_vec();
                k.push(0);
                k
            }
            None => Vec::new(),
        };
        let mut out = Vec::new();
        for k in self.inner.store.keys_from(Cf::Meta, &from, max)? {
            if let Ok(id) = <[u8; 16]>::try_from(&k[..]) {
                out.push(ObjectId(id));
            }
        }
        Ok(out)
    }

    /// Open object `id` whole and check it: its metadata opens, every segment opens under
    /// its study key with its identity, index and final flag, there are as many as the
    /// metadata says, and the total length and the SHA-256 of the stream are the ones
    /// recorded at commit. Returns the plaintext bytes checked. Nothing is written.
    /// Blocking.
    ///
    /// # Errors
    ///
    /// The outer error is the store failing (the check could not be made); the inner one,
    /// the object failing the check.
    pub fn verify_object_blocking(
        &self,
        id: ObjectId,
    ) -> Result<Result<u64, VerifyFailure>, SpoolError> {
        let integrity = |detail: String| {
            Ok(Err(VerifyFailure {
                reason: "integrity",
                detail,
            }))
        };
        let (meta, dek) = match self.meta_blocking(id) {
            Ok(m) => m,
            Err(SpoolError::Store(e)) => return Err(SpoolError::Store(e)),
            Err(e) => return integrity(format!("metadata: {e}")),
        };
        let aad = ObjectMeta::identity_aad(&id, &meta.resolved());
        let mut digest = keystore::Sha256::new();
        let mut length = 0u64;
        let mut index = 0u64;
        loop {
            let Some(sealed) = self.inner.store.get(Cf::Seg, &seg_key(&id, index))? else {
                return Ok(Err(VerifyFailure {
                    reason: "missing_data",
                    detail: format!("segment {index} is missing"),
                }));
            };
            let (plain, is_final) = match keystore::open_segment(&dek, &aad, index, &sealed) {
                Ok(p) => p,
                Err(e) => return integrity(e.to_string()),
            };
            digest.update(&plain);
            length += plain.len() as u64;
            index += 1;
            if is_final {
                break;
            }
            if index >= meta.segments {
                return integrity(format!(
                    "no final segment among the {} the metadata counts",
                    meta.segments
                ));
            }
        }
        if index != meta.segments {
            return integrity(format!(
                "{index} segments, the metadata counts {}",
                meta.segments
            ));
        }
        if length != meta.length {
            return integrity(format!(
                "{length} bytes, the metadata records {}",
                meta.length
            ));
        }
        if digest.finish() != meta.digest {
            return integrity(
                "the SHA-256 of the stream differs from the one recorded at commit".into(),
            );
        }
        Ok(Ok(length))
    }
}
