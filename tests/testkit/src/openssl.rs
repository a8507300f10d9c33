//! Certificates made by the `openssl` command, not by the gateway's own `pki` command: a
//! hospital PKI as a DICOM TLS test meets it (RSA keys, PKCS#8 PEM, v3 extensions, a CA
//! database with revocation and CRLs), for DCMTK peers and the gateway alike.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A certification authority in a folder (`openssl ca` with its database): its
/// certificate, the leaves it issued, what it revoked and its CRL.
pub struct OpensslCa {
    dir: PathBuf,
    name: String,
    /// The CA certificate (PEM), for `ca =` keys and DCMTK's `+cf`.
    pub cert: PathBuf,
}

/// A leaf certificate and its private key (PEM).
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate.
    pub cert: PathBuf,
    /// Its key (PKCS#8, unencrypted).
    pub key: PathBuf,
}

/// Validity of a leaf, as `openssl ca` dates (`YYYYMMDDHHMMSSZ`).
#[derive(Debug, Clone, Default)]
pub struct Validity {
    /// notBefore; `None`: now.
    pub start: Option<String>,
    /// notAfter; `None`: in two days.
    pub end: Option<String>,
}

impl Validity {
    /// From `from` to `to` seconds relative to now (negative: in the past).
    pub fn relative(from: i64, to: i64) -> Validity {
        Validity {
            start: Some(openssl_date(from)),
            end: Some(openssl_date(to)),
        }
    }
}

/// Now plus `offset` seconds as an `openssl ca` date.
fn openssl_date(offset: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after the epoch")
        .as_secs() as i64;
    let out = Command::new("date")
        .args(["-u", "-d", &format!("@{}", now + offset), "+%Y%m%d%H%M%SZ"])
        .output()
        .expect("date");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

impl OpensslCa {
    /// A new CA called `name`, valid for two days, in `dir`.
    pub fn new(dir: &Path, name: &str) -> OpensslCa {
        std::fs::create_dir_all(dir.join("db")).expect("CA folder");
        std::fs::write(dir.join("db/index.txt"), "").expect("CA index");
        std::fs::write(dir.join("db/serial"), "1000\n").expect("CA serial");
        std::fs::write(dir.join("db/crlnumber"), "01\n").expect("CRL number");
        std::fs::write(
            dir.join("ca.cnf"),
            "[ca]\ndefault_ca = test\n[test]\ndatabase = db/index.txt\nnew_certs_dir = db\n\
             serial = db/serial\ncrlnumber = db/crlnumber\ndefault_md = sha256\n\
             default_days = 2\ndefault_crl_days = 1\npolicy = any\ncopy_extensions = none\n\
             unique_subject = no\n[any]\ncommonName = supplied\n",
        )
        .expect("ca.cnf");
        let ca = OpensslCa {
            dir: dir.to_owned(),
            name: name.to_owned(),
            cert: dir.join(format!("{name}-ca.crt")),
        };
        ca.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            s(&ca.cert),
            "-subj",
            &format!("/CN={name} CA"),
            "-days",
            "2",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        ca
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .current_dir(&self.dir)
            .args(args)
            .output()
            .expect("run openssl (.ci/run installs it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `openssl ca` with this CA's config, certificate and key, then `more`.
    fn ca(&self, more: &[&str]) {
        let mut args = vec![
            "ca",
            "-batch",
            "-config",
            "ca.cnf",
            "-cert",
            s(&self.cert),
            "-keyfile",
            "ca.key",
        ];
        args.extend_from_slice(more);
        self.openssl(&args);
    }

    /// A certificate valid from now for two days (see [`OpensslCa::issue_with`]).
    pub fn issue(&self, file_name: &str, sans: &[&str], eku: &str) -> Issued {
        self.issue_with(file_name, sans, eku, &Validity::default())
    }

    /// A certificate for `file_name` (CN = the first SAN's value) with these SANs
    /// (`DNS:x`, `URI:spiffe://...`), extended key usages (`serverAuth,clientAuth`) and
    /// validity.
    pub fn issue_with(&self, file_name: &str, sans: &[&str], eku: &str, v: &Validity) -> Issued {
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
                "[leaf]\nbasicConstraints=critical,CA:FALSE\n\
                 keyUsage=critical,digitalSignature,keyEncipherment\n\
                 extendedKeyUsage={eku}\nsubjectAltName={}\n",
                sans.join(",")
            ),
        )
        .expect("extension file");
        self.openssl(&[
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
        let mut args = vec![
            "-notext",
            "-in",
            s(&csr),
            "-out",
            s(&cert),
            "-extfile",
            s(&ext),
            "-extensions",
            "leaf",
        ];
        if let Some(start) = &v.start {
            args.extend(["-startdate", start.as_str()]);
        }
        if let Some(end) = &v.end {
            args.extend(["-enddate", end.as_str()]);
        }
        self.ca(&args);
        Issued { cert, key }
    }

    /// Revoke `leaf` in the CA's database (the next [`OpensslCa::crl`] lists it).
    pub fn revoke(&self, leaf: &Issued) {
        self.ca(&["-revoke", s(&leaf.cert)]);
    }

    /// A CRL of everything revoked so far, valid for a day; returns its path.
    pub fn crl(&self) -> PathBuf {
        let out = self.dir.join(format!("{}.crl", self.name));
        self.ca(&["-gencrl", "-out", s(&out)]);
        out
    }
}
