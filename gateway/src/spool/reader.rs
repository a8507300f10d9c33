//! Reading an object back ([`ObjectReader`]), segment by segment, verifying each.
//!
//! Invariants:
//! - Every segment is opened under the study key with the object's identity, its index and
//!   its final flag as associated data, as the writer sealed it: a segment of another
//!   object, at another index or re-flagged fails to open ([`SpoolError::Corrupt`]); a
//!   missing one is [`SpoolError::MissingSegment`], never a short read.
//! - A final segment that is not the last one the metadata counts is
//!   [`SpoolError::Corrupt`].

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
            resend_seq: None,
        })
    }
}
