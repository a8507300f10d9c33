//! A development PKI for the site link (`dicom-gateway pki init`).
//!
//! Makes a CA and, per site, an ECDSA P-256 key and certificate whose DNS SAN is the site
//! name, valid for both server and client authentication. For production, use the
//! organisation's CA; this exists for the demo, tests and first trials.
//!
//! Invariants: private keys are written with mode 0600 and never overwritten; every site
//! name is a DNS name (it never becomes anything but a SAN and a file name stem checked
//! for that).

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};

/// What `init` wrote.
#[derive(Debug, Clone)]
pub struct PkiFiles {
    /// The CA certificate.
    pub ca_cert: PathBuf,
    /// (site, cert, key) per site.
    pub sites: Vec<(String, PathBuf, PathBuf)>,
}

fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {} (refusing to overwrite)", path.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    Ok(())
}

/// Create `dir` with a CA and one key and certificate per site.
pub fn init(dir: &Path, sites: &[String]) -> Result<PkiFiles> {
    if sites.is_empty() {
        bail!("give at least one --site");
    }
    for s in sites {
        if !crate::config::is_dns_name(s) {
            bail!("site name {s:?} must be a DNS name (letters, digits, '-', '.')");
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;

    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name = DistinguishedName::new();
    ca.distinguished_name
        .push(DnType::CommonName, "dicom-gateway development CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key)?;
    let ca_cert_path = dir.join("ca.crt");
    write_new(&ca_cert_path, ca_cert.pem().as_bytes(), 0o644)?;
    write_new(
        &dir.join("ca.key"),
        ca_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    let issuer = Issuer::new(ca, ca_key);

    let mut out = Vec::new();
    for site in sites {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut p = CertificateParams::new(vec![site.clone()])?;
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, site.as_str());
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = p.signed_by(&key, &issuer)?;
        let cert_path = dir.join(format!("{site}.crt"));
        let key_path = dir.join(format!("{site}.key"));
        write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
        write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
        out.push((site.clone(), cert_path, key_path));
    }
    Ok(PkiFiles {
        ca_cert: ca_cert_path,
        sites: out,
    })
}
