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

use std::io::Read;

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

/// What a Part-10 header says.
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// The identity elements found in a data set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// (0008,0016) SOP Class UID.
    pub sop_class: Option<String>,
    /// (0008,0018) SOP Instance UID.
    pub sop_instance: Option<String>,
    /// (0020,000D) Study Instance UID.
    pub study: Option<String>,
    /// (0020,000E) Series Instance UID.
    pub series: Option<String>,
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
const TAG_STUDY: u32 = 0x0020_000D;
const TAG_SERIES: u32 = 0x0020_000E;
const ITEM: u32 = 0xFFFE_E000;
const ITEM_END: u32 = 0xFFFE_E00D;
const SEQ_END: u32 = 0xFFFE_E0DD;

/// Scan the start of a data set for its identity. `complete` says the prefix is the whole
/// data set, so running out of bytes ends the scan instead of asking for more.
pub fn scan_identity(
    prefix: &[u8],
    encoding: Encoding,
    complete: bool,
) -> Result<Scan, FormatError> {
    match encoding {
        Encoding::DeflatedExplicitLe => {
            let inflated = inflate_prefix(prefix, MAX_IDENTITY_PREFIX)?;
            // A deflated prefix only ends cleanly if the whole stream was given.
            scan_plain(&inflated, false, false, complete)
        }
        Encoding::ImplicitLe => scan_plain(prefix, false, true, complete),
        Encoding::ExplicitLe => scan_plain(prefix, false, false, complete),
        Encoding::ExplicitBe => scan_plain(prefix, true, false, complete),
    }
}

fn inflate_prefix(prefix: &[u8], limit: usize) -> Result<Vec<u8>, FormatError> {
    let mut out = Vec::new();
    let mut decoder = flate2::read::DeflateDecoder::new(prefix).take(limit as u64);
    let mut buf = [0u8; 16 * 1024];
    loop {
        match decoder.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            // A truncated stream ends with an error after yielding what it could.
            Err(_) => break,
        }
    }
    if out.is_empty() && prefix.len() > 1024 {
        return Err(FormatError::Malformed("deflated data set does not inflate"));
    }
    Ok(out)
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    big_endian: bool,
    implicit: bool,
}

enum Step {
    Element {
        tag: u32,
        vr: [u8; 2],
        len: u32,
        value_at: usize,
    },
    Short,
}

impl Cursor<'_> {
    fn u16_at(&self, at: usize) -> Option<u16> {
        let b = self.buf.get(at..at + 2)?;
        Some(if self.big_endian {
            u16::from_be_bytes([b[0], b[1]])
        } else {
            u16::from_le_bytes([b[0], b[1]])
        })
    }
    fn u32_at(&self, at: usize) -> Option<u32> {
        let b = self.buf.get(at..at + 4)?;
        Some(if self.big_endian {
            u32::from_be_bytes([b[0], b[1], b[2], b[3]])
        } else {
            u32::from_le_bytes([b[0], b[1], b[2], b[3]])
        })
    }

    /// Read an element header at the cursor.
    fn header(&self) -> Step {
        let p = self.pos;
        let (Some(g), Some(e)) = (self.u16_at(p), self.u16_at(p + 2)) else {
            return Step::Short;
        };
        let tag = (u32::from(g) << 16) | u32::from(e);
        // Item and delimiter tags never carry a VR.
        if g == 0xFFFE || self.implicit {
            return match self.u32_at(p + 4) {
                Some(len) => Step::Element {
                    tag,
                    vr: *b"  ",
                    len,
                    value_at: p + 8,
                },
                None => Step::Short,
            };
        }
        let Some(vr) = self.buf.get(p + 4..p + 6) else {
            return Step::Short;
        };
        let vr = [vr[0], vr[1]];
        if long_vr(vr) {
            match self.u32_at(p + 8) {
                Some(len) => Step::Element {
                    tag,
                    vr,
                    len,
                    value_at: p + 12,
                },
                None => Step::Short,
            }
        } else {
            match self.u16_at(p + 6) {
                Some(len) => Step::Element {
                    tag,
                    vr,
                    len: u32::from(len),
                    value_at: p + 8,
                },
                None => Step::Short,
            }
        }
    }
}

/// Outcome of skipping one nested structure.
enum Skip {
    Ok,
    Short,
}

fn scan_plain(
    buf: &[u8],
    big_endian: bool,
    implicit: bool,
    complete: bool,
) -> Result<Scan, FormatError> {
    let mut c = Cursor {
        buf,
        pos: 0,
        big_endian,
        implicit,
    };
    let mut id = Identity::default();
    loop {
        if c.pos >= buf.len() {
            return Ok(if complete {
                Scan::Done(id)
            } else {
                Scan::NeedMore
            });
        }
        let (tag, vr, len, value_at) = match c.header() {
            Step::Short => {
                return if complete {
                    Err(FormatError::Malformed(
                        "data set ends inside an element header",
                    ))
                } else {
                    Ok(Scan::NeedMore)
                };
            }
            Step::Element {
                tag,
                vr,
                len,
                value_at,
            } => (tag, vr, len, value_at),
        };
        if tag > TAG_SERIES {
            return Ok(Scan::Done(id));
        }
        if len == u32::MAX {
            // Undefined length: a sequence (or encapsulated data) to skip.
            c.pos = value_at;
            match skip_undefined(&mut c, 0)? {
                Skip::Ok => continue,
                Skip::Short => {
                    return if complete {
                        Err(FormatError::Malformed("data set ends inside a sequence"))
                    } else {
                        Ok(Scan::NeedMore)
                    };
                }
            }
        }
        let end = value_at + len as usize;
        let wanted = matches!(
            tag,
            TAG_SOP_CLASS | TAG_SOP_INSTANCE | TAG_STUDY | TAG_SERIES
        );
        if wanted {
            if len > 64 {
                return Err(FormatError::Malformed("UID element longer than 64 bytes"));
            }
            let Some(value) = buf.get(value_at..end) else {
                return if complete {
                    Err(FormatError::Malformed("data set ends inside a value"))
                } else {
                    Ok(Scan::NeedMore)
                };
            };
            if !implicit && &vr != b"UI" && &vr != b"UN" {
                return Err(FormatError::Malformed(
                    "identity element with a VR other than UI",
                ));
            }
            let v = Some(uid_value(value));
            match tag {
                TAG_SOP_CLASS => id.sop_class = v,
                TAG_SOP_INSTANCE => id.sop_instance = v,
                TAG_STUDY => id.study = v,
                _ => id.series = v,
            }
        }
        c.pos = end;
        if tag == TAG_SERIES {
            return Ok(Scan::Done(id));
        }
    }
}

/// Skip the content of an undefined-length sequence or encapsulated value whose header has
/// been consumed, up to and including its sequence delimiter.
fn skip_undefined(c: &mut Cursor<'_>, depth: usize) -> Result<Skip, FormatError> {
    if depth >= MAX_DEPTH {
        return Err(FormatError::Malformed("sequences nested too deeply"));
    }
    loop {
        let (tag, len, value_at) = match c.header() {
            Step::Short => return Ok(Skip::Short),
            Step::Element {
                tag, len, value_at, ..
            } => (tag, len, value_at),
        };
        match tag {
            SEQ_END => {
                c.pos = value_at;
                return Ok(Skip::Ok);
            }
            ITEM if len == u32::MAX => {
                c.pos = value_at;
                // An undefined-length item: elements until the item delimiter.
                loop {
                    let (tag, len, value_at) = match c.header() {
                        Step::Short => return Ok(Skip::Short),
                        Step::Element {
                            tag, len, value_at, ..
                        } => (tag, len, value_at),
                    };
                    if tag == ITEM_END {
                        c.pos = value_at;
                        break;
                    }
                    c.pos = value_at;
                    if len == u32::MAX {
                        if let Skip::Short = skip_undefined(c, depth + 1)? {
                            return Ok(Skip::Short);
                        }
                    } else {
                        c.pos = value_at + len as usize;
                        if c.pos > c.buf.len() {
                            return Ok(Skip::Short);
                        }
                    }
                }
            }
            ITEM => {
                c.pos = value_at + len as usize;
                if c.pos > c.buf.len() {
                    return Ok(Skip::Short);
                }
            }
            _ => {
                return Err(FormatError::Malformed(
                    "unexpected element inside a sequence",
                ));
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
