//! The `folder` destination: Part-10 files for hand-off to another system.
//!
//! This destination writes **plaintext by design**: it is the exit from the encrypted spool
//! for systems that read files. Invariants:
//! - file names are the object's random id (`<hex>.dcm`), never a UID or any peer string;
//! - a file appears under its name only complete and fsynced: it is written to an unnamed
//!   `O_TMPFILE` inode in the target folder and linked into place afterwards, so no partial
//!   or temporary file is ever visible; the folder is fsynced after the link;
//! - a retry after a crash finds the complete file already there and succeeds;
//! - the 128-byte preamble is written as zeros, whatever the sender put there (a preamble
//!   can make the file a valid executable or TIFF too: CVE-2019-11687).

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::dispatch::SendError;
use crate::spool::ObjectReader;

/// Writes objects into a folder.
pub struct FolderSender {
    dir: PathBuf,
}

impl FolderSender {
    /// A sender into `dir` (created if missing).
    pub fn new(dir: &Path) -> std::io::Result<FolderSender> {
        std::fs::create_dir_all(dir)?;
        Ok(FolderSender {
            dir: dir.to_owned(),
        })
    }

    /// Write one object as `<object id>.dcm`.
    pub async fn send(&self, mut reader: ObjectReader) -> Result<(), SendError> {
        let name = format!("{}.dcm", reader.meta.id.hex());
        let target = self.dir.join(&name);
        if tokio::fs::try_exists(&target).await.unwrap_or(false) {
            return Ok(());
        }
        let dir = self.dir.clone();
        let io =
            |e: std::io::Error| SendError::Transient(format!("folder {}: {e}", self.dir.display()));
        let mut file = tokio::task::spawn_blocking(move || open_unnamed(&dir))
            .await
            .map_err(|e| SendError::Transient(e.to_string()))?
            .map_err(io)?;
        let mut at = 0usize;
        while let Some(mut seg) = reader
            .next_segment()
            .await
            .map_err(|e| SendError::Transient(format!("spool: {e}")))?
        {
            zero_preamble(&mut seg, at);
            at = at.saturating_add(seg.len());
            file = tokio::task::spawn_blocking(move || file.write_all(&seg).map(|_| file))
                .await
                .map_err(|e| SendError::Transient(e.to_string()))?
                .map_err(io)?;
        }
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            file.sync_all()?;
            link_into_place(&file, &dir, &name)?;
            File::open(&dir)?.sync_all()
        })
        .await
        .map_err(|e| SendError::Transient(e.to_string()))?
        .map_err(io)
    }
}

/// An unnamed file in `dir` (Linux `O_TMPFILE`): invisible until linked.
fn open_unnamed(dir: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .mode(0o640)
        .open(dir)
}

/// Give the unnamed file its name. An existing file of that name is a previous complete
/// delivery of the same object.
fn link_into_place(file: &File, dir: &Path, name: &str) -> std::io::Result<()> {
    let src = format!("/proc/self/fd/{}", file.as_raw_fd());
    let rc = rustix::fs::linkat(
        rustix::fs::CWD,
        src.as_str(),
        rustix::fs::CWD,
        dir.join(name).as_path(),
        rustix::fs::AtFlags::SYMLINK_FOLLOW,
    );
    match rc {
        Ok(()) | Err(rustix::io::Errno::EXIST) => Ok(()),
        Err(e) => Err(e.into()),
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
