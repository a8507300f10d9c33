//! Independent DICOM tools, driven as processes: pynetdicom as a sender (each file's bytes
//! unchanged), DCMTK's `dcmconv` to re-encode files. The pynetdicom script is
//! `tests/interop/send_pynetdicom.py`, shared with the interop scripts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Send files with pynetdicom (an independent sender: each file on a context of its own
/// SOP class and transfer syntax, its bytes unchanged). Returns how many were stored.
pub fn send_with_pynetdicom(addr: SocketAddr, called: &str, files: &[PathBuf]) -> usize {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../interop/send_pynetdicom.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(addr.ip().to_string())
        .arg(addr.port().to_string())
        .args(["--called-ae", called])
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
    line.trim_start_matches("pynetdicom: ")
        .split('/')
        .next()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("unexpected summary {line:?}"))
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
