//! Every metric the gateway exports, in one place, so a dashboard change is one diff.
//!
//! Names follow Prometheus conventions: prefix `dicom_gateway_`, base units (seconds, bytes),
//! `_total` for counters, `_timestamp_seconds` for points in time. The catalogue is the one
//! of tracker issue 9; `CHANGELOG.md` lists the names that changed from the spine's.
//!
//! Invariant: label sets are bounded. A label value is a configuration name (listener,
//! destination), one of the fixed words of this file (result, status, reason, stage,
//! operation, certificate, protocol), or the build's version. Never a UID, an AE title or
//! address from a peer, or anything read from a data set or an HL7 message.
//!
//! The `protocol` label (`dicom`, `hl7`: [`PROTOCOLS`]) is on the ingest metrics a link
//! listener shares between the protocols (`received_objects_total`, `received_bytes_total`,
//! `store_duration_seconds`): their other labels cannot tell DICOM from HL7 there. It is
//! not on metrics whose labels already say the protocol: the per-protocol ones
//! (`cstore_responses_total`, `link_parts_total`, `uid_mismatch_total`: DICOM;
//! `hl7_messages_total`: HL7), connection counts (one link connection carries both), and
//! the per-destination ones of `dicom`, `folder` and `hl7` destinations, whose kind takes
//! one protocol. (A `gateway` destination carries both; splitting its delivery metrics by
//! protocol is the dispatcher's to do, which alone knows an entry's protocol when it
//! counts.)
//!
//! Values that are cheap to read but not pushed by the code that owns them (disk space,
//! RocksDB's counters) are refreshed at scrape time by the hooks registered with
//! [`Metrics::on_scrape`] (see [`crate::observe`]).

use std::sync::Mutex;

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The values of the `protocol` label.
pub const PROTOCOLS: &[&str] = &["dicom", "hl7"];

/// A metric vector whose last label is `protocol`. [`ByProtocol::with_label_values`] takes
/// the other labels and is the `dicom` series, so that the DICOM paths (C-STORE, STOW-RS)
/// read as for any vector; HL7 paths name theirs with [`ByProtocol::protocol`].
#[derive(Clone)]
pub struct ByProtocol<V>(V);

/// The vectors [`ByProtocol`] wraps.
pub trait LabelledVec {
    /// One series.
    type Series;
    /// The series of `labels` (all of them).
    fn series(&self, labels: &[&str]) -> Self::Series;
}

impl LabelledVec for IntCounterVec {
    type Series = IntCounter;
    fn series(&self, labels: &[&str]) -> IntCounter {
        self.with_label_values(labels)
    }
}

impl LabelledVec for HistogramVec {
    type Series = Histogram;
    fn series(&self, labels: &[&str]) -> Histogram {
        self.with_label_values(labels)
    }
}

impl<V: LabelledVec> ByProtocol<V> {
    /// The `protocol="dicom"` series of `labels` (the labels before `protocol`).
    pub fn with_label_values(&self, labels: &[&str]) -> V::Series {
        self.protocol("dicom", labels)
    }

    /// The series of `labels` and `protocol` (one of [`PROTOCOLS`]).
    pub fn protocol(&self, protocol: &str, labels: &[&str]) -> V::Series {
        let mut all = labels.to_vec();
        all.push(protocol);
        self.0.series(&all)
    }
}

/// A hook run before each scrape to refresh gauges.
type ScrapeHook = Box<dyn Fn(&Metrics) + Send + Sync>;

/// The gateway's metrics and their registry.
pub struct Metrics {
    registry: Registry,
    hooks: Mutex<Vec<ScrapeHook>>,

    // ---------------------------------------------------------------- ingest
    /// `received_objects_total{listener,protocol}`: objects (DICOM) and messages (HL7)
    /// accepted after a synced commit, by DICOM, HL7 and link listeners (an identical
    /// re-send is not counted twice).
    pub received_objects: ByProtocol<IntCounterVec>,
    /// `received_bytes_total{listener,protocol}`: bytes of those objects and messages.
    pub received_bytes: ByProtocol<IntCounterVec>,
    /// `cstore_responses_total{listener,status}`: C-STORE responses sent, by
    /// [`cstore_status`] word.
    pub cstore_responses: IntCounterVec,
    /// `link_parts_total{listener,result}`: STOW-RS parts answered by a link listener
    /// (`stored`, `duplicate`, `conflict`, `bad_request`, `unavailable`, `timeout`).
    pub link_parts: IntCounterVec,
    /// `hl7_messages_total{listener,result}`: HL7 v2 messages answered by an HL7 listener
    /// (ACK) or a link listener (HTTP status), by [`HL7_RESULTS`] word: `accepted` (AA or
    /// 200 after a synced commit), `duplicate` (an identical re-send, nothing stored
    /// twice), `rejected` (AR / 4xx: malformed or unsupported), `too_large`, `conflict`
    /// (the same control id or transfer with other content), `error` (AE / 503: not stored
    /// now, e.g. the disk under its watermark).
    pub hl7_messages: IntCounterVec,
    /// `associations_total{listener,result}`: DICOM associations and link connections
    /// (`accepted`, `rejected`, `timeout`, `over_limit`, `handshake_failed`: a link or
    /// DICOM TLS handshake that failed).
    pub associations: IntCounterVec,
    /// `associations_active{listener}`: associations and link connections open now.
    pub associations_active: IntGaugeVec,
    /// `store_duration_seconds{listener,protocol}`: from the last PDV (or the end of a link
    /// part, or of an HL7 message) to the response being sent: the ack latency, including
    /// the fsync.
    pub store_duration: ByProtocol<HistogramVec>,
    /// `uid_mismatch_total{listener}`: objects refused because the data set's SOP Class or
    /// Instance UID differs from the C-STORE command (0xA900).
    pub uid_mismatch: IntCounterVec,

    // ---------------------------------------------------- relay and delivery
    /// `forwarded_objects_total{destination}`: objects the destination confirmed.
    pub forwarded_objects: IntCounterVec,
    /// `forwarded_bytes_total{destination}`: bytes of those objects.
    pub forwarded_bytes: IntCounterVec,
    /// `forward_failures_total{destination,reason}`: failed send attempts. Reasons are a
    /// fixed set chosen by the dispatcher (today `transient`, `permanent`).
    pub forward_failures: IntCounterVec,
    /// `forward_duration_seconds{destination}`: one send attempt that succeeded, from opening
    /// the object to the destination's confirmation. Not wired yet (dispatcher).
    pub forward_duration: HistogramVec,
    /// `end_to_end_seconds{destination}`: from receipt at this node to the destination's
    /// confirmation. On the first node of a chain this is receipt to the peer's synced commit.
    pub end_to_end: HistogramVec,
    /// `queue_objects{destination}`: objects waiting (dead letters not included).
    pub queue_objects: IntGaugeVec,
    /// `queue_bytes{destination}`: bytes waiting. Not wired yet (dispatcher).
    pub queue_bytes: IntGaugeVec,
    /// `queue_oldest_age_seconds{destination}`: age of the oldest waiting object, 0 when the
    /// queue is empty. Not wired yet (dispatcher).
    pub queue_oldest_age: GaugeVec,
    /// `dead_letter_objects{destination}`: objects refused permanently and kept for an
    /// operator.
    pub dead_letter_objects: IntGaugeVec,
    /// `circuit_open{destination}`: 1 while sends to the destination are suspended, else 0.
    /// Not wired yet (dispatcher).
    pub circuit_open: IntGaugeVec,

    // -------------------------------------------------------------- security
    /// `tls_handshake_failures_total{listener,reason}`: failed TLS handshakes on a link
    /// listener or a DICOM TLS listener, by [`tls_failure_reason`] word.
    pub tls_handshake_failures: IntCounterVec,
    /// `certificate_expiry_timestamp_seconds{certificate}`: notAfter of the node's certificate
    /// (`node`) and of each CA certificate it trusts (`ca`, the earliest), and of each DICOM
    /// TLS listener's and destination's certificate and CA (`dicom_listener/NAME`,
    /// `dicom_listener/NAME/ca`, `destination/NAME`, `destination/NAME/ca`).
    pub certificate_expiry: GaugeVec,
    /// `crl_next_update_timestamp_seconds{crl}`: the earliest nextUpdate of each configured
    /// CRL file (`crl` = its file name).
    pub crl_next_update: GaugeVec,
    /// `integrity_failures_total{stage}`: a digest or authentication tag that did not match
    /// (`link_digest`: a STOW part whose Content-Digest differs; `spool`: a segment that failed
    /// to open on delivery; `verify`: an object that failed `dicom-gateway verify`).
    pub integrity_failures: IntCounterVec,
    /// `kek_operations_total{operation,kek_version}`: key-encryption-key operations on study
    /// keys: `wrap` (a new study key), `rewrap` (a stored key moved to the newest KEK
    /// version), `unwrap` (a study key loaded; cached keys are not counted again), `shred` (a
    /// study key deleted), each under the newest KEK version at the time. Refreshed from the
    /// spool at scrape time.
    pub kek_operations: IntCounterVec,
    /// `kek_wrapped_keys{kek_version}`: stored keys (study keys and the index key) wrapped
    /// under each KEK version, as last counted by the rotation task (every 30 s). After a
    /// `keys rotate`, the older versions fall to 0 as the rewrap moves them.
    pub kek_wrapped_keys: IntGaugeVec,

    // --------------------------------------------------------------- storage
    /// `disk_free_bytes`: bytes available to the gateway on the data directory's volume.
    pub disk_free_bytes: IntGauge,
    /// `db_background_error`: 1 once RocksDB reported a background error (it is then
    /// read-only until restarted), else 0.
    pub db_background_error: IntGauge,
    /// `db_size_bytes`: bytes in RocksDB's SST and blob files.
    pub db_size_bytes: IntGauge,
    /// `db_pending_compaction_bytes`: bytes RocksDB estimates compaction still has to rewrite.
    pub db_pending_compaction_bytes: IntGauge,
    /// `tls_reloads_total{listener,result}`: reloads of the certificate, key, CA and CRL
    /// files (`ok`, `failed`), by a link or DICOM TLS listener (its name), the sender
    /// towards peer gateways (`sender`), or a `dicom` destination with TLS (its name).
    pub tls_reloads: IntCounterVec,
    /// `build_info{version}`: always 1.
    pub build_info: IntGaugeVec,
}

/// Ack latency buckets: an fsync is 0.1 to 20 ms on most disks.
const STORE_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// One send: milliseconds on a LAN to minutes for a large object over a slow link.
const FORWARD_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
/// End to end: includes time queued while a link is down (hours).
const END_TO_END_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0,
];

/// The word for a C-STORE status in `cstore_responses_total{status}` (a bounded set).
pub fn cstore_status(code: u16) -> &'static str {
    match code {
        0x0000 => "success",
        0xB000..=0xBFFF | 0x0107 | 0x0116 => "warning",
        0xA700..=0xA7FF => "out_of_resources",
        0xA900..=0xA9FF => "dataset_mismatch",
        0xC000..=0xCFFF => "cannot_understand",
        0x0115 => "invalid_argument",
        0x0110 => "processing_failure",
        0x0122 => "sop_class_not_supported",
        0x0211 => "unrecognized_operation",
        _ => "other_failure",
    }
}

/// Every word [`tls_failure_reason`] returns, plus `timeout` (created at zero per link
/// listener, so that `increase()` sees the first failure).
pub const TLS_FAILURE_REASONS: &[&str] = &[
    "eof",
    "io",
    "timeout",
    "no_certificate",
    "unknown_ca",
    "peer_not_allowed",
    "certificate_expired",
    "certificate_revoked",
    "bad_certificate",
    "protocol_version",
    "incompatible",
    "bad_signature",
    "alert_received",
    "protocol_error",
    "other",
];

/// The `result` words of `hl7_messages_total`.
pub const HL7_RESULTS: &[&str] = &[
    "accepted",
    "duplicate",
    "rejected",
    "too_large",
    "conflict",
    "error",
];

/// The word for a failed TLS handshake in `tls_handshake_failures_total{reason}`.
pub fn tls_failure_reason(e: &std::io::Error) -> &'static str {
    use rustls::{CertificateError, Error, PeerIncompatible, PeerMisbehaved};
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<Error>()) else {
        return match e.kind() {
            std::io::ErrorKind::UnexpectedEof => "eof",
            _ => "io",
        };
    };
    match tls {
        Error::NoCertificatesPresented => "no_certificate",
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => "unknown_ca",
        Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure) => {
            "peer_not_allowed"
        }
        Error::InvalidCertificate(
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. },
        ) => "certificate_expired",
        Error::InvalidCertificate(CertificateError::Revoked) => "certificate_revoked",
        Error::InvalidCertificate(_) => "bad_certificate",
        Error::PeerIncompatible(PeerIncompatible::SupportedVersionsExtensionRequired) => {
            "protocol_version"
        }
        Error::PeerIncompatible(_) => "incompatible",
        Error::PeerMisbehaved(PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme) => {
            "bad_signature"
        }
        Error::AlertReceived(_) => "alert_received",
        Error::InvalidMessage(_)
        | Error::InappropriateMessage { .. }
        | Error::InappropriateHandshakeMessage { .. }
        | Error::PeerMisbehaved(_) => "protocol_error",
        _ => "other",
    }
}

impl Metrics {
    /// Create and register every metric.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let name = |n: &str| format!("dicom_gateway_{n}");
        let reg = |c: Box<dyn prometheus::core::Collector>| {
            registry.register(c).expect("metric registered once");
        };
        let cv = |n: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name(n), help), labels)
                .expect("static metric definition");
            reg(Box::new(c.clone()));
            c
        };
        let gv = |n: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name(n), help), labels)
                .expect("static metric definition");
            reg(Box::new(g.clone()));
            g
        };
        let fgv = |n: &str, help: &str, labels: &[&str]| {
            let g =
                GaugeVec::new(Opts::new(name(n), help), labels).expect("static metric definition");
            reg(Box::new(g.clone()));
            g
        };
        let g = |n: &str, help: &str| {
            let g =
                IntGauge::with_opts(Opts::new(name(n), help)).expect("static metric definition");
            reg(Box::new(g.clone()));
            g
        };
        let hv = |n: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            let h = HistogramVec::new(
                HistogramOpts::new(name(n), help).buckets(buckets.to_vec()),
                labels,
            )
            .expect("static metric definition");
            reg(Box::new(h.clone()));
            h
        };
        // The ingest metrics a link listener shares between the protocols.
        let received_objects = cv(
            "received_objects_total",
            "Objects (DICOM) and messages (HL7) accepted after a synced commit",
            &["listener", "protocol"],
        );
        let received_bytes = cv(
            "received_bytes_total",
            "Bytes of objects and messages accepted after a synced commit",
            &["listener", "protocol"],
        );
        let store_duration = hv(
            "store_duration_seconds",
            "Seconds from the last data received to the response sent (ack latency, with fsync)",
            &["listener", "protocol"],
            STORE_BUCKETS,
        );
        let forwarded_objects = cv(
            "forwarded_objects_total",
            "Objects the destination confirmed",
            &["destination"],
        );
        let forwarded_bytes = cv(
            "forwarded_bytes_total",
            "Bytes of objects the destination confirmed",
            &["destination"],
        );
        let forward_failures = cv(
            "forward_failures_total",
            "Failed send attempts",
            &["destination", "reason"],
        );
        let end_to_end = hv(
            "end_to_end_seconds",
            "Seconds from receipt at this node to the destination's confirmation",
            &["destination"],
            END_TO_END_BUCKETS,
        );
        let queue_objects = gv(
            "queue_objects",
            "Objects waiting for a destination (dead letters excluded)",
            &["destination"],
        );
        let dead_letter_objects = gv(
            "dead_letter_objects",
            "Objects refused permanently and kept for an operator",
            &["destination"],
        );
        let build_info = gv(
            "build_info",
            "Always 1; the version is a label",
            &["version"],
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        Metrics {
            received_objects: ByProtocol(received_objects),
            received_bytes: ByProtocol(received_bytes),
            cstore_responses: cv(
                "cstore_responses_total",
                "C-STORE responses sent",
                &["listener", "status"],
            ),
            link_parts: cv(
                "link_parts_total",
                "STOW-RS parts answered by a link listener",
                &["listener", "result"],
            ),
            hl7_messages: cv(
                "hl7_messages_total",
                "HL7 v2 messages answered by an HL7 or link listener",
                &["listener", "result"],
            ),
            associations: cv(
                "associations_total",
                "Incoming DICOM associations and link connections",
                &["listener", "result"],
            ),
            associations_active: gv(
                "associations_active",
                "DICOM associations and link connections open now",
                &["listener"],
            ),
            store_duration: ByProtocol(store_duration),
            uid_mismatch: cv(
                "uid_mismatch_total",
                "Objects refused because the data set's SOP UIDs differ from the command",
                &["listener"],
            ),
            forward_duration: hv(
                "forward_duration_seconds",
                "Seconds of one successful send, from opening the object to confirmation",
                &["destination"],
                FORWARD_BUCKETS,
            ),
            queue_bytes: gv(
                "queue_bytes",
                "Bytes waiting for a destination",
                &["destination"],
            ),
            queue_oldest_age: fgv(
                "queue_oldest_age_seconds",
                "Age of the oldest object waiting for a destination (0 if none)",
                &["destination"],
            ),
            circuit_open: gv(
                "circuit_open",
                "1 while sends to the destination are suspended",
                &["destination"],
            ),
            tls_handshake_failures: cv(
                "tls_handshake_failures_total",
                "Failed TLS handshakes on link and DICOM TLS listeners",
                &["listener", "reason"],
            ),
            certificate_expiry: fgv(
                "certificate_expiry_timestamp_seconds",
                "notAfter of the node's certificate and CA, and of each DICOM TLS listener's and destination's certificate and CA, in Unix seconds",
                &["certificate"],
            ),
            crl_next_update: fgv(
                "crl_next_update_timestamp_seconds",
                "nextUpdate of each configured CRL, in Unix seconds",
                &["crl"],
            ),
            integrity_failures: cv(
                "integrity_failures_total",
                "Digests or authentication tags that did not match",
                &["stage"],
            ),
            kek_operations: cv(
                "kek_operations_total",
                "Key-encryption-key operations",
                &["operation", "kek_version"],
            ),
            kek_wrapped_keys: gv(
                "kek_wrapped_keys",
                "Stored keys wrapped under each KEK version",
                &["kek_version"],
            ),
            disk_free_bytes: g(
                "disk_free_bytes",
                "Bytes available on the data directory's volume",
            ),
            db_background_error: g(
                "db_background_error",
                "1 once RocksDB reported a background error (read-only until restart)",
            ),
            db_size_bytes: g("db_size_bytes", "Bytes in RocksDB's SST and blob files"),
            db_pending_compaction_bytes: g(
                "db_pending_compaction_bytes",
                "Bytes RocksDB estimates compaction still has to rewrite",
            ),
            forwarded_objects,
            forwarded_bytes,
            forward_failures,
            end_to_end,
            queue_objects,
            dead_letter_objects,
            build_info,
            tls_reloads: cv(
                "tls_reloads_total",
                "Reloads of the TLS certificate, key, CA and CRL files, by link or DICOM TLS listener, by the sender towards peer gateways (listener=\"sender\"), or by a dicom destination with TLS (its name)",
                &["listener", "result"],
            ),
            hooks: Mutex::new(Vec::new()),
            registry,
        }
    }

    /// Run `hook` before every scrape (to refresh gauges read from elsewhere). It must be
    /// quick and must not block on I/O beyond a `statvfs`.
    pub fn on_scrape(&self, hook: impl Fn(&Metrics) + Send + Sync + 'static) {
        if let Ok(mut h) = self.hooks.lock() {
            h.push(Box::new(hook));
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        if let Ok(hooks) = self.hooks.lock() {
            for h in hooks.iter() {
                h(self);
            }
        }
        let mut buf = Vec::new();
        let enc = TextEncoder::new();
        if enc.encode(&self.registry.gather(), &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Holds a gauge one higher while it lives (an open association): dropping it at any
/// `.await` still decrements.
pub struct ActiveGuard(IntGauge);

impl ActiveGuard {
    /// Increment `gauge` until the guard is dropped.
    pub fn new(gauge: IntGauge) -> ActiveGuard {
        gauge.inc();
        ActiveGuard(gauge)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        let m = Metrics::new();
        // One series of each vector, so that every family is gathered.
        for c in [&m.received_objects, &m.received_bytes] {
            c.with_label_values(&["x"]).inc();
            c.protocol("hl7", &["x"]).inc();
        }
        for c in [&m.uid_mismatch, &m.forwarded_objects, &m.forwarded_bytes] {
            c.with_label_values(&["x"]).inc();
        }
        for c in [
            &m.cstore_responses,
            &m.link_parts,
            &m.hl7_messages,
            &m.associations,
            &m.forward_failures,
            &m.tls_handshake_failures,
            &m.kek_operations,
        ] {
            c.with_label_values(&["x", "y"]).inc();
        }
        m.integrity_failures.with_label_values(&["x"]).inc();
        for g in [
            &m.associations_active,
            &m.queue_objects,
            &m.queue_bytes,
            &m.dead_letter_objects,
            &m.circuit_open,
        ] {
            g.with_label_values(&["x"]).set(1);
        }
        for g in [
            &m.queue_oldest_age,
            &m.certificate_expiry,
            &m.crl_next_update,
        ] {
            g.with_label_values(&["x"]).set(1.0);
        }
        m.store_duration.protocol("hl7", &["x"]).observe(1.0);
        for h in [&m.forward_duration, &m.end_to_end] {
            h.with_label_values(&["x"]).observe(1.0);
        }
        let families = m.registry.gather();
        assert_eq!(families.len(), 29, "one family per metric of the catalogue");
        for f in families {
            let n = f.name();
            assert!(n.starts_with("dicom_gateway_"), "{n}");
            match f.get_field_type() {
                prometheus::proto::MetricType::COUNTER => assert!(n.ends_with("_total"), "{n}"),
                _ => assert!(!n.ends_with("_total"), "{n}"),
            }
            assert!(
                !n.contains("millis") && !n.contains("_ms"),
                "{n}: base units"
            );
        }
    }

    #[test]
    fn the_protocol_label_defaults_to_dicom() {
        let m = Metrics::new();
        m.received_objects.with_label_values(&["lan"]).inc();
        m.received_objects.protocol("hl7", &["wan"]).inc_by(2);
        let text = m.render();
        assert!(
            text.contains(
                r#"dicom_gateway_received_objects_total{listener="lan",protocol="dicom"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"dicom_gateway_received_objects_total{listener="wan",protocol="hl7"} 2"#
            ),
            "{text}"
        );
    }

    #[test]
    fn scrape_hooks_run_before_render() {
        let m = Metrics::new();
        m.on_scrape(|m| m.disk_free_bytes.set(42));
        assert!(m.render().contains("dicom_gateway_disk_free_bytes 42"));
    }

    #[test]
    fn status_words_are_bounded() {
        let words: std::collections::HashSet<_> = (0..=u16::MAX).map(cstore_status).collect();
        assert!(words.len() <= 10, "{words:?}");
        assert_eq!(cstore_status(0xA900), "dataset_mismatch");
        assert_eq!(cstore_status(0xA701), "out_of_resources");
    }
}
