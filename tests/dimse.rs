//! The DICOM listener's DIMSE behaviour, driven by a raw dicom-ul association, and the
//! admin HTTP endpoint.

use std::io::{Read, Write};
use std::time::Duration;

use dicom_gateway::demo::{self, DemoObject};
use dicom_gateway::dimse::{Command, field, status};
use dicom_gateway_testkit::*;
use dicom_ul::association::client::AsyncClientAssociation;
use dicom_ul::pdu::{PDataValue, PDataValueType, PresentationContextResultReason};
use dicom_ul::{ClientAssociationOptions, Pdu};
use tokio::net::TcpStream;

async fn associate(addr: std::net::SocketAddr) -> (AsyncClientAssociation<TcpStream>, u8, u8) {
    let assoc = ClientAssociationOptions::new()
        .calling_ae_title("TEST_SCU")
        .called_ae_title("GW_A")
        .with_presentation_context(
            dicom_gateway::dimse::VERIFICATION_SOP_CLASS,
            vec![demo::EXPLICIT_VR_LE],
        )
        .with_presentation_context(demo::CT_IMAGE_STORAGE, vec![demo::EXPLICIT_VR_LE])
        .read_timeout(Duration::from_secs(10))
        .establish_async(addr.to_string())
        .await
        .expect("association");
    let ctx = |class: &str| {
        assoc
            .presentation_contexts()
            .iter()
            .find(|pc| {
                pc.abstract_syntax == class
                    && pc.reason == PresentationContextResultReason::Acceptance
            })
            .map(|pc| pc.id)
            .expect("accepted context")
    };
    let echo = ctx(dicom_gateway::dimse::VERIFICATION_SOP_CLASS);
    let store = ctx(demo::CT_IMAGE_STORAGE);
    (assoc, echo, store)
}

async fn send_pdv(
    assoc: &mut AsyncClientAssociation<TcpStream>,
    ctx: u8,
    ty: PDataValueType,
    data: Vec<u8>,
) {
    assoc
        .send(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: ctx,
                value_type: ty,
                is_last: true,
                data,
            }],
        })
        .await
        .expect("send");
}

/// Send a C-STORE-RQ naming `instance` with `dataset` in one PDV; return the response.
async fn store(
    assoc: &mut AsyncClientAssociation<TcpStream>,
    ctx: u8,
    msg_id: u16,
    obj: &DemoObject,
    instance: &str,
) -> Command {
    let rq = Command::store_rq(msg_id, &obj.sop_class, instance);
    send_pdv(assoc, ctx, PDataValueType::Command, rq.encode()).await;
    send_pdv(assoc, ctx, PDataValueType::Data, obj.dataset.clone()).await;
    response(assoc).await
}

async fn response(assoc: &mut AsyncClientAssociation<TcpStream>) -> Command {
    match assoc.receive().await.expect("response") {
        Pdu::PData { data } => Command::decode(&data[0].data).expect("command"),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn echo_unknown_commands_and_mismatched_uids_get_proper_statuses() {
    let Fixture {
        tmp: _tmp,
        pacs,
        mut sites,
    } = Fixture::start("", "").await;
    let (mut assoc, echo_ctx, store_ctx) = associate(sites.a_dicom()).await;

    // C-ECHO
    send_pdv(
        &mut assoc,
        echo_ctx,
        PDataValueType::Command,
        Command::echo_rq(7).encode(),
    )
    .await;
    let rsp = response(&mut assoc).await;
    assert_eq!(
        (rsp.field, rsp.responded_to, rsp.status),
        (field::C_ECHO_RSP, Some(7), Some(status::SUCCESS))
    );

    // A C-ECHO carrying a data set gets one answer, a refusal, after its data.
    let mut odd_echo = Command::echo_rq(6);
    odd_echo.has_data_set = true;
    send_pdv(
        &mut assoc,
        echo_ctx,
        PDataValueType::Command,
        odd_echo.encode(),
    )
    .await;
    send_pdv(&mut assoc, echo_ctx, PDataValueType::Data, vec![0; 8]).await;
    let rsp = response(&mut assoc).await;
    assert_eq!(
        (rsp.field, rsp.responded_to, rsp.status),
        (
            field::C_ECHO_RSP,
            Some(6),
            Some(status::UNRECOGNIZED_OPERATION)
        )
    );

    // A C-FIND-RQ is not served: a failure status, not silence.
    let find = Command {
        field: 0x0020,
        message_id: Some(8),
        affected_sop_class: Some(dicom_gateway::dimse::VERIFICATION_SOP_CLASS.into()),
        ..Default::default()
    };
    send_pdv(&mut assoc, echo_ctx, PDataValueType::Command, find.encode()).await;
    let rsp = response(&mut assoc).await;
    assert_eq!(
        (rsp.field, rsp.responded_to, rsp.status),
        (0x8020, Some(8), Some(status::UNRECOGNIZED_OPERATION))
    );

    // A C-STORE whose command names another SOP instance than its data set is stored
    // under the data set's own UIDs (the default), and counted.
    let obj: DemoObject = study(1, "MISMATCH^UID", 4096).remove(0);
    let rsp = store(&mut assoc, store_ctx, 9, &obj, "1.2.3.4.5.6.7").await;
    assert_eq!(
        (rsp.field, rsp.responded_to, rsp.status),
        (field::C_STORE_RSP, Some(9), Some(status::SUCCESS))
    );
    assert!(
        sites
            .a
            .as_ref()
            .unwrap()
            .metrics
            .render()
            .contains("dicom_gateway_uid_mismatch_total{listener=\"lan\"} 1")
    );

    // The same association still stores a correct object.
    let rsp = store(&mut assoc, store_ctx, 10, &obj, &obj.sop_instance).await;
    assert_eq!(rsp.status, Some(status::SUCCESS));
    assert_eq!(
        rsp.affected_sop_instance.as_deref(),
        Some(obj.sop_instance.as_str())
    );
    assoc.release().await.expect("release");

    // Both arrive, with the data set's own SOP Instance UID in their file meta.
    assert!(eventually(Duration::from_secs(30), || pacs.count() == 2).await);
    assert_eq!(pacs.received(), expected(&[obj.clone(), obj.clone()]));
    for f in all_files(&pacs.out) {
        let data = std::fs::read(&f).unwrap();
        let needle = obj.sop_instance.as_bytes();
        assert!(data[..1024].windows(needle.len()).any(|w| w == needle));
        assert!(!data.windows(13).any(|w| w == b"1.2.3.4.5.6.7"));
    }
    sites.stop().await;
}

/// With `strict_uid_match = true`, a data set whose SOP instance differs from its command
/// is refused with 0xA900 and nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn strict_uid_match_refuses_a_mismatch() {
    let Fixture {
        tmp: _tmp,
        pacs: _pacs,
        mut sites,
    } = Fixture::start("strict_uid_match = true", "").await;
    let (mut assoc, _, ctx) = associate(sites.a_dicom()).await;
    let obj: DemoObject = study(1, "STRICT^UID", 4096).remove(0);
    let rsp = store(&mut assoc, ctx, 1, &obj, "1.2.3.4.5.6.7").await;
    assert_eq!(rsp.status, Some(status::DATASET_DOES_NOT_MATCH));
    assoc.release().await.expect("release");
    let spool = sites.a_spool();
    spool.quiesce().await;
    assert_eq!(spool.object_count_blocking().unwrap(), 0);
    sites.stop().await;
}

/// An abort in the middle of a data set keeps nothing of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn abort_mid_object_keeps_nothing() {
    let Fixture {
        tmp: _tmp,
        pacs,
        mut sites,
    } = Fixture::start("", "segment_bytes = 65536").await;
    let (mut assoc, _, store_ctx) = associate(sites.a_dicom()).await;
    let obj = study(1, "ABORTED^MID", 1 << 20).remove(0);
    let rq = Command::store_rq(1, &obj.sop_class, &obj.sop_instance);
    send_pdv(&mut assoc, store_ctx, PDataValueType::Command, rq.encode()).await;
    // Half the data set (several segments), never marked last, then an abort.
    for chunk in obj.dataset[..obj.dataset.len() / 2].chunks(100_000) {
        assoc
            .send(&Pdu::PData {
                data: vec![PDataValue {
                    presentation_context_id: store_ctx,
                    value_type: PDataValueType::Data,
                    is_last: false,
                    data: chunk.to_vec(),
                }],
            })
            .await
            .unwrap();
    }
    let spool = sites.a_spool();
    // The partial object did reach the spool (so the check below means something).
    assert!(
        eventually(Duration::from_secs(10), || spool
            .segment_count_blocking()
            .unwrap()
            > 0)
        .await
    );
    assoc.abort().await.unwrap();
    assert!(
        eventually(Duration::from_secs(10), || spool
            .segment_count_blocking()
            .unwrap()
            == 0)
        .await,
        "segments of the aborted object remain"
    );
    assert_eq!(spool.object_count_blocking().unwrap(), 0);
    drop(spool);
    sites.stop().await;
    assert_eq!(pacs.count(), 0);
}

fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_endpoint_answers_health_readiness_and_metrics() {
    let Fixture {
        tmp: _tmp,
        pacs: _pacs,
        mut sites,
    } = Fixture::start("", "").await;
    let http = sites.a.as_ref().unwrap().http_addr.unwrap();
    let addr = http;
    let (h, r, m, n) = tokio::task::spawn_blocking(move || {
        (
            http_get(addr, "/healthz"),
            http_get(addr, "/readyz"),
            http_get(addr, "/metrics"),
            http_get(addr, "/nope"),
        )
    })
    .await
    .unwrap();
    assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(
        m.starts_with("HTTP/1.1 200") && m.contains("dicom_gateway_"),
        "{m}"
    );
    assert!(n.starts_with("HTTP/1.1 404"), "{n}");
    sites.stop().await;
}

/// The admin socket (which can list UIDs and purge queues) is mode 0600 once a node runs,
/// whatever the umask, and it is a socket in the node's data folder.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_admin_socket_is_mode_0600() {
    use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
    let Fixture {
        tmp: _tmp,
        pacs: _pacs,
        mut sites,
    } = Fixture::start("", "").await;
    for (site, node) in [("a", sites.a.as_ref()), ("b", sites.b.as_ref())] {
        let node = node.unwrap();
        let meta = std::fs::metadata(&node.admin_socket).unwrap();
        assert!(
            meta.file_type().is_socket(),
            "{}",
            node.admin_socket.display()
        );
        assert_eq!(
            node.admin_socket.parent(),
            Some(sites.data_dir(site).as_path())
        );
        assert_eq!(
            meta.permissions().mode() & 0o777,
            0o600,
            "site {site}: {}",
            node.admin_socket.display()
        );
        // Control: it answers.
        assert_eq!(admin_status(node).await.node, format!("site-{site}"));
    }
    sites.stop().await;
}
