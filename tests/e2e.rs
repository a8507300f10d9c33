//! End to end: a DICOM SCU → site A → mutual TLS → site B → DCMTK storescp.

use std::time::Duration;

use dicom_gateway_e2e::*;

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
    // Nothing extra arrives a moment later either.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        pacs.received(),
        want,
        "delivered data sets differ from those sent"
    );

    // Delivered objects leave both spools.
    let a = sites.a_spool();
    let b = sites.b_spool();
    assert!(eventually(Duration::from_secs(10), || a.object_count().unwrap() == 0).await);
    assert!(eventually(Duration::from_secs(10), || b.object_count().unwrap() == 0).await);
    drop((a, b));

    // Metrics saw it, with no UID or name in any label value of either node.
    let metrics = sites.a.as_ref().unwrap().metrics.render();
    assert!(
        metrics.contains("dicom_gateway_forwarded_objects_total{destination=\"site-b\"} 25"),
        "{metrics}"
    );
    assert!(
        metrics.contains("dicom_gateway_received_objects_total{listener=\"lan\"} 25"),
        "{metrics}"
    );
    let metrics_b = sites.b.as_ref().unwrap().metrics.render();
    assert!(
        metrics_b.contains("dicom_gateway_received_objects_total{listener=\"wan\"} 25"),
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

/// Site B stops in the middle of a transfer and comes back: everything arrives, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_of_site_b_mid_transfer_delivers_everything_exactly_once() {
    let Fixture {
        tmp: _tmp,
        pacs,
        mut sites,
    } = Fixture::start("", "").await;
    let first = study(30, "RESTART^ONE", 128 * 1024);
    let second = study(30, "RESTART^TWO", 128 * 1024);

    assert_eq!(send(sites.a_dicom(), "GW_A", &first).await, first.len());
    // Stop B once deliveries have started, while A is still relaying the first batch.
    assert!(eventually(Duration::from_secs(30), || pacs.count() >= 2).await);
    sites.stop_b().await;
    let delivered_at_stop = pacs.count();
    assert!(delivered_at_stop < first.len() + second.len());

    // A keeps accepting while B is away and holds everything not confirmed.
    assert_eq!(send(sites.a_dicom(), "GW_A", &second).await, second.len());
    let a = sites.a_spool();
    assert!(
        a.queue_len("site-b").unwrap() >= second.len(),
        "site A must hold what B has not confirmed"
    );
    drop(a);

    sites.start_b().await;
    let total = first.len() + second.len();
    let arrived = eventually(Duration::from_secs(120), || pacs.count() >= total).await;
    assert!(
        arrived,
        "only {} of {total} arrived after restart",
        pacs.count()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut all = first.clone();
    all.extend(second);
    assert_eq!(
        pacs.received(),
        expected(&all),
        "lost or duplicated objects"
    );
    assert_eq!(pacs.count(), total, "duplicates delivered");
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
    assert_eq!(sites.a_spool().queue_len("site-b").unwrap(), objects.len());
    // Restart A from its config and data folder, then bring B back.
    sites.restart_a().await;
    sites.start_b().await;
    assert!(eventually(Duration::from_secs(60), || pacs.count() >= objects.len()).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
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
