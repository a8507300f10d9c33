//! The operator commands that talk to a running node: `status`, `queue` and `keys`.
//!
//! Each reads the node's config only to find its data directory (and so the admin socket),
//! asks the node over [`crate::admin`], and prints a table for people or, with `--json`,
//! the API's JSON for scripts. Errors say what to do next. `keys rotate` and `keys status`
//! also work on a stopped node: they then open its data directory themselves.

use std::path::Path;

use anyhow::Context;
use http::Method;

use crate::admin::{
    self, Changed, EntryView, ResendRequest, Resended, Selector, ShredRequest, Shredded, Status,
};
use crate::config::Config;
use crate::rotation::{KeysStatus, RESCAN, rewrap_all_blocking, status_blocking};

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
    let bar = progress_bar(
        "{spinner} delivering {pos}/{len} [{bar:30}] {elapsed} {msg}",
        total,
        false,
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

/// A progress bar of `len` steps on stderr when it is a terminal (and not `hidden`, as
/// under `--json`), drawn with `template`; hidden otherwise.
fn progress_bar(template: &str, len: u64, hidden: bool) -> indicatif::ProgressBar {
    let bar = if !hidden && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        indicatif::ProgressBar::new(len)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// A table's header row.
fn header(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
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

/// Is a node listening on `sock`? `false` when there is no socket or nobody accepts on it
/// (a stopped node, or one killed without removing it).
async fn node_running(sock: &Path) -> anyhow::Result<bool> {
    match tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::net::UnixStream::connect(sock),
    )
    .await
    {
        Ok(Ok(_)) => Ok(true),
        Ok(Err(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            Ok(false)
        }
        Ok(Err(e)) => Err(e).with_context(|| {
            format!(
                "cannot reach the node's admin socket {}: run this as the user that runs the node",
                sock.display()
            )
        }),
        Err(_) => anyhow::bail!(
            "timed out connecting to {}: the node is running but does not answer",
            sock.display()
        ),
    }
}

/// Open a stopped node's spool for a `keys` command. Blocking.
fn open_stopped_spool(cfg: &Config) -> anyhow::Result<crate::spool::Spool> {
    let ring = keystore::KekRing::load(&cfg.keystore.kek_file).context("keystore.kek_file")?;
    crate::spool::Spool::open_blocking(
        &cfg.node.data_dir,
        ring,
        crate::node::Node::spool_options(cfg),
    )
    .with_context(|| {
        format!(
            "cannot open the data directory {} (the node's admin socket did not answer, so it was opened directly; if the node is running, check that this is its config)",
            cfg.node.data_dir.display()
        )
    })
}

fn print_keys(st: &KeysStatus) {
    let mut rows = vec![header(&["VERSION", "STATE", "KEYS", "FILE"])];
    for v in &st.versions {
        rows.push(vec![
            v.version.to_string(),
            v.state.clone(),
            v.keys.to_string(),
            format!(
                "{}{}",
                v.file.display(),
                if v.file_present { "" } else { " (absent)" }
            ),
        ]);
    }
    print_table(&rows);
    if st.rewrap_pending > 0 {
        println!(
            "{} keys still under older versions: the rewrap is under way",
            st.rewrap_pending
        );
    }
    if let Some(e) = &st.last_error {
        println!("last rotation error: {e}");
    }
}

/// `dicom-gateway keys status`.
pub async fn keys_status(config: &Path, json: bool) -> anyhow::Result<()> {
    let cfg = Config::load(config).with_context(|| format!("reading {}", config.display()))?;
    let sock = admin::socket_path(&cfg.node.data_dir);
    let st: KeysStatus = if node_running(&sock).await? {
        let v = admin::request(&sock, Method::GET, "/v1/keys", None).await?;
        serde_json::from_value(v).context("unexpected answer")?
    } else {
        tokio::task::spawn_blocking(move || {
            let spool = open_stopped_spool(&cfg)?;
            status_blocking(
                &spool,
                &cfg.node.data_dir,
                &cfg.keystore.kek_file,
                cfg.keystore.retire_old_versions,
            )
        })
        .await??
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&st)?);
    } else {
        print_keys(&st);
    }
    Ok(())
}

/// What `keys rotate --json` prints.
#[derive(Debug, serde::Serialize)]
struct Rotated {
    version: u32,
    file: std::path::PathBuf,
    created: bool,
    node_running: bool,
    rewrapped: u64,
    retired: Vec<u32>,
    status: KeysStatus,
}

/// The version `keys rotate` makes the newest: a version file an operator already put in
/// place that is newer than every recorded version (a key added to a Kubernetes Secret),
/// or else a new file one past every version ever used. Returns it and whether it was
/// created here.
fn next_version(cfg: &Config) -> anyhow::Result<(u32, bool)> {
    let kek_file = &cfg.keystore.kek_file;
    let files = keystore::kek_version_files(kek_file)?;
    let recorded = crate::spool::kek_check::recorded_blocking(&cfg.node.data_dir)?;
    let newest_file = files.last().map_or(0, |(v, _)| *v);
    let newest_recorded = recorded.keys().next_back().copied().unwrap_or(0);
    if newest_file > newest_recorded {
        return Ok((newest_file, false));
    }
    let version = newest_file.max(newest_recorded) + 1;
    let path = keystore::kek_version_path(kek_file, version);
    keystore::Kek::generate_file(&path).with_context(|| {
        format!(
            "cannot create KEK version {version} at {}. Where the KEK comes from a read-only mount (a Kubernetes Secret), make the file elsewhere with `dicom-gateway keys new-kek --out {}` and add it to the Secret: the node takes it up within {} s",
            path.display(),
            path.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            RESCAN.as_secs()
        )
    })?;
    Ok((version, true))
}

/// `dicom-gateway keys rotate`: add a KEK version, make it the newest, rewrap every stored
/// key under it and (with `retire_old_versions`) retire the older ones.
pub async fn keys_rotate(config: &Path, no_wait: bool, json: bool) -> anyhow::Result<()> {
    let cfg = Config::load(config).with_context(|| format!("reading {}", config.display()))?;
    let sock = admin::socket_path(&cfg.node.data_dir);
    let running = node_running(&sock).await?;
    let (version, created) = next_version(&cfg)?;
    let file = keystore::kek_version_path(&cfg.keystore.kek_file, version);
    if !json {
        println!(
            "KEK version {version}: {} {}",
            if created { "created" } else { "found" },
            file.display()
        );
    }
    let bar = progress_bar(
        "{spinner} rewrapping {pos}/{len} [{bar:30}] {elapsed}",
        0,
        json,
    );
    let (rewrapped, retired, status) = if running {
        let v = admin::request(&sock, Method::POST, "/v1/keys/reload", None).await?;
        let mut st: KeysStatus = serde_json::from_value(v).context("unexpected answer")?;
        if st.newest != version {
            anyhow::bail!(
                "the node did not take KEK version {version} (its newest is {}){}",
                st.newest,
                st.last_error
                    .as_deref()
                    .map_or_else(String::new, |e| format!(": {e}"))
            );
        }
        let before: std::collections::BTreeMap<u32, u64> =
            st.versions.iter().map(|v| (v.version, v.keys)).collect();
        let total = st.rewrap_pending;
        bar.set_length(total);
        let mut last_change = std::time::Instant::now();
        let mut pending = st.rewrap_pending;
        while !no_wait && !rotation_done(&st) {
            if st.last_error.is_some() && last_change.elapsed() > std::time::Duration::from_secs(10)
            {
                break;
            }
            if last_change.elapsed() > std::time::Duration::from_secs(300) {
                anyhow::bail!(
                    "the rewrap made no progress for 5 minutes ({} keys left): the node's log says why; `dicom-gateway keys status --config {}` shows where it is",
                    st.rewrap_pending,
                    config.display()
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            let v = admin::request(&sock, Method::GET, "/v1/keys", None).await?;
            st = serde_json::from_value(v).context("unexpected answer")?;
            if st.rewrap_pending != pending {
                pending = st.rewrap_pending;
                last_change = std::time::Instant::now();
            }
            bar.set_position(total.saturating_sub(st.rewrap_pending));
        }
        let retired = st
            .versions
            .iter()
            .filter(|v| v.state == "retired" && before.get(&v.version).is_some_and(|n| *n > 0))
            .map(|v| v.version)
            .collect();
        (total.saturating_sub(st.rewrap_pending), retired, st)
    } else {
        let cfg2 = cfg.clone();
        let bar2 = bar.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let spool = open_stopped_spool(&cfg2)?;
            bar2.set_length(spool.key_versions_blocking()?.pending());
            let (moved, failed, retired) = rewrap_all_blocking(
                &spool,
                cfg2.keystore.retire_old_versions,
                &|| false,
                &mut |n| bar2.set_position(n),
            )?;
            let mut st = status_blocking(
                &spool,
                &cfg2.node.data_dir,
                &cfg2.keystore.kek_file,
                cfg2.keystore.retire_old_versions,
            )?;
            if failed > 0 {
                st.last_error = Some(format!(
                    "{failed} stored keys fail authentication and cannot be rewrapped; their KEK version cannot be retired"
                ));
            }
            Ok((moved, retired, st))
        })
        .await??
    };
    bar.finish_and_clear();
    if json {
        let out = Rotated {
            version,
            file,
            created,
            node_running: running,
            rewrapped,
            retired,
            status,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "KEK version {version} is the newest: new keys are wrapped under it; {rewrapped} stored keys rewrapped{}",
        if running {
            " by the running node"
        } else {
            " (node stopped)"
        }
    );
    if !retired.is_empty() {
        let files: Vec<String> = retired
            .iter()
            .map(|v| {
                keystore::kek_version_path(&cfg.keystore.kek_file, *v)
                    .display()
                    .to_string()
            })
            .collect();
        println!(
            "retired KEK versions {retired:?}: nothing is wrapped under them any more; destroy {} (and their backups) once your backups of the data directory no longer need them",
            files.join(", ")
        );
    }
    if no_wait && !rotation_done(&status) {
        println!(
            "the node rewraps in the background: `dicom-gateway keys status --config {}` shows it",
            config.display()
        );
    }
    print_keys(&status);
    if let Some(e) = &status.last_error {
        anyhow::bail!("the rotation did not complete: {e}");
    }
    Ok(())
}

/// Is the rotation to the newest version complete: nothing left to rewrap and, with
/// `retire_old_versions`, every older version retired?
fn rotation_done(st: &KeysStatus) -> bool {
    st.rewrap_pending == 0
        && (!st.retire_old_versions || st.versions.iter().all(|v| v.state != "active"))
}

/// `dicom-gateway keys shred`: purge a study and destroy its key, through the running
/// node or on a stopped node's data directory.
pub async fn keys_shred(config: &Path, study: String, json: bool) -> anyhow::Result<()> {
    let cfg = Config::load(config).with_context(|| format!("reading {}", config.display()))?;
    let sock = admin::socket_path(&cfg.node.data_dir);
    let running = node_running(&sock).await?;
    let out: Shredded = if running {
        let body = serde_json::to_vec(&ShredRequest {
            study: study.clone(),
        })?;
        let v = admin::request(&sock, Method::POST, "/v1/keys/shred", Some(body)).await?;
        serde_json::from_value(v).context("unexpected answer")?
    } else {
        let cfg2 = cfg.clone();
        let spool = tokio::task::spawn_blocking(move || open_stopped_spool(&cfg2)).await??;
        let (s2, uid) = (spool.clone(), study.clone());
        let dests: Vec<String> = cfg.destination.iter().map(|d| d.name.clone()).collect();
        let rows = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<_>> {
            let mut rows = Vec::new();
            for d in dests {
                for e in s2.entries_blocking(&d)? {
                    if s2
                        .meta_blocking(e.object)
                        .is_ok_and(|(m, _)| !m.is_hl7() && m.study_uid == uid)
                    {
                        rows.push((d.clone(), e));
                    }
                }
            }
            Ok(rows)
        })
        .await??;
        let (s2, uid) = (spool.clone(), study.clone());
        let existed =
            tokio::task::spawn_blocking(move || s2.study_key_exists_blocking(&uid)).await??;
        let mut out = Shredded::default();
        for (d, e) in rows {
            spool.purge(&d, e).await?;
            out.entries_purged += 1;
        }
        out.retained_purged = spool.purge_retained_study(study.clone()).await?;
        let (s2, uid) = (spool.clone(), study.clone());
        let r = tokio::task::spawn_blocking(move || s2.shred_study_key_blocking(&uid)).await??;
        out.key_shredded = existed || r.key_deleted;
        out.objects_left = r.objects_left;
        spool.quiesce().await;
        out
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "study {study}: {} queue entries and {} retained copies purged{}",
        out.entries_purged,
        out.retained_purged,
        if running { "" } else { " (node stopped)" }
    );
    if out.key_shredded {
        println!(
            "its key is destroyed and compacted out of the database files: nothing of the study that may remain (backups of the data directory included) can be decrypted"
        );
    } else {
        println!(
            "no key of this study was stored: nothing of it is here, or it was shredded already"
        );
    }
    if out.objects_left > 0 {
        println!(
            "{} objects of the study were still stored (being received); they can no longer be read",
            out.objects_left
        );
    }
    Ok(())
}

/// `dicom-gateway verify`: open every stored object and check it, through the running
/// node or on a stopped node's data directory; each failure is quarantined and listed by
/// internal id. Fails (exit 1) when any object failed.
pub async fn verify(config: &Path, json: bool) -> anyhow::Result<()> {
    use crate::verify::{VerifyBatch, VerifyRequest, batch_blocking, parse_id};
    let cfg = Config::load(config).with_context(|| format!("reading {}", config.display()))?;
    let sock = admin::socket_path(&cfg.node.data_dir);
    let running = node_running(&sock).await?;
    let spool = if running {
        None
    } else {
        let cfg2 = cfg.clone();
        Some(tokio::task::spawn_blocking(move || open_stopped_spool(&cfg2)).await??)
    };
    let bar = progress_bar(
        "{spinner} verifying {pos}/{len} objects [{bar:30}] {elapsed} {msg}",
        0,
        json,
    );
    let started = std::time::Instant::now();
    let mut total = VerifyBatch::default();
    let mut after: Option<String> = None;
    loop {
        let b: VerifyBatch = match &spool {
            None => {
                let body = serde_json::to_vec(&VerifyRequest {
                    after: after.clone(),
                })?;
                let v = admin::request(&sock, Method::POST, "/v1/verify", Some(body)).await?;
                serde_json::from_value(v).context("unexpected answer")?
            }
            Some(spool) => {
                let (s, a) = (spool.clone(), after.as_deref().map(parse_id).transpose()?);
                tokio::task::spawn_blocking(move || batch_blocking(&s, a)).await??
            }
        };
        total.checked += b.checked;
        total.bytes += b.bytes;
        total.total = b.total.max(total.checked);
        total.failures.extend(b.failures);
        bar.set_length(total.total as u64);
        bar.set_position(total.checked as u64);
        if !total.failures.is_empty() {
            bar.set_message(format!("{} failed", total.failures.len()));
        }
        match b.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    bar.finish_and_clear();
    if let Some(s) = spool {
        s.quiesce().await;
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "checked": total.checked,
                "bytes": total.bytes,
                "failures": total.failures,
                "node_running": running,
            }))?
        );
    } else {
        println!(
            "verified {} objects ({}) in {:.1} s{}",
            total.checked,
            human_bytes(total.bytes),
            started.elapsed().as_secs_f64(),
            if running { "" } else { " (node stopped)" }
        );
        if !total.failures.is_empty() {
            let mut rows = vec![header(&["ID", "REASON", "DEAD LETTERS", "DETAIL"])];
            for f in &total.failures {
                rows.push(vec![
                    f.id.clone(),
                    f.reason.clone(),
                    f.quarantined.to_string(),
                    f.detail.clone(),
                ]);
            }
            print_table(&rows);
        }
    }
    if !total.failures.is_empty() {
        anyhow::bail!(
            "{} objects failed their check and were quarantined (their entries are dead letters, never forwarded): restore them from the sender, then `dicom-gateway queue purge --config {} --id ID`",
            total.failures.len(),
            config.display()
        );
    }
    if !json {
        println!("every object is authentic and whole");
    }
    Ok(())
}
