//! Every metric the gateway exports, in one place, so a dashboard change is one diff.
//!
//! Invariant: label values are configuration names (listener, destination) or fixed words
//! (result, reason); never a UID, AE title from a peer, or anything from a data set.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The gateway's metrics and their registry.
pub struct Metrics {
    registry: Registry,
    /// Objects accepted and committed, by listener.
    pub objects_received: IntCounterVec,
    /// Bytes accepted and committed, by listener.
    pub bytes_received: IntCounterVec,
    /// Objects refused, by listener and reason.
    pub objects_refused: IntCounterVec,
    /// Associations or link connections, by listener and result.
    pub connections: IntCounterVec,
    /// Objects delivered, by destination.
    pub objects_delivered: IntCounterVec,
    /// Bytes delivered, by destination.
    pub bytes_delivered: IntCounterVec,
    /// Failed delivery attempts, by destination and kind (transient, permanent).
    pub delivery_failures: IntCounterVec,
    /// Objects waiting, by destination.
    pub queue_depth: IntGaugeVec,
    /// Objects parked after a permanent refusal, by destination.
    pub queue_parked: IntGaugeVec,
    /// Seconds from receipt to confirmed delivery, by destination.
    pub delivery_seconds: HistogramVec,
    /// Reloads of a link listener's TLS files, by listener and result (ok, failed).
    pub tls_reloads: IntCounterVec,
}

impl Metrics {
    /// Create and register every metric.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let cv = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(format!("dicom_gateway_{name}"), help), labels)
                .expect("static metric definition");
            registry
                .register(Box::new(c.clone()))
                .expect("metric registered once");
            c
        };
        let gv = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(format!("dicom_gateway_{name}"), help), labels)
                .expect("static metric definition");
            registry
                .register(Box::new(g.clone()))
                .expect("metric registered once");
            g
        };
        let delivery_seconds = HistogramVec::new(
            HistogramOpts::new(
                "dicom_gateway_delivery_seconds",
                "Seconds from commit to confirmed delivery",
            )
            .buckets(vec![
                0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0, 3600.0,
            ]),
            &["destination"],
        )
        .expect("static metric definition");
        registry
            .register(Box::new(delivery_seconds.clone()))
            .expect("metric registered once");
        Metrics {
            objects_received: cv(
                "objects_received_total",
                "Objects accepted after a synced commit",
                &["listener"],
            ),
            bytes_received: cv(
                "bytes_received_total",
                "Bytes accepted after a synced commit",
                &["listener"],
            ),
            objects_refused: cv(
                "objects_refused_total",
                "Objects refused",
                &["listener", "reason"],
            ),
            connections: cv(
                "connections_total",
                "Incoming associations and link connections",
                &["listener", "result"],
            ),
            objects_delivered: cv(
                "objects_delivered_total",
                "Objects confirmed by a destination",
                &["destination"],
            ),
            bytes_delivered: cv(
                "bytes_delivered_total",
                "Bytes confirmed by a destination",
                &["destination"],
            ),
            delivery_failures: cv(
                "delivery_failures_total",
                "Failed delivery attempts",
                &["destination", "kind"],
            ),
            queue_depth: gv(
                "queue_depth",
                "Objects waiting for a destination",
                &["destination"],
            ),
            queue_parked: gv(
                "queue_parked",
                "Objects refused permanently and kept for an operator",
                &["destination"],
            ),
            delivery_seconds,
            tls_reloads: cv(
                "tls_reloads_total",
                "Reloads of a link listener's certificate, key, CA and CRL files",
                &["listener", "result"],
            ),
            registry,
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let enc = TextEncoder::new();
        if enc.encode(&self.registry.gather(), &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
