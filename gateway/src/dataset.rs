//! Part-10 framing and the identity scanner.
//!
//! The spool stores every object as a DICOM Part-10 byte stream (preamble, `DICM`, file meta,
//! data set). This module builds that header from a C-STORE's command, parses it back from a
//! STOW-RS part, and finds an object's identity (SOP class and instance, study and series
//! UIDs) in the first bytes of its data set without decoding values it does not need.
//!
//! Invariants:
//! - every length read from input is checked against the bytes at hand before use; nothing
//!   is allocated from a peer-supplied length except the UIDs we keep (at most 64 bytes);
//! - sequence nesting is bounded ([`MAX_DEPTH`]) and scanned input is bounded by the caller;
//! - the scanner never decodes pixel data and never fails on elements it does not know.

use crate::sop::Encoding;

/// Largest file meta group we parse.
pub const MAX_META_BYTES: usize = 64 * 1024;
/// Deepest sequence nesting the scanner follows.
pub const MAX_DEPTH: usize = 16;
/// Data set bytes we keep in memory while looking for the identity.
pub const MAX_IDENTITY_PREFIX: usize = 4 * 1024 * 1024;

/// Build the Part-10 header (128-byte preamble, `DICM`, file meta group) for an object.
pub fn part10_header(
    sop_class: &str,
    sop_instance: &str,
    ts: &str,
    source_ae: Option<&str>,
) -> Vec<u8> {
    let mut meta = Vec::with_capacity(256);
    let mut put = |element: u16, vr: &[u8; 2], value: &[u8]| {
        meta.extend_from_slice(&2u16.to_le_bytes());
        meta.extend_from_slice(&element.to_le_bytes());
        meta.extend_from_slice(vr);
        if vr == b"OB" {
            meta.extend_from_slice(&[0, 0]);
            meta.extend_from_slice(&(value.len() as u32).to_le_bytes());
        } else {
            meta.extend_from_slice(&(value.len() as u16).to_le_bytes());
        }
        meta.extend_from_slice(value);
    };
    let ui = |s: &str| {
        let mut v = s.as_bytes().to_vec();
        if v.len() % 2 == 1 {
            v.push(0);
        }
        v
    };
    let text = |s: &str| {
        let mut v = s.as_bytes().to_vec();
        if v.len() % 2 == 1 {
            v.push(b' ');
        }
        v
    };
    put(0x0001, b"OB", &[0, 1]);
    put(0x0002, b"UI", &ui(sop_class));
    put(0x0003, b"UI", &ui(sop_instance));
    put(0x0010, b"UI", &ui(ts));
    put(0x0012, b"UI", &ui(crate::IMPLEMENTATION_CLASS_UID));
    put(0x0013, b"SH", &text(crate::IMPLEMENTATION_VERSION_NAME));
    if let Some(ae) = source_ae.filter(|ae| !ae.is_empty()) {
        put(0x0016, b"AE", &text(ae));
    }
    let mut out = vec![0u8; 128];
    out.extend_from_slice(b"DICM");
    out.extend_from_slice(&[2, 0, 0, 0, b'U', b'L', 4, 0]);
    out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    out.extend_from_slice(&meta);
    out
}

/// Shows a patient-linked UID in `Debug` output without revealing it: only whether it is
/// there and its length. SOP class and transfer syntax UIDs name no patient and are shown.
pub struct RedactedUid<'a>(pub Option<&'a str>);

impl std::fmt::Debug for RedactedUid<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            None => f.write_str("None"),
            Some(u) => write!(f, "<redacted UID, {} bytes>", u.len()),
        }
    }
}

/// What a Part-10 header says.
#[derive(Clone, PartialEq, Eq)]
pub struct Part10Meta {
    /// (0002,0002)
    pub sop_class: String,
    /// (0002,0003)
    pub sop_instance: String,
    /// (0002,0010)
    pub transfer_syntax: String,
    /// Offset of the first data set byte.
    pub dataset_offset: usize,
}

impl std::fmt::Debug for Part10Meta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Part10Meta")
            .field("sop_class", &self.sop_class)
            .field("sop_instance", &RedactedUid(Some(&self.sop_instance)))
            .field("transfer_syntax", &self.transfer_syntax)
            .field("dataset_offset", &self.dataset_offset)
            .finish()
    }
}

/// Why input is not a usable DICOM object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// Not a Part-10 file.
    #[error("not a DICOM Part-10 stream: {0}")]
    NotPart10(&'static str),
    /// The file meta group is larger than [`MAX_META_BYTES`].
    #[error("file meta group too large")]
    MetaTooLarge,
    /// A required meta element is missing or not a valid UID.
    #[error("file meta element (0002,{0:04X}) missing or invalid")]
    MetaElement(u16),
    /// The data set is malformed where the scanner had to read it.
    #[error("malformed data set: {0}")]
    Malformed(&'static str),
    /// The identity was not found within [`MAX_IDENTITY_PREFIX`] bytes.
    #[error("identity elements not found in the first {MAX_IDENTITY_PREFIX} bytes")]
    PrefixTooLarge,
}

/// Parse a Part-10 header from the start of `buf`. `Ok(None)`: more bytes are needed.
pub fn parse_part10_header(buf: &[u8]) -> Result<Option<Part10Meta>, FormatError> {
    if buf.len() < 144 {
        if buf.len() >= 132 && &buf[128..132] != b"DICM" {
            return Err(FormatError::NotPart10("no DICM magic"));
        }
        return Ok(None);
    }
    if &buf[128..132] != b"DICM" {
        return Err(FormatError::NotPart10("no DICM magic"));
    }
    if buf[132..140] != [2, 0, 0, 0, b'U', b'L', 4, 0] {
        return Err(FormatError::NotPart10(
            "file meta does not start with group length",
        ));
    }
    let group_len = u32::from_le_bytes([buf[140], buf[141], buf[142], buf[143]]) as usize;
    if group_len > MAX_META_BYTES {
        return Err(FormatError::MetaTooLarge);
    }
    let end = 144 + group_len;
    if buf.len() < end {
        return Ok(None);
    }
    let (mut class, mut inst, mut ts) = (None, None, None);
    let mut pos = 144;
    while pos < end {
        let h = buf
            .get(pos..pos + 8)
            .ok_or(FormatError::NotPart10("truncated meta"))?;
        let group = u16::from_le_bytes([h[0], h[1]]);
        let element = u16::from_le_bytes([h[2], h[3]]);
        if group != 2 {
            return Err(FormatError::NotPart10("non-meta element inside file meta"));
        }
        let vr = [h[4], h[5]];
        let (len, header) = if long_vr(vr) {
            let l = buf
                .get(pos + 8..pos + 12)
                .ok_or(FormatError::NotPart10("truncated meta"))?;
            (u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize, 12)
        } else {
            (u16::from_le_bytes([h[6], h[7]]) as usize, 8)
        };
        let vstart = pos + header;
        let vend = vstart
            .checked_add(len)
            .filter(|e| *e <= end)
            .ok_or(FormatError::NotPart10("meta element overruns the group"))?;
        let value = &buf[vstart..vend];
        match element {
            0x0002 => class = Some(uid_value(value)),
            0x0003 => inst = Some(uid_value(value)),
            0x0010 => ts = Some(uid_value(value)),
            _ => {}
        }
        pos = vend;
    }
    let valid = |v: Option<String>, e: u16| {
        v.filter(|s| crate::dimse::is_valid_uid(s))
            .ok_or(FormatError::MetaElement(e))
    };
    Ok(Some(Part10Meta {
        sop_class: valid(class, 0x0002)?,
        sop_instance: valid(inst, 0x0003)?,
        transfer_syntax: valid(ts, 0x0010)?,
        dataset_offset: end,
    }))
}

fn uid_value(v: &[u8]) -> String {
    String::from_utf8_lossy(v)
        .trim_end_matches(['\0', ' '])
        .to_owned()
}

/// VRs with a 2-byte reserved field and a 4-byte length in explicit VR.
fn long_vr(vr: [u8; 2]) -> bool {
    matches!(
        &vr,
        b"OB"
            | b"OD"
            | b"OF"
            | b"OL"
            | b"OV"
            | b"OW"
            | b"SQ"
            | b"SV"
            | b"UC"
            | b"UN"
            | b"UR"
            | b"UT"
            | b"UV"
    )
}

/// The identity elements found in a data set. `Debug` redacts the patient-linked UIDs.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// (0008,0016) SOP Class UID.
    pub sop_class: Option<String>,
    /// (0008,0018) SOP Instance UID.
    pub sop_instance: Option<String>,
    /// (0008,0060) Modality, for routing; `None` when absent or not a plausible code
    /// (which never refuses an object).
    pub modality: Option<String>,
    /// (0020,000D) Study Instance UID.
    pub study: Option<String>,
    /// (0020,000E) Series Instance UID.
    pub series: Option<String>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("sop_class", &self.sop_class)
            .field("sop_instance", &RedactedUid(self.sop_instance.as_deref()))
            .field("modality", &self.modality)
            .field("study", &RedactedUid(self.study.as_deref()))
            .field("series", &RedactedUid(self.series.as_deref()))
            .finish()
    }
}

/// Result of scanning a data set prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scan {
    /// Every top-level element up to (0020,000E) has been seen (or the data set ended).
    Done(Identity),
    /// The prefix ends before the identity is complete.
    NeedMore,
}

const TAG_SOP_CLASS: u32 = 0x0008_0016;
const TAG_SOP_INSTANCE: u32 = 0x0008_0018;
const TAG_MODALITY: u32 = 0x0008_0060;
const TAG_STUDY: u32 = 0x0020_000D;
const TAG_SERIES: u32 = 0x0020_000E;
const ITEM: u32 = 0xFFFE_E000;
const ITEM_END: u32 = 0xFFFE_E00D;
const SEQ_END: u32 = 0xFFFE_E0DD;

/// Scan the start of a data set for its identity. `complete` says the prefix is the whole
/// data set, so running out of bytes ends the scan instead of asking for more.
///
/// A one-shot convenience over [`IdentityScanner`], which callers receiving a data set in
/// pieces use instead.
pub fn scan_identity(
    prefix: &[u8],
    encoding: Encoding,
    complete: bool,
) -> Result<Scan, FormatError> {
    let mut s = IdentityScanner::new(encoding);
    match s.feed(prefix)? {
        Scan::NeedMore if complete => s.finish(),
        scan => Ok(scan),
    }
}

/// Bytes of inflated output produced per step of a deflated scan.
const INFLATE_CHUNK: usize = 16 * 1024;

/// What the scanner expects next.
#[derive(Debug, Clone, Copy)]
enum Want {
    /// An element header (its first `hdr_len` bytes are in `hdr`).
    Header,
    /// Value bytes to pass over.
    Skip(u64),
    /// The value of an identity element (at most 64 bytes), gathered into `value`.
    Value { tag: u32, len: usize },
}

/// An open undefined-length container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frame {
    /// A sequence (or encapsulated value): items until the sequence delimiter.
    Seq,
    /// An item: elements until the item delimiter.
    Item,
}

/// Finds an object's identity in a data set delivered in pieces of any size, down to
/// empty or one-byte PDVs.
///
/// Invariants (what makes a slow trickle cheap):
/// - every input byte is examined once: values are passed over by count, and only element
///   headers (at most 12 bytes) and identity values (at most 64 bytes) are ever copied;
/// - a deflated data set is inflated incrementally, each compressed byte once, and at most
///   [`MAX_IDENTITY_PREFIX`] inflated bytes are looked at (a deflate bomb stops there);
/// - the state is bounded: one header, one UID, [`MAX_DEPTH`] nested sequences and the
///   inflater's window, whatever the input.
pub struct IdentityScanner {
    big_endian: bool,
    implicit: bool,
    /// The raw-deflate decoder, for the deflated syntax.
    inflater: Option<Box<flate2::Decompress>>,
    /// The deflate stream has ended; later input is ignored.
    inflate_ended: bool,
    want: Want,
    /// The element header being gathered.
    hdr: [u8; 12],
    hdr_len: usize,
    /// The identity value being gathered.
    value: Vec<u8>,
    /// Open undefined-length sequences and items, innermost last.
    stack: Vec<Frame>,
    /// Data set bytes (inflated, for the deflated syntax) consumed so far.
    scanned: u64,
    id: Identity,
    done: bool,
}

impl std::fmt::Debug for IdentityScanner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No UIDs: only the scan's position.
        f.debug_struct("IdentityScanner")
            .field("scanned", &self.scanned)
            .field("depth", &self.stack.len())
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl IdentityScanner {
    /// A scanner for a data set in `encoding`.
    pub fn new(encoding: Encoding) -> IdentityScanner {
        let (big_endian, implicit) = match encoding {
            Encoding::ImplicitLe => (false, true),
            Encoding::ExplicitBe => (true, false),
            Encoding::ExplicitLe | Encoding::DeflatedExplicitLe => (false, false),
        };
        IdentityScanner {
            big_endian,
            implicit,
            inflater: matches!(encoding, Encoding::DeflatedExplicitLe)
                .then(|| Box::new(flate2::Decompress::new(false))),
            inflate_ended: false,
            want: Want::Header,
            hdr: [0; 12],
            hdr_len: 0,
            value: Vec::new(),
            stack: Vec::new(),
            scanned: 0,
            id: Identity::default(),
            done: false,
        }
    }

    /// Data set bytes consumed so far (inflated bytes, for the deflated syntax).
    pub fn scanned(&self) -> u64 {
        self.scanned
    }

    /// Feed the next bytes of the data set. `Done` once the identity is complete (and on
    /// every call after that); `NeedMore` otherwise.
    pub fn feed(&mut self, data: &[u8]) -> Result<Scan, FormatError> {
        if !self.done {
            match self.inflater.take() {
                Some(mut z) => {
                    let r = self.feed_deflated(&mut z, data);
                    self.inflater = Some(z);
                    r?;
                }
                None => self.feed_plain(data)?,
            }
        }
        Ok(if self.done {
            Scan::Done(self.id.clone())
        } else {
            Scan::NeedMore
        })
    }

    /// The data set has ended: the identity as far as it goes, or why the data set is
    /// malformed where the scanner had to read it.
    pub fn finish(&mut self) -> Result<Scan, FormatError> {
        if self.done {
            return Ok(Scan::Done(self.id.clone()));
        }
        if !self.stack.is_empty() {
            return Err(FormatError::Malformed("data set ends inside a sequence"));
        }
        match self.want {
            Want::Header if self.hdr_len > 0 => Err(FormatError::Malformed(
                "data set ends inside an element header",
            )),
            Want::Value { .. } => Err(FormatError::Malformed("data set ends inside a value")),
            // A value that runs past the end is not ours to judge: it holds no identity.
            Want::Header | Want::Skip(_) => {
                self.done = true;
                Ok(Scan::Done(self.id.clone()))
            }
        }
    }

    fn feed_deflated(
        &mut self,
        z: &mut flate2::Decompress,
        mut input: &[u8],
    ) -> Result<(), FormatError> {
        let mut out = [0u8; INFLATE_CHUNK];
        while !self.done && !self.inflate_ended {
            let (in0, out0) = (z.total_in(), z.total_out());
            let status = z
                .decompress(input, &mut out, flate2::FlushDecompress::None)
                .map_err(|_| FormatError::Malformed("deflated data set does not inflate"))?;
            let used = (z.total_in() - in0) as usize;
            let produced = (z.total_out() - out0) as usize;
            input = input.get(used..).unwrap_or(&[]);
            self.feed_plain(&out[..produced])?;
            if status == flate2::Status::StreamEnd {
                self.inflate_ended = true;
            }
            // Stop when the input is used up and the decoder has no more output pending.
            if (input.is_empty() && produced < out.len()) || (used == 0 && produced == 0) {
                break;
            }
        }
        Ok(())
    }

    fn feed_plain(&mut self, mut data: &[u8]) -> Result<(), FormatError> {
        while !self.done && !data.is_empty() {
            match self.want {
                Want::Skip(n) => {
                    let k = n.min(data.len() as u64);
                    data = &data[k as usize..];
                    self.scanned += k;
                    self.want = if k == n {
                        Want::Header
                    } else {
                        Want::Skip(n - k)
                    };
                }
                Want::Value { tag, len } => {
                    let k = (len - self.value.len()).min(data.len());
                    self.value.extend_from_slice(&data[..k]);
                    data = &data[k..];
                    self.scanned += k as u64;
                    if self.value.len() == len {
                        self.store_value(tag);
                    }
                }
                Want::Header => {
                    let need = self.header_len();
                    let k = (need - self.hdr_len).min(data.len());
                    self.hdr[self.hdr_len..self.hdr_len + k].copy_from_slice(&data[..k]);
                    self.hdr_len += k;
                    data = &data[k..];
                    self.scanned += k as u64;
                    // The length of an explicit VR header is known only after its VR.
                    if self.hdr_len == need && self.header_len() == need {
                        self.element()?;
                    }
                }
            }
            if !self.done && self.scanned > MAX_IDENTITY_PREFIX as u64 {
                return Err(FormatError::PrefixTooLarge);
            }
        }
        Ok(())
    }

    fn u16_at(&self, at: usize) -> u16 {
        let b = [self.hdr[at], self.hdr[at + 1]];
        if self.big_endian {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        }
    }

    fn u32_at(&self, at: usize) -> u32 {
        let b = [
            self.hdr[at],
            self.hdr[at + 1],
            self.hdr[at + 2],
            self.hdr[at + 3],
        ];
        if self.big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        }
    }

    /// Bytes in the header being gathered: 8, or 12 for an explicit VR with a long length
    /// (known once its VR has arrived).
    fn header_len(&self) -> usize {
        if self.hdr_len >= 6
            && !self.implicit
            && self.u16_at(0) != 0xFFFE
            && long_vr([self.hdr[4], self.hdr[5]])
        {
            12
        } else {
            8
        }
    }

    /// Act on a complete element header.
    fn element(&mut self) -> Result<(), FormatError> {
        let group = self.u16_at(0);
        let tag = (u32::from(group) << 16) | u32::from(self.u16_at(2));
        // Item and delimiter tags never carry a VR.
        let (vr, len) = if group == 0xFFFE || self.implicit {
            (*b"  ", self.u32_at(4))
        } else if self.hdr_len == 12 {
            ([self.hdr[4], self.hdr[5]], self.u32_at(8))
        } else {
            ([self.hdr[4], self.hdr[5]], u32::from(self.u16_at(6)))
        };
        self.hdr_len = 0;
        self.want = Want::Header;
        match self.stack.last() {
            None => {
                if tag > TAG_SERIES {
                    self.done = true;
                } else if len == u32::MAX {
                    // Undefined length: a sequence (or encapsulated data) to pass over.
                    self.push_seq()?;
                } else if tag == TAG_MODALITY
                    && len <= 64
                    && (self.implicit || &vr == b"CS" || &vr == b"UN")
                {
                    // Routing only: an odd modality is ignored, never an error.
                    self.value.clear();
                    self.want = Want::Value {
                        tag,
                        len: len as usize,
                    };
                    if len == 0 {
                        self.store_value(tag);
                    }
                } else if matches!(
                    tag,
                    TAG_SOP_CLASS | TAG_SOP_INSTANCE | TAG_STUDY | TAG_SERIES
                ) {
                    if len > 64 {
                        return Err(FormatError::Malformed("UID element longer than 64 bytes"));
                    }
                    if !self.implicit && &vr != b"UI" && &vr != b"UN" {
                        return Err(FormatError::Malformed(
                            "identity element with a VR other than UI",
                        ));
                    }
                    self.value.clear();
                    self.want = Want::Value {
                        tag,
                        len: len as usize,
                    };
                    if len == 0 {
                        self.store_value(tag);
                    }
                } else {
                    self.want = Want::Skip(u64::from(len));
                }
            }
            Some(Frame::Seq) => match tag {
                SEQ_END => {
                    self.stack.pop();
                }
                ITEM if len == u32::MAX => self.stack.push(Frame::Item),
                ITEM => self.want = Want::Skip(u64::from(len)),
                _ => {
                    return Err(FormatError::Malformed(
                        "unexpected element inside a sequence",
                    ));
                }
            },
            Some(Frame::Item) => {
                if tag == ITEM_END {
                    self.stack.pop();
                } else if len == u32::MAX {
                    self.push_seq()?;
                } else {
                    self.want = Want::Skip(u64::from(len));
                }
            }
        }
        Ok(())
    }

    fn push_seq(&mut self) -> Result<(), FormatError> {
        let depth = self.stack.iter().filter(|f| **f == Frame::Seq).count();
        if depth >= MAX_DEPTH {
            return Err(FormatError::Malformed("sequences nested too deeply"));
        }
        self.stack.push(Frame::Seq);
        Ok(())
    }

    fn store_value(&mut self, tag: u32) {
        let v = Some(uid_value(&self.value));
        self.value.clear();
        self.want = Want::Header;
        match tag {
            TAG_SOP_CLASS => self.id.sop_class = v,
            TAG_SOP_INSTANCE => self.id.sop_instance = v,
            TAG_MODALITY => {
                self.id.modality = v.map(|m| m.trim().to_owned()).filter(|m| {
                    !m.is_empty() && m.len() <= 16 && m.bytes().all(|b| b.is_ascii_graphic())
                });
            }
            TAG_STUDY => self.id.study = v,
            _ => {
                self.id.series = v;
                self.done = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn el_le(out: &mut Vec<u8>, g: u16, e: u16, vr: &[u8; 2], value: &[u8]) {
        out.extend_from_slice(&g.to_le_bytes());
        out.extend_from_slice(&e.to_le_bytes());
        out.extend_from_slice(vr);
        if long_vr(*vr) {
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        } else {
            out.extend_from_slice(&(value.len() as u16).to_le_bytes());
        }
        out.extend_from_slice(value);
    }

    fn sample_explicit() -> Vec<u8> {
        let mut d = Vec::new();
        el_le(
            &mut d,
            0x0008,
            0x0016,
            b"UI",
            b"1.2.840.10008.5.1.4.1.1.7\0",
        );
        el_le(&mut d, 0x0008, 0x0018, b"UI", b"1.2.3.4\0");
        // an undefined-length sequence with one undefined-length item holding a nested SQ
        d.extend_from_slice(&[
            0x08, 0x00, 0x32, 0x10, b'S', b'Q', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
        ]);
        d.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        el_le(&mut d, 0x0008, 0x0100, b"SH", b"CODE");
        d.extend_from_slice(&[
            0x08, 0x00, 0x33, 0x10, b'S', b'Q', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
        ]);
        d.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 4, 0, 0, 0, 1, 2, 3, 4]);
        d.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        d.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
        d.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        el_le(&mut d, 0x0010, 0x0010, b"PN", b"DOE^JANE");
        el_le(&mut d, 0x0020, 0x000D, b"UI", b"1.2.3.5\0");
        el_le(&mut d, 0x0020, 0x000E, b"UI", b"1.2.3.6\0");
        el_le(&mut d, 0x7FE0, 0x0010, b"OB", &[9; 64]);
        d
    }

    #[test]
    fn finds_identity_past_nested_sequences() {
        let d = sample_explicit();
        let Scan::Done(id) = scan_identity(&d, Encoding::ExplicitLe, true).unwrap() else {
            panic!("not done")
        };
        assert_eq!(id.sop_class.as_deref(), Some("1.2.840.10008.5.1.4.1.1.7"));
        assert_eq!(id.sop_instance.as_deref(), Some("1.2.3.4"));
        assert_eq!(id.study.as_deref(), Some("1.2.3.5"));
        assert_eq!(id.series.as_deref(), Some("1.2.3.6"));
    }

    #[test]
    fn every_prefix_asks_for_more_and_never_panics() {
        let d = sample_explicit();
        let series_end = d.len() - (12 + 64);
        for cut in 0..series_end {
            assert_eq!(
                scan_identity(&d[..cut], Encoding::ExplicitLe, false).unwrap(),
                Scan::NeedMore,
                "cut {cut}"
            );
            // as a complete data set it is an error or a partial identity, never a panic
            let _ = scan_identity(&d[..cut], Encoding::ExplicitLe, true);
        }
    }

    #[test]
    fn implicit_and_big_endian_and_deflated() {
        let mut d = Vec::new();
        for (g, e, v) in [
            (8u16, 0x16u16, &b"1.2.9\0"[..]),
            (0x20, 0x0D, b"1.2.10"),
            (0x20, 0x0E, b"1.2.11"),
        ] {
            d.extend_from_slice(&g.to_le_bytes());
            d.extend_from_slice(&e.to_le_bytes());
            d.extend_from_slice(&(v.len() as u32).to_le_bytes());
            d.extend_from_slice(v);
        }
        let Scan::Done(id) = scan_identity(&d, Encoding::ImplicitLe, false).unwrap() else {
            panic!()
        };
        assert_eq!(id.series.as_deref(), Some("1.2.11"));

        let mut b = Vec::new();
        for (g, e, v) in [(8u16, 0x18u16, &b"1.2.9\0"[..]), (0x20, 0x0D, b"1.2.10")] {
            b.extend_from_slice(&g.to_be_bytes());
            b.extend_from_slice(&e.to_be_bytes());
            b.extend_from_slice(b"UI");
            b.extend_from_slice(&(v.len() as u16).to_be_bytes());
            b.extend_from_slice(v);
        }
        assert_eq!(
            scan_identity(&b, Encoding::ExplicitBe, false).unwrap(),
            Scan::NeedMore
        );
        let Scan::Done(id) = scan_identity(&b, Encoding::ExplicitBe, true).unwrap() else {
            panic!()
        };
        assert_eq!(id.sop_instance.as_deref(), Some("1.2.9"));
        assert_eq!(id.study.as_deref(), Some("1.2.10"));
        assert_eq!(id.series, None);

        let plain = sample_explicit();
        let mut enc =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut enc, &plain).unwrap();
        let deflated = enc.finish().unwrap();
        let Scan::Done(id) = scan_identity(&deflated, Encoding::DeflatedExplicitLe, true).unwrap()
        else {
            panic!()
        };
        assert_eq!(id.study.as_deref(), Some("1.2.3.5"));
    }

    #[test]
    fn hostile_lengths_are_bounded() {
        let mut d = Vec::new();
        // huge UID length: refused without allocating
        d.extend_from_slice(&[
            0x08, 0x00, 0x18, 0x00, b'U', b'N', 0, 0, 0xF0, 0xFF, 0xFF, 0x7F,
        ]);
        assert!(scan_identity(&d, Encoding::ExplicitLe, false).is_err());
        // deep nesting
        let mut deep = Vec::new();
        for _ in 0..(MAX_DEPTH + 2) {
            deep.extend_from_slice(&[
                0x08, 0x00, 0x32, 0x10, b'S', b'Q', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
            ]);
            deep.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        }
        assert!(scan_identity(&deep, Encoding::ExplicitLe, false).is_err());
    }

    fn deflate(plain: &[u8]) -> Vec<u8> {
        let mut enc =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut enc, plain).unwrap();
        enc.finish().unwrap()
    }

    /// Feed `data` in pieces of the sizes `sizes` yields (0 included), then finish.
    fn feed_in_pieces(
        data: &[u8],
        encoding: Encoding,
        mut sizes: impl FnMut() -> usize,
    ) -> (Result<Scan, FormatError>, u64) {
        let mut s = IdentityScanner::new(encoding);
        let mut rest = data;
        while !rest.is_empty() {
            let n = sizes().min(rest.len());
            let (piece, tail) = rest.split_at(n);
            rest = tail;
            match s.feed(piece) {
                Ok(Scan::NeedMore) => {}
                other => return (other, s.scanned()),
            }
        }
        (s.finish(), s.scanned())
    }

    #[test]
    fn pieces_of_any_size_give_the_one_shot_result() {
        let plain = sample_explicit();
        let deflated = deflate(&plain);
        let whole = scan_identity(&plain, Encoding::ExplicitLe, true).unwrap();
        assert!(matches!(whole, Scan::Done(ref id) if id.series.is_some()));
        for (data, enc) in [
            (&plain, Encoding::ExplicitLe),
            (&deflated, Encoding::DeflatedExplicitLe),
        ] {
            // one byte at a time, with an empty piece between every two
            let mut flip = false;
            let (r, _) = feed_in_pieces(data, enc, || {
                flip = !flip;
                usize::from(flip)
            });
            assert_eq!(r.unwrap(), whole, "{enc:?} byte by byte");
            let mut rng = fastrand::Rng::with_seed(7);
            for _ in 0..50 {
                let (r, _) = feed_in_pieces(data, enc, || rng.usize(0..40));
                assert_eq!(r.unwrap(), whole, "{enc:?} random pieces");
            }
        }
        // every cut of the stream, fed in two pieces, agrees with the one-shot scan
        for cut in 0..plain.len() {
            let mut s = IdentityScanner::new(Encoding::ExplicitLe);
            let a = s.feed(&plain[..cut]).unwrap();
            assert_eq!(
                a,
                scan_identity(&plain[..cut], Encoding::ExplicitLe, false).unwrap()
            );
            assert_eq!(s.feed(&plain[cut..]).unwrap(), whole, "cut {cut}");
        }
    }

    /// The adversarial stream of the review: thousands of small private elements ahead of
    /// the identity, delivered one byte per write. Each byte is consumed exactly once, and
    /// no more than the data set's own bytes are ever looked at.
    #[test]
    fn a_trickle_examines_each_byte_once() {
        let mut d = Vec::new();
        el_le(
            &mut d,
            0x0008,
            0x0016,
            b"UI",
            b"1.2.840.10008.5.1.4.1.1.7\0",
        );
        el_le(&mut d, 0x0008, 0x0018, b"UI", b"1.2.3.4\0");
        for i in 0..40_000u16 {
            el_le(&mut d, 0x0009, 0x1000 | (i & 0xFF), b"LO", b"xy");
        }
        el_le(&mut d, 0x0020, 0x000D, b"UI", b"1.2.3.5\0");
        el_le(&mut d, 0x0020, 0x000E, b"UI", b"1.2.3.6\0");
        let (r, scanned) = feed_in_pieces(&d, Encoding::ExplicitLe, || 1);
        let Scan::Done(id) = r.unwrap() else { panic!() };
        assert_eq!(id.series.as_deref(), Some("1.2.3.6"));
        assert_eq!(scanned, d.len() as u64, "each byte once");
        let z = deflate(&d);
        let (r, scanned) = feed_in_pieces(&z, Encoding::DeflatedExplicitLe, || 1);
        assert!(matches!(r.unwrap(), Scan::Done(ref i) if i.study.as_deref() == Some("1.2.3.5")));
        assert_eq!(scanned, d.len() as u64, "each inflated byte once");
    }

    #[test]
    fn a_deflate_bomb_stops_at_the_prefix_limit() {
        // 64 MiB of one private element's zeros, deflated to about 64 KiB, ahead of the
        // identity: the scanner gives up after MAX_IDENTITY_PREFIX inflated bytes.
        let mut head = Vec::new();
        head.extend_from_slice(&[0x09, 0x00, 0x10, 0x10, b'U', b'N', 0, 0]);
        head.extend_from_slice(&(64u32 << 20).to_le_bytes());
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        std::io::Write::write_all(&mut enc, &head).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..64 {
            std::io::Write::write_all(&mut enc, &zeros).unwrap();
        }
        let z = enc.finish().unwrap();
        assert!(z.len() < 1 << 20);
        let mut s = IdentityScanner::new(Encoding::DeflatedExplicitLe);
        assert_eq!(s.feed(&z), Err(FormatError::PrefixTooLarge));
        assert!(s.scanned() <= MAX_IDENTITY_PREFIX as u64 + INFLATE_CHUNK as u64);
        // and garbage that is not deflate at all is refused, not waited on
        let mut s = IdentityScanner::new(Encoding::DeflatedExplicitLe);
        assert!(matches!(
            s.feed(&[0xFF; 64]),
            Err(FormatError::Malformed(_))
        ));
    }

    #[test]
    fn debug_output_redacts_patient_uids() {
        let Scan::Done(id) = scan_identity(&sample_explicit(), Encoding::ExplicitLe, true).unwrap()
        else {
            panic!()
        };
        let h = part10_header(
            "1.2.840.10008.5.1.4.1.1.7",
            "1.2.3.4",
            "1.2.840.10008.1.2.1",
            None,
        );
        let meta = parse_part10_header(&h).unwrap().unwrap();
        let shown = format!("{id:?} {:?} {meta:?}", Scan::Done(id.clone()));
        for uid in ["1.2.3.4", "1.2.3.5", "1.2.3.6"] {
            assert!(!shown.contains(uid), "{uid} in {shown}");
        }
        assert!(shown.contains("1.2.840.10008.5.1.4.1.1.7"), "{shown}");
        assert!(shown.contains("redacted"), "{shown}");
    }

    #[test]
    fn part10_header_round_trips() {
        let h = part10_header(
            "1.2.840.10008.5.1.4.1.1.2",
            "1.2.3",
            "1.2.840.10008.1.2.1",
            Some("MODALITY"),
        );
        assert_eq!(&h[128..132], b"DICM");
        let mut buf = h.clone();
        buf.extend_from_slice(b"rest");
        for cut in 0..h.len() {
            assert_eq!(parse_part10_header(&buf[..cut]).unwrap(), None, "cut {cut}");
        }
        let m = parse_part10_header(&buf).unwrap().unwrap();
        assert_eq!(m.sop_class, "1.2.840.10008.5.1.4.1.1.2");
        assert_eq!(m.sop_instance, "1.2.3");
        assert_eq!(m.transfer_syntax, "1.2.840.10008.1.2.1");
        assert_eq!(m.dataset_offset, h.len());
        let mut bad = buf.clone();
        bad[129] = b'X';
        assert!(parse_part10_header(&bad).is_err());
        let mut huge = h.clone();
        huge[140..144].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(parse_part10_header(&huge), Err(FormatError::MetaTooLarge));
    }

    #[test]
    fn header_parses_with_dicom_object_too() {
        // Our header is a valid file meta for an independent parser.
        let h = part10_header(
            "1.2.840.10008.5.1.4.1.1.2",
            "1.2.3",
            "1.2.840.10008.1.2.1",
            None,
        );
        let meta = dicom_object::meta::FileMetaTable::from_reader(&h[128..]).unwrap();
        assert_eq!(meta.transfer_syntax(), "1.2.840.10008.1.2.1");
        assert_eq!(meta.media_storage_sop_instance_uid(), "1.2.3");
    }
}
