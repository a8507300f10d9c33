//! Backpressure and readiness as a sender, a probe and a peer gateway see them: `/readyz`
//! over HTTP while the node drains and while its disk is under `[spool] min_free`; a
//! C-STORE refused with 0xA700 (as pynetdicom reports it) under the watermark and when a
//! destination's `max_queue` is reached; the link's 503 with `Retry-After` when the
//! receiving site's queue is full; and the `max_age` budget of `[destination.retry]`.

use std::sync::Arc;
use std::time::Duration;

use dicom_gateway::node::Node;
use dicom_gateway_testkit::*;

/// `GET /readyz` of a node's admin endpoint.
async fn readyz(node: &Node) -> std::io::Result<(u16, String)> {
    http_get(node.http_addr.expect("admin HTTP configured"), "/readyz").await
}

/// While a node drains for shutdown (here: site B, whose stop waits for a link request
/// held in its commit), `/readyz` answers 503 "draining", as node.rs documents for phase 1
/// of shutdown, so that a load balancer takes the node out before its listeners close; and
/// its link port refuses new connections (phase 2) while the held request still drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readyz_answers_503_while_the_node_drains() {
    let Fixture {
        tmp: _tmp,
        pacs: _pacs,
        mut sites,
    } = Fixture::start("", "").await;
    let _scenario = fail::FailScenario::setup();
    sites.stop_b().await;
    sites.b_failpoints = true;
    sites.start_b().await;
    let b = sites.b.as_ref().unwrap();
    assert_eq!(readyz(b).await.unwrap().0, 200, "control: B is ready");
    let (reached, release) = hold_at("spool::commit::synced", 1);
    let objects = study(1, "READY^DRAIN", 8192);
    assert_eq!(send(sites.a_dicom(), "GW_A", &objects).await, 1);
    // Premise: a link request is in flight at B (held after its synced commit), so B's
    // stop cannot finish before it is released.
    let held = tokio::task::spawn_blocking(move || reached.recv_timeout(Duration::from_secs(60)))
        .await
        .unwrap();
    assert!(held.is_ok(), "premise: B never committed the object");
    let b = sites.b.take().unwrap();
    let (readiness, http) = (b.readiness.clone(), b.http_addr.unwrap());
    let link = b.link_addrs[dicom_gateway::twosite::B_LISTENER];
    let stopping = tokio::spawn(b.stop());
    assert!(eventually(Duration::from_secs(10), || readiness.is_draining()).await);
    let during = http_get(http, "/readyz").await;
    // Phase 2: the link port refuses new connections while the held request drains (the
    // socket is closed, not left to queue connections in the kernel's backlog).
    let mut refused = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(link).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!stopping.is_finished(), "premise: B's drain is still held");
    drop(release);
    stopping.await.unwrap();
    fail::remove("spool::commit::synced");
    assert!(
        refused,
        "B's link port still accepted connections while draining"
    );
    match during {
        Ok((status, body)) => assert!(
            status == 503 && body.contains("draining"),
            "while draining: {status} {body:?}"
        ),
        Err(e) => panic!("while draining /readyz must answer 503, not fail to connect: {e}"),
    }
    sites.stop().await;
}

/// Site A's data volume (a 160 MiB tmpfs) goes under `[spool] min_free` (64 MiB): `/readyz`
/// answers 503 naming the watermark, and a C-STORE from pynetdicom gets 0xA700 and stores
/// nothing; once space returns, `/readyz` is 200 again and the same C-STORE is stored,
/// without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_the_disk_watermark_readyz_is_503_and_c_store_gets_a700_until_space_returns() {
    let Fixture {
        tmp,
        pacs: _pacs,
        mut sites,
    } = Fixture::start("", "").await;
    // Everything A acknowledges stays at A.
    sites.stop_b().await;
    let a_dir = sites.data_dir("a");
    if let Some(a) = sites.a.take() {
        a.stop().await;
    }
    let _volume = Tmpfs::mount(&a_dir, "160m");
    sites.restart_a().await;
    let files = write_part10(
        &tmp.path().join("send"),
        &study(1, "READY^WATERMARK", 64 * 1024),
    );
    let a = sites.a.as_ref().unwrap();
    let (status, body) = readyz(a).await.unwrap();
    assert_eq!(status, 200, "control: ready above the watermark: {body}");

    // 8 MiB under the watermark.
    let ballast = fill_until_free(&a_dir, 56 << 20);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let last = loop {
        let r = readyz(a).await.unwrap();
        if r.0 != 200 || std::time::Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let refused = last.0 == 503;
    assert!(
        refused && last.1.contains("min_free"),
        "under the watermark: {last:?}"
    );
    let report = send_with_pynetdicom_report(sites.a_dicom(), "GW_A", &[], &files);
    assert_eq!(report.stored, 0, "{}", report.output);
    assert_eq!(
        report.failure_of(&files[0]).as_deref(),
        Some("status 0xA700"),
        "{}",
        report.output
    );
    assert_eq!(a.spool().unwrap().object_count_blocking().unwrap(), 0);

    // Space returns: no restart.
    std::fs::remove_file(&ballast).unwrap();
    let mut back = (0, String::new());
    for _ in 0..200 {
        back = readyz(a).await.unwrap();
        if back.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(back.0, 200, "after space returned: {back:?}");
    assert_eq!(
        send_with_pynetdicom(sites.a_dicom(), "GW_A", &files),
        1,
        "accepted again without a restart"
    );
    assert_eq!(a.spool().unwrap().object_count_blocking().unwrap(), 1);
    sites.stop().await;
}

/// Site A's destination `site-b` has `max_queue = 5` and site B is down: A takes five
/// objects, then answers the next C-STOREs 0xA700 (pynetdicom reports the status) and
/// stores nothing of them; once B is back and the queue drains, the refused objects are
/// taken, and every object reaches the PACS exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_destination_queue_refuses_c_store_with_a700_until_it_drains() {
    let tmp = tempfile::tempdir().unwrap();
    let pacs = Storescp::start(&tmp.path().join("pacs"));
    let mut sites = TwoSites::start(SiteOptions {
        pacs_port: pacs.port,
        a_listener_extra: String::new(),
        a_spool: String::new(),
        b_retry: SiteOptions::B_RETRY.to_owned(),
        b_destination_extra: String::new(),
        a_destination_extra: "max_queue = 5".to_owned(),
    })
    .await;
    sites.stop_b().await;
    let objects = study(7, "QUEUE^FULL", 16 * 1024);
    let files = write_part10(&tmp.path().join("send"), &objects);
    assert_eq!(
        send_with_pynetdicom(sites.a_dicom(), "GW_A", &files[..5]),
        5
    );
    // Premise: A's dispatcher holds five and has marked the destination full.
    let a_spool = sites.a_spool();
    let full = eventually(Duration::from_secs(20), || {
        a_spool.admit(&["site-b".to_owned()]).is_err()
    })
    .await;
    assert!(
        full,
        "premise: site-b's queue never counted as full: {:?}",
        sites.a.as_ref().unwrap().board.get("site-b")
    );
    let report = send_with_pynetdicom_report(sites.a_dicom(), "GW_A", &[], &files[5..]);
    assert_eq!(report.stored, 0, "{}", report.output);
    for f in &files[5..] {
        assert_eq!(
            report.failure_of(f).as_deref(),
            Some("status 0xA700"),
            "{}",
            report.output
        );
    }
    assert_eq!(
        a_spool.object_count_blocking().unwrap(),
        5,
        "the refused left nothing"
    );

    // B returns; the queue drains and A accepts again.
    sites.start_b().await;
    let drained = eventually(Duration::from_secs(60), || {
        a_spool.admit(&["site-b".to_owned()]).is_ok()
    })
    .await;
    assert!(drained, "site-b's queue never drained");
    assert_eq!(
        send_with_pynetdicom(sites.a_dicom(), "GW_A", &files[5..]),
        2
    );
    drop(a_spool);
    assert!(sites.settled(Duration::from_secs(60)).await);
    assert_eq!(pacs.received(), expected(&objects));
    assert_eq!(pacs.count(), objects.len(), "duplicates delivered");
    sites.stop().await;
}

/// The client config of site A (its certificate, B's CA).
fn site_a_tls(sites: &TwoSites) -> Arc<rustls::ClientConfig> {
    let d = sites.dir.path();
    Arc::new(
        dicom_gateway::tls::client_config(&dicom_gateway::config::TlsSection {
            cert: d.join("pki/site-a.crt"),
            key: d.join("pki/site-a.key"),
            ca: d.join("pki/ca.crt"),
            crls: Vec::new(),
        })
        .unwrap(),
    )
}

/// POST one well-formed STOW part (a fresh object) to site B's link as site A, over HTTP/2
/// and mutual TLS; returns the status and the `Retry-After` header.
async fn stow_one(port: u16, tls: Arc<rustls::ClientConfig>) -> (u16, Option<String>) {
    use http_body_util::BodyExt as _;
    let obj = study(1, "LINK^PROBE", 4096).remove(0);
    let mut part10 = dicom_gateway::dataset::part10_header(
        &obj.sop_class,
        &obj.sop_instance,
        &obj.transfer_syntax,
        None,
    );
    part10.extend_from_slice(&obj.dataset);
    let mut h = keystore::Sha256::new();
    h.update(&part10);
    let digest = h.finish();
    let mut body = format!(
        "--XyZ\r\nContent-Type: application/dicom\r\nContent-ID: <{}@site-a>\r\nContent-Digest: {}\r\n\r\n",
        obj.sop_instance,
        dicom_gateway::relay::content_digest(&digest)
    )
    .into_bytes();
    body.extend_from_slice(&part10);
    body.extend_from_slice(b"\r\n--XyZ--\r\n");

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
    let req = http::Request::post(format!(
        "https://127.0.0.1:{port}{}",
        dicom_gateway::relay::STOW_PATH
    ))
    .header(
        "content-type",
        "multipart/related; type=\"application/dicom\"; boundary=XyZ",
    )
    .body(http_body_util::Full::new(bytes::Bytes::from(body)))
    .unwrap();
    let resp = send.send_request(req).await.expect("no response");
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get(http::header::RETRY_AFTER)
        .map(|v| v.to_str().unwrap_or("<not text>").to_owned());
    let _ = resp.into_body().collect().await;
    (status, retry_after)
}

/// Site B's PACS is down and B's destination has `max_queue = 3`. Once B holds three
/// objects, a link request (HTTP/2 over mutual TLS, as site A) is answered 503 with a
/// `Retry-After` of whole seconds, and B stores nothing of it; site A records B's answer
/// (busy, 503) and keeps its object queued. When the PACS returns, everything arrives once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_queue_at_site_b_answers_the_link_503_with_retry_after() {
    let tmp = tempfile::tempdir().unwrap();
    let pacs_out = tmp.path().join("pacs");
    let pacs = Storescp::start(&pacs_out);
    let port = pacs.port;
    let mut sites = TwoSites::start(SiteOptions {
        pacs_port: port,
        a_listener_extra: String::new(),
        a_spool: String::new(),
        b_retry: SiteOptions::B_RETRY.to_owned(),
        b_destination_extra: "max_queue = 3".to_owned(),
        a_destination_extra: String::new(),
    })
    .await;
    // The PACS goes away: B keeps what it takes.
    drop(pacs);
    let objects = study(4, "LINK^FULL", 16 * 1024);
    assert_eq!(send(sites.a_dicom(), "GW_A", &objects[..3]).await, 3);
    let b_spool = sites.b_spool();
    let full = eventually(Duration::from_secs(30), || {
        b_spool.object_count_blocking().is_ok_and(|n| n == 3)
            && b_spool.admit(&["pacs".to_owned()]).is_err()
    })
    .await;
    assert!(
        full,
        "premise: B never held a full queue: {:?}",
        sites.b.as_ref().unwrap().board.get("pacs")
    );

    // A peer's request now: 503 with Retry-After, nothing stored.
    let (status, retry_after) = stow_one(sites.link_port, site_a_tls(&sites)).await;
    assert_eq!(status, 503);
    let secs = retry_after
        .as_deref()
        .and_then(|v| v.trim().parse::<u64>().ok());
    assert!(
        secs.is_some_and(|s| s >= 1),
        "Retry-After must be a delay in seconds: {retry_after:?}"
    );
    assert_eq!(
        b_spool.object_count_blocking().unwrap(),
        3,
        "B stored the refused part"
    );

    // Site A's own attempt: refused by B as busy, kept at A.
    assert_eq!(send(sites.a_dicom(), "GW_A", &objects[3..]).await, 1);
    let a = sites.a.as_ref().unwrap();
    let recorded = eventually(Duration::from_secs(30), || {
        a.board.get("site-b").is_some_and(|s| {
            s.queued == 1
                && s.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("busy") && e.contains("503"))
        })
    })
    .await;
    assert!(recorded, "{:?}", a.board.get("site-b"));
    assert_eq!(b_spool.object_count_blocking().unwrap(), 3);
    drop(b_spool);

    let pacs = Storescp::start_with(&pacs_out, port, &["+xa"]);
    assert!(sites.settled(Duration::from_secs(120)).await);
    assert_eq!(pacs.received(), expected(&objects));
    assert_eq!(pacs.count(), objects.len());
    sites.stop().await;
}

/// B's PACS is down (connections refused: the destination is unavailable), with a retry
/// budget of 1000 attempts but `max_age = "2s"`: every object becomes a dead letter once
/// it is older than two seconds, long before its attempts are spent, with the PACS's
/// failure as its reason and the budget named in the log; nothing reaches a PACS.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_object_past_max_age_becomes_a_dead_letter_with_attempts_left() {
    let tmp = tempfile::tempdir().unwrap();
    let pacs = Storescp::start(&tmp.path().join("pacs"));
    let mut sites = TwoSites::start(SiteOptions {
        pacs_port: pacs.port,
        a_listener_extra: String::new(),
        a_spool: String::new(),
        b_retry: r#"initial = "100ms", max_delay = "300ms", max_attempts = 1000, max_age = "2s""#
            .to_owned(),
        b_destination_extra: String::new(),
        a_destination_extra: String::new(),
    })
    .await;
    drop(pacs);
    let objects = study(3, "MAX^AGE", 8 * 1024);
    let files = write_part10(&tmp.path().join("send"), &objects);
    assert_eq!(send_with_pynetdicom(sites.a_dicom(), "GW_A", &files), 3);
    let b = sites.b.as_ref().unwrap();
    let dead = eventually(Duration::from_secs(60), || {
        b.board
            .get("pacs")
            .is_some_and(|s| s.dead == 3 && s.queued == 0)
    })
    .await;
    assert!(dead, "{:?}", b.board.get("pacs"));
    let v = dicom_gateway::admin::request(
        &b.admin_socket,
        http::Method::GET,
        "/v1/queue?destination=pacs&dead=1",
        None,
    )
    .await
    .unwrap();
    let entries: Vec<dicom_gateway::admin::EntryView> = serde_json::from_value(v).unwrap();
    assert_eq!(entries.len(), 3, "{entries:?}");
    for e in &entries {
        assert_eq!(e.state, "dead", "{e:?}");
        assert!(
            e.attempts < 1000,
            "the attempt budget was not what ended it: {e:?}"
        );
        assert!(
            e.last_reason
                .as_deref()
                .is_some_and(|r| r.contains("unavailable")),
            "the reason is the PACS's failure: {e:?}"
        );
    }
    let logs = captured_logs();
    assert!(
        logs.lines()
            .filter(|l| l.contains("dead letter") && l.contains("max_age"))
            .count()
            >= 3,
        "each dead letter names its time budget in the log"
    );
    sites.stop().await;
}
