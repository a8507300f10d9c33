//! Delivery guarantees end to end: dead letters, replay after a fix, and an outage of the
//! peer site. Objects enter site A from pynetdicom (an independent sender, sending each
//! file's bytes unchanged); site B delivers to DCMTK's `storescp`.

use std::time::Duration;

use dicom_gateway::node::Node;
use dicom_gateway_testkit::*;

/// A PACS that refuses a transfer syntax (DCMTK `storescp +xi`: Implicit VR Little Endian
/// only) gets an Explicit VR object it cannot take. That object becomes a dead letter with
/// the reason, within its budget, without holding back the objects behind it; `status`
/// and `queue list` show it; after the PACS is fixed (restarted accepting every transfer
/// syntax), replaying the dead letter delivers it exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_object_becomes_a_dead_letter_and_replays_after_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let pacs_out = tmp.path().join("pacs");
    let pacs = Storescp::start_args(&pacs_out, &["+xi"]);
    // The PACS comes back on this port: site B's config names it.
    let port = pacs.port;
    let mut sites = TwoSites::start(SiteOptions {
        pacs_port: port,
        a_listener_extra: String::new(),
        a_spool: String::new(),
        b_retry: r#"initial = "100ms", max_delay = "500ms", max_attempts = 3"#.into(),
        b_destination_extra: String::new(),
        a_destination_extra: String::new(),
    })
    .await;
    // The refused object first in the queue, then the ones the PACS takes.
    let objects = study(6, "DEAD^LETTER", 20_000);
    let files = write_part10(&tmp.path().join("send"), &objects);
    to_implicit(&files[1..]);
    let good = file_datasets(&files[1..]);
    let refused = file_datasets(&files[..1]);
    assert_eq!(
        send_with_pynetdicom(sites.a_dicom(), "GW_A", &files),
        files.len()
    );

    let b = sites.b.as_ref().unwrap();
    let delivered = eventually(Duration::from_secs(60), || {
        pacs.received() == good && b.board.get("pacs").is_some_and(|s| s.dead == 1)
    })
    .await;
    assert!(
        delivered,
        "PACS has {:?}, expected {good:?}; status {:?}",
        pacs.received(),
        b.board.get("pacs")
    );
    let st = admin_status(b).await;
    let pacs_status = st.destinations.iter().find(|d| d.name == "pacs").unwrap();
    assert_eq!((pacs_status.dead, pacs_status.queued), (1, 0), "{st:?}");
    assert!(
        pacs_status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("presentation context")),
        "{st:?}"
    );
    let dead = dicom_gateway::admin::request(
        &b.admin_socket,
        http::Method::GET,
        "/v1/queue?destination=pacs&dead=1",
        None,
    )
    .await
    .unwrap();
    let dead: Vec<dicom_gateway::admin::EntryView> = serde_json::from_value(dead).unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].sop_instance_uid, objects[0].sop_instance);
    assert_eq!(dead[0].state, "dead");
    assert!(
        dead[0]
            .last_reason
            .as_deref()
            .is_some_and(|r| r.contains("no_presentation_context")),
        "{dead:?}"
    );
    // The dead letter survives a restart of B, and is not retried.
    sites.stop_b().await;
    sites.start_b().await;
    let b = sites.b.as_ref().unwrap();
    // Once B's dispatcher has read its queue back (it publishes the dead letter), it never
    // launches a dead entry: no window to wait out.
    let mut dead_after_restart = 0;
    for _ in 0..200 {
        // (Empty until the dispatcher has published its first state.)
        dead_after_restart = admin_status(b)
            .await
            .destinations
            .first()
            .map_or(0, |d| d.dead);
        if dead_after_restart == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(dead_after_restart, 1);
    assert_eq!(pacs.received(), good, "a dead letter must not be retried");

    // Fix the PACS, then replay.
    drop(pacs);
    let pacs = Storescp::start_with(&pacs_out, port, &["+xa"]);
    let body = serde_json::to_vec(&dicom_gateway::admin::Selector {
        destination: Some("pacs".into()),
        dead: true,
        ..Default::default()
    })
    .unwrap();
    let changed = dicom_gateway::admin::request(
        &b.admin_socket,
        http::Method::POST,
        "/v1/queue/retry",
        Some(body),
    )
    .await
    .unwrap();
    assert_eq!(changed["changed"], 1, "{changed}");
    let mut all = good.clone();
    all.extend(refused);
    let replayed = eventually(Duration::from_secs(30), || {
        pacs.received() == all
            && b.board
                .get("pacs")
                .is_some_and(|s| s.dead == 0 && s.queued == 0)
    })
    .await;
    assert!(replayed, "PACS has {:?}, expected {all:?}", pacs.received());
    sites.stop().await;
}

/// The poison object of the issue: pydicom's `rtplan_truncated.dcm` (its data set ends in
/// the middle of an element, at an odd length), sent unchanged by pynetdicom. Site A
/// acknowledges it and relays it; site B's PACS (DCMTK `storescp`) aborts the association
/// on it ("Odd Fragment Length"). It gets its budget of attempts (3) without holding back
/// the objects sent after it, then becomes a dead letter with the reason; `status` and
/// `queue list` show it. After the PACS is replaced by one that takes it (pynetdicom
/// keeping the bytes as they came), replaying it delivers it once, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poison_object_the_pacs_aborts_on_is_dead_lettered_and_replays_after_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let pacs = Storescp::start(&tmp.path().join("pacs"));
    let port = pacs.port;
    // Retries at least 1 s apart (jittered 50-100 % of 2 s, then of 4 s): the objects
    // behind the poison are delivered long before its budget is spent.
    let mut sites = TwoSites::start(SiteOptions {
        pacs_port: port,
        a_listener_extra: String::new(),
        a_spool: String::new(),
        b_retry: r#"initial = "2s", max_delay = "4s", max_attempts = 3"#.into(),
        b_destination_extra: String::new(),
        a_destination_extra: String::new(),
    })
    .await;
    let send = tmp.path().join("send");
    std::fs::create_dir_all(&send).unwrap();
    let poison = send.join("rtplan_truncated.dcm");
    std::fs::copy(pydicom_file("rtplan_truncated.dcm"), &poison).unwrap();
    let poison = vec![poison];
    let poison_ds = file_datasets(&poison);
    assert_eq!(
        send_with_pynetdicom_args(sites.a_dicom(), "GW_A", &["--as-is"], &poison),
        1,
        "site A acknowledges the truncated plan (it has its identity)"
    );
    let objects = study(6, "POISON^BEHIND", 20_000);
    let files = write_part10(&send, &objects);
    assert_eq!(
        send_with_pynetdicom(sites.a_dicom(), "GW_A", &files),
        files.len()
    );
    let good = file_datasets(&files);

    let b = sites.b.as_ref().unwrap();
    let delivered = eventually(Duration::from_secs(30), || pacs.received() == good).await;
    assert!(
        delivered,
        "PACS has {:?}, expected {good:?}",
        pacs.received()
    );
    // The objects behind the poison did not wait for its budget: it is still queued, with
    // at least one attempt made (the PACS aborted on it) and at least one left.
    let entries = queue_entries(b, "/v1/queue?destination=pacs").await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0].state, "queued", "{entries:?}");
    assert!((1..3).contains(&entries[0].attempts), "{entries:?}");
    assert!(
        entries[0]
            .last_reason
            .as_deref()
            .is_some_and(|r| r.contains("aborted")),
        "the PACS aborted on it: {entries:?}"
    );

    let dead = eventually(Duration::from_secs(30), || {
        b.board.get("pacs").is_some_and(|s| s.dead == 1)
    })
    .await;
    let st = admin_status(b).await;
    assert!(dead, "{st:?}");
    let d = st.destinations.iter().find(|d| d.name == "pacs").unwrap();
    assert_eq!((d.dead, d.queued), (1, 0), "{st:?}");
    let entries = queue_entries(b, "/v1/queue?destination=pacs&dead=1").await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(
        (entries[0].state.as_str(), entries[0].attempts),
        ("dead", 3)
    );
    assert!(
        entries[0]
            .last_reason
            .as_deref()
            .is_some_and(|r| r.contains("aborted")),
        "{entries:?}"
    );
    assert_eq!(pacs.received(), good, "the PACS never stored the poison");

    // The fix: a PACS that takes the object, on the same address. Replay it.
    drop(pacs);
    let fixed = RawScp::start_with(&tmp.path().join("fixed"), port);
    let body = serde_json::to_vec(&dicom_gateway::admin::Selector {
        destination: Some("pacs".into()),
        dead: true,
        ..Default::default()
    })
    .unwrap();
    let changed = dicom_gateway::admin::request(
        &b.admin_socket,
        http::Method::POST,
        "/v1/queue/retry",
        Some(body),
    )
    .await
    .unwrap();
    assert_eq!(changed["changed"], 1, "{changed}");
    let replayed = eventually(Duration::from_secs(30), || {
        fixed.received() == poison_ds
            && b.board
                .get("pacs")
                .is_some_and(|s| s.dead == 0 && s.queued == 0)
    })
    .await;
    assert!(
        replayed,
        "fixed PACS has {:?}, expected {poison_ds:?}",
        fixed.received()
    );
    sites.stop().await;
}

/// `order = "study"` at site B: while an object of a study is retried (a data set cut one
/// byte short, which storescp aborts on), the objects of that study that came after it wait
/// at B, and go once it is a dead letter. The rest of the study reaches the PACS only after
/// its failing object has used up its budget: order kept within the study.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_study_order_the_rest_of_a_study_waits_for_its_failing_object() {
    let tmp = tempfile::tempdir().unwrap();
    let pacs = Storescp::start(&tmp.path().join("pacs"));
    let mut sites = TwoSites::start(SiteOptions {
        pacs_port: pacs.port,
        a_listener_extra: String::new(),
        a_spool: String::new(),
        // Retries at least 1 s apart; one association, so nothing else is in flight.
        b_retry: r#"initial = "2s", max_delay = "4s", max_attempts = 3"#.into(),
        b_destination_extra: "order = \"study\"\nassociations = 1".into(),
        a_destination_extra: String::new(),
    })
    .await;
    let objects = study(6, "STUDY^ORDER", 20_000);
    let files = write_part10(&tmp.path().join("send"), &objects);
    // Object 2 loses its last byte: it ends inside its pixel data, at an odd length.
    let cut = std::fs::read(&files[2]).unwrap();
    std::fs::write(&files[2], &cut[..cut.len() - 1]).unwrap();
    let before = file_datasets(&files[..2]);
    let after = file_datasets(&files[3..]);
    let b = sites.b.as_ref().unwrap();

    // The head of the study, delivered.
    assert_eq!(
        send_with_pynetdicom(sites.a_dicom(), "GW_A", &files[..2]),
        2
    );
    assert!(eventually(Duration::from_secs(30), || pacs.received() == before).await);
    // The failing object: the PACS aborts on it, and it waits for its retry.
    assert_eq!(
        send_with_pynetdicom_args(sites.a_dicom(), "GW_A", &["--as-is"], &files[2..3]),
        1
    );
    let mut failed_once = false;
    for _ in 0..300 {
        let e = queue_entries(b, "/v1/queue?destination=pacs").await;
        if e.len() == 1 && e[0].attempts >= 1 {
            assert!(
                e[0].last_reason
                    .as_deref()
                    .is_some_and(|r| r.contains("aborted")),
                "{e:?}"
            );
            failed_once = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(failed_once, "the PACS did not abort on the cut object");
    // The rest of the study arrives at B while its failing object is being retried.
    assert_eq!(
        send_with_pynetdicom(sites.a_dicom(), "GW_A", &files[3..]),
        3
    );
    let mut held = None;
    for _ in 0..300 {
        let e = queue_entries(b, "/v1/queue?destination=pacs").await;
        if e.len() == 4 {
            held = Some(e);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let held = held.expect(
        "the rest of the study waits at B (with order = \"arrival\" it would be delivered at once)",
    );
    let failing = held
        .iter()
        .find(|e| e.attempts > 0)
        .expect("the failing object");
    let attempts = failing.attempts;
    assert!(attempts < 3, "{held:?}");
    // It is retried at least once more while the others wait, untried.
    let mut retried = false;
    for _ in 0..200 {
        let e = queue_entries(b, "/v1/queue?destination=pacs").await;
        let f = e
            .iter()
            .find(|x| x.sop_instance_uid == failing.sop_instance_uid);
        if f.is_none_or(|f| f.attempts > attempts || f.state == "dead") {
            retried = true;
            break;
        }
        assert_eq!(e.len(), 4, "nothing of the study goes meanwhile: {e:?}");
        assert!(
            e.iter()
                .filter(|x| x.attempts == 0)
                .all(|x| x.state == "queued"),
            "{e:?}"
        );
        assert_eq!(pacs.received(), before);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(retried);
    // Once it is a dead letter, the rest of its study goes.
    let mut all = before.clone();
    all.extend(after);
    let done = eventually(Duration::from_secs(30), || {
        pacs.received() == all
            && b.board
                .get("pacs")
                .is_some_and(|s| s.dead == 1 && s.queued == 0)
    })
    .await;
    assert!(
        done,
        "PACS has {:?}; status {:?}",
        pacs.received(),
        b.board.get("pacs")
    );
    sites.stop().await;
}

/// The queue entries an admin `GET` returns (a path with its query).
async fn queue_entries(node: &Node, path: &str) -> Vec<dicom_gateway::admin::EntryView> {
    let v = dicom_gateway::admin::request(&node.admin_socket, http::Method::GET, path, None)
        .await
        .unwrap();
    serde_json::from_value(v).unwrap()
}

/// Site B is down while A takes objects: A acknowledges them all, keeps them queued with
/// its circuit open (status shows it, nothing is dead-lettered, and several probes charge
/// no object's budget), and when B comes back the queue drains and every object arrives
/// exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_link_outage_holds_the_queue_and_drains_when_the_peer_returns() {
    let Fixture {
        tmp,
        pacs,
        mut sites,
    } = Fixture::start("", "").await;
    sites.stop_b().await;
    let objects = study(40, "LINK^OUTAGE", 30_000);
    let files = write_part10(&tmp.path().join("send"), &objects);
    assert_eq!(
        send_with_pynetdicom(sites.a_dicom(), "GW_A", &files),
        objects.len()
    );
    let a = sites.a.as_ref().unwrap();
    // The premise: A holds everything, and knows the destination is down.
    let held = eventually(Duration::from_secs(20), || {
        a.board.get("site-b").is_some_and(|s| {
            s.queued == objects.len() && s.circuit != dicom_gateway::dispatch::Circuit::Closed
        })
    })
    .await;
    let st = admin_status(a).await;
    assert!(held, "{st:?}");
    let d = &st.destinations[0];
    assert_eq!(
        (d.queued, d.dead, d.delivered),
        (objects.len(), 0, 0),
        "{st:?}"
    );
    assert!(
        d.last_error
            .as_deref()
            .is_some_and(|e| e.contains("unavailable")),
        "{st:?}"
    );
    assert_eq!(pacs.count(), 0);
    // The outage goes on for several probes, and costs the objects nothing: each probe is
    // counted as a failure of the destination, but no object's budget is charged (every
    // entry still has 0 failed attempts), so nothing nears a dead letter before max_age.
    let failures = || {
        metric_sum(
            &a.metrics.render(),
            "dicom_gateway_forward_failures_total{destination=\"site-b\",",
        )
    };
    let before = failures();
    assert!(
        eventually(Duration::from_secs(30), || failures() >= before + 4.0).await,
        "the destination is not probed: {} failures",
        failures()
    );
    let entries = queue_entries(a, "/v1/queue?destination=site-b").await;
    assert_eq!(entries.len(), objects.len());
    assert!(
        entries.iter().all(|e| e.attempts == 0 && e.state != "dead"),
        "an outage charged the objects' budgets: {entries:?}"
    );

    sites.start_b().await;
    let want = expected(&objects);
    let drained = eventually(Duration::from_secs(60), || {
        pacs.received() == want
            && sites
                .a
                .as_ref()
                .and_then(|a| a.board.get("site-b"))
                .is_some_and(|s| s.queued == 0)
    })
    .await;
    assert!(drained, "PACS has {} of {}", pacs.count(), objects.len());
    assert_eq!(
        admin_status(sites.a.as_ref().unwrap()).await.destinations[0].dead,
        0
    );
    sites.stop().await;
}

/// Site A's data volume fills up (a 160 MiB tmpfs, `min_free = "64MiB"`). Objects past the
/// watermark are refused with 0xA700 and leave nothing behind, `/readyz` and `status` say
/// why, everything acknowledged is kept, and once space returns A accepts objects again
/// without a restart; in the end every object reaches the PACS exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_volume_refuses_new_objects_and_resumes_without_a_restart() {
    let Fixture {
        tmp,
        pacs,
        mut sites,
    } = Fixture::start("", "").await;
    sites.stop_b().await;
    let a_dir = sites.data_dir("a");
    if let Some(a) = sites.a.take() {
        a.stop().await;
    }
    let _volume = Tmpfs::mount(&a_dir, "160m");
    sites.restart_a().await;
    let ballast = fill_until_free(&a_dir, (64 + 20) << 20);

    let objects = study(40, "VOLUME^FULL", 1 << 20);
    let files = write_part10(&tmp.path().join("send"), &objects);
    let stored = send_with_pynetdicom(sites.a_dicom(), "GW_A", &files);
    // The premise: the volume really filled up part way.
    assert!(stored > 0 && stored < files.len(), "stored {stored}");
    let a = sites.a.as_ref().unwrap();
    let st = admin_status(a).await;
    assert!(!st.ready && st.readiness.contains("min_free"), "{st:?}");
    assert_eq!(
        a.spool().unwrap().object_count_blocking().unwrap(),
        stored,
        "only acknowledged objects are stored"
    );

    // Space returns: no restart.
    std::fs::remove_file(&ballast).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || a
            .readiness
            .check(a.spool().unwrap())
            .0)
        .await
    );
    let listed =
        dicom_gateway::admin::request(&a.admin_socket, http::Method::GET, "/v1/queue", None)
            .await
            .unwrap();
    let listed: Vec<dicom_gateway::admin::EntryView> = serde_json::from_value(listed).unwrap();
    let have: std::collections::HashSet<_> =
        listed.iter().map(|e| e.sop_instance_uid.clone()).collect();
    let rest: Vec<_> = files
        .iter()
        .zip(&objects)
        .filter(|(_, o)| !have.contains(&o.sop_instance))
        .map(|(f, _)| f.clone())
        .collect();
    assert_eq!(rest.len(), files.len() - stored);
    assert_eq!(
        send_with_pynetdicom(sites.a_dicom(), "GW_A", &rest),
        rest.len()
    );

    sites.start_b().await;
    let want = expected(&objects);
    assert!(
        eventually(Duration::from_secs(60), || pacs.received() == want).await,
        "PACS has {} of {}",
        pacs.count(),
        objects.len()
    );
    sites.stop().await;
}

/// A vendor-private storage SOP class (Siemens CSA Non-Image) passes through both sites, as
/// it would through `storescp --promiscuous`; a standard class that is not storage
/// (Study Root FIND) sent as a C-STORE is refused with 0x0122 and stored nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_vendor_private_storage_class_passes_through() {
    const CSA_NON_IMAGE: &str = "1.3.12.2.1107.5.9.1";
    let tmp = tempfile::tempdir().unwrap();
    // storescp accepts unknown SOP classes only with --promiscuous.
    let pacs = Storescp::start_args(&tmp.path().join("pacs"), &["+xa", "-pm"]);
    let mut sites = TwoSites::start(SiteOptions {
        pacs_port: pacs.port,
        a_listener_extra: String::new(),
        a_spool: String::new(),
        b_retry: SiteOptions::B_RETRY.to_owned(),
        b_destination_extra: String::new(),
        a_destination_extra: String::new(),
    })
    .await;
    let dir = tmp.path().join("send");
    std::fs::create_dir_all(&dir).unwrap();
    // pydicom's CT, relabelled with a private class and with a query/retrieve class.
    let script = r#"
import sys, pydicom, pydicom.data as d
from pydicom.uid import generate_uid
for name, uid in (("private.dcm", sys.argv[2]), ("find.dcm", "1.2.840.10008.5.1.4.1.2.2.1")):
    ds = pydicom.dcmread(d.get_testdata_file("CT_small.dcm"))
    ds.SOPClassUID = uid
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(sys.argv[1] + "/" + name, enforce_file_format=True)
"#;
    let st = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(&dir)
        .arg(CSA_NON_IMAGE)
        .status()
        .expect("python3 with pydicom");
    assert!(st.success());
    let private = dir.join("private.dcm");
    let find = dir.join("find.dcm");
    let want = file_datasets(std::slice::from_ref(&private));
    assert_eq!(
        send_with_pynetdicom(sites.a_dicom(), "GW_A", &[private.clone(), find]),
        1,
        "the private class is stored, the FIND class refused"
    );
    assert!(
        eventually(Duration::from_secs(30), || pacs.received() == want).await,
        "PACS has {:?}, want {want:?}",
        pacs.received()
    );
    // Premise: it arrived under its own, private, class.
    let got = all_files(&tmp.path().join("pacs"));
    assert_eq!(got.len(), 1);
    let bytes = std::fs::read(&got[0]).unwrap();
    assert!(
        bytes
            .windows(CSA_NON_IMAGE.len())
            .any(|w| w == CSA_NON_IMAGE.as_bytes()),
        "the delivered file does not carry the private SOP class"
    );
    sites.stop().await;
}

/// `order = "study"` on both hops, through an outage of site B: three studies sent
/// interleaved while B is down wait at A (`status` shows them queued), and once B is back
/// each study reaches the PACS in the order it was sent, although A keeps many requests in
/// flight on the link and B four associations to the PACS. Each study's first object is
/// much larger than the rest, so with `order = "arrival"` the small ones overtake it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_study_order_a_study_arrives_in_the_order_it_was_sent() {
    let tmp = tempfile::tempdir().unwrap();
    let port = Storescp::start(&tmp.path().join("unused")).port;
    let pacs = RawScp::start_with(&tmp.path().join("pacs"), port);
    let mut sites = TwoSites::start(SiteOptions {
        pacs_port: port,
        a_listener_extra: String::new(),
        a_spool: String::new(),
        b_retry: SiteOptions::B_RETRY.into(),
        b_destination_extra: "order = \"study\"\nassociations = 4".into(),
        a_destination_extra: "order = \"study\"".into(),
    })
    .await;
    sites.stop_b().await;

    // Study s, object i: sent in the order (0,0), (1,0), (2,0), (0,1), ...
    let per_study = 6;
    let studies: Vec<(String, String)> = (0..3)
        .map(|_| {
            (
                dicom_gateway::demo::new_uid(),
                dicom_gateway::demo::new_uid(),
            )
        })
        .collect();
    let mut objects = Vec::new();
    let mut place = std::collections::HashMap::new();
    for i in 0..per_study {
        for (s, (study_uid, series_uid)) in studies.iter().enumerate() {
            let size = if i == 0 { 3 << 20 } else { 4096 };
            let o = dicom_gateway::demo::generate_object(
                study_uid,
                series_uid,
                i + 1,
                "ORDER^KEPT",
                size,
            )
            .unwrap();
            place.insert(dicom_gateway::demo::sha256_hex(&o.dataset), (s, i));
            objects.push(o);
        }
    }
    let files = write_part10(&tmp.path().join("send"), &objects);
    assert_eq!(
        send_with_pynetdicom(sites.a_dicom(), "GW_A", &files),
        files.len()
    );
    // The outage: A holds all of them, and says so.
    let a = sites.a.as_ref().unwrap();
    let status = admin_status(a).await;
    let link = status
        .destinations
        .iter()
        .find(|d| d.name == "site-b")
        .expect("site-b in status");
    assert_eq!(link.queued, files.len(), "{link:?}");
    assert_eq!(pacs.received().values().sum::<usize>(), 0);

    sites.start_b().await;
    assert!(
        eventually(Duration::from_secs(120), || {
            pacs.received().values().sum::<usize>() == files.len()
        })
        .await,
        "only {} of {} arrived",
        pacs.received().values().sum::<usize>(),
        files.len()
    );
    assert!(sites.settled(Duration::from_secs(30)).await);
    assert_eq!(
        pacs.received(),
        file_datasets(&files),
        "nothing lost or doubled"
    );
    // raw_scp numbers its files in arrival order.
    let mut arrived: Vec<(usize, (usize, u32))> = std::fs::read_dir(&pacs.out)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let n: usize = name.strip_suffix(".dcm")?.parse().ok()?;
            let data = std::fs::read(e.path()).ok()?;
            let ds = part10_dataset(&data)?;
            Some((n, place[&dicom_gateway::demo::sha256_hex(ds)]))
        })
        .collect();
    arrived.sort();
    for s in 0..studies.len() {
        let order: Vec<u32> = arrived
            .iter()
            .filter(|(_, (st, _))| *st == s)
            .map(|(_, (_, i))| *i)
            .collect();
        assert_eq!(
            order,
            (0..per_study).collect::<Vec<_>>(),
            "study {s} arrived out of order: {arrived:?}"
        );
    }
    sites.stop().await;
}
