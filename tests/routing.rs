//! `[[route]]` rules end to end: pydicom's own test files, sent by pynetdicom, are routed by
//! modality and SOP class to two DCMTK storescp instances; an object with several
//! destinations reaches each exactly once; an object no rule takes is refused and stored
//! nowhere.

use std::path::PathBuf;
use std::time::Duration;

use dicom_gateway::config::Config;
use dicom_gateway::node::Node;
use dicom_gateway_testkit::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn routes_choose_destinations_by_modality_and_sop_class_and_fan_out_once_each() {
    let tmp = tempfile::tempdir().unwrap();
    let ct_pacs = Storescp::start(&tmp.path().join("ct-pacs"));
    let archive = Storescp::start(&tmp.path().join("archive"));
    keystore::Kek::generate_file(&tmp.path().join("kek.key")).unwrap();
    let cfg = format!(
        r#"
[node]
name = "site-a"
data_dir = "data"

[keystore]
kek_file = "kek.key"

[[dicom_listener]]
name = "lan"
listen = "127.0.0.1:0"
ae_title = "GW_A"

[[route]]
name = "ct"
modalities = ["CT"]
to = ["ct-pacs", "archive"]

[[route]]
name = "mr-images"
listeners = ["lan"]
sop_classes = ["1.2.840.10008.5.1.4.1.1.4"]
to = ["archive"]

[[destination]]
name = "ct-pacs"
kind = "dicom"
address = "127.0.0.1:{}"
ae_title = "STORESCP"
calling_ae_title = "GW_A"

[[destination]]
name = "archive"
kind = "dicom"
address = "127.0.0.1:{}"
ae_title = "STORESCP"
calling_ae_title = "GW_A"
"#,
        ct_pacs.port, archive.port
    );
    let path = tmp.path().join("site-a.toml");
    std::fs::write(&path, cfg).unwrap();
    let node = Node::start(Config::load(&path).expect("config"))
        .await
        .expect("start");
    let addr = node.dicom_addrs["lan"];

    let ct = pydicom_file("CT_small.dcm");
    let mr = pydicom_file("MR_small.dcm");
    let rt = pydicom_file("rtplan.dcm");
    // Premise: the files carry what the rules look at.
    let (ct_set, mr_set) = (
        file_datasets(std::slice::from_ref(&ct)),
        file_datasets(std::slice::from_ref(&mr)),
    );
    assert_eq!((ct_set.len(), mr_set.len()), (1, 1));

    let stored = send_with_pynetdicom(addr, "GW_A", &[ct.clone(), mr.clone(), rt.clone()]);
    assert_eq!(
        stored, 2,
        "CT and MR are routed; the RT plan matches no route and is refused"
    );

    let mut both = ct_set.clone();
    both.extend(mr_set.clone());
    let delivered = eventually(Duration::from_secs(30), || {
        ct_pacs.received() == ct_set && archive.received() == both
    })
    .await;
    assert!(
        delivered,
        "ct-pacs has {:?} (want the CT), archive {:?} (want CT and MR)",
        ct_pacs.received(),
        archive.received()
    );
    // Exactly once each, and nothing left queued: the refused plan was never stored.
    let spool = node.spool().expect("running").clone();
    let settled = eventually(Duration::from_secs(10), || {
        ["ct-pacs", "archive"].iter().all(|d| {
            spool
                .entries_blocking(d)
                .map(|e| e.is_empty())
                .unwrap_or(false)
        })
    })
    .await;
    // An empty queue means every delivery was confirmed, after storescp closed its file.
    assert!(settled, "{:?}", spool.entries_blocking("archive"));
    assert_eq!(ct_pacs.received(), ct_set);
    assert_eq!(archive.received(), both);
    node.stop().await;
}

#[test]
fn check_explains_which_routes_a_file_takes_and_validates_the_config() {
    let tmp = tempfile::tempdir().unwrap();
    keystore::Kek::generate_file(&tmp.path().join("kek.key")).unwrap();
    let cfg = r#"
[node]
name = "site-a"
data_dir = "data"

[keystore]
kek_file = "kek.key"

[[dicom_listener]]
name = "lan"
listen = "127.0.0.1:11112"
ae_title = "GW_A"
route_to = ["archive"]

[[route]]
name = "ct"
modalities = ["CT"]
calling_ae_titles = ["SCANNER"]
to = ["reading"]

[[destination]]
name = "reading"
kind = "folder"
path = "reading"

[[destination]]
name = "archive"
kind = "folder"
path = "archive"

[[destination]]
name = "unused"
kind = "folder"
path = "unused"
"#;
    let path = tmp.path().join("site-a.toml");
    std::fs::write(&path, cfg).unwrap();
    let ct = pydicom_file("CT_small.dcm");
    let mr = pydicom_file("MR_small.dcm");
    let explain = |file: &PathBuf, calling: Option<&str>| {
        let origin = dicom_gateway::check::ExplainOrigin {
            calling_ae: calling.map(str::to_owned),
            ..Default::default()
        };
        dicom_gateway::check::run(&path, Some((file.as_path(), origin))).expect("check")
    };

    let r = explain(&ct, Some("SCANNER"));
    // Nothing is wrong but the destination no route names.
    let findings: Vec<_> = r
        .findings
        .iter()
        .map(|f| (f.level, f.subject.as_str()))
        .collect();
    assert_eq!(
        findings,
        vec![("warning", "destination[unused]")],
        "{:?}",
        r.findings
    );
    let x = r.explain.as_ref().expect("explanation");
    assert_eq!(x.modality.as_deref(), Some("CT"));
    assert_eq!(x.listeners.len(), 1);
    assert_eq!(x.listeners[0].destinations, vec!["archive", "reading"]);
    assert!(x.listeners[0].routes[0].matched);

    // Another calling AE, or another modality: only the listener's route_to.
    let r = explain(&ct, Some("OTHER"));
    let l = &r.explain.as_ref().unwrap().listeners[0];
    assert_eq!(l.destinations, vec!["archive"]);
    assert_eq!(
        l.routes[0].reason.as_deref(),
        Some("calling AE title not in calling_ae_titles")
    );
    let r = explain(&mr, Some("SCANNER"));
    let l = &r.explain.as_ref().unwrap().listeners[0];
    assert_eq!(l.destinations, vec!["archive"]);
    assert_eq!(
        l.routes[0].reason.as_deref(),
        Some("modality MR not in modalities")
    );

    // Broken files are errors, each naming its key.
    std::fs::write(tmp.path().join("kek.key"), b"short").unwrap();
    let r = dicom_gateway::check::run(&path, None).expect("check");
    assert!(
        r.findings
            .iter()
            .any(|f| f.level == "error" && f.subject == "keystore.kek_file"),
        "{:?}",
        r.findings
    );
    // A route naming an unknown destination does not load at all.
    std::fs::write(
        &path,
        cfg.replace("to = [\"reading\"]", "to = [\"nowhere\"]"),
    )
    .unwrap();
    let e = dicom_gateway::check::run(&path, None).expect_err("unknown destination");
    assert!(format!("{e:#}").contains("route[ct].to"), "{e:#}");
}

/// A `[[dicom_listener]]` with `sop_classes` takes only those classes: an association
/// proposing only MR Image Storage (pydicom's MR, from pynetdicom) gets no presentation
/// context and nothing is stored; the listed CT Image Storage is stored and delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_listener_restricted_to_sop_classes_refuses_other_classes() {
    const CT_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.2";
    let tmp = tempfile::tempdir().unwrap();
    let pacs = Storescp::start(&tmp.path().join("pacs"));
    keystore::Kek::generate_file(&tmp.path().join("kek.key")).unwrap();
    let cfg = format!(
        r#"
[node]
name = "site-a"
data_dir = "data"

[keystore]
kek_file = "kek.key"

[[dicom_listener]]
name = "lan"
listen = "127.0.0.1:0"
ae_title = "GW_A"
sop_classes = ["{CT_IMAGE_STORAGE}"]
route_to = ["pacs"]

[[destination]]
name = "pacs"
kind = "dicom"
address = "127.0.0.1:{}"
ae_title = "STORESCP"
calling_ae_title = "GW_A"
"#,
        pacs.port
    );
    let path = tmp.path().join("site-a.toml");
    std::fs::write(&path, cfg).unwrap();
    let node = Node::start(Config::load(&path).expect("config"))
        .await
        .expect("start");
    let addr = node.dicom_addrs["lan"];
    let spool = node.spool().expect("running").clone();
    let ct = pydicom_file("CT_small.dcm");
    let mr = pydicom_file("MR_small.dcm");

    // Only MR proposed: refused, nothing stored.
    let report = send_with_pynetdicom_report(addr, "GW_A", &[], std::slice::from_ref(&mr));
    assert_eq!(report.stored, 0, "{}", report.output);
    let why = report.failure_of(&mr);
    assert!(
        why.as_deref().is_some_and(|w| !w.starts_with("status 0x")),
        "refused at negotiation, not by a C-STORE status: {why:?}\n{}",
        report.output
    );
    assert_eq!(spool.object_count_blocking().unwrap(), 0);

    // Control: the listed class is stored and delivered.
    let want = file_datasets(std::slice::from_ref(&ct));
    assert_eq!(
        send_with_pynetdicom(addr, "GW_A", std::slice::from_ref(&ct)),
        1
    );
    assert!(
        eventually(Duration::from_secs(30), || pacs.received() == want).await,
        "PACS has {:?}",
        pacs.received()
    );
    node.stop().await;
}
