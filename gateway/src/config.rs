//! Node configuration: the TOML file an operator writes.
//!
//! Owns parsing, path resolution and validation. Invariants once [`Config::load`] returns:
//! - unknown keys were rejected (every table is `deny_unknown_fields`);
//! - every relative path is resolved against the folder of the config file;
//! - every name in a `route_to` list names a configured destination, at most once, and
//!   names are unique;
//! - every `[[route]]` names real listeners and destinations, and every listener has
//!   somewhere to send what it receives (its `route_to`, or a route that can match it);
//! - AE titles are 1–16 printable ASCII characters without a backslash;
//! - every error names the file, the key and what is wrong.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// A configuration error. The message always names the file and the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read config: {source}")]
    Read {
        /// The config file.
        file: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML did not parse or did not match the schema (unknown key, wrong type...).
    #[error("{file}: {message}")]
    Parse {
        /// The config file.
        file: PathBuf,
        /// The parser's message, which names the key and the line.
        message: String,
    },
    /// A value parsed but is not acceptable.
    #[error("{file}: key `{key}`: {message}")]
    Invalid {
        /// The config file.
        file: PathBuf,
        /// The dotted path of the key, e.g. `destination[pacs].address`.
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

/// The whole node configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Identity of this node.
    pub node: NodeSection,
    /// Where the key-encryption key lives.
    pub keystore: KeystoreSection,
    /// Certificates for the site link.
    pub tls: Option<TlsSection>,
    /// The admin HTTP endpoint (health, readiness, metrics).
    pub http: Option<HttpSection>,
    /// DICOM listeners (C-STORE SCP).
    #[serde(default)]
    pub dicom_listener: Vec<DicomListener>,
    /// Site-link listeners (STOW-RS over mutual TLS).
    #[serde(default)]
    pub link_listener: Vec<LinkListener>,
    /// HL7 v2 listeners (MLLP).
    #[serde(default)]
    pub hl7_listener: Vec<Hl7Listener>,
    /// Where objects go.
    #[serde(default)]
    pub destination: Vec<Destination>,
    /// Routing rules: which received objects go to which destinations, besides each
    /// listener's `route_to`.
    #[serde(default)]
    pub route: Vec<Route>,
    /// Spool tuning.
    #[serde(default)]
    pub spool: SpoolSection,
    /// Logging.
    #[serde(default)]
    pub log: LogSection,
    /// Folder the config file was read from; relative paths were resolved against it.
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The config file itself, for error messages.
    #[serde(skip)]
    pub file: PathBuf,
}

/// `[node]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// The node's name; must equal a DNS SAN of `tls.cert`.
    pub name: String,
    /// The spool directory (RocksDB).
    pub data_dir: PathBuf,
}

/// `[keystore]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeystoreSection {
    /// A 32-byte file holding the key-encryption key (mode 0600): its version 1. Version
    /// `N` is the file `<kek_file>.N` next to it (`keys rotate` makes it).
    pub kek_file: PathBuf,
    /// Once every stored key is rewrapped under the newest KEK version, retire the older
    /// versions: their old wrappings are compacted out of the database, they are never
    /// used again, and their files may be destroyed. Default true.
    #[serde(default = "retire_by_default")]
    pub retire_old_versions: bool,
}

fn retire_by_default() -> bool {
    true
}

/// `[tls]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// PEM certificate chain: server cert on link listeners, client cert towards peers.
    pub cert: PathBuf,
    /// PEM private key for `cert`.
    pub key: PathBuf,
    /// PEM CA bundle that peers must chain to.
    pub ca: PathBuf,
    /// PEM CRL files of the CA. With any given, every peer certificate's revocation status
    /// must be known from a CRL that has not passed its nextUpdate; otherwise the handshake
    /// fails (fail closed).
    #[serde(default)]
    pub crls: Vec<PathBuf>,
}

/// `[http]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSection {
    /// Address for `/healthz`, `/readyz` and `/metrics`.
    pub listen: SocketAddr,
}

/// `[spool]`: tuning with safe defaults.
///
/// Keys take human-readable values: `segment_size = "1MiB"`, `max_object_size = "16GiB"`
/// (`bytesize`: `KiB`/`MiB`/`GiB` are powers of 1024, `kB`/`MB`/`GB` of 1000; a bare
/// integer is bytes), `dedup_window = "7d"` (`humantime`). The integer keys of 0.1
/// (`segment_bytes`, `max_object_bytes`, `dedup_window_secs`) are still accepted, with a
/// deprecation warning; giving both forms of one setting is an error.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawSpoolSection")]
pub struct SpoolSection {
    /// Plaintext bytes per sealed segment (64 KiB to 8 MiB). Key `segment_size`.
    pub segment_bytes: usize,
    /// Largest object accepted, in bytes. Key `max_object_size`.
    pub max_object_bytes: u64,
    /// How long a link receiver remembers a transfer for deduplication, in seconds.
    /// Key `dedup_window`.
    pub dedup_window_secs: u64,
    /// Free space the data directory's filesystem must keep (a size such as `"10GiB"`).
    /// Below it, new C-STOREs get 0xA700 and new link requests 503 with Retry-After, and
    /// `/readyz` is 503; service resumes by itself once space returns.
    #[serde(default = "default_min_free")]
    pub min_free: bytesize::ByteSize,
    /// How long a delivered object stays (encrypted) for `queue resend --study`. `"0s"`, the
    /// default, deletes each object once its last destination confirmed it; past the
    /// retention, a sweep (every minute) deletes it, and its study key with the study's
    /// last object.
    pub retention: std::time::Duration,
    /// Deprecated keys this section was written with, as `(old, new)`.
    pub deprecated_keys: Vec<(&'static str, &'static str)>,
}

impl Default for SpoolSection {
    fn default() -> Self {
        Self {
            segment_bytes: default_segment_bytes(),
            max_object_bytes: default_max_object_bytes(),
            dedup_window_secs: default_dedup_window_secs(),
            min_free: default_min_free(),
            retention: std::time::Duration::ZERO,
            deprecated_keys: Vec::new(),
        }
    }
}

/// The TOML shape of `[spool]`, old and new keys.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpoolSection {
    segment_size: Option<bytesize::ByteSize>,
    max_object_size: Option<bytesize::ByteSize>,
    #[serde(default, with = "humantime_serde")]
    dedup_window: Option<std::time::Duration>,
    segment_bytes: Option<u64>,
    max_object_bytes: Option<u64>,
    dedup_window_secs: Option<u64>,
    min_free: Option<bytesize::ByteSize>,
    #[serde(default, with = "humantime_serde")]
    retention: Option<std::time::Duration>,
}

/// Pick the new key's value, or the deprecated key's (recording it), never both.
fn new_or_old<T>(
    new: Option<T>,
    old: Option<T>,
    names: (&'static str, &'static str),
    deprecated: &mut Vec<(&'static str, &'static str)>,
) -> Result<Option<T>, String> {
    match (new, old) {
        (Some(_), Some(_)) => Err(format!(
            "give `{}` or the deprecated `{}`, not both",
            names.0, names.1
        )),
        (Some(v), None) => Ok(Some(v)),
        (None, Some(v)) => {
            deprecated.push((names.1, names.0));
            Ok(Some(v))
        }
        (None, None) => Ok(None),
    }
}

impl TryFrom<RawSpoolSection> for SpoolSection {
    type Error = String;

    fn try_from(r: RawSpoolSection) -> Result<Self, String> {
        let mut deprecated = Vec::new();
        let segment = new_or_old(
            r.segment_size.map(|b| b.as_u64()),
            r.segment_bytes,
            ("segment_size", "segment_bytes"),
            &mut deprecated,
        )?;
        let max_object = new_or_old(
            r.max_object_size.map(|b| b.as_u64()),
            r.max_object_bytes,
            ("max_object_size", "max_object_bytes"),
            &mut deprecated,
        )?;
        let dedup = new_or_old(
            r.dedup_window.map(|d| d.as_secs()),
            r.dedup_window_secs,
            ("dedup_window", "dedup_window_secs"),
            &mut deprecated,
        )?;
        Ok(SpoolSection {
            segment_bytes: match segment {
                Some(n) => usize::try_from(n).map_err(|_| "segment_size is too large")?,
                None => default_segment_bytes(),
            },
            max_object_bytes: max_object.unwrap_or_else(default_max_object_bytes),
            dedup_window_secs: dedup.unwrap_or_else(default_dedup_window_secs),
            min_free: r.min_free.unwrap_or_else(default_min_free),
            retention: r.retention.unwrap_or_default(),
            deprecated_keys: deprecated,
        })
    }
}

fn default_segment_bytes() -> usize {
    1 << 20
}
fn default_max_object_bytes() -> u64 {
    16 << 30
}
fn default_min_free() -> bytesize::ByteSize {
    bytesize::ByteSize::gib(1)
}
fn default_dedup_window_secs() -> u64 {
    7 * 24 * 3600
}

/// `[log]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// `text` (default) or `json` (one object per line, for a log collector). The command
    /// line's `--log-format` wins over it.
    #[serde(default)]
    pub format: LogFormat,
}

/// How log lines are written (to stderr).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines; ANSI colours only when stderr is a terminal.
    #[default]
    Text,
    /// One JSON object per line, never coloured.
    Json,
}

/// `[[dicom_listener]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawDicomListener")]
pub struct DicomListener {
    /// Name used in logs and metric labels.
    pub name: String,
    /// Address to bind.
    pub listen: SocketAddr,
    /// Our AE title; a request calling another AE title is rejected.
    pub ae_title: String,
    /// Calling AE titles allowed; empty means any.
    pub allowed_calling_ae_titles: Vec<String>,
    /// Destinations every received object is queued for (besides what `[[route]]`s add).
    pub route_to: Vec<String>,
    /// Largest PDU we accept (bounds memory per association).
    pub max_pdu_length: u32,
    /// Concurrent associations allowed.
    pub max_associations: usize,
    /// Seconds a peer may stay silent before the association is aborted. Key `timeout`
    /// (`"60s"`, `"2m"`); the deprecated `timeout_secs` is still accepted.
    pub timeout_secs: u64,
    /// Refuse (0xA900) a data set whose SOP Class or Instance UID differs from its C-STORE
    /// command. By default such an object is stored and forwarded under the data set's own
    /// UIDs, with a warning and a count in `dicom_gateway_uid_mismatch_total`.
    #[serde(default)]
    pub strict_uid_match: bool,
    /// SOP classes this listener accepts; empty (the default): any storage class,
    /// vendor-private ones included.
    pub sop_classes: Vec<String>,
    /// Connections allowed to be negotiating at once; more are closed at once.
    pub max_negotiating: usize,
    /// Seconds a connection may take to complete association negotiation (key
    /// `negotiation_timeout`, default `"10s"`).
    pub negotiation_timeout_secs: u64,
    /// Seconds an association may last in total; it is aborted after that (a transfer in
    /// progress is discarded and the sender retries). Key `max_association_time`, default
    /// `"4h"`.
    pub max_association_secs: u64,
    /// DICOM TLS (PS3.15 Annex B) on this listener (`[dicom_listener.tls]`); plaintext
    /// without it.
    pub tls: Option<DicomListenerTls>,
    /// Deprecated keys this listener was written with, as `(old, new)`.
    pub deprecated_keys: Vec<(&'static str, &'static str)>,
}

/// The TOML shape of a `[[dicom_listener]]`, old and new keys.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDicomListener {
    name: String,
    listen: SocketAddr,
    ae_title: String,
    #[serde(default)]
    allowed_calling_ae_titles: Vec<String>,
    #[serde(default)]
    route_to: Vec<String>,
    #[serde(default = "default_max_pdu")]
    max_pdu_length: u32,
    #[serde(default = "default_max_associations")]
    max_associations: usize,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<std::time::Duration>,
    timeout_secs: Option<u64>,
    #[serde(default)]
    strict_uid_match: bool,
    #[serde(default)]
    sop_classes: Vec<String>,
    #[serde(default = "default_max_negotiating")]
    max_negotiating: usize,
    #[serde(default = "default_negotiation_timeout", with = "humantime_serde")]
    negotiation_timeout: std::time::Duration,
    #[serde(default = "default_max_association_time", with = "humantime_serde")]
    max_association_time: std::time::Duration,
    tls: Option<DicomListenerTls>,
}

impl TryFrom<RawDicomListener> for DicomListener {
    type Error = String;

    fn try_from(r: RawDicomListener) -> Result<Self, String> {
        let mut deprecated = Vec::new();
        let timeout = new_or_old(
            r.timeout.map(|d| d.as_secs()),
            r.timeout_secs,
            ("timeout", "timeout_secs"),
            &mut deprecated,
        )
        .map_err(|e| format!("dicom_listener {:?}: {e}", r.name))?;
        Ok(DicomListener {
            name: r.name,
            listen: r.listen,
            ae_title: r.ae_title,
            allowed_calling_ae_titles: r.allowed_calling_ae_titles,
            route_to: r.route_to,
            max_pdu_length: r.max_pdu_length,
            max_associations: r.max_associations,
            timeout_secs: timeout.unwrap_or_else(default_timeout_secs),
            strict_uid_match: r.strict_uid_match,
            sop_classes: r.sop_classes,
            max_negotiating: r.max_negotiating,
            negotiation_timeout_secs: r.negotiation_timeout.as_secs(),
            max_association_secs: r.max_association_time.as_secs(),
            tls: r.tls,
            deprecated_keys: deprecated,
        })
    }
}

/// Which TLS versions a DICOM TLS endpoint speaks (`min_version`): `"1.2"` is TLS 1.2 with
/// the ECDHE AES-GCM suites of BCP 195, or TLS 1.3; `"1.3"` is TLS 1.3 only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum TlsMinVersion {
    /// TLS 1.2 (ECDHE with AES-GCM only) or TLS 1.3.
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    /// TLS 1.3 only.
    #[serde(rename = "1.3")]
    Tls13,
}

/// Whether a DICOM TLS listener asks for client certificates (`client_auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// Every peer must present a certificate that chains to `ca` (the default).
    #[default]
    Required,
    /// A peer may present one (it is then verified, and a bad one fails the handshake);
    /// a peer without one is served too, unless its AE title is bound to a certificate.
    Optional,
    /// No client certificate is asked for: TLS gives confidentiality only.
    None,
}

/// `[dicom_listener.tls]`: DICOM TLS (PS3.15 Annex B, BCP 195) for modalities and PACS
/// that connect directly.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DicomListenerTls {
    /// PEM certificate chain the listener presents (from the hospital PKI).
    pub cert: PathBuf,
    /// PEM private key for `cert`.
    pub key: PathBuf,
    /// PEM CA bundle client certificates must chain to (needed unless
    /// `client_auth = "none"`).
    pub ca: Option<PathBuf>,
    /// PEM CRL files of that CA; with any given, a client certificate's revocation status
    /// must be known from a CRL that has not expired (fail closed).
    #[serde(default)]
    pub crls: Vec<PathBuf>,
    /// `"required"` (default), `"optional"` or `"none"`.
    #[serde(default)]
    pub client_auth: ClientAuth,
    /// `"1.2"` (default: TLS 1.2 with ECDHE AES-GCM, or 1.3) or `"1.3"`.
    #[serde(default)]
    pub min_version: TlsMinVersion,
    /// Calling AE title → the DNS SAN (or `spiffe://` URI SAN) its client certificate must
    /// carry exactly. With any listed, only the listed AE titles may call, each only with
    /// its certificate; others get A-ASSOCIATE-RJ (calling AE title not recognized).
    #[serde(default)]
    pub bind_ae_titles: std::collections::BTreeMap<String, String>,
}

/// `[destination.tls]` of a `kind = "dicom"` destination: DICOM TLS towards the PACS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationTls {
    /// PEM CA bundle the PACS's certificate must chain to.
    pub ca: PathBuf,
    /// The DNS SAN the PACS's certificate must carry exactly (default: the host of
    /// `address`, which must then be a DNS name).
    pub server_name: Option<String>,
    /// PEM client certificate chain to present, for a PACS that requires one (with `key`).
    pub cert: Option<PathBuf>,
    /// PEM private key for `cert`.
    pub key: Option<PathBuf>,
    /// PEM CRL files of the CA (fail closed, as for `[tls]`).
    #[serde(default)]
    pub crls: Vec<PathBuf>,
    /// `"1.2"` (default) or `"1.3"`.
    #[serde(default)]
    pub min_version: TlsMinVersion,
}

fn default_max_negotiating() -> usize {
    16
}
fn default_negotiation_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(10)
}
fn default_max_association_time() -> std::time::Duration {
    std::time::Duration::from_secs(4 * 3600)
}

fn default_max_pdu() -> u32 {
    256 * 1024
}
fn default_max_associations() -> usize {
    64
}
fn default_timeout_secs() -> u64 {
    60
}

/// `[[link_listener]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkListener {
    /// Name used in logs and metric labels.
    pub name: String,
    /// Address to bind.
    pub listen: SocketAddr,
    /// Peers allowed to connect: DNS names, or `spiffe://` IDs, that their client
    /// certificates must carry exactly as a SAN (wildcard SANs never match).
    pub allowed_peers: Vec<String>,
    /// Destinations every received object is queued for (besides what `[[route]]`s add).
    #[serde(default)]
    pub route_to: Vec<String>,
    /// Connections allowed in the TLS handshake at once (10 s each at most); more are
    /// closed at once.
    #[serde(default = "default_max_handshakes")]
    pub max_handshakes: usize,
    /// Authenticated connections allowed at once; more are closed after the handshake.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// HTTP/2 streams (requests in flight) allowed per connection.
    #[serde(default = "default_max_streams")]
    pub max_streams_per_connection: u32,
    /// Requests processed at once across all connections; more wait for a slot (within
    /// their deadline).
    #[serde(default = "default_max_requests")]
    pub max_requests: usize,
    /// How long a request may take from its headers to its response (`"15m"`); it fails
    /// with 503 after that and its part is discarded.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: std::time::Duration,
}

fn default_max_handshakes() -> usize {
    32
}
fn default_max_connections() -> usize {
    16
}
fn default_max_streams() -> u32 {
    32
}
fn default_max_requests() -> usize {
    64
}
fn default_request_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(900)
}

/// `[[hl7_listener]]`: HL7 v2 messages over MLLP (TCP). Each message is stored in the
/// spool (encrypted under its patient's key) and queued for `route_to` before it is
/// acknowledged with AA.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hl7Listener {
    /// Name used in logs and metric labels.
    pub name: String,
    /// Address to bind.
    pub listen: SocketAddr,
    /// Destinations every message is queued for: `hl7` destinations, or `gateway`
    /// destinations (the site link carries HL7 too). Required.
    pub route_to: Vec<String>,
    /// Largest message accepted (`"1MiB"`, at most 16 MiB); a longer one is answered AR
    /// and the connection closed, before more than this is buffered.
    #[serde(default = "default_max_message_size")]
    pub max_message_size: bytesize::ByteSize,
    /// Connections allowed at once; more are closed at once.
    #[serde(default = "default_hl7_connections")]
    pub max_connections: usize,
    /// How long a connection may stay silent between messages, and how long one message
    /// may take from its start block to its end (`"60s"`).
    #[serde(default = "default_hl7_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_max_message_size() -> bytesize::ByteSize {
    bytesize::ByteSize::mib(1)
}
fn default_hl7_connections() -> usize {
    32
}
fn default_hl7_timeout() -> Duration {
    Duration::from_secs(60)
}

/// What a destination can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// DICOM objects.
    Dicom,
    /// HL7 v2 messages.
    Hl7,
}

impl Protocol {
    /// `DICOM` or `HL7`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Dicom => "DICOM",
            Protocol::Hl7 => "HL7",
        }
    }
}

/// `[[route]]`: a routing rule. An object matches when every criterion given matches (an
/// empty or absent list matches anything); it then goes to the rule's `to` destinations, in
/// addition to its listener's `route_to`. All destinations an object goes to get their queue
/// entries in the one synced write that stores it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Unique; used in logs and by `dicom-gateway check --explain`.
    pub name: String,
    /// Listeners (DICOM or link) the object came in on.
    #[serde(default)]
    pub listeners: Vec<String>,
    /// Calling AE titles of the association (DICOM listeners only).
    #[serde(default)]
    pub calling_ae_titles: Vec<String>,
    /// Called AE titles (DICOM listeners only; the listener's own `ae_title`).
    #[serde(default)]
    pub called_ae_titles: Vec<String>,
    /// Peer gateways (their node names) the object came from (link listeners only).
    #[serde(default)]
    pub peers: Vec<String>,
    /// Modality (0008,0060) of the data set, e.g. `"CT"`.
    #[serde(default)]
    pub modalities: Vec<String>,
    /// SOP Class UIDs of the data set.
    #[serde(default)]
    pub sop_classes: Vec<String>,
    /// Destinations a matching object is queued for.
    pub to: Vec<String>,
}

/// `[[destination]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawDestination")]
pub struct Destination {
    /// Unique name, used by `route_to`, logs and metric labels.
    pub name: String,
    /// What kind of destination and its settings.
    pub kind: DestinationKind,
    /// When and how often to try again, and when to give up (`[destination.retry]`).
    pub retry: RetryPolicy,
    /// A gateway request making no progress for this long is abandoned (`send_timeout`).
    pub send_timeout: Duration,
    /// Entries this destination may have waiting (dead letters excluded). Past it, new
    /// objects routed to it are refused (0xA700, or 503 on the link) until it drains.
    pub max_queue: usize,
    /// The order objects leave in when one of them fails (`order`).
    pub order: Order,
}

/// `[destination.retry]`: the retry budget of a destination.
///
/// A failed attempt is retried after `initial`, then after a delay multiplied by
/// `multiplier` each time (with jitter, at most `max_delay`). An object whose attempts fail
/// `max_attempts` times, or that is still failing `max_age` after it was received, becomes a
/// dead letter. Failures of the destination itself (unreachable, busy) do not count as the
/// object's attempts: they open the destination's circuit instead.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// First retry delay.
    pub initial: Duration,
    /// Longest retry delay.
    pub max_delay: Duration,
    /// Growth of the delay per attempt (1.0 to 10.0).
    pub multiplier: f64,
    /// Failed attempts of one object before it becomes a dead letter.
    pub max_attempts: u32,
    /// Age of a still-failing object at which it becomes a dead letter.
    pub max_age: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial: Duration::from_secs(1),
            max_delay: Duration::from_secs(300),
            multiplier: 2.0,
            max_attempts: 10,
            max_age: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// The TOML shape of `[destination.retry]`; durations read like `"1s"` or `"24h"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    #[serde(default, with = "humantime_serde")]
    initial: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    max_delay: Option<Duration>,
    multiplier: Option<f64>,
    max_attempts: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    max_age: Option<Duration>,
}

/// The kind-specific part of a destination.
#[derive(Debug, Clone)]
pub enum DestinationKind {
    /// STOW-RS over mutual TLS to a peer gateway.
    Gateway {
        /// `https://host:port` of the peer's link listener.
        url: String,
        /// The DNS SAN the peer's server certificate must carry.
        peer_name: String,
        /// Requests in flight at once over the one HTTP/2 connection.
        max_in_flight: usize,
    },
    /// C-STORE SCU to a DICOM node.
    Dicom {
        /// `host:port` of the DICOM node.
        address: String,
        /// Its AE title.
        ae_title: String,
        /// The AE title we call it with.
        calling_ae_title: String,
        /// Parallel associations.
        associations: usize,
        /// Largest PDU we accept from it.
        max_pdu_length: u32,
        /// Seconds to wait for the peer on connect, reads and writes.
        timeout_secs: u64,
        /// DICOM TLS towards the node (`[destination.tls]`); plaintext without it.
        tls: Option<DestinationTls>,
    },
    /// Part-10 files in a folder, for hand-off. Plaintext by design.
    Folder {
        /// The folder.
        path: PathBuf,
    },
    /// HL7 v2 over MLLP to a receiving system (a RIS), one message at a time, each
    /// acknowledged before the next.
    Hl7 {
        /// `host:port` of the receiving system.
        address: String,
    },
}

impl DestinationKind {
    /// The `kind = "..."` string.
    pub fn as_str(&self) -> &'static str {
        match self {
            DestinationKind::Gateway { .. } => "gateway",
            DestinationKind::Dicom { .. } => "dicom",
            DestinationKind::Folder { .. } => "folder",
            DestinationKind::Hl7 { .. } => "hl7",
        }
    }

    /// Whether this kind of destination takes `p`: a peer gateway takes both, `hl7` only
    /// HL7 messages, the others only DICOM objects.
    pub fn carries(&self, p: Protocol) -> bool {
        match self {
            DestinationKind::Gateway { .. } => true,
            DestinationKind::Hl7 { .. } => p == Protocol::Hl7,
            DestinationKind::Dicom { .. } | DestinationKind::Folder { .. } => p == Protocol::Dicom,
        }
    }
}

/// `order` of a destination: what a failing object does to the rest of its study.
///
/// Objects leave in queue order either way; the two differ only once an object fails and
/// is to be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    /// The failing object steps aside: the objects behind it, of its study or another, go
    /// on meanwhile, and it is retried when no first attempt is due. One poison object
    /// never delays anything but itself.
    #[default]
    Arrival,
    /// Order kept within a study: while an object is being retried, the objects of its
    /// study queued after it wait until it is delivered or becomes a dead letter (at most
    /// its retry budget). Other studies go on. For a PACS that needs a study's objects in
    /// the order they were sent; a poison object then delays its own study by its budget.
    Study,
}

/// The flat TOML shape of a destination; [`Destination`] is built from it so that a key that
/// does not belong to the destination's `kind` is reported by name.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDestination {
    name: String,
    kind: String,
    retry: Option<RawRetry>,
    /// Deprecated: `retry.initial`.
    retry_initial_ms: Option<u64>,
    /// Deprecated: `retry.max_delay`.
    retry_max_ms: Option<u64>,
    #[serde(default, with = "humantime_serde")]
    send_timeout: Option<Duration>,
    max_queue: Option<usize>,
    order: Option<Order>,
    url: Option<String>,
    peer_name: Option<String>,
    max_in_flight: Option<usize>,
    address: Option<String>,
    ae_title: Option<String>,
    calling_ae_title: Option<String>,
    associations: Option<usize>,
    max_pdu_length: Option<u32>,
    timeout_secs: Option<u64>,
    path: Option<PathBuf>,
    tls: Option<DestinationTls>,
}

impl TryFrom<RawDestination> for Destination {
    type Error = String;

    fn try_from(r: RawDestination) -> Result<Self, String> {
        let name = r.name;
        let need = |v: Option<String>, k: &str| {
            v.ok_or_else(|| format!("destination {name:?} of kind {:?} needs key `{k}`", r.kind))
        };
        let present: Vec<(&str, bool)> = vec![
            ("url", r.url.is_some()),
            ("peer_name", r.peer_name.is_some()),
            ("max_in_flight", r.max_in_flight.is_some()),
            ("address", r.address.is_some()),
            ("ae_title", r.ae_title.is_some()),
            ("calling_ae_title", r.calling_ae_title.is_some()),
            ("associations", r.associations.is_some()),
            ("max_pdu_length", r.max_pdu_length.is_some()),
            ("timeout_secs", r.timeout_secs.is_some()),
            ("path", r.path.is_some()),
            ("send_timeout", r.send_timeout.is_some()),
            ("tls", r.tls.is_some()),
        ];
        let allowed: &[&str] = match r.kind.as_str() {
            "gateway" => &["url", "peer_name", "max_in_flight", "send_timeout"],
            "dicom" => &[
                "address",
                "ae_title",
                "calling_ae_title",
                "associations",
                "max_pdu_length",
                "timeout_secs",
                "tls",
            ],
            "folder" => &["path"],
            "hl7" => &["address", "send_timeout"],
            other => {
                return Err(format!(
                    "destination {name:?}: unknown kind {other:?}, expected \"gateway\", \"dicom\", \"folder\" or \"hl7\""
                ));
            }
        };
        if let Some((k, _)) = present.iter().find(|(k, p)| *p && !allowed.contains(k)) {
            return Err(format!(
                "destination {name:?}: key `{k}` is not valid for kind {:?}",
                r.kind
            ));
        }
        let kind = match r.kind.as_str() {
            "gateway" => DestinationKind::Gateway {
                url: need(r.url, "url")?,
                peer_name: need(r.peer_name, "peer_name")?,
                max_in_flight: r.max_in_flight.unwrap_or_else(default_in_flight),
            },
            "dicom" => DestinationKind::Dicom {
                address: need(r.address, "address")?,
                ae_title: need(r.ae_title, "ae_title")?,
                calling_ae_title: need(r.calling_ae_title, "calling_ae_title")?,
                associations: r.associations.unwrap_or_else(default_associations),
                max_pdu_length: r.max_pdu_length.unwrap_or_else(default_max_pdu),
                timeout_secs: r.timeout_secs.unwrap_or_else(default_timeout_secs),
                tls: r.tls,
            },
            "hl7" => DestinationKind::Hl7 {
                address: need(r.address, "address")?,
            },
            _ => DestinationKind::Folder {
                path: r.path.ok_or_else(|| {
                    format!("destination {name:?} of kind \"folder\" needs key `path`")
                })?,
            },
        };
        let mut retry = RetryPolicy::default();
        if let Some(ms) = r.retry_initial_ms {
            retry.initial = Duration::from_millis(ms);
        }
        if let Some(ms) = r.retry_max_ms {
            retry.max_delay = Duration::from_millis(ms);
        }
        if let Some(t) = r.retry {
            if r.retry_initial_ms.is_some() || r.retry_max_ms.is_some() {
                return Err(format!(
                    "destination {name:?}: use either [destination.retry] or the deprecated retry_initial_ms/retry_max_ms, not both"
                ));
            }
            retry.initial = t.initial.unwrap_or(retry.initial);
            retry.max_delay = t.max_delay.unwrap_or(retry.max_delay);
            retry.multiplier = t.multiplier.unwrap_or(retry.multiplier);
            retry.max_attempts = t.max_attempts.unwrap_or(retry.max_attempts);
            retry.max_age = t.max_age.unwrap_or(retry.max_age);
        }
        Ok(Destination {
            name,
            kind,
            retry,
            send_timeout: r.send_timeout.unwrap_or(Duration::from_secs(60)),
            max_queue: r.max_queue.unwrap_or(1_000_000),
            order: r.order.unwrap_or_default(),
        })
    }
}

impl Destination {
    /// True when the deprecated `retry_*_ms` keys were used (for a start-up warning).
    pub fn uses_deprecated_retry_keys(text: &str) -> bool {
        text.contains("retry_initial_ms") || text.contains("retry_max_ms")
    }
}

fn default_in_flight() -> usize {
    32
}
/// One association by default: many SCPs (DCMTK's storescp among them) serve one
/// association at a time, and a second would wait until the first is released.
fn default_associations() -> usize {
    1
}

impl Config {
    /// Read, parse, resolve paths and validate.
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            file: file.to_owned(),
            source,
        })?;
        let base = file
            .parent()
            .map(Path::to_owned)
            .unwrap_or_else(|| PathBuf::from("."));
        Self::parse(&text, file, &base)
    }

    /// Parse TOML text as if read from `file`, resolving relative paths against `base`.
    pub fn parse(text: &str, file: &Path, base: &Path) -> Result<Config, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let base = if base.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            base.to_owned()
        };
        cfg.base_dir = base.clone();
        cfg.file = file.to_owned();
        cfg.resolve_paths(&base);
        cfg.validate()?;
        for (key, new) in cfg.deprecated_keys() {
            tracing::warn!(
                file = %cfg.file.display(),
                "config key `{key}` is deprecated and will be removed in the next release; use `{new}`"
            );
        }
        Ok(cfg)
    }

    /// Every deprecated key the file used, as (`section.old_key`, `new_key`).
    pub fn deprecated_keys(&self) -> Vec<(String, &'static str)> {
        let mut out: Vec<(String, &'static str)> = self
            .spool
            .deprecated_keys
            .iter()
            .map(|(old, new)| (format!("spool.{old}"), *new))
            .collect();
        for l in &self.dicom_listener {
            for (old, new) in &l.deprecated_keys {
                out.push((format!("dicom_listener[{}].{old}", l.name), *new));
            }
        }
        out
    }

    fn resolve_paths(&mut self, base: &Path) {
        let r = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        r(&mut self.node.data_dir);
        r(&mut self.keystore.kek_file);
        if let Some(tls) = &mut self.tls {
            r(&mut tls.cert);
            r(&mut tls.key);
            r(&mut tls.ca);
            tls.crls.iter_mut().for_each(r);
        }
        for l in &mut self.dicom_listener {
            if let Some(t) = &mut l.tls {
                r(&mut t.cert);
                r(&mut t.key);
                t.ca.iter_mut().for_each(r);
                t.crls.iter_mut().for_each(r);
            }
        }
        for d in &mut self.destination {
            match &mut d.kind {
                DestinationKind::Folder { path } => r(path),
                DestinationKind::Dicom { tls: Some(t), .. } => {
                    r(&mut t.ca);
                    t.cert.iter_mut().for_each(r);
                    t.key.iter_mut().for_each(r);
                    t.crls.iter_mut().for_each(r);
                }
                _ => {}
            }
        }
    }

    fn invalid(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.clone(),
            key: key.into(),
            message: message.into(),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if real_path(&self.keystore.kek_file).starts_with(real_path(&self.node.data_dir)) {
            return Err(self.invalid(
                "keystore.kek_file",
                format!(
                    "{} lies inside node.data_dir ({}): a backup or a stolen copy of the data \
                     volume would carry the key with the data; keep the KEK on another volume",
                    self.keystore.kek_file.display(),
                    self.node.data_dir.display()
                ),
            ));
        }
        if !is_dns_name(&self.node.name) {
            return Err(self.invalid(
                "node.name",
                "must be a DNS name (letters, digits, '-' and '.'), as in the certificate's SAN",
            ));
        }
        let s = &self.spool;
        if !(64 * 1024..=8 * 1024 * 1024).contains(&s.segment_bytes) {
            return Err(self.invalid(
                "spool.segment_size",
                "must be between 64KiB and 8MiB (65536 to 8388608 bytes)",
            ));
        }
        if s.max_object_bytes == 0 {
            return Err(self.invalid("spool.max_object_size", "must be greater than 0"));
        }

        let mut dest_names = HashSet::new();
        for d in &self.destination {
            let key = |k: &str| format!("destination[{}].{k}", d.name);
            if d.name.is_empty() || !d.name.chars().all(is_name_char) {
                return Err(self.invalid(
                    "destination.name",
                    format!(
                        "{:?} must be non-empty letters, digits, '-', '_' or '.'",
                        d.name
                    ),
                ));
            }
            if !dest_names.insert(d.name.as_str()) {
                return Err(self.invalid(key("name"), "duplicate destination name"));
            }
            let r = &d.retry;
            if r.initial.is_zero() || r.max_delay < r.initial {
                return Err(self.invalid(
                    key("retry.max_delay"),
                    "retry.initial must be > 0 and retry.max_delay >= retry.initial",
                ));
            }
            if !(1.0..=10.0).contains(&r.multiplier) {
                return Err(self.invalid(key("retry.multiplier"), "must be between 1.0 and 10.0"));
            }
            if r.max_attempts == 0 {
                return Err(self.invalid(key("retry.max_attempts"), "must be at least 1"));
            }
            if r.max_age.is_zero() {
                return Err(self.invalid(key("retry.max_age"), "must be > 0"));
            }
            if d.max_queue == 0 {
                return Err(self.invalid(key("max_queue"), "must be at least 1"));
            }
            if d.send_timeout.is_zero() {
                return Err(self.invalid(key("send_timeout"), "must be > 0"));
            }
            match &d.kind {
                DestinationKind::Gateway {
                    url,
                    peer_name,
                    max_in_flight,
                } => {
                    if let Err(m) = parse_https_url(url) {
                        return Err(self.invalid(key("url"), m));
                    }
                    if !is_dns_name(peer_name) {
                        return Err(self.invalid(key("peer_name"), "must be a DNS name"));
                    }
                    if !(1..=1024).contains(max_in_flight) {
                        return Err(self.invalid(key("max_in_flight"), "must be 1..=1024"));
                    }
                    if self.tls.is_none() {
                        return Err(self.invalid(
                            "tls",
                            format!(
                                "destination {:?} is a gateway, so [tls] is required",
                                d.name
                            ),
                        ));
                    }
                }
                DestinationKind::Dicom {
                    address,
                    ae_title,
                    calling_ae_title,
                    associations,
                    max_pdu_length,
                    timeout_secs,
                    tls,
                } => {
                    if address.is_empty() || !address.contains(':') {
                        return Err(self.invalid(key("address"), "must be host:port"));
                    }
                    if let Some(t) = tls {
                        dicom_server_name(address, t)
                            .map_err(|m| self.invalid(key("tls.server_name"), m))?;
                        if t.cert.is_some() != t.key.is_some() {
                            return Err(self.invalid(
                                key("tls.cert"),
                                "tls.cert and tls.key go together: give both or neither",
                            ));
                        }
                    }
                    check_ae(ae_title).map_err(|m| self.invalid(key("ae_title"), m))?;
                    check_ae(calling_ae_title)
                        .map_err(|m| self.invalid(key("calling_ae_title"), m))?;
                    if !(1..=64).contains(associations) {
                        return Err(self.invalid(key("associations"), "must be 1..=64"));
                    }
                    check_pdu(*max_pdu_length)
                        .map_err(|m| self.invalid(key("max_pdu_length"), m))?;
                    if *timeout_secs == 0 {
                        return Err(self.invalid(key("timeout_secs"), "must be > 0"));
                    }
                }
                DestinationKind::Folder { .. } => {}
                DestinationKind::Hl7 { address } => {
                    if address.is_empty() || !address.contains(':') {
                        return Err(self.invalid(key("address"), "must be host:port"));
                    }
                }
            }
        }

        let check_routes = |key: String, routes: &[String]| -> Result<(), ConfigError> {
            let mut seen = HashSet::new();
            for r in routes {
                if !dest_names.contains(r.as_str()) {
                    return Err(self.invalid(key, format!("no destination named {r:?}")));
                }
                if !seen.insert(r.as_str()) {
                    return Err(self.invalid(
                        key,
                        format!("names destination {r:?} twice; list each destination once"),
                    ));
                }
            }
            Ok(())
        };

        // Each protocol goes only to destinations that take it.
        let check_protocol = |key: String, routes: &[String], p: Protocol| {
            for r in routes {
                if let Some(d) = self.destination.iter().find(|d| &d.name == r)
                    && !d.kind.carries(p)
                {
                    return Err(self.invalid(
                        key,
                        format!(
                            "routes {} to destination {r:?}, a {} destination, which cannot take it",
                            p.as_str(),
                            d.kind.as_str()
                        ),
                    ));
                }
            }
            Ok(())
        };

        let mut listener_names = HashSet::new();
        for l in &self.dicom_listener {
            let key = |k: &str| format!("dicom_listener[{}].{k}", l.name);
            if !listener_names.insert(l.name.as_str()) {
                return Err(self.invalid(key("name"), "duplicate listener name"));
            }
            check_protocol(key("route_to"), &l.route_to, Protocol::Dicom)?;
            check_ae(&l.ae_title).map_err(|m| self.invalid(key("ae_title"), m))?;
            for ae in &l.allowed_calling_ae_titles {
                check_ae(ae).map_err(|m| self.invalid(key("allowed_calling_ae_titles"), m))?;
            }
            check_routes(key("route_to"), &l.route_to)?;
            check_pdu(l.max_pdu_length).map_err(|m| self.invalid(key("max_pdu_length"), m))?;
            if let Some(t) = &l.tls {
                if t.client_auth != ClientAuth::None && t.ca.is_none() {
                    return Err(self.invalid(
                        key("tls.ca"),
                        "client certificates are verified against tls.ca: give the CA bundle, \
                         or set tls.client_auth = \"none\"",
                    ));
                }
                if !t.bind_ae_titles.is_empty() && t.client_auth == ClientAuth::None {
                    return Err(self.invalid(
                        key("tls.bind_ae_titles"),
                        "binding AE titles to certificates needs client certificates: \
                         tls.client_auth must be \"required\" or \"optional\"",
                    ));
                }
                for (ae, name) in &t.bind_ae_titles {
                    check_ae(ae).map_err(|m| self.invalid(key("tls.bind_ae_titles"), m))?;
                    if !is_dns_name(name) && !is_spiffe_id(name) {
                        return Err(self.invalid(
                            key("tls.bind_ae_titles"),
                            format!(
                                "{ae:?} = {name:?}: must be a DNS name or a spiffe:// ID \
                                 (wildcards never match)"
                            ),
                        ));
                    }
                }
            }
            for c in &l.sop_classes {
                if !crate::sop::may_be_stored(c) {
                    return Err(self.invalid(
                        key("sop_classes"),
                        format!("{c:?} is not a storage SOP class UID"),
                    ));
                }
            }
            if l.max_associations == 0 {
                return Err(self.invalid(key("max_associations"), "must be > 0"));
            }
            for (k, v) in [
                ("timeout", l.timeout_secs),
                ("max_negotiating", l.max_negotiating as u64),
                ("negotiation_timeout", l.negotiation_timeout_secs),
                ("max_association_time", l.max_association_secs),
            ] {
                if v == 0 {
                    return Err(self.invalid(key(k), "must be at least 1 (1s for a duration)"));
                }
            }
        }
        for l in &self.link_listener {
            let key = |k: &str| format!("link_listener[{}].{k}", l.name);
            if !listener_names.insert(l.name.as_str()) {
                return Err(self.invalid(key("name"), "duplicate listener name"));
            }
            if l.allowed_peers.is_empty() {
                return Err(self.invalid(key("allowed_peers"), "must list at least one peer"));
            }
            for p in &l.allowed_peers {
                if !is_dns_name(p) && !is_spiffe_id(p) {
                    return Err(self.invalid(
                        key("allowed_peers"),
                        format!("{p:?} is neither a DNS name nor a spiffe:// ID"),
                    ));
                }
            }
            check_routes(key("route_to"), &l.route_to)?;
            for (k, v) in [
                ("max_handshakes", l.max_handshakes as u64),
                ("max_connections", l.max_connections as u64),
                (
                    "max_streams_per_connection",
                    u64::from(l.max_streams_per_connection),
                ),
                ("max_requests", l.max_requests as u64),
                ("request_timeout", l.request_timeout.as_secs()),
            ] {
                if v == 0 {
                    return Err(self.invalid(key(k), "must be > 0"));
                }
            }
            if self.tls.is_none() {
                return Err(self.invalid("tls", "a [[link_listener]] requires [tls]"));
            }
        }

        for l in &self.hl7_listener {
            let key = |k: &str| format!("hl7_listener[{}].{k}", l.name);
            if l.name.is_empty() || !l.name.chars().all(is_name_char) {
                return Err(self.invalid(
                    key("name"),
                    "must be non-empty letters, digits, '-', '_' or '.'",
                ));
            }
            if !listener_names.insert(l.name.as_str()) {
                return Err(self.invalid(key("name"), "duplicate listener name"));
            }
            if l.route_to.is_empty() {
                return Err(self.invalid(key("route_to"), "must name at least one destination"));
            }
            check_routes(key("route_to"), &l.route_to)?;
            check_protocol(key("route_to"), &l.route_to, Protocol::Hl7)?;
            let max = l.max_message_size.as_u64();
            if !(1024..=crate::hl7::MAX_MESSAGE_BYTES as u64).contains(&max) {
                return Err(self.invalid(key("max_message_size"), "must be between 1KiB and 16MiB"));
            }
            if max > s.max_object_bytes {
                return Err(self.invalid(
                    key("max_message_size"),
                    "must not exceed spool.max_object_size",
                ));
            }
            if l.max_connections == 0 {
                return Err(self.invalid(key("max_connections"), "must be > 0"));
            }
            if l.timeout < Duration::from_secs(1) {
                return Err(self.invalid(key("timeout"), "must be at least 1s"));
            }
        }

        let mut route_names = HashSet::new();
        for r in &self.route {
            let key = |k: &str| format!("route[{}].{k}", r.name);
            if r.name.is_empty() || !route_names.insert(r.name.as_str()) {
                return Err(self.invalid(key("name"), "route names must be unique and not empty"));
            }
            if r.to.is_empty() {
                return Err(self.invalid(key("to"), "must name at least one destination"));
            }
            check_routes(key("to"), &r.to)?;
            // Routing rules decide on DICOM attributes: they route DICOM objects only.
            check_protocol(key("to"), &r.to, Protocol::Dicom)?;
            for l in &r.listeners {
                if !listener_names.contains(l.as_str()) {
                    return Err(self.invalid(key("listeners"), format!("no listener named {l:?}")));
                }
            }
            for ae in r.calling_ae_titles.iter().chain(&r.called_ae_titles) {
                check_ae(ae).map_err(|m| self.invalid(key("calling_ae_titles"), m))?;
            }
            for p in &r.peers {
                if !is_dns_name(p) && !is_spiffe_id(p) {
                    return Err(self.invalid(key("peers"), format!("{p:?} is not a node name")));
                }
            }
            for m in &r.modalities {
                let ok = (1..=16).contains(&m.len())
                    && m.bytes()
                        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
                if !ok {
                    return Err(self.invalid(
                        key("modalities"),
                        format!("{m:?} is not a modality code (upper case, e.g. \"CT\")"),
                    ));
                }
            }
            for c in &r.sop_classes {
                if !crate::dimse::is_valid_uid(c) {
                    return Err(self.invalid(key("sop_classes"), format!("{c:?} is not a UID")));
                }
            }
            if !self.listener_names().any(|(l, link)| r.can_match(l, link)) {
                return Err(self.invalid(
                    key("listeners"),
                    "this route can match no listener (AE title criteria apply to DICOM \
                     listeners, peers to link listeners)",
                ));
            }
        }
        for (l, link) in self.listener_names() {
            let table = if link {
                "link_listener"
            } else {
                "dicom_listener"
            };
            let static_routes = if link {
                self.link_listener
                    .iter()
                    .find(|x| x.name == l)
                    .map(|x| &x.route_to)
            } else {
                self.dicom_listener
                    .iter()
                    .find(|x| x.name == l)
                    .map(|x| &x.route_to)
            };
            if static_routes.is_none_or(|r| r.is_empty())
                && !self.route.iter().any(|r| r.can_match(l, link))
            {
                return Err(self.invalid(
                    format!("{table}[{l}].route_to"),
                    "must name at least one destination, unless a [[route]] can match this listener",
                ));
            }
        }
        Ok(())
    }

    /// Every listener's name, and whether it is a link listener.
    pub fn listener_names(&self) -> impl Iterator<Item = (&str, bool)> {
        self.dicom_listener
            .iter()
            .map(|l| (l.name.as_str(), false))
            .chain(self.link_listener.iter().map(|l| (l.name.as_str(), true)))
    }
}

impl Route {
    /// Whether an object received on listener `name` (a link listener if `link`) can match
    /// this route, given the criteria that apply to that kind of listener.
    pub fn can_match(&self, name: &str, link: bool) -> bool {
        let listener = self.listeners.is_empty() || self.listeners.iter().any(|l| l == name);
        let kind = if link {
            self.calling_ae_titles.is_empty() && self.called_ae_titles.is_empty()
        } else {
            self.peers.is_empty()
        };
        listener && kind
    }
}

/// Parse `https://host:port[/]` into `(host, port)`.
pub fn parse_https_url(url: &str) -> Result<(String, u16), String> {
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| format!("{url:?} must start with https://"))?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('/') || rest.contains('@') || rest.contains('?') {
        return Err(format!("{url:?} must be https://host:port with no path"));
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
            let port = p
                .parse::<u16>()
                .map_err(|_| format!("{url:?} has an invalid port"))?;
            (
                h.trim_start_matches('[').trim_end_matches(']').to_owned(),
                port,
            )
        }
        _ => (rest.to_owned(), 443),
    };
    if host.is_empty() {
        return Err(format!("{url:?} has no host"));
    }
    Ok((host, port))
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// A DNS name as it may appear in a certificate SAN.
pub fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// The name a `kind = "dicom"` destination's TLS peer must carry: `tls.server_name`, or the
/// host of `address` when that is a DNS name.
pub fn dicom_server_name(address: &str, tls: &DestinationTls) -> Result<String, String> {
    if let Some(n) = &tls.server_name {
        return if is_dns_name(n) {
            Ok(n.clone())
        } else {
            Err(format!("{n:?} must be a DNS name"))
        };
    }
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    if is_dns_name(host) && host.parse::<std::net::Ipv4Addr>().is_err() {
        Ok(host.to_owned())
    } else {
        Err(format!(
            "address {address:?} is not a DNS name: set tls.server_name to the DNS SAN of the \
             node's certificate"
        ))
    }
}

/// A SPIFFE ID (`spiffe://trust-domain/path`), as a URI SAN of a peer's certificate: a
/// lower-case trust domain, non-empty path segments of `[A-Za-z0-9._-]` that are not `.`
/// or `..`, no query or fragment, at most 2048 bytes.
pub fn is_spiffe_id(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("spiffe://") else {
        return false;
    };
    let (domain, path) = rest.split_once('/').unwrap_or((rest, ""));
    s.len() <= 2048
        && !domain.is_empty()
        && domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        && (path.is_empty()
            || path.split('/').all(|seg| {
                !seg.is_empty()
                    && seg != "."
                    && seg != ".."
                    && seg
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
            }))
}

/// AE titles: 1–16 characters of the default character repertoire, no backslash or control
/// characters, not all spaces.
pub fn check_ae(ae: &str) -> Result<(), String> {
    if ae.trim().is_empty() || ae.len() > 16 {
        return Err(format!("AE title {ae:?} must be 1 to 16 characters"));
    }
    if !ae.chars().all(|c| (' '..='~').contains(&c) && c != '\\') {
        return Err(format!(
            "AE title {ae:?} may hold only printable ASCII without backslash"
        ));
    }
    Ok(())
}

/// `p` with symbolic links resolved as far as it exists (the rest appended as written), so
/// that a link into the data directory is seen for what it is.
fn real_path(p: &Path) -> PathBuf {
    let mut existing = p;
    let mut rest = Vec::new();
    loop {
        if let Ok(r) = existing.canonicalize() {
            let mut out = r;
            for c in rest.iter().rev() {
                out.push(c);
            }
            return out;
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                existing = parent;
            }
            _ => return p.to_path_buf(),
        }
    }
}

fn check_pdu(n: u32) -> Result<(), String> {
    if (4096..=16 * 1024 * 1024).contains(&n) {
        Ok(())
    } else {
        Err("must be between 4096 and 16777216".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[node]
name = "site-a"
data_dir = "data"
[keystore]
kek_file = "kek.key"
[tls]
cert = "tls/site-a.crt"
key  = "tls/site-a.key"
ca   = "tls/ca.crt"
[http]
listen = "127.0.0.1:9464"
[[dicom_listener]]
name = "lan"
listen = "0.0.0.0:11112"
ae_title = "GW_A"
allowed_calling_ae_titles = []
route_to = ["site-b"]
[[link_listener]]
name = "wan"
listen = "0.0.0.0:8443"
allowed_peers = ["site-b"]
route_to = ["pacs"]
[[destination]]
name = "site-b"
kind = "gateway"
url  = "https://gw-b.example.org:8443"
peer_name = "site-b"
[[destination]]
name = "pacs"
kind = "dicom"
address = "10.0.0.5:104"
ae_title = "PACS"
calling_ae_title = "GW_B"
[[destination]]
name = "handoff"
kind = "folder"
path = "received"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/gw/site-a.toml"), Path::new("/etc/gw"))
    }

    #[test]
    fn a_kek_inside_the_data_directory_is_refused_even_through_a_link() {
        let e = err(&GOOD.replace("kek_file = \"kek.key\"", "kek_file = \"data/kek.key\""));
        assert!(
            e.contains("keystore.kek_file") && e.contains("inside node.data_dir"),
            "{e}"
        );
        // A symbolic link elsewhere that points into the data directory.
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("data")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("data"), dir.path().join("keys")).unwrap();
        let text = GOOD.replace("kek_file = \"kek.key\"", "kek_file = \"keys/kek.key\"");
        let e = Config::parse(&text, &dir.path().join("site-a.toml"), dir.path())
            .expect_err("a KEK reached through a link into the data directory")
            .to_string();
        assert!(e.contains("inside node.data_dir"), "{e}");
        // Beside it is fine.
        let text = GOOD.replace("kek_file = \"kek.key\"", "kek_file = \"kek/kek.key\"");
        assert!(Config::parse(&text, &dir.path().join("site-a.toml"), dir.path()).is_ok());
    }

    #[test]
    fn the_documented_shape_parses_and_resolves_paths() {
        let c = parse(GOOD).expect("valid config");
        assert_eq!(c.node.data_dir, Path::new("/etc/gw/data"));
        assert_eq!(c.keystore.kek_file, Path::new("/etc/gw/kek.key"));
        assert_eq!(c.tls.as_ref().unwrap().ca, Path::new("/etc/gw/tls/ca.crt"));
        assert_eq!(c.destination.len(), 3);
        match &c.destination[2].kind {
            DestinationKind::Folder { path } => assert_eq!(path, Path::new("/etc/gw/received")),
            other => panic!("unexpected {other:?}"),
        }
        match &c.destination[0].kind {
            DestinationKind::Gateway { max_in_flight, .. } => assert_eq!(*max_in_flight, 32),
            other => panic!("unexpected {other:?}"),
        }
    }

    fn err(text: &str) -> String {
        parse(text).expect_err("must be rejected").to_string()
    }

    /// `GOOD` with `[dicom_listener.tls]` lines after the listener and
    /// `[destination.tls]` lines after the `pacs` destination.
    fn with_dicom_tls(listener: &str, destination: &str) -> String {
        GOOD.replace(
            "route_to = [\"site-b\"]\n[[link_listener]]",
            &format!(
                "route_to = [\"site-b\"]\n[dicom_listener.tls]\n{listener}\n[[link_listener]]"
            ),
        )
        .replace(
            "calling_ae_title = \"GW_B\"\n",
            &format!("calling_ae_title = \"GW_B\"\n[destination.tls]\n{destination}\n"),
        )
    }

    #[test]
    fn dicom_tls_sections_parse_resolve_and_refuse_what_cannot_work() {
        let listener = "cert = \"d/gw.crt\"\nkey = \"d/gw.key\"\nca = \"d/ca.crt\"\n\
                        bind_ae_titles = { CT1 = \"ct1.example.org\" }";
        let dest = "ca = \"d/ca.crt\"\nserver_name = \"pacs.example.org\"";
        let c = parse(&with_dicom_tls(listener, dest)).expect("valid DICOM TLS");
        let t = c.dicom_listener[0].tls.as_ref().expect("listener tls");
        assert_eq!(t.cert, Path::new("/etc/gw/d/gw.crt"));
        assert_eq!(t.ca.as_deref(), Some(Path::new("/etc/gw/d/ca.crt")));
        assert_eq!(t.client_auth, ClientAuth::Required);
        assert_eq!(t.min_version, TlsMinVersion::Tls12);
        assert_eq!(t.bind_ae_titles["CT1"], "ct1.example.org");
        match &c.destination[1].kind {
            DestinationKind::Dicom { tls: Some(t), .. } => {
                assert_eq!(t.ca, Path::new("/etc/gw/d/ca.crt"));
                assert_eq!(t.server_name.as_deref(), Some("pacs.example.org"));
            }
            other => panic!("unexpected {other:?}"),
        }
        // An IP address names no certificate: server_name is then needed.
        let e = err(&with_dicom_tls(listener, "ca = \"d/ca.crt\""));
        assert!(e.contains("tls.server_name"), "{e}");
        // Client certificates need a CA to be verified against.
        let e = err(&with_dicom_tls("cert = \"a\"\nkey = \"b\"", dest));
        assert!(e.contains("tls.ca"), "{e}");
        // A binding needs client certificates.
        let e = err(&with_dicom_tls(
            &format!("{listener}\nclient_auth = \"none\""),
            dest,
        ));
        assert!(e.contains("bind_ae_titles"), "{e}");
        // A wildcard is no identity.
        let e = err(&with_dicom_tls(
            &listener.replace("ct1.example.org", "*.example.org"),
            dest,
        ));
        assert!(e.contains("bind_ae_titles"), "{e}");
        // A client certificate without its key.
        let e = err(&with_dicom_tls(listener, &format!("{dest}\ncert = \"c\"")));
        assert!(e.contains("tls.cert"), "{e}");
        // Only TLS 1.2 and 1.3 exist here.
        let e = err(&with_dicom_tls(
            &format!("{listener}\nmin_version = \"1.0\""),
            dest,
        ));
        assert!(e.contains("1.0") || e.contains("min_version"), "{e}");
    }

    #[test]
    fn log_format_defaults_to_text_and_rejects_other_words() {
        assert_eq!(parse(GOOD).unwrap().log.format, LogFormat::Text);
        let c = parse(&format!("{GOOD}\n[log]\nformat = \"json\"\n")).unwrap();
        assert_eq!(c.log.format, LogFormat::Json);
        let e = err(&format!("{GOOD}\n[log]\nformat = \"xml\"\n"));
        assert!(e.contains("xml") || e.contains("format"), "{e}");
    }

    #[test]
    fn unknown_top_level_key_is_named() {
        let e = err(&format!("{GOOD}\n[bogus]\nx = 1\n"));
        assert!(e.contains("site-a.toml"), "{e}");
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn unknown_key_in_a_destination_is_named() {
        let e = err(&GOOD.replace("path = \"received\"", "path = \"received\"\ncolour = 1"));
        assert!(e.contains("colour"), "{e}");
    }

    #[test]
    fn unknown_key_in_a_listener_is_named() {
        let e = err(&GOOD.replace(
            "ae_title = \"GW_A\"",
            "ae_title = \"GW_A\"\nae_tittle = \"X\"",
        ));
        assert!(e.contains("ae_tittle"), "{e}");
    }

    #[test]
    fn unknown_destination_kind() {
        let e = err(&GOOD.replace("kind = \"folder\"", "kind = \"s3\""));
        assert!(e.contains("s3"), "{e}");
    }

    #[test]
    fn key_of_another_kind_is_named() {
        let e = err(&GOOD.replace(
            "path = \"received\"",
            "path = \"received\"\nae_title = \"X\"",
        ));
        assert!(e.contains("ae_title") && e.contains("folder"), "{e}");
        let e = err(&GOOD.replace("peer_name = \"site-b\"", ""));
        assert!(e.contains("peer_name"), "{e}");
    }

    #[test]
    fn route_to_unknown_destination_names_key_and_value() {
        let e = err(&GOOD.replace("route_to = [\"site-b\"]", "route_to = [\"nowhere\"]"));
        assert!(e.contains("dicom_listener[lan].route_to"), "{e}");
        assert!(e.contains("nowhere"), "{e}");
        assert!(e.contains("site-a.toml"), "{e}");
    }

    #[test]
    fn bad_ae_title() {
        let e = err(&GOOD.replace("ae_title = \"GW_A\"", "ae_title = \"THIS_IS_TOO_LONG_AE\""));
        assert!(e.contains("dicom_listener[lan].ae_title"), "{e}");
        let e = err(&GOOD.replace("ae_title = \"PACS\"", "ae_title = \"PA\\\\CS\""));
        assert!(e.contains("destination[pacs].ae_title"), "{e}");
    }

    #[test]
    fn bad_url_and_peer_name() {
        let e = err(&GOOD.replace("https://gw-b.example.org:8443", "http://gw-b:8443"));
        assert!(e.contains("destination[site-b].url"), "{e}");
        let e = err(&GOOD.replace("peer_name = \"site-b\"", "peer_name = \"not a name\""));
        assert!(e.contains("destination[site-b].peer_name"), "{e}");
    }

    #[test]
    fn peer_identities_are_dns_names_or_spiffe_ids() {
        assert!(is_spiffe_id("spiffe://example.org/gw/site-a"));
        assert!(is_spiffe_id("spiffe://example.org"));
        for bad in [
            "spiffe://Example.org/x",
            "spiffe:///x",
            "spiffe://example.org/a//b",
            "spiffe://example.org/../x",
            "spiffe://example.org/x?y",
            "https://example.org/x",
        ] {
            assert!(!is_spiffe_id(bad), "{bad}");
        }
        assert!(!is_dns_name("*.example.org"));
        assert!(!is_dns_name("site-a."));
    }

    #[test]
    fn wrong_type_and_missing_key() {
        let e = err(&GOOD.replace("listen = \"127.0.0.1:9464\"", "listen = 9464"));
        assert!(e.contains("listen"), "{e}");
        let e = err(&GOOD.replace("kek_file = \"kek.key\"", ""));
        assert!(e.contains("kek_file"), "{e}");
    }

    #[test]
    fn route_to_the_same_destination_twice_is_refused() {
        let e = err(&GOOD.replace("route_to = [\"pacs\"]", "route_to = [\"pacs\", \"pacs\"]"));
        assert!(e.contains("link_listener[wan].route_to"), "{e}");
        assert!(e.contains("twice"), "{e}");
    }

    #[test]
    fn retry_table_reads_durations_and_legacy_keys_still_work() {
        let c = parse(&GOOD.replace(
            "calling_ae_title = \"GW_B\"",
            "calling_ae_title = \"GW_B\"\nretry = { initial = \"2s\", max_delay = \"1h\", max_attempts = 3, max_age = \"2d\" }",
        ))
        .unwrap();
        let r = c.destination[1].retry;
        assert_eq!(r.initial, Duration::from_secs(2));
        assert_eq!(r.max_delay, Duration::from_secs(3600));
        assert_eq!(r.max_attempts, 3);
        assert_eq!(r.max_age, Duration::from_secs(2 * 86400));
        let c = parse(&GOOD.replace(
            "calling_ae_title = \"GW_B\"",
            "calling_ae_title = \"GW_B\"\nretry_initial_ms = 250\nretry_max_ms = 4000",
        ))
        .unwrap();
        let r = c.destination[1].retry;
        assert_eq!(r.initial, Duration::from_millis(250));
        assert_eq!(r.max_delay, Duration::from_secs(4));
        let e = err(&GOOD.replace(
            "calling_ae_title = \"GW_B\"",
            "calling_ae_title = \"GW_B\"\nretry = { initial = \"soon\" }",
        ));
        assert!(e.contains("initial") || e.contains("soon"), "{e}");
        let e = err(&GOOD.replace(
            "calling_ae_title = \"GW_B\"",
            "calling_ae_title = \"GW_B\"\nretry = { max_attempts = 0 }",
        ));
        assert!(e.contains("destination[pacs].retry.max_attempts"), "{e}");
    }

    const HL7: &str = r#"
[[hl7_listener]]
name = "ris-in"
listen = "0.0.0.0:2575"
route_to = ["site-b"]
[[destination]]
name = "ris"
kind = "hl7"
address = "10.0.0.9:2575"
"#;

    #[test]
    fn hl7_listeners_and_destinations_parse_with_defaults() {
        let c = parse(&format!("{GOOD}{HL7}")).expect("valid");
        let l = &c.hl7_listener[0];
        assert_eq!(l.max_message_size.as_u64(), 1 << 20);
        assert_eq!(l.timeout, Duration::from_secs(60));
        assert_eq!(l.max_connections, 32);
        let d = c.destination.iter().find(|d| d.name == "ris").unwrap();
        assert!(matches!(&d.kind, DestinationKind::Hl7 { address } if address == "10.0.0.9:2575"));
        assert!(d.kind.carries(Protocol::Hl7) && !d.kind.carries(Protocol::Dicom));
        // A link listener may name DICOM and HL7 destinations together.
        assert!(
            parse(
                &format!("{GOOD}{HL7}")
                    .replace("route_to = [\"pacs\"]", "route_to = [\"pacs\", \"ris\"]")
            )
            .is_ok()
        );
    }

    /// HL7 to a DICOM destination, or DICOM to an HL7 one, is a configuration error naming
    /// the key and the destination.
    #[test]
    fn a_protocol_routed_to_a_destination_that_cannot_take_it_is_refused() {
        let text = format!("{GOOD}{HL7}");
        let e = err(&text.replace(
            "route_to = [\"site-b\"]\n[[destination]]\nname = \"ris\"",
            "route_to = [\"pacs\"]\n[[destination]]\nname = \"ris\"",
        ));
        assert!(
            e.contains("hl7_listener[ris-in].route_to") && e.contains("pacs"),
            "{e}"
        );
        let e = err(&text.replacen("route_to = [\"site-b\"]", "route_to = [\"ris\"]", 1));
        assert!(
            e.contains("dicom_listener[lan].route_to") && e.contains("ris"),
            "{e}"
        );
        let e = err(&format!(
            "{text}[[route]]\nname = \"r\"\nmodalities = [\"CT\"]\nto = [\"ris\"]\n"
        ));
        assert!(e.contains("route[r].to"), "{e}");
        let e = err(&text.replace(
            "route_to = [\"site-b\"]\n[[destination]]\nname = \"ris\"",
            "route_to = []\n[[destination]]\nname = \"ris\"",
        ));
        assert!(e.contains("hl7_listener[ris-in].route_to"), "{e}");
        let e = err(&text.replace(
            "listen = \"0.0.0.0:2575\"",
            "listen = \"0.0.0.0:2575\"\nmax_message_size = \"64MiB\"",
        ));
        assert!(e.contains("hl7_listener[ris-in].max_message_size"), "{e}");
        let e = err(&text.replace("name = \"ris-in\"", "name = \"lan\""));
        assert!(e.contains("duplicate listener name"), "{e}");
        let e = err(&text.replace("address = \"10.0.0.9:2575\"", "path = \"x\""));
        assert!(e.contains("path") && e.contains("hl7"), "{e}");
    }

    #[test]
    fn duplicate_destination() {
        let e = err(&GOOD.replace("name = \"handoff\"", "name = \"pacs\""));
        assert!(e.contains("duplicate destination"), "{e}");
    }

    #[test]
    fn link_listener_needs_peers() {
        let e = err(&GOOD.replace("allowed_peers = [\"site-b\"]", "allowed_peers = []"));
        assert!(e.contains("link_listener[wan].allowed_peers"), "{e}");
    }

    #[test]
    fn the_deploy_examples_are_valid() {
        for (name, text) in [
            (
                "site-a.toml",
                include_str!("../../deploy/examples/site-a.toml"),
            ),
            (
                "site-b.toml",
                include_str!("../../deploy/examples/site-b.toml"),
            ),
            (
                "k8s site-a gateway.toml",
                include_str!("../../deploy/k8s/overlays/site-a/gateway.toml"),
            ),
            (
                "k8s site-b gateway.toml",
                include_str!("../../deploy/k8s/overlays/site-b/gateway.toml"),
            ),
        ] {
            Config::parse(text, Path::new(name), Path::new("/etc/dicom-gateway"))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn human_readable_sizes_and_durations() {
        let c = parse(&format!(
            "{GOOD}\n[spool]\nsegment_size = \"512KiB\"\nmax_object_size = \"4GiB\"\ndedup_window = \"2d 12h\"\n"
        ))
        .expect("valid");
        assert_eq!(c.spool.segment_bytes, 512 * 1024);
        assert_eq!(c.spool.max_object_bytes, 4 << 30);
        assert_eq!(c.spool.dedup_window_secs, 60 * 3600);
        assert!(c.deprecated_keys().is_empty());
        let c = parse(&GOOD.replace(
            "ae_title = \"GW_A\"",
            "ae_title = \"GW_A\"\ntimeout = \"2m\"",
        ))
        .expect("valid");
        assert_eq!(c.dicom_listener[0].timeout_secs, 120);
        // Defaults.
        let c = parse(GOOD).expect("valid");
        assert_eq!(c.spool.segment_bytes, 1 << 20);
        assert_eq!(c.spool.dedup_window_secs, 7 * 24 * 3600);
        assert_eq!(c.dicom_listener[0].timeout_secs, 60);
    }

    #[test]
    fn old_integer_keys_are_accepted_and_reported_deprecated() {
        let c = parse(&format!(
            "{GOOD}\n[spool]\nsegment_bytes = 65536\nmax_object_bytes = 1048576\ndedup_window_secs = 60\n"
        ))
        .expect("old keys still work");
        assert_eq!(
            (
                c.spool.segment_bytes,
                c.spool.max_object_bytes,
                c.spool.dedup_window_secs
            ),
            (65536, 1048576, 60)
        );
        let c = parse(&GOOD.replace(
            "ae_title = \"GW_A\"",
            "ae_title = \"GW_A\"\ntimeout_secs = 5",
        ))
        .expect("old key still works");
        assert_eq!(c.dicom_listener[0].timeout_secs, 5);
        assert_eq!(
            c.deprecated_keys(),
            vec![("dicom_listener[lan].timeout_secs".to_owned(), "timeout")]
        );
    }

    #[test]
    fn both_forms_of_a_key_or_a_bad_value_are_errors() {
        let e = err(&format!(
            "{GOOD}\n[spool]\nsegment_bytes = 65536\nsegment_size = \"64KiB\"\n"
        ));
        assert!(e.contains("segment_size") && e.contains("not both"), "{e}");
        let e = err(&format!("{GOOD}\n[spool]\ndedup_window = \"a week\"\n"));
        assert!(e.contains("dedup_window"), "{e}");
        let e = err(&format!("{GOOD}\n[spool]\nsegment_size = \"9MiB\"\n"));
        assert!(e.contains("spool.segment_size"), "{e}");
        let e = err(&GOOD.replace(
            "ae_title = \"GW_A\"",
            "ae_title = \"GW_A\"\ntimeout = \"100ms\"",
        ));
        assert!(e.contains("dicom_listener[lan].timeout"), "{e}");
        let e = err(&format!("{GOOD}\n[spool]\nsegment_sise = \"1MiB\"\n"));
        assert!(e.contains("segment_sise"), "{e}");
    }

    #[test]
    fn urls() {
        assert_eq!(
            parse_https_url("https://gw:8443").unwrap(),
            ("gw".to_owned(), 8443)
        );
        assert_eq!(
            parse_https_url("https://127.0.0.1:1/").unwrap(),
            ("127.0.0.1".to_owned(), 1)
        );
        assert_eq!(
            parse_https_url("https://[::1]:9").unwrap(),
            ("::1".to_owned(), 9)
        );
        assert!(parse_https_url("https://gw:99999").is_err());
        assert!(parse_https_url("https://gw:1/path").is_err());
    }
}
