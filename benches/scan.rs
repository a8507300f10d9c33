//! The identity scan under an adversarial trickle (review finding: a slow trickle of bytes
//! burned CPU by rescanning the buffered prefix on every write).
//!
//! Each case is the same data set: 40,000 small private elements ahead of the Study and
//! Series Instance UIDs (about 560 KB), the shape that cost site A a CPU-second in the
//! review. It is fed to the identity scanner, and to a spool writer as the receive path
//! does, in normal 16 KiB pieces, in 58-byte pieces, in 1-byte pieces, and in 1-byte pieces
//! with an empty piece between every two (empty PDVs), plain and deflated. Throughput is
//! per data set byte, so the cases compare directly: the adversarial ones should stay
//! within a small factor of the normal one. Run with
//! `cargo bench -p dicom-gateway-benches --bench scan`.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use dicom_gateway::dataset::{IdentityScanner, Scan};
use dicom_gateway::sop::Encoding;
use dicom_gateway::spool::Ingest;

const SOP_CLASS: &str = "1.2.840.10008.5.1.4.1.1.7";
const SOP_INSTANCE: &str = "1.2.3.4";
const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
const DEFLATED: &str = "1.2.840.10008.1.2.1.99";

fn el(out: &mut Vec<u8>, g: u16, e: u16, vr: &[u8; 2], value: &[u8]) {
    out.extend_from_slice(&g.to_le_bytes());
    out.extend_from_slice(&e.to_le_bytes());
    out.extend_from_slice(vr);
    out.extend_from_slice(&(value.len() as u16).to_le_bytes());
    out.extend_from_slice(value);
}

/// The adversarial data set: the identity comes after 40,000 private elements.
fn dataset() -> Vec<u8> {
    let mut d = Vec::new();
    el(
        &mut d,
        0x0008,
        0x0016,
        b"UI",
        b"1.2.840.10008.5.1.4.1.1.7\0",
    );
    el(&mut d, 0x0008, 0x0018, b"UI", b"1.2.3.4\0");
    for i in 0..40_000u32 {
        el(&mut d, 0x0009, 0x1000 | (i & 0xFF) as u16, b"LO", b"xy");
    }
    el(&mut d, 0x0020, 0x000D, b"UI", b"1.2.3.5\0");
    el(&mut d, 0x0020, 0x000E, b"UI", b"1.2.3.6\0");
    el(&mut d, 0x0028, 0x0010, b"US", &[0, 2]);
    d
}

fn deflate(plain: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut enc, plain).unwrap();
    enc.finish().unwrap()
}

/// The ways a peer may cut the stream: (name, piece size, empty pieces between).
const CUTS: [(&str, usize, bool); 4] = [
    ("normal_16KiB", 16 * 1024, false),
    ("pdv_58B", 58, false),
    ("pdv_1B", 1, false),
    ("pdv_1B_and_empty", 1, true),
];

fn pieces(data: &[u8], size: usize, empty: bool) -> Vec<&[u8]> {
    let mut out = Vec::new();
    for c in data.chunks(size) {
        out.push(c);
        if empty {
            out.push(&data[..0]);
        }
    }
    out
}

fn scanner(c: &mut Criterion) {
    let plain = dataset();
    let deflated = deflate(&plain);
    let mut g = c.benchmark_group("identity_scan");
    g.throughput(Throughput::Bytes(plain.len() as u64));
    for (enc_name, enc, data) in [
        ("explicit", Encoding::ExplicitLe, &plain),
        ("deflated", Encoding::DeflatedExplicitLe, &deflated),
    ] {
        for (cut, size, empty) in CUTS {
            let ps = pieces(data, size, empty);
            g.bench_function(BenchmarkId::new(enc_name, cut), |b| {
                b.iter(|| {
                    let mut s = IdentityScanner::new(enc);
                    for p in &ps {
                        if let Scan::Done(id) = s.feed(p).unwrap() {
                            return id;
                        }
                    }
                    panic!("identity not found")
                })
            });
        }
    }
    g.finish();
}

fn writer(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spool = dicom_gateway_testkit::scratch_spool(&dir.path().join("spool"), 1);
    let plain = dataset();
    let deflated = deflate(&plain);
    let mut g = c.benchmark_group("writer_identity_prefix");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(plain.len() as u64));
    for (enc_name, ts, data) in [
        ("explicit", EXPLICIT_LE, &plain),
        ("deflated", DEFLATED, &deflated),
    ] {
        for (cut, size, empty) in CUTS {
            let ps = pieces(data, size, empty);
            g.bench_function(BenchmarkId::new(enc_name, cut), |b| {
                b.iter(|| {
                    rt.block_on(async {
                        let mut w = spool
                            .writer(Ingest {
                                sop_class: SOP_CLASS.into(),
                                sop_instance: SOP_INSTANCE.into(),
                                transfer_syntax: ts.into(),
                                source: "BENCH".into(),
                                routes: vec!["out".into()],
                                dedup: None,
                                strict_uid_match: false,
                            })
                            .unwrap();
                        for p in &ps {
                            w.write(p).await.unwrap();
                        }
                        // Identity found (the end of the data set scans what is left,
                        // as the receive path does): the writer has started sealing.
                        w.finish_identity().await.unwrap();
                        assert!(w.id().is_some());
                        // Dropped uncommitted: the writer removes what it stored.
                    })
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, scanner, writer);
criterion_main!(benches);
