//! Fuzz entry points: one function per `cargo fuzz` target of `fuzz/fuzz_targets/`, each
//! feeding arbitrary bytes to the gateway's real parsers of peer input and stored data.
//!
//! Owns the targets' input formats and the properties they check (see [`TARGETS`]); the
//! parsers stay where they are. The fuzz crate (`fuzz/`, a workspace of its own, run by
//! `.ci/fuzz.sh`) only calls these functions, and the replay test of this module runs
//! every committed seed (`fuzz/corpus/<target>/`) and every regression input
//! (`fuzz/regressions/<target>/`) through them under a plain `cargo test`, so CI checks
//! the corpora without cargo-fuzz.
//!
//! Invariants:
//! - an entry returns normally for every input; a panic (or an allocation or run time
//!   past the fuzzer's limits) is a finding, whether it comes from a parser or from a
//!   property below that does not hold;
//! - entries use no network, no disk and no clock, and build no state that outlives a
//!   call except fixed key material and a single-threaded runtime.

use std::sync::OnceLock;

use keystore::{Dek, Kek, SegmentOpener};

use crate::dataset::{self, IdentityScanner, Scan};
use crate::dimse::{self, Command, CommandAssembler};
use crate::relay::server::framing;
use crate::sop::Encoding;
use crate::spool::{FailureRecord, ObjectId, ObjectMeta};

/// A fuzz entry point: takes any bytes, returns normally.
pub type Entry = fn(&[u8]);

/// Every fuzz target: its name (the file `fuzz/fuzz_targets/<name>.rs` and the corpus
/// folders) and its entry point.
pub const TARGETS: &[(&str, Entry)] = &[
    ("dimse", dimse),
    ("dataset_identity", dataset_identity),
    ("link_request", link_request),
    ("envelope", envelope),
];

/// The largest PDU the fuzzed PDU reader accepts: the listener's default `max_pdu_length`.
const FUZZ_MAX_PDU: u32 = 256 * 1024;

/// The DIMSE layer: a command set, or a stream of PDUs whose command PDVs are reassembled.
///
/// Input: when the first byte is a PDU type (1 to 7), a byte stream as read from an
/// association (PDUs read by `dicom-ul` in strict mode, as the listener reads them) whose
/// command fragments go through [`CommandAssembler`]; otherwise one command set for
/// [`Command::decode`]. Property: a decoded command (and the response built from it)
/// re-encodes to bytes that decode to the same command.
pub fn dimse(data: &[u8]) {
    match data.first() {
        Some(0x01..=0x07) => {
            let mut buf = data;
            let mut assembler = CommandAssembler::default();
            while let Ok(Some(pdu)) = dicom_ul::read_pdu(&mut buf, FUZZ_MAX_PDU, true) {
                let dicom_ul::Pdu::PData { data: pdvs } = pdu else {
                    // The listener aborts on any other PDU within an association.
                    return;
                };
                for pdv in pdvs {
                    if pdv.value_type != dicom_ul::pdu::PDataValueType::Command {
                        continue;
                    }
                    match assembler.push(&pdv.data, pdv.is_last) {
                        Ok(Some(cmd)) => command_round_trips(&cmd),
                        Ok(None) => {}
                        Err(_) => return,
                    }
                }
            }
        }
        _ => {
            if let Ok(cmd) = Command::decode(data) {
                command_round_trips(&cmd);
            }
        }
    }
}

/// `cmd` and its response survive an encode and decode.
fn command_round_trips(cmd: &Command) {
    for c in [cmd.clone(), cmd.response(dimse::status::SUCCESS)] {
        let bytes = c.encode();
        // A command decoded near the size bound may encode to a few bytes more (the
        // group length, Command Data Set Type, padding), which our decoder refuses.
        if bytes.len() > dimse::MAX_COMMAND_BYTES {
            continue;
        }
        let back = match Command::decode(&bytes) {
            Ok(b) => b,
            Err(e) => panic!("an encoded command does not decode: {e}"),
        };
        // The error comment is cleaned on encoding (ASCII, no controls, 64 characters).
        let comment_ok = back
            .error_comment
            .as_deref()
            .is_none_or(|s| s.len() <= 64 && s.chars().all(|c| c.is_ascii() && !c.is_control()));
        assert!(comment_ok, "error comment not cleaned: {back:?}");
        let (mut a, mut b) = (c, back);
        a.error_comment = None;
        b.error_comment = None;
        assert_eq!(a, b, "command changed in an encode and decode");
    }
}

/// The data set header and identity scanner.
///
/// Input: a Part-10 stream (preamble, `DICM`, file meta, data set), whose data set is
/// scanned in the encoding its transfer syntax names; or, when it is no Part-10 stream
/// (or names a transfer syntax the gateway does not know), a selector byte (encoding and
/// piece sizes) and a bare data set. Properties: the file meta's UIDs are valid; the data
/// set fed in pieces of any size (empty ones included) gives what one call gives; no byte
/// is consumed twice; the inflated bytes looked at stay within the prefix bound.
pub fn dataset_identity(data: &[u8]) {
    let selector = data.first().copied().unwrap_or(0);
    let meta = dataset::parse_part10_header(data).ok().flatten();
    let (encoding, body) = match &meta {
        Some(m) => {
            for uid in [&m.sop_class, &m.sop_instance, &m.transfer_syntax] {
                assert!(dimse::is_valid_uid(uid), "meta UID accepted unchecked");
            }
            let body = data
                .get(m.dataset_offset..)
                .unwrap_or_else(|| panic!("data set offset past the input"));
            match crate::sop::encoding(&m.transfer_syntax) {
                Some(e) => (e, body),
                None => (encoding_from(selector), body),
            }
        }
        None => (encoding_from(selector), data.get(1..).unwrap_or(&[])),
    };
    scan_in_pieces(body, encoding, seed_of(data));
}

fn encoding_from(selector: u8) -> Encoding {
    match selector % 4 {
        0 => Encoding::ImplicitLe,
        1 => Encoding::ExplicitLe,
        2 => Encoding::ExplicitBe,
        _ => Encoding::DeflatedExplicitLe,
    }
}

/// A seed for the piece sizes, from the input itself (the same input, the same pieces).
fn seed_of(data: &[u8]) -> u64 {
    data.iter()
        .take(64)
        .fold(data.len() as u64, |h, b| h.rotate_left(5) ^ u64::from(*b))
}

fn scan_in_pieces(body: &[u8], encoding: Encoding, seed: u64) {
    let whole = dataset::scan_identity(body, encoding, true);
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut scanner = IdentityScanner::new(encoding);
    let mut rest = body;
    let mut fed = 0u64;
    let pieces = loop {
        if rest.is_empty() {
            break scanner.finish();
        }
        let n = match rng.u8(..) {
            0..=31 => 0,
            32..=223 => rng.usize(1..=16),
            _ => rng.usize(17..=4096),
        }
        .min(rest.len());
        let (piece, tail) = rest.split_at(n);
        rest = tail;
        fed += n as u64;
        match scanner.feed(piece) {
            Ok(Scan::NeedMore) => {}
            other => break other,
        }
    };
    if encoding == Encoding::DeflatedExplicitLe {
        // Where a corrupt deflate stream is noticed depends on how its bytes arrive, so
        // only the bound is checked: at most the prefix limit and one inflated chunk.
        assert!(
            scanner.scanned() <= dataset::MAX_IDENTITY_PREFIX as u64 + 64 * 1024,
            "inflated past the identity prefix bound"
        );
    } else {
        assert!(scanner.scanned() <= fed, "a byte was consumed twice");
        // Past the prefix bound the two differ in where they stop, by design.
        if body.len() <= dataset::MAX_IDENTITY_PREFIX {
            assert_eq!(pieces, whole, "pieces and one call disagree ({encoding:?})");
        }
    }
}

/// Largest part body the fuzzed link reader accepts, small enough for a fuzzer to pass.
const FUZZ_PART_LIMIT: u64 = 16 * 1024;

/// The link's STOW-RS request reader ([`framing`]).
///
/// Input: the request's `Content-Type` value, a line feed, and the body, which arrives in
/// chunks of sizes chosen from the input. Every part goes through what the listener does
/// before the spool: its headers, its Part-10 header, the storable check, and then the
/// identity scan of its data set as the spool's writer runs it on the rest of the part.
pub fn link_request(data: &[u8]) {
    link_parts_scanned(data);
}

/// [`link_request`], returning how many parts reached the identity scan (for the tests:
/// the seeds must reach it).
fn link_parts_scanned(data: &[u8]) -> usize {
    let (ct, body) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let ct = ct.strip_suffix(b"\r").unwrap_or(ct);
    // As the listener reads the header: a value that is not visible ASCII counts as none.
    let ct = http::HeaderValue::from_bytes(ct)
        .ok()
        .and_then(|v| v.to_str().ok().map(str::to_owned))
        .unwrap_or_default();
    let Ok(boundary) = framing::stow_boundary(&ct) else {
        return 0;
    };
    let mut rng = fastrand::Rng::with_seed(seed_of(data));
    let mut chunks = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let n = match rng.u8(..) {
            0..=15 => 0,
            16..=191 => rng.usize(1..=64),
            _ => rng.usize(65..=8192),
        }
        .min(rest.len());
        let (c, tail) = rest.split_at(n);
        chunks.push(Ok::<_, std::io::Error>(bytes::Bytes::copy_from_slice(c)));
        rest = tail;
    }
    let stream = futures_util::stream::iter(chunks);
    runtime().block_on(async move {
        let mut parts = framing::StowParts::new(stream, boundary, FUZZ_PART_LIMIT);
        let mut scanned = 0;
        while let Ok(Some(mut field)) = parts.next_part().await {
            if framing::part_headers(field.headers()).is_err() {
                continue;
            }
            let Ok((head, meta)) = framing::read_part10_head(&mut field).await else {
                continue;
            };
            if framing::check_storable(&meta).is_err() {
                continue;
            }
            let Some(encoding) = crate::sop::encoding(&meta.transfer_syntax) else {
                continue;
            };
            scanned += 1;
            let mut scanner = IdentityScanner::new(encoding);
            let mut scanning = matches!(
                scanner.feed(head.get(meta.dataset_offset..).unwrap_or(&[])),
                Ok(Scan::NeedMore)
            );
            while let Ok(Some(chunk)) = field.chunk().await {
                if scanning {
                    scanning = matches!(scanner.feed(&chunk), Ok(Scan::NeedMore));
                }
            }
            if scanning {
                let _ = scanner.finish();
            }
        }
        scanned
    })
}

/// A single-threaded runtime per fuzzing thread, built once.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap_or_else(|e| panic!("fuzzing runtime: {e}"))
    })
}

/// The fixed KEK of the envelope target (never a real key: it is in the source).
const FUZZ_KEK: [u8; 32] = [0x4B; 32];
/// The wrapping context of [`WRAPPED_DEK`].
const FUZZ_DEK_CONTEXT: &[u8] = b"fuzz study key";
/// A DEK wrapped under [`FUZZ_KEK`] by `Kek::wrap`, so that sealed seeds open in every run.
const WRAPPED_DEK: [u8; 65] = [
    1, 0, 0, 0, 1, 219, 243, 0, 176, 99, 124, 76, 224, 36, 116, 8, 171, 15, 34, 124, 69, 52, 112,
    25, 188, 37, 54, 116, 23, 213, 245, 8, 194, 72, 75, 228, 48, 252, 25, 157, 18, 190, 106, 65,
    41, 138, 212, 184, 252, 228, 25, 72, 249, 50, 130, 82, 167, 67, 150, 144, 206, 37, 216, 20,
    141,
];
/// The object identity segments of the envelope target are bound to.
const FUZZ_IDENTITY: &[u8] = b"fuzz object identity";
/// The associated data records of the envelope target are sealed with.
const FUZZ_RECORD_AD: &[u8] = b"fuzz record";

fn fuzz_kek() -> &'static Kek {
    static KEK: OnceLock<Kek> = OnceLock::new();
    KEK.get_or_init(|| Kek::from_bytes(FUZZ_KEK))
}

fn fuzz_dek() -> &'static Dek {
    static DEK: OnceLock<Dek> = OnceLock::new();
    DEK.get_or_init(|| {
        fuzz_kek()
            .unwrap(&WRAPPED_DEK, FUZZ_DEK_CONTEXT)
            .unwrap_or_else(|e| panic!("the fixed wrapped DEK does not unwrap: {e}"))
    })
}

/// The on-disk envelope and the records inside it.
///
/// Input: a mode byte, then that mode's bytes.
/// - 0: a wrapped DEK, unwrapped with the fixed KEK ([`Kek::unwrap`]);
/// - 1: segments, each a u16 BE length and its bytes, opened in order by a
///   [`SegmentOpener`] and by [`keystore::open_segment`];
/// - 2: a sealed record ([`keystore::open_record`]) whose plaintext is an object's metadata;
/// - 3: an object's metadata record in the clear ([`ObjectMeta::decode`]);
/// - 4: a failure record ([`FailureRecord::decode`]);
/// - 5: a plaintext sealed as a segment and as a record, then tampered with.
///
/// Properties: a record decodes to the same value after an encode; a sealed segment or
/// record opens to its plaintext and fails once any bit of it is flipped.
pub fn envelope(data: &[u8]) {
    let Some((mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 6 {
        0 => {
            let _ = fuzz_kek().unwrap(rest, FUZZ_DEK_CONTEXT);
        }
        1 => {
            let dek = fuzz_dek();
            let Ok(mut opener) = SegmentOpener::new(dek, FUZZ_IDENTITY) else {
                return;
            };
            let mut rest = rest;
            let mut index = 0u64;
            while let [a, b, tail @ ..] = rest {
                let len = usize::from(u16::from_be_bytes([*a, *b])).min(tail.len());
                let (segment, tail) = tail.split_at(len);
                rest = tail;
                let stateless = keystore::open_segment(dek, FUZZ_IDENTITY, index, segment);
                match opener.open(index, segment) {
                    Ok(opened) => {
                        assert_eq!(stateless.ok(), Some(opened.clone()), "openers disagree");
                        if opened.1 {
                            break;
                        }
                    }
                    Err(_) => {
                        assert!(stateless.is_err(), "openers disagree");
                        break;
                    }
                }
                index += 1;
            }
            let _ = opener.finish();
        }
        2 => {
            if let Ok(plain) = keystore::open_record(fuzz_dek(), FUZZ_RECORD_AD, rest) {
                meta_round_trips(&plain);
            }
        }
        3 => meta_round_trips(rest),
        4 => {
            if let Some(r) = FailureRecord::decode(rest) {
                assert_eq!(
                    FailureRecord::decode(&r.encode()).as_ref(),
                    Some(&r),
                    "failure record changed in an encode and decode"
                );
            }
        }
        _ => seal_and_tamper(rest),
    }
}

fn meta_round_trips(plain: &[u8]) {
    let id = ObjectId([7; 16]);
    if let Some(m) = ObjectMeta::decode(id, plain) {
        assert_eq!(
            ObjectMeta::decode(id, &m.encode()).as_ref(),
            Some(&m),
            "metadata changed in an encode and decode"
        );
    }
}

fn seal_and_tamper(plain: &[u8]) {
    let dek = fuzz_dek();
    // Which bit to flip, from the input (the same input, the same bit).
    let flip = seed_of(plain) as usize;
    let final_flag = plain.first().is_some_and(|b| b & 1 == 1);
    if let Ok(mut sealed) = keystore::seal_segment(dek, FUZZ_IDENTITY, 3, final_flag, plain) {
        let opened = keystore::open_segment(dek, FUZZ_IDENTITY, 3, &sealed);
        assert_eq!(
            opened.ok(),
            Some((plain.to_vec(), final_flag)),
            "segment lost"
        );
        let bit = flip % (sealed.len() * 8);
        sealed[bit / 8] ^= 1 << (bit % 8);
        assert!(
            keystore::open_segment(dek, FUZZ_IDENTITY, 3, &sealed).is_err(),
            "a tampered segment opened"
        );
    }
    if let Ok(mut sealed) = keystore::seal_record(dek, FUZZ_RECORD_AD, plain) {
        let opened = keystore::open_record(dek, FUZZ_RECORD_AD, &sealed);
        assert_eq!(opened.ok().as_deref(), Some(plain), "record lost");
        let bit = flip % (sealed.len() * 8);
        sealed[bit / 8] ^= 1 << (bit % 8);
        assert!(
            keystore::open_record(dek, FUZZ_RECORD_AD, &sealed).is_err(),
            "a tampered record opened"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;

    /// The fuzz crate's folder (`fuzz/` at the root of the repository).
    fn fuzz_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
    }

    /// The files of `dir`, sorted; none if it does not exist.
    fn files(dir: &Path) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut out: Vec<PathBuf> = entries
            .map(|e| e.expect("corpus entry").path())
            .filter(|p| p.is_file())
            .collect();
        out.sort();
        out
    }

    /// Run `entry` on `data`; `Err` with the panic message if it panicked.
    fn replay(entry: Entry, data: &[u8]) -> Result<(), String> {
        std::panic::catch_unwind(|| entry(data)).map_err(|p| {
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "panic".to_owned())
        })
    }

    /// The CI check of the corpora: every committed seed and every regression input (a
    /// crash the fuzzer once found) goes through its target's entry point without a panic.
    #[test]
    fn every_committed_corpus_and_regression_input_replays() {
        let mut failed = Vec::new();
        for (name, entry) in TARGETS {
            let seeds = files(&fuzz_dir().join("corpus").join(name));
            assert!(!seeds.is_empty(), "no seed corpus for fuzz target {name}");
            let regressions = files(&fuzz_dir().join("regressions").join(name));
            for path in seeds.iter().chain(&regressions) {
                let data = std::fs::read(path).expect("read a corpus file");
                if let Err(why) = replay(*entry, &data) {
                    failed.push(format!("{}: {why}", path.display()));
                }
            }
        }
        assert!(
            failed.is_empty(),
            "inputs that fail:\n{}",
            failed.join("\n")
        );
    }

    /// The replay above can fail: an entry that panics on an input is reported with it.
    #[test]
    fn a_panicking_entry_is_reported() {
        fn sabotaged(data: &[u8]) {
            assert!(!data.starts_with(b"boom"), "sabotaged entry");
        }
        assert_eq!(replay(sabotaged, b"fine"), Ok(()));
        assert!(
            replay(sabotaged, b"boom!")
                .unwrap_err()
                .contains("sabotaged")
        );
    }

    /// `fuzz/fuzz_targets/` holds one file per entry of [`TARGETS`], calling that entry,
    /// and `fuzz/Cargo.toml` a `[[bin]]` for it: the list here is the list CI fuzzes.
    #[test]
    fn every_target_has_its_fuzz_target_file() {
        let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
        let on_disk: Vec<String> = files(&fuzz_dir().join("fuzz_targets"))
            .iter()
            .filter_map(|p| Some(p.file_stem()?.to_str()?.to_owned()))
            .collect();
        let names: Vec<String> = TARGETS.iter().map(|(n, _)| (*n).to_owned()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(on_disk, sorted, "fuzz/fuzz_targets/ and TARGETS differ");
        for name in &names {
            let src =
                std::fs::read_to_string(fuzz_dir().join("fuzz_targets").join(format!("{name}.rs")))
                    .unwrap();
            assert!(
                src.contains(&format!("fuzzing::{name}(")),
                "{name}.rs does not call fuzzing::{name}"
            );
            assert!(
                manifest.contains(&format!("name = \"{name}\"")),
                "no [[bin]] {name} in fuzz/Cargo.toml"
            );
        }
    }

    #[test]
    fn the_fixed_dek_unwraps_and_seals() {
        let dek = fuzz_dek();
        let sealed = keystore::seal_record(dek, FUZZ_RECORD_AD, b"x").unwrap();
        assert_eq!(
            keystore::open_record(dek, FUZZ_RECORD_AD, &sealed).unwrap(),
            b"x"
        );
    }

    // The seed generator: `cargo test -p dicom-gateway --release --lib fuzzing -- --ignored`
    // writes `fuzz/corpus/<target>/seed-*` (the pydicom files there are copied, see
    // `fuzz/README.md`). Sealed seeds differ in their nonces from one run to the next.

    /// An explicit VR element (little or big endian).
    fn el(out: &mut Vec<u8>, big: bool, tag: (u16, u16), vr: &[u8; 2], value: &[u8]) {
        let u16b = |v: u16| {
            if big {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            }
        };
        let u32b = |v: u32| {
            if big {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            }
        };
        out.extend_from_slice(&u16b(tag.0));
        out.extend_from_slice(&u16b(tag.1));
        out.extend_from_slice(vr);
        if matches!(vr, b"OB" | b"OW" | b"SQ" | b"UN" | b"UT") {
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&u32b(value.len() as u32));
        } else {
            out.extend_from_slice(&u16b(value.len() as u16));
        }
        out.extend_from_slice(value);
    }

    /// An implicit VR little endian element.
    fn el_implicit(out: &mut Vec<u8>, tag: (u16, u16), value: &[u8]) {
        out.extend_from_slice(&tag.0.to_le_bytes());
        out.extend_from_slice(&tag.1.to_le_bytes());
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        out.extend_from_slice(value);
    }

    const CT: &[u8] = b"1.2.840.10008.5.1.4.1.1.2\0";

    /// A small data set: identity, an undefined-length sequence with a nested one, a
    /// private element, then pixel data.
    fn data_set(big: bool) -> Vec<u8> {
        let mut d = Vec::new();
        el(&mut d, big, (0x0008, 0x0016), b"UI", CT);
        el(&mut d, big, (0x0008, 0x0018), b"UI", b"1.2.3.4.5\0");
        el(&mut d, big, (0x0008, 0x0060), b"CS", b"CT");
        let undefined = [0xFF; 4];
        let item = |d: &mut Vec<u8>, e: u16, len: [u8; 4]| {
            let (g, e) = if big {
                (0xFFFEu16.to_be_bytes(), e.to_be_bytes())
            } else {
                (0xFFFEu16.to_le_bytes(), e.to_le_bytes())
            };
            d.extend_from_slice(&g);
            d.extend_from_slice(&e);
            d.extend_from_slice(&len);
        };
        let sq = |d: &mut Vec<u8>, e: u16| {
            let (g, e) = if big {
                (0x0008u16.to_be_bytes(), e.to_be_bytes())
            } else {
                (0x0008u16.to_le_bytes(), e.to_le_bytes())
            };
            d.extend_from_slice(&g);
            d.extend_from_slice(&e);
            d.extend_from_slice(b"SQ\0\0");
            d.extend_from_slice(&undefined);
        };
        sq(&mut d, 0x1032);
        item(&mut d, 0xE000, undefined);
        el(&mut d, big, (0x0008, 0x0100), b"SH", b"CODE");
        sq(&mut d, 0x1033);
        item(&mut d, 0xE000, undefined);
        item(&mut d, 0xE00D, [0; 4]);
        item(&mut d, 0xE0DD, [0; 4]);
        item(&mut d, 0xE00D, [0; 4]);
        item(&mut d, 0xE0DD, [0; 4]);
        el(&mut d, big, (0x0009, 0x1010), b"LO", b"private ");
        el(&mut d, big, (0x0010, 0x0010), b"PN", b"DOE^JANE");
        el(&mut d, big, (0x0020, 0x000D), b"UI", b"1.2.3.6\0");
        el(&mut d, big, (0x0020, 0x000E), b"UI", b"1.2.3.7\0");
        el(&mut d, big, (0x7FE0, 0x0010), b"OW", &[0x5A; 32]);
        d
    }

    fn implicit_data_set() -> Vec<u8> {
        let mut d = Vec::new();
        el_implicit(&mut d, (0x0008, 0x0016), CT);
        el_implicit(&mut d, (0x0008, 0x0018), b"1.2.3.4.5\0");
        el_implicit(&mut d, (0x0008, 0x0060), b"MR");
        el_implicit(&mut d, (0x0020, 0x000D), b"1.2.3.6\0");
        el_implicit(&mut d, (0x0020, 0x000E), b"1.2.3.7\0");
        el_implicit(&mut d, (0x7FE0, 0x0010), &[1; 16]);
        d
    }

    fn deflate(plain: &[u8]) -> Vec<u8> {
        let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        std::io::Write::write_all(&mut z, plain).unwrap();
        z.finish().unwrap()
    }

    fn part10(ts: &str, body: &[u8]) -> Vec<u8> {
        let mut f =
            dataset::part10_header("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5", ts, Some("FUZZ"));
        f.extend_from_slice(body);
        f
    }

    fn p_data(pdvs: Vec<(bool, bool, Vec<u8>)>) -> Vec<u8> {
        let pdu = dicom_ul::Pdu::PData {
            data: pdvs
                .into_iter()
                .map(|(command, is_last, data)| dicom_ul::pdu::PDataValue {
                    presentation_context_id: 1,
                    value_type: if command {
                        dicom_ul::pdu::PDataValueType::Command
                    } else {
                        dicom_ul::pdu::PDataValueType::Data
                    },
                    is_last,
                    data,
                })
                .collect(),
        };
        let mut out = Vec::new();
        dicom_ul::write_pdu(&mut out, &pdu).unwrap();
        out
    }

    fn stow(parts: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out =
            b"multipart/related; type=\"application/dicom\"; boundary=fuzz-b0undary\n".to_vec();
        out.extend_from_slice(b"preamble\r\n");
        for (i, (headers, body)) in parts.iter().enumerate() {
            out.extend_from_slice(b"--fuzz-b0undary\r\n");
            let mut sha = keystore::Sha256::new();
            sha.update(body);
            let digest = crate::relay::content_digest(&sha.finish());
            let h = headers
                .replace("{digest}", &digest)
                .replace("{id}", &format!("<{i}@site-a>"));
            out.extend_from_slice(h.as_bytes());
            out.extend_from_slice(b"\r\n\r\n");
            out.extend_from_slice(body);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"--fuzz-b0undary--\r\n");
        out
    }

    fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
        let mut s = Vec::new();
        // dimse
        let mut store = Command::store_rq(7, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5");
        store.move_originator_ae = Some("MOVER".into());
        store.move_originator_id = Some(3);
        let store = store.encode();
        s.push(("dimse", "echo-rq", Command::echo_rq(1).encode()));
        s.push(("dimse", "store-rq", store.clone()));
        let mut rsp = Command::store_rq(7, "1.2.3", "4.5.6").response(0xA700);
        rsp.error_comment = Some("storage failure".into());
        s.push(("dimse", "store-rsp", rsp.encode()));
        let (a, b) = store.split_at(20);
        let mut stream = p_data(vec![(true, false, a.to_vec())]);
        stream.extend(p_data(vec![
            (true, true, b.to_vec()),
            (false, true, data_set(false)),
        ]));
        stream.extend(p_data(vec![(true, true, Command::echo_rq(2).encode())]));
        s.push(("dimse", "pdus-store-then-echo", stream));
        // dataset_identity
        s.push((
            "dataset_identity",
            "explicit-le",
            part10("1.2.840.10008.1.2.1", &data_set(false)),
        ));
        s.push((
            "dataset_identity",
            "explicit-be",
            part10("1.2.840.10008.1.2.2", &data_set(true)),
        ));
        s.push((
            "dataset_identity",
            "implicit-le",
            part10("1.2.840.10008.1.2", &implicit_data_set()),
        ));
        s.push((
            "dataset_identity",
            "deflated",
            part10("1.2.840.10008.1.2.1.99", &deflate(&data_set(false))),
        ));
        let mut bare = vec![1u8];
        bare.extend(data_set(false));
        s.push(("dataset_identity", "bare-explicit-le", bare));
        // link_request
        let object = part10("1.2.840.10008.1.2.1", &data_set(false));
        let good =
            "Content-Type: application/dicom\r\nContent-ID: {id}\r\nContent-Digest: {digest}";
        s.push(("link_request", "one-part", stow(&[(good, &object)])));
        let deflated = part10("1.2.840.10008.1.2.1.99", &deflate(&data_set(false)));
        s.push((
            "link_request",
            "two-parts-deflated",
            stow(&[(good, &object), (good, &deflated)]),
        ));
        s.push((
            "link_request",
            "refused-parts",
            stow(&[
                ("Content-Type: text/plain\r\nContent-ID: {id}", b"hello"),
                (
                    "Content-Type: application/dicom\r\nContent-ID: {id}",
                    &object,
                ),
                (good, b"not a Part-10 stream at all"),
            ]),
        ));
        // envelope
        let dek = fuzz_dek();
        let mut wrapped = vec![0u8];
        wrapped.extend_from_slice(&WRAPPED_DEK);
        s.push(("envelope", "wrapped-dek", wrapped));
        let mut segments = vec![1u8];
        for (i, (plain, last)) in [(&b"first"[..], false), (b"second", false), (b"", true)]
            .into_iter()
            .enumerate()
        {
            let sealed = keystore::seal_segment(dek, FUZZ_IDENTITY, i as u64, last, plain).unwrap();
            segments.extend_from_slice(&(sealed.len() as u16).to_be_bytes());
            segments.extend_from_slice(&sealed);
        }
        s.push(("envelope", "segments", segments));
        let meta = ObjectMeta {
            id: ObjectId([7; 16]),
            study_uid: "1.2.3.6".into(),
            series_uid: "1.2.3.7".into(),
            sop_instance_uid: "1.2.3.4.5".into(),
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
            transfer_syntax: "1.2.840.10008.1.2.1".into(),
            source: "MODALITY".into(),
            length: 1234,
            dataset_offset: 210,
            digest: [9; 32],
            segments: 1,
            received_at_ms: 1_700_000_000_000,
        };
        let mut record = vec![2u8];
        record.extend(keystore::seal_record(dek, FUZZ_RECORD_AD, &meta.encode()).unwrap());
        s.push(("envelope", "sealed-meta", record));
        let mut clear = vec![3u8];
        clear.extend(meta.encode());
        s.push(("envelope", "meta", clear));
        let mut failures = FailureRecord::default();
        failures.push("destination unavailable (connect)");
        failures.push("transient: 0xA700");
        failures.budget_from_ms = Some(1_700_000_000_000);
        let mut f = vec![4u8];
        f.extend(failures.encode());
        s.push(("envelope", "failure-record", f));
        s.push((
            "envelope",
            "seal-and-tamper",
            b"\x05plaintext to seal".to_vec(),
        ));
        s
    }

    /// The link seeds reach the identity scan (not only the refusals before it), in
    /// whatever chunks the input's seed picks.
    #[test]
    fn link_seeds_reach_the_identity_scan() {
        let seeds = seeds();
        let seed = |name: &str| &seeds.iter().find(|(_, n, _)| *n == name).unwrap().2;
        assert_eq!(link_parts_scanned(seed("one-part")), 1);
        assert_eq!(link_parts_scanned(seed("two-parts-deflated")), 2);
        assert_eq!(link_parts_scanned(seed("refused-parts")), 0);
    }

    /// Every generated seed passes its target (whether or not it is committed).
    #[test]
    fn generated_seeds_pass() {
        for (target, name, data) in seeds() {
            let (_, entry) = TARGETS.iter().find(|(n, _)| *n == target).unwrap();
            replay(*entry, &data).unwrap_or_else(|e| panic!("{target}/{name}: {e}"));
        }
    }

    /// Writes the generated seeds into `fuzz/corpus/` (run by hand, see above).
    #[test]
    #[ignore = "writes fuzz/corpus/; run by hand to regenerate the seeds"]
    fn write_seed_corpus() {
        for (target, name, data) in seeds() {
            let dir = fuzz_dir().join("corpus").join(target);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(format!("seed-{name}")), data).unwrap();
        }
    }
}
