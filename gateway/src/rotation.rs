//! KEK rotation on a running node, and the status of its KEK versions.
//!
//! Owns the node's background rotation task: it looks for new KEK version files next to
//! `keystore.kek_file` (every [`RESCAN`], or at once when `keys rotate` asks through the
//! admin socket), installs them in the spool, rewraps every stored key under the newest
//! version in batches, and, with `retire_old_versions`, retires the older versions once
//! nothing is under them. `keys rotate` and `keys status` on a stopped node use the same
//! functions on a spool they open themselves.
//!
//! Invariants:
//! - A reload and its install run in a blocking task that owns what it touches, under
//!   [`Rotation`]'s lock: a dropped admin request never leaves half a reload, and two
//!   reloads never interleave.
//! - Every rewrap batch and every retirement runs in a blocking task of its own; dropping
//!   the task that started one only stops the next (see `spool::rotate` for why any point
//!   is a safe one to stop at).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::spool::{Spool, kek_check};

/// How often a running node looks for new KEK version files.
pub const RESCAN: Duration = Duration::from_secs(30);
/// Keys moved per rewrap batch (one synced write each).
pub const REWRAP_BATCH: usize = 512;

/// One KEK version in [`KeysStatus`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VersionView {
    /// The version.
    pub version: u32,
    /// Its file.
    pub file: PathBuf,
    /// Whether the file is there now.
    pub file_present: bool,
    /// Stored keys wrapped under it (study keys and the index key).
    pub keys: u64,
    /// `newest` (new keys are wrapped under it), `active` (still unwraps keys),
    /// `retired` (never used again) or `new` (a file not yet in use).
    pub state: String,
}

/// `GET /v1/keys`, and what `keys status` and `keys rotate` print.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeysStatus {
    /// The version new keys are wrapped under.
    pub newest: u32,
    /// Every version recorded in the data directory or present as a file.
    pub versions: Vec<VersionView>,
    /// Keys still under older versions (the rewrap's work left).
    pub rewrap_pending: u64,
    /// Whether older versions are retired once the rewrap is done.
    pub retire_old_versions: bool,
    /// The last rotation error on a running node.
    #[serde(default)]
    pub last_error: Option<String>,
}

/// The status of the spool's KEK versions. Blocking (file and database I/O).
pub fn status_blocking(
    spool: &Spool,
    data_dir: &Path,
    kek_file: &Path,
    retire: bool,
) -> anyhow::Result<KeysStatus> {
    let counts = spool.key_versions_blocking()?;
    let recorded = kek_check::recorded_blocking(data_dir)?;
    let files = keystore::kek_version_files(kek_file)?;
    let ring = spool.ring();
    let mut versions: std::collections::BTreeSet<u32> = recorded.keys().copied().collect();
    versions.extend(files.iter().map(|(v, _)| *v));
    versions.extend(ring.versions());
    let views = versions
        .into_iter()
        .map(|v| {
            let state = if v == counts.newest {
                "newest"
            } else if ring.get(v).is_some() {
                "active"
            } else if recorded.get(&v).is_some_and(|r| r.retired) {
                "retired"
            } else {
                "new"
            };
            VersionView {
                version: v,
                file: keystore::kek_version_path(kek_file, v),
                file_present: files.iter().any(|(f, _)| *f == v),
                keys: counts.by_version.get(&v).copied().unwrap_or(0),
                state: state.to_owned(),
            }
        })
        .collect();
    Ok(KeysStatus {
        newest: counts.newest,
        versions: views,
        rewrap_pending: counts.pending(),
        retire_old_versions: retire,
        last_error: None,
    })
}

/// Load the version files found now and install them if the ring in use lacks one of
/// them (retired versions aside). Returns whether a new version was installed. Blocking.
pub fn reload_blocking(spool: &Spool, data_dir: &Path, kek_file: &Path) -> anyhow::Result<bool> {
    let files = keystore::kek_version_files(kek_file)?;
    let recorded = kek_check::recorded_blocking(data_dir)?;
    let ring = spool.ring();
    let new = files
        .iter()
        .any(|(v, _)| ring.get(*v).is_none() && !recorded.get(v).is_some_and(|r| r.retired));
    for v in ring.versions() {
        if !files.iter().any(|(f, _)| *f == v) {
            warn!(
                kek_version = v,
                "the file of KEK version {v}, which is in use, is gone: this node can go on, but will not start again without it until the version is retired"
            );
        }
    }
    if !new {
        return Ok(false);
    }
    let loaded = keystore::KekRing::load(kek_file)
        .with_context(|| format!("loading the KEK versions next to {}", kek_file.display()))?;
    spool.install_ring_blocking(loaded)?;
    info!(
        kek_version = spool.ring().newest().kek_id(),
        "new keys are wrapped under KEK version {}; stored keys are rewrapped in the background",
        spool.ring().newest().kek_id()
    );
    Ok(true)
}

/// Rewrap every stored key under the newest version, in batches, calling `progress` with
/// the keys moved so far; then retire older versions if `retire`. Returns the keys moved
/// and those that could not be (they fail authentication). Blocking.
pub fn rewrap_all_blocking(
    spool: &Spool,
    retire: bool,
    stop: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(u64),
) -> anyhow::Result<(u64, usize, Vec<u32>)> {
    let mut moved = 0u64;
    let failed = loop {
        if stop() {
            return Ok((moved, 0, Vec::new()));
        }
        let step = spool.rewrap_batch_blocking(REWRAP_BATCH)?;
        moved += step.moved as u64;
        progress(moved);
        if step.remaining == 0 || step.moved == 0 {
            break step.failed;
        }
    };
    let retired = if retire && failed == 0 {
        spool.retire_old_versions_blocking()?
    } else {
        Vec::new()
    };
    Ok((moved, failed, retired))
}

/// The rotation state of a running node, shared by its background task and the admin
/// socket.
pub struct Rotation {
    spool: Spool,
    data_dir: PathBuf,
    kek_file: PathBuf,
    retire: bool,
    /// Serialises reloads and rewraps.
    lock: Arc<tokio::sync::Mutex<()>>,
    wake: Notify,
    last_error: Mutex<Option<String>>,
}

impl Rotation {
    /// The rotation state of a node with this spool and `[keystore]` section.
    pub fn new(spool: Spool, data_dir: PathBuf, kek_file: PathBuf, retire: bool) -> Rotation {
        Rotation {
            spool,
            data_dir,
            kek_file,
            retire,
            lock: Arc::new(tokio::sync::Mutex::new(())),
            wake: Notify::new(),
            last_error: Mutex::new(None),
        }
    }

    fn set_error(&self, e: Option<String>) {
        if let Ok(mut l) = self.last_error.lock() {
            *l = e;
        }
    }

    /// Look for new version files now, and wake the background task to rewrap. Returns
    /// whether a new version was installed.
    pub async fn reload(&self) -> anyhow::Result<bool> {
        self.reload_with_status().await.map(|(new, _)| new)
    }

    /// `POST /v1/keys/reload`: [`Rotation::reload`], and the status right after it, before
    /// the rewrap begins (so that its `rewrap_pending` is the rewrap's whole work).
    pub async fn reload_with_status(&self) -> anyhow::Result<(bool, KeysStatus)> {
        let guard = self.lock.clone().lock_owned().await;
        let (spool, dir, file, retire) = (
            self.spool.clone(),
            self.data_dir.clone(),
            self.kek_file.clone(),
            self.retire,
        );
        let r = tokio::task::spawn_blocking(move || {
            let _guard = guard;
            let new = reload_blocking(&spool, &dir, &file)?;
            Ok::<_, anyhow::Error>((new, status_blocking(&spool, &dir, &file, retire)?))
        })
        .await
        .context("KEK reload task")?;
        match &r {
            Ok((true, _)) => {
                self.set_error(None);
                self.wake.notify_one();
            }
            Ok((false, _)) => {}
            Err(e) => self.set_error(Some(format!("{e:#}"))),
        }
        r.map(|(new, mut st)| {
            st.last_error = self.last_error.lock().ok().and_then(|l| l.clone());
            (new, st)
        })
    }

    /// `GET /v1/keys`.
    pub async fn status(&self) -> anyhow::Result<KeysStatus> {
        let (spool, dir, file, retire) = (
            self.spool.clone(),
            self.data_dir.clone(),
            self.kek_file.clone(),
            self.retire,
        );
        let mut s =
            tokio::task::spawn_blocking(move || status_blocking(&spool, &dir, &file, retire))
                .await
                .context("KEK status task")??;
        s.last_error = self.last_error.lock().ok().and_then(|l| l.clone());
        Ok(s)
    }

    /// The background task: reload, rewrap, retire, then wait for [`RESCAN`] or a wake-up,
    /// until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        loop {
            if let Err(e) = self.reload().await {
                warn!(error = %format!("{e:#}"), "KEK reload failed; it is tried again in {} s", RESCAN.as_secs());
            }
            let guard = self.lock.clone().lock_owned().await;
            let (spool, retire, stopped) = (self.spool.clone(), self.retire, stop.clone());
            let r = tokio::task::spawn_blocking(move || {
                let _guard = guard;
                let r =
                    rewrap_all_blocking(&spool, retire, &|| stopped.is_cancelled(), &mut |_| {});
                // The counts behind `kek_wrapped_keys`.
                let _ = spool.key_versions_blocking();
                r
            })
            .await;
            match r {
                Ok(Ok((moved, failed, retired))) => {
                    if moved > 0 {
                        info!(
                            keys = moved,
                            "rewrapped stored keys under the newest KEK version"
                        );
                    }
                    if failed > 0 {
                        let msg = format!(
                            "{failed} stored keys fail authentication and cannot be rewrapped; their KEK version cannot be retired"
                        );
                        warn!("{msg}");
                        self.set_error(Some(msg));
                    } else if moved > 0 || !retired.is_empty() {
                        self.set_error(None);
                    }
                }
                Ok(Err(e)) => {
                    warn!(error = %format!("{e:#}"), "rewrap failed; it is tried again in {} s", RESCAN.as_secs());
                    self.set_error(Some(format!("{e:#}")));
                }
                Err(e) => warn!(error = %e, "rewrap task failed"),
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(RESCAN) => {}
                _ = self.wake.notified() => {}
            }
        }
    }
}
