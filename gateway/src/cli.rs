//! The operator commands that talk to a running node: `status` and `queue`.
//!
//! Each reads the node's config only to find its data directory (and so the admin socket),
//! asks the node over [`crate::admin`], and prints a table for people or, with `--json`,
//! the API's JSON for scripts. Errors say what to do next.

use std::path::Path;

use anyhow::Context;
use http::Method;

use crate::admin::{self, Changed, EntryView, ResendRequest, Resended, Selector, Status};
use crate::config::Config;

fn socket_of(config: &Path) -> anyhow::Result<std::path::PathBuf> {
    let cfg = Config::load(config).with_context(|| format!("reading {}", config.display()))?;
    Ok(admin::socket_path(&cfg.node.data_dir))
}

/// `dicom-gateway status`.
pub async fn status(config: &Path, json: bool) -> anyhow::Result<()> {
    let sock = socket_of(config)?;
    let v = admin::request(&sock, Method::GET, "/v1/status", None).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let st: Status = serde_json::from_value(v).context("unexpected status document")?;
    println!(
        "node {}: {}",
        st.node,
        if st.ready {
            "ready".to_owned()
        } else {
            format!("NOT READY ({})", st.readiness)
        }
    );
    let mut rows = vec![vec![
        "DESTINATION".to_owned(),
        "KIND".into(),
        "QUEUED".into(),
        "BYTES".into(),
        "OLDEST".into(),
        "IN FLIGHT".into(),
        "DEAD".into(),
        "CIRCUIT".into(),
        "DELIVERED".into(),
        "LAST ERROR".into(),
    ]];
    for d in &st.destinations {
        rows.push(vec![
            d.name.clone(),
            d.kind.clone(),
            d.queued.to_string(),
            human_bytes(d.queued_bytes),
            d.oldest_age_seconds
                .map(human_age)
                .unwrap_or_else(|| "-".into()),
            d.in_flight.to_string(),
            d.dead.to_string(),
            d.circuit.clone(),
            d.delivered.to_string(),
            d.last_error.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    print_table(&rows);
    if st.retained > 0 {
        println!(
            "{} delivered objects retained for `queue resend` ([spool] retention)",
            st.retained
        );
    }
    Ok(())
}

/// `dicom-gateway queue resend`: queue a retained study again, then (unless `no_wait`, or
/// with `json`) follow its delivery until every entry is delivered or a dead letter, with
/// a progress bar on a terminal, and print a summary. Interrupting the wait changes
/// nothing: the entries stay queued and are delivered all the same.
pub async fn queue_resend(
    config: &Path,
    study: String,
    destination: Option<String>,
    no_wait: bool,
    json: bool,
) -> anyhow::Result<()> {
    let sock = socket_of(config)?;
    let body = serde_json::to_vec(&ResendRequest {
        study: study.clone(),
        destination,
    })?;
    let v = admin::request(&sock, Method::POST, "/v1/queue/resend", Some(body)).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let r: Resended = serde_json::from_value(v).context("unexpected answer")?;
    if r.objects == 0 {
        println!(
            "nothing to resend: no retained object of study {study} (never received here, already resent and not yet delivered, or past [spool] retention)"
        );
        return Ok(());
    }
    println!(
        "{} objects queued again ({} entries) for {}",
        r.objects,
        r.entries,
        r.destinations.join(", ")
    );
    if no_wait {
        println!("`dicom-gateway status --config ...` shows them drain");
        return Ok(());
    }
    let started = std::time::Instant::now();
    let total = r.queued.len() as u64;
    let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        indicatif::ProgressBar::new(total)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} delivering {pos}/{len} [{bar:30}] {elapsed} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let wanted: std::collections::HashSet<(String, String)> = r.queued.into_iter().collect();
    let (delivered, dead) = loop {
        let v = admin::request(&sock, Method::GET, "/v1/queue", None).await?;
        let entries: Vec<EntryView> =
            serde_json::from_value(v).context("unexpected queue listing")?;
        let mut waiting = 0u64;
        let mut dead = 0u64;
        for e in entries {
            if wanted.contains(&(e.id.clone(), e.destination.clone())) {
                if e.state == "dead" {
                    dead += 1;
                } else {
                    waiting += 1;
                }
            }
        }
        let delivered = total - waiting.min(total) - dead.min(total);
        bar.set_position(delivered);
        if dead > 0 {
            bar.set_message(format!("{dead} dead letters"));
        }
        if waiting == 0 {
            break (delivered, dead);
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    };
    bar.finish_and_clear();
    println!(
        "{delivered} of {total} entries delivered in {:.1} s{}",
        started.elapsed().as_secs_f64(),
        if dead > 0 {
            format!(
                "; {dead} became dead letters: `dicom-gateway queue list --config ... --dead` shows why"
            )
        } else {
            String::new()
        }
    );
    Ok(())
}

/// What `queue list` shows: every entry, or those matching all the given filters.
#[derive(Debug, Default, Clone)]
pub struct ListFilter {
    /// Only this destination.
    pub destination: Option<String>,
    /// Only dead letters.
    pub dead: bool,
    /// Only this object (hex id).
    pub id: Option<String>,
    /// Only this study.
    pub study: Option<String>,
}

/// `dicom-gateway queue list`.
pub async fn queue_list(
    config: &Path,
    filter: ListFilter,
    history: bool,
    json: bool,
) -> anyhow::Result<()> {
    let sock = socket_of(config)?;
    let mut q = Vec::new();
    // Each value goes into a query string, so it is checked against its own alphabet first.
    let checked = |what: &str, v: &str, ok: fn(char) -> bool| -> anyhow::Result<String> {
        if v.is_empty() || v.len() > 64 || !v.chars().all(ok) {
            anyhow::bail!("{v:?} is not {what}; `dicom-gateway queue list` shows the entries");
        }
        Ok(v.to_owned())
    };
    if let Some(d) = &filter.destination {
        q.push(format!(
            "destination={}",
            checked("a destination name", d, |c| c.is_ascii_alphanumeric()
                || "-_.".contains(c))?
        ));
    }
    if let Some(i) = &filter.id {
        q.push(format!(
            "id={}",
            checked("an object id", i, |c| c.is_ascii_hexdigit())?
        ));
    }
    if let Some(u) = &filter.study {
        q.push(format!(
            "study={}",
            checked("a Study Instance UID", u, |c| c.is_ascii_digit()
                || c == '.')?
        ));
    }
    if filter.dead {
        q.push("dead=1".into());
    }
    let path = if q.is_empty() {
        "/v1/queue".to_owned()
    } else {
        format!("/v1/queue?{}", q.join("&"))
    };
    let v = admin::request(&sock, Method::GET, &path, None).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let entries: Vec<EntryView> = serde_json::from_value(v).context("unexpected queue listing")?;
    let mut rows = vec![vec![
        "ID".to_owned(),
        "DESTINATION".into(),
        "STATE".into(),
        "ATTEMPTS".into(),
        "SIZE".into(),
        "STUDY UID".into(),
        "SOP INSTANCE UID".into(),
        "LAST REASON".into(),
    ]];
    for e in &entries {
        rows.push(vec![
            e.id.clone(),
            e.destination.clone(),
            e.state.clone(),
            e.attempts.to_string(),
            human_bytes(e.size),
            // An HL7 message: its type and control id (no patient key in the table; it
            // is in --json).
            match &e.hl7 {
                Some(h) => format!("HL7 {}", h.message_type),
                None => e.study_uid.clone(),
            },
            match &e.hl7 {
                Some(h) => h.control_id.clone(),
                None => e.sop_instance_uid.clone(),
            },
            e.last_reason.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    print_table(&rows);
    println!("{} entries", entries.len());
    if history {
        for e in entries.iter().filter(|e| e.attempts > 0) {
            println!();
            let shown = e.history.len() as u32;
            println!(
                "{} -> {}: {} failed attempts{}",
                e.id,
                e.destination,
                e.attempts,
                if shown < e.attempts {
                    format!(" (the last {shown} kept)")
                } else {
                    String::new()
                }
            );
            for (n, a) in e.history.iter().enumerate() {
                let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(a.at_ms);
                println!(
                    "  #{:<4} {}  {}",
                    e.attempts - shown + n as u32 + 1,
                    humantime::format_rfc3339_seconds(at),
                    a.reason
                );
            }
        }
    }
    Ok(())
}

/// `dicom-gateway queue retry|purge`.
pub async fn queue_change(
    config: &Path,
    selector: Selector,
    purge: bool,
    json: bool,
) -> anyhow::Result<()> {
    let sock = socket_of(config)?;
    let path = if purge {
        "/v1/queue/purge"
    } else {
        "/v1/queue/retry"
    };
    let body = serde_json::to_vec(&selector)?;
    let v = admin::request(&sock, Method::POST, path, Some(body)).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let c: Changed = serde_json::from_value(v).context("unexpected answer")?;
    let verb = if purge { "purged" } else { "replayed" };
    println!(
        "{} matched, {} {verb}, {} skipped (being sent), {} skipped (not dead letters)",
        c.matched, c.changed, c.skipped_in_flight, c.skipped_not_dead
    );
    if c.retained_purged > 0 {
        println!(
            "{} retained (delivered) copies of the study deleted",
            c.retained_purged
        );
    }
    if c.matched == 0 && c.retained_purged == 0 {
        println!("nothing matched: `dicom-gateway queue list --config ...` shows what is queued");
    }
    Ok(())
}

fn print_table(rows: &[Vec<String>]) {
    let cols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, cell)| {
                if i + 1 == cols {
                    cell.clone()
                } else {
                    format!("{cell:<w$}", w = widths[i])
                }
            })
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn human_age(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}
