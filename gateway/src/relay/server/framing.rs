//! The framing of a STOW-RS request on the link: what a request body must look like before
//! anything of it is stored.
//!
//! Owns the request's media type and boundary, the multipart reader and its bounds, a part's
//! headers (`Content-Type`, `Content-ID`, `Content-Digest`) and the Part-10 header at the
//! start of a part. The listener ([`super`]) adds the spool around it: deduplication, the
//! writer, the digest check and the commit. This part has no socket and no storage, so the
//! fuzz target `link_request` (`crate::fuzzing::link_request`) runs exactly this code.
//!
//! Invariants:
//! - bytes outside part bodies (preamble, boundaries, part headers) are counted as they
//!   arrive and bounded ([`super::MAX_OUTSIDE_PARTS`]) before multer buffers them; a part
//!   body is bounded by the `part_limit` given to [`StowParts::new`];
//! - a part's Part-10 header is read only as far as its file meta group, itself bounded
//!   ([`dataset::MAX_META_BYTES`]);
//! - whatever the bytes, the outcome is a part or a refusal ([`PartResult`], or a status
//!   for the whole request), never a panic.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::{HeaderMap, StatusCode, header};

use super::{MAX_CONTENT_ID, MAX_OUTSIDE_PARTS, PartResult, boundary_of, multipart_failure};
use crate::dataset::{self, Part10Meta};

/// The boundary of a STOW-RS request body (`multipart/related; type="application/dicom"`),
/// or the status that refuses the request and why.
pub(crate) fn stow_boundary(content_type: &str) -> Result<String, (StatusCode, &'static str)> {
    let lower = content_type.to_ascii_lowercase();
    if !lower.starts_with("multipart/related")
        || (lower.contains("type=") && !lower.contains("application/dicom"))
    {
        return Err((
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "expected multipart/related; type=\"application/dicom\"",
        ));
    }
    boundary_of(content_type).ok_or((StatusCode::BAD_REQUEST, "no multipart boundary"))
}

/// The parts of one request body, read with the bounds of the module docs.
pub(crate) struct StowParts {
    multipart: multer::Multipart<'static>,
    /// Bytes pulled from the body since the current part body ended (or the body began).
    between_parts: Arc<AtomicU64>,
    /// A part body is being read: its bytes count against the part limit instead.
    in_part: Arc<AtomicBool>,
}

impl StowParts {
    /// Read `body`, whose parts are separated by `boundary`; a part body larger than
    /// `part_limit` bytes is refused.
    pub(crate) fn new<S, E>(body: S, boundary: String, part_limit: u64) -> StowParts
    where
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        // multer buffers part headers until the blank line without a limit of its own, so
        // bytes pulled while no part body is being read are counted and bounded here.
        let between_parts = Arc::new(AtomicU64::new(0));
        let in_part = Arc::new(AtomicBool::new(false));
        let (count, active) = (between_parts.clone(), in_part.clone());
        let stream = body.map(move |item| {
            let chunk = item.map_err(std::io::Error::other)?;
            if !active.load(Ordering::Relaxed)
                && count.fetch_add(chunk.len() as u64, Ordering::Relaxed) > MAX_OUTSIDE_PARTS
            {
                return Err(std::io::Error::other("multipart headers too large"));
            }
            Ok(chunk)
        });
        let constraints =
            multer::Constraints::new().size_limit(multer::SizeLimit::new().per_field(part_limit));
        StowParts {
            multipart: multer::Multipart::with_constraints(stream, boundary, constraints),
            between_parts,
            in_part,
        }
    }

    /// The next part; `Ok(None)` after the closing boundary. What is left of the previous
    /// part is skipped. After an `Err` the body is unusable.
    pub(crate) async fn next_part(&mut self) -> Result<Option<multer::Field<'static>>, PartResult> {
        self.in_part.store(false, Ordering::Relaxed);
        match self.multipart.next_field().await {
            Ok(Some(field)) => {
                self.in_part.store(true, Ordering::Relaxed);
                self.between_parts.store(0, Ordering::Relaxed);
                Ok(Some(field))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(multipart_failure(&e, "multipart")),
        }
    }
}

/// What a part's headers say, once they pass.
#[derive(Debug, Clone)]
pub(crate) struct PartHeaders {
    /// `Content-ID`: the sender's transfer id (1 to [`MAX_CONTENT_ID`] visible characters).
    pub(crate) transfer_id: String,
    /// `Content-Digest`: the SHA-256 the part's content must have.
    pub(crate) digest: [u8; 32],
}

/// Check a part's headers: `application/dicom`, a usable `Content-ID` and a `sha-256`
/// `Content-Digest`.
pub(crate) fn part_headers(h: &HeaderMap) -> Result<PartHeaders, PartResult> {
    let ct = h
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.trim().eq_ignore_ascii_case("application/dicom") {
        return Err(PartResult::BadRequest(
            "part is not application/dicom".into(),
        ));
    }
    let Some(transfer_id) = h
        .get("content-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| {
            !v.is_empty() && v.len() <= MAX_CONTENT_ID && v.bytes().all(|b| b.is_ascii_graphic())
        })
        .map(str::to_owned)
    else {
        return Err(PartResult::BadRequest(
            "part has no usable Content-ID".into(),
        ));
    };
    let Some(digest) = h
        .get("content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(crate::relay::parse_content_digest)
    else {
        return Err(PartResult::BadRequest(
            "part has no sha-256 Content-Digest".into(),
        ));
    };
    Ok(PartHeaders {
        transfer_id,
        digest,
    })
}

/// Read a part up to the end of its Part-10 header: the bytes read so far (the header and
/// whatever followed it in the same chunks) and what the header says.
pub(crate) async fn read_part10_head(
    field: &mut multer::Field<'static>,
) -> Result<(Vec<u8>, Part10Meta), PartResult> {
    let mut head = Vec::new();
    loop {
        match dataset::parse_part10_header(&head) {
            Ok(Some(meta)) => return Ok((head, meta)),
            // The parser bounds the meta group; this only guards against a parser that
            // keeps asking for more.
            Ok(None) if head.len() > dataset::MAX_META_BYTES + 144 => {
                return Err(PartResult::BadRequest("Part-10 header too large".into()));
            }
            Ok(None) => {}
            Err(e) => return Err(PartResult::BadRequest(e.to_string())),
        }
        match field.chunk().await {
            Ok(Some(c)) => head.extend_from_slice(&c),
            Ok(None) => {
                return Err(PartResult::BadRequest(
                    "part ends inside the Part-10 header".into(),
                ));
            }
            Err(e) => return Err(multipart_failure(&e, "multipart")),
        }
    }
}

/// Refuse what the spool does not take: a transfer syntax it does not know, a SOP class
/// that is not a storage class.
pub(crate) fn check_storable(meta: &Part10Meta) -> Result<(), PartResult> {
    if crate::sop::encoding(&meta.transfer_syntax).is_none() {
        return Err(PartResult::BadRequest("unsupported transfer syntax".into()));
    }
    if !crate::sop::may_be_stored(&meta.sop_class) {
        return Err(PartResult::BadRequest("not a storage SOP class".into()));
    }
    Ok(())
}
