//! Process exit codes of the `dicom-gateway` command, and which errors are configuration
//! errors.
//!
//! One code for every configuration error, wherever it is found: parsing and validating
//! the TOML ([`crate::config::ConfigError`]), and at start-up the files the config names
//! (PEM files that are missing or unusable and a certificate without the node name,
//! [`crate::tls::TlsError`]; a KEK file that is missing, of the wrong length or too
//! accessible, [`keystore::KeystoreError`]; a KEK that does not match the data
//! directory's check value, [`crate::spool::kek_check::KekCheckError`]: the config names
//! the wrong `keystore.kek_file`, and a restart will not fix it; a data directory others
//! can read, [`SpoolError::DataDirPermissions`]). That code is 78, `EX_CONFIG` of BSD
//! `sysexits.h` ("something was found in an unconfigured or misconfigured state"), so a
//! supervisor can tell a broken config, which a restart will not fix, from a crash.
//! Command-line mistakes are clap's usage errors (2). Everything else is 1.

use crate::config::ConfigError;
use crate::spool::SpoolError;
use crate::spool::kek_check::KekCheckError;
use crate::tls::TlsError;
use keystore::KeystoreError;

/// `EX_CONFIG`: a configuration error.
pub const EX_CONFIG: u8 = 78;
/// Any other failure.
pub const FAILURE: u8 = 1;

/// True if `e`, or any error in its chain, is a configuration error.
pub fn is_config_error(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.is::<ConfigError>()
            || c.is::<TlsError>()
            || matches!(
                c.downcast_ref::<SpoolError>(),
                Some(
                    SpoolError::KekCheck(
                        KekCheckError::Mismatch { .. }
                            | KekCheckError::Missing { .. }
                            | KekCheckError::AllRetired { .. }
                            | KekCheckError::Malformed { .. }
                    ) | SpoolError::DataDirPermissions { .. }
                )
            )
            || matches!(
                c.downcast_ref::<KeystoreError>(),
                Some(
                    KeystoreError::KekFile { .. }
                        | KeystoreError::KekLength { .. }
                        | KeystoreError::KekPermissions { .. }
                        | KeystoreError::KekMismatch
                        | KeystoreError::KekVersionMissing { .. }
                )
            )
    })
}

/// The exit code for a failed command.
pub fn code_for(e: &anyhow::Error) -> u8 {
    if is_config_error(e) {
        EX_CONFIG
    } else {
        FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context as _;

    #[test]
    fn config_errors_anywhere_in_the_chain() {
        let tls: anyhow::Error = TlsError::File {
            path: "x.pem".into(),
            message: "no certificate found".into(),
        }
        .into();
        let wrapped = Err::<(), _>(tls)
            .context("site.toml: [tls] cert")
            .unwrap_err();
        assert_eq!(code_for(&wrapped), EX_CONFIG);
        let kek: anyhow::Error = KeystoreError::KekLength {
            path: "k".into(),
            len: 3,
        }
        .into();
        assert_eq!(code_for(&kek), EX_CONFIG);
        assert_eq!(code_for(&KeystoreError::Unwrap.into()), FAILURE);
        let mismatch: anyhow::Error = SpoolError::KekCheck(KekCheckError::Mismatch {
            path: "d/kek.check".into(),
            version: 1,
            source: KeystoreError::KekMismatch,
        })
        .into();
        let wrapped = Err::<(), _>(mismatch)
            .context("site.toml: cannot open the spool in node.data_dir d")
            .unwrap_err();
        assert_eq!(code_for(&wrapped), EX_CONFIG);
        assert_eq!(code_for(&anyhow::anyhow!("cannot listen")), FAILURE);
    }
}
