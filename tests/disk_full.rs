//! A write failure in the spool (here: the file-size limit of the process, which makes
//! RocksDB's writes fail with EFBIG as they would with ENOSPC) is answered with 0xA700;
//! everything acknowledged before survives a restart and is delivered, and the refused
//! object leaves nothing behind.
//!
//! This test lives in its own binary because it changes a process-wide resource limit.

use std::time::Duration;

use dicom_gateway::demo;
use dicom_gateway_testkit::*;

/// Limit the size of files this process writes. SIGXFSZ gets a (tokio) handler, so an
/// over-limit write fails with EFBIG instead of killing the test process.
fn limit_file_size(bytes: u64) {
    let sigxfsz = tokio::signal::unix::SignalKind::from_raw(libc::SIGXFSZ);
    // The handler stays installed after the stream is dropped.
    drop(tokio::signal::unix::signal(sigxfsz).expect("a SIGXFSZ handler"));
    rustix::process::setrlimit(
        rustix::process::Resource::Fsize,
        rustix::process::Rlimit {
            current: Some(bytes),
            maximum: None,
        },
    )
    .expect("setrlimit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn write_failure_answers_a700_and_keeps_what_was_acknowledged() {
    let Fixture {
        tmp,
        pacs,
        mut sites,
    } = Fixture::start("", "").await;
    // Keep everything at site A.
    sites.stop_b().await;
    let addr = sites.a_dicom().to_string();
    let objects = study(40, "DISK^FULL", 1 << 20);

    limit_file_size(12 << 20);
    let mut acked = Vec::new();
    let mut refusal = None;
    for o in &objects {
        match demo::send_objects(&addr, "TEST_SCU", "GW_A", vec![o.clone()], |_| {}).await {
            Ok(1) => acked.push(o.clone()),
            Ok(n) => panic!("unexpected count {n}"),
            Err(e) => {
                refusal = Some(e.to_string());
                break;
            }
        }
    }
    limit_file_size(libc::RLIM_INFINITY);
    let refusal = refusal.expect("the size limit was never hit: the test proves nothing");
    assert!(refusal.contains("0xA700"), "{refusal}");
    assert!(
        !acked.is_empty(),
        "nothing was acknowledged before the failure"
    );

    // The disk takes writes again, but a node whose synced write failed acknowledges
    // nothing until it is restarted: it never retries the sync and then acks. Every later
    // C-STORE (from an independent sender, one association each) gets 0xA700 and stores
    // nothing, and `/readyz` says why.
    assert!(
        sites.a_spool().storage_failed(),
        "premise: the failed write marked the storage failed"
    );
    let stored_before = sites.a_spool().object_count_blocking().unwrap();
    let later = study(2, "DISK^AFTER", 64 * 1024);
    let later_files = write_part10(&tmp.path().join("later"), &later);
    for f in &later_files {
        let report =
            send_with_pynetdicom_report(sites.a_dicom(), "GW_A", &[], std::slice::from_ref(f));
        assert_eq!(
            report.failure_of(f).as_deref(),
            Some("status 0xA700"),
            "a C-STORE after the failed sync: {}",
            report.output
        );
    }
    assert_eq!(
        sites.a_spool().object_count_blocking().unwrap(),
        stored_before
    );
    let http = sites.a.as_ref().unwrap().http_addr.unwrap();
    let (status, body) = http_get(http, "/readyz").await.unwrap();
    assert!(
        status == 503 && body.contains("storage failed"),
        "/readyz after the failed sync: {status} {body:?}"
    );

    // Restart A: what was acknowledged is queued, and only that.
    sites.restart_a().await;
    let spool = sites.a_spool();
    assert_eq!(spool.queue_len_blocking("site-b").unwrap(), acked.len());
    spool.quiesce().await;
    let entries = spool.entries_blocking("site-b").unwrap();
    let mut segments = 0;
    for e in entries {
        segments += spool.open_object(e.object).await.unwrap().meta.segments as usize;
    }
    assert_eq!(
        spool.segment_count_blocking().unwrap(),
        segments,
        "the refused object left segments"
    );
    drop(spool);
    // After the restart the node is ready and acknowledges again.
    let http = sites.a.as_ref().unwrap().http_addr.unwrap();
    let (status, body) = http_get(http, "/readyz").await.unwrap();
    assert_eq!(status, 200, "/readyz after the restart: {body:?}");
    assert_eq!(
        send_with_pynetdicom(sites.a_dicom(), "GW_A", &later_files),
        later.len()
    );
    acked.extend(later);

    sites.start_b().await;
    assert!(sites.settled(Duration::from_secs(60)).await);
    assert_eq!(pacs.received(), expected(&acked));
    sites.stop().await;
}
