//! The spool's tests, across its parts: each stores, reads, queues and deletes through the
//! [`Spool`] handle, and some look at the store underneath.

use super::meta::MAX_HISTORY;
use super::*;
use crate::demo::{DemoObject, generate_object};
use keystore::Kek;

/// A temporary directory the spool accepts as its data directory (mode 0700; the
/// crate's default follows the umask).
fn private_tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt as _;
    let d = tempfile::tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    d
}

fn open(dir: &Path) -> Spool {
    let opts = SpoolOptions {
        segment_bytes: 64 * 1024,
        ..SpoolOptions::default()
    };
    Spool::open_blocking(dir, Kek::from_bytes([3; 32]), opts).unwrap()
}

/// Issue 11, part 1.1: a spool written under one KEK refuses another KEK at open,
/// before RocksDB is touched; a directory from before check values gets one.
#[test]
fn another_kek_is_refused_at_open_and_old_dirs_get_a_check_value() {
    let dir = private_tempdir();
    drop(open(dir.path()));
    let check = dir.path().join(kek_check::FILE_NAME);
    assert!(check.exists());
    let err = Spool::open_blocking(
        dir.path(),
        Kek::from_bytes([4; 32]),
        SpoolOptions::default(),
    )
    .err()
    .expect("another KEK must be refused");
    assert!(
        matches!(
            err,
            SpoolError::KekCheck(kek_check::KekCheckError::Mismatch { .. })
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("does not match the data directory")
    );
    // The right KEK still opens it.
    drop(open(dir.path()));
    // A directory of an older version (no check value) gets one at its first open.
    std::fs::remove_file(&check).unwrap();
    drop(open(dir.path()));
    assert!(check.exists());
    assert!(
        Spool::open_blocking(
            dir.path(),
            Kek::from_bytes([4; 32]),
            SpoolOptions::default()
        )
        .is_err()
    );
}

fn ingest(o: &DemoObject, routes: &[&str], dedup: Option<DedupKey>) -> Ingest {
    Ingest {
        sop_class: o.sop_class.clone(),
        sop_instance: o.sop_instance.clone(),
        transfer_syntax: o.transfer_syntax.clone(),
        source: "TEST".into(),
        routes: routes.iter().map(|s| s.to_string()).collect(),
        dedup,
        strict_uid_match: false,
    }
}

async fn store(spool: &Spool, o: &DemoObject, routes: &[&str]) -> ObjectId {
    let mut w = spool.writer(ingest(o, routes, None)).unwrap();
    for c in o.dataset.chunks(10_000) {
        w.write(c).await.unwrap();
    }
    stored(w.commit().await.unwrap())
}

/// The id of what a commit stored; panics on a duplicate.
fn stored(committed: Committed) -> ObjectId {
    match committed {
        Committed::Stored(id) => id,
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn round_trip_queues_and_deletion_after_the_last_destination() {
    let dir = private_tempdir();
    let spool = open(dir.path());
    let o = generate_object("1.2.3", "1.2.3.1", 1, "ROUND^TRIP", 300_000).unwrap();
    let id = store(&spool, &o, &["x", "y"]).await;
    let mut r = spool.open_object(id).await.unwrap();
    assert_eq!(r.meta.study_uid, "1.2.3");
    assert_eq!(r.meta.series_uid, "1.2.3.1");
    assert_eq!(r.meta.sop_instance_uid, o.sop_instance);
    assert!(r.meta.segments > 4, "several segments expected");
    let all = r.read_all().await.unwrap();
    assert_eq!(&all[r.meta.dataset_offset as usize..], &o.dataset[..]);
    let (qx, _) = spool.subscribe("x").await.unwrap();
    let (qy, _) = spool.subscribe("y").await.unwrap();
    assert_eq!((qx.len(), qy.len()), (1, 1));
    assert_eq!(qx[0].length, r.meta.length);
    assert!(!spool.complete("x", qx[0].entry).await.unwrap());
    assert_eq!(spool.object_count_blocking().unwrap(), 1);
    assert!(spool.complete("y", qy[0].entry).await.unwrap());
    assert_eq!(spool.object_count_blocking().unwrap(), 0);
    assert_eq!(spool.segment_count_blocking().unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_segment_moved_to_another_object_fails_to_open() {
    let dir = private_tempdir();
    let spool = open(dir.path());
    let a = generate_object("1.2.3", "1.2.3.1", 1, "SWAP^A", 100_000).unwrap();
    let b = generate_object("1.2.3", "1.2.3.1", 2, "SWAP^B", 100_000).unwrap();
    let ia = store(&spool, &a, &["x"]).await;
    let ib = store(&spool, &b, &["x"]).await;
    let s = &spool.inner.store;
    let seg_b = s.get(Cf::Seg, &seg_key(&ib, 1)).unwrap().unwrap();
    s.put_unsynced(Cf::Seg, &seg_key(&ia, 1), &seg_b).unwrap();
    let mut r = spool.open_object(ia).await.unwrap();
    let err = r
        .read_all()
        .await
        .expect_err("swapped segment must not open");
    assert!(matches!(err, SpoolError::Corrupt(..)), "{err}");
    // Delivery makes it a dead letter at once: replaying cannot repair our copy.
    let d = crate::deliver::DeliveryError::from_spool(err);
    assert_eq!((d.kind(), d.reason()), ("permanent", "integrity"), "{d}");
    // and a dropped final segment is a truncation, not a short read
    let last = spool.open_object(ib).await.unwrap().meta.segments - 1;
    let mut b2 = s.batch();
    b2.delete(Cf::Seg, &seg_key(&ib, last));
    s.commit(b2, true).unwrap();
    let err = spool
        .open_object(ib)
        .await
        .unwrap()
        .read_all()
        .await
        .expect_err("truncated");
    assert!(
        matches!(err, SpoolError::MissingSegment(id, i) if id == ib && i == last),
        "{err}"
    );
    let d = crate::deliver::DeliveryError::from_spool(err);
    assert_eq!((d.kind(), d.reason()), ("permanent", "missing_data"), "{d}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_ingest_is_removed_at_the_next_open() {
    let dir = private_tempdir();
    {
        let spool = open(dir.path());
        let o = generate_object("1.2.3", "1.2.3.1", 1, "CRASH^MID", 400_000).unwrap();
        let mut w = spool.writer(ingest(&o, &["x"], None)).unwrap();
        w.write(&o.dataset[..300_000]).await.unwrap();
        assert!(spool.segment_count_blocking().unwrap() > 0);
        // A crash: the writer's cleanup never runs.
        w.committing = true;
        drop(w);
    }
    let spool = open(dir.path());
    assert_eq!(spool.segment_count_blocking().unwrap(), 0);
    assert_eq!(spool.object_count_blocking().unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn link_transfers_deduplicate_and_refuse_conflicts() {
    let dir = private_tempdir();
    let spool = open(dir.path());
    let o = generate_object("1.2.3", "1.2.3.1", 1, "DEDUP^X", 10_000).unwrap();
    let key = spool.dedup_key("site-a", "<abc@site-a>");
    let commit = |bytes: Vec<u8>| {
        let spool = spool.clone();
        let ing = ingest(&o, &["x"], Some(key));
        async move {
            let mut w = spool.writer(ing).unwrap();
            w.write(&bytes).await.unwrap();
            w.commit().await
        }
    };
    assert!(matches!(
        commit(o.dataset.clone()).await,
        Ok(Committed::Stored(_))
    ));
    assert!(matches!(
        commit(o.dataset.clone()).await,
        Ok(Committed::Duplicate)
    ));
    let mut other = o.dataset.clone();
    let n = other.len();
    other[n - 1] ^= 1;
    assert!(matches!(
        commit(other).await,
        Err(SpoolError::IdentityMismatch(_))
    ));
    assert_eq!(spool.object_count_blocking().unwrap(), 1);
    assert_eq!(spool.queue_len_blocking("x").unwrap(), 1);
    // nothing of the refused copies is left behind
    let stored = spool
        .open_object(spool.subscribe("x").await.unwrap().0[0].entry.object)
        .await
        .unwrap();
    assert_eq!(
        spool.segment_count_blocking().unwrap() as u64,
        stored.meta.segments
    );
    // The disk never holds the object's SHA-256 (it would confirm a known image).
    let digest = stored.meta.digest;
    drop(stored);
    spool.flush_blocking().unwrap();
    let mut hits = Vec::new();
    for e in std::fs::read_dir(dir.path()).unwrap().flatten() {
        let raw = std::fs::read(e.path()).unwrap_or_default();
        if raw.windows(32).any(|w| w == &digest[..]) {
            hits.push(e.path());
        }
    }
    assert!(
        hits.is_empty(),
        "the plaintext digest is on disk in {hits:?}"
    );
    // Records expire after the dedup window, and a re-send is then stored anew.
    assert_eq!(spool.expire_dedup_blocking(now_ms()).unwrap(), 0);
    let later = now_ms() + 8 * 24 * 3600 * 1000;
    assert_eq!(spool.expire_dedup_blocking(later).unwrap(), 1);
    assert!(matches!(
        spool.dedup_state_blocking(key, &digest).unwrap(),
        DedupState::New
    ));
}

#[test]
fn dedup_records_of_the_old_format_are_still_read() {
    let dir = private_tempdir();
    let spool = open(dir.path());
    let key = spool.dedup_key("site-a", "<old@site-a>");
    let digest = [7u8; 32];
    let mut v = digest.to_vec();
    v.extend_from_slice(&now_ms().to_be_bytes());
    spool
        .inner
        .store
        .put_unsynced(Cf::Dedup, &key.0, &v)
        .unwrap();
    assert!(matches!(
        spool.dedup_state_blocking(key, &digest).unwrap(),
        DedupState::Identical
    ));
    assert!(matches!(
        spool.dedup_state_blocking(key, &[8; 32]).unwrap(),
        DedupState::Conflict
    ));
}

/// Every segment of every stored object, and nothing else: the spool is whole.
async fn assert_whole(spool: &Spool) -> usize {
    spool.quiesce().await;
    let mut segments = 0;
    for (k, _) in spool
        .inner
        .store
        .scan_prefix(Cf::Meta, &[], usize::MAX)
        .unwrap()
    {
        let id = ObjectId(<[u8; 16]>::try_from(&k[..]).unwrap());
        let mut r = spool.open_object(id).await.unwrap();
        r.read_all()
            .await
            .unwrap_or_else(|e| panic!("a committed object does not read back: {e}"));
        segments += r.meta.segments as usize;
    }
    assert_eq!(
        spool.segment_count_blocking().unwrap(),
        segments,
        "segments that belong to no committed object"
    );
    assert_eq!(
        spool
            .inner
            .store
            .scan_prefix(Cf::Ingest, &[], 10)
            .unwrap()
            .len(),
        0,
        "ingest markers left behind"
    );
    spool.object_count_blocking().unwrap()
}

/// Pause the first thread that reaches fault point `name`, report it, and hold it until
/// released. Returns (reached, release).
fn pause_at(name: &str) -> (std::sync::mpsc::Receiver<()>, std::sync::mpsc::Sender<()>) {
    let (reached_tx, reached) = std::sync::mpsc::channel();
    let (release, release_rx) = std::sync::mpsc::channel::<()>();
    let reached_tx = Mutex::new(Some(reached_tx));
    let release_rx = Mutex::new(release_rx);
    fail::cfg_callback(name, move || {
        let first = reached_tx.lock().unwrap().take();
        if let Some(tx) = first {
            let _ = tx.send(());
            let _ = release_rx.lock().unwrap().recv();
        }
    })
    .unwrap();
    (reached, release)
}

fn open_with_faults(dir: &Path) -> Spool {
    let opts = SpoolOptions {
        segment_bytes: 64 * 1024,
        failpoints: true,
        ..SpoolOptions::default()
    };
    Spool::open_blocking(dir, Kek::from_bytes([3; 32]), opts).unwrap()
}

/// The regression test of the lost acknowledged object: a link request whose future is
/// dropped (a client reset) at each step of its commit, then retried by the sender.
/// Afterwards the spool holds the object exactly once, whole, and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_cancelled_at_any_step_then_retried_stores_the_object_once() {
    let _scenario = fail::FailScenario::setup();
    for point in [
        "spool::write::put",
        "spool::commit::batch",
        "spool::commit::synced",
    ] {
        let dir = private_tempdir();
        let spool = open_with_faults(dir.path());
        let o = generate_object("1.2.3", "1.2.3.1", 7, "CANCEL^ME", 300_000).unwrap();
        let key = spool.dedup_key("site-a", "<cancel@site-a>");
        let send = |spool: Spool| {
            let ing = ingest(&o, &["pacs"], Some(key));
            let data = o.dataset.clone();
            async move {
                let mut w = spool.writer(ing).unwrap();
                for c in data.chunks(50_000) {
                    w.write(c).await?;
                }
                w.commit().await
            }
        };
        let (reached, release) = pause_at(point);
        let request = tokio::spawn(send(spool.clone()));
        // The premise: the request really is inside that step when it is cancelled.
        tokio::task::spawn_blocking(move || {
            reached
                .recv_timeout(Duration::from_secs(20))
                .expect("the fault point was not reached")
        })
        .await
        .unwrap();
        request.abort();
        assert!(request.await.unwrap_err().is_cancelled(), "{point}");
        fail::remove(point);
        release.send(()).unwrap();
        assert_whole(&spool).await;
        // The sender retries the same transfer.
        let retried = send(spool.clone()).await.unwrap();
        assert!(
            matches!(retried, Committed::Stored(_) | Committed::Duplicate),
            "{point}: {retried:?}"
        );
        assert_eq!(
            assert_whole(&spool).await,
            1,
            "{point}: stored exactly once"
        );
        let (q, _) = spool.subscribe("pacs").await.unwrap();
        assert_eq!(q.len(), 1, "{point}: queued exactly once");
        let mut r = spool.open_object(q[0].entry.object).await.unwrap();
        let all = r.read_all().await.unwrap();
        assert_eq!(
            &all[r.meta.dataset_offset as usize..],
            &o.dataset[..],
            "{point}"
        );
    }
}

/// A write cancelled while its segment put is in the blocking pool leaves no orphan
/// segment once the put lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_cancelled_mid_put_leaves_no_orphan() {
    let _scenario = fail::FailScenario::setup();
    let dir = private_tempdir();
    let spool = open_with_faults(dir.path());
    let o = generate_object("1.2.3", "1.2.3.1", 8, "ORPHAN^X", 400_000).unwrap();
    let (reached, release) = pause_at("spool::write::put");
    let ing = ingest(&o, &["x"], None);
    let data = o.dataset.clone();
    let s2 = spool.clone();
    let request = tokio::spawn(async move {
        let mut w = s2.writer(ing).unwrap();
        for c in data.chunks(100_000) {
            w.write(c).await.unwrap();
        }
    });
    tokio::task::spawn_blocking(move || {
        reached
            .recv_timeout(Duration::from_secs(20))
            .expect("the fault point was not reached")
    })
    .await
    .unwrap();
    // Hear of the cleanup if it starts. It must not start while the put is pending: give
    // it half a second to show it would (a cleanup that does not wait always does).
    let (cleanup_tx, cleanup_rx) = std::sync::mpsc::channel();
    let cleanup_tx = Mutex::new(cleanup_tx);
    fail::cfg_callback("spool::discard", move || {
        let _ = cleanup_tx.lock().unwrap().send(());
    })
    .unwrap();
    request.abort();
    let _ = request.await;
    let early = tokio::task::spawn_blocking(move || {
        let early = cleanup_rx.recv_timeout(Duration::from_millis(500)).is_ok();
        (early, cleanup_rx)
    })
    .await
    .unwrap();
    assert!(
        !early.0,
        "the cleanup ran while a segment put was still pending"
    );
    fail::remove("spool::write::put");
    release.send(()).unwrap();
    early
        .1
        .recv_timeout(Duration::from_secs(20))
        .expect("the cleanup runs once the put has landed");
    fail::remove("spool::discard");
    assert_eq!(assert_whole(&spool).await, 0);
    assert_eq!(spool.segment_count_blocking().unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn orphan_segments_are_removed_and_counted_at_the_next_open() {
    let dir = private_tempdir();
    let kept;
    {
        let spool = open(dir.path());
        let a = generate_object("1.2.3", "1.2.3.1", 1, "KEEP^A", 200_000).unwrap();
        kept = store(&spool, &a, &["x"]).await;
        // Segments of objects with neither metadata nor an ingest marker, before, between
        // and after the live object's keys.
        for first in [0x00u8, 0x7f, 0xff] {
            let mut id = [first; 16];
            id[15] = 1;
            for i in 0..3 {
                spool
                    .inner
                    .store
                    .put_unsynced(Cf::Seg, &seg_key(&ObjectId(id), i), &[1u8; 5000])
                    .unwrap();
            }
        }
    }
    let spool = open(dir.path());
    assert_eq!(spool.recovery().orphans, 3);
    assert_eq!(assert_whole(&spool).await, 1);
    assert!(spool.open_object(kept).await.is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_uid_mismatch_is_stored_under_the_data_sets_uids_unless_strict() {
    let dir = private_tempdir();
    let spool = open(dir.path());
    let o = generate_object("1.2.3", "1.2.3.1", 9, "MISMATCH^X", 10_000).unwrap();
    let mut ing = ingest(&o, &["x"], None);
    ing.sop_instance = "1.2.3.999".into();
    let mut w = spool.writer(ing.clone()).unwrap();
    w.write(&o.dataset).await.unwrap();
    w.finish_identity().await.unwrap();
    assert!(w.uid_mismatch());
    let Committed::Stored(id) = w.commit().await.unwrap() else {
        panic!("not stored")
    };
    let mut r = spool.open_object(id).await.unwrap();
    assert_eq!(r.meta.sop_instance_uid, o.sop_instance);
    let all = r.read_all().await.unwrap();
    let header = dataset::parse_part10_header(&all).unwrap().unwrap();
    assert_eq!(
        header.sop_instance, o.sop_instance,
        "the Part-10 header follows"
    );
    assert_eq!(&all[header.dataset_offset..], &o.dataset[..]);
    ing.strict_uid_match = true;
    let mut w = spool.writer(ing).unwrap();
    let r = match w.write(&o.dataset).await {
        Ok(()) => w.commit().await.map(|_| ()),
        Err(e) => Err(e),
    };
    assert!(
        matches!(r, Err(SpoolError::IdentityMismatch("SOP Instance UID"))),
        "{r:?}"
    );
    assert_eq!(assert_whole(&spool).await, 1);
}

#[test]
fn the_data_directory_is_created_private_and_an_open_one_is_refused() {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = private_tempdir();
    // Created 0700 (parents too), whatever the umask.
    let dir = tmp.path().join("a/b/spool");
    drop(open(&dir));
    for d in [&dir, &tmp.path().join("a/b")] {
        let mode = std::fs::metadata(d).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{}", d.display());
    }
    // Others may read: refused, naming the fix; nothing is opened.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let e = Spool::open_blocking(&dir, Kek::from_bytes([3; 32]), SpoolOptions::default())
        .err()
        .expect("an open data directory must be refused");
    assert!(
        matches!(e, SpoolError::DataDirPermissions { mode: 0o755, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("chmod 700"), "{e}");
    // Group access for the process's own group (fsGroup) is allowed.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o770)).unwrap();
    drop(open(&dir));
    let own = rustix::process::getegid().as_raw();
    assert!(data_dir_mode_allowed(0o2770, own, own));
    assert!(!data_dir_mode_allowed(0o750, own.wrapping_add(1), own));
    assert!(!data_dir_mode_allowed(0o701, own, own));
    assert!(data_dir_mode_allowed(0o700, own.wrapping_add(1), own));
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_keeps_delivered_objects_for_a_resend_then_expires_them() {
    let dir = private_tempdir();
    let opts = SpoolOptions {
        segment_bytes: 64 * 1024,
        retention: Duration::from_secs(3600),
        ..SpoolOptions::default()
    };
    let spool = Spool::open_blocking(dir.path(), Kek::from_bytes([3; 32]), opts.clone()).unwrap();
    let a = generate_object("1.2.7", "1.2.7.1", 1, "KEEP^A", 150_000).unwrap();
    let b = generate_object("1.2.7", "1.2.7.1", 2, "KEEP^B", 10_000).unwrap();
    let other = generate_object("1.2.8", "1.2.8.1", 1, "KEEP^C", 10_000).unwrap();
    let ida = store(&spool, &a, &["x", "y"]).await;
    let idb = store(&spool, &b, &["x"]).await;
    let idc = store(&spool, &other, &["x"]).await;
    let (qx, _rx) = spool.subscribe("x").await.unwrap();
    let (qy, mut ry) = spool.subscribe("y").await.unwrap();
    for (dest, q) in qx
        .iter()
        .map(|q| ("x", q))
        .chain(qy.iter().map(|q| ("y", q)))
    {
        assert!(!q.entry.resend);
        spool.complete(dest, q.entry).await.unwrap();
    }
    // Delivered everywhere, and kept.
    assert_eq!(
        spool.queue_len_blocking("x").unwrap() + spool.queue_len_blocking("y").unwrap(),
        0
    );
    assert_eq!(spool.object_count_blocking().unwrap(), 3);
    assert_eq!(spool.retained_count_blocking().unwrap(), 3);
    let kept = spool.retained_blocking().unwrap();
    let of_a = kept.iter().find(|r| r.object == ida).unwrap();
    assert_eq!(of_a.destinations, vec!["x".to_owned(), "y".to_owned()]);
    // A sweep now deletes nothing.
    assert_eq!(spool.expire_retained(100).await.unwrap(), 0);

    // Resend study 1.2.7 to y only: object a (b never went to y).
    let resent = spool
        .resend_study("1.2.7".into(), |d| d == "y")
        .await
        .unwrap();
    assert_eq!(
        resent,
        vec![Resent {
            object: ida,
            destinations: vec!["y".into()]
        }]
    );
    let Ok(QueueEvent::Added(q)) = ry.try_recv() else {
        panic!("the dispatcher hears of a resend")
    };
    assert!(q.entry.resend && q.entry.object == ida);
    // Stored as a resend (a restart remembers it), and no longer in the index.
    drop(spool);
    let spool = Spool::open_blocking(dir.path(), Kek::from_bytes([3; 32]), opts).unwrap();
    let (qy, _ry) = spool.subscribe("y").await.unwrap();
    assert_eq!(qy.len(), 1);
    assert!(qy[0].entry.resend, "the resend flag survives a restart");
    assert_eq!(spool.retained_count_blocking().unwrap(), 2);
    // A dead letter and its replay keep the flag.
    spool
        .dead_letter("y", qy[0].entry, &FailureRecord::default())
        .await
        .unwrap();
    let (qy, _ry) = spool.subscribe("y").await.unwrap();
    assert!(qy[0].entry.resend && qy[0].entry.state == EntryState::Dead);
    spool.replay("y", qy[0].entry).await.unwrap();
    let (qy, _ry) = spool.subscribe("y").await.unwrap();
    assert!(qy[0].entry.resend && qy[0].entry.state == EntryState::Queued);
    // Resending again while it is queued finds nothing more of the study for y.
    assert!(
        spool
            .resend_study("1.2.7".into(), |d| d == "y")
            .await
            .unwrap()
            .is_empty()
    );
    spool.complete("y", qy[0].entry).await.unwrap();
    assert_eq!(
        spool.retained_count_blocking().unwrap(),
        3,
        "retained again after delivery"
    );
    let mut r = spool.open_object(ida).await.unwrap();
    let all = r.read_all().await.unwrap();
    assert_eq!(&all[r.meta.dataset_offset as usize..], &a.dataset[..]);

    // An operator's purge of a study deletes its retained copies (and its key) now.
    let other_only = generate_object("1.2.6", "1.2.6.1", 1, "KEEP^D", 10_000).unwrap();
    let idd = store(&spool, &other_only, &["x"]).await;
    let (qx, _rx) = spool.subscribe("x").await.unwrap();
    let qd = qx.iter().find(|q| q.entry.object == idd).unwrap();
    spool.complete("x", qd.entry).await.unwrap();
    assert_eq!(spool.retained_count_blocking().unwrap(), 4);
    let keys_before = spool.inner.store.scan_keys(Cf::Keys).unwrap().len();
    assert_eq!(spool.purge_retained_study("1.2.6".into()).await.unwrap(), 1);
    assert_eq!(spool.retained_count_blocking().unwrap(), 3);
    assert!(matches!(
        spool.meta(idd).await,
        Err(SpoolError::NotFound(_))
    ));
    assert_eq!(
        spool.inner.store.scan_keys(Cf::Keys).unwrap().len(),
        keys_before - 1,
        "the purged study's key is shredded"
    );
    assert_eq!(spool.purge_retained_study("1.2.6".into()).await.unwrap(), 0);
    let kid_d = spool.inner.index.id("study", b"1.2.6");
    assert!(
        spool.inner.dek_cache.lock().unwrap().get(&kid_d).is_none(),
        "a shredded study key stays in no cache"
    );
    // A writer that resolved the key before the shred cannot commit under it.
    let late = generate_object("1.2.6", "1.2.6.1", 2, "KEEP^E", 10_000).unwrap();
    let mut w = spool.writer(ingest(&late, &["x"], None)).unwrap();
    w.write(&late.dataset).await.unwrap();
    w.finish_identity().await.unwrap();
    let kid_now = spool.inner.store.get(Cf::Keys, &kid_d).unwrap();
    assert!(kid_now.is_some(), "the writer made the study a new key");
    let mut b = spool.inner.store.batch();
    b.delete(Cf::Keys, &kid_d);
    spool.inner.store.commit(b, true).unwrap();
    spool.uncache_key(&kid_d);
    assert!(
        matches!(w.commit().await, Err(SpoolError::Internal(_))),
        "a commit under a deleted study key must be refused"
    );

    // Past the retention every object goes, and with them both study keys.
    let later = now_ms() + 2 * 3600 * 1000;
    assert_eq!(spool.expire_retained_at(later, 2).await.unwrap(), 2);
    assert_eq!(spool.object_count_blocking().unwrap(), 1);
    assert_eq!(spool.expire_retained_at(later, 100).await.unwrap(), 1);
    assert_eq!(spool.object_count_blocking().unwrap(), 0);
    assert_eq!(spool.segment_count_blocking().unwrap(), 0);
    assert_eq!(spool.retained_count_blocking().unwrap(), 0);
    assert!(spool.inner.store.scan_keys(Cf::Done).unwrap().is_empty());
    assert!(
        spool.inner.store.scan_keys(Cf::Keys).unwrap().is_empty(),
        "study keys are shredded with their studies' last objects"
    );
    let _ = (idb, idc);
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_keep_their_history_and_replay_or_purge() {
    let dir = private_tempdir();
    let spool = open(dir.path());
    let a = generate_object("1.2.9", "1.2.9.1", 1, "DEAD^A", 10_000).unwrap();
    let b = generate_object("1.2.9", "1.2.9.1", 2, "DEAD^B", 10_000).unwrap();
    store(&spool, &a, &["x"]).await;
    store(&spool, &b, &["x"]).await;
    let (q, mut rx) = spool.subscribe("x").await.unwrap();
    let mut rec = FailureRecord::default();
    for i in 0..10 {
        rec.push(&format!(
            "attempt {i}: peer answered C-STORE with status 0xA900"
        ));
    }
    assert_eq!(rec.attempts, 10);
    assert_eq!(rec.history.len(), MAX_HISTORY);
    spool.dead_letter("x", q[0].entry, &rec).await.unwrap();
    drop(spool);
    let spool = open(dir.path());
    let (q, _) = spool.subscribe("x").await.unwrap();
    assert_eq!(
        q[0].entry.state,
        EntryState::Dead,
        "dead letters survive a restart"
    );
    assert_eq!(
        spool.failure_blocking("x", q[0].entry.seq).unwrap(),
        Some(rec.clone())
    );
    let (_, mut replays) = spool.subscribe("x").await.unwrap();
    let before = now_ms();
    spool.replay("x", q[0].entry).await.unwrap();
    // A replay is a fresh budget: no attempts, and max_age counting from the replay,
    // announced to the dispatcher and stored, so a restart keeps it fresh.
    let Ok(QueueEvent::Added(announced)) = replays.try_recv() else {
        panic!("a replay is announced");
    };
    let from = announced.budget_from_ms.expect("a fresh budget");
    assert!(from >= before && from <= now_ms());
    drop(spool);
    let spool = open(dir.path());
    let (q, mut rx2) = spool.subscribe("x").await.unwrap();
    assert_eq!(q[0].entry.state, EntryState::Queued);
    let fresh = spool
        .failure_blocking("x", q[0].entry.seq)
        .unwrap()
        .expect("stored");
    assert_eq!((fresh.attempts, fresh.history.len()), (0, 0));
    assert_eq!(fresh.budget_from_ms, Some(from));
    // A record written before budgets were stored still decodes, without one.
    let old = rec.encode();
    assert_eq!(FailureRecord::decode(&old).unwrap().budget_from_ms, None);
    let mut with = rec.clone();
    with.budget_from_ms = Some(from);
    assert_eq!(FailureRecord::decode(&with.encode()), Some(with));
    // Purging both objects of the study deletes the objects and the study key.
    spool.purge("x", q[0].entry).await.unwrap();
    assert!(matches!(rx2.try_recv(), Ok(QueueEvent::Removed(_))));
    assert_eq!(
        spool
            .inner
            .store
            .scan_prefix(Cf::Keys, &[], 10)
            .unwrap()
            .len(),
        1
    );
    spool.purge("x", q[1].entry).await.unwrap();
    assert_eq!(spool.object_count_blocking().unwrap(), 0);
    assert_eq!(spool.segment_count_blocking().unwrap(), 0);
    assert_eq!(
        spool
            .inner
            .store
            .scan_prefix(Cf::Keys, &[], 10)
            .unwrap()
            .len(),
        0,
        "the study key is shredded with its last object"
    );
    let _ = rx.try_recv();
}

/// A study key is shredded by the sweep once no stored object uses it, but never while a
/// writer holds it, nor when a commit used it after the sweep's scan.
#[tokio::test(flavor = "multi_thread")]
async fn study_keys_are_shredded_once_unused_but_never_under_a_writer() {
    let dir = private_tempdir();
    let spool = open(dir.path());
    let a = generate_object("1.3.1", "1.3.1.1", 1, "SHRED^A", 10_000).unwrap();
    let b = generate_object("1.3.1", "1.3.1.1", 2, "SHRED^B", 10_000).unwrap();
    let c = generate_object("1.3.2", "1.3.2.1", 1, "SHRED^C", 10_000).unwrap();
    let ida = store(&spool, &a, &["x"]).await;
    let idc = store(&spool, &c, &["x"]).await;
    assert_eq!(spool.study_key_count_blocking().unwrap(), 2);
    let kek_ops = spool.kek_ops_probe();
    let before = kek_ops().unwrap();
    assert_eq!((before.kek_id, before.wrap, before.shred), (1, 2, 0));
    assert_eq!(
        spool.shred_unused_keys_blocking().unwrap(),
        0,
        "both in use"
    );

    // A writer of study 1.3.1 has its key; the study's only stored object is delivered
    // and deleted; a sweep runs before the writer commits.
    let mut w = spool.writer(ingest(&b, &["x"], None)).unwrap();
    w.write(&b.dataset).await.unwrap();
    w.finish_identity().await.unwrap();
    let (q, _rx) = spool.subscribe("x").await.unwrap();
    let qa = q.iter().find(|q| q.entry.object == ida).unwrap();
    assert!(spool.complete("x", qa.entry).await.unwrap());
    assert_eq!(
        spool.shred_unused_keys_blocking().unwrap(),
        0,
        "a key a writer holds must stay"
    );
    w.commit().await.expect("the writer commits under its key");
    let idb = spool
        .subscribe("x")
        .await
        .unwrap()
        .0
        .iter()
        .map(|q| q.entry.object)
        .find(|id| *id != idc)
        .unwrap();
    let mut r = spool.open_object(idb).await.unwrap();
    let all = r.read_all().await.unwrap();
    assert_eq!(&all[r.meta.dataset_offset as usize..], &b.dataset[..]);

    // Everything delivered: deletion alone shreds nothing; the next sweep does.
    let (q, _rx) = spool.subscribe("x").await.unwrap();
    for e in &q {
        spool.complete("x", e.entry).await.unwrap();
    }
    assert_eq!(spool.object_count_blocking().unwrap(), 0);
    assert_eq!(spool.study_key_count_blocking().unwrap(), 2);
    assert_eq!(spool.shred_unused_keys_blocking().unwrap(), 2);
    assert_eq!(spool.study_key_count_blocking().unwrap(), 0);
    assert_eq!(
        kek_ops().unwrap().shred,
        2,
        "kek_operations_total counts shreds"
    );
    let kid = spool.inner.index.id("study", b"1.3.1");
    assert!(spool.inner.dek_cache.lock().unwrap().get(&kid).is_none());

    // A commit between the sweep's scan and its deletion keeps its key.
    let used = spool.used_keys_blocking().unwrap();
    assert!(used.is_empty());
    let ida2 = store(&spool, &a, &["x"]).await;
    assert_eq!(
        spool.shred_keys_except_blocking(&used).unwrap(),
        0,
        "a key committed to after the scan must stay"
    );
    let mut r = spool.open_object(ida2).await.unwrap();
    r.read_all().await.expect("readable");
    assert_eq!(spool.shred_unused_keys_blocking().unwrap(), 0, "in use");
}

fn message(patient: &str, control: &str, bytes: &[u8], dedup: Option<DedupKey>) -> MessageIngest {
    MessageIngest {
        patient: patient.into(),
        control_id: control.into(),
        message_type: "ORM^O01".into(),
        source: "ris-in".into(),
        routes: vec!["ris".into()],
        dedup,
        bytes: bytes.to_vec(),
    }
}

/// An HL7 message round-trips byte for byte (across several segments), is queued as
/// serial under its patient's tag, is keyed under the patient (two messages of one
/// patient share a key, another patient gets another); identical re-sends are
/// duplicates, other bytes a conflict.
#[tokio::test(flavor = "multi_thread")]
async fn hl7_messages_round_trip_under_a_key_per_patient() {
    let dir = private_tempdir();
    let spool = open(dir.path());
    let big: Vec<u8> = (0..200_000u32).map(|i| b'A' + (i % 26) as u8).collect();
    let (_, mut rx) = spool.subscribe("ris").await.unwrap();
    let a = stored(
        spool
            .store_message(message("P1", "C1", &big, None))
            .await
            .unwrap(),
    );
    for (patient, control, bytes) in [("P1", "C2", b"MSH|2"), ("P2", "C3", b"MSH|3")] {
        stored(
            spool
                .store_message(message(patient, control, bytes, None))
                .await
                .unwrap(),
        );
    }
    let mut r = spool.open_object(a).await.unwrap();
    assert!(r.meta.is_hl7() && r.meta.segments > 2);
    assert_eq!(r.meta.sop_instance_uid, "C1");
    assert_eq!(r.read_all().await.unwrap(), big);
    let Some(QueueEvent::Added(q)) = rx.recv().await else {
        panic!("an event")
    };
    assert!(q.serial && q.study == study_tag("P1"));
    assert_eq!(
        spool.inner.store.scan_keys(Cf::Keys).unwrap().len(),
        2,
        "one key per patient"
    );
    // Delivered: gone.
    for e in spool.entries_blocking("ris").unwrap() {
        spool.complete("ris", e).await.unwrap();
    }
    assert_eq!(spool.object_count_blocking().unwrap(), 0);
    // Dedup: identical is a duplicate, other bytes a conflict.
    let key = spool.message_dedup_key("ris-in", "RIS^HOSP", "D1");
    assert!(matches!(
        spool
            .store_message(message("P3", "D1", b"MSH|d", Some(key)))
            .await,
        Ok(Committed::Stored(_))
    ));
    assert!(matches!(
        spool
            .store_message(message("P3", "D1", b"MSH|d", Some(key)))
            .await,
        Ok(Committed::Duplicate)
    ));
    assert!(matches!(
        spool
            .store_message(message("P3", "D1", b"MSH|e", Some(key)))
            .await,
        Err(SpoolError::IdentityMismatch(_))
    ));
    assert!(matches!(
        spool.store_message(message("P3", "D1", b"", None)).await,
        Err(SpoolError::Format(_))
    ));
}

/// Every file under `dir` (the data directory: SST, blob, WAL, MANIFEST files...).
fn raw_files(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else if let Ok(b) = std::fs::read(&p) {
                out.push((p, b));
            }
        }
    }
    out
}

fn files_holding(dir: &Path, needles: &[Box<[u8]>]) -> Vec<std::path::PathBuf> {
    raw_files(dir)
        .into_iter()
        .filter(|(_, b)| {
            needles
                .iter()
                .any(|n| b.windows(n.len()).any(|w| w == &n[..]))
        })
        .map(|(p, _)| p)
        .collect()
}

async fn assert_readable(spool: &Spool, ids: &[ObjectId]) {
    for id in ids {
        let mut r = spool.open_object(*id).await.unwrap();
        r.read_all()
            .await
            .unwrap_or_else(|e| panic!("object {id:?} does not read back: {e}"));
    }
}

/// Issue 11, versioned KEKs: a second version wraps new keys; a rewrap moves the stored
/// ones in batches, goes on where it stopped after the spool was dropped mid-way, and keeps
/// the index key (so ids and dedup keys stay the same); retirement compacts version 1's
/// wrappings out of every file of the data directory, after which version 2 alone opens it
/// and version 1 alone is refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_rotation_rewraps_every_key_and_retires_the_old_version_from_the_files() {
    let dir = private_tempdir();
    let v1 = || Kek::from_bytes_version([3; 32], 1);
    let v2 = || Kek::from_bytes_version([5; 32], 2);
    let both = || KekRing::new(vec![v1(), v2()]).unwrap();
    let opts = || SpoolOptions {
        segment_bytes: 16 * 1024,
        ..SpoolOptions::default()
    };
    let spool = Spool::open_blocking(dir.path(), v1(), opts()).unwrap();
    let mut ids = Vec::new();
    for i in 0..3 {
        let o = generate_object(
            &format!("1.2.9.{i}"),
            &format!("1.2.9.{i}.1"),
            1,
            "ROT^ATE",
            40_000,
        )
        .unwrap();
        ids.push(store(&spool, &o, &["x"]).await);
    }
    let study_id = spool.inner.index.id("study", b"1.2.9.0");
    let mut old: Vec<Box<[u8]>> = spool
        .inner
        .store
        .scan_prefix(Cf::Keys, &[], usize::MAX)
        .unwrap()
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    assert_eq!(old.len(), 3);
    old.push(
        spool
            .inner
            .store
            .get(Cf::Secrets, b"index-key")
            .unwrap()
            .expect("the index key is stored at the first open")
            .into(),
    );
    spool.quiesce().await;
    drop(spool);
    assert!(
        !files_holding(dir.path(), &old).is_empty(),
        "premise: the wrapped keys are in the files"
    );

    // Version 2 comes in: a new study key goes under it, the stored ones still open.
    let spool = Spool::open_blocking(dir.path(), both(), opts()).unwrap();
    let kv = spool.key_versions_blocking().unwrap();
    assert_eq!(
        (kv.newest, kv.by_version.get(&1), kv.pending()),
        (2, Some(&4), 4)
    );
    let o = generate_object("1.2.9.9", "1.2.9.9.1", 1, "ROT^ATE", 40_000).unwrap();
    ids.push(store(&spool, &o, &["x"]).await);
    assert_eq!(
        spool.key_versions_blocking().unwrap().by_version.get(&2),
        Some(&1)
    );
    assert_readable(&spool, &ids).await;
    assert!(
        spool.retire_old_versions_blocking().unwrap().is_empty(),
        "nothing is retired while keys are under it"
    );
    // One batch of two, then the spool goes away as if the node were killed.
    let step = spool.rewrap_batch_blocking(2).unwrap();
    assert_eq!((step.moved, step.failed, step.remaining), (2, 0, 2));
    assert_readable(&spool, &ids).await;
    spool.quiesce().await;
    drop(spool);

    // Started again, the rewrap goes on where it stopped.
    let spool = Spool::open_blocking(dir.path(), both(), opts()).unwrap();
    let step = spool.rewrap_batch_blocking(100).unwrap();
    assert_eq!((step.moved, step.failed, step.remaining), (2, 0, 0));
    assert_eq!(
        spool.rewrap_batch_blocking(100).unwrap(),
        RewrapStep::default()
    );
    assert_eq!(spool.key_versions_blocking().unwrap().pending(), 0);
    spool.inner.store.flush().unwrap();
    assert!(
        !files_holding(dir.path(), &old).is_empty(),
        "premise: a rewrap alone leaves the old wrappings in the files"
    );
    assert_eq!(spool.retire_old_versions_blocking().unwrap(), [1]);
    assert_eq!(spool.ring().versions().collect::<Vec<_>>(), [2]);
    assert_eq!(spool.inner.index.id("study", b"1.2.9.0"), study_id);
    assert_readable(&spool, &ids).await;
    spool.quiesce().await;
    drop(spool);
    let left = files_holding(dir.path(), &old);
    assert!(
        left.is_empty(),
        "version 1's wrappings are still in {left:?}"
    );

    // Version 2 alone opens the directory, with the same index key; version 1 alone (or
    // with a retired version 1 file beside it) is refused or ignored.
    let spool = Spool::open_blocking(dir.path(), v2(), opts()).unwrap();
    assert_eq!(spool.inner.index.id("study", b"1.2.9.0"), study_id);
    assert_readable(&spool, &ids).await;
    spool.quiesce().await;
    drop(spool);
    let spool = Spool::open_blocking(dir.path(), both(), opts()).unwrap();
    assert_eq!(
        spool.ring().versions().collect::<Vec<_>>(),
        [2],
        "retired stays retired"
    );
    spool.quiesce().await;
    drop(spool);
    let err = Spool::open_blocking(dir.path(), v1(), opts())
        .err()
        .expect("version 2 holds the keys now");
    assert!(
        matches!(
            err,
            SpoolError::KekCheck(kek_check::KekCheckError::Missing { version: 2, .. })
        ),
        "{err}"
    );
}

/// A rewrap batch that raced a newer version writes nothing (its wrappings would be under
/// a version that is no longer the newest), and one whose key changed meanwhile leaves it.
#[tokio::test(flavor = "multi_thread")]
async fn a_rewrap_batch_never_writes_under_a_version_that_is_no_longer_the_newest() {
    let dir = private_tempdir();
    let k = |b: u8, v: u32| Kek::from_bytes_version([b; 32], v);
    let spool = Spool::open_blocking(dir.path(), k(3, 1), SpoolOptions::default()).unwrap();
    let o = generate_object("1.2.8", "1.2.8.1", 1, "ROT^ATE", 4_000).unwrap();
    let id = store(&spool, &o, &["x"]).await;
    spool
        .install_ring_blocking(KekRing::new(vec![k(3, 1), k(4, 2)]).unwrap())
        .unwrap();
    assert_eq!(spool.ring().newest().kek_id(), 2);
    spool
        .install_ring_blocking(KekRing::new(vec![k(3, 1), k(4, 2), k(5, 3)]).unwrap())
        .unwrap();
    let step = spool.rewrap_batch_blocking(10).unwrap();
    assert_eq!((step.moved, step.remaining), (2, 0));
    let kv = spool.key_versions_blocking().unwrap();
    assert_eq!(kv.by_version.get(&3), Some(&2), "{kv:?}");
    assert_eq!(spool.retire_old_versions_blocking().unwrap(), [1, 2]);
    assert_readable(&spool, &[id]).await;
}

/// Issue 11, crypto-shredding: a deleted study key is only a tombstone until compacted.
/// Once a delivery deleted it, the compaction of deleted keys (the node runs it after each
/// key sweep) leaves none of its wrapped bytes in any file of the data directory, which
/// held them before; `keys shred` does the same at once for a study whose object is still
/// stored, which can then no longer be opened.
#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_study_key_is_compacted_out_of_every_file_of_the_data_directory() {
    let dir = private_tempdir();
    let spool = open(dir.path());
    let wrapped_of = |spool: &Spool, study: &str| -> Box<[u8]> {
        let kid = spool.inner.index.id("study", study.as_bytes());
        spool
            .inner
            .store
            .get(Cf::Keys, &kid)
            .unwrap()
            .expect("the study key is stored")
            .into()
    };
    let a = generate_object("1.2.7.1", "1.2.7.1.1", 1, "SHRED^A", 30_000).unwrap();
    let b = generate_object("1.2.7.2", "1.2.7.2.1", 1, "SHRED^B", 30_000).unwrap();
    let ida = store(&spool, &a, &["x"]).await;
    let idb = store(&spool, &b, &["x"]).await;
    let (wa, wb) = (wrapped_of(&spool, "1.2.7.1"), wrapped_of(&spool, "1.2.7.2"));
    // As for a key made a while ago: in an SST file, below the later deletion.
    spool.inner.store.flush().unwrap();
    assert!(
        !spool.compact_deleted_keys_blocking().unwrap(),
        "nothing deleted yet"
    );

    // Study A is delivered: its object and key go.
    let (q, _) = spool.subscribe("x").await.unwrap();
    let entry = q
        .iter()
        .find(|e| e.entry.object == ida)
        .expect("queued")
        .entry;
    assert!(spool.complete("x", entry).await.unwrap());
    spool.shred_unused_keys_blocking().unwrap();
    assert_eq!(spool.study_key_count_blocking().unwrap(), 1);
    spool.inner.store.flush().unwrap();
    assert!(
        !files_holding(dir.path(), std::slice::from_ref(&wa)).is_empty(),
        "premise: a deleted key's bytes stay in the files until compacted"
    );
    assert!(spool.compact_deleted_keys_blocking().unwrap());
    let left = files_holding(dir.path(), std::slice::from_ref(&wa));
    assert!(
        left.is_empty(),
        "study A's wrapped key is still in {left:?}"
    );
    assert!(!spool.compact_deleted_keys_blocking().unwrap(), "done once");

    // `keys shred` of study B, whose object is still stored.
    let r = spool.shred_study_key_blocking("1.2.7.2").unwrap();
    assert_eq!((r.key_deleted, r.objects_left), (true, 1));
    assert!(
        spool.open_object(idb).await.is_err(),
        "its object can no longer be opened"
    );
    let left = files_holding(dir.path(), std::slice::from_ref(&wb));
    assert!(
        left.is_empty(),
        "study B's wrapped key is still in {left:?}"
    );
    let r = spool.shred_study_key_blocking("1.2.7.2").unwrap();
    assert_eq!((r.key_deleted, r.objects_left), (false, 1));
    spool.quiesce().await;
}

/// Issue 11, `verify`: a whole object passes; a flipped byte in a segment, a missing
/// segment, and a segment re-sealed under the right key with other bytes (authentic, but
/// not what was committed: only the SHA-256 catches it) each fail with their reason; each
/// failing object's queue entries become dead letters with that reason, once.
#[tokio::test(flavor = "multi_thread")]
async fn verify_finds_tampered_missing_and_substituted_segments_and_quarantines_them() {
    let dir = private_tempdir();
    let spool = open(dir.path());
    let mut ids = Vec::new();
    for i in 0..4 {
        let o = generate_object(
            &format!("1.2.5.{i}"),
            &format!("1.2.5.{i}.1"),
            1,
            "VER^IFY",
            150_000,
        )
        .unwrap();
        ids.push(store(&spool, &o, &["x", "y"]).await);
    }
    let s = &spool.inner.store;
    // 1: a flipped byte in segment 1.
    let mut seg = s.get(Cf::Seg, &seg_key(&ids[1], 1)).unwrap().unwrap();
    seg[40] ^= 0x01;
    s.put_unsynced(Cf::Seg, &seg_key(&ids[1], 1), &seg).unwrap();
    // 2: segment 0 gone.
    let mut b = s.batch();
    b.delete(Cf::Seg, &seg_key(&ids[2], 0));
    s.commit(b, true).unwrap();
    // 3: segment 1 re-sealed, under the study key and at its place, with other bytes.
    let (meta, dek) = spool.meta_blocking(ids[3]).unwrap();
    let aad = ObjectMeta::identity_aad(&ids[3], &meta.resolved());
    let (mut plain, is_final) = keystore::open_segment(
        &dek,
        &aad,
        1,
        &s.get(Cf::Seg, &seg_key(&ids[3], 1)).unwrap().unwrap(),
    )
    .unwrap();
    plain[100] ^= 0xff;
    let forged = keystore::seal_segment(&dek, &aad, 1, is_final, &plain).unwrap();
    s.put_unsynced(Cf::Seg, &seg_key(&ids[3], 1), &forged)
        .unwrap();

    let check = |i: usize| spool.verify_object_blocking(ids[i]).unwrap();
    let whole = check(0);
    assert!(whole.as_ref().is_ok_and(|n| *n > 100_000), "{whole:?}");
    let reason = |i: usize| check(i).err().map(|f| (f.reason, f.detail)).unwrap();
    assert_eq!(reason(1).0, "integrity");
    assert_eq!(
        reason(2),
        ("missing_data", "segment 0 is missing".to_owned())
    );
    let (r, detail) = reason(3);
    assert_eq!(r, "integrity");
    assert!(detail.contains("SHA-256"), "{detail}");

    let batch = crate::verify::batch_blocking(&spool, None).unwrap();
    assert_eq!((batch.checked, batch.total, batch.next), (4, 4, None));
    let mut failed: Vec<(String, usize)> = batch
        .failures
        .iter()
        .map(|f| (f.id.clone(), f.quarantined))
        .collect();
    failed.sort();
    let mut want: Vec<(String, usize)> = ids[1..].iter().map(|i| (i.hex(), 2)).collect();
    want.sort();
    assert_eq!(
        failed, want,
        "each failing object's two entries are dead letters now"
    );
    for d in ["x", "y"] {
        for e in spool.entries_blocking(d).unwrap() {
            let bad = ids[1..].contains(&e.object);
            assert_eq!(e.state == EntryState::Dead, bad, "{d}: {e:?}");
            if bad {
                let f = spool.failure_blocking(d, e.seq).unwrap().unwrap();
                assert!(
                    f.last_reason()
                        .is_some_and(|r| r.contains("found by verify")),
                    "{f:?}"
                );
            }
        }
    }
    // A second pass quarantines nothing again.
    let again = crate::verify::batch_blocking(&spool, None).unwrap();
    assert_eq!(again.failures.len(), 3);
    assert!(again.failures.iter().all(|f| f.quarantined == 0));
    spool.quiesce().await;
}

/// A deterministic xorshift64 for the tamper test (no randomness from the machine: a
/// failure reproduces).
struct Xorshift(u64);

impl Xorshift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Issue 11's tamper tests, on the stored bytes of a data directory, each change undone
/// before the next (and the unwrapped keys dropped from the cache, so that every check
/// unwraps again): 100 pairs of segments swapped, within a study and across studies;
/// 1,000 single-bit flips at random positions of segments, metadata records and wrapped
/// study keys; every object truncated at every segment boundary, and segments dropped,
/// duplicated and reordered. `verify`'s check (the one delivery makes) must fail for every
/// object each change touches: 100% detected. At the end every object checks out again, so
/// a check that failed for another reason would show.
#[tokio::test(flavor = "multi_thread")]
async fn swapped_flipped_truncated_and_reordered_bytes_are_all_detected() {
    let dir = private_tempdir();
    let spool = open(dir.path());
    let mut objects = Vec::new();
    for study in 0..3u32 {
        for i in 0..4u32 {
            let o = generate_object(
                &format!("1.2.4.{study}"),
                &format!("1.2.4.{study}.1"),
                i + 1,
                "TAM^PER",
                200_000,
            )
            .unwrap();
            objects.push((store(&spool, &o, &["x"]).await, study));
        }
    }
    let s = &spool.inner.store;
    let kids: Vec<[u8; 16]> = (0..3)
        .map(|st| {
            spool
                .inner
                .index
                .id("study", format!("1.2.4.{st}").as_bytes())
        })
        .collect();
    let segments: Vec<u64> = objects
        .iter()
        .map(|(id, _)| spool.meta_blocking(*id).unwrap().0.segments)
        .collect();
    assert!(segments.iter().all(|n| *n >= 3), "{segments:?}");
    let fails = |id: ObjectId| -> bool {
        for k in &kids {
            spool.uncache_key(k);
        }
        spool.verify_object_blocking(id).unwrap().is_err()
    };
    let all_pass = || objects.iter().all(|(id, _)| !fails(*id));
    assert!(all_pass());
    let get = |cf: Cf, k: &[u8]| s.get(cf, k).unwrap().expect("stored");
    let put = |cf: Cf, k: &[u8], v: &[u8]| s.put_unsynced(cf, k, v).unwrap();
    let mut rng = Xorshift(0x5eed_1234_abcd_0042);

    // Swaps: half within a study, half across.
    let mut swaps = 0;
    while swaps < 100 {
        let a = rng.below(objects.len());
        let b = rng.below(objects.len());
        if a == b || (swaps % 2 == 0) != (objects[a].1 == objects[b].1) {
            continue;
        }
        let (ka, kb) = (
            seg_key(&objects[a].0, rng.below(segments[a] as usize) as u64),
            seg_key(&objects[b].0, rng.below(segments[b] as usize) as u64),
        );
        let (va, vb) = (get(Cf::Seg, &ka), get(Cf::Seg, &kb));
        put(Cf::Seg, &ka, &vb);
        put(Cf::Seg, &kb, &va);
        assert!(
            fails(objects[a].0) && fails(objects[b].0),
            "swap {swaps} undetected"
        );
        put(Cf::Seg, &ka, &va);
        put(Cf::Seg, &kb, &vb);
        swaps += 1;
    }

    // Bit flips in segments, metadata and wrapped keys.
    for flip in 0..1000 {
        let o = rng.below(objects.len());
        let (cf, key, touched): (Cf, Vec<u8>, Vec<ObjectId>) = match rng.below(3) {
            0 => (
                Cf::Seg,
                seg_key(&objects[o].0, rng.below(segments[o] as usize) as u64).to_vec(),
                vec![objects[o].0],
            ),
            1 => (Cf::Meta, objects[o].0.0.to_vec(), vec![objects[o].0]),
            _ => {
                let study = objects[o].1;
                (
                    Cf::Keys,
                    kids[study as usize].to_vec(),
                    objects
                        .iter()
                        .filter(|(_, st)| *st == study)
                        .map(|(id, _)| *id)
                        .collect(),
                )
            }
        };
        let v = get(cf, &key);
        let mut bad = v.to_vec();
        let at = rng.below(bad.len());
        bad[at] ^= 1 << rng.below(8);
        put(cf, &key, &bad);
        for id in &touched {
            assert!(fails(*id), "flip {flip} ({cf:?} byte {at}) undetected");
        }
        put(cf, &key, &v);
    }

    // Truncation at every segment boundary, and segments dropped, duplicated, reordered.
    for (i, (id, _)) in objects.iter().enumerate() {
        let n = segments[i];
        let saved: Vec<Vec<u8>> = (0..n).map(|k| get(Cf::Seg, &seg_key(id, k))).collect();
        let restore = || {
            for (k, v) in saved.iter().enumerate() {
                put(Cf::Seg, &seg_key(id, k as u64), v);
            }
        };
        for cut in 0..n {
            let mut b = s.batch();
            b.delete_range(Cf::Seg, &seg_key(id, cut), &seg_key(id, u64::MAX));
            s.commit(b, false).unwrap();
            assert!(
                fails(*id),
                "object {i} truncated at segment {cut} undetected"
            );
            restore();
        }
        // A segment cut short.
        let last = &saved[n as usize - 1];
        put(Cf::Seg, &seg_key(id, n - 1), &last[..last.len() - 1]);
        assert!(fails(*id), "object {i}: a short final segment undetected");
        restore();
        for k in 0..n - 1 {
            // Dropped: the later ones move down one place.
            for j in k..n - 1 {
                put(Cf::Seg, &seg_key(id, j), &saved[j as usize + 1]);
            }
            let mut b = s.batch();
            b.delete(Cf::Seg, &seg_key(id, n - 1));
            s.commit(b, false).unwrap();
            assert!(fails(*id), "object {i}: segment {k} dropped undetected");
            restore();
            // Duplicated over the next.
            put(Cf::Seg, &seg_key(id, k + 1), &saved[k as usize]);
            assert!(fails(*id), "object {i}: segment {k} duplicated undetected");
            restore();
            // Reordered with the next.
            put(Cf::Seg, &seg_key(id, k), &saved[k as usize + 1]);
            put(Cf::Seg, &seg_key(id, k + 1), &saved[k as usize]);
            assert!(
                fails(*id),
                "object {i}: segments {k} and {} swapped undetected",
                k + 1
            );
            restore();
        }
    }
    assert!(
        all_pass(),
        "every change was undone: every object checks out again"
    );
    spool.quiesce().await;
}
