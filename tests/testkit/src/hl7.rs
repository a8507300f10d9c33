//! HL7 v2 fixtures: two sites carrying HL7 ([`Hl7Sites`]: an `[[hl7_listener]]` at site A,
//! relayed over the link to site B, delivered by an `hl7` destination), the receiving
//! system ([`Ris`], python-hl7 as an MLLP server), python-hl7 as the sender
//! ([`send_with_python_hl7`]), a raw MLLP exchange for malformed input
//! ([`mllp_exchange`]), and site B in a child process that a test can SIGKILL at a fault
//! point ([`Hl7Sites::spawn_b_process`], [`run_site_b_process`]).
//!
//! The python-hl7 peer is `tests/interop/hl7_peer.py` (nobody here wrote python-hl7's MLLP
//! framing or its ACK builder). Ports are read from what each process bound, never guessed;
//! the one port named again is B's link port on B's restarts (as in [`crate::sites`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dicom_gateway::config::Config;
use dicom_gateway::node::Node;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../interop/hl7_peer.py")
}

/// An ORM^O01 order for `patient` with control id `control` (segments end in CR). The
/// patient's name is `name`; `note` goes into an NTE segment (to make messages differ).
pub fn orm(control: &str, patient: &str, name: &str, note: &str) -> String {
    format!(
        "MSH|^~\\&|RIS|HOSP_A|GW|TELE|20261203120000||ORM^O01^ORM_O01|{control}|P|2.5\r\
         PID|1||{patient}^^^HOSP_A^MR||{name}^JANE||19700101|F\r\
         ORC|NW|{control}-ORD\r\
         OBR|1|{control}-ORD||CT^CT HEAD\r\
         NTE|1||{note}\r"
    )
}

/// An ORU^R01 report for `patient` with control id `control`, from the reading site's RIS:
/// `text` is the report (an OBX segment).
pub fn oru(control: &str, patient: &str, name: &str, text: &str) -> String {
    format!(
        "MSH|^~\\&|READING_RIS|TELE|RIS|HOSP_A|20261203130000||ORU^R01^ORU_R01|{control}|P|2.5\r\
         PID|1||{patient}^^^HOSP_A^MR||{name}^JANE||19700101|F\r\
         OBR|1|{control}-ORD||CT^CT HEAD|||20261203120000||||||||||||||||F\r\
         OBX|1|TX|IMP^Impression||{text}||||||F\r"
    )
}

/// One received message, as the receiving system logged it before answering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// MSH-10.
    pub control_id: String,
    /// What it answered (`AA`, `AE`, `AR`; `None` for no answer).
    pub ack: Option<String>,
    /// The message as it arrived.
    pub raw: String,
}

/// python-hl7 as the receiving system (`hl7_peer.py serve`): its answers depend on the
/// control id (see the script). Killed on drop.
pub struct Ris {
    child: Child,
    /// Its port.
    pub port: u16,
    log: PathBuf,
}

impl Ris {
    /// Start it on a port of its own choosing, in `dir`.
    pub fn start(dir: &Path) -> Ris {
        Self::spawn(dir, None)
    }

    /// Start it again on `port` (one a config names already); tried a few times.
    pub fn start_on(dir: &Path, port: u16) -> Ris {
        Self::spawn(dir, Some(port))
    }

    fn spawn(dir: &Path, port: Option<u16>) -> Ris {
        std::fs::create_dir_all(dir).expect("ris dir");
        let port_file = dir.join("ris.port");
        let log = dir.join("ris.jsonl");
        let mut errors = Vec::new();
        for _ in 0..10 {
            let _ = std::fs::remove_file(&port_file);
            let mut cmd = Command::new("python3");
            cmd.arg(script())
                .arg("serve")
                .arg("--port-file")
                .arg(&port_file)
                .arg("--log")
                .arg(&log);
            if let Some(p) = port {
                cmd.env("HL7_PEER_PORT", p.to_string());
            }
            let mut child = cmd
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("run python3 (python-hl7): .ci/run installs it");
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Some(status) = child.try_wait().expect("ris status") {
                    errors.push(format!("hl7_peer.py exited ({status})"));
                    break;
                }
                if let Some(p) = std::fs::read_to_string(&port_file)
                    .ok()
                    .and_then(|s| s.trim().parse::<u16>().ok())
                {
                    return Ris {
                        child,
                        port: p,
                        log,
                    };
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    errors.push("hl7_peer.py did not listen within 20 s".to_owned());
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("the python-hl7 receiver did not start: {errors:?}")
    }

    /// Every message received so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| Received {
                control_id: v["control_id"].as_str().unwrap_or_default().to_owned(),
                ack: v["ack"].as_str().map(str::to_owned),
                raw: v["raw"].as_str().unwrap_or_default().to_owned(),
            })
            .collect()
    }

    /// Break the receiving system (`true`: messages whose control id starts with `FIX` are
    /// answered AE) or fix it again (`false`).
    pub fn set_broken(&self, broken: bool) {
        let flag = PathBuf::from(format!("{}.broken", self.log.display()));
        if broken {
            std::fs::write(&flag, b"").expect("write the broken flag");
        } else {
            let _ = std::fs::remove_file(&flag);
        }
    }

    /// The messages it accepted (answered AA), in order.
    pub fn accepted(&self) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.ack.as_deref() == Some("AA"))
            .collect()
    }
}

impl Drop for Ris {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Send `messages` to `addr` with python-hl7's MLLP client, one after the other on one
/// connection; returns each one's ACK code (`None`: no answer).
pub fn send_with_python_hl7(addr: SocketAddr, messages: &[String]) -> Vec<Option<String>> {
    let dir = tempfile::tempdir().expect("temp dir");
    let list = dir.path().join("messages.json");
    std::fs::write(&list, serde_json::to_vec(messages).expect("json")).expect("write list");
    let out = Command::new("python3")
        .arg(script())
        .arg("send")
        .arg(addr.ip().to_string())
        .arg(addr.port().to_string())
        .arg(&list)
        .output()
        .expect("run python3 (python-hl7): .ci/run installs it");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let acks: Vec<Option<String>> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| v["ack"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(
        acks.len(),
        messages.len(),
        "python-hl7 sender: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    acks
}

/// Write `bytes` to `addr` as they are and read what comes back until the peer closes or
/// answers one frame (at most 5 s). Returns the answer's content (without MLLP framing) and
/// whether the connection was closed after it.
pub async fn mllp_exchange(addr: SocketAddr, bytes: &[u8]) -> (Option<Vec<u8>>, bool) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    // The peer may close while we write (an oversize message): that is an answer too.
    let _ = s.write_all(bytes).await;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut closed = false;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
        if got.ends_with(&[0x1c, 0x0d]) {
            // One frame; see whether the peer closes after it.
            closed = matches!(
                tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await,
                Ok(Ok(0)) | Ok(Err(_))
            );
            break;
        }
    }
    let frame = got
        .strip_prefix(&[0x0b])
        .and_then(|g| g.strip_suffix(&[0x1c, 0x0d]))
        .map(<[u8]>::to_vec);
    (frame, closed)
}

/// MLLP framing of one message.
pub fn mllp(message: &[u8]) -> Vec<u8> {
    [&[0x0b][..], message, &[0x1c, 0x0d][..]].concat()
}

/// MSA-1 of an ACK.
pub fn ack_code(ack: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(ack);
    text.split(['\r', '\n'])
        .find(|s| s.starts_with("MSA|"))
        .and_then(|s| s.split('|').nth(1))
        .map(str::to_owned)
}

/// Two sites carrying HL7: A's `[[hl7_listener]]` `ris-in` routes to the gateway
/// destination `site-b`; B's link listener routes to the `hl7` destination `ris`. With
/// [`Hl7Options::reports_to`], reports come back the other way too: B's `[[hl7_listener]]`
/// `reports-in` routes to the gateway destination `site-a`, and A's link listener `wan`
/// to the `hl7` destination `ris-a` (the set-up of `deploy/examples/`).
pub struct Hl7Sites {
    /// The work folder.
    pub dir: tempfile::TempDir,
    /// Site A, while running.
    pub a: Option<Node>,
    /// Site B, while running.
    pub b: Option<Node>,
    /// Start site A with its spool's fault-injection points live.
    pub a_failpoints: bool,
    /// B's link address (kept across B's restarts).
    pub link: SocketAddr,
    /// A's link address, when reports come back (kept across A's restarts).
    pub a_link: Option<SocketAddr>,
}

/// Options of [`Hl7Sites::start`].
#[derive(Debug, Clone)]
pub struct Hl7Options {
    /// The receiving system's port.
    pub ris_port: u16,
    /// Extra lines of A's `[[hl7_listener]]`.
    pub a_listener_extra: String,
    /// B's `ris` destination's retry table (inline-table content).
    pub b_retry: String,
    /// Start A with failpoints.
    pub a_failpoints: bool,
    /// Reports come back: the port of site A's receiving system (the ordering RIS).
    pub reports_to: Option<u16>,
}

impl Hl7Options {
    /// Defaults, towards a receiving system on `ris_port`.
    pub fn new(ris_port: u16) -> Hl7Options {
        Hl7Options {
            ris_port,
            a_listener_extra: String::new(),
            b_retry: r#"initial = "100ms", max_delay = "500ms", max_attempts = 20"#.to_owned(),
            a_failpoints: false,
            reports_to: None,
        }
    }
}

fn common(site: &str, http: &str) -> String {
    format!(
        r#"[node]
name = "site-{site}"
data_dir = "data-{site}"
[keystore]
kek_file = "kek-{site}.key"
[tls]
cert = "pki/site-{site}.crt"
key = "pki/site-{site}.key"
ca = "pki/ca.crt"
[http]
listen = "{http}"
[spool]
min_free = "64MiB"
"#
    )
}

impl Hl7Sites {
    /// PKI, KEKs and configs; start B, then A.
    pub async fn start(opts: Hl7Options) -> Hl7Sites {
        crate::logs::init_logging();
        let dir = tempfile::tempdir().expect("temp dir");
        dicom_gateway::twosite::init(dir.path()).expect("PKI and KEKs");
        let mut sites = Hl7Sites {
            dir,
            a: None,
            b: None,
            a_failpoints: opts.a_failpoints,
            link: SocketAddr::from(([127, 0, 0, 1], 0)),
            a_link: None,
        };
        // The way back, once A's link address is known.
        let back = |a_link: Option<SocketAddr>| match opts.reports_to {
            None => String::new(),
            Some(_) => format!(
                r#"[[hl7_listener]]
name = "reports-in"
listen = "127.0.0.1:0"
route_to = ["site-a"]
[[destination]]
name = "site-a"
kind = "gateway"
url = "https://{}"
peer_name = "site-a"
retry = {{ initial = "100ms", max_delay = "1s" }}
"#,
                a_link.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 9)))
            ),
        };
        let b = |link: SocketAddr, a_link: Option<SocketAddr>| {
            format!(
                r#"{}[[link_listener]]
name = "wan"
listen = "{link}"
allowed_peers = ["site-a"]
route_to = ["ris"]
[[destination]]
name = "ris"
kind = "hl7"
address = "127.0.0.1:{}"
send_timeout = "5s"
retry = {{ {} }}
{}"#,
                common("b", "127.0.0.1:0"),
                opts.ris_port,
                opts.b_retry,
                back(a_link)
            )
        };
        std::fs::write(sites.path("b"), b(sites.link, None)).expect("write b");
        sites.start_b().await;
        sites.link = sites.b.as_ref().expect("b").link_addrs["wan"];
        std::fs::write(sites.path("b"), b(sites.link, None)).expect("write b");
        let a_back = |a_link: SocketAddr| match opts.reports_to {
            None => String::new(),
            Some(port) => format!(
                r#"[[link_listener]]
name = "wan"
listen = "{a_link}"
allowed_peers = ["site-b"]
route_to = ["ris-a"]
[[destination]]
name = "ris-a"
kind = "hl7"
address = "127.0.0.1:{port}"
send_timeout = "5s"
retry = {{ {} }}
"#,
                opts.b_retry
            ),
        };
        let b_link = sites.link;
        let a = |a_link: SocketAddr| {
            format!(
                r#"{}[[hl7_listener]]
name = "ris-in"
listen = "127.0.0.1:0"
route_to = ["site-b"]
{}
[[destination]]
name = "site-b"
kind = "gateway"
url = "https://{}"
peer_name = "site-b"
retry = {{ initial = "100ms", max_delay = "1s" }}
{}"#,
                common("a", "127.0.0.1:0"),
                opts.a_listener_extra,
                b_link,
                a_back(a_link)
            )
        };
        std::fs::write(sites.path("a"), a(SocketAddr::from(([127, 0, 0, 1], 0)))).expect("write a");
        sites.start_a().await;
        if opts.reports_to.is_some() {
            // A's link port is known now: name it in both configs (A's restarts keep it),
            // and start B again towards it.
            let a_link = sites.a.as_ref().expect("a").link_addrs["wan"];
            sites.a_link = Some(a_link);
            std::fs::write(sites.path("a"), a(a_link)).expect("write a");
            std::fs::write(sites.path("b"), b(sites.link, Some(a_link))).expect("write b");
            sites.stop_b().await;
            sites.start_b().await;
        }
        sites
    }

    fn path(&self, site: &str) -> PathBuf {
        self.dir.path().join(format!("site-{site}.toml"))
    }

    /// A node's data folder.
    pub fn data_dir(&self, site: &str) -> PathBuf {
        self.dir.path().join(format!("data-{site}"))
    }

    /// (Re)start A from its config.
    pub async fn start_a(&mut self) {
        let cfg = Config::load(&self.path("a")).expect("config a");
        let opts = dicom_gateway::spool::SpoolOptions {
            failpoints: self.a_failpoints,
            ..Node::spool_options(&cfg)
        };
        self.a = Some(Node::start_with(cfg, opts).await.expect("start a"));
    }

    /// (Re)start B from its config; a link port still in use is tried again a few times.
    pub async fn start_b(&mut self) {
        for attempt in 1.. {
            let cfg = Config::load(&self.path("b")).expect("config b");
            match Node::start(cfg).await {
                Ok(n) => {
                    self.b = Some(n);
                    return;
                }
                Err(e) if attempt < 10 => {
                    eprintln!("site B start, try {attempt}: {e:#}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("start b: {e:?}"),
            }
        }
    }

    /// Stop B and wait until its spool is closed.
    pub async fn stop_b(&mut self) {
        if let Some(b) = self.b.take() {
            b.stop().await;
        }
    }

    /// Stop both.
    pub async fn stop(&mut self) {
        if let Some(a) = self.a.take() {
            a.stop().await;
        }
        self.stop_b().await;
    }

    /// B's HL7 listener for reports (with [`Hl7Options::reports_to`]).
    pub fn b_hl7(&self) -> SocketAddr {
        self.b.as_ref().expect("b running").hl7_addrs["reports-in"]
    }

    /// A's HL7 listener.
    pub fn a_hl7(&self) -> SocketAddr {
        self.a.as_ref().expect("a running").hl7_addrs["ris-in"]
    }

    /// A running site's spool.
    pub fn spool(&self, site: &str) -> dicom_gateway::spool::Spool {
        let n = if site == "a" { &self.a } else { &self.b };
        n.as_ref()
            .and_then(|n| n.spool())
            .expect("site running")
            .clone()
    }

    /// A running site's metrics, rendered.
    pub fn metrics(&self, site: &str) -> String {
        let n = if site == "a" { &self.a } else { &self.b };
        n.as_ref().expect("site running").metrics.render()
    }
}

/// The environment of a site B child process (see [`run_site_b_process`]).
const CHILD_CONFIG: &str = "DICOM_GATEWAY_TEST_B_CONFIG";
const CHILD_HOLD: &str = "DICOM_GATEWAY_TEST_B_HOLD";
const CHILD_HOLD_N: &str = "DICOM_GATEWAY_TEST_B_HOLD_N";
const CHILD_REACHED: &str = "DICOM_GATEWAY_TEST_B_REACHED";

/// The body of a test function that [`Hl7Sites::spawn_b_process`] runs in a child process
/// (the test binary again, that test alone): site B from its config, with its spool's
/// fault points live; the `n`-th thread to reach the fault point writes the `reached` file
/// and stops there for good, so that the process can be killed at exactly that point.
/// Returns at once, doing nothing, when not run as such a child.
pub async fn run_site_b_process() {
    let Ok(config) = std::env::var(CHILD_CONFIG) else {
        return;
    };
    let hold = std::env::var(CHILD_HOLD).expect("fault point");
    let n: usize = std::env::var(CHILD_HOLD_N)
        .ok()
        .and_then(|n| n.parse().ok())
        .expect("the n-th arrival");
    let reached = PathBuf::from(std::env::var(CHILD_REACHED).expect("reached file"));
    let _scenario = fail::FailScenario::setup();
    let count = std::sync::Mutex::new(0usize);
    fail::cfg_callback(&hold, move || {
        let mut c = count.lock().unwrap_or_else(|e| e.into_inner());
        *c += 1;
        if *c == n {
            std::fs::write(&reached, b"").expect("write the reached file");
            // Held until the parent kills the process.
            loop {
                std::thread::park();
            }
        }
    })
    .expect("a valid fault point");
    let cfg = Config::load(Path::new(&config)).expect("config b");
    let opts = dicom_gateway::spool::SpoolOptions {
        failpoints: true,
        ..Node::spool_options(&cfg)
    };
    let _node = Node::start_with(cfg, opts).await.expect("start b");
    std::future::pending::<()>().await;
}

/// Site B as a child process ([`Hl7Sites::spawn_b_process`]); SIGKILLed on drop.
pub struct SiteBProcess {
    child: Child,
    reached: PathBuf,
}

impl SiteBProcess {
    /// Wait (at most `deadline`) until the child held at its fault point.
    pub fn wait_reached(&mut self, deadline: Duration) -> bool {
        let until = Instant::now() + deadline;
        while Instant::now() < until {
            if self.reached.exists() {
                return true;
            }
            if self.child.try_wait().ok().flatten().is_some() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// SIGKILL it and reap it.
    pub fn kill_9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for SiteBProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Hl7Sites {
    /// Run site B (stopped here first) in a child process: the test binary again, running
    /// only the test `test`, whose body is [`run_site_b_process`]. Its spool's fault point
    /// `hold` stops the `n`-th thread that reaches it, for good.
    pub async fn spawn_b_process(&mut self, test: &str, hold: &str, n: usize) -> SiteBProcess {
        self.stop_b().await;
        let reached = self.dir.path().join("b-reached");
        let _ = std::fs::remove_file(&reached);
        let child = Command::new(std::env::current_exe().expect("the test binary"))
            .args([
                test,
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(CHILD_CONFIG, self.path("b"))
            .env(CHILD_HOLD, hold)
            .env(CHILD_HOLD_N, n.to_string())
            .env(CHILD_REACHED, &reached)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn site B");
        SiteBProcess { child, reached }
    }
}
