//! The `folder` destination: Part-10 files for hand-off to another system.
//!
//! This destination writes **plaintext by design**: it is the exit from the encrypted spool
//! for systems that read files. Invariants:
//! - file names are the object's random id (`<hex>.dcm`), never a UID or any peer string;
//! - a file appears under its name only complete and fsynced. Where the filesystem has
//!   `O_TMPFILE` (ext4, xfs, btrfs, tmpfs), it is written to an unnamed inode in the target
//!   folder and linked into place, so nothing partial is ever visible. Where it has not
//!   (NFS, SMB/CIFS, vfat: the usual hand-off shares), it is written to a hidden
//!   `.dicomgw-<hex>.partial` file in the same folder, fsynced, and renamed into place
//!   atomically; partial files a crash left behind are removed at the first send;
//! - the folder is fsynced after the link or rename;
//! - a retry after a crash finds the complete file already there and succeeds;
//! - the folder is created at the first send, not at start-up, so a configured but unused
//!   destination touches nothing;
//! - the 128-byte preamble is written as zeros, whatever the sender put there (a preamble
//!   can make the file a valid executable or TIFF too: CVE-2019-11687).

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{AtFlags, CWD, Mode, OFlags};

use crate::deliver::DeliveryError;
use crate::spool::ObjectReader;

/// Prefix and suffix of the fallback's partial files.
const PARTIAL_PREFIX: &str = ".dicomgw-";
const PARTIAL_SUFFIX: &str = ".partial";

/// Writes objects into a folder.
pub struct FolderSender {
    dir: PathBuf,
    /// The folder exists and stale partial files were cleaned up.
    prepared: AtomicBool,
    /// Use the rename fallback even where `O_TMPFILE` works (tests).
    force_rename: bool,
}

/// An open output file: unnamed (`O_TMPFILE`) or a named partial file.
enum Output {
    Unnamed(File),
    Partial(File, PathBuf),
}

impl FolderSender {
    /// A sender into `dir` (created at the first send).
    pub fn new(dir: &Path) -> FolderSender {
        FolderSender {
            dir: dir.to_owned(),
            prepared: AtomicBool::new(false),
            force_rename: false,
        }
    }

    /// A sender that always uses the temporary-name-and-rename path (for tests of the
    /// fallback on filesystems that do have `O_TMPFILE`).
    pub fn with_rename_fallback(dir: &Path) -> FolderSender {
        FolderSender {
            force_rename: true,
            ..FolderSender::new(dir)
        }
    }

    fn io_error(&self, e: std::io::Error) -> DeliveryError {
        DeliveryError::unavailable("folder_io", format!("folder {}: {e}", self.dir.display()))
    }

    /// Write one object as `<object id>.dcm`.
    pub async fn send(&self, mut reader: ObjectReader) -> Result<(), DeliveryError> {
        let name = format!("{}.dcm", reader.meta.id.hex());
        let dir = self.dir.clone();
        let prepare = !self.prepared.load(Ordering::SeqCst);
        let force_rename = self.force_rename;
        let opened = {
            let name = name.clone();
            tokio::task::spawn_blocking(move || -> std::io::Result<Option<Output>> {
                if prepare {
                    std::fs::create_dir_all(&dir)?;
                    remove_stale_partials(&dir)?;
                }
                if dir.join(&name).exists() {
                    return Ok(None);
                }
                open_output(&dir, &name, force_rename).map(Some)
            })
            .await
            .map_err(|e| DeliveryError::Local {
                detail: e.to_string(),
            })?
            .map_err(|e| self.io_error(e))?
        };
        self.prepared.store(true, Ordering::SeqCst);
        let Some(mut out) = opened else {
            return Ok(());
        };
        let mut at = 0usize;
        while let Some(mut seg) = match reader.next_segment().await {
            Ok(s) => s,
            Err(e) => {
                discard(out).await;
                return Err(DeliveryError::from_spool(e));
            }
        } {
            zero_preamble(&mut seg, at);
            at = at.saturating_add(seg.len());
            out = match tokio::task::spawn_blocking(move || out.file().write_all(&seg).map(|_| out))
                .await
            {
                Ok(Ok(o)) => o,
                Ok(Err(e)) => return Err(self.io_error(e)),
                Err(e) => {
                    return Err(DeliveryError::Local {
                        detail: e.to_string(),
                    });
                }
            };
        }
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            out.file().sync_all()?;
            out.into_place(&dir, &name)?;
            File::open(&dir)?.sync_all()
        })
        .await
        .map_err(|e| DeliveryError::Local {
            detail: e.to_string(),
        })?
        .map_err(|e| self.io_error(e))
    }
}

impl Output {
    fn file(&mut self) -> &mut File {
        match self {
            Output::Unnamed(f) | Output::Partial(f, _) => f,
        }
    }

    /// Give the complete file its name. An existing file of that name is a previous
    /// complete delivery of the same object.
    fn into_place(self, dir: &Path, name: &str) -> std::io::Result<()> {
        let target = dir.join(name);
        match self {
            Output::Unnamed(f) => {
                let src = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&f));
                match rustix::fs::linkat(CWD, src.as_str(), CWD, &target, AtFlags::SYMLINK_FOLLOW) {
                    Ok(()) => Ok(()),
                    Err(e) if e == rustix::io::Errno::EXIST => Ok(()),
                    Err(e) => Err(e.into()),
                }
            }
            Output::Partial(f, path) => {
                drop(f);
                std::fs::rename(&path, &target)
            }
        }
    }
}

/// Open the output for `name` in `dir`: an unnamed `O_TMPFILE` inode where the filesystem
/// supports it, a hidden partial file otherwise.
fn open_output(dir: &Path, name: &str, force_rename: bool) -> std::io::Result<Output> {
    if !force_rename {
        match rustix::fs::open(
            dir,
            OFlags::TMPFILE | OFlags::WRONLY | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o640),
        ) {
            Ok(fd) => return Ok(Output::Unnamed(File::from(fd))),
            // The filesystem (or kernel) has no O_TMPFILE: fall back to a rename.
            Err(e)
                if e == rustix::io::Errno::OPNOTSUPP
                    || e == rustix::io::Errno::ISDIR
                    || e == rustix::io::Errno::INVAL
                    || e == rustix::io::Errno::NOSYS => {}
            Err(e) => return Err(e.into()),
        }
    }
    let stem = name.trim_end_matches(".dcm");
    let path = dir.join(format!("{PARTIAL_PREFIX}{stem}{PARTIAL_SUFFIX}"));
    // A partial file of an earlier attempt of this object is replaced.
    let _ = std::fs::remove_file(&path);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .open(&path)?;
    Ok(Output::Partial(f, path))
}

/// Remove the fallback's partial files that an interrupted delivery left in `dir`.
fn remove_stale_partials(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let n = entry.file_name();
        let n = n.to_string_lossy();
        if n.starts_with(PARTIAL_PREFIX) && n.ends_with(PARTIAL_SUFFIX) {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// Drop an output that will not be completed (a partial file is removed).
async fn discard(out: Output) {
    if let Output::Partial(f, path) = out {
        drop(f);
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(path)).await;
    }
}

/// Zero the bytes of `seg` that fall in the Part-10 preamble, `seg` starting at stream
/// offset `at`.
fn zero_preamble(seg: &mut [u8], at: usize) {
    const PREAMBLE: usize = 128;
    if at < PREAMBLE {
        let n = (PREAMBLE - at).min(seg.len());
        seg[..n].fill(0);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_preamble_is_zeroed_across_segments() {
        let mut a = vec![0xAB; 100];
        let mut b = vec![0xCD; 100];
        super::zero_preamble(&mut a, 0);
        super::zero_preamble(&mut b, 100);
        assert!(a.iter().all(|x| *x == 0));
        assert!(b[..28].iter().all(|x| *x == 0));
        assert!(b[28..].iter().all(|x| *x == 0xCD));
        let mut c = vec![0xEF; 10];
        super::zero_preamble(&mut c, 128);
        assert!(c.iter().all(|x| *x == 0xEF));
    }
}
