//! Bad input gets a clear refusal, and nothing is stored or lost.

use std::sync::Arc;
use std::time::Duration;

use dicom_gateway::config::TlsSection;
use dicom_gateway::deliver::DeliveryError;
use dicom_gateway::deliver::gateway::GatewaySender;
use dicom_gateway::spool::{Ingest, Spool};
use dicom_gateway_testkit::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_called_ae_title_is_rejected_and_nothing_is_stored() {
    let Fixture {
        tmp: _tmp,
        pacs: _pacs,
        mut sites,
    } = Fixture::start("", "").await;
    let objects = study(2, "WRONG^AE", 4096);
    let err = dicom_gateway::demo::send_objects(
        &sites.a_dicom().to_string(),
        "TEST_SCU",
        "NOT_GW_A",
        objects.clone(),
        |_| {},
    )
    .await
    .expect_err("a wrong called AE title must be rejected");
    assert!(err.to_string().contains("association"), "{err}");
    let a = sites.a.as_ref().unwrap();
    assert_eq!(a.spool().unwrap().object_count_blocking().unwrap(), 0);
    // The server counts the rejection just after the client has seen it.
    assert!(
        eventually(Duration::from_secs(5), || a.metrics.render().contains(
            "dicom_gateway_associations_total{listener=\"lan\",result=\"rejected\"} 1"
        ))
        .await
    );
    // The right AE title on the same listener works (the test can tell the difference).
    assert_eq!(send(sites.a_dicom(), "GW_A", &objects).await, 2);
    sites.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calling_ae_title_outside_the_allow_list_is_rejected() {
    let Fixture {
        tmp: _tmp,
        pacs: _pacs,
        mut sites,
    } = Fixture::start("allowed_calling_ae_titles = [\"MODALITY1\"]", "").await;
    let objects = study(1, "CALLING^AE", 4096);
    let addr = sites.a_dicom().to_string();
    let refused =
        dicom_gateway::demo::send_objects(&addr, "INTRUDER", "GW_A", objects.clone(), |_| {}).await;
    assert!(
        refused.is_err(),
        "calling AE not in the list must be rejected"
    );
    let accepted =
        dicom_gateway::demo::send_objects(&addr, "MODALITY1", "GW_A", objects, |_| {}).await;
    assert_eq!(accepted.expect("listed calling AE"), 1);
    sites.stop().await;
}

/// An object over the size limit is refused with 0xA700 and leaves no segment behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn object_that_cannot_be_persisted_gets_a700_and_leaves_nothing() {
    let Fixture {
        tmp: _tmp,
        pacs,
        mut sites,
    } = Fixture::start("", "segment_bytes = 65536\nmax_object_bytes = 1048576").await;
    let big = study(1, "TOO^BIG", 3 << 20);
    let err = dicom_gateway::demo::send_objects(
        &sites.a_dicom().to_string(),
        "TEST_SCU",
        "GW_A",
        big,
        |_| {},
    )
    .await
    .expect_err("must be refused");
    assert!(err.to_string().contains("0xA700"), "{err}");
    let a = sites.a_spool();
    // The refused object's cleanup runs in a task of the spool: wait for it.
    a.quiesce().await;
    assert_eq!(a.object_count_blocking().unwrap(), 0);
    assert_eq!(
        a.segment_count_blocking().unwrap(),
        0,
        "segments of the refused object remain"
    );
    // The association stays usable and a small object afterwards goes through.
    drop(a);
    let small = study(1, "SMALL^OK", 4096);
    assert_eq!(send(sites.a_dicom(), "GW_A", &small).await, 1);
    assert!(eventually(Duration::from_secs(30), || pacs.count() == 1).await);
    sites.stop().await;
}

/// Build a one-object spool to send from, as a peer gateway would.
async fn one_object_spool(dir: &std::path::Path) -> (Spool, dicom_gateway::spool::ObjectId) {
    let spool = scratch_spool(dir, 9);
    let o = &study(1, "LINK^PROBE", 8192)[0];
    let mut w = spool
        .writer(Ingest {
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
    let id = match w.commit().await.unwrap() {
        dicom_gateway::spool::Committed::Stored(id) => id,
        other => panic!("{other:?}"),
    };
    (spool, id)
}

fn client_tls(
    cert: &std::path::Path,
    key: &std::path::Path,
    ca: &std::path::Path,
) -> Arc<rustls::ClientConfig> {
    Arc::new(
        dicom_gateway::tls::client_config(&TlsSection {
            cert: cert.to_owned(),
            key: key.to_owned(),
            ca: ca.to_owned(),
            crls: Vec::new(),
        })
        .unwrap(),
    )
}

fn tls12_only(
    cert: &std::path::Path,
    key: &std::path::Path,
    ca: &std::path::Path,
) -> Arc<rustls::ClientConfig> {
    let roots = dicom_gateway::tls::load_roots(ca).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(dicom_gateway::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            dicom_gateway::tls::load_certs(cert).unwrap(),
            dicom_gateway::tls::load_key(key).unwrap(),
        )
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(cfg)
}

fn no_client_cert(ca: &std::path::Path) -> Arc<rustls::ClientConfig> {
    let roots = dicom_gateway::tls::load_roots(ca).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(dicom_gateway::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(cfg)
}

/// Peers without a client certificate, speaking TLS 1.2, with a certificate from another CA,
/// or with a name the listener does not list, fail the handshake and store nothing; the
/// listed peer succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn link_refuses_unauthenticated_and_unlisted_peers() {
    let Fixture {
        tmp,
        pacs,
        mut sites,
    } = Fixture::start("", "").await;
    // B does not deliver while we look at its spool.
    drop(pacs);
    let d = sites.dir.path().to_owned();
    let url = format!("https://127.0.0.1:{}", sites.link_port);
    let other = tmp.path().join("other-pki");
    dicom_gateway::pki::init(&other, &["site-a".into()]).unwrap();
    // A certificate from the right CA for a peer B does not list: site-b's own.

    let (spool, id) = one_object_spool(&tmp.path().join("sender")).await;
    let attempt = |tls: Arc<rustls::ClientConfig>| {
        let spool = spool.clone();
        let url = url.clone();
        async move {
            let sender =
                GatewaySender::new(&url, "site-b", tls, "site-a", 8, Duration::from_secs(60))
                    .unwrap();
            let reader = spool.open_object(id).await.unwrap();
            sender.send(reader).await
        }
    };
    let cases = [
        (
            "no client certificate",
            no_client_cert(&d.join("pki/ca.crt")),
        ),
        (
            "TLS 1.2 with a valid certificate",
            tls12_only(
                &d.join("pki/site-a.crt"),
                &d.join("pki/site-a.key"),
                &d.join("pki/ca.crt"),
            ),
        ),
        (
            "certificate from another CA",
            client_tls(
                &other.join("site-a.crt"),
                &other.join("site-a.key"),
                &d.join("pki/ca.crt"),
            ),
        ),
        (
            "certificate of a peer not listed",
            client_tls(
                &d.join("pki/site-b.crt"),
                &d.join("pki/site-b.key"),
                &d.join("pki/ca.crt"),
            ),
        ),
    ];
    for (what, tls) in cases {
        let r = attempt(tls).await;
        assert!(
            matches!(r, Err(DeliveryError::Unavailable { .. })),
            "{what}: {r:?}"
        );
        let b = sites.b.as_ref().unwrap();
        assert_eq!(
            b.spool().unwrap().object_count_blocking().unwrap(),
            0,
            "{what}: something was stored"
        );
    }
    let b = sites.b.as_ref().unwrap();
    // The server counts each refusal (its task may finish just after the client's error).
    let counted = eventually(Duration::from_secs(5), || {
        b.metrics
            .render()
            .contains("result=\"handshake_failed\"} 4")
    })
    .await;
    assert!(counted, "{}", b.metrics.render());

    // Control: the listed peer with its own certificate gets through.
    let ok = attempt(client_tls(
        &d.join("pki/site-a.crt"),
        &d.join("pki/site-a.key"),
        &d.join("pki/ca.crt"),
    ))
    .await;
    assert!(ok.is_ok(), "{ok:?}");
    assert_eq!(sites.b_spool().object_count_blocking().unwrap(), 1);
    // An identical re-send of the same transfer is a success without a second copy.
    let again = attempt(client_tls(
        &d.join("pki/site-a.crt"),
        &d.join("pki/site-a.key"),
        &d.join("pki/ca.crt"),
    ))
    .await;
    assert!(again.is_ok(), "{again:?}");
    assert_eq!(sites.b_spool().object_count_blocking().unwrap(), 1);
    sites.stop().await;
}

/// A server that is not the configured peer (wrong name) is refused by the sender.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sender_refuses_a_server_without_the_expected_name() {
    let Fixture {
        tmp,
        pacs: _pacs,
        mut sites,
    } = Fixture::start("", "").await;
    let d = sites.dir.path().to_owned();
    let (spool, id) = one_object_spool(&tmp.path().join("sender")).await;
    let sender = GatewaySender::new(
        &format!("https://127.0.0.1:{}", sites.link_port),
        "site-c",
        client_tls(
            &d.join("pki/site-a.crt"),
            &d.join("pki/site-a.key"),
            &d.join("pki/ca.crt"),
        ),
        "site-a",
        8,
        Duration::from_secs(60),
    )
    .unwrap();
    let r = sender.send(spool.open_object(id).await.unwrap()).await;
    assert!(r.is_err(), "must not talk to a server that is not site-c");
    assert_eq!(sites.b_spool().object_count_blocking().unwrap(), 0);
    sites.stop().await;
}

/// POST `body` to the link listener as the holder of `tls`; returns the HTTP status.
async fn post<B>(port: u16, tls: Arc<rustls::ClientConfig>, content_type: &str, body: B) -> u16
where
    B: hyper::body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use http_body_util::BodyExt;
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("site-b").unwrap();
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(format!("https://127.0.0.1:{port}/dicomweb/studies"))
        .header("content-type", content_type)
        .body(body)
        .unwrap();
    let resp = send.send_request(req).await.expect("no response");
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    status
}

/// POST a body held in memory.
async fn raw_post(
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    content_type: &str,
    body: Vec<u8>,
) -> u16 {
    post(
        port,
        tls,
        content_type,
        http_body_util::Full::new(bytes::Bytes::from(body)),
    )
    .await
}

/// Send part headers of 8 MiB without an end, then stall; returns the status received.
async fn endless_headers(port: u16, tls: Arc<rustls::ClientConfig>, content_type: &str) -> u16 {
    use futures_util::StreamExt;
    let head = b"--XyZ\r\nContent-Type: application/dicom\r\nX-Pad: ".to_vec();
    let chunks = std::iter::once(head).chain(std::iter::repeat_n(vec![b'a'; 1 << 20], 8));
    let body = futures_util::stream::iter(chunks)
        .map(|c| Ok::<_, std::io::Error>(hyper::body::Frame::data(bytes::Bytes::from(c))))
        .chain(futures_util::stream::pending());
    post(
        port,
        tls,
        content_type,
        http_body_util::StreamBody::new(body),
    )
    .await
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let mut h = keystore::Sha256::new();
    h.update(data);
    h.finish()
}

/// Malformed STOW requests from an authenticated peer get a 4xx and store nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_stow_requests_are_refused_and_store_nothing() {
    let Fixture {
        tmp: _tmp,
        pacs,
        mut sites,
    } = Fixture::start("", "").await;
    // No PACS: B keeps what it stores, so the counts below are stable.
    drop(pacs);
    let d = sites.dir.path().to_owned();
    let tls = client_tls(
        &d.join("pki/site-a.crt"),
        &d.join("pki/site-a.key"),
        &d.join("pki/ca.crt"),
    );
    let port = sites.link_port;
    let obj = study(1, "STOW^BAD", 4096).remove(0);
    let mut part10 = dicom_gateway::dataset::part10_header(
        &obj.sop_class,
        &obj.sop_instance,
        &obj.transfer_syntax,
        None,
    );
    part10.extend_from_slice(&obj.dataset);
    let digest = sha256(&part10);
    let ct = "multipart/related; type=\"application/dicom\"; boundary=XyZ";
    let body = |digest: &[u8; 32], content: &[u8]| {
        let mut b = format!(
            "--XyZ\r\nContent-Type: application/dicom\r\nContent-ID: <t1@site-a>\r\nContent-Digest: {}\r\n\r\n",
            dicom_gateway::relay::content_digest(digest)
        )
        .into_bytes();
        b.extend_from_slice(content);
        b.extend_from_slice(b"\r\n--XyZ--\r\n");
        b
    };
    // Digest that does not match the content.
    let mut wrong = digest;
    wrong[0] ^= 1;
    assert_eq!(
        raw_post(port, tls.clone(), ct, body(&wrong, &part10)).await,
        400
    );
    // Not multipart/related.
    assert_eq!(
        raw_post(port, tls.clone(), "application/dicom", part10.clone()).await,
        415
    );
    // Not a Part-10 stream.
    assert_eq!(
        raw_post(port, tls.clone(), ct, body(&digest, &obj.dataset)).await,
        400
    );
    // Part headers that never end: the listener must refuse after a bounded amount, while
    // the peer is still sending (the body below then stalls forever, so an unbounded
    // listener would wait, and the hang guard fails the test).
    let endless = endless_headers(port, tls.clone(), ct);
    let status = tokio::time::timeout(Duration::from_secs(60), endless)
        .await
        .expect("the listener kept buffering part headers");
    assert_eq!(status, 400);
    assert_eq!(sites.b_spool().object_count_blocking().unwrap(), 0);
    sites.b_spool().quiesce().await;
    assert_eq!(sites.b_spool().segment_count_blocking().unwrap(), 0);
    // Large objects, streamed by the gateway's own sender in 1 MiB segments, are stored
    // (the first chunk of a part can be larger than its Part-10 header: this once failed
    // with "Part-10 header too large").
    let sender_spool = scratch_spool(&_tmp.path().join("big-sender"), 5);
    let gw = GatewaySender::new(
        &format!("https://127.0.0.1:{port}"),
        "site-b",
        tls.clone(),
        "site-a",
        8,
        Duration::from_secs(60),
    )
    .unwrap();
    for big in study(5, "STOW^BIG", 6 << 20) {
        let mut w = sender_spool
            .writer(Ingest {
                sop_class: big.sop_class.clone(),
                sop_instance: big.sop_instance.clone(),
                transfer_syntax: big.transfer_syntax.clone(),
                source: "TEST".into(),
                routes: vec!["out".into()],
                dedup: None,
                strict_uid_match: false,
            })
            .unwrap();
        w.write(&big.dataset).await.unwrap();
        let dicom_gateway::spool::Committed::Stored(id) = w.commit().await.unwrap() else {
            panic!("not stored")
        };
        let r = gw.send(sender_spool.open_object(id).await.unwrap()).await;
        assert!(r.is_ok(), "{r:?}");
    }
    assert_eq!(sites.b_spool().object_count_blocking().unwrap(), 5);

    // Control: the well-formed request is stored.
    assert_eq!(
        raw_post(port, tls.clone(), ct, body(&digest, &part10)).await,
        200
    );
    assert_eq!(sites.b_spool().object_count_blocking().unwrap(), 6);
    // The same transfer again with other bytes (and their own correct digest) is refused
    // with 409, and nothing is overwritten.
    let mut other = part10.clone();
    let n = other.len();
    other[n - 1] ^= 0xFF;
    let other_digest = sha256(&other);
    assert_eq!(
        raw_post(port, tls.clone(), ct, body(&other_digest, &other)).await,
        409
    );
    assert_eq!(sites.b_spool().object_count_blocking().unwrap(), 6);
    sites.stop().await;
}

/// A Part-10 file the gateway writes never carries the sender's preamble (CVE-2019-11687:
/// a preamble can make a DICOM file a valid executable too). The peer here sends a
/// Windows executable header in it; the hand-off folder gets zeros.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_polyglot_preamble_is_zeroed_in_handed_off_files() {
    let Fixture {
        tmp: _tmp,
        pacs: _pacs,
        mut sites,
    } = Fixture::start("", "").await;
    // Site B delivers into a hand-off folder instead of the PACS.
    sites.stop_b().await;
    let cfg_path = sites.dir.path().join("site-b.toml");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    let (head, rest) = cfg.split_once("kind = \"dicom\"").unwrap();
    let (_, tail) = rest.split_once("retry = ").unwrap();
    std::fs::write(
        &cfg_path,
        format!("{head}kind = \"folder\"\npath = \"handoff\"\nretry = {tail}"),
    )
    .unwrap();
    sites.start_b().await;
    let d = sites.dir.path().to_owned();
    let tls = client_tls(
        &d.join("pki/site-a.crt"),
        &d.join("pki/site-a.key"),
        &d.join("pki/ca.crt"),
    );
    let obj = study(1, "POLY^GLOT", 4096).remove(0);
    let mut part10 = dicom_gateway::dataset::part10_header(
        &obj.sop_class,
        &obj.sop_instance,
        &obj.transfer_syntax,
        None,
    );
    part10[..4].copy_from_slice(b"MZ\x90\x00");
    part10[60..64].copy_from_slice(&64u32.to_le_bytes());
    part10[64..68].copy_from_slice(b"PE\0\0");
    part10.extend_from_slice(&obj.dataset);
    let mut body = format!(
        "--XyZ\r\nContent-Type: application/dicom\r\nContent-ID: <poly@site-a>\r\nContent-Digest: {}\r\n\r\n",
        dicom_gateway::relay::content_digest(&sha256(&part10))
    )
    .into_bytes();
    body.extend_from_slice(&part10);
    body.extend_from_slice(b"\r\n--XyZ--\r\n");
    let ct = "multipart/related; type=\"application/dicom\"; boundary=XyZ";
    assert_eq!(raw_post(sites.link_port, tls, ct, body).await, 200);
    let handoff = d.join("handoff");
    assert!(
        eventually(Duration::from_secs(30), || all_files(&handoff).len() == 1).await,
        "nothing handed off"
    );
    let file = std::fs::read(&all_files(&handoff)[0]).unwrap();
    assert_eq!(file.len(), part10.len());
    assert!(
        file[..128].iter().all(|b| *b == 0),
        "preamble passed through"
    );
    assert_eq!(&file[128..], &part10[128..], "only the preamble may differ");
    sites.stop().await;
}
