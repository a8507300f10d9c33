//! `dicom-gateway demo`: two sites on loopback, end to end, verified byte for byte.
//!
//! Makes a work folder with a fresh development PKI, one KEK per site and two config files,
//! starts site B (link listener → `folder` destination) and site A (DICOM listener →
//! gateway destination B), sends generated studies into A by real C-STORE, waits until B
//! has written every object to its hand-off folder, and checks each data set against what
//! was sent. The generated data is synthetic; the hand-off folder is plaintext by design.
//!
//! Output: a progress bar on a terminal (stderr, `indicatif`; hidden otherwise) and a
//! summary at the end. With `json`, stdout carries only one JSON object (the [`Summary`],
//! or `{"ok": false, "error": ...}`), and the lines for people go to stderr.
//!
//! The two sites and their configs are the layout of [`crate::twosite`], which the
//! end-to-end tests' kit (`dicom-gateway-testkit`) starts too. The helpers here (object
//! generation, a C-STORE sender) are public because the tests and benches generate and send
//! objects the same way; the test fixtures themselves live in the test kit, not here.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use serde::Serialize;

use crate::config::Config;
use crate::deliver::DeliveryError;
use crate::deliver::dicom::{Bytes, Scu};
use crate::node::Node;
use crate::twosite;

/// CT Image Storage.
pub const CT_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.2";
/// Explicit VR Little Endian.
pub const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";

/// A generated object: its identity and its encoded data set.
#[derive(Clone)]
pub struct DemoObject {
    /// SOP Class UID.
    pub sop_class: String,
    /// SOP Instance UID.
    pub sop_instance: String,
    /// Transfer syntax of `dataset`.
    pub transfer_syntax: String,
    /// The encoded data set (no file meta).
    pub dataset: Vec<u8>,
}

/// A fresh UID under 2.25 (UUID-derived).
pub fn new_uid() -> String {
    let mut b = [0u8; 16];
    if keystore::random_bytes(&mut b).is_err() {
        b = fastrand::u128(..).to_be_bytes();
    }
    format!("2.25.{}", u128::from_be_bytes(b))
}

/// Generate one CT-like object of about `pixel_bytes` of random pixel data.
pub fn generate_object(
    study: &str,
    series: &str,
    number: u32,
    patient: &str,
    pixel_bytes: usize,
) -> Result<DemoObject> {
    let sop_instance = new_uid();
    let side = ((pixel_bytes / 2) as f64).sqrt().max(1.0) as u16;
    let n = side as usize * side as usize * 2;
    let mut pixels = vec![0u8; n];
    fastrand::fill(&mut pixels);
    let mut o = InMemDicomObject::new_empty();
    let s = |t, vr, v: &str| DataElement::new(t, vr, PrimitiveValue::from(v));
    o.put(s(tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 192"));
    o.put(s(tags::SOP_CLASS_UID, VR::UI, CT_IMAGE_STORAGE));
    o.put(s(tags::SOP_INSTANCE_UID, VR::UI, &sop_instance));
    o.put(s(tags::MODALITY, VR::CS, "CT"));
    o.put(s(tags::PATIENT_NAME, VR::PN, patient));
    o.put(s(tags::PATIENT_ID, VR::LO, "DEMO-0001"));
    o.put(s(tags::STUDY_INSTANCE_UID, VR::UI, study));
    o.put(s(tags::SERIES_INSTANCE_UID, VR::UI, series));
    o.put(DataElement::new(
        tags::INSTANCE_NUMBER,
        VR::IS,
        PrimitiveValue::from(number.to_string()),
    ));
    o.put(s(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2"));
    o.put(DataElement::new(
        tags::SAMPLES_PER_PIXEL,
        VR::US,
        PrimitiveValue::from(1u16),
    ));
    o.put(DataElement::new(
        tags::ROWS,
        VR::US,
        PrimitiveValue::from(side),
    ));
    o.put(DataElement::new(
        tags::COLUMNS,
        VR::US,
        PrimitiveValue::from(side),
    ));
    o.put(DataElement::new(
        tags::BITS_ALLOCATED,
        VR::US,
        PrimitiveValue::from(16u16),
    ));
    o.put(DataElement::new(
        tags::BITS_STORED,
        VR::US,
        PrimitiveValue::from(16u16),
    ));
    o.put(DataElement::new(
        tags::HIGH_BIT,
        VR::US,
        PrimitiveValue::from(15u16),
    ));
    o.put(DataElement::new(
        tags::PIXEL_REPRESENTATION,
        VR::US,
        PrimitiveValue::from(0u16),
    ));
    o.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OW,
        PrimitiveValue::from(pixels),
    ));
    let mut dataset = Vec::with_capacity(n + 1024);
    let ts = dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN.erased();
    o.write_dataset_with_ts(&mut dataset, &ts)
        .context("encoding a generated data set")?;
    Ok(DemoObject {
        sop_class: CT_IMAGE_STORAGE.to_owned(),
        sop_instance,
        transfer_syntax: EXPLICIT_VR_LE.to_owned(),
        dataset,
    })
}

/// C-STORE `objects` to `address` over one association; returns how many succeeded.
/// `on_sent` is called after each success.
pub async fn send_objects(
    address: &str,
    calling: &str,
    called: &str,
    objects: impl IntoIterator<Item = DemoObject>,
    mut on_sent: impl FnMut(&DemoObject),
) -> Result<usize, DeliveryError> {
    let pairs = vec![(CT_IMAGE_STORAGE.to_owned(), EXPLICIT_VR_LE.to_owned())];
    let mut scu: Option<Scu> = None;
    let mut sent = 0;
    for o in objects {
        if scu
            .as_ref()
            .and_then(|s| s.context_for(&o.sop_class, &o.transfer_syntax))
            .is_none()
        {
            if let Some(old) = scu.take() {
                old.release().await;
            }
            let mut p = pairs.clone();
            p.push((o.sop_class.clone(), o.transfer_syntax.clone()));
            scu = Some(
                Scu::connect(
                    address,
                    calling,
                    called,
                    &p,
                    64 * 1024,
                    Duration::from_secs(30),
                    None,
                )
                .await?,
            );
        }
        let Some(s) = scu.as_mut() else { break };
        let ctx = s
            .context_for(&o.sop_class, &o.transfer_syntax)
            .ok_or_else(|| {
                DeliveryError::permanent("no_presentation_context", "context not accepted")
            })?;
        let mut chunks = Bytes(Some(o.dataset.clone()));
        s.store(ctx, &o.sop_class, &o.sop_instance, &mut chunks, 0)
            .await
            .map_err(crate::deliver::dicom::Stored::into_error)?;
        sent += 1;
        on_sent(&o);
    }
    if let Some(s) = scu {
        s.release().await;
    }
    Ok(sent)
}

/// SHA-256 of a byte slice, hex.
pub fn sha256_hex(data: &[u8]) -> String {
    let mut h = keystore::Sha256::new();
    h.update(data);
    hex::encode(h.finish())
}

/// The data set part of a Part-10 file.
pub fn dataset_of_part10(file: &[u8]) -> Option<&[u8]> {
    let meta = crate::dataset::parse_part10_header(file).ok()??;
    file.get(meta.dataset_offset..)
}

/// Demo settings.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Work folder (created); a fresh one under the system temp dir if `None`.
    pub dir: Option<PathBuf>,
    /// Number of studies.
    pub studies: u32,
    /// Objects per study.
    pub objects_per_study: u32,
    /// Approximate size of each object in KiB.
    pub object_kib: usize,
    /// Keep both sites running after the check (until Ctrl-C or SIGTERM).
    pub keep_running: bool,
    /// Keep the work folder at the end; by default it is removed, on success, on failure
    /// and on Ctrl-C (SIGINT) or SIGTERM.
    pub keep: bool,
    /// Print the summary as one JSON object on stdout (the lines for people go to stderr).
    pub json: bool,
}

/// What the demo measured, printed at the end (as JSON with `--json`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// True if every object arrived identical.
    pub ok: bool,
    /// Objects sent into site A.
    pub objects: usize,
    /// Objects site B delivered with exactly the data set sent.
    pub delivered_identical: usize,
    /// Data set bytes sent.
    pub bytes: u64,
    /// From the first C-STORE to the last delivery, in seconds.
    pub seconds: f64,
    /// Objects per second over `seconds`.
    pub objects_per_second: f64,
    /// MiB per second over `seconds`.
    pub mib_per_second: f64,
    /// The work folder.
    pub work_folder: PathBuf,
    /// True if the work folder was kept (`--keep`).
    pub work_folder_kept: bool,
}

/// A line for people: stdout, or stderr when stdout carries JSON.
macro_rules! say {
    ($json:expr, $($t:tt)*) => {
        if $json { eprintln!($($t)*) } else { println!($($t)*) }
    };
}

/// Run the demo. The work folder is removed at the end, whatever the outcome, including
/// Ctrl-C (SIGINT) and SIGTERM, unless `opts.keep`; the nodes are stopped first, so
/// nothing writes into it while it is removed.
pub async fn run(opts: DemoOptions) -> Result<()> {
    // Install the signal handlers before anything exists on disk, so that a signal from
    // here on reaches this code and not the default action (which would leave the folder).
    let mut signals = Signals::new()?;
    let (dir, created) = match &opts.dir {
        Some(d) => (d.clone(), !d.exists()),
        None => (
            std::env::temp_dir().join(format!(
                "dicom-gateway-demo-{}-{}",
                std::process::id(),
                crate::spool::now_ms()
            )),
            true,
        ),
    };
    if dir.exists() && std::fs::read_dir(&dir)?.next().is_some() {
        bail!(
            "{} exists and is not empty; give another --dir",
            dir.display()
        );
    }
    std::fs::create_dir_all(&dir)?;
    let json = opts.json;
    say!(json, "work folder: {}", dir.display());

    let nodes = Nodes::default();
    let mut summary = None;
    let ended = tokio::select! {
        r = run_in(&opts, &dir, &nodes, &mut summary) => Ok(r),
        name = signals.recv() => Err(name),
    };
    let outcome = match ended {
        Ok(r) => r,
        Err(name) => {
            say!(json, "");
            if summary.is_some() && opts.keep_running {
                say!(json, "{name}: stopping");
                Ok(())
            } else {
                Err(anyhow::anyhow!("interrupted by {name}"))
            }
        }
    };
    // A node whose start was under way when the signal came finishes starting (its task
    // owns it), so that it can be stopped; then site A first, as it sends to site B.
    nodes.starting.close();
    nodes.starting.wait().await;
    let started = std::mem::take(&mut *nodes.lock());
    for node in started.into_iter().rev() {
        node.stop().await;
    }
    if opts.keep {
        say!(json, "work folder kept: {}", dir.display());
    } else {
        let remove = || {
            if created {
                std::fs::remove_dir_all(&dir)
            } else {
                remove_contents(&dir)
            }
        };
        // RocksDB closes when the last spool handle drops, which a stray task may still
        // hold for a moment after `stop`: a file can appear while the folder is removed.
        let mut removed = remove();
        for _ in 0..20 {
            if removed.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            removed = remove();
        }
        match removed {
            Ok(()) => say!(json, "work folder removed (--keep keeps it)"),
            Err(e) => eprintln!("warning: cannot remove {}: {e}", dir.display()),
        }
    }
    if json {
        let v = match (&outcome, summary) {
            (Ok(()), Some(mut s)) => {
                s.work_folder = dir.clone();
                s.work_folder_kept = opts.keep;
                serde_json::to_value(s)?
            }
            (Ok(()), None) => serde_json::json!({ "ok": false, "error": "no summary" }),
            (Err(e), _) => serde_json::json!({ "ok": false, "error": format!("{e:#}") }),
        };
        println!("{v}");
    }
    outcome
}

/// A progress bar on stderr if it is a terminal, hidden otherwise.
fn progress_bar(total: u64) -> indicatif::ProgressBar {
    let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        indicatif::ProgressBar::new(total)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} delivered {pos}/{len} [{bar:30}] {elapsed} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// Remove what is inside `dir` (a folder the user gave, which existed empty).
fn remove_contents(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() && !path.is_symlink() {
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// SIGINT and SIGTERM, installed once (the gateway is Unix-only).
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            int: signal(SignalKind::interrupt()).context("installing a SIGINT handler")?,
            term: signal(SignalKind::terminate()).context("installing a SIGTERM handler")?,
        })
    }

    /// Wait for the next signal; returns its name.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
        }
    }
}

/// The demo's nodes. Each is started in a task of its own that puts it here, so a node
/// whose start is under way when the demo is interrupted is still started and can then be
/// stopped (dropping `Node::start` half-way would leave its spool opening in the
/// background, writing into the folder being removed).
#[derive(Default)]
struct Nodes {
    started: std::sync::Arc<std::sync::Mutex<Vec<Node>>>,
    starting: tokio_util::task::TaskTracker,
}

/// What the demo needs of a started node.
struct NodeAddrs {
    dicom: Option<std::net::SocketAddr>,
    link: Option<std::net::SocketAddr>,
    http: Option<std::net::SocketAddr>,
}

fn lock(v: &std::sync::Mutex<Vec<Node>>) -> std::sync::MutexGuard<'_, Vec<Node>> {
    v.lock().unwrap_or_else(|e| e.into_inner())
}

impl Nodes {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Node>> {
        lock(&self.started)
    }

    /// Start a node from `path`. Cancellation-safe: the start runs to its end in its own
    /// task, which keeps the node here for the caller of [`run`] to stop.
    async fn start(&self, path: &Path, what: &'static str) -> Result<NodeAddrs> {
        let cfg = Config::load(path)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let started = self.started.clone();
        self.starting.spawn(async move {
            let result = Node::start(cfg).await.map(|node| {
                let addrs = NodeAddrs {
                    dicom: node.dicom_addrs.get(twosite::A_LISTENER).copied(),
                    link: node.link_addrs.get(twosite::B_LISTENER).copied(),
                    http: node.http_addr,
                };
                lock(&started).push(node);
                addrs
            });
            let _ = tx.send(result);
        });
        rx.await
            .context("node start task ended")?
            .with_context(|| format!("starting {what}"))
    }
}

/// The demo inside its work folder; `summary` is set once every object has been checked.
async fn run_in(
    opts: &DemoOptions,
    dir: &Path,
    nodes: &Nodes,
    summary: &mut Option<Summary>,
) -> Result<()> {
    let json = opts.json;
    twosite::init(dir)?;
    let received = dir.join("received");

    let b_path = dir.join(twosite::B_CONFIG);
    let site_b = twosite::SiteB::new(twosite::Delivery::Folder {
        path: "received".to_owned(),
    });
    twosite::write(&b_path, &site_b.toml())?;
    let b = nodes.start(&b_path, "site B").await?;
    let link = b.link.context("site B has no link listener")?;
    let a_path = dir.join(twosite::A_CONFIG);
    twosite::write(&a_path, &twosite::SiteA::new(link).toml())?;
    let a = nodes.start(&a_path, "site A").await?;
    let dicom = a.dicom.context("site A has no DICOM listener")?;
    say!(
        json,
        "site A: DICOM GW_A@{dicom}   site B: link https://{link} (mutual TLS 1.3)"
    );

    let total = (opts.studies * opts.objects_per_study) as usize;
    let pixel_bytes = opts.object_kib * 1024;
    say!(
        json,
        "sending {total} objects ({} studies x {}, ~{} KiB each) into site A by C-STORE...",
        opts.studies,
        opts.objects_per_study,
        opts.object_kib
    );
    let bar = progress_bar(total as u64);
    let started = Instant::now();
    let mut expected: HashMap<String, usize> = HashMap::new();
    let mut bytes_sent = 0u64;
    let mut sent = 0usize;
    let mut last_count = Instant::now();
    for s in 0..opts.studies {
        let study = new_uid();
        let series = new_uid();
        let patient = format!("DEMO^PATIENT^{}", s + 1);
        let mut batch = Vec::new();
        for i in 0..opts.objects_per_study {
            batch.push(generate_object(
                &study,
                &series,
                i + 1,
                &patient,
                pixel_bytes,
            )?);
        }
        for o in &batch {
            *expected.entry(sha256_hex(&o.dataset)).or_default() += 1;
            bytes_sent += o.dataset.len() as u64;
        }
        send_objects(&dicom.to_string(), "DEMO_SCU", "GW_A", batch, |_| {
            sent += 1;
            bar.set_message(format!("(sent {sent}/{total})"));
            if last_count.elapsed() > Duration::from_millis(250) {
                last_count = Instant::now();
                bar.set_position(count_files(&received) as u64);
            }
        })
        .await
        .map_err(|e| anyhow::anyhow!("C-STORE into site A failed: {e}"))?;
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let delivered = count_files(&received);
        bar.set_position(delivered as u64);
        if delivered >= total {
            break;
        }
        if Instant::now() > deadline {
            bar.abandon();
            bail!(
                "timed out: {delivered} of {total} objects delivered in 600 s; run again with --keep and read the logs of both sites in the work folder"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let elapsed = started.elapsed();
    bar.finish_and_clear();

    // Verify every delivered file byte for byte (its data set against what was sent).
    let mut ok = 0usize;
    let mut bad = Vec::new();
    for entry in std::fs::read_dir(&received)? {
        let path = entry?.path();
        let data = std::fs::read(&path)?;
        match dataset_of_part10(&data).map(sha256_hex) {
            Some(h) => match expected.get_mut(&h) {
                Some(n) if *n > 0 => {
                    *n -= 1;
                    ok += 1;
                }
                _ => bad.push(path),
            },
            None => bad.push(path),
        }
    }
    let secs = elapsed.as_secs_f64().max(1e-9);
    let s = Summary {
        ok: bad.is_empty() && ok == total,
        objects: total,
        delivered_identical: ok,
        bytes: bytes_sent,
        seconds: secs,
        objects_per_second: total as f64 / secs,
        mib_per_second: bytes_sent as f64 / 1048576.0 / secs,
        ..Summary::default()
    };
    say!(json, "summary:");
    say!(json, "  objects   {ok}/{total} delivered identical");
    say!(
        json,
        "  bytes     {bytes_sent} ({:.1} MiB)",
        bytes_sent as f64 / 1048576.0
    );
    say!(json, "  time      {secs:.2} s");
    say!(
        json,
        "  rate      {:.1} objects/s, {:.1} MiB/s",
        s.objects_per_second,
        s.mib_per_second
    );
    if !bad.is_empty() || ok != total {
        bail!(
            "{} objects differ or are missing; first: {:?}",
            total - ok,
            bad.first()
        );
    }
    say!(
        json,
        "  site A spool and site B spool hold only ciphertext; the hand-off folder {} is plaintext by design",
        received.display()
    );
    *summary = Some(s);

    if opts.keep_running {
        say!(json, "");
        say!(json, "both sites keep running; press Ctrl-C to stop.");
        say!(
            json,
            "  send to site A:  TCP_NODELAY=1 storescu -aec GW_A {} {} FILE.dcm",
            dicom.ip(),
            dicom.port()
        );
        say!(json, "  site B writes:   {}", received.display());
        if let Some(h) = a.http {
            say!(json, "  site A metrics:  http://{h}/metrics");
        }
        if let Some(h) = b.http {
            say!(json, "  site B metrics:  http://{h}/metrics");
        }
        // The caller's signal branch ends the demo.
        std::future::pending::<()>().await;
    }
    Ok(())
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "dcm"))
            })
            .count()
        })
        .unwrap_or(0)
}
