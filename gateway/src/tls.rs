//! TLS for the site link: rustls configurations and peer identity.
//!
//! Invariants:
//! - TLS 1.3 only, with the aws-lc-rs provider chosen explicitly (no process-wide default);
//! - both sides present certificates that chain to the configured CA;
//! - a server accepts a client only if its certificate carries a DNS SAN listed in
//!   `allowed_peers`; the check happens inside the handshake, so an unlisted peer never
//!   gets a connection;
//! - a client accepts a server only if its certificate carries the configured `peer_name`.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use crate::config::TlsSection;

/// A TLS setup error, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The node's certificate does not carry the node name.
    #[error("{path}: certificate has no DNS SAN {name:?} (node.name must match it)")]
    NameMismatch {
        /// The certificate file.
        path: String,
        /// The expected name.
        name: String,
    },
}

/// The crypto provider used everywhere (aws-lc-rs).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn file_err(path: &Path, message: impl Into<String>) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// Read a PEM certificate chain.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|e| file_err(path, e.to_string()))?;
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut pem.as_slice()).collect();
    let certs = certs.map_err(|e| file_err(path, format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(file_err(path, "no certificate found"));
    }
    Ok(certs)
}

/// Read a PEM private key.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = std::fs::read(path).map_err(|e| file_err(path, e.to_string()))?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| file_err(path, format!("bad PEM: {e}")))?
        .ok_or_else(|| file_err(path, "no private key found"))
}

/// Read the CA bundle into a root store.
pub fn load_roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(path)? {
        roots
            .add(c)
            .map_err(|e| file_err(path, format!("unusable CA certificate: {e}")))?;
    }
    Ok(Arc::new(roots))
}

/// True if the end-entity certificate is valid for the DNS name `name`.
pub fn cert_has_dns_name(cert: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(ee) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    let Ok(sn) = ServerName::try_from(name) else {
        return false;
    };
    ee.verify_is_valid_for_subject_name(&sn).is_ok()
}

/// Check that the node's own certificate carries `node_name`.
pub fn check_node_name(tls: &TlsSection, node_name: &str) -> Result<(), TlsError> {
    let certs = load_certs(&tls.cert)?;
    if certs
        .first()
        .is_some_and(|c| cert_has_dns_name(c, node_name))
    {
        Ok(())
    } else {
        Err(TlsError::NameMismatch {
            path: tls.cert.display().to_string(),
            name: node_name.to_owned(),
        })
    }
}

/// Which of `allowed` names the client certificate carries.
pub fn peer_name(cert: &CertificateDer<'_>, allowed: &[String]) -> Option<String> {
    allowed.iter().find(|n| cert_has_dns_name(cert, n)).cloned()
}

/// Verifies client certificates against the CA, then against the allow-list of names.
#[derive(Debug)]
struct AllowedPeers {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: Vec<String>,
}

impl ClientCertVerifier for AllowedPeers {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if peer_name(end_entity, &self.allowed).is_none() {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Server config for a link listener: TLS 1.3, mutual auth, ALPN h2.
pub fn server_config(
    tls: &TlsSection,
    allowed_peers: &[String],
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let roots = load_roots(&tls.ca)?;
    let inner = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| file_err(&tls.ca, format!("client verifier: {e}")))?;
    let verifier = Arc::new(AllowedPeers {
        inner,
        allowed: allowed_peers.to_vec(),
    });
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&tls.cert)?, load_key(&tls.key)?)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// Client config towards peer gateways: TLS 1.3, our client certificate, ALPN h2.
pub fn client_config(tls: &TlsSection) -> Result<rustls::ClientConfig, TlsError> {
    let roots = load_roots(&tls.ca)?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(load_certs(&tls.cert)?, load_key(&tls.key)?)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}
