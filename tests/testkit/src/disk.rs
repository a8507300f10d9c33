//! Small disks for disk-full tests: a size-limited tmpfs (needs root, as CI runs), and a
//! ballast file that fills a filesystem to a given free space.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A size-limited tmpfs mounted on a folder (a small disk, for disk-full tests); unmounted
/// on drop. Needs root, as CI runs.
pub struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mount a tmpfs of `size` (e.g. `"160m"`) on `dir` (created if missing).
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("mount point");
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(
            st.success(),
            "cannot mount a tmpfs on {} (the disk-full test needs root)",
            dir.display()
        );
        Tmpfs {
            dir: dir.to_owned(),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Fill `dir`'s filesystem with a ballast file until `leave` bytes stay free.
pub fn fill_until_free(dir: &Path, leave: u64) -> PathBuf {
    use std::io::Write;
    let path = dir.join("ballast");
    let free = dicom_gateway::node::free_bytes(dir).expect("statvfs");
    let mut f = std::fs::File::create(&path).expect("ballast");
    let chunk = vec![0xA5u8; 1 << 20];
    let mut left = free.saturating_sub(leave);
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n]).expect("write ballast");
        left -= n as u64;
    }
    f.sync_all().expect("sync ballast");
    path
}
