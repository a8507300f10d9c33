//! The KEK check value of a data directory (`kek.check`).
//!
//! Invariants:
//! - A data directory holds the check value of the KEK its data is written under
//!   ([`keystore::Kek::check_value`]: a MAC of a fixed label under a key derived from the
//!   KEK; never the KEK, never a plain hash of it).
//! - A spool is opened only if the KEK's check value equals the stored one (compared in
//!   constant time); on a mismatch nothing in the directory is changed.
//! - A directory without a check value (created before check values existed) gets the
//!   current KEK's value at its first open: from then on, that KEK is the directory's KEK.
//! - The file is replaced atomically (temporary file, fsync, rename, fsync of the
//!   directory), so a crash leaves either no check value or a complete one.

use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use keystore::{KEK_CHECK_LEN, Kek, KeystoreError};

/// Name of the check-value file in the data directory.
pub const FILE_NAME: &str = "kek.check";
/// First bytes of the file: format name and version.
const PREFIX: &str = "dicom-gateway kek-check v1 ";

/// What [`verify_or_store`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A stored check value matched the KEK.
    Matched,
    /// No check value was stored; the KEK's value was written.
    Written,
}

/// Errors of the KEK check, told apart by the caller (a mismatch is a configuration
/// error, exit code 78).
#[derive(Debug, thiserror::Error)]
pub enum KekCheckError {
    /// The KEK does not match the data directory.
    #[error("{}: {source}", path.display())]
    Mismatch {
        /// Path of the check-value file.
        path: PathBuf,
        /// [`KeystoreError::KekMismatch`].
        source: KeystoreError,
    },
    /// The check-value file is not in the expected format.
    #[error("{}: not a KEK check-value file ({what}); restore it from a backup of the data directory or move it away to record the current KEK's value", path.display())]
    Malformed {
        /// Path of the check-value file.
        path: PathBuf,
        /// What is wrong.
        what: &'static str,
    },
    /// Reading or writing the file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// Path of the check-value file.
        path: PathBuf,
        /// Underlying I/O error.
        source: io::Error,
    },
}

/// Verify the data directory `dir`'s check value against `kek`, or store it if absent.
/// Blocking (file I/O).
///
/// # Errors
///
/// [`KekCheckError::Mismatch`] if the stored value is another KEK's,
/// [`KekCheckError::Malformed`] if the file cannot be parsed, [`KekCheckError::Io`] on
/// I/O failure.
pub fn verify_or_store_blocking(dir: &Path, kek: &Kek) -> Result<Outcome, KekCheckError> {
    let path = dir.join(FILE_NAME);
    let io_err = |source| KekCheckError::Io {
        path: path.clone(),
        source,
    };
    match fs::read(&path) {
        Ok(bytes) => {
            let stored = parse(&bytes).map_err(|what| KekCheckError::Malformed {
                path: path.clone(),
                what,
            })?;
            kek.verify_check_value(&stored)
                .map_err(|source| KekCheckError::Mismatch {
                    path: path.clone(),
                    source,
                })?;
            Ok(Outcome::Matched)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            write_atomic(dir, &path, &render(&kek.check_value())).map_err(io_err)?;
            Ok(Outcome::Written)
        }
        Err(e) => Err(io_err(e)),
    }
}

fn render(value: &[u8; KEK_CHECK_LEN]) -> String {
    use std::fmt::Write as _;
    let mut s = String::from(PREFIX);
    for b in value {
        let _ = write!(s, "{b:02x}");
    }
    s.push('\n');
    s
}

fn parse(bytes: &[u8]) -> Result<[u8; KEK_CHECK_LEN], &'static str> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8")?;
    let hex = text
        .trim_end()
        .strip_prefix(PREFIX)
        .ok_or("unknown format or version")?;
    if hex.len() != 2 * KEK_CHECK_LEN || !hex.is_ascii() {
        return Err("wrong length");
    }
    let mut out = [0u8; KEK_CHECK_LEN];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| "not hexadecimal")?;
    }
    Ok(out)
}

fn write_atomic(dir: &Path, path: &Path, text: &str) -> io::Result<()> {
    let tmp = dir.join(format!("{FILE_NAME}.tmp"));
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_once_then_matched_and_another_kek_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = Kek::from_bytes([1; 32]);
        assert_eq!(
            verify_or_store_blocking(dir.path(), &a).unwrap(),
            Outcome::Written
        );
        assert_eq!(
            verify_or_store_blocking(dir.path(), &a).unwrap(),
            Outcome::Matched
        );
        let before = fs::read(dir.path().join(FILE_NAME)).unwrap();
        let err = verify_or_store_blocking(dir.path(), &Kek::from_bytes([2; 32])).unwrap_err();
        assert!(matches!(
            err,
            KekCheckError::Mismatch {
                source: KeystoreError::KekMismatch,
                ..
            }
        ));
        assert!(err.to_string().contains("kek_file"), "{err}");
        assert_eq!(fs::read(dir.path().join(FILE_NAME)).unwrap(), before);
        // The file holds neither the KEK nor its plain SHA-256.
        let text = String::from_utf8(before).unwrap();
        assert!(!text.contains(&"01".repeat(32)));
        let mut h = keystore::Sha256::new();
        h.update(&[1u8; 32]);
        let sha = h.finish();
        let sha_hex: String = sha.iter().map(|b| format!("{b:02x}")).collect();
        assert!(!text.contains(&sha_hex));
    }

    #[test]
    fn malformed_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(FILE_NAME), "garbage").unwrap();
        let err = verify_or_store_blocking(dir.path(), &Kek::from_bytes([1; 32])).unwrap_err();
        assert!(matches!(err, KekCheckError::Malformed { .. }), "{err}");
    }
}
