//! HL7 v2 fixtures: two sites carrying HL7 ([`Hl7Sites`]: an `[[hl7_listener]]` at site A,
//! relayed over the link to site B, delivered by an `hl7` destination), the receiving
//! system ([`Ris`], python-hl7 as an MLLP server), python-hl7 as the sender
//! ([`send_with_python_hl7`]) and a raw MLLP exchange for malformed input
//! ([`mllp_exchange`]).
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
/// destination `site-b`; B's link listener routes to the `hl7` destination `ris`.
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
}

impl Hl7Options {
    /// Defaults, towards a receiving system on `ris_port`.
    pub fn new(ris_port: u16) -> Hl7Options {
        Hl7Options {
            ris_port,
            a_listener_extra: String::new(),
            b_retry: r#"initial = "100ms", max_delay = "500ms", max_attempts = 20"#.to_owned(),
            a_failpoints: false,
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
        };
        let b = |link: SocketAddr| {
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
"#,
                common("b", "127.0.0.1:0"),
                opts.ris_port,
                opts.b_retry
            )
        };
        std::fs::write(sites.path("b"), b(sites.link)).expect("write b");
        sites.start_b().await;
        sites.link = sites.b.as_ref().expect("b").link_addrs["wan"];
        std::fs::write(sites.path("b"), b(sites.link)).expect("write b");
        let a = format!(
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
"#,
            common("a", "127.0.0.1:0"),
            opts.a_listener_extra,
            sites.link
        );
        std::fs::write(sites.path("a"), a).expect("write a");
        sites.start_a().await;
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
