//! Throughput of the encrypted spool: sealing segments, and writing objects with a synced
//! commit per object, as the C-STORE path does. Run with `cargo bench -p dicom-gateway-benches`.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dicom_gateway::spool::Ingest;
use keystore::Dek;

fn seal(c: &mut Criterion) {
    let dek = Dek::generate().unwrap();
    let data = vec![7u8; 1 << 20];
    let mut g = c.benchmark_group("seal");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("segment_1MiB", |b| {
        b.iter(|| keystore::seal_segment(&dek, b"identity", 0, false, &data).unwrap())
    });
    g.finish();
}

fn spool_write(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spool = dicom_gateway_testkit::scratch_spool(&dir.path().join("spool"), 1);
    let obj =
        dicom_gateway::demo::generate_object("1.2.3", "1.2.3.4", 1, "BENCH^X", 4 << 20).unwrap();
    let mut g = c.benchmark_group("spool");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(obj.dataset.len() as u64));
    g.bench_function("write_commit_4MiB", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut w = spool
                    .writer(Ingest {
                        sop_class: obj.sop_class.clone(),
                        sop_instance: obj.sop_instance.clone(),
                        transfer_syntax: obj.transfer_syntax.clone(),
                        source: "BENCH".into(),
                        routes: vec!["out".into()],
                        dedup: None,
                        strict_uid_match: false,
                    })
                    .unwrap();
                for chunk in obj.dataset.chunks(256 * 1024) {
                    w.write(chunk).await.unwrap();
                }
                w.commit().await.unwrap()
            })
        })
    });
    g.finish();
}

criterion_group!(benches, seal, spool_write);
criterion_main!(benches);
