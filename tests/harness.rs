//! Test harness: real nodes on loopback, a real DICOM SCP (DCMTK `storescp`), real TLS and
//! a real RocksDB, in a temporary folder per test.
//!
//! Nothing here stands in for a component: nodes are started from config files exactly as
//! `dicom-gateway serve` does, the receiving PACS is DCMTK's `storescp` in bit-preserving
//! mode, and objects go in by C-STORE.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dicom_gateway::config::Config;
use dicom_gateway::demo::{self, DemoObject};
use dicom_gateway::node::Node;

/// DCMTK's storescp (pynetdicom installs its own `storescp` earlier on PATH).
pub const STORESCP: &str = "/usr/bin/storescp";

/// Everything the nodes of this test process logged at info level and above.
static LOGS: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

struct Capture;

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut l) = LOGS.lock() {
            l.extend_from_slice(buf);
        }
        // Also show it when the test fails (the test harness captures stderr).
        eprint!("{}", String::from_utf8_lossy(buf));
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Capture logs at info level (or `RUST_LOG`), as an operator would run a node.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(|| Capture)
        .try_init();
}

/// What was logged so far in this test process.
pub fn captured_logs() -> String {
    LOGS.lock()
        .map(|l| String::from_utf8_lossy(&l).into_owned())
        .unwrap_or_default()
}

/// A free loopback port (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A running DCMTK storescp, killed on drop.
pub struct Storescp {
    child: Child,
    /// Its port.
    pub port: u16,
    /// Where it writes received files.
    pub out: PathBuf,
}

impl Storescp {
    /// Start `storescp +B +uf +xa` on a free port with AE title `STORESCP`.
    pub fn start(out: &Path) -> Storescp {
        Self::start_with(out, free_port(), &["+xa"])
    }

    /// Start `storescp +B +uf` with `args` (e.g. `+xi` to accept Implicit VR Little Endian
    /// only) on `port`, with AE title `STORESCP`.
    pub fn start_with(out: &Path, port: u16, args: &[&str]) -> Storescp {
        assert!(
            Path::new(STORESCP).exists(),
            "{STORESCP} is missing: install Debian's dcmtk (.ci/run does)"
        );
        std::fs::create_dir_all(out).expect("storescp output dir");
        let child = Command::new(STORESCP)
            .env("TCP_NODELAY", "1")
            .args(["+B", "+uf", "-aet", "STORESCP"])
            .args(args)
            .arg("-od")
            .arg(out)
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start storescp");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "storescp did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Storescp {
            child,
            port,
            out: out.to_owned(),
        }
    }

    /// Data set SHA-256 of every file received, counted.
    pub fn received(&self) -> HashMap<String, usize> {
        received_datasets(&self.out)
    }

    /// Number of files received.
    pub fn count(&self) -> usize {
        std::fs::read_dir(&self.out).map(|d| d.count()).unwrap_or(0)
    }
}

impl Drop for Storescp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Hash the data set of every Part-10 file in `dir` (skipping each file's meta group).
pub fn received_datasets(dir: &Path) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(data) = std::fs::read(e.path()) else {
            continue;
        };
        if let Some(ds) = part10_dataset(&data) {
            *out.entry(demo::sha256_hex(ds)).or_default() += 1;
        }
    }
    out
}

/// The data set of a Part-10 file, parsed independently of the gateway's own parser:
/// the meta group length is (0002,0000) right after "DICM".
pub fn part10_dataset(file: &[u8]) -> Option<&[u8]> {
    if file.get(128..132)? != b"DICM" {
        return None;
    }
    let len = u32::from_le_bytes(file.get(140..144)?.try_into().ok()?) as usize;
    file.get(144 + len..)
}

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

/// Two sites, A (DICOM in → gateway B) and B (link in → DICOM out), in one temp folder.
pub struct TwoSites {
    /// The work folder.
    pub dir: tempfile::TempDir,
    /// Site A, while running.
    pub a: Option<Node>,
    /// Site B, while running.
    pub b: Option<Node>,
    /// Site B's link port (stable across restarts).
    pub link_port: u16,
    /// Start site B with its spool's fault-injection points live (`fail::cfg` drives them;
    /// no other node of the test process is affected).
    pub b_failpoints: bool,
}

/// Options for [`TwoSites::start`].
pub struct SiteOptions {
    /// Where B delivers: the storescp port.
    pub pacs_port: u16,
    /// Extra TOML appended to A's `[[dicom_listener]]` table.
    pub a_listener_extra: String,
    /// Extra TOML for A's `[spool]` section.
    pub a_spool: String,
    /// B's `[destination.retry]` for its PACS, as inline-table content.
    pub b_retry: String,
}

impl SiteOptions {
    /// B's default retry budget in tests: fast retries, the default attempt budget.
    pub const B_RETRY: &'static str = r#"initial = "100ms", max_delay = "1s""#;
}

impl TwoSites {
    /// Make the PKI, KEKs and configs, then start B and A.
    pub async fn start(opts: SiteOptions) -> TwoSites {
        init_logging();
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        dicom_gateway::pki::init(&d.join("pki"), &["site-a".into(), "site-b".into()]).expect("pki");
        keystore::Kek::generate_file(&d.join("kek-a.key")).expect("kek a");
        keystore::Kek::generate_file(&d.join("kek-b.key")).expect("kek b");
        let link_port = free_port();
        std::fs::write(
            d.join("site-b.toml"),
            format!(
                r#"[node]
name = "site-b"
data_dir = "data-b"
[keystore]
kek_file = "kek-b.key"
[tls]
cert = "pki/site-b.crt"
key = "pki/site-b.key"
ca = "pki/ca.crt"
[http]
listen = "127.0.0.1:0"
[spool]
min_free = "64MiB"
[[link_listener]]
name = "wan"
listen = "127.0.0.1:{link_port}"
allowed_peers = ["site-a"]
route_to = ["pacs"]
[[destination]]
name = "pacs"
kind = "dicom"
address = "127.0.0.1:{pacs}"
ae_title = "STORESCP"
calling_ae_title = "GW_B"
retry = {{ {retry} }}
"#,
                pacs = opts.pacs_port,
                retry = opts.b_retry,
            ),
        )
        .expect("write config b");
        std::fs::write(
            d.join("site-a.toml"),
            format!(
                r#"[node]
name = "site-a"
data_dir = "data-a"
[keystore]
kek_file = "kek-a.key"
[tls]
cert = "pki/site-a.crt"
key = "pki/site-a.key"
ca = "pki/ca.crt"
[http]
listen = "127.0.0.1:0"
[spool]
min_free = "64MiB"
{spool}
[[dicom_listener]]
name = "lan"
listen = "127.0.0.1:0"
ae_title = "GW_A"
route_to = ["site-b"]
{extra}
[[destination]]
name = "site-b"
kind = "gateway"
url = "https://127.0.0.1:{link_port}"
peer_name = "site-b"
retry_initial_ms = 100
retry_max_ms = 1000
"#,
                spool = opts.a_spool,
                extra = opts.a_listener_extra
            ),
        )
        .expect("write config a");
        let mut sites = TwoSites {
            dir,
            a: None,
            b: None,
            link_port,
            b_failpoints: false,
        };
        sites.start_b().await;
        sites.a = Some(
            Node::start(Config::load(&sites.dir.path().join("site-a.toml")).expect("config a"))
                .await
                .expect("start a"),
        );
        sites
    }

    /// (Re)start site B.
    pub async fn start_b(&mut self) {
        assert!(self.b.is_none());
        let cfg = Config::load(&self.dir.path().join("site-b.toml")).expect("config b");
        let opts = dicom_gateway::spool::SpoolOptions {
            failpoints: self.b_failpoints,
            ..Node::spool_options(&cfg)
        };
        self.b = Some(Node::start_with(cfg, opts).await.expect("start b"));
    }

    /// Stop site A and start it again from its config and data folder.
    pub async fn restart_a(&mut self) {
        if let Some(a) = self.a.take() {
            a.stop().await;
        }
        let cfg = Config::load(&self.dir.path().join("site-a.toml")).expect("config a");
        self.a = Some(Node::start(cfg).await.expect("restart a"));
    }

    /// Stop site B and wait until its spool is closed.
    pub async fn stop_b(&mut self) {
        if let Some(b) = self.b.take() {
            b.stop().await;
        }
    }

    /// Stop both sites.
    pub async fn stop(&mut self) {
        if let Some(a) = self.a.take() {
            a.stop().await;
        }
        self.stop_b().await;
    }

    /// Site A's DICOM address.
    pub fn a_dicom(&self) -> SocketAddr {
        self.a.as_ref().expect("site a running").dicom_addrs["lan"]
    }

    /// A node's data folder.
    pub fn data_dir(&self, site: &str) -> PathBuf {
        self.dir.path().join(format!("data-{site}"))
    }
}

/// Two sites delivering to a fresh DCMTK storescp, all in temporary folders.
pub struct Fixture {
    /// Scratch folder for the test (storescp output lives below it).
    pub tmp: tempfile::TempDir,
    /// The PACS at site B.
    pub pacs: Storescp,
    /// The two sites.
    pub sites: TwoSites,
}

impl Fixture {
    /// Start storescp and both sites; the strings are extra TOML for site A's DICOM
    /// listener and `[spool]` sections.
    pub async fn start(a_listener_extra: &str, a_spool: &str) -> Fixture {
        let tmp = tempfile::tempdir().expect("temp dir");
        let pacs = Storescp::start(&tmp.path().join("pacs"));
        let sites = TwoSites::start(SiteOptions {
            pacs_port: pacs.port,
            a_listener_extra: a_listener_extra.to_owned(),
            a_spool: a_spool.to_owned(),
            b_retry: SiteOptions::B_RETRY.to_owned(),
        })
        .await;
        Fixture { tmp, pacs, sites }
    }
}

impl TwoSites {
    /// Site A's spool (site A must be running).
    pub fn a_spool(&self) -> dicom_gateway::spool::Spool {
        self.a
            .as_ref()
            .and_then(|n| n.spool())
            .expect("site a running")
            .clone()
    }

    /// Site B's spool (site B must be running).
    pub fn b_spool(&self) -> dicom_gateway::spool::Spool {
        self.b
            .as_ref()
            .and_then(|n| n.spool())
            .expect("site b running")
            .clone()
    }
}

impl TwoSites {
    /// Wait until neither site holds an object (each one confirmed by its next hop; both
    /// sites running). After that nothing more can reach the PACS, and every file the PACS
    /// wrote is whole: storescp answers after closing its file, and B forgets an object only
    /// after that answer. This replaces "wait a moment for late duplicates".
    pub async fn settled(&self, timeout: Duration) -> bool {
        let (a, b) = (self.a_spool(), self.b_spool());
        eventually(timeout, || {
            a.object_count().is_ok_and(|n| n == 0) && b.object_count().is_ok_and(|n| n == 0)
        })
        .await
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

/// Every file below `dir`, recursively.
pub fn all_files(dir: &Path) -> Vec<PathBuf> {
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

/// Files below `dir` that contain `needle`.
pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    all_files(dir)
        .into_iter()
        .filter(|p| {
            std::fs::read(p)
                .map(|data| data.windows(needle.len()).any(|w| w == needle))
                .unwrap_or(false)
        })
        .collect()
}

/// Write `objects` as Part-10 files into `dir` (test data for independent senders); returns
/// the paths in order.
pub fn write_part10(dir: &Path, objects: &[DemoObject]) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).expect("dir");
    objects
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let mut file = dicom_gateway::dataset::part10_header(
                &o.sop_class,
                &o.sop_instance,
                &o.transfer_syntax,
                Some("TEST_SCU"),
            );
            file.extend_from_slice(&o.dataset);
            let p = dir.join(format!("{i:05}.dcm"));
            std::fs::write(&p, file).expect("write test file");
            p
        })
        .collect()
}

/// Send files with pynetdicom (an independent sender: each file on a context of its own
/// SOP class and transfer syntax, its bytes unchanged). Returns how many were stored.
pub fn send_with_pynetdicom(addr: SocketAddr, called: &str, files: &[PathBuf]) -> usize {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("interop/send_pynetdicom.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(addr.ip().to_string())
        .arg(addr.port().to_string())
        .args(["--called-ae", called])
        .args(files)
        .output()
        .expect("run python3 (pynetdicom): .ci/run installs it");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with("pynetdicom: ") && l.contains(" stored"))
        .unwrap_or_else(|| {
            panic!(
                "no summary from pynetdicom:\n{text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    line.trim_start_matches("pynetdicom: ")
        .split('/')
        .next()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("unexpected summary {line:?}"))
}

/// Convert Part-10 files to Implicit VR Little Endian in place, with DCMTK's dcmconv.
pub fn to_implicit(files: &[PathBuf]) {
    for f in files {
        let tmp = f.with_extension("implicit");
        let st = Command::new("/usr/bin/dcmconv")
            .arg("+ti")
            .arg(f)
            .arg(&tmp)
            .status()
            .expect("dcmconv (DCMTK)");
        assert!(st.success(), "dcmconv failed on {}", f.display());
        std::fs::rename(&tmp, f).expect("rename");
    }
}

/// The data set hashes of Part-10 files.
pub fn file_datasets(files: &[PathBuf]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for f in files {
        let data = std::fs::read(f).expect("read");
        let ds = part10_dataset(&data).expect("a Part-10 file");
        *m.entry(demo::sha256_hex(ds)).or_default() += 1;
    }
    m
}

/// Ask a node's admin socket for its status.
pub async fn admin_status(node: &Node) -> dicom_gateway::admin::Status {
    let v =
        dicom_gateway::admin::request(&node.admin_socket, http::Method::GET, "/v1/status", None)
            .await
            .expect("admin status");
    serde_json::from_value(v).expect("status document")
}

/// A size-limited tmpfs mounted on a folder (a small disk, for disk-full tests); unmounted
/// on drop. Needs root, as CI runs.
pub struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mount a tmpfs of `size` (e.g. `"160m"`) on `dir` (created if missing).
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("mount point");
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(
            st.success(),
            "cannot mount a tmpfs on {} (the disk-full test needs root)",
            dir.display()
        );
        Tmpfs {
            dir: dir.to_owned(),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Fill `dir`'s filesystem with a ballast file until `leave` bytes stay free.
pub fn fill_until_free(dir: &Path, leave: u64) -> PathBuf {
    use std::io::Write;
    let path = dir.join("ballast");
    let free = dicom_gateway::node::free_bytes(dir).expect("statvfs");
    let mut f = std::fs::File::create(&path).expect("ballast");
    let chunk = vec![0xA5u8; 1 << 20];
    let mut left = free.saturating_sub(leave);
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n]).expect("write ballast");
        left -= n as u64;
    }
    f.sync_all().expect("sync ballast");
    path
}
