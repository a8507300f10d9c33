//! Node-level observability wiring: the gauges nobody pushes, and the series that must exist
//! from the first scrape.
//!
//! Owns:
//! - the scrape hook that refreshes `disk_free_bytes` (a `statvfs` of `node.data_dir`) and
//!   RocksDB's counters (`db_background_error`, `db_size_bytes`,
//!   `db_pending_compaction_bytes`) and the spool's `kek_operations_total` counts, through
//!   probes that never keep the spool open;
//! - `certificate_expiry_timestamp_seconds` for the node's certificate and its CA bundle
//!   and for those of each DICOM TLS listener and destination, and
//!   `crl_next_update_timestamp_seconds` for each CRL file, read at start (where a bad
//!   file is a config error) and again at each scrape, so that a certificate or CRL
//!   replaced on disk (cert-manager, a CRL refresh job) shows its new dates; an unreadable
//!   file at scrape time keeps the last value;
//! - creating every per-listener and per-destination series at zero, so that `rate()` and
//!   `increase()` see the first event and dashboards show a line before any traffic.
//!
//! Invariant: every label value set here is a configuration name or a fixed word.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::spool::Spool;

/// Install the node's gauges and zero series on `metrics`.
pub fn install(metrics: &Metrics, cfg: &Config, spool: &Spool) -> Result<()> {
    for l in &cfg.dicom_listener {
        let n = l.name.as_str();
        metrics.received_objects.with_label_values(&[n]);
        metrics.received_bytes.with_label_values(&[n]);
        metrics.associations.with_label_values(&[n, "accepted"]);
        metrics.associations_active.with_label_values(&[n]);
        metrics.cstore_responses.with_label_values(&[n, "success"]);
        metrics.store_duration.with_label_values(&[n]);
        metrics.uid_mismatch.with_label_values(&[n]);
    }
    for l in &cfg.link_listener {
        let n = l.name.as_str();
        metrics.received_objects.with_label_values(&[n]);
        metrics.received_bytes.with_label_values(&[n]);
        metrics.associations.with_label_values(&[n, "accepted"]);
        metrics.associations_active.with_label_values(&[n]);
        metrics.link_parts.with_label_values(&[n, "stored"]);
        for reason in crate::metrics::TLS_FAILURE_REASONS {
            metrics
                .tls_handshake_failures
                .with_label_values(&[n, reason]);
        }
        metrics.store_duration.with_label_values(&[n]);
    }
    for n in cfg.hl7_listener.iter().map(|l| l.name.as_str()).chain(
        // Link listeners that deliver HL7 somewhere (an `hl7` destination).
        cfg.link_listener
            .iter()
            .filter(|l| {
                cfg.destination.iter().any(|d| {
                    l.route_to.contains(&d.name)
                        && matches!(d.kind, crate::config::DestinationKind::Hl7 { .. })
                })
            })
            .map(|l| l.name.as_str()),
    ) {
        for r in crate::metrics::HL7_RESULTS {
            metrics.hl7_messages.with_label_values(&[n, r]);
        }
        metrics.received_objects.protocol("hl7", &[n]);
        metrics.received_bytes.protocol("hl7", &[n]);
        metrics.store_duration.protocol("hl7", &[n]);
    }
    if !cfg.link_listener.is_empty() {
        metrics
            .integrity_failures
            .with_label_values(&["link_digest"]);
    }
    for d in &cfg.destination {
        let n = d.name.as_str();
        metrics.forwarded_objects.with_label_values(&[n]);
        metrics.forwarded_bytes.with_label_values(&[n]);
        metrics.end_to_end.with_label_values(&[n]);
        metrics.queue_objects.with_label_values(&[n]);
        metrics.dead_letter_objects.with_label_values(&[n]);
        metrics.forward_duration.with_label_values(&[n]);
        metrics.queue_bytes.with_label_values(&[n]);
        metrics.queue_oldest_age.with_label_values(&[n]);
        metrics.circuit_open.with_label_values(&[n]);
    }
    let (certs, crls) = tls_files(cfg);
    for (label, key, path) in &certs {
        let t = not_after(path).with_context(|| format!("{key} {}", path.display()))?;
        metrics
            .certificate_expiry
            .with_label_values(&[label])
            .set(t as f64);
    }
    for (key, path) in &crls {
        let t = next_update(path).with_context(|| format!("{key}: {}", path.display()))?;
        metrics
            .crl_next_update
            .with_label_values(&[&crl_label(path)])
            .set(t as f64);
    }
    let data_dir: PathBuf = cfg.node.data_dir.clone();
    let probe = spool.stats_probe();
    let kek_ops = spool.kek_ops_probe();
    let key_versions = spool.key_versions_probe();
    // What the spool had counted at the last scrape, per operation: the difference goes to
    // the newest KEK version of this scrape, so that a rotation does not count the
    // operations before it again under the new version.
    let counted = std::sync::Mutex::new([0u64; 4]);
    let seen_versions = std::sync::Mutex::new(std::collections::BTreeSet::new());
    metrics.on_scrape(move |m| {
        for (label, _, path) in &certs {
            if let Ok(t) = not_after(path) {
                m.certificate_expiry
                    .with_label_values(&[label])
                    .set(t as f64);
            }
        }
        for (_, path) in &crls {
            if let Ok(t) = next_update(path) {
                m.crl_next_update
                    .with_label_values(&[&crl_label(path)])
                    .set(t as f64);
            }
        }
        if let Some(free) = free_bytes(&data_dir) {
            m.disk_free_bytes.set(clamp(free));
        }
        if let Some(k) = kek_ops()
            && let Ok(mut counted) = counted.lock()
        {
            let version = k.kek_id.to_string();
            let totals = [
                ("wrap", k.wrap),
                ("rewrap", k.rewrap),
                ("unwrap", k.unwrap),
                ("shred", k.shred),
            ];
            for (i, (op, total)) in totals.into_iter().enumerate() {
                let c = m.kek_operations.with_label_values(&[op, &version]);
                // The spool counts; the counter follows (it only ever grows).
                c.inc_by(total.saturating_sub(counted[i]));
                counted[i] = counted[i].max(total);
            }
        }
        if let Some(v) = key_versions()
            && let Ok(mut seen) = seen_versions.lock()
        {
            // A version whose last key moved on reads 0, not its last count.
            seen.extend(v.keys().copied());
            for version in seen.iter() {
                m.kek_wrapped_keys
                    .with_label_values(&[&version.to_string()])
                    .set(clamp(v.get(version).copied().unwrap_or(0)));
            }
        }
        if let Some(s) = probe() {
            m.db_background_error
                .set(i64::from(s.background_errors > 0));
            m.db_size_bytes.set(clamp(s.live_bytes));
            m.db_pending_compaction_bytes
                .set(clamp(s.pending_compaction_bytes));
        }
    });
    Ok(())
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The earliest notAfter (Unix seconds) of the certificates in a PEM file.
pub fn not_after(pem: &Path) -> Result<i64> {
    let certs = crate::tls::load_certs(pem)?;
    let mut earliest: Option<i64> = None;
    for der in &certs {
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| anyhow::anyhow!("cannot parse a certificate: {e}"))?;
        let t = cert.validity().not_after.timestamp();
        earliest = Some(earliest.map_or(t, |e| e.min(t)));
    }
    earliest.context("no certificate")
}

/// The earliest nextUpdate (Unix seconds) of the CRLs in a PEM file. A CRL without one
/// never expires by itself, so it does not count; a file with none of them is an error.
pub fn next_update(pem: &Path) -> Result<i64> {
    let crls = crate::tls::load_crls(std::slice::from_ref(&pem.to_path_buf()))?;
    let mut earliest: Option<i64> = None;
    for der in &crls {
        let (_, crl) = x509_parser::parse_x509_crl(der.as_ref())
            .map_err(|e| anyhow::anyhow!("cannot parse a CRL: {e}"))?;
        if let Some(t) = crl.next_update() {
            let t = t.timestamp();
            earliest = Some(earliest.map_or(t, |e| e.min(t)));
        }
    }
    earliest.context("no CRL with a nextUpdate")
}

/// The `crl` label of a CRL file: its file name (a configuration value, never peer data).
/// The certificate files whose notAfter is exported, as (`certificate` label, config key,
/// path), and the CRL files, as (config key, path): the node's `[tls]` (`node`, `ca`), each
/// `[dicom_listener.tls]` (`dicom_listener/NAME`, `dicom_listener/NAME/ca`) and each
/// `[destination.tls]` (`destination/NAME`, `destination/NAME/ca`). Labels are
/// configuration names.
type CertFiles = Vec<(String, String, PathBuf)>;
fn tls_files(cfg: &crate::config::Config) -> (CertFiles, Vec<(String, PathBuf)>) {
    let mut certs = Vec::new();
    let mut crls = Vec::new();
    if let Some(tls) = &cfg.tls {
        certs.push(("node".into(), "[tls] cert".into(), tls.cert.clone()));
        certs.push(("ca".into(), "[tls] ca".into(), tls.ca.clone()));
        crls.extend(tls.crls.iter().map(|p| ("[tls] crls".into(), p.clone())));
    }
    for l in &cfg.dicom_listener {
        let Some(t) = &l.tls else { continue };
        let label = format!("dicom_listener/{}", l.name);
        let key = format!("[dicom_listener.tls] of {}:", l.name);
        certs.push((label.clone(), format!("{key} cert"), t.cert.clone()));
        if let Some(ca) = &t.ca {
            certs.push((format!("{label}/ca"), format!("{key} ca"), ca.clone()));
        }
        crls.extend(t.crls.iter().map(|p| (format!("{key} crls"), p.clone())));
    }
    for d in &cfg.destination {
        let crate::config::DestinationKind::Dicom { tls: Some(t), .. } = &d.kind else {
            continue;
        };
        let label = format!("destination/{}", d.name);
        let key = format!("[destination.tls] of {}:", d.name);
        if let Some(cert) = &t.cert {
            certs.push((label.clone(), format!("{key} cert"), cert.clone()));
        }
        certs.push((format!("{label}/ca"), format!("{key} ca"), t.ca.clone()));
        crls.extend(t.crls.iter().map(|p| (format!("{key} crls"), p.clone())));
    }
    (certs, crls)
}

fn crl_label(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "crl".into())
}

/// Bytes available to an unprivileged writer on the volume holding `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    crate::spool::free_bytes(dir).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_bytes_of_a_real_volume() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_bytes(dir.path()).is_some_and(|b| b > 0));
        assert!(free_bytes(&dir.path().join("missing")).is_none());
    }

    #[test]
    fn not_after_of_the_development_pki() {
        let dir = tempfile::tempdir().unwrap();
        let files = crate::pki::init(dir.path(), &["site-a".to_owned()]).unwrap();
        let t = not_after(&files.sites[0].1).unwrap();
        // rcgen's default validity ends in 4096.
        assert!(t > 4_000_000_000, "{t}");
        assert!(not_after(&dir.path().join("site-a.key")).is_err());
    }
}
