//! Certificates made by the `openssl` command, not by the gateway's own `pki` command: a
//! hospital PKI as a DICOM TLS test meets it (RSA keys, PKCS#8 PEM, v3 extensions), for
//! DCMTK peers and the gateway alike.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A certification authority in a folder: `<name>-ca.crt` and its key.
pub struct OpensslCa {
    dir: PathBuf,
    name: String,
    /// The CA certificate (PEM), for `ca =` keys and DCMTK's `+cf`.
    pub cert: PathBuf,
    key: PathBuf,
}

/// A leaf certificate and its private key (PEM).
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate.
    pub cert: PathBuf,
    /// Its key (PKCS#8, unencrypted).
    pub key: PathBuf,
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("run openssl (.ci/run installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

impl OpensslCa {
    /// A new CA called `name`, valid for two days, in `dir`.
    pub fn new(dir: &Path, name: &str) -> OpensslCa {
        std::fs::create_dir_all(dir).expect("CA folder");
        let cert = dir.join(format!("{name}-ca.crt"));
        let key = dir.join(format!("{name}-ca.key"));
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            s(&key),
            "-out",
            s(&cert),
            "-subj",
            &format!("/CN={name} CA"),
            "-days",
            "2",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        OpensslCa {
            dir: dir.to_owned(),
            name: name.to_owned(),
            cert,
            key,
        }
    }

    /// A certificate for `file_name` (CN = first SAN) with these SANs (`DNS:x`,
    /// `URI:spiffe://...`) and extended key usages (`serverAuth,clientAuth`).
    pub fn issue(&self, file_name: &str, sans: &[&str], eku: &str) -> Issued {
        let base = self.dir.join(format!("{}-{file_name}", self.name));
        let cert = base.with_extension("crt");
        let key = base.with_extension("key");
        let csr = base.with_extension("csr");
        let ext = base.with_extension("ext");
        let cn = sans
            .first()
            .map_or(file_name, |s| s.split_once(':').map_or(*s, |(_, v)| v));
        std::fs::write(
            &ext,
            format!(
                "basicConstraints=critical,CA:FALSE\n\
                 keyUsage=critical,digitalSignature,keyEncipherment\n\
                 extendedKeyUsage={eku}\n\
                 subjectAltName={}\n",
                sans.join(",")
            ),
        )
        .expect("extension file");
        openssl(&[
            "req",
            "-new",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            s(&key),
            "-out",
            s(&csr),
            "-subj",
            &format!("/CN={cn}"),
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            s(&csr),
            "-CA",
            s(&self.cert),
            "-CAkey",
            s(&self.key),
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            s(&cert),
            "-extfile",
            s(&ext),
        ]);
        Issued { cert, key }
    }
}
