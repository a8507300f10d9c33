//! TLS for the site link and for DICOM TLS: rustls configurations and peer identity.
//!
//! The site link is TLS 1.3 with mutual authentication. DICOM TLS (PS3.15 Annex B) on a
//! `[dicom_listener.tls]` or a `dicom` destination's `[destination.tls]` speaks TLS 1.3,
//! or TLS 1.2 with only the ECDHE AES-GCM suites of BCP 195 ([`dicom_provider`]), since
//! modalities often lack 1.3; client certificates there are required, optional or not
//! asked for, and an AE title can be bound to a certificate identity
//! ([`DicomServerTls::may_call`]).
//!
//! Invariants:
//! - TLS 1.3 only on the site link, with the build's provider ([`provider`]: aws-lc-rs, or
//!   ring with the `ring` feature) chosen explicitly (no process-wide default);
//! - both sides present certificates that chain to the configured CA;
//! - a server accepts a client only if its certificate carries a DNS SAN listed in
//!   `allowed_peers` (or a listed SPIFFE ID as a URI SAN); the check happens inside the
//!   handshake, so an unlisted peer never gets a connection;
//! - a client accepts a server only if its certificate carries the configured `peer_name`;
//! - with CRLs configured (`tls.crls`), every certificate of a peer's chain must have a
//!   known revocation status from a CRL that has not expired (`nextUpdate` enforced); an
//!   expired CRL or an unknown status fails the handshake (fail closed);
//! - peer identity is an **exact** match of a subject alternative name (ASCII
//!   case-insensitive for DNS names, byte for byte for SPIFFE IDs), never the server-name
//!   matching rules of WebPKI: a wildcard SAN (`*.example.org`) names no peer, the subject
//!   CN is never read, and `site-b.` (trailing dot) is not `site-b`.

use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use crate::config::{ClientAuth, DestinationTls, DicomListenerTls, TlsMinVersion, TlsSection};

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

/// The crypto provider used everywhere: aws-lc-rs, its FIPS provider with the `fips` feature,
/// or ring with the `ring` feature (the keystore uses the same backend,
/// [`keystore::BACKEND`]). Never the process default: every
/// config is built with this provider explicitly, so one provider serves the whole process.
pub fn provider() -> Arc<CryptoProvider> {
    #[cfg(feature = "ring")]
    let p = rustls::crypto::ring::default_provider();
    #[cfg(all(feature = "fips", not(feature = "ring")))]
    let p = rustls::crypto::default_fips_provider();
    #[cfg(all(feature = "aws-lc-rs", not(any(feature = "ring", feature = "fips"))))]
    let p = rustls::crypto::aws_lc_rs::default_provider();
    Arc::new(p)
}

#[cfg(not(any(feature = "aws-lc-rs", feature = "ring")))]
compile_error!(
    "dicom-gateway needs a crypto backend: enable the `aws-lc-rs` (default) or `ring` feature"
);

fn file_err(path: &Path, message: impl Into<String>) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// Read a PEM certificate chain.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|e| file_err(path, e.to_string()))?;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&pem).collect();
    let certs = certs.map_err(|e| file_err(path, format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(file_err(path, "no certificate found"));
    }
    Ok(certs)
}

/// Read a PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem =
        zeroize::Zeroizing::new(std::fs::read(path).map_err(|e| file_err(path, e.to_string()))?);
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => file_err(path, "no private key found"),
        e => file_err(path, format!("bad PEM: {e}")),
    })
}

/// Read PEM CRL files (each may hold several CRLs).
pub fn load_crls(
    paths: &[std::path::PathBuf],
) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let mut out = Vec::new();
    for path in paths {
        let pem = std::fs::read(path).map_err(|e| file_err(path, e.to_string()))?;
        let crls: Result<Vec<_>, _> = CertificateRevocationListDer::pem_slice_iter(&pem).collect();
        let crls = crls.map_err(|e| file_err(path, format!("bad PEM: {e}")))?;
        if crls.is_empty() {
            return Err(file_err(path, "no CRL found"));
        }
        out.extend(crls);
    }
    Ok(out)
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

/// The scheme of a SPIFFE ID; an allow-list entry starting with it names a URI SAN.
pub const SPIFFE_SCHEME: &str = "spiffe://";

/// True if the end-entity certificate names `name` exactly: a DNS SAN equal to `name` up to
/// ASCII case, or, for a `spiffe://` name, a URI SAN equal to it byte for byte.
///
/// Wildcard SANs never match, the subject CN is never consulted, and no other
/// normalisation happens (a SAN `site-b.` does not name `site-b`). A certificate that does
/// not parse names nobody.
pub fn cert_has_name(cert: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(ee) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    if name.starts_with(SPIFFE_SCHEME) {
        return ee.valid_uri_names().any(|uri| uri == name);
    }
    // Only a plain DNS name can be wanted: no wildcard, no trailing dot.
    if !crate::config::is_dns_name(name) {
        return false;
    }
    ee.valid_dns_names()
        .any(|san| !san.contains('*') && san.eq_ignore_ascii_case(name))
}

/// True if the end-entity certificate carries the DNS name `name` (see [`cert_has_name`]).
pub fn cert_has_dns_name(cert: &CertificateDer<'_>, name: &str) -> bool {
    !name.starts_with(SPIFFE_SCHEME) && cert_has_name(cert, name)
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

/// Which of `allowed` names the client certificate carries (exactly, see
/// [`cert_has_name`]).
pub fn peer_name(cert: &CertificateDer<'_>, allowed: &[String]) -> Option<String> {
    allowed.iter().find(|n| cert_has_name(cert, n)).cloned()
}

/// Verifies client certificates against the CA (and CRLs), then, for the site link,
/// against the allow-list of names; for DICOM TLS it records the certificate it verified
/// for the AE title check of the same connection.
#[derive(Debug)]
struct PeerVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    /// Names one of which the certificate must carry exactly (`None`: any).
    allowed: Option<Vec<String>>,
    /// Where the verified certificate goes (`None`: nowhere).
    seen: Option<PeerCert>,
}

impl ClientCertVerifier for PeerVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if let Some(allowed) = &self.allowed
            && peer_name(end_entity, allowed).is_none()
        {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ));
        }
        if let Some(seen) = &self.seen {
            let _ = seen.set(end_entity.clone().into_owned());
        }
        Ok(verified)
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

/// Verifies a server certificate against the CA (WebPKI), then requires the expected name
/// as an exact SAN: WebPKI's server-name rules alone would let a wildcard certificate pass.
#[derive(Debug)]
struct ExactServerName {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ExactServerName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        match server_name {
            ServerName::DnsName(d) if cert_has_dns_name(end_entity, d.as_ref()) => Ok(verified),
            _ => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            )),
        }
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
        .with_crls(load_crls(&tls.crls)?)
        .enforce_revocation_expiration()
        .build()
        .map_err(|e| file_err(&tls.ca, format!("client verifier: {e}")))?;
    let verifier = Arc::new(PeerVerifier {
        inner,
        allowed: Some(allowed_peers.to_vec()),
        seen: None,
    });
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&tls.cert)?, load_key(&tls.key)?)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// What identifies a version of a file: the SHA-256 of its content (the files are a few
/// KiB; modification times are too coarse to tell two quick writes apart). Reading
/// follows symlinks, so a Kubernetes Secret's `..data` swap shows as a change.
type FileStamp = Option<[u8; 32]>;

fn stamp(path: &Path) -> FileStamp {
    let content = zeroize::Zeroizing::new(std::fs::read(path).ok()?);
    let mut h = keystore::Sha256::new();
    h.update(&content);
    Some(h.finish())
}

fn stamps(files: &[std::path::PathBuf]) -> Vec<FileStamp> {
    files.iter().map(|p| stamp(p)).collect()
}

/// The files of a `[tls]` section, in the order their stamps are kept.
fn section_files(tls: &TlsSection) -> Vec<std::path::PathBuf> {
    [&tls.cert, &tls.key, &tls.ca]
        .into_iter()
        .chain(tls.crls.iter())
        .cloned()
        .collect()
}

/// Builds a config of type `T` from its files.
type BuildFn<T> = dyn Fn() -> Result<T, TlsError> + Send + Sync;

/// A TLS config rebuilt when its certificate, key, CA bundle or CRL files change (as
/// cert-manager rotates them through a Kubernetes Secret): the link listener's server
/// config ([`ServerConfigReloader`]), the node's client config towards peer gateways
/// ([`ClientConfigReloader`]), and the DICOM TLS configs of listeners
/// ([`DicomServerTls`]) and `dicom` destinations.
///
/// Invariants: listeners and senders read the current config for each new handshake, so
/// sessions in flight go on with the config they started with; a change that does not
/// build (a broken or half-written file, a key that does not match its certificate) keeps
/// the previous config, and is reported by [`ConfigReloader::poll`].
pub struct ConfigReloader<T> {
    files: Vec<std::path::PathBuf>,
    build: Box<BuildFn<T>>,
    /// The files' versions at the last rebuild attempt.
    stamps: Vec<FileStamp>,
    tx: tokio::sync::watch::Sender<Arc<T>>,
}

/// The link listener's server config, reloaded.
pub type ServerConfigReloader = ConfigReloader<rustls::ServerConfig>;
/// The client config towards peer gateways (or a DICOM TLS node), reloaded.
pub type ClientConfigReloader = ConfigReloader<rustls::ClientConfig>;
/// The config in use, as a [`ConfigReloader`] keeps it.
pub type Current<T> = tokio::sync::watch::Receiver<Arc<T>>;

impl ConfigReloader<rustls::ServerConfig> {
    /// Build the first server config (an error here is a start-up error) and a receiver
    /// that always holds the config in use.
    pub fn new(
        tls: &TlsSection,
        allowed: &[String],
    ) -> Result<(ServerConfigReloader, Current<rustls::ServerConfig>), TlsError> {
        let allowed = allowed.to_vec();
        let t = tls.clone();
        Self::with(
            section_files(tls),
            Box::new(move || server_config(&t, &allowed)),
        )
    }
}

impl ConfigReloader<rustls::ClientConfig> {
    /// Build the first client config (an error here is a start-up error) and a receiver
    /// that always holds the config in use.
    pub fn client(
        tls: &TlsSection,
    ) -> Result<(ClientConfigReloader, Current<rustls::ClientConfig>), TlsError> {
        let t = tls.clone();
        Self::with(section_files(tls), Box::new(move || client_config(&t)))
    }

    /// The client config of a `dicom` destination's `[destination.tls]`, reloaded.
    pub fn dicom(
        tls: &DestinationTls,
    ) -> Result<(ClientConfigReloader, Current<rustls::ClientConfig>), TlsError> {
        let files = std::iter::once(&tls.ca)
            .chain(tls.cert.iter())
            .chain(tls.key.iter())
            .chain(tls.crls.iter())
            .cloned()
            .collect();
        let t = tls.clone();
        Self::with(files, Box::new(move || dicom_client_config(&t)))
    }
}

impl ConfigReloader<DicomServerTls> {
    /// The DICOM TLS material of a `[dicom_listener.tls]`, reloaded.
    pub fn dicom_listener(
        tls: &DicomListenerTls,
    ) -> Result<(ConfigReloader<DicomServerTls>, Current<DicomServerTls>), TlsError> {
        let files = [&tls.cert, &tls.key]
            .into_iter()
            .chain(tls.ca.iter())
            .chain(tls.crls.iter())
            .cloned()
            .collect();
        let t = tls.clone();
        Self::with(files, Box::new(move || DicomServerTls::load(&t)))
    }
}

impl<T> ConfigReloader<T> {
    fn with(
        files: Vec<std::path::PathBuf>,
        build: Box<BuildFn<T>>,
    ) -> Result<(ConfigReloader<T>, Current<T>), TlsError> {
        let stamps = stamps(&files);
        let cfg = Arc::new(build()?);
        let (tx, rx) = tokio::sync::watch::channel(cfg);
        Ok((
            ConfigReloader {
                files,
                build,
                stamps,
                tx,
            },
            rx,
        ))
    }

    /// Rebuild the config if a file changed since the last attempt. `Ok(true)`: the new
    /// config is in use; `Ok(false)`: nothing changed; `Err`: the change did not build and
    /// the previous config stays in use (the same change is not retried).
    pub fn poll(&mut self) -> Result<bool, TlsError> {
        let now = stamps(&self.files);
        if now == self.stamps {
            return Ok(false);
        }
        self.stamps = now;
        let cfg = (self.build)()?;
        self.tx.send_replace(Arc::new(cfg));
        Ok(true)
    }
}

/// How often the TLS files are checked for changes.
pub const RELOAD_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Check the TLS files every [`RELOAD_INTERVAL`] until `shutdown`, logging and counting
/// each reload in `tls_reloads_total{listener=label}` (`label` is the link or DICOM
/// listener's name, `sender` for the client config towards peer gateways, or the name of
/// a `dicom` destination with `[destination.tls]`).
pub async fn reload<T: Send + Sync + 'static>(
    mut r: ConfigReloader<T>,
    label: String,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(RELOAD_INTERVAL) => {}
        }
        // Reading a few small files and building a config: off the async workers.
        let (back, result) = match tokio::task::spawn_blocking(move || {
            let result = r.poll();
            (r, result)
        })
        .await
        {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(listener = %label, error = %e, "TLS reload task failed; reloading stops");
                return;
            }
        };
        r = back;
        match result {
            Ok(false) => {}
            Ok(true) => {
                tracing::info!(listener = %label, "TLS certificate, key, CA or CRL changed; new handshakes use them");
                metrics.tls_reloads.with_label_values(&[&label, "ok"]).inc();
            }
            Err(e) => {
                tracing::warn!(listener = %label, error = %e, "TLS files changed but do not load; keeping the previous ones");
                metrics
                    .tls_reloads
                    .with_label_values(&[&label, "failed"])
                    .inc();
            }
        }
    }
}

/// Client config towards peer gateways: TLS 1.3, our client certificate, ALPN h2.
pub fn client_config(tls: &TlsSection) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let roots = load_roots(&tls.ca)?;
    let inner = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
        .with_crls(load_crls(&tls.crls)?)
        .enforce_revocation_expiration()
        .build()
        .map_err(|e| file_err(&tls.ca, format!("server verifier: {e}")))?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ExactServerName { inner }))
        .with_client_auth_cert(load_certs(&tls.cert)?, load_key(&tls.key)?)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// The provider of DICOM TLS endpoints: the node's provider ([`provider`]), its TLS 1.2
/// suites narrowed to ECDHE with AES-GCM (BCP 195, as PS3.15 Annex B.9 asks); TLS 1.3
/// suites as they are.
pub fn dicom_provider() -> Arc<CryptoProvider> {
    use rustls::CipherSuite as S;
    let mut p = (*provider()).clone();
    p.cipher_suites.retain(|cs| match cs {
        rustls::SupportedCipherSuite::Tls13(_) => true,
        rustls::SupportedCipherSuite::Tls12(_) => matches!(
            cs.suite(),
            S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | S::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
                | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
                | S::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384
        ),
    });
    Arc::new(p)
}

/// The TLS versions of a DICOM TLS endpoint.
fn dicom_versions(min: TlsMinVersion) -> &'static [&'static rustls::SupportedProtocolVersion] {
    static BOTH: [&rustls::SupportedProtocolVersion; 2] =
        [&rustls::version::TLS13, &rustls::version::TLS12];
    static ONLY_13: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
    match min {
        TlsMinVersion::Tls12 => &BOTH,
        TlsMinVersion::Tls13 => &ONLY_13,
    }
}

/// The client certificate a DICOM TLS handshake verified, for the AE title check that
/// follows it on the same connection (empty: none was presented).
pub type PeerCert = Arc<std::sync::OnceLock<CertificateDer<'static>>>;

/// The DICOM TLS material of a `[dicom_listener.tls]`: the listener's certificate and key
/// (loaded once per file change), the client verifier (CA and CRLs), and the policy.
///
/// Invariants: a [`rustls::ServerConfig`] is made from it for each connection
/// ([`DicomServerTls::config`]), whose verifier records the client certificate it
/// verified, so the AE title check (`bind_ae_titles`) reads the identity of exactly that
/// connection; the key lives only inside rustls's signing key, never in this type's
/// `Debug`; no 0-RTT (rustls's default, never changed here).
pub struct DicomServerTls {
    key: Arc<rustls::sign::CertifiedKey>,
    verifier: Option<Arc<dyn ClientCertVerifier>>,
    provider: Arc<CryptoProvider>,
    versions: &'static [&'static rustls::SupportedProtocolVersion],
    /// Calling AE title → the SAN its certificate must carry.
    bindings: std::collections::BTreeMap<String, String>,
}

impl std::fmt::Debug for DicomServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DicomServerTls")
            .field("client_auth", &self.verifier.is_some())
            .field("bound_ae_titles", &self.bindings.len())
            .finish_non_exhaustive()
    }
}

impl DicomServerTls {
    /// Load the files of `t` and check that a config builds from them.
    pub fn load(t: &DicomListenerTls) -> Result<DicomServerTls, TlsError> {
        let provider = dicom_provider();
        let key = rustls::sign::CertifiedKey::from_der(
            load_certs(&t.cert)?,
            load_key(&t.key)?,
            &provider,
        )
        .map_err(|e| {
            file_err(
                &t.key,
                format!("key does not fit {}: {e}", t.cert.display()),
            )
        })?;
        let verifier = match (t.client_auth, &t.ca) {
            (ClientAuth::None, _) => None,
            (_, None) => return Err(file_err(&t.cert, "tls.ca is needed to verify clients")),
            (auth, Some(ca)) => {
                let b =
                    WebPkiClientVerifier::builder_with_provider(load_roots(ca)?, provider.clone())
                        .with_crls(load_crls(&t.crls)?)
                        .enforce_revocation_expiration();
                let b = if auth == ClientAuth::Optional {
                    b.allow_unauthenticated()
                } else {
                    b
                };
                Some(
                    b.build()
                        .map_err(|e| file_err(ca, format!("client verifier: {e}")))?,
                )
            }
        };
        let tls = DicomServerTls {
            key: Arc::new(key),
            verifier,
            provider,
            versions: dicom_versions(t.min_version),
            bindings: t.bind_ae_titles.clone(),
        };
        tls.config(PeerCert::default())?;
        Ok(tls)
    }

    /// A server config for one connection; the client certificate it verifies lands in
    /// `peer`.
    pub fn config(&self, peer: PeerCert) -> Result<rustls::ServerConfig, TlsError> {
        let b = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(self.versions)?;
        let b = match &self.verifier {
            Some(v) => b.with_client_cert_verifier(Arc::new(PeerVerifier {
                inner: v.clone(),
                allowed: None,
                seen: Some(peer),
            })),
            None => b.with_no_client_auth(),
        };
        Ok(b.with_cert_resolver(Arc::new(FixedCert(self.key.clone()))))
    }

    /// Whether `calling` may call with the client certificate `cert` (`None`: none
    /// presented). Without bindings any AE title may (the certificate, if asked for, was
    /// verified in the handshake); with bindings only a listed AE title, presenting a
    /// certificate that carries its SAN exactly.
    pub fn may_call(&self, calling: &str, cert: Option<&CertificateDer<'_>>) -> bool {
        if self.bindings.is_empty() {
            return true;
        }
        match self.bindings.get(calling.trim()) {
            Some(name) => cert.is_some_and(|c| cert_has_name(c, name)),
            None => false,
        }
    }
}

/// The listener's certificate, whatever the client hello asks for.
#[derive(Debug)]
struct FixedCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for FixedCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// The client config of a `dicom` destination with `[destination.tls]`: the PACS's
/// certificate must chain to `ca` and carry the server name exactly (a wildcard never
/// matches); our client certificate if configured; TLS 1.2 (ECDHE AES-GCM) or 1.3.
pub fn dicom_client_config(t: &DestinationTls) -> Result<rustls::ClientConfig, TlsError> {
    let provider = dicom_provider();
    let inner = WebPkiServerVerifier::builder_with_provider(load_roots(&t.ca)?, provider.clone())
        .with_crls(load_crls(&t.crls)?)
        .enforce_revocation_expiration()
        .build()
        .map_err(|e| file_err(&t.ca, format!("server verifier: {e}")))?;
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(dicom_versions(t.min_version))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ExactServerName { inner }));
    Ok(match (&t.cert, &t.key) {
        (Some(c), Some(k)) => b.with_client_auth_cert(load_certs(c)?, load_key(k)?)?,
        _ => b.with_no_client_auth(),
    })
}

#[cfg(test)]
mod tests {
    //! Certificates here are made by `openssl`, not by our own `pki` module, and every
    //! handshake is a real rustls TLS 1.3 handshake between our client and server configs.

    use super::*;
    use std::path::PathBuf;
    use std::process::Command;

    /// The provider is the build's backend: with `fips`, every algorithm it offers is
    /// FIPS-approved (rustls's own judgement); under ring, none of aws-lc-rs's.
    #[test]
    fn the_provider_is_the_backend_of_the_build() {
        let p = provider();
        assert_eq!(p.fips(), cfg!(feature = "fips"), "{}", keystore::BACKEND);
        assert_eq!(dicom_provider().fips(), cfg!(feature = "fips"));
        let names: Vec<String> = p
            .kx_groups
            .iter()
            .map(|g| format!("{:?}", g.name()))
            .collect();
        // aws-lc-rs offers the post-quantum hybrid group; ring has none.
        assert_eq!(
            names.iter().any(|n| n.contains("MLKEM")),
            !cfg!(feature = "ring"),
            "key exchange groups {names:?} under {}",
            keystore::BACKEND
        );
    }

    /// A CA made by `openssl`, and leaf certificates it signs.
    struct OpensslPki {
        dir: tempfile::TempDir,
    }

    fn openssl(dir: &Path, args: &[&str]) {
        let out = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .expect("openssl must be installed (.ci/run installs it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    impl OpensslPki {
        fn new() -> OpensslPki {
            Self::named("openssl test CA")
        }

        fn named(ca_name: &str) -> OpensslPki {
            let dir = tempfile::tempdir().unwrap();
            let subject = format!("/CN={ca_name}");
            openssl(
                dir.path(),
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.crt",
                    "-subj",
                    &subject,
                    "-days",
                    "2",
                    "-addext",
                    "basicConstraints=critical,CA:TRUE",
                    "-addext",
                    "keyUsage=critical,keyCertSign,cRLSign",
                ],
            );
            OpensslPki { dir }
        }

        fn ca(&self) -> PathBuf {
            self.dir.path().join("ca.crt")
        }

        /// A leaf for client and server auth with subject CN `cn` and the given SAN
        /// extension value (`None`: no SAN extension at all).
        fn leaf(&self, stem: &str, cn: &str, san: Option<&str>) -> TlsSection {
            let d = self.dir.path();
            let mut ext = String::from(
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
                 extendedKeyUsage=serverAuth,clientAuth\n",
            );
            if let Some(san) = san {
                ext.push_str(&format!("subjectAltName={san}\n"));
            }
            std::fs::write(d.join(format!("{stem}.ext")), ext).unwrap();
            let (key, csr, crt, extf) = (
                format!("{stem}.key"),
                format!("{stem}.csr"),
                format!("{stem}.crt"),
                format!("{stem}.ext"),
            );
            openssl(
                d,
                &[
                    "req",
                    "-new",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                    "-keyout",
                    &key,
                    "-out",
                    &csr,
                    "-subj",
                    &format!("/CN={cn}"),
                ],
            );
            openssl(
                d,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.crt",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-days",
                    "1",
                    "-out",
                    &crt,
                    "-extfile",
                    &extf,
                ],
            );
            TlsSection {
                cert: d.join(crt),
                key: d.join(key),
                ca: self.ca(),
                crls: Vec::new(),
            }
        }
    }

    impl OpensslPki {
        /// A CRL signed by this CA (made by `openssl ca`), revoking `revoked`, valid now,
        /// or from `window.0` to `window.1` (ASN.1 times) if given.
        fn crl(
            &self,
            stem: &str,
            revoked: &[&TlsSection],
            window: Option<(&str, &str)>,
        ) -> PathBuf {
            let d = self.dir.path();
            std::fs::write(
                d.join("ca.cnf"),
                "[ca]\ndefault_ca = d\n[d]\ndatabase = index.txt\ncrlnumber = crlnumber\n\
                 default_md = sha256\ndefault_crl_days = 1\ncertificate = ca.crt\n\
                 private_key = ca.key\n",
            )
            .unwrap();
            std::fs::write(d.join("index.txt"), "").unwrap();
            std::fs::write(d.join("crlnumber"), "01\n").unwrap();
            for r in revoked {
                let cert = r.cert.to_str().unwrap();
                openssl(d, &["ca", "-config", "ca.cnf", "-revoke", cert]);
            }
            let out = format!("{stem}.crl");
            let mut args = vec!["ca", "-config", "ca.cnf", "-gencrl", "-out", &out];
            if let Some((last, next)) = window {
                args.extend(["-crl_lastupdate", last, "-crl_nextupdate", next]);
            }
            openssl(d, &args);
            d.join(out)
        }
    }

    fn leaf_der(s: &TlsSection) -> CertificateDer<'static> {
        load_certs(&s.cert).unwrap().remove(0)
    }

    /// A full in-memory TLS 1.3 handshake. `Err` is the first side's error.
    fn handshake(
        client: rustls::ClientConfig,
        server: rustls::ServerConfig,
        server_name: &str,
    ) -> Result<(), rustls::Error> {
        let name = ServerName::try_from(server_name.to_owned()).unwrap();
        let mut c = rustls::ClientConnection::new(Arc::new(client), name)?;
        let mut s = rustls::ServerConnection::new(Arc::new(server))?;
        for _ in 0..20 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
                s.process_new_packets()?;
            }
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
                c.process_new_packets()?;
            }
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(());
            }
        }
        panic!("handshake did not finish");
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn peer_identity_is_an_exact_san_match() {
        let pki = OpensslPki::new();
        let wildcard = leaf_der(&pki.leaf("wild", "*.example.org", Some("DNS:*.example.org")));
        let two = leaf_der(&pki.leaf("two", "site-a", Some("DNS:site-a,DNS:site-c")));
        let cn_only = leaf_der(&pki.leaf("cn", "site-a", None));
        let upper = leaf_der(&pki.leaf("upper", "x", Some("DNS:SITE-A.Example.ORG")));
        let dot = leaf_der(&pki.leaf("dot", "x", Some("DNS:site-a.")));
        let spiffe = leaf_der(&pki.leaf("spiffe", "x", Some("URI:spiffe://example.org/gw/site-a")));

        // A wildcard certificate names no peer, whatever the allow-list holds.
        for n in ["site-b.example.org", "site-a.example.org", "*.example.org"] {
            assert!(!cert_has_name(&wildcard, n), "wildcard passed as {n}");
        }
        assert_eq!(
            peer_name(
                &wildcard,
                &names(&["site-a.example.org", "site-b.example.org"])
            ),
            None
        );
        // Two SANs: each is a name of the peer; the first listed one is reported.
        assert!(cert_has_name(&two, "site-a") && cert_has_name(&two, "site-c"));
        assert_eq!(
            peer_name(&two, &names(&["site-c", "site-a"])).as_deref(),
            Some("site-c")
        );
        assert_eq!(peer_name(&two, &names(&["site-b"])), None);
        // The subject CN is never a name.
        assert!(!cert_has_name(&cn_only, "site-a"));
        // DNS names compare without regard to ASCII case...
        assert!(cert_has_name(&upper, "site-a.example.org"));
        // ...but nothing else is normalised.
        assert!(!cert_has_name(&dot, "site-a"));
        assert!(!cert_has_name(&dot, "site-a."));
        // SPIFFE IDs match a URI SAN exactly, and never a DNS name.
        assert!(cert_has_name(&spiffe, "spiffe://example.org/gw/site-a"));
        assert!(!cert_has_name(&spiffe, "spiffe://example.org/gw/site-b"));
        assert!(!cert_has_name(&spiffe, "spiffe://example.org/gw/SITE-A"));
        assert!(!cert_has_dns_name(
            &spiffe,
            "spiffe://example.org/gw/site-a"
        ));
        assert!(!cert_has_name(&two, "spiffe://example.org/gw/site-a"));
    }

    #[test]
    fn a_wildcard_client_certificate_fails_the_listener_handshake() {
        let pki = OpensslPki::new();
        let server = pki.leaf(
            "server",
            "site-b.example.org",
            Some("DNS:site-b.example.org"),
        );
        let allowed = names(&["site-a.example.org"]);
        let wildcard = pki.leaf("wild", "*.example.org", Some("DNS:*.example.org"));
        let exact = pki.leaf(
            "exact",
            "site-a.example.org",
            Some("DNS:site-a.example.org"),
        );
        let cn_only = pki.leaf("cn", "site-a.example.org", None);
        let spiffe = pki.leaf("spiffe", "x", Some("URI:spiffe://example.org/gw/site-a"));
        let run = |client: &TlsSection, allowed: &[String]| {
            handshake(
                client_config(client).unwrap(),
                server_config(&server, allowed).unwrap(),
                "site-b.example.org",
            )
        };
        for (what, c) in [("wildcard", &wildcard), ("CN without SAN", &cn_only)] {
            let e = run(c, &allowed).expect_err(what);
            assert!(
                matches!(e, rustls::Error::InvalidCertificate(_)),
                "{what}: {e:?}"
            );
        }
        // Control: the same CA, an exact SAN.
        run(&exact, &allowed).expect("exact SAN");
        // A SPIFFE ID in the allow-list admits the URI SAN, not a DNS name.
        let by_id = names(&["spiffe://example.org/gw/site-a"]);
        run(&spiffe, &by_id).expect("SPIFFE ID");
        assert!(run(&exact, &by_id).is_err());
    }

    #[test]
    fn the_sender_refuses_a_wildcard_server_certificate() {
        let pki = OpensslPki::new();
        let client = pki.leaf("client", "site-a", Some("DNS:site-a"));
        let allowed = names(&["site-a"]);
        let wildcard = pki.leaf("wild", "*.example.org", Some("DNS:*.example.org"));
        let exact = pki.leaf("exact", "x", Some("DNS:site-b.example.org"));
        let run = |server: &TlsSection| {
            handshake(
                client_config(&client).unwrap(),
                server_config(server, &allowed).unwrap(),
                "site-b.example.org",
            )
        };
        let e = run(&wildcard).expect_err("wildcard server certificate");
        assert!(
            matches!(
                e,
                rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName)
            ),
            "{e:?}"
        );
        run(&exact).expect("exact SAN");
    }

    #[test]
    fn crls_revoke_and_fail_closed() {
        let pki = OpensslPki::new();
        let server = pki.leaf("server", "site-b", Some("DNS:site-b"));
        let good = pki.leaf("good", "site-a", Some("DNS:site-a"));
        let revoked = pki.leaf("revoked", "site-a", Some("DNS:site-a"));
        let allowed = names(&["site-a"]);
        let fresh = pki.crl("fresh", &[&revoked], None);
        let expired = pki.crl("expired", &[], Some(("20200101000000Z", "20200102000000Z")));
        let other_ca = OpensslPki::named("another CA");
        let foreign = other_ca.crl("foreign", &[], None);
        // A CA under the same name with another key: its CRL does not verify.
        let impostor_ca = OpensslPki::new();
        let forged = impostor_ca.crl("forged", &[], None);
        let with = |s: &TlsSection, crls: &[&PathBuf]| TlsSection {
            crls: crls.iter().map(|p| p.to_path_buf()).collect(),
            ..s.clone()
        };
        let run = |client: &TlsSection, server: &TlsSection| {
            handshake(
                client_config(client).unwrap(),
                server_config(server, &allowed).unwrap(),
                "site-b",
            )
        };
        let refused = |r: Result<(), rustls::Error>, why: &str| {
            let e = r.expect_err(why);
            assert!(
                matches!(
                    e,
                    rustls::Error::InvalidCertificate(_)
                        | rustls::Error::InvalidCertRevocationList(_)
                ),
                "{why}: {e:?}"
            );
            format!("{e:?}")
        };
        // Control: without CRLs, the revoked certificate still passes.
        run(&revoked, &server).expect("no CRL configured");
        // The listener checks client certificates against the CRL...
        run(&good, &with(&server, &[&fresh])).expect("not revoked");
        let e = refused(run(&revoked, &with(&server, &[&fresh])), "revoked client");
        assert!(e.contains("Revoked"), "{e}");
        // ...and fails closed on an expired CRL or one that cannot speak for the CA.
        let e = refused(run(&good, &with(&server, &[&expired])), "expired CRL");
        assert!(e.contains("Expired"), "{e}");
        let e = refused(run(&good, &with(&server, &[&foreign])), "CRL of another CA");
        assert!(e.contains("UnknownRevocationStatus"), "{e}");
        let e = refused(run(&good, &with(&server, &[&forged])), "forged CRL");
        assert!(e.contains("BadSignature"), "{e}");
        // The sender checks the server's certificate the same way.
        let revoked_server = pki.leaf("revoked-server", "site-b", Some("DNS:site-b"));
        let fresh = pki.crl("fresh2", &[&revoked_server], None);
        let e = refused(
            run(&with(&good, &[&fresh]), &revoked_server),
            "revoked server",
        );
        assert!(e.contains("Revoked"), "{e}");
        run(&with(&good, &[&fresh]), &server).expect("server not revoked");
        // A CRL file without a CRL is a configuration error, naming the file.
        let e = load_crls(std::slice::from_ref(&good.cert))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no CRL") && e.contains("good.crt"), "{e}");
    }

    /// The certificate the server presented in a handshake.
    fn presented(
        server: Arc<rustls::ServerConfig>,
        client: &TlsSection,
    ) -> CertificateDer<'static> {
        let name = ServerName::try_from("site-b").unwrap();
        let mut c =
            rustls::ClientConnection::new(Arc::new(client_config(client).unwrap()), name).unwrap();
        let mut s = rustls::ServerConnection::new(server).unwrap();
        while c.is_handshaking() || s.is_handshaking() {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            s.read_tls(&mut &buf[..]).unwrap();
            s.process_new_packets().unwrap();
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            c.read_tls(&mut &buf[..]).unwrap();
            c.process_new_packets().unwrap();
        }
        c.peer_certificates().unwrap()[0].clone().into_owned()
    }

    #[test]
    fn the_listener_reloads_its_certificate_and_keeps_it_through_broken_files() {
        let pki = OpensslPki::new();
        let client = pki.leaf("client", "site-a", Some("DNS:site-a"));
        let first = pki.leaf("first", "site-b", Some("DNS:site-b"));
        let second = pki.leaf("second", "site-b", Some("DNS:site-b"));
        // The served files, as a Secret volume would hold them.
        let live = TlsSection {
            cert: pki.dir.path().join("live.crt"),
            key: pki.dir.path().join("live.key"),
            ..first.clone()
        };
        std::fs::copy(&first.cert, &live.cert).unwrap();
        std::fs::copy(&first.key, &live.key).unwrap();
        let (mut reloader, rx) = ServerConfigReloader::new(&live, &names(&["site-a"])).unwrap();
        let old = rx.borrow().clone();
        assert_eq!(presented(old.clone(), &client), leaf_der(&first));
        assert!(!reloader.poll().unwrap(), "nothing changed");

        // Rotation: a new key and certificate, swapped in by rename.
        for (from, to) in [(&second.key, &live.key), (&second.cert, &live.cert)] {
            let tmp = to.with_extension("new");
            std::fs::copy(from, &tmp).unwrap();
            std::fs::rename(&tmp, to).unwrap();
        }
        assert!(reloader.poll().unwrap(), "the change is picked up");
        assert_eq!(presented(rx.borrow().clone(), &client), leaf_der(&second));
        // A session that started before goes on with what it had.
        assert_eq!(presented(old, &client), leaf_der(&first));

        // A broken certificate file keeps the last good config, and says why.
        std::fs::write(&live.cert, b"-----BEGIN CERTIFICATE-----\ngarbage\n").unwrap();
        let e = reloader.poll().expect_err("a broken file must not be used");
        assert!(e.to_string().contains("live.crt"), "{e}");
        assert_eq!(presented(rx.borrow().clone(), &client), leaf_der(&second));
        assert!(
            !reloader.poll().unwrap(),
            "the same broken file is reported once"
        );
        // A key that does not match its certificate is refused too.
        std::fs::copy(&first.cert, &live.cert).unwrap();
        assert!(
            reloader.poll().is_err(),
            "first's certificate with second's key"
        );
        assert_eq!(presented(rx.borrow().clone(), &client), leaf_der(&second));
        // Fixed: picked up again.
        std::fs::copy(&first.key, &live.key).unwrap();
        assert!(reloader.poll().unwrap());
        assert_eq!(presented(rx.borrow().clone(), &client), leaf_der(&first));
    }

    /// The client certificate the server saw in a handshake.
    fn client_presented(
        client: Arc<rustls::ClientConfig>,
        server: &TlsSection,
    ) -> CertificateDer<'static> {
        let name = ServerName::try_from("site-b").unwrap();
        let mut c = rustls::ClientConnection::new(client, name).unwrap();
        let server = server_config(server, &names(&["site-a"])).unwrap();
        let mut s = rustls::ServerConnection::new(Arc::new(server)).unwrap();
        while c.is_handshaking() || s.is_handshaking() {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            s.read_tls(&mut &buf[..]).unwrap();
            s.process_new_packets().unwrap();
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            c.read_tls(&mut &buf[..]).unwrap();
            c.process_new_packets().unwrap();
        }
        s.peer_certificates().unwrap()[0].clone().into_owned()
    }

    #[test]
    fn the_sender_reloads_its_client_certificate_and_keeps_it_through_broken_files() {
        let pki = OpensslPki::new();
        let server = pki.leaf("server", "site-b", Some("DNS:site-b"));
        let first = pki.leaf("first", "site-a", Some("DNS:site-a"));
        let second = pki.leaf("second", "site-a", Some("DNS:site-a"));
        let live = TlsSection {
            cert: pki.dir.path().join("live.crt"),
            key: pki.dir.path().join("live.key"),
            ..first.clone()
        };
        std::fs::copy(&first.cert, &live.cert).unwrap();
        std::fs::copy(&first.key, &live.key).unwrap();
        let (mut reloader, mut rx) = ClientConfigReloader::client(&live).unwrap();
        let old = rx.borrow_and_update().clone();
        assert_eq!(client_presented(old.clone(), &server), leaf_der(&first));
        assert!(!reloader.poll().unwrap(), "nothing changed");
        assert!(!rx.has_changed().unwrap(), "no change is announced");

        // Rotation by rename, as a Secret volume update does.
        for (from, to) in [(&second.key, &live.key), (&second.cert, &live.cert)] {
            let tmp = to.with_extension("new");
            std::fs::copy(from, &tmp).unwrap();
            std::fs::rename(&tmp, to).unwrap();
        }
        assert!(reloader.poll().unwrap(), "the change is picked up");
        // The sender drops its pooled connection when it sees this.
        assert!(rx.has_changed().unwrap(), "the change is announced");
        let new = rx.borrow_and_update().clone();
        assert_eq!(client_presented(new, &server), leaf_der(&second));
        assert_eq!(client_presented(old, &server), leaf_der(&first));

        // A half-written key keeps the last good config.
        std::fs::write(&live.key, b"-----BEGIN PRIVATE KEY-----\n").unwrap();
        let e = reloader.poll().expect_err("a broken key must not be used");
        assert!(e.to_string().contains("live.key"), "{e}");
        assert!(!rx.has_changed().unwrap(), "nothing new is announced");
        assert_eq!(
            client_presented(rx.borrow().clone(), &server),
            leaf_der(&second)
        );
    }

    #[test]
    fn node_name_must_be_an_exact_san() {
        let pki = OpensslPki::new();
        let wildcard = pki.leaf("wild", "x", Some("DNS:*.example.org"));
        assert!(check_node_name(&wildcard, "site-a.example.org").is_err());
        let exact = pki.leaf("exact", "x", Some("DNS:site-a.example.org"));
        check_node_name(&exact, "site-a.example.org").unwrap();
    }

    #[test]
    fn pem_files_load_and_bad_ones_are_named() {
        let pki = OpensslPki::new();
        let s = pki.leaf("k", "x", Some("DNS:x"));
        assert_eq!(load_certs(&s.cert).unwrap().len(), 1);
        load_key(&s.key).unwrap();
        let e = load_key(&s.cert).unwrap_err().to_string();
        assert!(e.contains("no private key"), "{e}");
        let e = load_certs(&s.key).unwrap_err().to_string();
        assert!(e.contains("no certificate"), "{e}");
    }
}
