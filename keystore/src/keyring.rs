//! Versioned KEKs: the [`KekRing`] of every version a node holds, and the files they live in.
//!
//! Version 1 is `keystore.kek_file` itself; version `N` (2 and up) is the file next to it
//! named `<kek_file>.N` (made by `keys rotate`, or put there by an operator, such as a
//! key `kek.key.2` added to a Kubernetes Secret).
//!
//! Invariants:
//! - A ring holds at least one version, each once, and wraps new keys under its newest
//!   version only.
//! - A wrapped key names the version that wrapped it (its header, which is authenticated),
//!   and only that version unwraps it: a key whose version the ring lacks is
//!   [`KeystoreError::KekVersionMissing`], never a trial of the others.
//! - [`KekRing::rewrap`] moves a wrapped key to the newest version without the plaintext
//!   key leaving this crate; the unwrapped bytes are zeroized when it returns.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::keys::{Dek, IndexKey, Kek};
use crate::{FORMAT_VERSION, KeystoreError};

/// Domain context of the wrapped index key (study keys use their 16-byte key id).
const INDEX_KEY_CONTEXT: &[u8] = b"dicom-gateway index key";

/// The path of KEK version `version` given the configured `kek_file` (version 1).
#[must_use]
pub fn kek_version_path(kek_file: &Path, version: u32) -> PathBuf {
    if version <= 1 {
        return kek_file.to_path_buf();
    }
    let mut name = kek_file.as_os_str().to_owned();
    name.push(format!(".{version}"));
    PathBuf::from(name)
}

/// The KEK version files present next to `kek_file`, in ascending version order:
/// `kek_file` itself (version 1) if it exists, and every `<kek_file>.N` with `N` a
/// decimal number from 2 up, written without leading zeros. Other names are ignored.
///
/// # Errors
///
/// [`KeystoreError::KekFile`] if the folder cannot be listed.
pub fn kek_version_files(kek_file: &Path) -> Result<Vec<(u32, PathBuf)>, KeystoreError> {
    let folder = match kek_file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let base = kek_file
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| KeystoreError::KekFile {
            path: kek_file.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the KEK file name must be valid UTF-8",
            ),
        })?;
    let list_err = |source| KeystoreError::KekFile {
        path: folder.to_path_buf(),
        source,
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(folder).map_err(list_err)? {
        let entry = entry.map_err(list_err)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name == base {
            out.push((1, kek_file.to_path_buf()));
        } else if let Some(v) = name
            .strip_prefix(base)
            .and_then(|r| r.strip_prefix('.'))
            .and_then(parse_version)
        {
            out.push((v, kek_version_path(kek_file, v)));
        }
    }
    out.sort_by_key(|(v, _)| *v);
    Ok(out)
}

/// A version suffix: decimal, no sign, no leading zero, 2 or more.
fn parse_version(s: &str) -> Option<u32> {
    if s.is_empty() || s.len() > 10 || s.starts_with('0') || !s.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    s.parse::<u32>().ok().filter(|v| *v >= 2)
}

/// The KEK version a wrapped key names in its header, if it is a wrapped key of this
/// format at all (the header is authenticated when the key is unwrapped, not here).
#[must_use]
pub fn wrapped_kek_id(wrapped: &[u8]) -> Option<u32> {
    match wrapped {
        [FORMAT_VERSION, a, b, c, d, ..] => Some(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => None,
    }
}

/// Every KEK version a node holds (see the module invariants). Cloning shares the keys
/// (never copies their bytes).
#[derive(Clone)]
pub struct KekRing {
    /// Ascending by version; never empty.
    keks: Vec<Arc<Kek>>,
}

impl KekRing {
    /// A ring of `keks` (in any order).
    ///
    /// # Errors
    ///
    /// [`KeystoreError::Format`] if `keks` is empty or holds a version twice.
    pub fn new(keks: Vec<Kek>) -> Result<KekRing, KeystoreError> {
        Self::from_shared(keks.into_iter().map(Arc::new).collect())
    }

    fn from_shared(mut keks: Vec<Arc<Kek>>) -> Result<KekRing, KeystoreError> {
        keks.sort_by_key(|k| k.kek_id());
        if keks.is_empty() {
            return Err(KeystoreError::Format("a KEK ring needs at least one KEK"));
        }
        if keks.windows(2).any(|w| w[0].kek_id() == w[1].kek_id()) {
            return Err(KeystoreError::Format("a KEK ring holds each version once"));
        }
        Ok(KekRing { keks })
    }

    /// Loads every version present next to `kek_file` ([`kek_version_files`]), each
    /// with the checks of [`Kek::load`].
    ///
    /// # Errors
    ///
    /// As [`Kek::load`] for any version; [`KeystoreError::KekFile`] (not found, on
    /// `kek_file`) if there is none.
    pub fn load(kek_file: &Path) -> Result<KekRing, KeystoreError> {
        let files = kek_version_files(kek_file)?;
        if files.is_empty() {
            return Err(KeystoreError::KekFile {
                path: kek_file.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such file (nor any later version of it)",
                ),
            });
        }
        let keks = files
            .iter()
            .map(|(v, p)| Kek::load_version(p, *v))
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(keks)
    }

    /// The version new keys are wrapped under.
    #[must_use]
    pub fn newest(&self) -> &Kek {
        // `new` refuses an empty ring.
        &self.keks[self.keks.len() - 1]
    }

    /// The versions held, ascending.
    pub fn versions(&self) -> impl Iterator<Item = u32> + '_ {
        self.keks.iter().map(|k| k.kek_id())
    }

    /// Version `version`, if held.
    #[must_use]
    pub fn get(&self, version: u32) -> Option<&Kek> {
        self.keks
            .iter()
            .find(|k| k.kek_id() == version)
            .map(|k| &**k)
    }

    /// This ring without the versions for which `drop` is true (retired ones).
    ///
    /// # Errors
    ///
    /// [`KeystoreError::Format`] if nothing would be left.
    pub fn without(&self, drop: impl Fn(u32) -> bool) -> Result<KekRing, KeystoreError> {
        Self::from_shared(
            self.keks
                .iter()
                .filter(|k| !drop(k.kek_id()))
                .cloned()
                .collect(),
        )
    }

    /// Wraps `dek` under the newest version (see [`Kek::wrap`]).
    ///
    /// # Errors
    ///
    /// As [`Kek::wrap`].
    pub fn wrap(&self, dek: &Dek, context: &[u8]) -> Result<Vec<u8>, KeystoreError> {
        self.newest().wrap(dek, context)
    }

    /// Unwraps a key wrapped under any version held.
    ///
    /// # Errors
    ///
    /// [`KeystoreError::KekVersionMissing`] if its version is not held, otherwise as
    /// [`Kek::unwrap`].
    pub fn unwrap(&self, wrapped: &[u8], context: &[u8]) -> Result<Dek, KeystoreError> {
        self.kek_for(wrapped)?.unwrap(wrapped, context)
    }

    /// Wraps the index key under the newest version.
    ///
    /// # Errors
    ///
    /// As [`Kek::wrap`].
    pub fn wrap_index_key(&self, key: &IndexKey) -> Result<Vec<u8>, KeystoreError> {
        self.newest().wrap_secret(key.secret(), INDEX_KEY_CONTEXT)
    }

    /// Unwraps an index key made by [`KekRing::wrap_index_key`].
    ///
    /// # Errors
    ///
    /// As [`KekRing::unwrap`].
    pub fn unwrap_index_key(&self, wrapped: &[u8]) -> Result<IndexKey, KeystoreError> {
        let secret = self
            .kek_for(wrapped)?
            .unwrap_secret(wrapped, INDEX_KEY_CONTEXT)?;
        Ok(IndexKey::from_secret(secret))
    }

    /// The wrapped key moved to the newest version, or `None` if it is already under it.
    /// The key is authenticated under its own version first, so a tampered or misplaced
    /// key is refused here rather than laundered into a valid one.
    ///
    /// # Errors
    ///
    /// As [`KekRing::unwrap`] and [`Kek::wrap`].
    pub fn rewrap(&self, wrapped: &[u8], context: &[u8]) -> Result<Option<Vec<u8>>, KeystoreError> {
        let from = self.kek_for(wrapped)?;
        let to = self.newest();
        if from.kek_id() == to.kek_id() {
            return Ok(None);
        }
        let secret = from.unwrap_secret(wrapped, context)?;
        to.wrap_secret(&secret, context).map(Some)
    }

    /// [`KekRing::rewrap`] for the index key.
    ///
    /// # Errors
    ///
    /// As [`KekRing::rewrap`].
    pub fn rewrap_index_key(&self, wrapped: &[u8]) -> Result<Option<Vec<u8>>, KeystoreError> {
        self.rewrap(wrapped, INDEX_KEY_CONTEXT)
    }

    fn kek_for(&self, wrapped: &[u8]) -> Result<&Kek, KeystoreError> {
        let version = wrapped_kek_id(wrapped)
            .ok_or(KeystoreError::Format("unknown wrapped-key format version"))?;
        self.get(version)
            .ok_or(KeystoreError::KekVersionMissing { version })
    }
}

impl From<Kek> for KekRing {
    /// A ring of one version.
    fn from(kek: Kek) -> KekRing {
        KekRing {
            keks: vec![Arc::new(kek)],
        }
    }
}

impl std::fmt::Debug for KekRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KekRing")
            .field("versions", &self.versions().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kek(byte: u8, version: u32) -> Kek {
        Kek::from_bytes_version([byte; 32], version)
    }

    #[test]
    fn new_keys_are_wrapped_under_the_newest_version_and_old_ones_still_unwrap() {
        let old = KekRing::new(vec![kek(1, 1)]).unwrap();
        let dek = Dek::generate().unwrap();
        let w1 = old.wrap(&dek, b"study").unwrap();
        assert_eq!(wrapped_kek_id(&w1), Some(1));

        let ring = KekRing::new(vec![kek(2, 2), kek(1, 1)]).unwrap();
        assert_eq!(ring.newest().kek_id(), 2);
        let w2 = ring.wrap(&dek, b"study").unwrap();
        assert_eq!(wrapped_kek_id(&w2), Some(2));
        for w in [&w1, &w2] {
            let back = ring.unwrap(w, b"study").unwrap();
            assert_eq!(back.secret().as_bytes(), dek.secret().as_bytes());
        }
    }

    #[test]
    fn rewrap_moves_a_key_to_the_newest_version_and_leaves_one_there_alone() {
        let ring = KekRing::new(vec![kek(1, 1), kek(2, 2)]).unwrap();
        let dek = Dek::generate().unwrap();
        let w1 = kek(1, 1).wrap(&dek, b"study").unwrap();
        let w2 = ring.rewrap(&w1, b"study").unwrap().expect("moved");
        assert_eq!(wrapped_kek_id(&w2), Some(2));
        assert!(ring.rewrap(&w2, b"study").unwrap().is_none());
        // Version 1 alone no longer opens it; version 2 alone does.
        assert!(matches!(
            kek(1, 1).unwrap(&w2, b"study"),
            Err(KeystoreError::Unwrap)
        ));
        let back = kek(2, 2).unwrap(&w2, b"study").unwrap();
        assert_eq!(back.secret().as_bytes(), dek.secret().as_bytes());
        // A key moved to another study's context is refused, not laundered.
        assert!(matches!(
            ring.rewrap(&w1, b"other"),
            Err(KeystoreError::Unwrap)
        ));
    }

    #[test]
    fn a_key_under_a_version_the_ring_lacks_names_that_version() {
        let w3 = kek(3, 3).wrap(&Dek::generate().unwrap(), b"s").unwrap();
        let ring = KekRing::new(vec![kek(1, 1), kek(2, 2)]).unwrap();
        assert!(matches!(
            ring.unwrap(&w3, b"s"),
            Err(KeystoreError::KekVersionMissing { version: 3 })
        ));
        // Same bytes, a version id rewritten to one the ring holds: authentication fails.
        let mut forged = w3.clone();
        forged[1..5].copy_from_slice(&2u32.to_be_bytes());
        assert!(matches!(
            ring.unwrap(&forged, b"s"),
            Err(KeystoreError::Unwrap)
        ));
    }

    #[test]
    fn the_index_key_survives_rotation() {
        let v1 = kek(1, 1);
        let before = v1.index_hasher().id("study", b"1.2.3");
        let ring1 = KekRing::new(vec![kek(1, 1)]).unwrap();
        let wrapped = ring1.wrap_index_key(&v1.derived_index_key()).unwrap();
        let ring = KekRing::new(vec![kek(1, 1), kek(2, 2)]).unwrap();
        let moved = ring.rewrap_index_key(&wrapped).unwrap().expect("moved");
        let only_v2 = KekRing::new(vec![kek(2, 2)]).unwrap();
        let after = only_v2.unwrap_index_key(&moved).unwrap().hasher();
        assert_eq!(after.id("study", b"1.2.3"), before);
        // The index key's wrapping does not open as a study key and the other way round.
        assert!(ring.unwrap(&wrapped, b"dicom-gateway index key!").is_err());
    }

    #[test]
    fn a_ring_refuses_no_version_or_one_twice() {
        assert!(KekRing::new(vec![]).is_err());
        assert!(KekRing::new(vec![kek(1, 2), kek(2, 2)]).is_err());
        let ring = KekRing::new(vec![kek(1, 1), kek(2, 2)]).unwrap();
        let ring = ring.without(|v| v == 1).unwrap();
        assert_eq!(ring.versions().collect::<Vec<_>>(), [2]);
        assert!(ring.without(|_| true).is_err());
    }

    #[test]
    fn version_files_are_found_by_name_next_to_the_kek_file() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("kek.key");
        for name in [
            "kek.key",
            "kek.key.2",
            "kek.key.10",
            "kek.key.02",
            "kek.key.1",
            "kek.key.x",
            "kek.key.3.tmp",
            "kek.keys.4",
            "other.5",
        ] {
            std::fs::write(dir.path().join(name), [0u8; 32]).unwrap();
        }
        let found = kek_version_files(&base).unwrap();
        assert_eq!(
            found,
            [
                (1, base.clone()),
                (2, dir.path().join("kek.key.2")),
                (10, dir.path().join("kek.key.10")),
            ]
        );
        assert_eq!(kek_version_path(&base, 1), base);
        assert_eq!(kek_version_path(&base, 7), dir.path().join("kek.key.7"));
    }

    #[test]
    fn loading_a_ring_needs_at_least_one_version_and_checks_each_file() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("kek.key");
        assert!(matches!(
            KekRing::load(&base),
            Err(KeystoreError::KekFile { .. })
        ));
        Kek::generate_file(&kek_version_path(&base, 2)).unwrap();
        let ring = KekRing::load(&base).unwrap();
        assert_eq!(ring.versions().collect::<Vec<_>>(), [2]);
        Kek::generate_file(&base).unwrap();
        let p3 = kek_version_path(&base, 3);
        Kek::generate_file(&p3).unwrap();
        std::fs::set_permissions(&p3, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            KekRing::load(&base),
            Err(KeystoreError::KekPermissions { .. })
        ));
        std::fs::set_permissions(&p3, std::fs::Permissions::from_mode(0o600)).unwrap();
        let ring = KekRing::load(&base).unwrap();
        assert_eq!(ring.versions().collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(ring.newest().kek_id(), 3);
    }
}
