//! AES-256-GCM sealing: segmented objects and single records, under a [`Dek`], on the raw
//! seal and open of `primitives`.

use std::fmt;
use std::marker::PhantomData;

use crate::backend::{aead, rand};
use crate::primitives::{open_to_vec, seal_with_random_nonce};
use crate::{Dek, FORMAT_VERSION, KeystoreError, NONCE_LEN, TAG_LEN};

/// Bytes a sealed segment adds to its plaintext: version, flags, nonce, tag.
pub const SEGMENT_OVERHEAD: usize = 1 + 1 + 12 + 16;

/// Flags bit marking the final segment of an object.
const FLAG_FINAL: u8 = 0x01;
/// Domain label of segment associated data.
const SEGMENT_AD_LABEL: &[u8] = b"dicom-gateway segment v1";
/// Domain label of record associated data.
const RECORD_AD_LABEL: &[u8] = b"dicom-gateway record v1";
/// Bytes a sealed record adds to its plaintext: version, nonce, tag.
const RECORD_OVERHEAD: usize = 1 + NONCE_LEN + TAG_LEN;

/// Segment associated data, reusing one buffer: the fixed prefix
/// `label || u32 BE len(identity) || identity`, then per segment
/// `u64 BE index || flags`.
struct SegmentAd {
    buf: Vec<u8>,
    prefix_len: usize,
}

impl SegmentAd {
    fn new(identity: &[u8]) -> Result<Self, KeystoreError> {
        let identity_len = u32::try_from(identity.len())
            .map_err(|_| KeystoreError::Format("object identity longer than u32::MAX bytes"))?;
        let prefix_len = SEGMENT_AD_LABEL.len() + 4 + identity.len();
        let mut buf = Vec::with_capacity(prefix_len + 8 + 1);
        buf.extend_from_slice(SEGMENT_AD_LABEL);
        buf.extend_from_slice(&identity_len.to_be_bytes());
        buf.extend_from_slice(identity);
        Ok(Self { buf, prefix_len })
    }

    fn for_segment(&mut self, index: u64, flags: u8) -> &[u8] {
        self.buf.truncate(self.prefix_len);
        self.buf.extend_from_slice(&index.to_be_bytes());
        self.buf.push(flags);
        &self.buf
    }
}

/// Seals an object as an ordered sequence of segments under a [`Dek`].
///
/// Each segment is
/// `[FORMAT_VERSION][flags u8: bit0 = final, other bits 0][nonce 12][ciphertext][tag 16]`
/// with a fresh random nonce. Its associated data is
/// `b"dicom-gateway segment v1" || u32 BE len(identity) || identity || u64 BE index || flags`,
/// so a segment swapped from another object, moved to another index,
/// dropped, truncated away (final missing) or re-flagged fails to open.
///
/// `identity` is the caller's canonical encoding of the object's identity.
pub struct SegmentSealer<'a> {
    key: aead::LessSafeKey,
    rng: rand::SystemRandom,
    ad: SegmentAd,
    next_index: u64,
    finished: bool,
    _dek: PhantomData<&'a Dek>,
}

impl<'a> SegmentSealer<'a> {
    /// Starts sealing the object named by `identity` under `dek`.
    ///
    /// # Errors
    ///
    /// [`KeystoreError::Format`] if `identity` is longer than `u32::MAX`
    /// bytes, [`KeystoreError::Crypto`] on backend failure.
    pub fn new(dek: &'a Dek, identity: &[u8]) -> Result<Self, KeystoreError> {
        Ok(Self {
            key: dek.aead_key()?,
            rng: rand::SystemRandom::new(),
            ad: SegmentAd::new(identity)?,
            next_index: 0,
            finished: false,
            _dek: PhantomData,
        })
    }

    /// Seals the next segment (indices count from 0). Exactly one segment,
    /// the last, must have `is_final` set; an empty object is one empty final
    /// segment.
    ///
    /// # Errors
    ///
    /// [`KeystoreError::AfterFinal`] once a final segment has been sealed,
    /// [`KeystoreError::Random`] if the RNG fails, [`KeystoreError::Crypto`]
    /// on other backend failures. A failed call does not advance the index.
    pub fn seal(&mut self, plaintext: &[u8], is_final: bool) -> Result<Vec<u8>, KeystoreError> {
        if self.finished {
            return Err(KeystoreError::AfterFinal);
        }
        let index = self.next_index;
        let next = index
            .checked_add(1)
            .ok_or(KeystoreError::Format("segment index overflow"))?;
        let flags = if is_final { FLAG_FINAL } else { 0 };
        let ad = self.ad.for_segment(index, flags);
        let sealed = seal_with_random_nonce(
            &self.key,
            &self.rng,
            &[FORMAT_VERSION, flags],
            ad,
            plaintext,
        )?;
        self.next_index = next;
        self.finished = is_final;
        Ok(sealed)
    }

    /// The index the next sealed segment will get (= segments sealed so far).
    #[must_use]
    pub fn next_index(&self) -> u64 {
        self.next_index
    }
}

impl fmt::Debug for SegmentSealer<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SegmentSealer")
            .field("next_index", &self.next_index)
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

/// Opens, in order, the segments produced by a [`SegmentSealer`].
pub struct SegmentOpener<'a> {
    key: aead::LessSafeKey,
    ad: SegmentAd,
    next_index: u64,
    finished: bool,
    _dek: PhantomData<&'a Dek>,
}

impl<'a> SegmentOpener<'a> {
    /// Starts opening the object named by `identity` under `dek`.
    ///
    /// # Errors
    ///
    /// [`KeystoreError::Format`] if `identity` is longer than `u32::MAX`
    /// bytes, [`KeystoreError::Crypto`] on backend failure.
    pub fn new(dek: &'a Dek, identity: &[u8]) -> Result<Self, KeystoreError> {
        Ok(Self {
            key: dek.aead_key()?,
            ad: SegmentAd::new(identity)?,
            next_index: 0,
            finished: false,
            _dek: PhantomData,
        })
    }

    /// Opens the segment stored at `index`, which must be the next expected
    /// index. Returns the plaintext and whether this was the final segment.
    ///
    /// # Errors
    ///
    /// [`KeystoreError::AfterFinal`] if the final segment was already opened;
    /// [`KeystoreError::Format`] if `index` is not the next expected index,
    /// or `sealed` is too short, has an unknown version or unknown flag bits;
    /// [`KeystoreError::Open`] if authentication fails. A failed call does not
    /// advance the opener.
    pub fn open(&mut self, index: u64, sealed: &[u8]) -> Result<(Vec<u8>, bool), KeystoreError> {
        if self.finished {
            return Err(KeystoreError::AfterFinal);
        }
        if index != self.next_index {
            return Err(KeystoreError::Format("segment index out of sequence"));
        }
        let next = index
            .checked_add(1)
            .ok_or(KeystoreError::Format("segment index overflow"))?;
        if sealed.len() < SEGMENT_OVERHEAD {
            return Err(KeystoreError::Format("segment shorter than its overhead"));
        }
        let [version, flags, rest @ ..] = sealed else {
            return Err(KeystoreError::Format("segment shorter than its overhead"));
        };
        if *version != FORMAT_VERSION {
            return Err(KeystoreError::Format("unknown segment format version"));
        }
        if flags & !FLAG_FINAL != 0 {
            return Err(KeystoreError::Format("unknown segment flags"));
        }
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let ad = self.ad.for_segment(index, *flags);
        let plaintext =
            open_to_vec(&self.key, nonce, ad, body).map_err(|()| KeystoreError::Open { index })?;
        let is_final = flags & FLAG_FINAL != 0;
        self.next_index = next;
        self.finished = is_final;
        Ok((plaintext, is_final))
    }

    /// Call when the stored sequence ends.
    ///
    /// # Errors
    ///
    /// [`KeystoreError::Truncated`] unless a final segment was opened.
    pub fn finish(&self) -> Result<(), KeystoreError> {
        if self.finished {
            Ok(())
        } else {
            Err(KeystoreError::Truncated)
        }
    }
}

impl fmt::Debug for SegmentOpener<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SegmentOpener")
            .field("next_index", &self.next_index)
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

/// Seals the segment at `index` of the object named by `identity`: the stateless form of
/// [`SegmentSealer::seal`] for callers that keep the index themselves (an object written
/// across many async calls). Same format and associated data.
///
/// # Errors
///
/// As [`SegmentSealer::seal`].
pub fn seal_segment(
    dek: &Dek,
    identity: &[u8],
    index: u64,
    is_final: bool,
    plaintext: &[u8],
) -> Result<Vec<u8>, KeystoreError> {
    let mut sealer = SegmentSealer::new(dek, identity)?;
    sealer.next_index = index;
    sealer.seal(plaintext, is_final)
}

/// Opens the segment stored at `index`: the stateless form of [`SegmentOpener::open`].
/// The caller must stop after a segment that reports `is_final` and treat a missing final
/// segment as truncation.
///
/// # Errors
///
/// As [`SegmentOpener::open`].
pub fn open_segment(
    dek: &Dek,
    identity: &[u8],
    index: u64,
    sealed: &[u8],
) -> Result<(Vec<u8>, bool), KeystoreError> {
    let mut opener = SegmentOpener::new(dek, identity)?;
    opener.next_index = index;
    opener.open(index, sealed)
}

/// Fills `buf` from the system RNG (for ids and nonces outside this crate).
///
/// # Errors
///
/// [`KeystoreError::Random`] if the RNG fails.
pub fn random_bytes(buf: &mut [u8]) -> Result<(), KeystoreError> {
    use rand::SecureRandom as _;
    rand::SystemRandom::new()
        .fill(buf)
        .map_err(|_| KeystoreError::Random)
}

fn record_ad(ad: &[u8]) -> Vec<u8> {
    let mut full = Vec::with_capacity(RECORD_AD_LABEL.len() + ad.len());
    full.extend_from_slice(RECORD_AD_LABEL);
    full.extend_from_slice(ad);
    full
}

/// Seals a single small record (e.g. encrypted metadata) under `dek`.
///
/// Format: `[FORMAT_VERSION][nonce 12][ciphertext][tag 16]` with a fresh
/// random nonce; associated data `b"dicom-gateway record v1" || ad`.
///
/// # Errors
///
/// [`KeystoreError::Random`] if the RNG fails, [`KeystoreError::Crypto`] on
/// other backend failures.
pub fn seal_record(dek: &Dek, ad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, KeystoreError> {
    let key = dek.aead_key()?;
    seal_with_random_nonce(
        &key,
        &rand::SystemRandom::new(),
        &[FORMAT_VERSION],
        &record_ad(ad),
        plaintext,
    )
}

/// Opens a record sealed by [`seal_record`] with the same `dek` and `ad`.
///
/// # Errors
///
/// [`KeystoreError::Format`] if `sealed` is too short or has an unknown
/// version, [`KeystoreError::Record`] if authentication fails (tampered,
/// other associated data, other key).
pub fn open_record(dek: &Dek, ad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, KeystoreError> {
    if sealed.len() < RECORD_OVERHEAD {
        return Err(KeystoreError::Format("record shorter than its overhead"));
    }
    let [version, rest @ ..] = sealed else {
        return Err(KeystoreError::Format("record shorter than its overhead"));
    };
    if *version != FORMAT_VERSION {
        return Err(KeystoreError::Format("unknown record format version"));
    }
    let (nonce, body) = rest.split_at(NONCE_LEN);
    let key = dek.aead_key()?;
    open_to_vec(&key, nonce, &record_ad(ad), body).map_err(|()| KeystoreError::Record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stateless_segments_interoperate_with_sealer_and_bind_the_index() {
        let dek = Dek::generate().unwrap();
        let mut sealer = SegmentSealer::new(&dek, b"obj").unwrap();
        let s0 = sealer.seal(b"zero", false).unwrap();
        let s1 = seal_segment(&dek, b"obj", 1, true, b"one").unwrap();
        let mut opener = SegmentOpener::new(&dek, b"obj").unwrap();
        assert_eq!(opener.open(0, &s0).unwrap(), (b"zero".to_vec(), false));
        assert_eq!(opener.open(1, &s1).unwrap(), (b"one".to_vec(), true));
        assert_eq!(open_segment(&dek, b"obj", 0, &s0).unwrap().0, b"zero");
        assert!(open_segment(&dek, b"obj", 0, &s1).is_err());
        assert!(open_segment(&dek, b"other", 1, &s1).is_err());
        let mut a = [0u8; 16];
        let mut b = [0u8; 16];
        random_bytes(&mut a).unwrap();
        random_bytes(&mut b).unwrap();
        assert_ne!(a, b);
    }

    const MIB: usize = 1024 * 1024;
    const ID_A: &[u8] = b"study=1.2.3|series=1.2.3.4|sop=1.2.3.4.5|object=1";
    const ID_B: &[u8] = b"study=1.2.3|series=1.2.3.4|sop=1.2.3.4.6|object=2";

    /// Deterministic, non-repeating test data.
    fn data(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3])
            .collect()
    }

    /// Seals `data` in `chunk`-sized segments; an empty object is one empty
    /// final segment.
    fn seal_all(dek: &Dek, identity: &[u8], data: &[u8], chunk: usize) -> Vec<Vec<u8>> {
        let mut sealer = SegmentSealer::new(dek, identity).unwrap();
        if data.is_empty() {
            return vec![sealer.seal(&[], true).unwrap()];
        }
        let chunks: Vec<&[u8]> = data.chunks(chunk).collect();
        let last = chunks.len() - 1;
        chunks
            .iter()
            .enumerate()
            .map(|(i, c)| sealer.seal(c, i == last).unwrap())
            .collect()
    }

    /// Opens segments in order with sequential indices, then calls `finish`.
    fn open_all(
        dek: &Dek,
        identity: &[u8],
        segments: &[Vec<u8>],
    ) -> Result<Vec<u8>, KeystoreError> {
        let mut opener = SegmentOpener::new(dek, identity)?;
        let mut out = Vec::new();
        for (i, s) in segments.iter().enumerate() {
            let (plain, _) = opener.open(i as u64, s)?;
            out.extend_from_slice(&plain);
        }
        opener.finish()?;
        Ok(out)
    }

    #[test]
    fn round_trip_various_sizes() {
        let dek = Dek::generate().unwrap();
        // (object length, chunk size, expected segment count)
        let cases = [
            (0, MIB, 1),
            (1, MIB, 1),
            (1000, 100, 10),
            (1001, 100, 11),
            (MIB, MIB, 1),
            (MIB + 1, MIB, 2),
            (3 * MIB + 5, MIB, 4),
        ];
        for (len, chunk, count) in cases {
            let plain = data(len);
            let segments = seal_all(&dek, ID_A, &plain, chunk);
            assert_eq!(segments.len(), count, "len {len}");
            for (i, s) in segments.iter().enumerate() {
                let expected = if i + 1 < count {
                    chunk
                } else {
                    len - chunk * (count - 1)
                };
                assert_eq!(s.len(), expected + SEGMENT_OVERHEAD);
                assert_eq!(s[0], FORMAT_VERSION);
                assert_eq!(s[1], u8::from(i + 1 == count));
            }
            assert_eq!(open_all(&dek, ID_A, &segments).unwrap(), plain, "len {len}");
        }
    }

    #[test]
    fn open_reports_final_flag_and_sealer_counts() {
        let dek = Dek::generate().unwrap();
        let mut sealer = SegmentSealer::new(&dek, ID_A).unwrap();
        assert_eq!(sealer.next_index(), 0);
        let s0 = sealer.seal(b"first", false).unwrap();
        let s1 = sealer.seal(b"second", true).unwrap();
        assert_eq!(sealer.next_index(), 2);
        let mut opener = SegmentOpener::new(&dek, ID_A).unwrap();
        assert_eq!(opener.open(0, &s0).unwrap(), (b"first".to_vec(), false));
        assert!(matches!(opener.finish(), Err(KeystoreError::Truncated)));
        assert_eq!(opener.open(1, &s1).unwrap(), (b"second".to_vec(), true));
        opener.finish().unwrap();
    }

    #[test]
    fn ciphertext_hides_plaintext_and_nonces_are_fresh() {
        let dek = Dek::generate().unwrap();
        let plain = b"PATIENT^NAME=DOE^JOHN PATIENT^NAME=DOE^JOHN".to_vec();
        let a = SegmentSealer::new(&dek, ID_A)
            .unwrap()
            .seal(&plain, true)
            .unwrap();
        let b = SegmentSealer::new(&dek, ID_A)
            .unwrap()
            .seal(&plain, true)
            .unwrap();
        assert!(!a.windows(8).any(|w| plain.windows(8).any(|p| p == w)));
        assert_ne!(a[2..14], b[2..14], "nonce reused");
        assert_ne!(a, b);
    }

    #[test]
    fn no_segments_is_truncated() {
        let dek = Dek::generate().unwrap();
        let opener = SegmentOpener::new(&dek, ID_A).unwrap();
        assert!(matches!(opener.finish(), Err(KeystoreError::Truncated)));
    }

    #[test]
    fn tampered_byte_fails_to_open() {
        let dek = Dek::generate().unwrap();
        let segments = seal_all(&dek, ID_A, &data(300), 100);
        // Nonce, ciphertext and tag bytes of a middle segment.
        for pos in [2, 13, 14, 50, segments[1].len() - 17, segments[1].len() - 1] {
            let mut bad = segments.clone();
            bad[1][pos] ^= 0x80;
            assert!(
                matches!(
                    open_all(&dek, ID_A, &bad),
                    Err(KeystoreError::Open { index: 1 })
                ),
                "byte {pos}"
            );
        }
    }

    #[test]
    fn tampered_flags_fail() {
        let dek = Dek::generate().unwrap();
        let segments = seal_all(&dek, ID_A, &data(300), 100);
        // Clear the final flag: authentication fails.
        let mut bad = segments.clone();
        bad[2][1] = 0;
        assert!(matches!(
            open_all(&dek, ID_A, &bad),
            Err(KeystoreError::Open { index: 2 })
        ));
        // Set the final flag early: authentication fails.
        let mut bad = segments.clone();
        bad[0][1] = FLAG_FINAL;
        assert!(matches!(
            open_all(&dek, ID_A, &bad),
            Err(KeystoreError::Open { index: 0 })
        ));
        // Unknown flag bits are malformed.
        for flags in [0x02, 0x80, 0x03] {
            let mut bad = segments.clone();
            bad[0][1] = flags;
            assert!(matches!(
                open_all(&dek, ID_A, &bad),
                Err(KeystoreError::Format(_))
            ));
        }
    }

    #[test]
    fn segment_from_another_object_fails() {
        let dek = Dek::generate().unwrap();
        let a = seal_all(&dek, ID_A, &data(300), 100);
        let b = seal_all(&dek, ID_B, &data(300), 100);
        let mut mixed = a.clone();
        mixed[1] = b[1].clone();
        assert!(matches!(
            open_all(&dek, ID_A, &mixed),
            Err(KeystoreError::Open { index: 1 })
        ));
        // The whole object under the wrong identity fails too.
        assert!(matches!(
            open_all(&dek, ID_B, &a),
            Err(KeystoreError::Open { index: 0 })
        ));
    }

    #[test]
    fn reordered_segments_fail() {
        let dek = Dek::generate().unwrap();
        let segments = seal_all(&dek, ID_A, &data(400), 100);
        // Stored in swapped order, read sequentially.
        let mut swapped = segments.clone();
        swapped.swap(1, 2);
        assert!(matches!(
            open_all(&dek, ID_A, &swapped),
            Err(KeystoreError::Open { index: 1 })
        ));
        // Read with out-of-sequence indices.
        let mut opener = SegmentOpener::new(&dek, ID_A).unwrap();
        opener.open(0, &segments[0]).unwrap();
        assert!(matches!(
            opener.open(2, &segments[2]),
            Err(KeystoreError::Format(_))
        ));
    }

    #[test]
    fn dropped_final_segment_is_truncated() {
        let dek = Dek::generate().unwrap();
        let mut segments = seal_all(&dek, ID_A, &data(300), 100);
        segments.pop();
        assert!(matches!(
            open_all(&dek, ID_A, &segments),
            Err(KeystoreError::Truncated)
        ));
    }

    #[test]
    fn dropped_middle_segment_fails() {
        let dek = Dek::generate().unwrap();
        let mut segments = seal_all(&dek, ID_A, &data(400), 100);
        segments.remove(1);
        assert!(matches!(
            open_all(&dek, ID_A, &segments),
            Err(KeystoreError::Open { index: 1 })
        ));
    }

    #[test]
    fn segment_after_final_is_rejected() {
        let dek = Dek::generate().unwrap();
        let segments = seal_all(&dek, ID_A, &data(200), 100);
        let mut opener = SegmentOpener::new(&dek, ID_A).unwrap();
        opener.open(0, &segments[0]).unwrap();
        assert!(opener.open(1, &segments[1]).unwrap().1);
        assert!(matches!(
            opener.open(2, &segments[0]),
            Err(KeystoreError::AfterFinal)
        ));

        let mut sealer = SegmentSealer::new(&dek, ID_A).unwrap();
        sealer.seal(b"only", true).unwrap();
        assert!(matches!(
            sealer.seal(b"more", false),
            Err(KeystoreError::AfterFinal)
        ));
        assert!(matches!(
            sealer.seal(b"more", true),
            Err(KeystoreError::AfterFinal)
        ));
        assert_eq!(sealer.next_index(), 1);
    }

    #[test]
    fn wrong_dek_fails() {
        let dek = Dek::generate().unwrap();
        let other = Dek::generate().unwrap();
        let segments = seal_all(&dek, ID_A, &data(200), 100);
        assert!(matches!(
            open_all(&other, ID_A, &segments),
            Err(KeystoreError::Open { index: 0 })
        ));
    }

    #[test]
    fn unknown_version_is_format_error() {
        let dek = Dek::generate().unwrap();
        let segments = seal_all(&dek, ID_A, &data(10), 100);
        for version in [0u8, 2, 0xFF] {
            let mut bad = segments.clone();
            bad[0][0] = version;
            assert!(matches!(
                open_all(&dek, ID_A, &bad),
                Err(KeystoreError::Format(_))
            ));
        }
        let mut record = seal_record(&dek, b"ad", b"meta").unwrap();
        record[0] = 2;
        assert!(matches!(
            open_record(&dek, b"ad", &record),
            Err(KeystoreError::Format(_))
        ));
    }

    #[test]
    fn short_or_garbage_input_never_panics() {
        let dek = Dek::generate().unwrap();
        for len in 0..40 {
            for fill in [0x00u8, 0x01, 0xFF] {
                let mut input = vec![fill; len];
                if len > 0 {
                    input[0] = FORMAT_VERSION;
                }
                if len > 1 {
                    input[1] = fill & FLAG_FINAL;
                }
                let mut opener = SegmentOpener::new(&dek, ID_A).unwrap();
                let seg = opener.open(0, &input);
                let rec = open_record(&dek, b"", &input);
                if len < SEGMENT_OVERHEAD {
                    assert!(matches!(seg, Err(KeystoreError::Format(_))), "len {len}");
                } else {
                    assert!(
                        matches!(seg, Err(KeystoreError::Open { index: 0 })),
                        "len {len}"
                    );
                }
                if len < RECORD_OVERHEAD {
                    assert!(matches!(rec, Err(KeystoreError::Format(_))), "len {len}");
                } else {
                    assert!(matches!(rec, Err(KeystoreError::Record)), "len {len}");
                }
            }
        }
    }

    #[test]
    fn record_round_trip_and_failures() {
        let dek = Dek::generate().unwrap();
        for plain in [&b""[..], b"x", &data(5000)] {
            let sealed = seal_record(&dek, b"object-7", plain).unwrap();
            assert_eq!(sealed.len(), plain.len() + RECORD_OVERHEAD);
            assert_eq!(open_record(&dek, b"object-7", &sealed).unwrap(), plain);
        }
        let sealed = seal_record(&dek, b"object-7", b"metadata").unwrap();
        assert_ne!(sealed, seal_record(&dek, b"object-7", b"metadata").unwrap());
        assert!(matches!(
            open_record(&dek, b"object-8", &sealed),
            Err(KeystoreError::Record)
        ));
        assert!(matches!(
            open_record(&Dek::generate().unwrap(), b"object-7", &sealed),
            Err(KeystoreError::Record)
        ));
        for pos in 1..sealed.len() {
            let mut bad = sealed.clone();
            bad[pos] ^= 0x01;
            assert!(
                matches!(
                    open_record(&dek, b"object-7", &bad),
                    Err(KeystoreError::Record)
                ),
                "byte {pos}"
            );
        }
    }

    #[test]
    fn records_and_segments_are_not_interchangeable() {
        let dek = Dek::generate().unwrap();
        // A segment's header byte layout cannot pass as a record and vice versa.
        let segment = SegmentSealer::new(&dek, b"")
            .unwrap()
            .seal(b"data", true)
            .unwrap();
        assert!(open_record(&dek, b"", &segment).is_err());
        let record = seal_record(&dek, b"", b"data").unwrap();
        let mut opener = SegmentOpener::new(&dek, b"").unwrap();
        assert!(opener.open(0, &record).is_err());
    }
}
