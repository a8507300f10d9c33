//! The KEK check values of a data directory (`kek.check`): one per KEK version.
//!
//! Invariants:
//! - A data directory holds the check value of every KEK version its data was ever
//!   written under ([`keystore::Kek::check_value`]: a MAC of a fixed label under a key
//!   derived from the KEK; never the KEK, never a plain hash of it), and whether that
//!   version is retired.
//! - A spool is opened only if every version the node holds matches its stored value
//!   (compared in constant time), and every recorded version that is not retired is held:
//!   data wrapped under a version the node lacks would be unreadable. On a refusal nothing
//!   in the directory is changed.
//! - A version not yet recorded (new, or a directory from before check values) is recorded
//!   at open: from then on, that KEK is that version of the directory's KEK.
//! - A retired version (no key is wrapped under it any more, see `spool::rotate`) is never
//!   used again, even if its file is still there.
//! - The file is replaced atomically (temporary file, fsync, rename, fsync of the
//!   directory), so a crash leaves the previous file or the complete new one.
//!
//! Format: version 1 of the file (one line, `dicom-gateway kek-check v1 <hex>`) holds the
//! value of KEK version 1, and is still read. Version 2, written once a second version is
//! recorded, is the line `dicom-gateway kek-check v2`, then one line per version:
//! `<version> <hex>` and, for a retired one, ` retired`.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use keystore::{KEK_CHECK_LEN, KekRing, KeystoreError};

/// Name of the check-value file in the data directory.
pub const FILE_NAME: &str = "kek.check";
/// First bytes of a version-1 file: format name and version.
const PREFIX: &str = "dicom-gateway kek-check v1 ";
/// First line of a version-2 file.
const HEADER_V2: &str = "dicom-gateway kek-check v2";

/// One recorded KEK version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    value: [u8; KEK_CHECK_LEN],
    /// No key is wrapped under it any more; it is never used again.
    pub retired: bool,
}

/// What [`verify_ring_blocking`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Versions recorded now (not recorded before).
    pub written: Vec<u32>,
    /// Retired versions whose files are still there (left out of the ring).
    pub retired_present: Vec<u32>,
}

/// Errors of the KEK check, told apart by the caller (all are configuration errors, exit
/// code 78, but for I/O).
#[derive(Debug, thiserror::Error)]
pub enum KekCheckError {
    /// A KEK version does not match the data directory.
    #[error("{}: KEK version {version}: {source}", path.display())]
    Mismatch {
        /// Path of the check-value file.
        path: PathBuf,
        /// The version that does not match.
        version: u32,
        /// [`KeystoreError::KekMismatch`].
        source: KeystoreError,
    },
    /// A recorded version that is not retired is not held by the node.
    #[error("{}: KEK version {version} holds data keys of this directory (it was recorded and never retired), but its file is missing: restore {} from its backup and start again. Nothing was changed", path.display(), if *version == 1 { "keystore.kek_file".to_owned() } else { format!("keystore.kek_file.{version}") })]
    Missing {
        /// Path of the check-value file.
        path: PathBuf,
        /// The missing version.
        version: u32,
    },
    /// Every version the node holds is retired.
    #[error("{}: every KEK version present ({versions:?}) is retired; the current version's file is missing: restore it from its backup", path.display())]
    AllRetired {
        /// Path of the check-value file.
        path: PathBuf,
        /// The versions present.
        versions: Vec<u32>,
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

/// The versions recorded in `dir` (none if there is no file). Blocking (file I/O).
///
/// # Errors
///
/// [`KekCheckError::Malformed`] or [`KekCheckError::Io`].
pub fn recorded_blocking(dir: &Path) -> Result<BTreeMap<u32, Recorded>, KekCheckError> {
    let path = dir.join(FILE_NAME);
    match fs::read(&path) {
        Ok(bytes) => parse(&bytes).map_err(|what| KekCheckError::Malformed { path, what }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(source) => Err(KekCheckError::Io { path, source }),
    }
}

/// Verify every version of `ring` against `dir`'s check values and return the ring
/// without its retired versions. With `store`, versions not yet recorded are recorded;
/// without, they are only accepted (the caller records them once the store is open).
/// Blocking (file I/O).
///
/// # Errors
///
/// [`KekCheckError::Mismatch`] if a version's stored value is another KEK's,
/// [`KekCheckError::Missing`] if a recorded version that is not retired is not in `ring`,
/// [`KekCheckError::AllRetired`] if nothing is left, [`KekCheckError::Malformed`] if the
/// file cannot be parsed, [`KekCheckError::Io`] on I/O failure.
pub fn verify_ring_blocking(
    dir: &Path,
    ring: KekRing,
    store: bool,
) -> Result<(KekRing, Outcome), KekCheckError> {
    let path = dir.join(FILE_NAME);
    let mut recorded = recorded_blocking(dir)?;
    let mut outcome = Outcome::default();
    for version in ring.versions().collect::<Vec<_>>() {
        let Some(kek) = ring.get(version) else {
            continue;
        };
        match recorded.get(&version) {
            Some(r) => {
                kek.verify_check_value(&r.value)
                    .map_err(|source| KekCheckError::Mismatch {
                        path: path.clone(),
                        version,
                        source,
                    })?;
                if r.retired {
                    outcome.retired_present.push(version);
                }
            }
            None => {
                recorded.insert(
                    version,
                    Recorded {
                        value: kek.check_value(),
                        retired: false,
                    },
                );
                outcome.written.push(version);
            }
        }
    }
    if let Some((&version, _)) = recorded
        .iter()
        .find(|(v, r)| !r.retired && ring.get(**v).is_none())
    {
        return Err(KekCheckError::Missing { path, version });
    }
    let present: Vec<u32> = ring.versions().collect();
    let ring = ring
        .without(|v| recorded.get(&v).is_some_and(|r| r.retired))
        .map_err(|_| KekCheckError::AllRetired {
            path: path.clone(),
            versions: present,
        })?;
    if store && !outcome.written.is_empty() {
        write_atomic(dir, &path, &render(&recorded)).map_err(|source| KekCheckError::Io {
            path: path.clone(),
            source,
        })?;
    }
    Ok((ring, outcome))
}

/// Record `versions` as retired in `dir` (those not recorded are ignored). Blocking.
///
/// # Errors
///
/// [`KekCheckError::Malformed`] or [`KekCheckError::Io`].
pub fn retire_blocking(dir: &Path, versions: &[u32]) -> Result<(), KekCheckError> {
    let path = dir.join(FILE_NAME);
    let mut recorded = recorded_blocking(dir)?;
    let mut changed = false;
    for v in versions {
        if let Some(r) = recorded.get_mut(v)
            && !r.retired
        {
            r.retired = true;
            changed = true;
        }
    }
    if changed {
        write_atomic(dir, &path, &render(&recorded))
            .map_err(|source| KekCheckError::Io { path, source })?;
    }
    Ok(())
}

fn hex(value: &[u8; KEK_CHECK_LEN]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(2 * KEK_CHECK_LEN);
    for b in value {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// A version-1 file while only version 1 is recorded and active (what older releases
/// read), version 2 otherwise.
fn render(recorded: &BTreeMap<u32, Recorded>) -> String {
    if let [(1, r)] = recorded.iter().collect::<Vec<_>>()[..]
        && !r.retired
    {
        return format!("{PREFIX}{}\n", hex(&r.value));
    }
    let mut s = format!("{HEADER_V2}\n");
    for (v, r) in recorded {
        s.push_str(&format!(
            "{v} {}{}\n",
            hex(&r.value),
            if r.retired { " retired" } else { "" }
        ));
    }
    s
}

fn parse_hex(hex: &str) -> Result<[u8; KEK_CHECK_LEN], &'static str> {
    if hex.len() != 2 * KEK_CHECK_LEN || !hex.is_ascii() {
        return Err("wrong length");
    }
    let mut out = [0u8; KEK_CHECK_LEN];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| "not hexadecimal")?;
    }
    Ok(out)
}

fn parse(bytes: &[u8]) -> Result<BTreeMap<u32, Recorded>, &'static str> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8")?;
    let mut out = BTreeMap::new();
    if let Some(hex) = text.trim_end().strip_prefix(PREFIX) {
        let value = parse_hex(hex)?;
        out.insert(
            1,
            Recorded {
                value,
                retired: false,
            },
        );
        return Ok(out);
    }
    let mut lines = text.lines();
    if lines.next() != Some(HEADER_V2) {
        return Err("unknown format or version");
    }
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let mut words = line.split(' ');
        let version = words
            .next()
            .and_then(|v| v.parse::<u32>().ok())
            .filter(|v| *v >= 1)
            .ok_or("bad version number")?;
        let value = parse_hex(words.next().ok_or("a version without a check value")?)?;
        let retired = match words.next() {
            None => false,
            Some("retired") => true,
            Some(_) => return Err("unknown word after a check value"),
        };
        if words.next().is_some() || out.insert(version, Recorded { value, retired }).is_some() {
            return Err("a version twice, or trailing words");
        }
    }
    if out.is_empty() {
        return Err("no version recorded");
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
    use keystore::Kek;

    fn ring(keks: &[(u8, u32)]) -> KekRing {
        KekRing::new(
            keks.iter()
                .map(|(b, v)| Kek::from_bytes_version([*b; 32], *v))
                .collect(),
        )
        .unwrap()
    }

    fn versions(r: &KekRing) -> Vec<u32> {
        r.versions().collect()
    }

    #[test]
    fn written_once_then_matched_and_another_kek_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_, o) = verify_ring_blocking(dir.path(), ring(&[(1, 1)]), true).unwrap();
        assert_eq!(o.written, [1]);
        let (_, o) = verify_ring_blocking(dir.path(), ring(&[(1, 1)]), true).unwrap();
        assert!(o.written.is_empty());
        let before = fs::read(dir.path().join(FILE_NAME)).unwrap();
        assert!(
            before.starts_with(PREFIX.as_bytes()),
            "a lone version 1 keeps format v1"
        );
        let err = verify_ring_blocking(dir.path(), ring(&[(2, 1)]), true).unwrap_err();
        assert!(matches!(
            err,
            KekCheckError::Mismatch {
                source: KeystoreError::KekMismatch,
                version: 1,
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
    fn without_store_a_new_version_is_accepted_but_not_recorded() {
        let dir = tempfile::tempdir().unwrap();
        verify_ring_blocking(dir.path(), ring(&[(1, 1)]), false).unwrap();
        assert!(!dir.path().join(FILE_NAME).exists());
    }

    #[test]
    fn a_new_version_is_recorded_and_then_checked_like_the_first() {
        let dir = tempfile::tempdir().unwrap();
        verify_ring_blocking(dir.path(), ring(&[(1, 1)]), true).unwrap();
        let (r, o) = verify_ring_blocking(dir.path(), ring(&[(1, 1), (2, 2)]), true).unwrap();
        assert_eq!((versions(&r), o.written), (vec![1, 2], vec![2]));
        let text = fs::read_to_string(dir.path().join(FILE_NAME)).unwrap();
        assert!(text.starts_with(HEADER_V2), "{text}");
        // Another key posing as version 2 is refused, and so is a start without version 2.
        let err = verify_ring_blocking(dir.path(), ring(&[(1, 1), (9, 2)]), true).unwrap_err();
        assert!(
            matches!(err, KekCheckError::Mismatch { version: 2, .. }),
            "{err}"
        );
        let err = verify_ring_blocking(dir.path(), ring(&[(1, 1)]), true).unwrap_err();
        assert!(
            matches!(err, KekCheckError::Missing { version: 2, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("keystore.kek_file.2"), "{err}");
        let err = verify_ring_blocking(dir.path(), ring(&[(2, 2)]), true).unwrap_err();
        assert!(
            matches!(err, KekCheckError::Missing { version: 1, .. }),
            "{err}"
        );
    }

    #[test]
    fn a_retired_version_is_left_out_and_may_be_gone() {
        let dir = tempfile::tempdir().unwrap();
        verify_ring_blocking(dir.path(), ring(&[(1, 1), (2, 2)]), true).unwrap();
        retire_blocking(dir.path(), &[1]).unwrap();
        let (r, o) = verify_ring_blocking(dir.path(), ring(&[(1, 1), (2, 2)]), true).unwrap();
        assert_eq!((versions(&r), o.retired_present), (vec![2], vec![1]));
        let (r, o) = verify_ring_blocking(dir.path(), ring(&[(2, 2)]), true).unwrap();
        assert_eq!((versions(&r), o.retired_present), (vec![2], vec![]));
        // Still checked: another key posing as the retired version is refused.
        assert!(verify_ring_blocking(dir.path(), ring(&[(7, 1), (2, 2)]), true).is_err());
        let err = verify_ring_blocking(dir.path(), ring(&[(1, 1)]), true).unwrap_err();
        assert!(
            matches!(err, KekCheckError::Missing { version: 2, .. }),
            "{err}"
        );
        retire_blocking(dir.path(), &[2]).unwrap();
        let err = verify_ring_blocking(dir.path(), ring(&[(1, 1), (2, 2)]), true).unwrap_err();
        assert!(matches!(err, KekCheckError::AllRetired { .. }), "{err}");
    }

    #[test]
    fn malformed_file_is_refused() {
        for text in [
            "garbage",
            "dicom-gateway kek-check v2\n",
            "dicom-gateway kek-check v2\n1 zz\n",
            "dicom-gateway kek-check v2\n0 00\n",
        ] {
            let dir = tempfile::tempdir().unwrap();
            fs::write(dir.path().join(FILE_NAME), text).unwrap();
            let err = verify_ring_blocking(dir.path(), ring(&[(1, 1)]), true).unwrap_err();
            assert!(
                matches!(err, KekCheckError::Malformed { .. }),
                "{text:?}: {err}"
            );
        }
    }
}
