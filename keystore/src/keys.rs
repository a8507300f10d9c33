//! Key types: the KEK (one version of it), per-study DEKs, the index key and its keyed
//! hasher. Their bytes are held in a [`SecretKey`], and a KEK wraps DEKs and the index key
//! with the raw seal and open of `primitives`.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::Path;

use zeroize::{Zeroize, Zeroizing};

use crate::backend::{aead, hkdf, hmac, rand};
use crate::primitives::{SecretKey, less_safe_key, open_in_place, seal_with_random_nonce};
use crate::{FORMAT_VERSION, KEY_LEN, KeystoreError, NONCE_LEN, TAG_LEN};

/// The version of a KEK loaded by [`Kek::load`] or built by [`Kek::from_bytes`]: the
/// `keystore.kek_file` itself (later versions come from `keys rotate`, see [`crate::KekRing`]).
const FIRST_KEK_ID: u32 = 1;

/// Length of a wrapped DEK: version, KEK id, nonce, encrypted key, tag.
const WRAPPED_LEN: usize = 1 + 4 + NONCE_LEN + KEY_LEN + TAG_LEN;
/// Length of the wrapped-key header (version byte and KEK id).
const WRAP_HEADER_LEN: usize = 1 + 4;
/// Domain label of the associated data of a wrapped DEK.
const WRAP_AD_LABEL: &[u8] = b"dicom-gateway dek-wrap v1";

/// HKDF salt for the index-hash key.
const INDEX_SALT: &[u8] = b"dicom-gateway";
/// HKDF info for the index-hash key.
const INDEX_INFO: &[u8] = b"index-key v1";
/// Length of an index id.
const INDEX_ID_LEN: usize = 16;

/// HKDF info for the KEK check-value key (salt is [`INDEX_SALT`]).
const CHECK_INFO: &[u8] = b"kek-check v1";
/// The fixed label MACed under the check-value key.
const CHECK_LABEL: &[u8] = b"dicom-gateway kek check value v1";
/// Length of a KEK check value (a full HMAC-SHA-256 tag).
pub const KEK_CHECK_LEN: usize = 32;

/// Whether a KEK file with permission bits `mode`, owned by group `file_gid`,
/// may be used by a process whose effective group is `own_gid`: nothing for
/// others, and for the group nothing or read only, by the process's own group.
pub fn kek_mode_allowed(mode: u32, file_gid: u32, own_gid: u32) -> bool {
    let group = mode & 0o070;
    let others = mode & 0o007;
    others == 0 && (group == 0 || (group == 0o040 && file_gid == own_gid))
}

/// The key-encryption key.
///
/// Loaded from a file holding exactly [`KEY_LEN`] raw bytes; it is never
/// stored in the spool. It wraps per-study [`Dek`]s and derives the
/// [`IndexHasher`] key. Key bytes are zeroized on drop and `Debug` redacts
/// them.
pub struct Kek {
    kek_id: u32,
    key: SecretKey,
}

impl Kek {
    /// Loads a KEK from `path`.
    ///
    /// The file must be a regular file holding exactly [`KEY_LEN`] raw bytes.
    /// On Unix, the file may grant access to its owner and read access to its
    /// group, and the group only if it is this process's effective group: that
    /// is how Kubernetes mounts a Secret for a non-root pod (root-owned, group
    /// `fsGroup`, mode 0440, with `runAsGroup` equal to `fsGroup`). Any access
    /// for others, group write or execute, or group read by another group is
    /// refused (see [`kek_mode_allowed`]).
    ///
    /// # Errors
    ///
    /// [`KeystoreError::KekFile`] if the file cannot be opened or read or is
    /// not a regular file, [`KeystoreError::KekPermissions`] if it is
    /// more accessible than that, [`KeystoreError::KekLength`] if it does
    /// not hold exactly 32 bytes.
    pub fn load(path: &Path) -> Result<Kek, KeystoreError> {
        Self::load_version(path, FIRST_KEK_ID)
    }

    /// Loads version `kek_id` of the KEK from `path`, with the checks of [`Kek::load`].
    /// The id is written into every key it wraps, so that a [`crate::KekRing`] can tell
    /// which version unwraps it.
    ///
    /// # Errors
    ///
    /// As [`Kek::load`].
    pub fn load_version(path: &Path, kek_id: u32) -> Result<Kek, KeystoreError> {
        let read_err = |source| KeystoreError::KekFile {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::open(path).map_err(read_err)?;
        let meta = file.metadata().map_err(read_err)?;
        if !meta.is_file() {
            return Err(read_err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            )));
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
            let mode = meta.permissions().mode() & 0o7777;
            let own_gid = rustix::process::getegid().as_raw();
            if !kek_mode_allowed(mode, meta.gid(), own_gid) {
                return Err(KeystoreError::KekPermissions {
                    path: path.to_path_buf(),
                    mode,
                    gid: meta.gid(),
                    own_gid,
                });
            }
        }
        let length_err = |len: u64| KeystoreError::KekLength {
            path: path.to_path_buf(),
            len: usize::try_from(len).unwrap_or(usize::MAX),
        };
        if meta.len() != KEY_LEN as u64 {
            return Err(length_err(meta.len()));
        }
        let mut key = SecretKey::zeroed();
        file.read_exact(&mut key.as_mut_bytes()[..])
            .map_err(read_err)?;
        // The file may have grown since it was inspected.
        if read_some(&mut file).map_err(read_err)? {
            return Err(length_err(KEY_LEN as u64 + 1));
        }
        Ok(Kek { kek_id, key })
    }

    /// Creates a new KEK file at `path` holding [`KEY_LEN`] random bytes.
    ///
    /// The file is created exclusively (an existing file, including a
    /// dangling symlink, is never overwritten), with mode `0600` from
    /// creation on Unix. The file and, on Unix, its parent directory are
    /// synced before returning.
    ///
    /// # Errors
    ///
    /// [`KeystoreError::KekExists`] if `path` exists,
    /// [`KeystoreError::Random`] if the RNG fails, and
    /// [`KeystoreError::KekWrite`] if creating, writing or syncing fails (a
    /// partially written file is removed; if only the directory sync fails,
    /// the complete file is left in place).
    pub fn generate_file(path: &Path) -> Result<(), KeystoreError> {
        let write_err = |source| KeystoreError::KekWrite {
            path: path.to_path_buf(),
            source,
        };
        // Draw the key first so an RNG failure leaves no file behind.
        let key = SecretKey::random(&rand::SystemRandom::new())?;

        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            options.mode(0o600);
        }
        let mut file = options.open(path).map_err(|source| {
            if source.kind() == io::ErrorKind::AlreadyExists {
                KeystoreError::KekExists {
                    path: path.to_path_buf(),
                }
            } else {
                write_err(source)
            }
        })?;
        if let Err(source) = file
            .write_all(key.as_bytes())
            .and_then(|()| file.sync_all())
        {
            drop(file);
            // Best effort: do not leave a short key file that would block a retry.
            let _ = std::fs::remove_file(path);
            return Err(write_err(source));
        }
        drop(file);
        sync_parent_dir(path).map_err(write_err)
    }

    /// Builds a KEK (version 1) from raw bytes (for tests and benches).
    #[must_use]
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Kek {
        Self::from_bytes_version(bytes, FIRST_KEK_ID)
    }

    /// Builds version `kek_id` of a KEK from raw bytes (for tests and benches).
    #[must_use]
    pub fn from_bytes_version(bytes: [u8; KEY_LEN], kek_id: u32) -> Kek {
        let mut bytes = bytes;
        let mut key = SecretKey::zeroed();
        key.as_mut_bytes().copy_from_slice(&bytes);
        bytes.zeroize();
        Kek { kek_id, key }
    }

    /// The version of this KEK, written into every key it wraps.
    #[must_use]
    pub fn kek_id(&self) -> u32 {
        self.kek_id
    }

    /// Wraps (encrypts) a DEK under this KEK.
    ///
    /// `context` (e.g. the study's key id) is bound as associated data, so the
    /// wrapped key only unwraps with the same context. Output (65 bytes):
    /// `[FORMAT_VERSION][kek_id u32 BE][nonce 12][encrypted key 32][tag 16]`.
    /// The version byte and KEK id are authenticated too.
    ///
    /// # Errors
    ///
    /// [`KeystoreError::Random`] if the RNG fails, [`KeystoreError::Crypto`]
    /// on any other backend failure.
    pub fn wrap(&self, dek: &Dek, context: &[u8]) -> Result<Vec<u8>, KeystoreError> {
        self.wrap_secret(&dek.key, context)
    }

    /// Wraps any 32-byte secret in the format of [`Kek::wrap`].
    pub(crate) fn wrap_secret(
        &self,
        secret: &SecretKey,
        context: &[u8],
    ) -> Result<Vec<u8>, KeystoreError> {
        let header = self.wrap_header();
        let key = less_safe_key(&self.key)?;
        let ad = wrap_ad(header, context);
        seal_with_random_nonce(
            &key,
            &rand::SystemRandom::new(),
            &header,
            &ad,
            secret.as_bytes(),
        )
    }

    /// Unwraps a DEK produced by [`Kek::wrap`] with the same `context`.
    ///
    /// # Errors
    ///
    /// [`KeystoreError::Format`] if `wrapped` is not 65 bytes or has an
    /// unknown version; [`KeystoreError::Unwrap`] if it was wrapped under
    /// another KEK (or KEK id), for another context, or was tampered with;
    /// [`KeystoreError::Crypto`] on any other backend failure.
    pub fn unwrap(&self, wrapped: &[u8], context: &[u8]) -> Result<Dek, KeystoreError> {
        Ok(Dek {
            key: self.unwrap_secret(wrapped, context)?,
        })
    }

    /// Unwraps a secret wrapped by [`Kek::wrap_secret`] (errors as [`Kek::unwrap`]).
    pub(crate) fn unwrap_secret(
        &self,
        wrapped: &[u8],
        context: &[u8],
    ) -> Result<SecretKey, KeystoreError> {
        if wrapped.len() != WRAPPED_LEN {
            return Err(KeystoreError::Format("wrapped key must be 65 bytes"));
        }
        let (header, rest) = wrapped.split_at(WRAP_HEADER_LEN);
        if header[0] != FORMAT_VERSION {
            return Err(KeystoreError::Format("unknown wrapped-key format version"));
        }
        if header[1..] != self.kek_id.to_be_bytes() {
            return Err(KeystoreError::Unwrap);
        }
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let key = less_safe_key(&self.key)?;
        let ad = wrap_ad(self.wrap_header(), context);

        let mut buf = Zeroizing::new([0u8; KEY_LEN + TAG_LEN]);
        buf.copy_from_slice(sealed);
        let plain =
            open_in_place(&key, nonce, &ad, &mut buf[..]).map_err(|()| KeystoreError::Unwrap)?;
        if plain.len() != KEY_LEN {
            return Err(KeystoreError::Crypto);
        }
        let mut key = SecretKey::zeroed();
        key.as_mut_bytes().copy_from_slice(plain);
        Ok(key)
    }

    /// A keyed hasher for index keys, so UIDs never appear in plaintext in
    /// database keys: the hasher of [`Kek::derived_index_key`].
    #[must_use]
    pub fn index_hasher(&self) -> IndexHasher {
        self.derived_index_key().hasher()
    }

    /// The index key derived from this KEK: HKDF-SHA256 of the KEK bytes, salt
    /// `b"dicom-gateway"`, info `b"index-key v1"`. A data directory created under
    /// version 1 of its KEK uses this key for good (it is stored wrapped, so that it
    /// outlives that version once the KEK is rotated).
    ///
    /// # Panics
    ///
    /// Never: a 32-byte HKDF-SHA256 output is always within the RFC 5869
    /// length limit, the only condition under which expansion fails.
    #[must_use]
    pub fn derived_index_key(&self) -> IndexKey {
        let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, INDEX_SALT);
        let prk = salt.extract(self.key.as_bytes());
        let info = [INDEX_INFO];
        let okm = prk
            .expand(&info, hmac::HMAC_SHA256)
            .expect("a 32-byte HKDF-SHA256 output is within the RFC 5869 length limit");
        let mut key = SecretKey::zeroed();
        okm.fill(&mut key.as_mut_bytes()[..])
            .expect("a 32-byte HKDF-SHA256 output is within the RFC 5869 length limit");
        IndexKey { key }
    }

    /// The KEK check value: `HMAC-SHA-256(K, "dicom-gateway kek check value v1")` with
    /// `K = HKDF-SHA-256(salt = "dicom-gateway", ikm = KEK, info = "kek-check v1")`.
    ///
    /// Stored in a data directory when it is created, so that a node started with
    /// another KEK refuses to start instead of failing every object. It reveals nothing
    /// about the KEK (a PRF output under a derived key; never the KEK nor a plain hash
    /// of it), and its derived key is separate from every other use of the KEK.
    ///
    /// # Panics
    ///
    /// Never: a 32-byte HKDF-SHA256 output is always within the RFC 5869 length limit.
    #[must_use]
    pub fn check_value(&self) -> [u8; KEK_CHECK_LEN] {
        let tag = hmac::sign(&self.check_key(), CHECK_LABEL);
        let mut out = [0u8; KEK_CHECK_LEN];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Compares `stored` with this KEK's [`check_value`](Self::check_value) in constant
    /// time.
    ///
    /// # Errors
    ///
    /// [`KeystoreError::KekMismatch`] if they differ (including a wrong length).
    pub fn verify_check_value(&self, stored: &[u8]) -> Result<(), KeystoreError> {
        hmac::verify(&self.check_key(), CHECK_LABEL, stored).map_err(|_| KeystoreError::KekMismatch)
    }

    fn check_key(&self) -> hmac::Key {
        let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, INDEX_SALT);
        let prk = salt.extract(self.key.as_bytes());
        let info = [CHECK_INFO];
        let okm = prk
            .expand(&info, hmac::HMAC_SHA256)
            .expect("a 32-byte HKDF-SHA256 output is within the RFC 5869 length limit");
        hmac::Key::from(okm)
    }

    fn wrap_header(&self) -> [u8; WRAP_HEADER_LEN] {
        let id = self.kek_id.to_be_bytes();
        [FORMAT_VERSION, id[0], id[1], id[2], id[3]]
    }
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kek")
            .field("kek_id", &self.kek_id)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Associated data of a wrapped DEK: label, header (version and KEK id), context.
fn wrap_ad(header: [u8; WRAP_HEADER_LEN], context: &[u8]) -> Vec<u8> {
    let mut ad = Vec::with_capacity(WRAP_AD_LABEL.len() + WRAP_HEADER_LEN + context.len());
    ad.extend_from_slice(WRAP_AD_LABEL);
    ad.extend_from_slice(&header);
    ad.extend_from_slice(context);
    ad
}

/// Reads one byte to detect trailing data; the byte itself is discarded.
fn read_some(file: &mut File) -> io::Result<bool> {
    let mut extra = [0u8; 1];
    loop {
        match file.read(&mut extra) {
            Ok(n) => return Ok(n > 0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Makes the directory entry of a newly created file durable.
#[cfg(unix)]
fn sync_parent_dir(path: &Path) -> io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}

/// Directory sync is not available portably outside Unix.
#[cfg(not(unix))]
fn sync_parent_dir(_path: &Path) -> io::Result<()> {
    Ok(())
}

/// A 256-bit data-encryption key (one per study).
///
/// Generated randomly, stored only wrapped under the [`Kek`]. Key bytes are
/// zeroized on drop and `Debug` redacts them.
pub struct Dek {
    key: SecretKey,
}

impl Dek {
    #[cfg(test)]
    pub(crate) fn secret(&self) -> &SecretKey {
        &self.key
    }

    /// Generates a fresh random DEK.
    ///
    /// # Errors
    ///
    /// [`KeystoreError::Random`] if the system RNG fails.
    pub fn generate() -> Result<Dek, KeystoreError> {
        Ok(Dek {
            key: SecretKey::random(&rand::SystemRandom::new())?,
        })
    }

    /// The AES-256-GCM key for this DEK.
    pub(crate) fn aead_key(&self) -> Result<aead::LessSafeKey, KeystoreError> {
        less_safe_key(&self.key)
    }
}

impl fmt::Debug for Dek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dek").field("key", &"<redacted>").finish()
    }
}

/// The key of the [`IndexHasher`]: 32 bytes, stored only wrapped (see
/// [`crate::KekRing::wrap_index_key`]). Zeroized on drop; `Debug` redacts it.
pub struct IndexKey {
    key: SecretKey,
}

impl IndexKey {
    /// A fresh random index key (for a data directory created without a version-1 KEK).
    ///
    /// # Errors
    ///
    /// [`KeystoreError::Random`] if the system RNG fails.
    pub fn generate() -> Result<IndexKey, KeystoreError> {
        Ok(IndexKey {
            key: SecretKey::random(&rand::SystemRandom::new())?,
        })
    }

    pub(crate) fn from_secret(key: SecretKey) -> IndexKey {
        IndexKey { key }
    }

    pub(crate) fn secret(&self) -> &SecretKey {
        &self.key
    }

    /// The keyed hasher under this key.
    #[must_use]
    pub fn hasher(&self) -> IndexHasher {
        IndexHasher {
            key: hmac::Key::new(hmac::HMAC_SHA256, self.key.as_bytes()),
        }
    }
}

impl fmt::Debug for IndexKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IndexKey")
            .field("key", &"<redacted>")
            .finish()
    }
}

/// HMAC-SHA256 keyed hash for database index keys, truncated to 16 bytes and
/// domain-separated.
///
/// Obtained from [`Kek::index_hasher`]. The derived key is held by the
/// backend's HMAC key type, which owns (and cleans up) that memory; `Debug`
/// redacts it.
#[derive(Clone)]
pub struct IndexHasher {
    key: hmac::Key,
}

impl IndexHasher {
    /// `HMAC(key, domain || 0x00 || value)[..16]`.
    ///
    /// `domain` names what is hashed (e.g. `"study"`); it must not contain a
    /// NUL byte, so that the encoding stays unambiguous.
    #[must_use]
    pub fn id(&self, domain: &str, value: &[u8]) -> [u8; INDEX_ID_LEN] {
        debug_assert!(!domain.contains('\0'), "index domain must not contain NUL");
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(domain.as_bytes());
        ctx.update(&[0]);
        ctx.update(value);
        let tag = ctx.sign();
        let mut out = [0u8; INDEX_ID_LEN];
        out.copy_from_slice(&tag.as_ref()[..INDEX_ID_LEN]);
        out
    }
}

impl fmt::Debug for IndexHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IndexHasher")
            .field("key", &"<redacted>")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kek(byte: u8) -> Kek {
        let mut bytes = [0u8; KEY_LEN];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = byte.wrapping_add(i as u8);
        }
        Kek::from_bytes(bytes)
    }

    fn to_hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn assert_not_leaked(debug: &str, key: &[u8]) {
        assert!(!debug.contains(&to_hex(key)), "hex key leaked: {debug}");
        assert!(
            !debug.contains(&to_hex(key).to_uppercase()),
            "HEX key leaked: {debug}"
        );
        assert!(
            !debug.contains(&format!("{key:?}")[1..20]),
            "decimal key leaked: {debug}"
        );
    }

    #[cfg(unix)]
    fn set_mode(path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn wrap_unwrap_round_trip() {
        let kek = kek(7);
        let dek = Dek::generate().unwrap();
        let wrapped = kek.wrap(&dek, b"study-key-1").unwrap();
        assert_eq!(wrapped.len(), 65);
        assert_eq!(wrapped[0], FORMAT_VERSION);
        assert_eq!(wrapped[1..5], 1u32.to_be_bytes());
        assert!(!wrapped.windows(KEY_LEN).any(|w| w == dek.key.as_bytes()));
        let back = kek.unwrap(&wrapped, b"study-key-1").unwrap();
        assert_eq!(back.key.as_bytes(), dek.key.as_bytes());
    }

    #[test]
    fn wrap_uses_fresh_nonces() {
        let kek = kek(7);
        let dek = Dek::generate().unwrap();
        let a = kek.wrap(&dek, b"ctx").unwrap();
        let b = kek.wrap(&dek, b"ctx").unwrap();
        assert_ne!(a[5..17], b[5..17], "nonce reused");
        assert_ne!(a, b);
    }

    #[test]
    fn unwrap_with_other_context_fails() {
        let kek = kek(7);
        let wrapped = kek.wrap(&Dek::generate().unwrap(), b"study-a").unwrap();
        assert!(matches!(
            kek.unwrap(&wrapped, b"study-b"),
            Err(KeystoreError::Unwrap)
        ));
        assert!(matches!(
            kek.unwrap(&wrapped, b""),
            Err(KeystoreError::Unwrap)
        ));
    }

    #[test]
    fn unwrap_with_other_kek_fails() {
        let wrapped = kek(7).wrap(&Dek::generate().unwrap(), b"ctx").unwrap();
        assert!(matches!(
            kek(8).unwrap(&wrapped, b"ctx"),
            Err(KeystoreError::Unwrap)
        ));
    }

    #[test]
    fn unwrap_detects_any_tampered_byte() {
        let kek = kek(7);
        let wrapped = kek.wrap(&Dek::generate().unwrap(), b"ctx").unwrap();
        for i in 1..wrapped.len() {
            let mut bad = wrapped.clone();
            bad[i] ^= 0x01;
            assert!(
                matches!(kek.unwrap(&bad, b"ctx"), Err(KeystoreError::Unwrap)),
                "tampered byte {i} accepted"
            );
        }
    }

    #[test]
    fn unwrap_rejects_bad_version_and_length() {
        let kek = kek(7);
        let wrapped = kek.wrap(&Dek::generate().unwrap(), b"ctx").unwrap();
        let mut bad = wrapped.clone();
        bad[0] = 2;
        assert!(matches!(
            kek.unwrap(&bad, b"ctx"),
            Err(KeystoreError::Format(_))
        ));
        for len in 0..100 {
            let mut input = vec![0u8; len];
            input[..len.min(wrapped.len())].copy_from_slice(&wrapped[..len.min(wrapped.len())]);
            let result = kek.unwrap(&input, b"ctx");
            if len == wrapped.len() {
                assert!(result.is_ok());
            } else {
                assert!(matches!(result, Err(KeystoreError::Format(_))), "len {len}");
            }
        }
    }

    #[test]
    fn index_hasher_is_deterministic() {
        let a = kek(7).index_hasher();
        let b = kek(7).index_hasher();
        assert_eq!(a.id("study", b"1.2.3"), b.id("study", b"1.2.3"));
        assert_eq!(a.id("study", b"1.2.3"), a.clone().id("study", b"1.2.3"));
    }

    #[test]
    fn index_hasher_separates_domains_values_and_keks() {
        let h = kek(7).index_hasher();
        let base = h.id("study", b"1.2.3");
        assert_ne!(base, h.id("series", b"1.2.3"));
        assert_ne!(base, h.id("study", b"1.2.4"));
        // The separator keeps "ab" + "c" apart from "a" + "bc".
        assert_ne!(h.id("ab", b"c"), h.id("a", b"bc"));
        assert_ne!(base, kek(8).index_hasher().id("study", b"1.2.3"));
    }

    /// Pins the derivation (HKDF-SHA256, salt, info, message layout) by
    /// recomputing it from HMAC primitives, so index keys stay stable.
    #[test]
    fn index_hasher_matches_specified_derivation() {
        let kek = kek(7);
        let hmac = |key: &[u8], parts: &[&[u8]]| {
            let mut ctx = hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, key));
            for p in parts {
                ctx.update(p);
            }
            ctx.sign().as_ref().to_vec()
        };
        let prk = hmac(b"dicom-gateway", &[kek.key.as_bytes()]);
        let okm = hmac(&prk, &[b"index-key v1", &[1]]);
        let expected = hmac(&okm, &[b"sop", &[0], b"1.2.840.10008"]);
        assert_eq!(
            kek.index_hasher().id("sop", b"1.2.840.10008")[..],
            expected[..16]
        );
    }

    #[test]
    fn debug_redacts_keys() {
        let bytes = [0xA7u8; KEY_LEN];
        let mut distinct = [0u8; KEY_LEN];
        for (i, b) in distinct.iter_mut().enumerate() {
            *b = 0xC0 + i as u8;
        }
        for raw in [bytes, distinct] {
            let kek = Kek::from_bytes(raw);
            let debug = format!("{kek:?} {kek:#?}");
            assert!(debug.contains("redacted"));
            assert_not_leaked(&debug, &raw);
            let hasher = format!("{:?}", kek.index_hasher());
            assert!(hasher.contains("redacted"));
        }
        let dek = Dek::generate().unwrap();
        let debug = format!("{dek:?} {dek:#?}");
        assert!(debug.contains("redacted"));
        assert_not_leaked(&debug, dek.key.as_bytes());
    }

    #[cfg(unix)]
    #[test]
    fn generate_file_creates_0600_and_refuses_overwrite() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek.bin");
        Kek::generate_file(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), KEY_LEN as u64);
        let original = std::fs::read(&path).unwrap();
        assert_ne!(original, vec![0u8; KEY_LEN]);

        let err = Kek::generate_file(&path).unwrap_err();
        assert!(matches!(err, KeystoreError::KekExists { .. }), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), original, "file overwritten");

        // The loaded file is the KEK whose bytes were written.
        let loaded = Kek::load(&path).unwrap();
        assert_eq!(loaded.kek_id(), 1);
        let mut raw = [0u8; KEY_LEN];
        raw.copy_from_slice(&original);
        let dek = Dek::generate().unwrap();
        let wrapped = loaded.wrap(&dek, b"ctx").unwrap();
        assert!(Kek::from_bytes(raw).unwrap(&wrapped, b"ctx").is_ok());
    }

    #[cfg(unix)]
    #[test]
    fn generate_file_refuses_dangling_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(matches!(
            Kek::generate_file(&link),
            Err(KeystoreError::KekExists { .. })
        ));
        assert!(!target.exists());
    }

    #[cfg(unix)]
    #[test]
    fn load_refuses_wrong_length() {
        let dir = tempfile::tempdir().unwrap();
        for len in [0usize, 31, 33] {
            let path = dir.path().join(format!("kek-{len}"));
            std::fs::write(&path, vec![0x42u8; len]).unwrap();
            set_mode(&path, 0o600);
            let err = Kek::load(&path).unwrap_err();
            match &err {
                KeystoreError::KekLength { len: found, .. } => assert_eq!(*found, len),
                other => panic!("expected KekLength, got {other:?}"),
            }
            let msg = err.to_string();
            assert!(msg.contains("exactly 32 bytes"), "{msg}");
            assert!(msg.contains(&format!("found {len}")), "{msg}");
        }
        let ok = dir.path().join("kek-32");
        std::fs::write(&ok, [0x42u8; KEY_LEN]).unwrap();
        set_mode(&ok, 0o600);
        assert!(Kek::load(&ok).is_ok());
    }

    #[cfg(unix)]
    fn chown_group(path: &Path, gid: u32) {
        std::os::unix::fs::chown(path, None, Some(gid)).unwrap();
    }

    #[cfg(unix)]
    fn own_gid() -> u32 {
        rustix::process::getegid().as_raw()
    }

    #[cfg(unix)]
    #[test]
    fn load_refuses_world_access_and_group_write_or_execute() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek.bin");
        std::fs::write(&path, [0x42u8; KEY_LEN]).unwrap();
        // The file's group is ours here (it was just created), so only the bits decide.
        chown_group(&path, own_gid());
        for mode in [
            0o644, 0o604, 0o660, 0o602, 0o620, 0o610, 0o444, 0o650, 0o670,
        ] {
            set_mode(&path, mode);
            let err = Kek::load(&path).unwrap_err();
            match &err {
                KeystoreError::KekPermissions { mode: found, .. } => assert_eq!(*found, mode),
                other => panic!("expected KekPermissions, got {other:?}"),
            }
            assert!(err.to_string().contains("chmod 600"), "{err}");
        }
        for mode in [0o600, 0o400] {
            set_mode(&path, mode);
            assert!(Kek::load(&path).is_ok(), "mode {mode:o}");
        }
    }

    /// Kubernetes mounts a Secret root-owned, group `fsGroup`, mode 0440.
    #[cfg(unix)]
    #[test]
    fn load_accepts_group_read_by_the_process_group_only() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek.bin");
        std::fs::write(&path, [0x42u8; KEY_LEN]).unwrap();
        chown_group(&path, own_gid());
        for mode in [0o440, 0o640] {
            set_mode(&path, mode);
            assert!(Kek::load(&path).is_ok(), "mode {mode:o}, own group");
        }

        // The same bits with another group: refused. Changing a file's group to one we
        // are not in needs root (CI runs as root); a non-root run checks the rule alone.
        let other = own_gid().wrapping_add(4242);
        if std::os::unix::fs::chown(&path, None, Some(other)).is_ok() {
            assert_eq!(std::fs::metadata(&path).unwrap().gid(), other);
            for mode in [0o440, 0o640] {
                set_mode(&path, mode);
                match Kek::load(&path).unwrap_err() {
                    KeystoreError::KekPermissions {
                        gid, own_gid: g, ..
                    } => {
                        assert_eq!((gid, g), (other, own_gid()));
                    }
                    e => panic!("expected KekPermissions, got {e:?}"),
                }
            }
            // Owner-only access does not depend on the group.
            set_mode(&path, 0o400);
            assert!(Kek::load(&path).is_ok());
        } else {
            eprintln!("not root: cannot chown to a foreign group; checking the rule only");
        }
        assert!(!kek_mode_allowed(0o440, other, own_gid()));
        assert!(kek_mode_allowed(0o440, own_gid(), own_gid()));
    }

    #[test]
    fn load_reports_missing_file_and_directory() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("absent");
        let err = Kek::load(&missing).unwrap_err();
        assert!(matches!(err, KeystoreError::KekFile { .. }), "{err}");
        assert!(err.to_string().contains("cannot read KEK file"));
        let err = Kek::load(dir.path()).unwrap_err();
        assert!(matches!(err, KeystoreError::KekFile { .. }), "{err}");
    }
}
