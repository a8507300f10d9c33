//! HL7 v2 end to end: python-hl7 sends orders into site A's `[[hl7_listener]]`, they cross
//! the site link to site B, and B delivers them over MLLP to python-hl7 as the receiving
//! system. Real nodes, real TLS, real RocksDB; nobody here wrote the sender or the receiver.

use std::collections::HashMap;
use std::time::Duration;

use dicom_gateway::spool::EntryState;
use dicom_gateway_testkit::*;

const WAIT: Duration = Duration::from_secs(60);

/// Orders of three patients, interleaved, reach the receiving system byte for byte and, per
/// patient, in the order they were sent, across a transient failure: the receiving system
/// closes the connection without an ACK for the first order of patient 1 (a retry), and
/// nothing later of patient 1 may reach it before that order's AA. Sabotage-checked:
/// without the dispatcher's per-patient serial rule, later orders of patient 1 overtook
/// the retried one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn orders_arrive_identical_and_in_order_per_patient() {
    let tmp = tempfile::tempdir().unwrap();
    let ris = Ris::start(&tmp.path().join("ris"));
    let mut sites = Hl7Sites::start(Hl7Options::new(ris.port)).await;
    let mut messages = Vec::new();
    let mut by_patient: HashMap<&str, Vec<String>> = HashMap::new();
    for i in 0..8 {
        for p in ["PAT-001", "PAT-002", "PAT-003"] {
            let control = if p == "PAT-001" && i == 0 {
                "NOACK-1".to_owned()
            } else {
                format!("{p}-{i}")
            };
            let m = orm(&control, p, "DOE", &format!("order {i} of {p}"));
            by_patient.entry(p).or_default().push(control);
            messages.push(m);
        }
    }
    let acks = send_with_python_hl7(sites.a_hl7(), &messages);
    assert!(
        acks.iter().all(|a| a.as_deref() == Some("AA")),
        "every order is acknowledged AA: {acks:?}"
    );
    assert!(
        eventually(WAIT, || ris.accepted().len() == messages.len()).await,
        "all {} orders delivered: {:?}",
        messages.len(),
        ris.received().len()
    );
    // Byte for byte, each once.
    let accepted = ris.accepted();
    let mut sent: Vec<&String> = messages.iter().collect();
    let mut got: Vec<&String> = accepted.iter().map(|r| &r.raw).collect();
    sent.sort();
    got.sort();
    assert_eq!(sent, got, "the receiving system got exactly what was sent");
    // The premise: the first order of patient 1 got no ACK once and was sent again.
    let received = ris.received();
    assert_eq!(
        received
            .iter()
            .filter(|r| r.control_id == "NOACK-1" && r.ack.is_none())
            .count(),
        1,
        "NOACK-1 went unanswered once"
    );
    // Per patient: every message the receiving system saw (AE'd ones included) is the next
    // one expected, and the next is expected only after an AA.
    for (p, order) in &by_patient {
        let mut next = 0;
        for r in received
            .iter()
            .filter(|r| r.raw.contains(&format!("PID|1||{p}^")))
        {
            assert_eq!(
                r.control_id, order[next],
                "patient {p}: {} arrived while {} was not delivered yet",
                r.control_id, order[next]
            );
            if r.ack.as_deref() == Some("AA") {
                next += 1;
            }
        }
        assert_eq!(next, order.len());
    }
    assert!(
        eventually(WAIT, || sites
            .spool("a")
            .object_count_blocking()
            .is_ok_and(|n| n == 0)
            && sites
                .spool("b")
                .object_count_blocking()
                .is_ok_and(|n| n == 0))
        .await,
        "both spools empty once delivered"
    );
    let m = sites.metrics("a");
    assert_eq!(
        metric(
            &m,
            r#"dicom_gateway_hl7_messages_total{listener="ris-in",result="accepted"}"#
        ),
        messages.len() as f64,
        "{m}"
    );
    sites.stop().await;
}

/// Garbage, a message without a patient, an ACK, an oversize message and bytes without MLLP
/// framing are refused with AR (or the connection closed), nothing is stored, and the
/// listener still takes a good message afterwards. Never a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_is_refused_with_ar_and_nothing_is_stored() {
    let tmp = tempfile::tempdir().unwrap();
    let ris = Ris::start(&tmp.path().join("ris"));
    let mut opts = Hl7Options::new(ris.port);
    opts.a_listener_extra = "max_message_size = \"4KiB\"".to_owned();
    let mut sites = Hl7Sites::start(opts).await;
    let addr = sites.a_hl7();
    let good = orm("GOOD-1", "PAT-9", "DOE", "fine");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage in a frame", mllp(b"hello, this is not HL7")),
        (
            "no PID",
            mllp(good.split("PID|").next().unwrap().as_bytes()),
        ),
        (
            "an ACK",
            mllp(b"MSH|^~\\&|A|B|C|D|20261203||ACK^O01|X1|P|2.5\rMSA|AA|Y\r"),
        ),
        (
            "binary",
            mllp(&(0..=255u8).cycle().take(3000).collect::<Vec<_>>()),
        ),
        (
            "oversize",
            mllp(orm("BIG-1", "PAT-9", "DOE", &"x".repeat(10_000)).as_bytes()),
        ),
    ];
    for (what, bytes) in &cases {
        let (answer, closed) = mllp_exchange(addr, bytes).await;
        let code = answer.as_deref().and_then(ack_code);
        assert_eq!(code.as_deref(), Some("AR"), "{what}: answered AR");
        if *what == "oversize" {
            assert!(closed, "an oversize message closes the connection");
        }
    }
    // No framing at all: closed (an AR may precede the close).
    let (answer, closed) = mllp_exchange(addr, b"GET / HTTP/1.1\r\n\r\n").await;
    assert!(closed, "no MLLP framing: closed");
    assert!(
        answer
            .as_deref()
            .and_then(ack_code)
            .is_none_or(|c| c == "AR")
    );
    // A frame cut off mid-message: nothing stored.
    let (_, closed) = {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        use tokio::io::AsyncWriteExt as _;
        s.write_all(b"\x0bMSH|^~\\&|A|B|C|D|").await.unwrap();
        drop(s);
        (None::<Vec<u8>>, true)
    };
    assert!(closed);
    let spool = sites.spool("a");
    assert_eq!(spool.object_count_blocking().unwrap(), 0, "nothing stored");
    let m = sites.metrics("a");
    assert!(
        metric(
            &m,
            r#"dicom_gateway_hl7_messages_total{listener="ris-in",result="rejected"}"#
        ) >= 4.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            r#"dicom_gateway_hl7_messages_total{listener="ris-in",result="too_large"}"#
        ),
        1.0
    );
    // Still serving.
    let (answer, _) = mllp_exchange(addr, &mllp(good.as_bytes())).await;
    assert_eq!(answer.as_deref().and_then(ack_code).as_deref(), Some("AA"));
    assert!(eventually(WAIT, || ris.accepted().len() == 1).await);
    assert_eq!(ris.accepted()[0].raw, good);
    // No log line at info level carries what the messages held.
    let logs = captured_logs();
    assert!(
        !logs.contains("PAT-9") && !logs.contains("DOE"),
        "no patient data in logs"
    );
    sites.stop().await;
}

/// AA only after the synced commit: with the commit failing (a fault injected in the
/// spool's message batch), the sender gets AE and nothing is queued; once it works again the
/// same message gets AA, and it is in A's queue at the moment of the AA (B is down, so it
/// stays there). Sabotage-checked: answering AA before the commit's result made the first
/// step see AA.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn aa_only_after_the_commit_and_ae_when_it_fails() {
    let _scenario = fail::FailScenario::setup();
    let tmp = tempfile::tempdir().unwrap();
    let ris = Ris::start(&tmp.path().join("ris"));
    let mut opts = Hl7Options::new(ris.port);
    opts.a_failpoints = true;
    let mut sites = Hl7Sites::start(opts).await;
    sites.stop_b().await;
    let m = orm("COMMIT-1", "PAT-7", "ROE", "commit");
    fail::cfg("spool::message::batch", "return").unwrap();
    let acks = send_with_python_hl7(sites.a_hl7(), std::slice::from_ref(&m));
    assert_eq!(acks, vec![Some("AE".to_owned())], "a failed commit is AE");
    let spool = sites.spool("a");
    assert_eq!(spool.object_count_blocking().unwrap(), 0, "nothing stored");
    assert_eq!(spool.queue_len_blocking("site-b").unwrap(), 0);
    fail::remove("spool::message::batch");
    let acks = send_with_python_hl7(sites.a_hl7(), std::slice::from_ref(&m));
    assert_eq!(acks, vec![Some("AA".to_owned())]);
    // The AA came after the commit: the message is queued for B now (B is down).
    assert_eq!(
        spool.queue_len_blocking("site-b").unwrap(),
        1,
        "queued at the AA"
    );
    drop(spool);
    // It survives a restart of A and reaches the RIS once B is back.
    if let Some(a) = sites.a.take() {
        a.stop().await;
    }
    sites.start_a().await;
    sites.start_b().await;
    assert!(eventually(WAIT, || ris.accepted().len() == 1).await);
    assert_eq!(ris.accepted()[0].raw, m);
    sites.stop().await;
}

/// A message stored at B survives B's restart and is delivered once, byte for byte. The
/// receiving system is down first, so the premise (B holds the messages, A none) is
/// asserted before the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_survive_a_restart_of_b() {
    let tmp = tempfile::tempdir().unwrap();
    let ris_dir = tmp.path().join("ris");
    let ris = Ris::start(&ris_dir);
    let port = ris.port;
    let mut sites = Hl7Sites::start(Hl7Options::new(port)).await;
    drop(ris);
    let messages: Vec<String> = (0..5)
        .map(|i| orm(&format!("RST-{i}"), "PAT-5", "POE", &format!("n{i}")))
        .collect();
    let acks = send_with_python_hl7(sites.a_hl7(), &messages);
    assert!(acks.iter().all(|a| a.as_deref() == Some("AA")), "{acks:?}");
    // The premise: everything crossed the link and waits at B.
    assert!(
        eventually(WAIT, || sites
            .spool("a")
            .object_count_blocking()
            .is_ok_and(|n| n == 0)
            && sites
                .spool("b")
                .queue_len_blocking("ris")
                .is_ok_and(|n| n == 5))
        .await,
        "B holds the 5 messages"
    );
    sites.stop_b().await;
    sites.start_b().await;
    assert_eq!(
        sites.spool("b").queue_len_blocking("ris").unwrap(),
        5,
        "kept across the restart"
    );
    let ris = Ris::start_on(&ris_dir, port);
    assert!(eventually(WAIT, || ris.accepted().len() == 5).await);
    let got: Vec<String> = ris.accepted().into_iter().map(|r| r.raw).collect();
    assert_eq!(
        got, messages,
        "delivered once each, in order, byte for byte"
    );
    assert!(
        eventually(WAIT, || sites
            .spool("b")
            .object_count_blocking()
            .is_ok_and(|n| n == 0))
        .await
    );
    sites.stop().await;
}

/// An identical re-send to the listener (the sender missed our AA) is acknowledged AA and
/// stored once; the same control id with other content is refused with AR. The receiving
/// system gets the message once. Sabotage-checked: without the listener's dedup key the
/// receiving system got the order twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resend_is_stored_once_and_a_conflicting_one_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ris = Ris::start(&tmp.path().join("ris"));
    let mut sites = Hl7Sites::start(Hl7Options::new(ris.port)).await;
    let m = orm("DUP-1", "PAT-3", "LOE", "once");
    let other = orm("DUP-1", "PAT-3", "LOE", "other content");
    let last = orm("DUP-2", "PAT-3", "LOE", "after");
    let acks = send_with_python_hl7(sites.a_hl7(), &[m.clone(), m.clone(), other, last.clone()]);
    assert_eq!(
        acks,
        ["AA", "AA", "AR", "AA"]
            .map(|s| Some(s.to_owned()))
            .to_vec()
    );
    assert!(eventually(WAIT, || ris.accepted().len() >= 2).await);
    assert!(
        eventually(WAIT, || sites
            .spool("a")
            .object_count_blocking()
            .is_ok_and(|n| n == 0)
            && sites
                .spool("b")
                .object_count_blocking()
                .is_ok_and(|n| n == 0))
        .await
    );
    let got: Vec<String> = ris.accepted().into_iter().map(|r| r.raw).collect();
    assert_eq!(got, vec![m, last], "the order once, then the next");
    let metrics = sites.metrics("a");
    for (result, n) in [("duplicate", 1.0), ("conflict", 1.0), ("accepted", 2.0)] {
        assert_eq!(
            metric(
                &metrics,
                &format!(
                    r#"dicom_gateway_hl7_messages_total{{listener="ris-in",result="{result}"}}"#
                )
            ),
            n,
            "{result}"
        );
    }
    sites.stop().await;
}

/// AE and AR from the receiving system both make the message a dead letter at B at once
/// (not retried), kept with the ACK's coded reason (code, meaning, location) and never its
/// free text, which names the patient; the patient's next message is delivered after them.
/// No log line carries the name either. Sabotage-checked: with AE transient again, ERR-1
/// reached the receiving system more than once and the test failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ae_and_ar_from_the_receiving_system_are_dead_letters_with_their_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let ris = Ris::start(&tmp.path().join("ris"));
    let mut sites = Hl7Sites::start(Hl7Options::new(ris.port)).await;
    let name = "KOENIGSBERGER";
    let err = orm("ERR-1", "PAT-4", name, "application error");
    let rej = orm("REJ-1", "PAT-4", name, "refused");
    let next = orm("NEXT-1", "PAT-4", name, "next");
    let acks = send_with_python_hl7(sites.a_hl7(), &[err, rej, next.clone()]);
    assert!(acks.iter().all(|a| a.as_deref() == Some("AA")));
    assert!(eventually(WAIT, || ris.accepted().len() == 1).await);
    assert_eq!(ris.accepted()[0].raw, next);
    let b = sites.spool("b");
    assert!(
        eventually(WAIT, || b.entries_blocking("ris").is_ok_and(|e| e.len()
            == 2
            && e.iter().all(|e| e.state == EntryState::Dead)))
        .await
    );
    // The premise: the receiving system answered AE and AR, and put the name in the text.
    let received = ris.received();
    for (control, code) in [("ERR-1", "AE"), ("REJ-1", "AR")] {
        let got: Vec<_> = received
            .iter()
            .filter(|r| r.control_id == control)
            .collect();
        assert_eq!(
            got.len(),
            1,
            "{control} was sent once: a {code} is not retried"
        );
        assert_eq!(got[0].ack.as_deref(), Some(code));
    }
    let mut reasons = Vec::new();
    for e in b.entries_blocking("ris").unwrap() {
        let f = b.failure_blocking("ris", e.seq).unwrap().unwrap();
        assert_eq!(f.attempts, 1, "one attempt: {f:?}");
        reasons.push(f.last_reason().unwrap_or_default().to_owned());
    }
    reasons.sort();
    assert_eq!(
        reasons,
        vec![
            "refused (ack_error): the receiving system answered AE (application error): error 207 (application internal error), severity E, at MSH-10".to_owned(),
            "refused (ack_reject): the receiving system answered AR (application reject): error 204 (unknown key identifier), severity E, at PID-3".to_owned(),
        ]
    );
    let m = sites.metrics("b");
    assert_eq!(
        metric(
            &m,
            r#"dicom_gateway_dead_letter_objects{destination="ris"}"#
        ),
        2.0,
        "{m}"
    );
    assert!(!m.contains(name), "no patient data in metric labels");
    assert!(!captured_logs().contains(name), "no patient data in logs");
    sites.stop().await;
}

/// Reports come back the other way (the two-way set-up of `deploy/examples/`): orders from
/// the ordering RIS at site A reach the reading RIS at site B, and reports (ORU) sent by
/// python-hl7 to B's own `[[hl7_listener]]` reach A's RIS over the link in the opposite
/// direction (B's `gateway` destination, A's link listener), byte for byte and in order.
/// The premise, that each crossed the link its own way, is asserted from each receiving
/// node's link-listener counter.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reports_come_back_the_other_way() {
    let tmp = tempfile::tempdir().unwrap();
    let reading = Ris::start(&tmp.path().join("reading"));
    let ordering = Ris::start(&tmp.path().join("ordering"));
    let mut opts = Hl7Options::new(reading.port);
    opts.reports_to = Some(ordering.port);
    let mut sites = Hl7Sites::start(opts).await;
    let orders: Vec<String> = (0..3)
        .map(|i| orm(&format!("ORD-{i}"), "PAT-6", "SOE", &format!("order {i}")))
        .collect();
    let reports: Vec<String> = (0..3)
        .map(|i| {
            oru(
                &format!("RPT-{i}"),
                "PAT-6",
                "SOE",
                &format!("no finding {i}"),
            )
        })
        .collect();
    let acks = send_with_python_hl7(sites.a_hl7(), &orders);
    assert!(acks.iter().all(|a| a.as_deref() == Some("AA")), "{acks:?}");
    assert!(eventually(WAIT, || reading.accepted().len() == 3).await);
    let acks = send_with_python_hl7(sites.b_hl7(), &reports);
    assert!(acks.iter().all(|a| a.as_deref() == Some("AA")), "{acks:?}");
    assert!(eventually(WAIT, || ordering.accepted().len() == 3).await);
    let raw = |r: &Ris| -> Vec<String> { r.accepted().into_iter().map(|m| m.raw).collect() };
    assert_eq!(raw(&reading), orders, "the orders reached the reading site");
    assert_eq!(
        raw(&ordering),
        reports,
        "the reports came back to the ordering site"
    );
    for (site, listener) in [
        ("a", "ris-in"),
        ("b", "reports-in"),
        ("a", "wan"),
        ("b", "wan"),
    ] {
        assert_eq!(
            metric(
                &sites.metrics(site),
                &format!(
                    r#"dicom_gateway_hl7_messages_total{{listener="{listener}",result="accepted"}}"#
                )
            ),
            3.0,
            "site {site}, listener {listener}"
        );
        // The shared ingest metrics count them too, under protocol="hl7".
        let m = sites.metrics(site);
        assert_eq!(
            metric(
                &m,
                &format!(
                    r#"dicom_gateway_received_objects_total{{listener="{listener}",protocol="hl7"}}"#
                )
            ),
            3.0,
            "site {site}, listener {listener}: {m}"
        );
        assert!(
            metric(
                &m,
                &format!(
                    r#"dicom_gateway_received_bytes_total{{listener="{listener}",protocol="hl7"}}"#
                )
            ) > 300.0
        );
        assert_eq!(
            metric(
                &m,
                &format!(
                    r#"dicom_gateway_received_objects_total{{listener="{listener}",protocol="dicom"}}"#
                )
            ),
            0.0
        );
    }
    assert!(
        eventually(WAIT, || sites
            .spool("a")
            .object_count_blocking()
            .is_ok_and(|n| n == 0)
            && sites
                .spool("b")
                .object_count_blocking()
                .is_ok_and(|n| n == 0))
        .await,
        "both spools empty once delivered"
    );
    sites.stop().await;
}

/// No plaintext patient data at rest: messages wait in both spools (B stopped, then the
/// receiving system down), and neither data directory holds the patient id, the name or a
/// message's text in any file, WAL included.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_plaintext_message_content_on_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let ris = Ris::start(&tmp.path().join("ris"));
    let mut sites = Hl7Sites::start(Hl7Options::new(ris.port)).await;
    drop(ris);
    let secrets = ["PIDSECRET4711", "ZYXWVSURNAME", "NOTE-CONFIDENTIAL-42"];
    let m = orm("SCAN-1", secrets[0], secrets[1], secrets[2]);
    sites.stop_b().await;
    let acks = send_with_python_hl7(sites.a_hl7(), std::slice::from_ref(&m));
    assert_eq!(acks, vec![Some("AA".to_owned())]);
    assert_eq!(
        sites.spool("a").queue_len_blocking("site-b").unwrap(),
        1,
        "waits at A"
    );
    sites.start_b().await;
    assert!(
        eventually(WAIT, || sites
            .spool("b")
            .queue_len_blocking("ris")
            .is_ok_and(|n| n == 1))
        .await,
        "waits at B"
    );
    for site in ["a", "b"] {
        let dir = sites.data_dir(site);
        let mut files = 0;
        for entry in walk(&dir) {
            let bytes = std::fs::read(&entry).unwrap_or_default();
            files += 1;
            for s in secrets.iter().chain(std::iter::once(&"ORM^O01")) {
                assert!(
                    !bytes.windows(s.len()).any(|w| w == s.as_bytes()),
                    "{s} in plaintext in {}",
                    entry.display()
                );
            }
        }
        assert!(files > 3, "scanned the data directory of {site}");
    }
    let logs = captured_logs();
    for s in secrets {
        assert!(!logs.contains(s), "{s} in the logs");
    }
    sites.stop().await;
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// POST `body` to B's link listener as site A, with `Content-ID` `transfer` and the
/// `Content-Digest` of `digest_of`; returns the HTTP status.
async fn post_message(sites: &Hl7Sites, transfer: &str, body: &[u8], digest_of: &[u8]) -> u16 {
    use http_body_util::BodyExt as _;
    let pki = sites.dir.path().join("pki");
    let tls = std::sync::Arc::new(
        dicom_gateway::tls::client_config(&dicom_gateway::config::TlsSection {
            cert: pki.join("site-a.crt"),
            key: pki.join("site-a.key"),
            ca: pki.join("ca.crt"),
            crls: Vec::new(),
        })
        .unwrap(),
    );
    let tcp = tokio::net::TcpStream::connect(sites.link).await.unwrap();
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
    let mut sha = keystore::Sha256::new();
    sha.update(digest_of);
    let req = http::Request::post(format!("https://{}/hl7/v2/messages", sites.link))
        .header("content-type", dicom_gateway::relay::HL7_MEDIA_TYPE)
        .header("content-id", format!("<{transfer}@site-a>"))
        .header(
            "content-digest",
            dicom_gateway::relay::content_digest(&sha.finish()),
        )
        .body(http_body_util::Full::new(bytes::Bytes::copy_from_slice(
            body,
        )))
        .unwrap();
    let resp = send.send_request(req).await.expect("a response");
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    status
}

/// The link's HL7 request type deduplicates like a STOW part: an identical re-send is 200
/// without a second copy, the same transfer with other bytes 409 (permanent at the
/// sender), a wrong digest 400, a message that does not parse 422.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_link_deduplicates_hl7_transfers() {
    let tmp = tempfile::tempdir().unwrap();
    let ris = Ris::start(&tmp.path().join("ris"));
    let mut sites = Hl7Sites::start(Hl7Options::new(ris.port)).await;
    let m = orm("LINK-1", "PAT-8", "MOE", "over the link");
    let other = orm("LINK-1", "PAT-8", "MOE", "other bytes");
    let t = "0123456789abcdef0123456789abcdef";
    assert_eq!(
        post_message(&sites, t, m.as_bytes(), m.as_bytes()).await,
        200
    );
    assert_eq!(
        post_message(&sites, t, m.as_bytes(), m.as_bytes()).await,
        200,
        "identical re-send"
    );
    assert_eq!(
        post_message(&sites, t, other.as_bytes(), other.as_bytes()).await,
        409,
        "same transfer, other bytes"
    );
    assert_eq!(
        post_message(&sites, "another", m.as_bytes(), b"not these bytes").await,
        400,
        "digest mismatch"
    );
    assert_eq!(
        post_message(&sites, "garbage", b"not HL7 at all", b"not HL7 at all").await,
        422,
        "does not parse"
    );
    assert!(eventually(WAIT, || ris.accepted().len() == 1).await);
    assert!(
        eventually(WAIT, || sites
            .spool("b")
            .object_count_blocking()
            .is_ok_and(|n| n == 0))
        .await
    );
    let got: Vec<String> = ris.accepted().into_iter().map(|r| r.raw).collect();
    assert_eq!(got, vec![m], "stored and delivered once");
    let metrics = sites.metrics("b");
    for (result, n) in [
        ("accepted", 1.0),
        ("duplicate", 1.0),
        ("conflict", 1.0),
        ("rejected", 2.0),
    ] {
        assert_eq!(
            metric(
                &metrics,
                &format!(r#"dicom_gateway_hl7_messages_total{{listener="wan",result="{result}"}}"#)
            ),
            n,
            "{result}"
        );
    }
    sites.stop().await;
}

/// Not a test of its own: site B of
/// `a_kill_9_of_b_mid_stream_loses_nothing_and_keeps_the_order`, in a child process that
/// test SIGKILLs (see [`Hl7Sites::spawn_b_process`]). Does nothing when run directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "the child process of a_kill_9_of_b_mid_stream_loses_nothing_and_keeps_the_order"]
async fn site_b_child_process() {
    run_site_b_process().await;
}

/// kill -9 of site B in the middle of an HL7 stream: B runs in a child process and is
/// SIGKILLed at a point fixed by fault injection, not by timing: the moment its dispatcher
/// opens the 6th message to deliver (5 delivered and recorded, the others waiting at B or
/// still at A, some perhaps mid-request on the link). B starts again from what the kill
/// left on disk; the receiving system then has every message, nothing else, any duplicate
/// an identical re-send, and each patient's messages in the order they were sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kill_9_of_b_mid_stream_loses_nothing_and_keeps_the_order() {
    let tmp = tempfile::tempdir().unwrap();
    let ris = Ris::start(&tmp.path().join("ris"));
    let mut sites = Hl7Sites::start(Hl7Options::new(ris.port)).await;
    let mut b = sites
        .spawn_b_process("site_b_child_process", "spool::read::open", 6)
        .await;
    let patients = ["PAT-K1", "PAT-K2", "PAT-K3"];
    let mut messages = Vec::new();
    for i in 0..10 {
        for p in patients {
            messages.push(orm(&format!("{p}-{i}"), p, "KILLE", &format!("n{i}")));
        }
    }
    let acks = send_with_python_hl7(sites.a_hl7(), &messages);
    assert!(acks.iter().all(|a| a.as_deref() == Some("AA")), "{acks:?}");
    // The premise: B stopped mid-stream, at its 6th open.
    assert!(
        b.wait_reached(WAIT),
        "premise: site B never opened a 6th message"
    );
    let before = ris.received();
    assert_eq!(before.len(), 5, "premise: 5 delivered before the kill");
    b.kill_9();
    sites.start_b().await;
    assert!(
        eventually(WAIT, || {
            let mut got: Vec<String> = ris.accepted().into_iter().map(|r| r.raw).collect();
            got.sort();
            got.dedup();
            got.len() == messages.len()
        })
        .await,
        "not everything delivered after the restart: {} of {}",
        ris.accepted().len(),
        messages.len()
    );
    assert!(
        eventually(WAIT, || sites
            .spool("a")
            .object_count_blocking()
            .is_ok_and(|n| n == 0)
            && sites
                .spool("b")
                .object_count_blocking()
                .is_ok_and(|n| n == 0))
        .await,
        "both spools empty once delivered"
    );
    let received = ris.received();
    // Nothing lost, nothing else; a duplicate only as an identical re-send.
    for r in &received {
        assert!(
            messages.contains(&r.raw),
            "{} arrived other than it was sent",
            r.control_id
        );
    }
    for m in &messages {
        assert!(
            received
                .iter()
                .any(|r| &r.raw == m && r.ack.as_deref() == Some("AA")),
            "lost"
        );
    }
    // Per patient: each message arrives only once the one before it was accepted.
    for p in patients {
        let order: Vec<String> = (0..10).map(|i| format!("{p}-{i}")).collect();
        let mut next = 0;
        for r in received.iter().filter(|r| r.control_id.starts_with(p)) {
            let i = order.iter().position(|c| *c == r.control_id).unwrap();
            assert!(
                i <= next,
                "patient {p}: {} arrived before {} was delivered",
                r.control_id,
                order[next]
            );
            if i == next && r.ack.as_deref() == Some("AA") {
                next += 1;
            }
        }
        assert_eq!(next, order.len(), "patient {p}");
    }
    sites.stop().await;
}
