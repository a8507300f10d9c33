//! `dicom-gateway verify`: every stored object opened whole and checked, and each that
//! fails quarantined.
//!
//! Owns the verification pass shared by the running node (`POST /v1/verify` on the admin
//! socket, one bounded batch per request) and by the command on a stopped node's data
//! directory. The check itself is the spool's ([`Spool::verify_object_blocking`]): metadata,
//! every segment's authentication, the segment count, the length and the SHA-256.
//!
//! Invariants:
//! - No plaintext is written anywhere: each segment is opened in memory, hashed and
//!   dropped.
//! - A batch is bounded (objects and bytes), so an admin request answers within its
//!   deadline; the caller continues from the `next` cursor.
//! - A failed object is quarantined inside the blocking task that found it (its queue
//!   entries become dead letters, synced), so dropping the request that started the batch
//!   never leaves a failure found but not recorded.

use serde::{Deserialize, Serialize};

use crate::spool::{ObjectId, Spool};

/// Most objects one batch checks.
pub const MAX_BATCH_OBJECTS: usize = 500;
/// A batch stops after the object that takes it past this many plaintext bytes.
pub const BATCH_BYTES: u64 = 256 << 20;

/// `POST /v1/verify`: where to start.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VerifyRequest {
    /// Continue after this object id (hex), as the previous batch's `next` said.
    #[serde(default)]
    pub after: Option<String>,
}

/// One object that failed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FailureView {
    /// Its internal id (hex), as `queue list` shows it.
    pub id: String,
    /// `integrity` or `missing_data`.
    pub reason: String,
    /// What failed (no patient data).
    pub detail: String,
    /// Its queue entries made dead letters now.
    pub quarantined: usize,
}

/// The answer to one batch.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VerifyBatch {
    /// Objects checked in this batch.
    pub checked: usize,
    /// Their plaintext bytes.
    pub bytes: u64,
    /// Those that failed.
    pub failures: Vec<FailureView>,
    /// The cursor for the next batch; `None` once every object was checked.
    pub next: Option<String>,
    /// Objects stored now (for progress).
    pub total: usize,
}

/// Parse an object id as `queue list` prints it.
pub fn parse_id(h: &str) -> anyhow::Result<ObjectId> {
    let b = hex::decode(h.trim()).map_err(|_| anyhow::anyhow!("an object id is 32 hex digits"))?;
    let b: [u8; 16] = b
        .try_into()
        .map_err(|_| anyhow::anyhow!("an object id is 32 hex digits"))?;
    Ok(ObjectId(b))
}

/// Check the objects after `after`, at most one batch, quarantining each that fails.
/// Blocking.
pub fn batch_blocking(spool: &Spool, after: Option<ObjectId>) -> anyhow::Result<VerifyBatch> {
    let ids = spool.object_ids_blocking(after, MAX_BATCH_OBJECTS)?;
    let mut out = VerifyBatch {
        total: spool.object_count_blocking()?,
        ..VerifyBatch::default()
    };
    let mut last = None;
    for id in ids {
        last = Some(id);
        out.checked += 1;
        match spool.verify_object_blocking(id)? {
            Ok(n) => out.bytes += n,
            Err(f) => {
                let quarantined = spool.quarantine_blocking(
                    id,
                    &format!("{}: {} (found by verify)", f.reason, f.detail),
                )?;
                tracing::warn!(object = %id.hex(), reason = f.reason, detail = %f.detail, quarantined, "verify: an object failed its check; its entries are dead letters now");
                out.failures.push(FailureView {
                    id: id.hex(),
                    reason: f.reason.to_owned(),
                    detail: f.detail,
                    quarantined,
                });
            }
        }
        if out.bytes >= BATCH_BYTES {
            break;
        }
    }
    out.next = match last {
        Some(id) if out.checked == MAX_BATCH_OBJECTS || out.bytes >= BATCH_BYTES => Some(id.hex()),
        _ => None,
    };
    Ok(out)
}
