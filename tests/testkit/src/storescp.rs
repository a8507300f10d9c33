//! DCMTK's `storescp` as the PACS: a child process, killed on drop.
//!
//! `storescp` is an external process that cannot report a port it bound, so this module
//! picks a port for it (a loopback port the kernel hands out, then released) and then
//! checks that the child itself listens on it: its listening socket must appear among the
//! child's open files (`/proc`). If `storescp` exits instead (the port was taken in the
//! meantime), it is started again on another port; when the port is fixed (a PACS a config
//! already names), it is tried again on the same port. A connection that succeeds is not
//! taken as proof, since another process may hold the port.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// DCMTK's storescp (pynetdicom installs its own `storescp` earlier on PATH).
pub const STORESCP: &str = "/usr/bin/storescp";

/// Starts tried before giving up.
const ATTEMPTS: usize = 5;

/// A running DCMTK storescp, killed on drop.
pub struct Storescp {
    child: Child,
    /// Its port.
    pub port: u16,
    /// Where it writes received files.
    pub out: PathBuf,
}

impl Storescp {
    /// Start `storescp +B +uf +xa` on a free port with AE title `STORESCP`.
    pub fn start(out: &Path) -> Storescp {
        Self::start_args(out, &["+xa"])
    }

    /// Start `storescp +B +uf` with `args` (e.g. `+xi` to accept Implicit VR Little Endian
    /// only) on a free port, with AE title `STORESCP`; another port if it cannot listen.
    pub fn start_args(out: &Path, args: &[&str]) -> Storescp {
        let mut errors = Vec::new();
        for _ in 0..ATTEMPTS {
            match Self::spawn(out, pick_port(), args) {
                Ok(s) => return s,
                Err(e) => errors.push(e),
            }
        }
        panic!("storescp did not start: {errors:?}")
    }

    /// Start `storescp +B +uf` with `args` on `port` (a PACS whose address a config names
    /// already, restarted), with AE title `STORESCP`; tried again on the same port a few
    /// times if it cannot listen.
    pub fn start_with(out: &Path, port: u16, args: &[&str]) -> Storescp {
        let mut errors = Vec::new();
        for _ in 0..ATTEMPTS {
            match Self::spawn(out, port, args) {
                Ok(s) => return s,
                Err(e) => errors.push(e),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("storescp did not start on port {port}: {errors:?}")
    }

    /// One start: `Ok` once the child listens on `port`, `Err` if it exits first.
    fn spawn(out: &Path, port: u16, args: &[&str]) -> Result<Storescp, String> {
        assert!(
            Path::new(STORESCP).exists(),
            "{STORESCP} is missing: install Debian's dcmtk (.ci/run does)"
        );
        std::fs::create_dir_all(out).expect("storescp output dir");
        let mut child = Command::new(STORESCP)
            .env("TCP_NODELAY", "1")
            .args(["+B", "+uf", "-aet", "STORESCP"])
            .args(args)
            .arg("-od")
            .arg(out)
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start storescp");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().expect("storescp status") {
                return Err(format!("port {port}: storescp exited ({status})"));
            }
            if listens_on(child.id(), port) {
                return Ok(Storescp {
                    child,
                    port,
                    out: out.to_owned(),
                });
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("port {port}: storescp did not listen within 10 s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Data set SHA-256 of every file received, counted.
    pub fn received(&self) -> HashMap<String, usize> {
        crate::files::received_datasets(&self.out)
    }

    /// Number of files received.
    pub fn count(&self) -> usize {
        std::fs::read_dir(&self.out).map(|d| d.count()).unwrap_or(0)
    }
}

impl Drop for Storescp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port the kernel hands out, released at once: only for a process that cannot
/// bind port 0 and report what it got. Whoever uses it must check that it got it.
fn pick_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// True if process `pid` holds a TCP socket listening on `port` (IPv4 or IPv6), read from
/// `/proc/net/tcp*` and the process's open files.
pub(crate) fn listens_on(pid: u32, port: u16) -> bool {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
                continue;
            };
            let listening = *state == "0A";
            let this_port = local
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if listening && this_port == Some(port) {
                inodes.push(format!("socket:[{inode}]"));
            }
        }
    }
    if inodes.is_empty() {
        return false;
    }
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .any(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a port another process holds, storescp exits, and that is seen as a failure even
    /// though the port answers connections; a start on a port of its own then succeeds.
    #[test]
    fn a_taken_port_is_a_failed_start_and_another_port_is_tried() {
        let tmp = tempfile::tempdir().unwrap();
        let holder = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let taken = holder.local_addr().unwrap().port();
        let r = Storescp::spawn(&tmp.path().join("pacs"), taken, &["+xa"]);
        assert!(r.is_err(), "storescp cannot listen on a taken port");
        assert!(std::net::TcpStream::connect(("127.0.0.1", taken)).is_ok());
        let pacs = Storescp::start(&tmp.path().join("pacs"));
        assert_ne!(pacs.port, taken);
        assert!(listens_on(pacs.child.id(), pacs.port));
    }
}
