//! The bottom of the crate: the secret key type ([`SecretKey`]) and the raw AES-256-GCM
//! seal and open that every sealed format is built on (wrapped keys in `keys`, segments and
//! records in `aead`). It uses nothing of the crate but the backend, the error type and the
//! lengths.
//!
//! Invariants:
//! - Key bytes live in one heap buffer that is zeroized on drop and never printed
//!   ([`SecretKey`] has no `Debug`).
//! - Every seal uses a fresh random 96-bit nonce from the system RNG, and zeroizes its output
//!   buffer when it fails.
//! - A failed open says only that it failed (`Err(())`); each format maps that to its own
//!   error.

use zeroize::Zeroize;

use crate::backend::{aead, rand};
use crate::{KEY_LEN, KeystoreError, NONCE_LEN, TAG_LEN};

/// A 256-bit secret held on the heap (so moving its owner does not copy it)
/// and zeroized on drop. Never printed.
pub(crate) struct SecretKey(Box<[u8; KEY_LEN]>);

impl SecretKey {
    /// An all-zero key, to be filled in place.
    pub(crate) fn zeroed() -> Self {
        Self(Box::new([0u8; KEY_LEN]))
    }

    /// A key filled from the system RNG.
    pub(crate) fn random(rng: &rand::SystemRandom) -> Result<Self, KeystoreError> {
        use rand::SecureRandom as _;
        let mut key = Self::zeroed();
        rng.fill(&mut key.0[..])
            .map_err(|_| KeystoreError::Random)?;
        Ok(key)
    }

    /// The raw key bytes.
    pub(crate) fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// The raw key bytes, to be filled in place.
    pub(crate) fn as_mut_bytes(&mut self) -> &mut [u8; KEY_LEN] {
        &mut self.0
    }
}

impl Drop for SecretKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// Builds the AES-256-GCM key for `key`.
pub(crate) fn less_safe_key(key: &SecretKey) -> Result<aead::LessSafeKey, KeystoreError> {
    aead::UnboundKey::new(&aead::AES_256_GCM, key.as_bytes())
        .map(aead::LessSafeKey::new)
        .map_err(|_| KeystoreError::Crypto)
}

/// Returns `header || nonce || ciphertext || tag` with a fresh random nonce.
///
/// The plaintext is encrypted in place inside the output buffer, which is
/// allocated once at its final size; on failure it is zeroized.
pub(crate) fn seal_with_random_nonce(
    key: &aead::LessSafeKey,
    rng: &rand::SystemRandom,
    header: &[u8],
    ad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, KeystoreError> {
    use rand::SecureRandom as _;
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill(&mut nonce).map_err(|_| KeystoreError::Random)?;

    let body_start = header.len() + NONCE_LEN;
    let mut out = Vec::with_capacity(body_start + plaintext.len() + TAG_LEN);
    out.extend_from_slice(header);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    match key.seal_in_place_separate_tag(
        aead::Nonce::assume_unique_for_key(nonce),
        aead::Aad::from(ad),
        &mut out[body_start..],
    ) {
        Ok(tag) => {
            out.extend_from_slice(tag.as_ref());
            Ok(out)
        }
        Err(_) => {
            out.zeroize();
            Err(KeystoreError::Crypto)
        }
    }
}

/// Authenticates and decrypts `ciphertext || tag` in place; returns the
/// plaintext prefix of `in_out`, or `Err(())` if authentication fails.
pub(crate) fn open_in_place<'b>(
    key: &aead::LessSafeKey,
    nonce: &[u8],
    ad: &[u8],
    in_out: &'b mut [u8],
) -> Result<&'b mut [u8], ()> {
    let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| ())?;
    key.open_in_place(
        aead::Nonce::assume_unique_for_key(nonce),
        aead::Aad::from(ad),
        in_out,
    )
    .map_err(|_| ())
}

/// Decrypts `ciphertext || tag` into a new buffer.
pub(crate) fn open_to_vec(
    key: &aead::LessSafeKey,
    nonce: &[u8],
    ad: &[u8],
    sealed_body: &[u8],
) -> Result<Vec<u8>, ()> {
    let mut buf = sealed_body.to_vec();
    let len = open_in_place(key, nonce, ad, &mut buf)?.len();
    buf.truncate(len);
    Ok(buf)
}
