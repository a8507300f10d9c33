//! The crate's single error type.

use std::path::PathBuf;

/// Errors returned by the keystore.
///
/// No variant carries key material or plaintext; paths, lengths, modes and
/// segment indices are the only data attached.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum KeystoreError {
    /// The KEK file could not be opened or read.
    #[error("cannot read KEK file {path}: {source}", path = path.display())]
    KekFile {
        /// Path of the KEK file.
        path: PathBuf,
        /// Underlying I/O error.
        source: std::io::Error,
    },

    /// A new KEK file could not be created, written or synced.
    #[error("cannot write KEK file {path}: {source}", path = path.display())]
    KekWrite {
        /// Path of the KEK file.
        path: PathBuf,
        /// Underlying I/O error.
        source: std::io::Error,
    },

    /// The KEK file does not hold exactly [`KEY_LEN`](crate::KEY_LEN) bytes.
    #[error("KEK file {path} must hold exactly 32 bytes, found {len}", path = path.display())]
    KekLength {
        /// Path of the KEK file.
        path: PathBuf,
        /// Length found (saturated at `usize::MAX`).
        len: usize,
    },

    /// Refused to overwrite an existing KEK file.
    #[error(
        "KEK file {path} already exists; refusing to overwrite it (data wrapped under it would become unreadable)",
        path = path.display()
    )]
    KekExists {
        /// Path of the existing KEK file.
        path: PathBuf,
    },

    /// The KEK file grants more than owner access and group read by the process's own
    /// group.
    #[error(
        "KEK file {path} has mode {mode:04o} and group {gid}: only the owner may have access, plus read by the process's own group (gid {own_gid}, as Kubernetes mounts a Secret with fsGroup); run `chmod 600 {path}`",
        path = path.display()
    )]
    KekPermissions {
        /// Path of the KEK file.
        path: PathBuf,
        /// Permission bits of the file (`mode & 0o7777`).
        mode: u32,
        /// Group of the file.
        gid: u32,
        /// Effective group of this process.
        own_gid: u32,
    },

    /// The KEK does not match the data directory: its check value differs from the one
    /// stored when the directory was created.
    #[error(
        "the key-encryption key does not match the data directory (its check value differs): this node was started with another KEK than the one its data was written under; restore the right keystore.kek_file (from its backup) and start again. Nothing was changed"
    )]
    KekMismatch,

    /// A wrapped key names a KEK version this node does not hold.
    #[error(
        "a data key is wrapped under KEK version {version}, which this node does not hold: restore that version's file (keystore.kek_file for version 1, keystore.kek_file.{version} otherwise) from its backup"
    )]
    KekVersionMissing {
        /// The version the key names.
        version: u32,
    },

    /// A wrapped DEK failed authentication: wrong KEK, wrong context (study)
    /// or tampered bytes.
    #[error("wrapped data key failed authentication (wrong KEK, wrong study, or tampered)")]
    Unwrap,

    /// A segment failed authentication: tampered, swapped from another object,
    /// moved to another index, re-flagged, or opened with the wrong key.
    #[error("segment {index} failed authentication (tampered, swapped, reordered, or wrong key)")]
    Open {
        /// Index of the segment that failed.
        index: u64,
    },

    /// A sealed record failed authentication: tampered, wrong associated data,
    /// or wrong key.
    #[error("record failed authentication (tampered, wrong associated data, or wrong key)")]
    Record,

    /// Sealed bytes are malformed (too short, unknown version, bad flags,
    /// out-of-order index, oversized identity).
    #[error("malformed sealed data: {0}")]
    Format(&'static str),

    /// The segment stream ended without a final segment.
    #[error("sealed object is truncated: no final segment")]
    Truncated,

    /// A segment was sealed or opened after the final segment.
    #[error("segment after the final segment")]
    AfterFinal,

    /// The system random number generator failed.
    #[error("system random number generator failed")]
    Random,

    /// Any other failure reported by the cryptographic backend.
    #[error("cryptographic backend failure")]
    Crypto,
}
