//! Limits that hold (review finding 1.3): slow and silent peers on the DICOM port cannot
//! exhaust the gateway. They are cut off at their deadlines, memory stays within the
//! documented bound while they hold everything they may, the process stays up, and
//! legitimate associations are served once the old ones have timed out.

use std::time::Duration;

use dicom_gateway::dimse::Command;
use dicom_gateway_testkit::*;
use dicom_ul::ClientAssociationOptions;
use dicom_ul::Pdu;
use dicom_ul::association::client::AsyncClientAssociation;
use dicom_ul::pdu::{PDataValue, PDataValueType};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";

/// Associations and negotiating connections site A allows in this test.
const MAX_ASSOCIATIONS: usize = 6;
const MAX_NEGOTIATING: usize = 3;
/// Bytes of data set each slow association makes the gateway buffer: just under the
/// identity prefix limit, so none of it can be sealed yet (the worst case per association).
const HELD_PREFIX: usize = 3_500_000;

/// Resident memory of this process (it runs both nodes).
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb * 1024
}

fn el(out: &mut Vec<u8>, g: u16, e: u16, vr: &[u8; 2], value: &[u8]) {
    out.extend_from_slice(&g.to_le_bytes());
    out.extend_from_slice(&e.to_le_bytes());
    out.extend_from_slice(vr);
    if vr == b"OB" {
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    } else {
        out.extend_from_slice(&(value.len() as u16).to_le_bytes());
    }
    out.extend_from_slice(value);
}

async fn associate(addr: std::net::SocketAddr) -> AsyncClientAssociation<TcpStream> {
    ClientAssociationOptions::new()
        .calling_ae_title("SLOW_SCU")
        .called_ae_title("GW_A")
        .with_presentation_context(CT, vec![EXPLICIT_LE])
        .max_pdu_length(64 * 1024)
        .read_timeout(Duration::from_secs(60))
        .establish_async(addr.to_string())
        .await
        .expect("association")
}

/// Start a C-STORE whose data set holds `HELD_PREFIX` bytes of private elements before
/// any study UID, then fall silent.
async fn hold_a_prefix(assoc: &mut AsyncClientAssociation<TcpStream>, n: usize) {
    let ctx = assoc.presentation_contexts()[0].id;
    let instance = format!("1.2.826.0.1.3680043.10.543.{n}");
    let rq = Command::store_rq(1, CT, &instance);
    assoc
        .send(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: ctx,
                value_type: PDataValueType::Command,
                is_last: true,
                data: rq.encode(),
            }],
        })
        .await
        .unwrap();
    let mut ds = Vec::new();
    el(&mut ds, 0x0008, 0x0016, b"UI", format!("{CT}\0").as_bytes());
    let mut inst = instance.into_bytes();
    if inst.len() % 2 == 1 {
        inst.push(0);
    }
    el(&mut ds, 0x0008, 0x0018, b"UI", &inst);
    let mut e = 0x1000u16;
    while ds.len() < HELD_PREFIX {
        el(&mut ds, 0x0009, e, b"OB", &[0x5A; 32 * 1024]);
        e += 1;
    }
    for chunk in ds.chunks(60 * 1024) {
        assoc
            .send(&Pdu::PData {
                data: vec![PDataValue {
                    presentation_context_id: ctx,
                    value_type: PDataValueType::Data,
                    is_last: false,
                    data: chunk.to_vec(),
                }],
            })
            .await
            .unwrap();
    }
}

/// True once the peer has aborted or closed the association.
async fn was_cut_off(assoc: &mut AsyncClientAssociation<TcpStream>) -> bool {
    match tokio::time::timeout(Duration::from_secs(30), assoc.receive()).await {
        Ok(Ok(Pdu::AbortRQ { .. })) | Ok(Err(_)) => true,
        Ok(Ok(_)) | Err(_) => false,
    }
}

/// True if the server closes `s` without a word (the read sees the end of the stream).
async fn closed_at_once(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_peers_are_cut_off_within_the_memory_bound_and_others_are_served_after() {
    let Fixture {
        tmp: _tmp,
        pacs,
        mut sites,
    } = Fixture::start(
        &format!(
            "max_associations = {MAX_ASSOCIATIONS}\nmax_negotiating = {MAX_NEGOTIATING}\n\
             negotiation_timeout = \"8s\"\ntimeout = \"8s\"\nmax_association_time = \"10m\""
        ),
        "",
    )
    .await;
    let addr = sites.a_dicom();
    let a_metrics = sites.a.as_ref().unwrap().metrics.clone();
    let before = rss_bytes();

    // Every association slot taken, each holding the largest unsealed prefix it may.
    let mut slow = Vec::new();
    for n in 0..MAX_ASSOCIATIONS {
        let mut a = associate(addr).await;
        hold_a_prefix(&mut a, n).await;
        slow.push(a);
    }
    // One more negotiates, but finds no association permit and is aborted.
    let mut extra = associate(addr).await;
    assert!(was_cut_off(&mut extra).await, "association over the limit");
    assert!(
        a_metrics
            .render()
            .contains("dicom_gateway_associations_total{listener=\"lan\",result=\"over_limit\"} 1"),
        "{}",
        a_metrics.render()
    );
    // Every negotiation slot taken by a connection that never says a word...
    let mut silent = Vec::new();
    for _ in 0..MAX_NEGOTIATING {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    // ...so the next connection is closed at once, and a legitimate sender is refused.
    let mut refused = TcpStream::connect(addr).await.unwrap();
    assert!(
        closed_at_once(&mut refused).await,
        "over the negotiation limit"
    );
    let objects = study(1, "AFTER^SLOW", 4096);
    let premise = dicom_gateway::demo::send_objects(
        &addr.to_string(),
        "TEST_SCU",
        "GW_A",
        objects.clone(),
        |_| {},
    )
    .await;
    assert!(premise.is_err(), "premise: every slot is held: {premise:?}");

    // Memory, with every slot held at its worst: within the documented bound of about
    // 6 MiB per association (receive.rs), plus 32 MiB for everything else that moved.
    let during = rss_bytes();
    let bound = MAX_ASSOCIATIONS as u64 * (6 << 20) + (32 << 20);
    let grew = during.saturating_sub(before);
    eprintln!("RSS before {before}, with every slot held {during}: +{grew} (bound {bound})");
    assert!(grew < bound, "RSS grew by {grew} bytes, over {bound}");

    // The silent negotiators are cut off at the negotiation deadline, the slow
    // associations at the PDU deadline; nothing of their partial objects was stored.
    for s in &mut silent {
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(30), s.read(&mut b)).await;
        assert!(
            matches!(r, Ok(Ok(0)) | Ok(Err(_))),
            "silent negotiator: {r:?}"
        );
    }
    for a in &mut slow {
        assert!(was_cut_off(a).await, "slow association");
    }
    assert_eq!(sites.a_spool().object_count_blocking().unwrap(), 0);

    // The process is up and serves a legitimate sender again.
    assert_eq!(send(addr, "GW_A", &objects).await, 1);
    assert!(eventually(Duration::from_secs(30), || pacs.count() == 1).await);
    assert_eq!(pacs.received(), expected(&objects));
    sites.stop().await;
}

/// The site link: a connection cap, a handshake cap and a per-request deadline. A
/// stalled request gets 503 at its deadline, a connection over the cap is closed, silent
/// TCP connections are closed at the handshake deadline, and the listed peer is served
/// once they are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_link_listener_caps_connections_and_requests() {
    use futures_util::StreamExt;
    use http_body_util::BodyExt;
    use std::sync::Arc;

    let Fixture {
        tmp,
        pacs,
        mut sites,
    } = Fixture::start("", "").await;
    sites.stop_b().await;
    let cfg_path = sites.dir.path().join("site-b.toml");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap().replace(
        "route_to = [\"pacs\"]\n",
        "route_to = [\"pacs\"]\nmax_handshakes = 2\nmax_connections = 1\nrequest_timeout = \"3s\"\n",
    );
    std::fs::write(&cfg_path, cfg).unwrap();
    sites.start_b().await;
    let port = sites.link_port;
    let d = sites.dir.path().to_owned();
    let tls = Arc::new(
        dicom_gateway::tls::client_config(&dicom_gateway::config::TlsSection {
            cert: d.join("pki/site-a.crt"),
            key: d.join("pki/site-a.key"),
            ca: d.join("pki/ca.crt"),
            crls: Vec::new(),
        })
        .unwrap(),
    );
    let b_metrics = sites.b.as_ref().unwrap().metrics.clone();
    let counted = |result: &str, n: usize| {
        let m = b_metrics.render();
        m.contains(&format!(
            "dicom_gateway_associations_total{{listener=\"wan\",result=\"{result}\"}} {n}"
        ))
    };

    // One authenticated connection holds the only connection slot, with a request whose
    // body stalls after its first bytes.
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("site-b").unwrap();
    let stream = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
        .unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    assert!(eventually(Duration::from_secs(10), || counted("accepted", 1)).await);
    let head = b"--XyZ\r\nContent-Type: application/dicom\r\nContent-ID: <slow@site-a>\r\n\
        Content-Digest: sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:\r\n\r\n"
        .to_vec();
    let body = futures_util::stream::iter([head, vec![0u8; 100]])
        .map(|c| Ok::<_, std::io::Error>(hyper::body::Frame::data(bytes::Bytes::from(c))))
        .chain(futures_util::stream::pending());
    let req = http::Request::post(format!("https://127.0.0.1:{port}/dicomweb/studies"))
        .header(
            "content-type",
            "multipart/related; type=\"application/dicom\"; boundary=XyZ",
        )
        .body(http_body_util::StreamBody::new(body))
        .unwrap();
    let stalled = tokio::spawn(async move {
        let resp = h2.send_request(req).await.expect("a response");
        let status = resp.status().as_u16();
        let _ = resp.into_body().collect().await;
        (status, h2)
    });

    // A second connection from the listed peer is over the cap: closed after its
    // handshake, and the send fails (the sender retries later).
    let (spool, id) = {
        let spool = scratch_spool(&tmp.path().join("sender"), 9);
        let o = study(1, "LINK^LIMITS", 8192).remove(0);
        let mut w = spool
            .writer(dicom_gateway::spool::Ingest {
                sop_class: o.sop_class.clone(),
                sop_instance: o.sop_instance.clone(),
                transfer_syntax: o.transfer_syntax.clone(),
                source: "TEST".into(),
                routes: vec!["out".into()],
                dedup: None,
                strict_uid_match: false,
            })
            .unwrap();
        w.write(&o.dataset).await.unwrap();
        let dicom_gateway::spool::Committed::Stored(id) = w.commit().await.unwrap() else {
            panic!()
        };
        (spool, id)
    };
    let send_once = || {
        let (spool, tls) = (spool.clone(), tls.clone());
        async move {
            let sender = dicom_gateway::deliver::gateway::GatewaySender::new(
                &format!("https://127.0.0.1:{port}"),
                "site-b",
                tls,
                "site-a",
                8,
                Duration::from_secs(60),
            )
            .unwrap();
            sender.send(spool.open_object(id).await.unwrap()).await
        }
    };
    let r = send_once().await;
    assert!(r.is_err(), "a second connection must be refused: {r:?}");
    assert!(eventually(Duration::from_secs(10), || counted("over_limit", 1)).await);

    // The stalled request gets 503 at its deadline, and nothing of it is kept.
    let (status, h2) = tokio::time::timeout(Duration::from_secs(60), stalled)
        .await
        .expect("the stalled request was never answered")
        .unwrap();
    assert_eq!(status, 503);
    assert_eq!(sites.b_spool().segment_count_blocking().unwrap(), 0);
    drop(h2);
    conn.abort();

    // Silent TCP connections fill the handshake slots: the next one is closed at once,
    // and the silent ones at the handshake deadline.
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    }
    let mut refused = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    assert!(
        closed_at_once(&mut refused).await,
        "over the handshake limit"
    );
    for s in &mut silent {
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(30), s.read(&mut b)).await;
        assert!(
            matches!(r, Ok(Ok(0)) | Ok(Err(_))),
            "silent handshake: {r:?}"
        );
    }

    // The process is up, and the listed peer is served.
    let r = send_once().await;
    assert!(r.is_ok(), "{r:?}");
    assert!(eventually(Duration::from_secs(30), || pacs.count() == 1).await);
    sites.stop().await;
}
