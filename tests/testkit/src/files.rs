//! Part-10 files on disk: writing test data for independent senders, finding files and
//! bytes in folders, and hashing data sets with a parser independent of the gateway's.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use dicom_gateway::demo::{self, DemoObject};

/// Hash the data set of every Part-10 file in `dir` (skipping each file's meta group).
pub fn received_datasets(dir: &Path) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(data) = std::fs::read(e.path()) else {
            continue;
        };
        if let Some(ds) = part10_dataset(&data) {
            *out.entry(demo::sha256_hex(ds)).or_default() += 1;
        }
    }
    out
}

/// The data set of a Part-10 file, parsed independently of the gateway's own parser:
/// the meta group length is (0002,0000) right after "DICM".
pub fn part10_dataset(file: &[u8]) -> Option<&[u8]> {
    if file.get(128..132)? != b"DICM" {
        return None;
    }
    let len = u32::from_le_bytes(file.get(140..144)?.try_into().ok()?) as usize;
    file.get(144 + len..)
}

/// Every file below `dir`, recursively.
pub fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Files below `dir` that contain `needle`.
pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    all_files(dir)
        .into_iter()
        .filter(|p| {
            std::fs::read(p)
                .map(|data| data.windows(needle.len()).any(|w| w == needle))
                .unwrap_or(false)
        })
        .collect()
}

/// Write `objects` as Part-10 files into `dir` (test data for independent senders); returns
/// the paths in order.
pub fn write_part10(dir: &Path, objects: &[DemoObject]) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).expect("dir");
    objects
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let mut file = dicom_gateway::dataset::part10_header(
                &o.sop_class,
                &o.sop_instance,
                &o.transfer_syntax,
                Some("TEST_SCU"),
            );
            file.extend_from_slice(&o.dataset);
            let p = dir.join(format!("{i:05}.dcm"));
            std::fs::write(&p, file).expect("write test file");
            p
        })
        .collect()
}

/// The data set hashes of Part-10 files.
pub fn file_datasets(files: &[PathBuf]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for f in files {
        let data = std::fs::read(f).expect("read");
        let ds = part10_dataset(&data).expect("a Part-10 file");
        *m.entry(demo::sha256_hex(ds)).or_default() += 1;
    }
    m
}
