//! End to end: a DICOM SCU → site A → mutual TLS → site B → DCMTK storescp.

use std::time::Duration;

use dicom_gateway_testkit::*;

/// The bytes that arrive at the PACS are the bytes that were sent, and neither data folder
/// holds anything readable from them afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relays_byte_for_byte_and_leaves_no_plaintext_at_rest() {
    let Fixture {
        tmp: _tmp,
        pacs,
        mut sites,
    } = Fixture::start("", "").await;

    let marker = "ZZMARKER^SCANTEST";
    let mut objects = study(24, marker, 64 * 1024);
    // One object spanning several 1 MiB segments.
    objects.extend(study(1, marker, 5 << 20));
    let study_uid = {
        // the study UID is inside every data set; find it through the generator's output
        let ds = &objects[0].dataset;
        let pos = ds.windows(5).position(|w| w == b"2.25.").unwrap();
        let end = ds[pos..]
            .iter()
            .position(|b| *b == 0 || *b == b' ')
            .unwrap()
            + pos;
        String::from_utf8(ds[pos..end].to_vec()).unwrap()
    };
    let pixel_probe = objects[3].dataset[objects[3].dataset.len() - 64..].to_vec();
    let instance_probe = objects[5].sop_instance.clone();

    assert_eq!(send(sites.a_dicom(), "GW_A", &objects).await, objects.len());
    let want = expected(&objects);
    let arrived = eventually(Duration::from_secs(120), || pacs.count() >= objects.len()).await;
    assert!(
        arrived,
        "only {} of {} objects arrived",
        pacs.count(),
        objects.len()
    );
    // Nothing extra arrives later either: neither site holds anything more to send.
    assert!(
        sites.settled(Duration::from_secs(30)).await,
        "the sites still hold objects"
    );
    assert_eq!(
        pacs.received(),
        want,
        "delivered data sets differ from those sent"
    );

    // Delivered objects leave both spools.
    let a = sites.a_spool();
    let b = sites.b_spool();
    for spool in [&a, &b] {
        let empty = || spool.object_count_blocking().unwrap() == 0;
        assert!(eventually(Duration::from_secs(10), empty).await);
    }
    drop((a, b));

    // Metrics saw it, with no UID or name in any label value of either node.
    let metrics = sites.a.as_ref().unwrap().metrics.render();
    assert!(
        metrics.contains("dicom_gateway_forwarded_objects_total{destination=\"site-b\"} 25"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "dicom_gateway_received_objects_total{listener=\"lan\",protocol=\"dicom\"} 25"
        ),
        "{metrics}"
    );
    let metrics_b = sites.b.as_ref().unwrap().metrics.render();
    assert!(
        metrics_b.contains(
            "dicom_gateway_received_objects_total{listener=\"wan\",protocol=\"dicom\"} 25"
        ),
        "{metrics_b}"
    );
    let values: Vec<String> = [&metrics, &metrics_b]
        .iter()
        .flat_map(|m| label_values(m))
        .collect();
    // Positive control: the parser finds the configured names.
    for want in ["lan", "wan", "site-b", "pacs", "success", "accepted"] {
        assert!(values.iter().any(|v| v == want), "{want} not in {values:?}");
    }
    let mut needles: Vec<&str> = vec![marker, study_uid.as_str(), "ZZMARKER", "SCANTEST"];
    needles.extend(objects.iter().map(|o| o.sop_instance.as_str()));
    for v in &values {
        assert!(!v.contains("2.25."), "a UID in a label value: {v}");
        for n in &needles {
            assert!(!v.contains(n), "{n} in a label value: {v}");
        }
    }

    sites.stop().await;

    // Nothing identifying reached the logs (info level, as operators run it).
    let logs = captured_logs();
    assert!(logs.contains("node ready"), "no logs captured");
    for needle in [marker, study_uid.as_str(), instance_probe.as_str()] {
        assert!(!logs.contains(needle), "{needle} appears in the logs");
    }
    for o in &objects {
        assert!(
            !logs.contains(&o.sop_instance),
            "a SOP Instance UID appears in the logs"
        );
    }

    // Positive control: the markers are findable where plaintext is expected.
    assert!(!files_containing(&pacs.out, marker.as_bytes()).is_empty());
    assert!(!files_containing(&pacs.out, &pixel_probe).is_empty());
    for site in ["a", "b"] {
        let dir = sites.data_dir(site);
        assert!(!all_files(&dir).is_empty(), "no data dir for {site}");
        for needle in [
            marker.as_bytes(),
            study_uid.as_bytes(),
            instance_probe.as_bytes(),
            &pixel_probe[..],
        ] {
            let hits = files_containing(&dir, needle);
            assert!(
                hits.is_empty(),
                "plaintext {:?} found in {hits:?}",
                String::from_utf8_lossy(&needle[..needle.len().min(24)])
            );
        }
    }
}

/// Site B stops in the middle of a transfer, holding an object whose answer site A never
/// got, and comes back: A re-sends it, B recognises it, and the PACS gets everything once.
///
/// B runs with fault injection, so the premises hold by construction, not by timing: B
/// freezes right after the synced commit of its 11th object (A then holds the other 20 at
/// least: mid-transfer), and that object's answer is a failure (503), as when B dies
/// between its sync and its answer. So A must re-send an object B already has.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_of_site_b_mid_transfer_delivers_everything_exactly_once() {
    let Fixture {
        tmp: _tmp,
        pacs,
        mut sites,
    } = Fixture::start("", "").await;
    let _scenario = fail::FailScenario::setup();
    sites.stop_b().await;
    sites.b_failpoints = true;
    sites.start_b().await;
    let (reached, release) = hold_at("spool::commit::synced", 11);
    fail::cfg("spool::commit::answer", "10*off->1*return->off").unwrap();
    let first = study(30, "RESTART^ONE", 128 * 1024);
    let second = study(30, "RESTART^TWO", 128 * 1024);
    // Every failed send of A to B, whatever the reason (B's 503, or the link closing).
    let failures = |text: &str| {
        metric_sum(
            text,
            r#"dicom_gateway_forward_failures_total{destination="site-b""#,
        )
    };
    let dup = r#"dicom_gateway_link_parts_total{listener="wan",result="duplicate"}"#;
    let a_metrics = sites.a.as_ref().unwrap().metrics.clone();

    assert_eq!(send(sites.a_dicom(), "GW_A", &first).await, first.len());
    // Premise: B froze after storing its 11th object; A holds every object not confirmed.
    let frozen = tokio::task::spawn_blocking(move || reached.recv_timeout(Duration::from_secs(60)))
        .await
        .unwrap();
    assert!(
        frozen.is_ok(),
        "premise: site B never stored an 11th object"
    );
    let held = sites.a_spool().queue_len_blocking("site-b").unwrap();
    assert!(
        held >= first.len() - 10,
        "premise: B must stop while A holds the rest of the batch; A holds {held}"
    );
    // B stops: it takes no new request, while the 11th object's answer is still held...
    let b = sites.b.take().unwrap();
    let (b_readiness, b_metrics) = (b.readiness.clone(), b.metrics.clone());
    let stopping = tokio::spawn(b.stop());
    assert!(eventually(Duration::from_secs(10), || b_readiness.is_draining()).await);
    // ...then answers it as failed, and is gone.
    drop(release);
    stopping.await.unwrap();
    fail::remove("spool::commit::synced");
    assert!(
        eventually(Duration::from_secs(10), || failures(&a_metrics.render())
            >= 1.0)
        .await,
        "premise: site A never saw B's failure answer"
    );
    let dup_before = metric(&b_metrics.render(), dup);
    let held = sites.a_spool().queue_len_blocking("site-b").unwrap();

    // A keeps accepting while B is away and holds everything not confirmed.
    assert_eq!(send(sites.a_dicom(), "GW_A", &second).await, second.len());
    // (A send B answered just before it stopped may still be recorded meanwhile.)
    let holding = sites.a_spool().queue_len_blocking("site-b").unwrap();
    assert!(
        holding > second.len() && holding <= held + second.len(),
        "site A must hold what B has not confirmed: {holding} queued, {held} before the second batch"
    );

    sites.start_b().await;
    assert!(
        sites.settled(Duration::from_secs(120)).await,
        "not delivered after B came back: A holds {:?}, the PACS has {}",
        sites.a_spool().queue_len_blocking("site-b"),
        pacs.count()
    );
    // A re-sent at least one object B already had, and B said so.
    let dups = dup_before + metric(&sites.b.as_ref().unwrap().metrics.render(), dup);
    assert!(dups >= 1.0, "no re-send of a stored object was recognised");
    let mut all = first.clone();
    all.extend(second);
    assert_eq!(
        pacs.received(),
        expected(&all),
        "lost or duplicated objects"
    );
    assert_eq!(pacs.count(), all.len(), "duplicates delivered");
    sites.stop().await;
}

/// A restart of site A itself resumes its queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_of_site_a_resumes_its_queue() {
    let Fixture {
        tmp: _tmp,
        pacs,
        mut sites,
    } = Fixture::start("", "").await;
    // B is down, so everything stays queued at A.
    sites.stop_b().await;
    let objects = study(10, "RESUME^A", 32 * 1024);
    assert_eq!(send(sites.a_dicom(), "GW_A", &objects).await, objects.len());
    assert_eq!(
        sites.a_spool().queue_len_blocking("site-b").unwrap(),
        objects.len()
    );
    // Restart A from its config and data folder, then bring B back.
    sites.restart_a().await;
    sites.start_b().await;
    assert!(sites.settled(Duration::from_secs(60)).await);
    assert_eq!(pacs.received(), expected(&objects));
    sites.stop().await;
}

/// Every label value in a Prometheus text exposition.
fn label_values(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (Some(open), Some(close)) = (line.find('{'), line.rfind('}')) else {
            continue;
        };
        let mut rest = &line[open + 1..close];
        while let Some(eq) = rest.find("=\"") {
            let after = &rest[eq + 2..];
            let Some(end) = after.find('"') else { break };
            out.push(after[..end].to_owned());
            rest = &after[end + 1..];
        }
    }
    out
}

/// A delivered study is kept for `[spool] retention`, and `queue resend --study` sends it
/// again: the far PACS gets it a second time (a new transfer for site B, not deduplicated
/// against the first), other studies stay put, and the copies are retained again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retained_study_is_resent_on_request() {
    let Fixture {
        tmp: _tmp,
        pacs,
        mut sites,
    } = Fixture::start("", r#"retention = "1h""#).await;
    let wanted = study(5, "RESEND^ONE", 16 * 1024);
    let other = study(2, "RESEND^OTHER", 16 * 1024);
    assert_eq!(send(sites.a_dicom(), "GW_A", &wanted).await, wanted.len());
    assert_eq!(send(sites.a_dicom(), "GW_A", &other).await, other.len());
    let a = sites.a_spool();
    let b = sites.b_spool();
    let delivered = |n: usize| {
        let (a, b, pacs) = (a.clone(), b.clone(), &pacs);
        move || {
            pacs.count() >= n
                && a.queue_len_blocking("site-b").is_ok_and(|q| q == 0)
                && b.object_count_blocking().is_ok_and(|c| c == 0)
        }
    };
    assert!(eventually(Duration::from_secs(60), delivered(7)).await);
    // Delivered, and kept at A (encrypted) only: B keeps nothing by default.
    assert_eq!(a.retained_count_blocking().unwrap(), 7);
    assert_eq!(a.object_count_blocking().unwrap(), 7);
    // The study UID, from the sealed metadata of what A kept.
    let mut study_uid = None;
    for r in a.retained_blocking().unwrap() {
        let (meta, _) = a.meta(r.object).await.unwrap();
        if wanted
            .iter()
            .any(|o| o.sop_instance == meta.sop_instance_uid)
        {
            study_uid = Some(meta.study_uid);
        }
    }
    let study_uid = study_uid.expect("the study is retained");

    let resend = |study: &str, socket: &std::path::Path| {
        let body = serde_json::to_vec(&dicom_gateway::admin::ResendRequest {
            study: study.to_owned(),
            destination: None,
        })
        .unwrap();
        let socket = socket.to_owned();
        async move {
            dicom_gateway::admin::request(
                &socket,
                http::Method::POST,
                "/v1/queue/resend",
                Some(body),
            )
            .await
        }
    };
    let a_socket = sites.a.as_ref().unwrap().admin_socket.clone();
    let b_socket = sites.b.as_ref().unwrap().admin_socket.clone();
    let r: dicom_gateway::admin::Resended =
        serde_json::from_value(resend(&study_uid, &a_socket).await.unwrap()).unwrap();
    assert_eq!(
        (r.objects, r.entries, r.destinations),
        (5, 5, vec!["site-b".to_owned()])
    );
    assert!(eventually(Duration::from_secs(60), delivered(12)).await);
    let mut all = wanted.clone();
    all.extend(wanted.iter().cloned());
    all.extend(other.iter().cloned());
    assert_eq!(
        pacs.received(),
        expected(&all),
        "the resent study arrives once more, and nothing else does"
    );
    assert_eq!(
        a.retained_count_blocking().unwrap(),
        7,
        "retained again after delivery"
    );
    // An unknown study resends nothing; a node without retention says what to do.
    let none: dicom_gateway::admin::Resended =
        serde_json::from_value(resend("1.2.3.4", &a_socket).await.unwrap()).unwrap();
    assert_eq!(none.objects, 0);
    let err = resend(&study_uid, &b_socket).await.unwrap_err();
    assert!(format!("{err:#}").contains("retention"), "{err:#}");
    let status = admin_status(sites.a.as_ref().unwrap()).await;
    assert_eq!(status.retained, 7);
    // Purging the study deletes its retained copies now; the other study stays.
    let body = serde_json::to_vec(&dicom_gateway::admin::Selector {
        study: Some(study_uid.clone()),
        ..Default::default()
    })
    .unwrap();
    let purged: dicom_gateway::admin::Changed = serde_json::from_value(
        dicom_gateway::admin::request(&a_socket, http::Method::POST, "/v1/queue/purge", Some(body))
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!((purged.matched, purged.retained_purged), (0, 5));
    assert_eq!(a.retained_count_blocking().unwrap(), 2);
    drop((a, b));
    sites.stop().await;
}

/// Site A picks up a rotated client certificate without a restart: the pooled link
/// connection is dropped when the files change, new connections present the new
/// certificate, and a rotation that B cannot accept stops the link until it is fixed,
/// with nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn site_a_reloads_its_client_certificate_without_a_restart() {
    let Fixture {
        tmp,
        pacs,
        mut sites,
    } = Fixture::start("", "").await;
    let first = study(3, "RELOAD^ONE", 4096);
    assert_eq!(send(sites.a_dicom(), "GW_A", &first).await, 3);
    assert!(eventually(Duration::from_secs(60), || pacs.count() == 3).await);
    let a_metrics = sites.a.as_ref().unwrap().metrics.clone();
    let reloads = |result: &str| {
        metric(
            &a_metrics.render(),
            &format!("dicom_gateway_tls_reloads_total{{listener=\"sender\",result=\"{result}\"}}"),
        )
    };
    // B's count of handshakes refused for a client certificate its CA did not sign: the
    // one place that proves which certificate A presented. (TLS 1.3 clients finish their
    // side of the handshake before the server checks their certificate, so A sees a link
    // error.) The other CA has the same name as B's, so webpki finds it as the issuer and
    // the signature check fails: reason "bad_certificate", not "unknown_ca".
    // Each site wrapped a new key for the study (kek_operations_total is wired).
    for m in [&a_metrics, &sites.b.as_ref().unwrap().metrics] {
        assert!(
            metric(
                &m.render(),
                "dicom_gateway_kek_operations_total{kek_version=\"1\",operation=\"wrap\"}"
            ) >= 1.0
        );
    }
    let b_metrics = sites.b.as_ref().unwrap().metrics.clone();
    let tls_failures = || {
        metric(
            &b_metrics.render(),
            "dicom_gateway_tls_handshake_failures_total{listener=\"wan\",reason=\"bad_certificate\"}",
        )
    };
    assert_eq!(tls_failures(), 0.0);

    // A certificate for the same name from a CA that B does not trust, swapped in by
    // rename as a Secret volume update does; the good files are kept aside.
    let pki = sites.dir.path().join("pki");
    let other = tmp.path().join("other-pki");
    dicom_gateway::pki::init(&other, &["site-a".to_owned()]).unwrap();
    let swap_in = |from_dir: &std::path::Path| {
        for f in ["site-a.key", "site-a.crt"] {
            let tmp_file = pki.join(format!("{f}.new"));
            std::fs::copy(from_dir.join(f), &tmp_file).unwrap();
            std::fs::rename(&tmp_file, pki.join(f)).unwrap();
        }
    };
    let good = tmp.path().join("good-pki");
    std::fs::create_dir(&good).unwrap();
    for f in ["site-a.key", "site-a.crt"] {
        std::fs::copy(pki.join(f), good.join(f)).unwrap();
    }
    swap_in(&other);
    assert!(
        eventually(Duration::from_secs(30), || reloads("ok") >= 1.0).await,
        "A did not reload its client certificate"
    );

    // New objects are acknowledged by A but cannot cross: A's pooled connection (made with
    // the old certificate) is gone, and B refuses the new one.
    let second = study(3, "RELOAD^TWO", 4096);
    assert_eq!(send(sites.a_dicom(), "GW_A", &second).await, 3);
    assert!(
        eventually(Duration::from_secs(30), || tls_failures() >= 1.0).await,
        "A went on sending with the certificate it had before the rotation"
    );
    assert_eq!(
        pacs.count(),
        3,
        "an object crossed with the rejected certificate"
    );

    // The good certificate back: the link resumes without a restart, nothing is lost.
    swap_in(&good);
    assert!(eventually(Duration::from_secs(30), || reloads("ok") >= 2.0).await);
    assert!(
        eventually(Duration::from_secs(60), || pacs.count() == 6).await,
        "only {} of 6 objects arrived after the fix",
        pacs.count()
    );
    assert!(sites.settled(Duration::from_secs(30)).await);
    let mut want = expected(&first);
    want.extend(expected(&second));
    assert_eq!(pacs.received(), want);
    sites.stop().await;
}
