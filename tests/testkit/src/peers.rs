//! Independent DICOM tools, driven as processes: pynetdicom as a sender (each file's bytes
//! unchanged) and as a bit-keeping PACS ([`RawScp`]), DCMTK's `dcmconv` to re-encode files.
//! The pynetdicom scripts are `tests/interop/send_pynetdicom.py` and
//! `tests/interop/raw_scp.py`, shared with the interop scripts.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Send files with pynetdicom (an independent sender: each file on a context of its own
/// SOP class and transfer syntax, its bytes unchanged). Returns how many were stored.
pub fn send_with_pynetdicom(addr: SocketAddr, called: &str, files: &[PathBuf]) -> usize {
    send_with_pynetdicom_args(addr, called, &[], files)
}

/// [`send_with_pynetdicom`] with extra options of the script, e.g. `--as-is` to send an
/// odd-length (malformed) data set unchanged.
pub fn send_with_pynetdicom_args(
    addr: SocketAddr,
    called: &str,
    extra: &[&str],
    files: &[PathBuf],
) -> usize {
    send_with_pynetdicom_report(addr, called, extra, files).stored
}

/// What pynetdicom reported of one run of the sending script.
#[derive(Debug, Clone)]
pub struct PynetdicomReport {
    /// Files stored with status Success.
    pub stored: usize,
    /// Everything the script printed: one `pynetdicom: FAILED <file>: <why>` line per file
    /// not stored, with the DIMSE status the SCP answered (`status 0xA700`) when it answered.
    pub output: String,
}

impl PynetdicomReport {
    /// The status pynetdicom got for `file`: `None` if it was stored, otherwise the reason
    /// it printed (e.g. `status 0xA700`).
    pub fn failure_of(&self, file: &Path) -> Option<String> {
        let prefix = format!("pynetdicom: FAILED {}: ", file.display());
        self.output
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map(str::to_owned)
    }
}

/// [`send_with_pynetdicom_args`], returning the script's report (what each refused file
/// was answered) as well as the count.
pub fn send_with_pynetdicom_report(
    addr: SocketAddr,
    called: &str,
    extra: &[&str],
    files: &[PathBuf],
) -> PynetdicomReport {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../interop/send_pynetdicom.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(addr.ip().to_string())
        .arg(addr.port().to_string())
        .args(["--called-ae", called])
        .args(extra)
        .args(files)
        .output()
        .expect("run python3 (pynetdicom): .ci/run installs it");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with("pynetdicom: ") && l.contains(" stored"))
        .unwrap_or_else(|| {
            panic!(
                "no summary from pynetdicom:\n{text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let stored = line
        .trim_start_matches("pynetdicom: ")
        .split('/')
        .next()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("unexpected summary {line:?}"));
    PynetdicomReport {
        stored,
        output: text,
    }
}

/// Convert Part-10 files to Implicit VR Little Endian in place, with DCMTK's dcmconv.
pub fn to_implicit(files: &[PathBuf]) {
    for f in files {
        let tmp = f.with_extension("implicit");
        let st = Command::new("/usr/bin/dcmconv")
            .arg("+ti")
            .arg(f)
            .arg(&tmp)
            .status()
            .expect("dcmconv (DCMTK)");
        assert!(st.success(), "dcmconv failed on {}", f.display());
        std::fs::rename(&tmp, f).expect("rename");
    }
}

/// pynetdicom as a PACS that keeps each data set's bytes as they came, parsed or not
/// (`tests/interop/raw_scp.py`): it takes what DCMTK's `storescp` aborts on, such as a data
/// set truncated mid-element. AE title `STORESCP`, like [`crate::Storescp`]; killed on drop.
pub struct RawScp {
    child: Child,
    /// Where it writes received files (Part-10: a file meta group, then the data set's bytes).
    pub out: PathBuf,
}

impl RawScp {
    /// Start it on `port` (a PACS address a config names already); tried a few times.
    pub fn start_with(out: &Path, port: u16) -> RawScp {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../interop/raw_scp.py");
        std::fs::create_dir_all(out).expect("raw_scp output dir");
        let mut errors = Vec::new();
        for _ in 0..5 {
            let mut child = Command::new("python3")
                .arg(&script)
                .arg(port.to_string())
                .arg(out)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("run python3 (pynetdicom): .ci/run installs it");
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Some(status) = child.try_wait().expect("raw_scp status") {
                    errors.push(format!("raw_scp exited ({status})"));
                    break;
                }
                if crate::storescp::listens_on(child.id(), port) {
                    return RawScp {
                        child,
                        out: out.to_owned(),
                    };
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    errors.push("raw_scp did not listen within 20 s".to_owned());
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("raw_scp did not start on port {port}: {errors:?}")
    }

    /// Data set SHA-256 of every file received, counted.
    pub fn received(&self) -> HashMap<String, usize> {
        crate::files::received_datasets(&self.out)
    }
}

impl Drop for RawScp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A file of pydicom's test data (files nobody here wrote).
pub fn pydicom_file(name: &str) -> PathBuf {
    let out = Command::new("python3")
        .args([
            "-c",
            &format!("import pydicom.data as d; print(d.get_testdata_file({name:?}))"),
        ])
        .output()
        .expect("python3 with pydicom: .ci/run installs it");
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(p.is_file(), "pydicom test file {name} not found: {p:?}");
    p
}
