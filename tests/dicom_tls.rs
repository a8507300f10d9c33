//! DICOM TLS (PS3.15 Annex B) at both ends of a node, against DCMTK: `storescu +tls` sends
//! to a `[dicom_listener.tls]`, and a `dicom` destination with `[destination.tls]` delivers
//! to `storescp +tls`, with certificates made by `openssl` (a hospital PKI), not by the
//! gateway's `pki` command.
//!
//! The PACS (`storescp +tls`) speaks nothing but TLS and requires a client certificate, so
//! an object it holds crossed the second hop over authenticated TLS. Every refused case
//! checks where it was refused: the listener's `associations_total{result}` counts a
//! failed handshake (`handshake_failed`) apart from a refused association (`rejected`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use dicom_gateway::config::Config;
use dicom_gateway::node::Node;
use dicom_gateway_testkit::*;

/// DCMTK's storescu (pynetdicom installs its own `storescu` earlier on PATH).
const STORESCU: &str = "/usr/bin/storescu";

/// The PKI of the test hospital, and a CA nobody trusts.
struct Pki {
    ca: OpensslCa,
    /// The gateway's certificate (its client certificate towards the PACS).
    gateway: Issued,
    /// The same certificate and key at the paths the DICOM listener reads, which a test
    /// may rotate without touching the destination's.
    listener: Issued,
    pacs: Issued,
    ct1: Issued,
    mr1: Issued,
    rogue: Issued,
}

fn pki(dir: &Path) -> Pki {
    let ca = OpensslCa::new(&dir.join("hospital"), "hospital");
    let rogue_ca = OpensslCa::new(&dir.join("rogue"), "rogue");
    let both = "serverAuth,clientAuth";
    let gateway = ca.issue("gateway", &["DNS:gateway.hospital.test"], both);
    let listener = Issued {
        cert: dir.join("listener.crt"),
        key: dir.join("listener.key"),
    };
    std::fs::copy(&gateway.cert, &listener.cert).expect("copy certificate");
    std::fs::copy(&gateway.key, &listener.key).expect("copy key");
    Pki {
        gateway,
        listener,
        pacs: ca.issue("pacs", &["DNS:pacs.hospital.test"], "serverAuth"),
        ct1: ca.issue("ct1", &["DNS:ct1.hospital.test"], "clientAuth"),
        mr1: ca.issue("mr1", &["DNS:mr1.hospital.test"], "clientAuth"),
        // The same name as CT1, from another CA.
        rogue: rogue_ca.issue("ct1", &["DNS:ct1.hospital.test"], "clientAuth"),
        ca,
    }
}

fn p(path: &Path) -> &str {
    path.to_str().expect("UTF-8 temp path")
}

/// One node: DICOM TLS listener `modalities` (AE title GATEWAY, CT1 bound to
/// ct1.hospital.test) → `dicom` destination `pacs` over DICOM TLS.
/// `listener_extra`: more lines of `[dicom_listener.tls]` (e.g. `crls = [...]`).
async fn start_node(dir: &Path, pki: &Pki, pacs_port: u16, listener_extra: &str) -> Node {
    keystore::Kek::generate_file(&dir.join("kek.key")).expect("KEK");
    let toml = format!(
        r#"[node]
name = "gateway.hospital.test"
data_dir = "data"
[keystore]
kek_file = "kek.key"
[[dicom_listener]]
name = "modalities"
listen = "127.0.0.1:0"
ae_title = "GATEWAY"
route_to = ["pacs"]
[dicom_listener.tls]
cert = "{l_crt}"
key = "{l_key}"
ca = "{ca}"
client_auth = "required"
bind_ae_titles = {{ CT1 = "ct1.hospital.test", MR1 = "mr1.hospital.test" }}
{listener_extra}
[[destination]]
name = "pacs"
kind = "dicom"
address = "127.0.0.1:{pacs_port}"
ae_title = "STORESCP"
calling_ae_title = "GATEWAY"
retry = {{ initial = "100ms", max_delay = "1s" }}
[destination.tls]
ca = "{ca}"
server_name = "pacs.hospital.test"
cert = "{gw_crt}"
key = "{gw_key}"
"#,
        l_crt = p(&pki.listener.cert),
        l_key = p(&pki.listener.key),
        gw_crt = p(&pki.gateway.cert),
        gw_key = p(&pki.gateway.key),
        ca = p(&pki.ca.cert),
    );
    let file = dir.join("gateway.toml");
    std::fs::write(&file, toml).expect("config");
    let cfg = Config::load(&file).expect("config loads");
    Node::start(cfg).await.expect("node starts")
}

/// DCMTK's `storescp +tls` as the PACS: TLS only, client certificates required.
fn tls_pacs(dir: &Path, pki: &Pki) -> Storescp {
    Storescp::start_args(
        &dir.join("pacs"),
        &[
            "+xa",
            "+tls",
            p(&pki.pacs.key),
            p(&pki.pacs.cert),
            "+cf",
            p(&pki.ca.cert),
        ],
    )
}

/// The node of a test, and what the tests read of its DICOM listener `modalities`.
struct Gateway {
    node: Node,
    addr: std::net::SocketAddr,
}

impl Gateway {
    async fn start(dir: &Path, pki: &Pki, pacs_port: u16, listener_extra: &str) -> Gateway {
        let node = start_node(dir, pki, pacs_port, listener_extra).await;
        let addr = node.dicom_addrs["modalities"];
        Gateway { node, addr }
    }

    /// `associations_total{listener="modalities",result}`.
    fn count(&self, result: &str) -> u64 {
        let m = &self.node.metrics;
        m.associations
            .with_label_values(&["modalities", result])
            .get()
    }

    /// `tls_handshake_failures_total{listener="modalities",reason}`.
    fn reason(&self, reason: &str) -> u64 {
        let m = &self.node.metrics;
        m.tls_handshake_failures
            .with_label_values(&["modalities", reason])
            .get()
    }

    /// Send `file` with `storescu` as `calling` with `tls` options, which must fail (`what`
    /// says why), then wait until `associations_total{result}` reaches its count, and
    /// `tls_handshake_failures_total{reason}` too when given. Returns what storescu printed.
    async fn refuses(
        &self,
        what: &str,
        calling: &str,
        tls: Vec<String>,
        file: &Path,
        (result, n): (&str, u64),
        reason: Option<(&str, u64)>,
    ) -> String {
        let o = storescu(self.addr, calling, tls, file.to_owned()).await;
        let out = text(&o);
        assert!(!o.status.success(), "{what} must fail: {out}");
        assert!(
            settled(|| self.count(result) == n).await,
            "{what}: associations_total{{result={result:?}}} is {}, not {n}: {out}",
            self.count(result)
        );
        if let Some((reason, n)) = reason {
            assert!(
                settled(|| self.reason(reason) == n).await,
                "{what}: tls_handshake_failures_total{{reason={reason:?}}} is {}, not {n}: {out}",
                self.reason(reason)
            );
        }
        out
    }

    /// Objects the listener stored.
    fn stored(&self) -> u64 {
        let m = &self.node.metrics;
        m.received_objects.with_label_values(&["modalities"]).get()
    }
}

/// A certificate's notAfter in Unix seconds, as `openssl x509` and `date` read it.
fn openssl_not_after(cert: &Path) -> i64 {
    let o = Command::new("openssl")
        .args(["x509", "-noout", "-enddate", "-in", p(cert)])
        .output()
        .expect("openssl x509");
    let text = String::from_utf8_lossy(&o.stdout);
    let date = text.trim().trim_start_matches("notAfter=");
    let o = Command::new("date")
        .args(["-u", "-d", date, "+%s"])
        .output()
        .expect("date");
    String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("notAfter {date:?}: {e}"))
}

/// `storescu` (DCMTK) calling GATEWAY as `calling` with `tls` options, in a blocking task.
async fn storescu(
    addr: std::net::SocketAddr,
    calling: &str,
    tls: Vec<String>,
    file: PathBuf,
) -> Output {
    let calling = calling.to_owned();
    tokio::task::spawn_blocking(move || {
        Command::new(STORESCU)
            .args([
                "-aet", &calling, "-aec", "GATEWAY", "-to", "10", "-ta", "10",
            ])
            .args(&tls)
            .arg(addr.ip().to_string())
            .arg(addr.port().to_string())
            .arg(&file)
            .output()
            .expect("run DCMTK storescu")
    })
    .await
    .expect("storescu task")
}

/// `openssl s_client` to the listener with CT1's certificate and `args`: whether the
/// handshake completed, and what it printed.
async fn s_client(addr: std::net::SocketAddr, pki: &Pki, args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-connect", &addr.to_string()])
        .args(["-cert", p(&pki.ct1.cert), "-key", p(&pki.ct1.key)])
        .args(["-CAfile", p(&pki.ca.cert), "-verify_return_error"])
        .args(args)
        .stdin(std::process::Stdio::null());
    let o = tokio::task::spawn_blocking(move || cmd.output().expect("run openssl s_client"))
        .await
        .expect("s_client task");
    let out = text(&o);
    // A completed handshake names its cipher; a failed one says `(NONE)` or nothing.
    let ok = o.status.success() && out.contains("Cipher is ") && !out.contains("Cipher is (NONE)");
    (ok, out)
}

/// Whether `f` holds within 10 s. A counter is read this way after a peer was refused: the
/// peer may see the refusal (and exit) before the listener has counted it.
async fn settled(f: impl FnMut() -> bool) -> bool {
    eventually(Duration::from_secs(10), f).await
}

fn with_cert(id: &Issued, ca: &Path) -> Vec<String> {
    vec![
        "+tls".into(),
        p(&id.key).into(),
        p(&id.cert).into(),
        "+cf".into(),
        p(ca).into(),
    ]
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A modality with its own certificate reaches the PACS over DICOM TLS on both hops; a
/// plaintext sender, a certificate from another CA, a missing certificate, and an AE title
/// presented with another modality's certificate are all refused where they should be,
/// and nothing they sent is stored or delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dcmtk_over_dicom_tls_on_both_hops_and_each_wrong_peer_refused_where_it_should_be() {
    init_logging();
    let tmp = tempfile::tempdir().expect("temp dir");
    let pki = pki(tmp.path());
    let pacs = tls_pacs(tmp.path(), &pki);
    let gw = Gateway::start(tmp.path(), &pki, pacs.port, "").await;
    let addr = gw.addr;
    let file = pydicom_file("CT_small.dcm");
    let ca = pki.ca.cert.clone();

    // The expiry of each DICOM TLS certificate is exported, as openssl reads it.
    gw.node.metrics.render();
    for (label, cert) in [
        ("dicom_listener/modalities", &pki.listener.cert),
        ("dicom_listener/modalities/ca", &pki.ca.cert),
        ("destination/pacs", &pki.gateway.cert),
        ("destination/pacs/ca", &pki.ca.cert),
    ] {
        let exported = gw
            .node
            .metrics
            .certificate_expiry
            .with_label_values(&[label])
            .get();
        assert_eq!(exported, openssl_not_after(cert) as f64, "{label}");
    }

    // Plaintext on the TLS port: the handshake fails.
    gw.refuses(
        "plaintext",
        "CT1",
        vec![],
        &file,
        ("handshake_failed", 1),
        Some(("protocol_error", 1)),
    )
    .await;
    // A certificate for the right name from a CA the listener does not trust.
    let foreign = with_cert(&pki.rogue, &ca);
    gw.refuses(
        "a foreign CA",
        "CT1",
        foreign,
        &file,
        ("handshake_failed", 2),
        Some(("unknown_ca", 1)),
    )
    .await;
    // No client certificate at all, while one is required.
    let anonymous = vec!["+tla".into(), "+cf".into(), p(&ca).into()];
    gw.refuses(
        "no certificate",
        "CT1",
        anonymous,
        &file,
        ("handshake_failed", 3),
        Some(("no_certificate", 1)),
    )
    .await;
    // A valid certificate, but MR1's, calling as CT1: the handshake passes and the
    // association is rejected (calling AE title not recognized).
    let out = gw
        .refuses(
            "CT1 with MR1's certificate",
            "CT1",
            with_cert(&pki.mr1, &ca),
            &file,
            ("rejected", 1),
            None,
        )
        .await;
    assert_eq!(
        gw.count("handshake_failed"),
        3,
        "the handshake itself passed: {out}"
    );
    assert!(
        out.to_lowercase()
            .contains("calling ae title not recognized"),
        "{out}"
    );
    // An AE title bound to no certificate at all.
    gw.refuses(
        "an unbound AE title",
        "US1",
        with_cert(&pki.ct1, &ca),
        &file,
        ("rejected", 2),
        None,
    )
    .await;
    assert_eq!(gw.count("accepted"), 0);

    // CT1 with its own certificate: stored, and delivered to the TLS-only PACS.
    let o = storescu(addr, "CT1", with_cert(&pki.ct1, &ca), file.clone()).await;
    assert!(o.status.success(), "CT1 must be accepted: {}", text(&o));
    assert!(
        settled(|| gw.count("accepted") == 1).await,
        "count accepted != 1"
    );
    assert!(
        eventually(Duration::from_secs(30), || pacs.count() >= 1).await,
        "the object never reached storescp +tls"
    );
    // One object was stored in all, and what the PACS holds is the data set sent.
    assert_eq!(gw.stored(), 1, "only CT1's association may store anything");
    // storescu re-encodes the data set it reads, so the reference is what storescu sends
    // to a plaintext storescp directly, with no gateway between them.
    let direct = Storescp::start(&tmp.path().join("direct"));
    let o = tokio::task::spawn_blocking({
        let file = file.clone();
        let port = direct.port.to_string();
        move || {
            Command::new(STORESCU)
                .args(["-aet", "CT1", "-aec", "STORESCP", "127.0.0.1", &port])
                .arg(&file)
                .output()
                .expect("run DCMTK storescu")
        }
    })
    .await
    .expect("storescu task");
    assert!(o.status.success(), "direct send: {}", text(&o));
    assert_eq!(direct.count(), 1, "{}", text(&o));
    assert_eq!(
        pacs.received(),
        direct.received(),
        "the gateway must deliver the data set exactly as the modality sent it"
    );

    // TLS 1.2 is spoken with the ECDHE AES-GCM suites of BCP 195 only, checked with
    // OpenSSL's own client. (rustls has no CBC suite and no TLS below 1.2 at all; the
    // one TLS 1.2 family it has that BCP 195 does not name is CHACHA20-POLY1305.)
    let (ok, out) = s_client(
        addr,
        &pki,
        &["-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256"],
    )
    .await;
    assert!(
        ok && out.contains("TLSv1.2") && out.contains("ECDHE-RSA-AES128-GCM-SHA256"),
        "TLS 1.2 with ECDHE-RSA-AES128-GCM-SHA256 must be served: {out}"
    );
    let (ok, out) = s_client(
        addr,
        &pki,
        &["-tls1_2", "-cipher", "ECDHE-RSA-CHACHA20-POLY1305"],
    )
    .await;
    assert!(!ok, "TLS 1.2 with CHACHA20-POLY1305 must be refused: {out}");
    gw.node.stop().await;
}

/// Client certificates from the hospital's own CA that must still not pass: expired, not
/// yet valid, revoked (the listener has the CA's CRL), without the clientAuth usage, and a
/// wildcard for a bound AE title. Each is refused for its own reason, nothing is stored,
/// and the control (CT1's valid certificate, with the same CRL in force) is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_client_certificates_are_refused_on_the_dicom_port_each_for_its_reason() {
    init_logging();
    let tmp = tempfile::tempdir().expect("temp dir");
    let pki = pki(tmp.path());
    let day = 86_400;
    let ct1 = ["DNS:ct1.hospital.test"];
    let expired = pki.ca.issue_with(
        "ct1-expired",
        &ct1,
        "clientAuth",
        &Validity::relative(-3 * day, -day),
    );
    let future = pki.ca.issue_with(
        "ct1-future",
        &ct1,
        "clientAuth",
        &Validity::relative(day, 2 * day),
    );
    let server_only = pki.ca.issue("ct1-server-only", &ct1, "serverAuth");
    let revoked = pki.ca.issue("ct1-revoked", &ct1, "clientAuth");
    let wildcard = pki
        .ca
        .issue("wildcard", &["DNS:*.hospital.test"], "clientAuth");
    pki.ca.revoke(&revoked);
    let crl = pki.ca.crl();
    let pacs = tls_pacs(tmp.path(), &pki);
    let gw = Gateway::start(
        tmp.path(),
        &pki,
        pacs.port,
        &format!("crls = [\"{}\"]", p(&crl)),
    )
    .await;
    let addr = gw.addr;
    let file = pydicom_file("CT_small.dcm");
    let ca = pki.ca.cert.clone();
    let cases = [
        (&expired, "certificate_expired", 1),
        (&future, "certificate_expired", 2),
        (&revoked, "certificate_revoked", 1),
        (&server_only, "bad_certificate", 1),
    ];
    for (i, (cert, why, n)) in cases.into_iter().enumerate() {
        let failed = ("handshake_failed", i as u64 + 1);
        gw.refuses(
            why,
            "CT1",
            with_cert(cert, &ca),
            &file,
            failed,
            Some((why, n)),
        )
        .await;
    }
    // A wildcard certificate chains to the CA, so its handshake passes, but it names no
    // AE title: the association is rejected.
    gw.refuses(
        "a wildcard",
        "CT1",
        with_cert(&wildcard, &ca),
        &file,
        ("rejected", 1),
        None,
    )
    .await;
    assert_eq!(gw.count("handshake_failed"), 4);
    assert_eq!(gw.count("accepted"), 0);
    // The control: CT1's valid certificate, its status known from the same CRL.
    let o = storescu(addr, "CT1", with_cert(&pki.ct1, &ca), file.clone()).await;
    assert!(o.status.success(), "CT1 must be accepted: {}", text(&o));
    assert!(
        eventually(Duration::from_secs(30), || pacs.count() >= 1).await,
        "the object never reached storescp +tls"
    );
    assert_eq!(gw.stored(), 1, "only the control may store anything");
    gw.node.stop().await;
}

/// Replace `to` with the content of `from` the way a Kubernetes Secret update does: a new
/// file renamed over the old, so a reader never sees half of it.
fn swap_in(from: &Path, to: &Path) {
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp).expect("copy");
    std::fs::rename(&tmp, to).expect("rename");
}

/// cert-manager rotates the listener's certificate (here to one from another CA, so a
/// client can tell which one it was served): a broken file first keeps the old
/// certificate (counted as a failed reload), then the new pair is used by new
/// associations, with no restart; the delivery side is untouched throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_listener_certificate_serves_new_associations_without_a_restart() {
    init_logging();
    let tmp = tempfile::tempdir().expect("temp dir");
    let pki = pki(tmp.path());
    let next_ca = OpensslCa::new(&tmp.path().join("next"), "next");
    let next = next_ca.issue(
        "gateway",
        &["DNS:gateway.hospital.test"],
        "serverAuth,clientAuth",
    );
    let pacs = tls_pacs(tmp.path(), &pki);
    // TLS 1.3 only on this listener: DCMTK's default profile speaks it too.
    let gw = Gateway::start(tmp.path(), &pki, pacs.port, "min_version = \"1.3\"").await;
    let addr = gw.addr;
    let reloads = |result: &str| {
        gw.node
            .metrics
            .tls_reloads
            .with_label_values(&["modalities", result])
            .get()
    };
    let file = pydicom_file("CT_small.dcm");
    // CT1's certificate, trusting only the old CA or only the new one for the server.
    let trusting = |ca: &Path| with_cert(&pki.ct1, ca);
    let o = storescu(addr, "CT1", trusting(&pki.ca.cert), file.clone()).await;
    assert!(o.status.success(), "before the rotation: {}", text(&o));

    // A half-written certificate: the reload fails and the old certificate stays.
    std::fs::write(
        tmp.path().join("broken.crt"),
        b"-----BEGIN CERTIFICATE-----\nMIIB",
    )
    .expect("broken file");
    swap_in(&tmp.path().join("broken.crt"), &pki.listener.cert);
    assert!(
        eventually(Duration::from_secs(20), || reloads("failed") >= 1).await,
        "a broken certificate file must be counted as a failed reload"
    );
    let o = storescu(addr, "CT1", trusting(&pki.ca.cert), file.clone()).await;
    assert!(
        o.status.success(),
        "the old certificate must stay: {}",
        text(&o)
    );

    // The new pair (key first, then the certificate: each alone does not build).
    swap_in(&next.key, &pki.listener.key);
    swap_in(&next.cert, &pki.listener.cert);
    assert!(
        eventually(Duration::from_secs(20), || reloads("ok") >= 1).await,
        "the new certificate was never loaded"
    );
    let o = storescu(addr, "CT1", trusting(&next_ca.cert), file.clone()).await;
    assert!(
        o.status.success(),
        "the new certificate must serve: {}",
        text(&o)
    );
    let o = storescu(addr, "CT1", trusting(&pki.ca.cert), file.clone()).await;
    assert!(
        !o.status.success(),
        "a client trusting only the old CA must now fail: {}",
        text(&o)
    );
    // Three objects crossed, and the PACS (whose side never changed) has them all.
    assert!(
        eventually(Duration::from_secs(30), || pacs.count() >= 1).await,
        "nothing reached the PACS"
    );
    assert_eq!(gw.stored(), 3);
    gw.node.stop().await;
}

/// The destination's client certificate is rotated while an object waits for it: the PACS
/// refuses the first certificate (from a CA it does not trust), so delivery fails and the
/// object stays queued; a broken file is counted as a failed reload and changes nothing;
/// once the new pair (from the hospital CA) is in place, the next attempt presents it and
/// the PACS stores the object, with no restart of the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_destination_certificate_is_presented_to_the_pacs_without_a_restart() {
    init_logging();
    let tmp = tempfile::tempdir().expect("temp dir");
    let pki = pki(tmp.path());
    // The destination starts with a certificate of the right name from a CA the PACS does
    // not trust; the hospital's pair is kept aside for the rotation.
    let other_ca = OpensslCa::new(&tmp.path().join("other"), "other");
    let untrusted = other_ca.issue(
        "gateway",
        &["DNS:gateway.hospital.test"],
        "serverAuth,clientAuth",
    );
    let hospital = Issued {
        cert: tmp.path().join("hospital-gateway.crt"),
        key: tmp.path().join("hospital-gateway.key"),
    };
    swap_in(&pki.gateway.cert, &hospital.cert);
    swap_in(&pki.gateway.key, &hospital.key);
    swap_in(&untrusted.key, &pki.gateway.key);
    swap_in(&untrusted.cert, &pki.gateway.cert);

    let pacs = tls_pacs(tmp.path(), &pki);
    let gw = Gateway::start(tmp.path(), &pki, pacs.port, "").await;
    let m = gw.node.metrics.clone();
    let reloads = |result: &str| m.tls_reloads.with_label_values(&["pacs", result]).get();
    let failures = || {
        metric_sum(
            &m.render(),
            r#"dicom_gateway_forward_failures_total{destination="pacs""#,
        )
    };
    let file = pydicom_file("CT_small.dcm");
    let o = storescu(gw.addr, "CT1", with_cert(&pki.ct1, &pki.ca.cert), file).await;
    assert!(o.status.success(), "{}", text(&o));
    // Premise: delivery fails at the PACS for the certificate, attempt after attempt.
    assert!(
        eventually(Duration::from_secs(30), || failures() >= 2.0).await,
        "delivery with the untrusted certificate must fail"
    );
    assert_eq!(
        pacs.count(),
        0,
        "the PACS took an untrusted client certificate"
    );

    // A half-written certificate: counted, and delivery goes on failing the same way.
    std::fs::write(
        tmp.path().join("broken.crt"),
        b"-----BEGIN CERTIFICATE-----\nMIIB",
    )
    .expect("broken file");
    swap_in(&tmp.path().join("broken.crt"), &pki.gateway.cert);
    assert!(
        eventually(Duration::from_secs(20), || reloads("failed") >= 1).await,
        "a broken certificate file must be counted as a failed reload"
    );
    assert_eq!(reloads("ok"), 0);
    assert_eq!(pacs.count(), 0);

    // The hospital's pair, key first: the reloader builds it, and the queued object goes.
    swap_in(&hospital.key, &pki.gateway.key);
    swap_in(&hospital.cert, &pki.gateway.cert);
    assert!(
        eventually(Duration::from_secs(20), || reloads("ok") >= 1).await,
        "the new destination certificate was never loaded"
    );
    assert!(
        eventually(Duration::from_secs(30), || pacs.count() >= 1).await,
        "the PACS never received the object after the rotation"
    );
    assert_eq!(pacs.count(), 1);
    gw.node.stop().await;
}
