//! Objects and what happens to them: generated studies, sending them by C-STORE, the
//! expected multiset of data set hashes, waiting for a condition, reading metrics and a
//! node's status, and a scratch spool to send from (as a peer gateway would) or to measure.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use dicom_gateway::demo::{self, DemoObject};
use dicom_gateway::node::Node;
use dicom_gateway::spool::{Spool, SpoolOptions};

/// Expected multiset of data set hashes.
pub fn expected(objects: &[DemoObject]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for o in objects {
        *m.entry(demo::sha256_hex(&o.dataset)).or_default() += 1;
    }
    m
}

/// Poll `f` until it is true or `timeout` passes; returns the last value.
pub async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of one series in a Prometheus text exposition (`name{labels}` exactly as
/// rendered), 0 when absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .filter_map(|l| l.strip_prefix(series))
        .filter_map(|rest| rest.strip_prefix(' '))
        .filter_map(|v| v.trim().parse().ok())
        .next()
        .unwrap_or(0.0)
}

/// The sum of every series of a Prometheus text exposition whose line starts with `prefix`
/// (e.g. `name{destination="x"` for every other label value), 0 when none.
pub fn metric_sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Generate `n` objects of one study with a distinctive patient name.
pub fn study(n: u32, patient: &str, pixel_bytes: usize) -> Vec<DemoObject> {
    let study = demo::new_uid();
    let series = demo::new_uid();
    (0..n)
        .map(|i| {
            demo::generate_object(&study, &series, i + 1, patient, pixel_bytes).expect("generate")
        })
        .collect()
}

/// C-STORE `objects` into `addr`, calling AE `called`; panics on failure.
pub async fn send(addr: SocketAddr, called: &str, objects: &[DemoObject]) -> usize {
    demo::send_objects(
        &addr.to_string(),
        "TEST_SCU",
        called,
        objects.to_vec(),
        |_| {},
    )
    .await
    .expect("C-STORE")
}

/// Ask a node's admin socket for its status.
pub async fn admin_status(node: &Node) -> dicom_gateway::admin::Status {
    let v =
        dicom_gateway::admin::request(&node.admin_socket, http::Method::GET, "/v1/status", None)
            .await
            .expect("admin status");
    serde_json::from_value(v).expect("status document")
}

/// A spool of its own in `dir` (no node around it), with default options under the test
/// KEK of 32 bytes `kek`: to send from, as a peer gateway would, or to measure.
pub fn scratch_spool(dir: &Path, kek: u8) -> Spool {
    Spool::open_blocking(
        dir,
        keystore::Kek::from_bytes([kek; 32]),
        SpoolOptions::default(),
    )
    .unwrap_or_else(|e| panic!("cannot open a spool in {}: {e:#}", dir.display()))
}

/// A plain HTTP/1.1 `GET` of `path` from a node's admin endpoint (`/readyz`, say), as a
/// Kubernetes probe makes it: `Ok((status, body))`, or the connection error (e.g. refused)
/// when nothing answers.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}
