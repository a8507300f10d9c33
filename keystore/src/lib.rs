//! Envelope encryption for the dicom-gateway spool.
//!
//! This crate is the gateway's cryptographic boundary. It owns:
//!
//! * the **key-encryption key** ([`Kek`]): 32 raw bytes loaded from a file
//!   that is only readable by its owner; it is never written to the spool. It is
//!   versioned: a [`KekRing`] holds every version a node has, wraps under the newest and
//!   rewraps keys from older ones;
//! * the per-study **data-encryption keys** ([`Dek`]), which are stored in the
//!   spool only in wrapped (encrypted) form, see [`Kek::wrap`];
//! * **segmented sealing** of objects ([`SegmentSealer`], [`SegmentOpener`])
//!   and sealing of small records ([`seal_record`], [`open_record`]) with
//!   AES-256-GCM;
//! * the **keyed index hash** ([`IndexHasher`]) that keeps UIDs out of
//!   database keys, and a streaming [`Sha256`].
//!
//! It does no storage, networking or async work.
//!
//! # Invariants
//!
//! * Key material (KEK, DEK, derived keys held by this crate) lives in
//!   heap buffers that are zeroized on drop and is never printed: every
//!   key-holding type implements `Debug` by hand and redacts. Errors
//!   ([`KeystoreError`]) never carry secrets or plaintext.
//! * Every AES-GCM seal uses a fresh random 96-bit nonce from the system RNG.
//!   Nonces are never derived from counters, because one DEK is shared by
//!   every object of a study.
//! * Every sealed byte string starts with [`FORMAT_VERSION`]; unknown versions
//!   and malformed input are rejected with [`KeystoreError::Format`], never a
//!   panic.
//! * Associated data binds each ciphertext to where it belongs: a wrapped DEK
//!   to its KEK id and caller context, a segment to its object identity,
//!   index and final flag, a record to its caller-supplied associated data.
//!   Moving, swapping, reordering, truncating or re-flagging sealed data makes
//!   it fail authentication.
//! * All cryptography goes through the private `backend` alias: `aws-lc-rs` (the
//!   default feature) or `ring` (the `ring` feature, which wins when both are on).
//!   Only APIs the two share are used, and the formats are the same under either,
//!   so a spool written under one backend opens under the other.
//!
//! # Layout
//!
//! The modules read bottom-up, each using only those before it: `backend` (the alias),
//! `error`, `primitives` (the secret key type and raw AES-256-GCM seal and open), `keys`
//! ([`Kek`], [`Dek`], [`IndexKey`], [`IndexHasher`]), `keyring` ([`KekRing`] and the
//! version files), `aead` (segments and records under a [`Dek`]);
//! `hash` stands apart.

mod aead;
mod error;
mod hash;
mod keyring;
mod keys;
mod primitives;

pub use aead::{
    SEGMENT_OVERHEAD, SegmentOpener, SegmentSealer, open_record, open_segment, random_bytes,
    seal_record, seal_segment,
};
pub use error::KeystoreError;
pub use hash::Sha256;
pub use keyring::{KekRing, kek_version_files, kek_version_path, wrapped_kek_id};
pub use keys::{Dek, IndexHasher, IndexKey, KEK_CHECK_LEN, Kek, kek_mode_allowed};

/// The single place that chooses the cryptographic backend: `ring` when its feature is on,
/// otherwise `aws-lc-rs` (the default feature).
///
/// Only APIs shared by `aws-lc-rs` and `ring` are used through this alias:
/// `aead::{LessSafeKey, UnboundKey, AES_256_GCM, Nonce, Aad}`,
/// `rand::{SystemRandom, SecureRandom}`, `hmac`, `hkdf` and `digest`.
mod backend {
    #[cfg(all(feature = "aws-lc-rs", not(feature = "ring")))]
    pub(crate) use aws_lc_rs::{aead, digest, hkdf, hmac, rand};
    #[cfg(feature = "ring")]
    pub(crate) use ring::{aead, digest, hkdf, hmac, rand};
}

#[cfg(not(any(feature = "aws-lc-rs", feature = "ring")))]
compile_error!(
    "dicom-gateway-keystore needs a crypto backend: enable the `aws-lc-rs` (default) or `ring` feature"
);

#[cfg(all(feature = "fips", feature = "ring"))]
compile_error!("the `fips` feature is aws-lc-rs's FIPS module: it cannot be combined with `ring`");

/// The cryptographic backend this build uses: `"aws-lc-rs"`, `"aws-lc-rs (FIPS)"` or
/// `"ring"`.
pub const BACKEND: &str = if cfg!(feature = "ring") {
    "ring"
} else if cfg!(feature = "fips") {
    "aws-lc-rs (FIPS)"
} else {
    "aws-lc-rs"
};

/// Length in bytes of a KEK or DEK (AES-256).
pub const KEY_LEN: usize = 32;
/// Length in bytes of an AES-GCM nonce.
pub const NONCE_LEN: usize = 12;
/// Length in bytes of an AES-GCM authentication tag.
pub const TAG_LEN: usize = 16;
/// Format version byte written first in every sealed segment and wrapped key.
pub const FORMAT_VERSION: u8 = 1;
