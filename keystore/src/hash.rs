//! Streaming SHA-256.

use std::fmt;

use crate::backend::digest;

/// Streaming SHA-256 over the backend's digest context.
#[derive(Clone)]
pub struct Sha256 {
    ctx: digest::Context,
}

impl Sha256 {
    /// Starts a new SHA-256 computation.
    #[must_use]
    pub fn new() -> Self {
        Self {
            ctx: digest::Context::new(&digest::SHA256),
        }
    }

    /// Feeds more data into the hash.
    pub fn update(&mut self, data: &[u8]) {
        self.ctx.update(data);
    }

    /// Finishes the computation and returns the 32-byte digest.
    #[must_use]
    pub fn finish(self) -> [u8; 32] {
        let digest = self.ctx.finish();
        let mut out = [0u8; 32];
        // SHA-256 output is always 32 bytes.
        out.copy_from_slice(digest.as_ref());
        out
    }
}

impl Default for Sha256 {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sha256").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_abc_known_vector() {
        let mut h = Sha256::new();
        h.update(b"a");
        h.update(b"bc");
        let expected = [
            0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea, 0x41, 0x41, 0x40, 0xde, 0x5d, 0xae,
            0x22, 0x23, 0xb0, 0x03, 0x61, 0xa3, 0x96, 0x17, 0x7a, 0x9c, 0xb4, 0x10, 0xff, 0x61,
            0xf2, 0x00, 0x15, 0xad,
        ];
        assert_eq!(h.finish(), expected);
    }

    #[test]
    fn sha256_empty_known_vector() {
        let expected = [
            0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f,
            0xb9, 0x24, 0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b,
            0x78, 0x52, 0xb8, 0x55,
        ];
        assert_eq!(Sha256::default().finish(), expected);
    }
}
