//! `dicom-gateway check`: validate a config offline, and explain where a file would go.
//!
//! Owns nothing at run time: it reads the config and the files it names, never the data
//! directory's database, never the network. Invariants:
//! - it opens no socket and writes nothing;
//! - it reports every problem it finds (not only the first), each with what to do;
//! - `--explain` reads only the file's Part-10 meta and the identity prefix of its data set
//!   (the same scan the listeners do), and prints no patient data: UIDs are not shown.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::config::Config;
use crate::routing::{Origin, Router, Verdict};
use crate::spool::RouteFacts;

/// A certificate closer than this to its notAfter is a warning.
const EXPIRY_WARNING_DAYS: i64 = 30;

/// One finding.
#[derive(Debug, Serialize)]
pub struct Finding {
    /// `error` or `warning`.
    pub level: &'static str,
    /// What it is about (a config key or file).
    pub subject: String,
    /// What is wrong and what to do.
    pub message: String,
}

/// Where one listener would send the explained file.
#[derive(Debug, Serialize)]
pub struct Explanation {
    /// The listener.
    pub listener: String,
    /// Destinations from its `route_to`.
    pub route_to: Vec<String>,
    /// Each rule's verdict.
    pub routes: Vec<Verdict>,
    /// All destinations, in order; empty: the object would be refused.
    pub destinations: Vec<String>,
}

/// The whole report.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The config file.
    pub config: String,
    /// Problems found.
    pub findings: Vec<Finding>,
    /// For `--explain`: the file's SOP class and modality, and each listener's decision.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub explain: Option<ExplainReport>,
}

/// `--explain` output.
#[derive(Debug, Serialize)]
pub struct ExplainReport {
    /// The file's SOP Class UID (not patient data).
    pub sop_class: String,
    /// Its modality, if any.
    pub modality: Option<String>,
    /// One entry per listener considered.
    pub listeners: Vec<Explanation>,
}

/// What `--explain` assumes about the association or link the file would arrive on.
#[derive(Debug, Default, Clone)]
pub struct ExplainOrigin {
    /// Only this listener (default: every listener).
    pub listener: Option<String>,
    /// The sender's calling AE title.
    pub calling_ae: Option<String>,
    /// The peer gateway's node name.
    pub peer: Option<String>,
}

/// Check `config` (and explain `file`, if given). `Err` only when the config cannot be read
/// or parsed at all; everything else is a finding.
pub fn run(config: &Path, explain: Option<(&Path, ExplainOrigin)>) -> Result<Report> {
    let cfg = Config::load(config)?;
    let mut findings = Vec::new();
    files(&cfg, &mut findings);
    reachability(&cfg, &mut findings);
    let explain = match explain {
        Some((file, origin)) => Some(explain_file(&cfg, file, &origin)?),
        None => None,
    };
    Ok(Report {
        config: config.display().to_string(),
        findings,
        explain,
    })
}

fn error(out: &mut Vec<Finding>, subject: impl Into<String>, message: impl Into<String>) {
    out.push(Finding {
        level: "error",
        subject: subject.into(),
        message: message.into(),
    });
}

fn warning(out: &mut Vec<Finding>, subject: impl Into<String>, message: impl Into<String>) {
    out.push(Finding {
        level: "warning",
        subject: subject.into(),
        message: message.into(),
    });
}

/// The files the config names exist and parse; certificates are in date.
fn files(cfg: &Config, out: &mut Vec<Finding>) {
    // Every version next to it (after a rotation, version 1 itself may be retired and
    // gone); whether the data directory's versions are all there is checked at start.
    if let Err(e) = keystore::KekRing::load(&cfg.keystore.kek_file) {
        error(
            out,
            "keystore.kek_file",
            format!("{e:#} (create one with `dicom-gateway keys new-kek --out FILE`)"),
        );
    }
    match std::fs::metadata(&cfg.node.data_dir) {
        Ok(m) if !m.is_dir() => error(out, "node.data_dir", "exists and is not a folder"),
        Ok(_) => {}
        Err(_) => {
            let parent = cfg
                .node
                .data_dir
                .parent()
                .filter(|p| !p.as_os_str().is_empty());
            if parent.is_some_and(|p| !p.is_dir()) {
                error(
                    out,
                    "node.data_dir",
                    "neither it nor its parent folder exists; create the parent",
                );
            }
        }
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    dicom_tls_files(cfg, now, out);
    let Some(tls) = &cfg.tls else {
        return;
    };
    if let Err(e) = crate::tls::client_config(tls) {
        error(out, "tls", format!("{e}"));
    }
    if let Err(e) = crate::tls::check_node_name(tls, &cfg.node.name) {
        error(out, "tls.cert", format!("{e}"));
    }
    for (key, path) in [("tls.cert", &tls.cert), ("tls.ca", &tls.ca)] {
        expiry(out, key, path, now);
    }
    if let Err(e) = crate::tls::load_crls(&tls.crls) {
        error(out, "tls.crls", format!("{e}"));
    }
}

/// The DICOM TLS files of every `[dicom_listener.tls]` and `[destination.tls]`: the same
/// loading the node does at start (certificate, key and that they fit, CA, CRLs), and the
/// certificates' dates.
fn dicom_tls_files(cfg: &Config, now: i64, out: &mut Vec<Finding>) {
    for l in &cfg.dicom_listener {
        let Some(t) = &l.tls else { continue };
        let key = |field: &str| format!("dicom_listener[{}].tls{field}", l.name);
        if let Err(e) = crate::tls::DicomServerTls::load(t) {
            error(out, key(""), format!("{e}"));
        }
        expiry(out, &key(".cert"), &t.cert, now);
        if let Some(ca) = &t.ca {
            expiry(out, &key(".ca"), ca, now);
        }
    }
    for d in &cfg.destination {
        let crate::config::DestinationKind::Dicom { tls: Some(t), .. } = &d.kind else {
            continue;
        };
        let key = |field: &str| format!("destination[{}].tls{field}", d.name);
        if let Err(e) = crate::tls::dicom_client_config(t) {
            error(out, key(""), format!("{e}"));
        }
        if let Some(cert) = &t.cert {
            expiry(out, &key(".cert"), cert, now);
        }
        expiry(out, &key(".ca"), &t.ca, now);
    }
}

/// An expired certificate is an error, one within [`EXPIRY_WARNING_DAYS`] a warning.
fn expiry(out: &mut Vec<Finding>, key: &str, path: &Path, now: i64) {
    match crate::observe::not_after(path) {
        Ok(t) if t <= now => error(
            out,
            key,
            format!("{} expired; issue a new one", path.display()),
        ),
        Ok(t) if t - now < EXPIRY_WARNING_DAYS * 86_400 => warning(
            out,
            key,
            format!(
                "{} expires in {} days; renew it (the node reloads it without a restart)",
                path.display(),
                (t - now) / 86_400
            ),
        ),
        Ok(_) => {}
        Err(e) => error(out, key, format!("{}: {e:#}", path.display())),
    }
}

/// Every destination receives something; every listener's objects can go somewhere.
fn reachability(cfg: &Config, out: &mut Vec<Finding>) {
    for d in &cfg.destination {
        let by_listener = cfg
            .dicom_listener
            .iter()
            .any(|l| l.route_to.contains(&d.name))
            || cfg
                .link_listener
                .iter()
                .any(|l| l.route_to.contains(&d.name))
            || cfg
                .hl7_listener
                .iter()
                .any(|l| l.route_to.contains(&d.name));
        let by_route = cfg.route.iter().any(|r| r.to.contains(&d.name));
        if !by_listener && !by_route {
            warning(
                out,
                format!("destination[{}]", d.name),
                "no route_to or [[route]] names it: it receives nothing",
            );
        }
    }
    for (name, link) in cfg.listener_names() {
        let table = if link {
            "link_listener"
        } else {
            "dicom_listener"
        };
        let route_to_empty = if link {
            cfg.link_listener
                .iter()
                .any(|l| l.name == name && l.route_to.is_empty())
        } else {
            cfg.dicom_listener
                .iter()
                .any(|l| l.name == name && l.route_to.is_empty())
        };
        if route_to_empty {
            warning(
                out,
                format!("{table}[{name}]"),
                "has no route_to: an object that matches no [[route]] is refused \
                 (C-STORE 0x0110, link 400)",
            );
        }
    }
}

fn explain_file(cfg: &Config, file: &Path, origin: &ExplainOrigin) -> Result<ExplainReport> {
    use std::io::Read;
    let mut head = Vec::new();
    std::fs::File::open(file)
        .with_context(|| format!("cannot open {}", file.display()))?
        .take((crate::dataset::MAX_IDENTITY_PREFIX + crate::dataset::MAX_META_BYTES) as u64)
        .read_to_end(&mut head)
        .with_context(|| format!("cannot read {}", file.display()))?;
    let meta = crate::dataset::parse_part10_header(&head)
        .with_context(|| format!("{} is not a DICOM Part-10 file", file.display()))?
        .with_context(|| format!("{} ends inside its file meta", file.display()))?;
    let encoding = crate::sop::encoding(&meta.transfer_syntax)
        .with_context(|| format!("unsupported transfer syntax {}", meta.transfer_syntax))?;
    let whole = std::fs::metadata(file).is_ok_and(|m| m.len() as usize <= head.len());
    let ident = match crate::dataset::scan_identity(&head[meta.dataset_offset..], encoding, whole)
        .with_context(|| format!("{}: data set", file.display()))?
    {
        crate::dataset::Scan::Done(id) => id,
        crate::dataset::Scan::NeedMore => anyhow::bail!(
            "{}: identity elements not found in the first {} bytes",
            file.display(),
            crate::dataset::MAX_IDENTITY_PREFIX
        ),
    };
    let sop_class = ident.sop_class.clone().unwrap_or(meta.sop_class.clone());
    let facts = RouteFacts {
        sop_class: &sop_class,
        modality: ident.modality.as_deref(),
    };
    let router = Router::from_config(cfg);
    let mut listeners = Vec::new();
    for l in &cfg.dicom_listener {
        if origin.listener.as_ref().is_some_and(|n| *n != l.name) {
            continue;
        }
        let o = Origin {
            listener: l.name.clone(),
            link: false,
            calling_ae: origin.calling_ae.clone(),
            called_ae: Some(l.ae_title.clone()),
            peer: None,
        };
        listeners.push(decide(&router, o, &l.route_to, &facts));
    }
    for l in &cfg.link_listener {
        if origin.listener.as_ref().is_some_and(|n| *n != l.name) {
            continue;
        }
        let o = Origin {
            listener: l.name.clone(),
            link: true,
            peer: origin.peer.clone(),
            ..Origin::default()
        };
        listeners.push(decide(&router, o, &l.route_to, &facts));
    }
    if let Some(n) = &origin.listener
        && listeners.is_empty()
    {
        anyhow::bail!("no listener named {n:?} in the config");
    }
    Ok(ExplainReport {
        sop_class,
        modality: ident.modality,
        listeners,
    })
}

fn decide(router: &Router, o: Origin, route_to: &[String], facts: &RouteFacts<'_>) -> Explanation {
    let routes = router.explain(&o, facts);
    let mut destinations = route_to.to_vec();
    for v in routes.iter().filter(|v| v.matched) {
        for d in &v.to {
            if !destinations.contains(d) {
                destinations.push(d.clone());
            }
        }
    }
    Explanation {
        listener: o.listener,
        route_to: route_to.to_vec(),
        routes,
        destinations,
    }
}

/// Print `report` for people (or as JSON); `true` when it holds no error.
pub fn print(report: &Report, json: bool) -> Result<bool> {
    let ok = !report.findings.iter().any(|f| f.level == "error");
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(ok);
    }
    for f in &report.findings {
        println!("{:<8} {}: {}", f.level, f.subject, f.message);
    }
    let (errors, warnings) = report.findings.iter().fold((0, 0), |(e, w), f| {
        if f.level == "error" {
            (e + 1, w)
        } else {
            (e, w + 1)
        }
    });
    println!(
        "{}: {} ({errors} errors, {warnings} warnings)",
        report.config,
        if ok { "ok" } else { "NOT OK" }
    );
    if let Some(x) = &report.explain {
        println!();
        println!(
            "file: SOP class {}, modality {}",
            x.sop_class,
            x.modality.as_deref().unwrap_or("(none)")
        );
        for l in &x.listeners {
            println!("listener {}:", l.listener);
            if !l.route_to.is_empty() {
                println!("  route_to            -> {}", l.route_to.join(", "));
            }
            for v in &l.routes {
                match &v.reason {
                    None => println!("  route {:<13} -> {}", v.route, v.to.join(", ")),
                    Some(why) => println!("  route {:<13} no: {why}", v.route),
                }
            }
            if l.destinations.is_empty() {
                println!("  => refused: no destination takes it");
            } else {
                println!("  => {}", l.destinations.join(", "));
            }
        }
    }
    Ok(ok)
}
