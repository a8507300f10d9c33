//! The `dicom-gateway` binary as an operator runs it: exit codes of configuration errors
//! (found in parsing, in validation and at start-up), the `DICOM_GATEWAY_CONFIG`
//! fallback, and the demo's work folder (removed at the end and on SIGINT, kept with
//! `--keep`). Every test runs the real binary.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_dicom-gateway");
const EX_CONFIG: i32 = 78;

fn run(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut c = Command::new(BIN);
    c.args(args).env_remove("DICOM_GATEWAY_CONFIG");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run dicom-gateway")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A site folder made by the binary itself: PKI for site-a and site-b, a KEK, a config.
struct Site {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

impl Site {
    fn new() -> Site {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().to_owned();
        let d = dir.to_str().expect("utf-8 temp dir");
        let o = run(
            &[
                "pki",
                "init",
                "--dir",
                &format!("{d}/tls"),
                "--site",
                "site-a",
                "--site",
                "site-b",
            ],
            &[],
        );
        assert!(o.status.success(), "pki init: {}", stderr(&o));
        let o = run(&["keys", "new-kek", "--out", &format!("{d}/kek.key")], &[]);
        assert!(o.status.success(), "new-kek: {}", stderr(&o));
        let s = Site { _tmp: tmp, dir };
        s.write(&s.config());
        s
    }

    /// A valid config (which would start a node) with every port on loopback port 0.
    fn config(&self) -> String {
        r#"[node]
name = "site-a"
data_dir = "data"
[keystore]
kek_file = "kek.key"
[tls]
cert = "tls/site-a.crt"
key = "tls/site-a.key"
ca = "tls/ca.crt"
[http]
listen = "127.0.0.1:0"
[[dicom_listener]]
name = "lan"
listen = "127.0.0.1:0"
ae_title = "GW_A"
route_to = ["site-b"]
[[destination]]
name = "site-b"
kind = "gateway"
url = "https://127.0.0.1:9"
peer_name = "site-b"
"#
        .to_owned()
    }

    fn path(&self) -> PathBuf {
        self.dir.join("gateway.toml")
    }

    fn write(&self, text: &str) {
        std::fs::write(self.path(), text).expect("write config");
    }

    fn serve(&self) -> Output {
        run(
            &["serve", "--config", self.path().to_str().expect("utf-8")],
            &[],
        )
    }
}

fn assert_config_error(o: &Output, needle: &str) {
    assert_eq!(o.status.code(), Some(EX_CONFIG), "stderr: {}", stderr(o));
    assert!(
        stderr(o).contains(needle),
        "{needle:?} not in: {}",
        stderr(o)
    );
}

/// `--version` names the crypto backend, the same one the keystore and rustls use: a binary
/// whose version says one backend while its keystore runs another fails here (CI runs this
/// under both builds).
#[test]
fn version_names_the_crypto_backend_of_the_build() {
    let o = run(&["--version"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        out.trim(),
        format!(
            "dicom-gateway {} (crypto: {})",
            env!("CARGO_PKG_VERSION"),
            keystore::BACKEND
        )
    );
    let expected = if cfg!(feature = "ring") {
        "ring"
    } else if cfg!(feature = "fips") {
        "aws-lc-rs (FIPS)"
    } else {
        "aws-lc-rs"
    };
    assert_eq!(
        keystore::BACKEND,
        expected,
        "the keystore runs another backend than the build's features"
    );
}

#[test]
fn parse_errors_exit_78() {
    let s = Site::new();
    s.write(&format!("{}\n[bogus]\nx = 1\n", s.config()));
    assert_config_error(&s.serve(), "bogus");
    s.write("not toml = = =");
    assert_config_error(&s.serve(), "gateway.toml");
    std::fs::remove_file(s.path()).expect("remove");
    assert_config_error(&s.serve(), "cannot read config");
}

#[test]
fn validation_errors_exit_78() {
    let s = Site::new();
    s.write(
        &s.config()
            .replace("route_to = [\"site-b\"]", "route_to = [\"nowhere\"]"),
    );
    assert_config_error(&s.serve(), "dicom_listener[lan].route_to");
    s.write(&s.config().replace("GW_A", "AN_AE_TITLE_FAR_TOO_LONG"));
    assert_config_error(&s.serve(), "ae_title");
}

#[test]
fn missing_or_bad_pem_files_exit_78() {
    let s = Site::new();
    s.write(&s.config().replace("tls/site-a.crt", "tls/absent.crt"));
    assert_config_error(&s.serve(), "absent.crt");
    s.write(&s.config().replace("tls/site-a.key", "tls/absent.key"));
    assert_config_error(&s.serve(), "absent.key");

    // A file that is not a certificate at all.
    std::fs::write(s.dir.join("tls/garbage.crt"), "hello\n").expect("write");
    s.write(&s.config().replace("tls/site-a.crt", "tls/garbage.crt"));
    assert_config_error(&s.serve(), "garbage.crt");
    // A real certificate that does not carry the node name.
    s.write(&s.config().replace("tls/site-a.crt", "tls/site-b.crt"));
    assert_config_error(&s.serve(), "node.name");
}

#[cfg(unix)]
#[test]
fn kek_file_problems_exit_78() {
    use std::os::unix::fs::PermissionsExt as _;
    let s = Site::new();
    let kek = s.dir.join("kek.key");
    std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    assert_config_error(&s.serve(), "chmod 600");
    std::fs::remove_file(&kek).expect("remove");
    assert_config_error(&s.serve(), "kek.key");
    std::fs::write(&kek, [1u8; 5]).expect("write");
    std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    assert_config_error(&s.serve(), "32 bytes");
}

/// A data directory that others can read is a configuration error that names the fix; a
/// new one is created 0700.
#[cfg(unix)]
#[test]
fn an_open_data_directory_exits_78() {
    use std::os::unix::fs::PermissionsExt as _;
    let s = Site::new();
    let data = s.dir.join("data");
    std::fs::create_dir(&data).expect("mkdir");
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    assert_config_error(&s.serve(), "chmod 700");
    // Control: nothing but the mode was wrong. A fresh one is made private and the node
    // gets as far as its (unreachable) peer, which is not a configuration error.
    std::fs::remove_dir(&data).expect("rmdir");
    let node = Node::spawn(&s);
    let mode = std::fs::metadata(&data)
        .expect("created")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700);
    drop(node);
}

/// The serving process cannot dump core: RLIMIT_CORE is 0 (a dump would carry the KEK
/// and study keys in plaintext).
#[test]
fn the_node_cannot_dump_core() {
    let s = Site::new();
    let node = Node::spawn(&s);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", node.0.id()))
        .expect("the process's limits");
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .expect("a core limit line");
    let fields: Vec<&str> = core.split_whitespace().collect();
    assert_eq!(&fields[4..6], &["0", "0"], "{core}");
}

/// A `serve` process, killed on drop; spawned once its data directory exists.
struct Node(std::process::Child);

impl Node {
    fn spawn(s: &Site) -> Node {
        let child = Command::new(BIN)
            .args(["serve", "--config", s.path().to_str().expect("utf-8")])
            .env_remove("DICOM_GATEWAY_CONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn serve");
        let node = Node(child);
        let sock = s.dir.join("data").join("admin.sock");
        for _ in 0..200 {
            if sock.exists() {
                return node;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("the node did not start (no {})", sock.display());
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `check`: 0 for a config that holds up (warnings allowed), 1 when a file it names does
/// not, 78 when the config itself does not parse; every problem named, JSON on request.
#[test]
fn check_exit_codes_and_findings() {
    let s = Site::new();
    let cfg = s.path();
    let cfg = cfg.to_str().expect("utf-8");
    let o = run(&["check", "--config", cfg], &[]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(0), "{out}{}", stderr(&o));
    assert!(out.contains("ok (0 errors"), "{out}");

    // A wrong CA and a missing KEK: both reported, exit 1.
    std::fs::remove_file(s.dir.join("kek.key")).expect("remove");
    s.write(&s.config().replace("tls/ca.crt", "tls/site-b.key"));
    let o = run(&["check", "--config", cfg, "--json"], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON report");
    let subjects: Vec<&str> = report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .filter(|f| f["level"] == "error")
        .filter_map(|f| f["subject"].as_str())
        .collect();
    assert!(subjects.contains(&"keystore.kek_file"), "{report}");
    assert!(subjects.iter().any(|s| s.starts_with("tls")), "{report}");

    s.write("not toml = = =");
    assert_config_error(&run(&["check", "--config", cfg], &[]), "gateway.toml");
}

#[test]
fn the_config_comes_from_the_environment_without_config() {
    let s = Site::new();
    s.write(&format!("{}\n[from_env]\nx = 1\n", s.config()));
    let o = run(&["serve"], &[("DICOM_GATEWAY_CONFIG", &s.path())]);
    assert_config_error(&o, "from_env");
    // --config wins over the environment.
    let other = s.dir.join("absent.toml");
    let o = run(
        &["serve", "--config", other.to_str().expect("utf-8")],
        &[("DICOM_GATEWAY_CONFIG", &s.path())],
    );
    assert_config_error(&o, "absent.toml");
    // Neither: a usage error from the command line parser, not a config error.
    let o = run(&["serve"], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--config"), "{}", stderr(&o));
    // The help names the variable.
    let o = run(&["serve", "--help"], &[]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("DICOM_GATEWAY_CONFIG"));
}

fn demo_args(dir: &Path, objects: u32) -> Vec<String> {
    [
        "demo",
        "--studies",
        "1",
        "--objects",
        &objects.to_string(),
        "--object-kib",
        "16",
        "--dir",
        dir.to_str().expect("utf-8"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn the_demo_removes_its_work_folder() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let work = tmp.path().join("work");
    let o = Command::new(BIN)
        .args(demo_args(&work, 4))
        .output()
        .expect("demo");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}\n{}", stderr(&o));
    // The premise: the demo used the folder (4 objects delivered into it).
    assert!(out.contains("4/4 delivered identical"), "{out}");
    assert!(
        out.contains(&format!("work folder: {}", work.display())),
        "{out}"
    );
    assert!(!work.exists(), "left behind: {}", work.display());
}

/// With `--json`, stdout is one JSON object a script can read (the lines for people go to
/// stderr), and it says what was delivered.
#[test]
fn the_demo_summary_is_json_with_json() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let work = tmp.path().join("work");
    let mut args = demo_args(&work, 3);
    args.push("--json".into());
    let o = Command::new(BIN).args(args).output().expect("demo");
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {:?}", o.stdout));
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(
        (v["objects"].as_u64(), v["delivered_identical"].as_u64()),
        (Some(3), Some(3)),
        "{v}"
    );
    assert_eq!(v["work_folder"], work.to_str().expect("utf-8"), "{v}");
    assert_eq!(v["work_folder_kept"], false, "{v}");
    assert!(
        stderr(&o).contains("3/3 delivered identical"),
        "{}",
        stderr(&o)
    );
    assert!(!work.exists());
}

#[test]
fn the_demo_keeps_its_work_folder_with_keep() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let work = tmp.path().join("work");
    let mut args = demo_args(&work, 2);
    args.push("--keep".into());
    let o = Command::new(BIN).args(args).output().expect("demo");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}\n{}", stderr(&o));
    assert!(
        out.contains(&format!("work folder kept: {}", work.display())),
        "{out}"
    );
    assert_eq!(
        std::fs::read_dir(work.join("received"))
            .expect("kept")
            .count(),
        2
    );
}

/// Start the demo, wait for `line` on its stdout, send SIGINT, and return its output.
#[cfg(unix)]
fn demo_interrupted_after(
    args: Vec<String>,
    line: &str,
) -> (std::process::ExitStatus, String, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn demo");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut seen = String::new();
    loop {
        let mut l = String::new();
        let n = stdout.read_line(&mut l).expect("read stdout");
        assert!(n > 0, "demo ended before {line:?}: {seen}");
        seen.push_str(&l);
        if l.contains(line) {
            break;
        }
    }
    signal(&child, rustix::process::Signal::INT);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).expect("read stdout");
    seen.push_str(&rest);
    let o = child.wait_with_output().expect("wait");
    (o.status, seen, stderr(&o))
}

#[cfg(unix)]
#[test]
fn ctrl_c_after_the_check_stops_cleanly_and_removes_the_folder() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let work = tmp.path().join("work");
    let mut args = demo_args(&work, 3);
    args.push("--keep-running".into());
    let (status, out, err) = demo_interrupted_after(args, "press Ctrl-C");
    assert!(status.success(), "{status:?}\n{out}\n{err}");
    assert!(out.contains("3/3 delivered identical"), "{out}");
    assert!(out.contains("SIGINT: stopping"), "{out}");
    assert!(!work.exists(), "left behind: {}", work.display());
}

#[cfg(unix)]
#[test]
fn ctrl_c_mid_run_removes_the_folder() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let work = tmp.path().join("work");
    // Interrupted as soon as the folder exists, while the PKI and keys are being made and
    // long before 2000 objects could be through.
    let (status, out, err) = demo_interrupted_after(demo_args(&work, 2000), "work folder:");
    assert!(!status.success(), "{out}\n{err}");
    assert!(err.contains("interrupted by SIGINT"), "{err}");
    assert!(!out.contains("delivered identical"), "{out}");
    assert!(!work.exists(), "left behind: {}", work.display());
}

/// `serve` with a valid config: `healthcheck` passes against its admin endpoint and fails
/// against a path that is not 200 and a port nobody listens on; SIGTERM stops it with 0.
#[cfg(unix)]
#[test]
fn healthcheck_against_a_running_node_and_sigterm_stops_it() {
    let s = Site::new();
    let mut child = Command::new(BIN)
        .args(["serve", "--config", s.path().to_str().expect("utf-8")])
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn serve");
    // Logs go to stderr.
    let mut stdout = BufReader::new(child.stderr.take().expect("stderr"));
    let mut admin = None;
    let mut seen = String::new();
    while admin.is_none() {
        let mut l = String::new();
        let n = stdout.read_line(&mut l).expect("read stdout");
        assert!(
            n > 0,
            "serve ended before its admin endpoint was up: {seen}"
        );
        seen.push_str(&l);
        if l.contains("admin HTTP up") {
            let i = l.find("127.0.0.1:").expect("admin address in the log line");
            let addr: String = l[i..]
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                .collect();
            admin = Some(addr);
        }
    }
    let admin = admin.expect("admin address");
    let hc = |url: String| run(&["healthcheck", "--url", &url], &[]);
    let ok = hc(format!("http://{admin}/healthz"));
    assert!(ok.status.success(), "{}", stderr(&ok));
    let missing = hc(format!("http://{admin}/no-such-path"));
    assert_eq!(missing.status.code(), Some(1), "{}", stderr(&missing));

    signal(&child, rustix::process::Signal::TERM);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).expect("read stdout");
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status:?}: {rest}");
    assert!(rest.contains("node stopped"), "{rest}");
    // Nobody listens there any more.
    let gone = hc(format!("http://{admin}/healthz"));
    assert_eq!(gone.status.code(), Some(1), "{}", stderr(&gone));
}

/// Send `sig` to our own child.
fn signal(child: &std::process::Child, sig: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_child(child);
    rustix::process::kill_process(pid, sig).expect("kill");
}

/// A `serve` process whose logs are kept (drained by a thread, so the node never blocks
/// on a full pipe), with the DICOM and HL7 addresses it bound (empty without such a
/// listener); killed on drop.
struct LoggedNode {
    child: std::process::Child,
    dicom: String,
    hl7: String,
    /// The admin HTTP endpoint (`/readyz`, `/metrics`).
    admin: Option<String>,
    logs: std::sync::Arc<std::sync::Mutex<String>>,
}

impl LoggedNode {
    fn spawn(s: &Site) -> LoggedNode {
        let mut child = Command::new(BIN)
            .args(["serve", "--config", s.path().to_str().expect("utf-8")])
            .env_remove("DICOM_GATEWAY_CONFIG")
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn serve");
        let mut lines = BufReader::new(child.stderr.take().expect("stderr"));
        let mut seen = String::new();
        let mut dicom = None;
        let mut hl7 = None;
        let mut admin = None;
        loop {
            let mut l = String::new();
            let n = lines.read_line(&mut l).expect("read stderr");
            assert!(n > 0, "serve ended before it was ready: {seen}");
            seen.push_str(&l);
            for (up, addr) in [
                ("DICOM listener up", &mut dicom),
                ("HL7 listener up", &mut hl7),
                ("admin HTTP up", &mut admin),
            ] {
                if l.contains(up) {
                    let i = l.find("127.0.0.1:").expect("address in the log line");
                    *addr = Some(
                        l[i..]
                            .chars()
                            .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                            .collect::<String>(),
                    );
                }
            }
            if l.contains("node ready") {
                break;
            }
        }
        let logs = std::sync::Arc::new(std::sync::Mutex::new(seen));
        let sink = logs.clone();
        std::thread::spawn(move || {
            for l in lines.lines().map_while(Result::ok) {
                if let Ok(mut s) = sink.lock() {
                    s.push_str(&l);
                    s.push('\n');
                }
            }
        });
        LoggedNode {
            child,
            dicom: dicom.unwrap_or_default(),
            hl7: hl7.unwrap_or_default(),
            admin,
            logs,
        }
    }

    fn logs(&self) -> String {
        self.logs.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

/// `GET path` of a node's admin endpoint: the status code and body.
fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    Ok((code, body))
}

impl Drop for LoggedNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Generated objects of one study as Part-10 files in `dir`, for DCMTK's storescu.
fn part10_files(dir: &Path, n: u32) -> Vec<(PathBuf, String)> {
    std::fs::create_dir_all(dir).expect("mkdir");
    let study = dicom_gateway::demo::new_uid();
    let series = dicom_gateway::demo::new_uid();
    (0..n)
        .map(|i| {
            let o = dicom_gateway::demo::generate_object(&study, &series, i + 1, "CLI^QUEUE", 4096)
                .expect("generate");
            let mut file = dicom_gateway::dataset::part10_header(
                &o.sop_class,
                &o.sop_instance,
                &o.transfer_syntax,
                Some("TEST_SCU"),
            );
            file.extend_from_slice(&o.dataset);
            let p = dir.join(format!("{i:03}.dcm"));
            std::fs::write(&p, file).expect("write");
            (p, o.sop_instance)
        })
        .collect()
}

/// The rows of a table the CLI printed for people, as (column → cell) maps: the columns
/// are found at the offsets of `header` names in the header line.
fn table(out: &str, header: &[&str]) -> Vec<std::collections::HashMap<String, String>> {
    let mut lines = out.lines();
    let head = lines
        .by_ref()
        .find(|l| l.starts_with(header[0]))
        .unwrap_or_else(|| panic!("no table with {header:?} in:\n{out}"));
    let mut offsets = Vec::new();
    let mut from = 0;
    for h in header {
        let at = head[from..]
            .find(h)
            .unwrap_or_else(|| panic!("column {h:?} missing in {head:?}"))
            + from;
        offsets.push(at);
        from = at + h.len();
    }
    lines
        .take_while(|l| !l.trim().is_empty() && !l.ends_with(" entries"))
        .map(|l| {
            header
                .iter()
                .enumerate()
                .map(|(i, h)| {
                    let end = offsets.get(i + 1).copied().unwrap_or(l.len()).min(l.len());
                    let cell = l.get(offsets[i].min(end)..end).unwrap_or("").trim();
                    (h.to_string(), cell.to_owned())
                })
                .collect()
        })
        .collect()
}

const STATUS_COLUMNS: &[&str] = &[
    "DESTINATION",
    "KIND",
    "QUEUED",
    "BYTES",
    "OLDEST",
    "IN FLIGHT",
    "DEAD",
    "CIRCUIT",
    "DELIVERED",
    "LAST ERROR",
];
const QUEUE_COLUMNS: &[&str] = &[
    "ID",
    "DESTINATION",
    "STATE",
    "ATTEMPTS",
    "SIZE",
    "STUDY UID",
    "SOP INSTANCE UID",
    "LAST REASON",
];

/// The binary's operator commands against a running `serve`: three objects sent by DCMTK's
/// storescu to a node whose peer is unreachable become dead letters (`max_age = "1s"`);
/// `status` and `queue list` print tables for people that show them; `queue retry --id`
/// and `queue purge --id` act on exactly that entry, and `queue retry --destination D
/// --dead` on every dead letter of D.
#[test]
fn queue_commands_of_the_binary_act_on_what_they_select_and_print_tables() {
    let s = Site::new();
    s.write(&format!(
        "{}[destination.retry]\ninitial = \"100ms\"\nmax_delay = \"200ms\"\nmax_age = \"1s\"\n",
        s.config()
    ));
    let node = LoggedNode::spawn(&s);
    let cfg = s.path();
    let cfg = cfg.to_str().expect("utf-8");
    let files = part10_files(&s.dir.join("send"), 3);
    let (host, port) = node.dicom.rsplit_once(':').expect("host:port");
    let o = Command::new("/usr/bin/storescu")
        .args(["-aet", "TEST_SCU", "-aec", "GW_A", host, port])
        .args(files.iter().map(|(p, _)| p))
        .output()
        .expect("storescu (DCMTK)");
    assert!(o.status.success(), "storescu: {}", stderr(&o));

    let ok = |args: &[&str]| -> String {
        let o = run(args, &[]);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let dead_ids = || -> Vec<String> {
        let v: serde_json::Value =
            serde_json::from_str(&ok(&["queue", "list", "--config", cfg, "--dead", "--json"]))
                .expect("JSON");
        v.as_array()
            .expect("entries")
            .iter()
            .filter(|e| e["state"] == "dead")
            .filter_map(|e| e["id"].as_str().map(str::to_owned))
            .collect()
    };
    let wait_dead = |n: usize| {
        for _ in 0..400 {
            if dead_ids().len() == n {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!(
            "not {n} dead letters: {:?}\n{}",
            dead_ids(),
            node.logs.lock().map(|l| l.clone()).unwrap_or_default()
        );
    };
    wait_dead(3);

    // `status`: the table for people.
    let out = ok(&["status", "--config", cfg]);
    assert!(out.starts_with("node site-a: ready\n"), "{out}");
    let rows = table(&out, STATUS_COLUMNS);
    assert_eq!(rows.len(), 1, "{out}");
    let r = &rows[0];
    assert_eq!(
        (
            r["DESTINATION"].as_str(),
            r["KIND"].as_str(),
            r["QUEUED"].as_str(),
            r["DEAD"].as_str(),
            r["BYTES"].as_str(),
        ),
        ("site-b", "gateway", "0", "3", "0 B"),
        "{out}"
    );
    assert!(r["LAST ERROR"].contains("unavailable"), "{out}");

    // `queue list`: one row per entry, with the UIDs an operator needs.
    let out = ok(&["queue", "list", "--config", cfg]);
    let rows = table(&out, QUEUE_COLUMNS);
    assert_eq!(rows.len(), 3, "{out}");
    assert!(out.trim_end().ends_with("3 entries"), "{out}");
    let mut listed: Vec<&str> = rows
        .iter()
        .map(|r| r["SOP INSTANCE UID"].as_str())
        .collect();
    let mut sent: Vec<&str> = files.iter().map(|(_, uid)| uid.as_str()).collect();
    listed.sort_unstable();
    sent.sort_unstable();
    assert_eq!(listed, sent, "{out}");
    for r in &rows {
        assert_eq!(
            (r["DESTINATION"].as_str(), r["STATE"].as_str()),
            ("site-b", "dead"),
            "{out}"
        );
        assert!(r["LAST REASON"].contains("unavailable"), "{out}");
        assert!(r["SIZE"].ends_with("KiB"), "{out}");
    }
    let mut ids: Vec<String> = rows.iter().map(|r| r["ID"].clone()).collect();
    ids.sort();
    let mut json_ids = dead_ids();
    json_ids.sort();
    assert_eq!(ids, json_ids, "the table and --json list the same entries");

    // `queue list --id ID --history`: that entry only, with its failed attempts (time and
    // reason each), as `--json` has them.
    let out = ok(&[
        "queue",
        "list",
        "--config",
        cfg,
        "--id",
        &ids[0],
        "--history",
    ]);
    assert_eq!(table(&out, QUEUE_COLUMNS).len(), 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(&ok(&[
        "queue", "list", "--config", cfg, "--id", &ids[0], "--json",
    ]))
    .expect("JSON");
    let entry = &v.as_array().expect("entries")[0];
    let history = entry["history"].as_array().expect("history");
    let attempts = entry["attempts"].as_u64().expect("attempts");
    assert!(
        attempts >= 1 && history.len() as u64 == attempts.min(8),
        "{entry}"
    );
    let head = format!("{} -> site-b: {attempts} failed attempts", ids[0]);
    let shown: Vec<&str> = out
        .lines()
        .skip_while(|l| *l != head)
        .skip(1)
        .take_while(|l| l.starts_with("  #"))
        .collect();
    assert_eq!(shown.len(), history.len(), "{out}");
    for (line, a) in shown.iter().zip(history) {
        let reason = a["reason"].as_str().expect("reason");
        assert!(
            reason.contains("unavailable") && line.ends_with(reason),
            "{out}"
        );
        // An RFC 3339 UTC time, second precision.
        let at = line.split_whitespace().nth(1).unwrap_or_default();
        assert!(at.len() == 20 && at.ends_with('Z'), "{out}");
    }
    // A study filter that matches nothing lists nothing; a malformed id is refused before
    // anything is asked.
    let out = ok(&["queue", "list", "--config", cfg, "--study", "1.2.3.4.5"]);
    assert!(out.trim_end().ends_with("0 entries"), "{out}");
    let o = run(&["queue", "list", "--config", cfg, "--id", "../x"], &[]);
    assert!(!o.status.success() && stderr(&o).contains("not an object id"));

    // `queue retry --id`: that entry only.
    let out = ok(&["queue", "retry", "--config", cfg, "--id", &ids[0]]);
    assert!(out.starts_with("1 matched, 1 replayed,"), "{out}");
    // (It is queued again, and soon dead again: its age budget is spent.)
    wait_dead(3);
    // `queue purge --id`: that entry only, gone from the listing.
    let out = ok(&["queue", "purge", "--config", cfg, "--id", &ids[1]]);
    assert!(out.starts_with("1 matched, 1 purged,"), "{out}");
    let mut left = dead_ids();
    left.sort();
    assert_eq!(left, vec![ids[0].clone(), ids[2].clone()]);
    // `queue retry --destination D --dead`: every dead letter of D.
    let out = ok(&[
        "queue",
        "retry",
        "--config",
        cfg,
        "--destination",
        "site-b",
        "--dead",
    ]);
    assert!(out.starts_with("2 matched, 2 replayed,"), "{out}");
    wait_dead(2);
    // An id that is not queued changes nothing, and says so.
    let out = ok(&[
        "queue",
        "retry",
        "--config",
        cfg,
        "--id",
        "00000000000000000000000000000000",
    ]);
    assert!(out.starts_with("0 matched, 0 replayed,"), "{out}");
    assert!(out.contains("nothing matched"), "{out}");
    drop(node);
}

/// A pydicom test file (files nobody here wrote).
fn pydicom_file(name: &str) -> PathBuf {
    let out = Command::new("python3")
        .args([
            "-c",
            &format!("import pydicom.data as d; print(d.get_testdata_file({name:?}))"),
        ])
        .output()
        .expect("python3 with pydicom: .ci/run installs it");
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(p.is_file(), "pydicom test file {name} not found: {p:?}");
    p
}

/// `check --explain FILE` through the binary: the listener's `route_to`, each route's
/// verdict with its reason, and the destinations the file would take, for pydicom's CT
/// (taken by the `ct` route too) and MR (not); exit 0.
#[test]
fn check_explain_through_the_binary_prints_the_routes_a_file_takes() {
    let s = Site::new();
    s.write(&format!(
        "{}\n[[destination]]\nname = \"archive\"\nkind = \"folder\"\npath = \"archive\"\n\n\
         [[route]]\nname = \"ct\"\nmodalities = [\"CT\"]\nto = [\"archive\"]\n",
        s.config()
    ));
    let cfg = s.path();
    let cfg = cfg.to_str().expect("utf-8");
    let explain = |file: &Path| {
        let o = run(
            &[
                "check",
                "--config",
                cfg,
                "--explain",
                file.to_str().expect("utf-8"),
            ],
            &[],
        );
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        assert_eq!(o.status.code(), Some(0), "{out}{}", stderr(&o));
        out
    };
    let out = explain(&pydicom_file("CT_small.dcm"));
    assert!(
        out.contains("file: SOP class 1.2.840.10008.5.1.4.1.1.2, modality CT"),
        "{out}"
    );
    assert!(out.contains("listener lan:"), "{out}");
    assert!(out.contains("  route_to            -> site-b"), "{out}");
    assert!(out.contains("  route ct            -> archive"), "{out}");
    assert!(out.contains("  => site-b, archive"), "{out}");

    let out = explain(&pydicom_file("MR_small.dcm"));
    assert!(out.contains("modality MR"), "{out}");
    assert!(
        out.contains("  route ct            no: modality MR not in modalities"),
        "{out}"
    );
    assert!(out.contains("  => site-b\n"), "{out}");
}

/// `check --config cfg --json`: its exit code, each finding as `[level, subject, message]`,
/// and the whole report (for assertion messages).
fn check_json(cfg: &str) -> (Option<i32>, Vec<[String; 3]>, serde_json::Value) {
    let o = run(&["check", "--config", cfg, "--json"], &[]);
    let report: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("JSON report ({e}): {}", stderr(&o)));
    let findings = report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .map(|f| ["level", "subject", "message"].map(|k| f[k].as_str().unwrap_or("").to_owned()))
        .collect();
    (o.status.code(), findings, report)
}

/// `t` as `openssl ca -startdate/-enddate` takes it (UTC, `YYYYMMDDHHMMSSZ`).
fn openssl_date(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after the epoch")
        .as_secs();
    let o = Command::new("date")
        .args(["-u", "-d", &format!("@{secs}"), "+%Y%m%d%H%M%SZ"])
        .output()
        .expect("date");
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

/// Sign a certificate for `name` with the site folder's CA, valid from `start` to `end`
/// (`YYYYMMDDHHMMSSZ`), with OpenSSL's `ca` command; returns its path.
fn openssl_cert(s: &Site, name: &str, start: &str, end: &str) -> PathBuf {
    let d = s.dir.join(format!("openssl-{name}-{end}"));
    std::fs::create_dir_all(d.join("db")).expect("mkdir");
    std::fs::write(d.join("db/index.txt"), "").expect("index");
    std::fs::write(d.join("db/serial"), "01\n").expect("serial");
    std::fs::write(
        d.join("ca.cnf"),
        format!(
            "[ca]\ndefault_ca = test\n[test]\ndatabase = db/index.txt\nnew_certs_dir = db\n\
             serial = db/serial\ndefault_md = sha256\npolicy = any\ncopy_extensions = none\n\
             x509_extensions = leaf\n[any]\ncommonName = supplied\n[leaf]\n\
             basicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature\n\
             extendedKeyUsage = serverAuth,clientAuth\nsubjectAltName = DNS:{name}\n"
        ),
    )
    .expect("ca.cnf");
    let tls = s.dir.join("tls");
    let openssl = |args: &[&str]| {
        let o = Command::new("openssl")
            .current_dir(&d)
            .args(args)
            .output()
            .expect("openssl");
        assert!(o.status.success(), "openssl {args:?}: {}", stderr(&o));
    };
    let key = tls.join(format!("{name}.key"));
    openssl(&[
        "req",
        "-new",
        "-key",
        key.to_str().expect("utf-8"),
        "-subj",
        &format!("/CN={name}"),
        "-out",
        "leaf.csr",
    ]);
    openssl(&[
        "ca",
        "-batch",
        "-notext",
        "-config",
        "ca.cnf",
        "-cert",
        tls.join("ca.crt").to_str().expect("utf-8"),
        "-keyfile",
        tls.join("ca.key").to_str().expect("utf-8"),
        "-in",
        "leaf.csr",
        "-out",
        "leaf.crt",
        "-startdate",
        start,
        "-enddate",
        end,
    ]);
    d.join("leaf.crt")
}

/// `check` looks at the certificates' dates: the node's certificate (same key, name and
/// CA, made by OpenSSL) expired is an error naming it (exit 1); expiring in ten days is a
/// warning (exit 0); the control, in date for years, is neither.
#[test]
fn check_reports_an_expired_or_expiring_certificate() {
    let s = Site::new();
    let cfg = s.path();
    let cfg = cfg.to_str().expect("utf-8");
    let fmt = openssl_date;
    let now = std::time::SystemTime::now();
    let day = std::time::Duration::from_secs(86_400);
    let check_with = |cert: &Path| {
        s.write(
            &s.config()
                .replace("tls/site-a.crt", cert.to_str().expect("utf-8")),
        );
        let (code, findings, report) = check_json(cfg);
        let cert_findings: Vec<(String, String)> = findings
            .into_iter()
            .filter(|[_, subject, _]| subject == "tls.cert")
            .map(|[level, _, message]| (level, message))
            .collect();
        (code, cert_findings, report)
    };

    let good = openssl_cert(&s, "site-a", &fmt(now - day), &fmt(now + 800 * day));
    let (code, findings, report) = check_with(&good);
    assert_eq!((code, findings.len()), (Some(0), 0), "control: {report}");

    let expired = openssl_cert(&s, "site-a", &fmt(now - 20 * day), &fmt(now - 10 * day));
    let (code, findings, report) = check_with(&expired);
    assert_eq!(code, Some(1), "{report}");
    assert!(
        findings
            .iter()
            .any(|(level, m)| level == "error" && m.contains("expired")),
        "{report}"
    );

    let expiring = openssl_cert(&s, "site-a", &fmt(now - day), &fmt(now + 10 * day));
    let (code, findings, report) = check_with(&expiring);
    assert_eq!(code, Some(0), "{report}");
    assert!(
        findings
            .iter()
            .any(|(level, m)| level == "warning" && m.contains("expires in")),
        "{report}"
    );
}

/// `check` loads the files of a `[dicom_listener.tls]` and a `[destination.tls]` as the
/// node would: a key that does not fit its certificate, a missing CA file and an expired
/// certificate are each an error on the key that names them; the control has none.
#[test]
fn check_reads_the_dicom_tls_files_of_listeners_and_destinations() {
    let s = Site::new();
    let cfg = s.path();
    let cfg = cfg.to_str().expect("utf-8");
    let with_tls = |listener_key: &str, listener_cert: &str, dest_ca: &str| {
        let text = format!(
            r#"{}
[[dicom_listener]]
name = "lan-tls"
listen = "127.0.0.1:0"
ae_title = "GW_A"
route_to = ["pacs"]
[dicom_listener.tls]
cert = "{listener_cert}"
key = "{listener_key}"
ca = "tls/ca.crt"
[[destination]]
name = "pacs"
kind = "dicom"
address = "127.0.0.1:104"
ae_title = "PACS"
calling_ae_title = "GW_A"
[destination.tls]
ca = "{dest_ca}"
server_name = "pacs.example.org"
cert = "tls/site-a.crt"
key = "tls/site-a.key"
"#,
            s.config()
        );
        s.write(&text);
        let (code, findings, report) = check_json(cfg);
        let errors: Vec<(String, String)> = findings
            .into_iter()
            .filter(|[level, _, _]| level == "error")
            .map(|[_, subject, message]| (subject, message))
            .collect();
        (code, errors, report)
    };
    let has = |errors: &[(String, String)], subject: &str, needle: &str| {
        errors
            .iter()
            .any(|(s, m)| s == subject && m.contains(needle))
    };

    let (code, errors, report) = with_tls("tls/site-a.key", "tls/site-a.crt", "tls/ca.crt");
    assert_eq!((code, errors.len()), (Some(0), 0), "control: {report}");

    // Site B's key under site A's certificate; a CA file that is not there.
    let (code, errors, report) = with_tls("tls/site-b.key", "tls/site-a.crt", "tls/none.crt");
    assert_eq!(code, Some(1), "{report}");
    assert!(
        has(&errors, "dicom_listener[lan-tls].tls", "does not fit"),
        "{report}"
    );
    assert!(
        has(&errors, "destination[pacs].tls", "none.crt"),
        "{report}"
    );

    let now = std::time::SystemTime::now();
    let day = std::time::Duration::from_secs(86_400);
    let fmt = openssl_date;
    let expired = openssl_cert(&s, "site-a", &fmt(now - 20 * day), &fmt(now - 10 * day));
    let (code, errors, report) = with_tls(
        "tls/site-a.key",
        expired.to_str().expect("utf-8"),
        "tls/ca.crt",
    );
    assert_eq!(code, Some(1), "{report}");
    assert!(
        has(&errors, "dicom_listener[lan-tls].tls.cert", "expired"),
        "{report}"
    );
}

/// An association that stops in the middle of an object: a C-STORE-RQ, then the start of
/// its data set (the identity and the first 64 KiB of a 1 MiB Pixel Data), then silence.
async fn stall_mid_object(
    addr: &str,
) -> dicom_ul::association::client::AsyncClientAssociation<tokio::net::TcpStream> {
    use dicom_ul::Pdu;
    use dicom_ul::pdu::{PDataValue, PDataValueType};
    const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
    let mut assoc = dicom_ul::ClientAssociationOptions::new()
        .calling_ae_title("STALL_SCU")
        .called_ae_title("GW_A")
        .with_presentation_context(CT, vec!["1.2.840.10008.1.2.1"])
        .read_timeout(std::time::Duration::from_secs(60))
        .establish_async(addr.to_owned())
        .await
        .expect("association");
    let ctx = assoc.presentation_contexts()[0].id;
    let instance = "1.2.826.0.1.3680043.10.543.77.1";
    let rq = dicom_gateway::dimse::Command::store_rq(1, CT, instance);
    let el = |out: &mut Vec<u8>, g: u16, e: u16, vr: &[u8; 2], value: &[u8], len: u32| {
        out.extend_from_slice(&g.to_le_bytes());
        out.extend_from_slice(&e.to_le_bytes());
        out.extend_from_slice(vr);
        if vr == b"OB" {
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&len.to_le_bytes());
        } else {
            out.extend_from_slice(&(len as u16).to_le_bytes());
        }
        out.extend_from_slice(value);
    };
    let mut ds = Vec::new();
    let ui = |s: &str| {
        let mut v = s.as_bytes().to_vec();
        if v.len() % 2 == 1 {
            v.push(0);
        }
        v
    };
    for (g, e, v) in [
        (0x0008, 0x0016, ui(CT)),
        (0x0008, 0x0018, ui(instance)),
        (0x0020, 0x000D, ui("1.2.826.0.1.3680043.10.543.77")),
        (0x0020, 0x000E, ui("1.2.826.0.1.3680043.10.543.77.0")),
    ] {
        let n = v.len() as u32;
        el(&mut ds, g, e, b"UI", &v, n);
    }
    el(&mut ds, 0x7FE0, 0x0010, b"OB", &[0x5A; 64 * 1024], 1 << 20);
    for (kind, last, data) in [
        (PDataValueType::Command, true, rq.encode()),
        (PDataValueType::Data, false, ds),
    ] {
        assoc
            .send(&Pdu::PData {
                data: vec![PDataValue {
                    presentation_context_id: ctx,
                    value_type: kind,
                    is_last: last,
                    data,
                }],
            })
            .await
            .expect("send");
    }
    assoc
}

/// Shutdown as operations.md describes it, through the binary. One object is acknowledged
/// (DCMTK's storescu; its destination is unreachable, so it stays queued). Another is
/// stalled mid-transfer, which holds the drain (the listener waits for an object in
/// progress, for up to its 300 s timeout). On SIGTERM: readiness goes false (/readyz 503
/// "draining") while the node still runs, and the DICOM port stops accepting. A second
/// SIGTERM aborts at once with exit status 130. The next start removes the half-received
/// object (counted in its log) and still holds the acknowledged one.
#[cfg(unix)]
#[test]
fn sigterm_drains_in_phases_and_a_second_signal_aborts_without_losing_an_acked_object() {
    let s = Site::new();
    let cfg_text = s.config().replace(
        "route_to = [\"site-b\"]\n",
        "route_to = [\"site-b\"]\ntimeout = \"300s\"\n",
    );
    s.write(&cfg_text);
    let cfg = s.path();
    let cfg = cfg.to_str().expect("utf-8");
    let mut node = LoggedNode::spawn(&s);
    let admin = node.admin.clone().expect("admin HTTP");
    let files = part10_files(&s.dir.join("send"), 1);
    let (host, port) = node.dicom.rsplit_once(':').expect("host:port");
    let o = Command::new("/usr/bin/storescu")
        .args(["-aet", "TEST_SCU", "-aec", "GW_A", host, port])
        .arg(&files[0].0)
        .output()
        .expect("storescu (DCMTK)");
    assert!(o.status.success(), "storescu: {}", stderr(&o));

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut stalled = rt.block_on(stall_mid_object(&node.dicom));
    // Premise: the node has the stalled association (and so its object) in progress.
    let active = || {
        http_get(&admin, "/metrics").is_ok_and(|(_, m)| {
            m.lines()
                .any(|l| l == "dicom_gateway_associations_active{listener=\"lan\"} 1")
        })
    };
    let mut tries = 0;
    while !active() {
        tries += 1;
        assert!(
            tries < 200,
            "premise: the stalled association is not active"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(http_get(&admin, "/readyz").expect("readyz").0, 200);

    signal(&node.child, rustix::process::Signal::TERM);
    // Phase 1: readiness goes false, and /readyz says why (the endpoint stays up).
    let mut draining = None;
    for _ in 0..200 {
        if let Ok((503, body)) = http_get(&admin, "/readyz") {
            draining = Some(body);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let body = draining.unwrap_or_else(|| panic!("/readyz never went 503: {}", node.logs()));
    assert!(body.contains("draining"), "{body}");
    // Phase 2: the DICOM listener accepts no new association.
    let mut refused = false;
    for _ in 0..200 {
        if std::net::TcpStream::connect(&node.dicom).is_err() {
            refused = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(refused, "the DICOM port still accepts while draining");
    // The drain is held by the object in progress: the node still runs, and the stalled
    // association has not been cut off.
    assert!(
        node.child.try_wait().expect("try_wait").is_none(),
        "{}",
        node.logs()
    );
    let cut = rt.block_on(async {
        tokio::time::timeout(std::time::Duration::from_millis(500), stalled.receive()).await
    });
    assert!(cut.is_err(), "the object in progress was cut off: {cut:?}");

    // A second signal aborts without waiting for the drain.
    signal(&node.child, rustix::process::Signal::TERM);
    let mut status = None;
    for _ in 0..400 {
        if let Some(st) = node.child.try_wait().expect("try_wait") {
            status = Some(st);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let status =
        status.unwrap_or_else(|| panic!("a second SIGTERM did not abort: {}", node.logs()));
    assert_eq!(status.code(), Some(130), "{}", node.logs());
    drop(stalled);
    drop(rt);
    let logs = node.logs();
    assert!(
        logs.contains("second signal: aborting without draining"),
        "{logs}"
    );
    assert!(
        !logs.contains("node stopped"),
        "it aborted, it did not drain: {logs}"
    );
    drop(node);

    // The next start removes the half-received object and keeps the acknowledged one.
    let node = LoggedNode::spawn(&s);
    let logs = node.logs();
    let recovered = logs
        .lines()
        .find(|l| l.contains("removed partial objects left by an interrupted ingest"))
        .unwrap_or_else(|| panic!("no recovery of the stalled object: {logs}"));
    assert!(recovered.contains("count=1"), "{recovered}");
    let o = run(&["queue", "list", "--config", cfg, "--json"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    let listed: Vec<&str> = v
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["sop_instance_uid"].as_str())
        .collect();
    assert_eq!(
        listed,
        vec![files[0].1.as_str()],
        "the acknowledged object is still queued"
    );
}

/// python-hl7 as a receiving system (`tests/interop/hl7_peer.py serve`, see its answers by
/// control id there), killed on drop. The gateway crate's tests cannot use the test kit
/// (it depends on this crate), so this is the small part of its `Ris` the CLI needs.
struct Hl7Peer {
    child: std::process::Child,
    port: u16,
    log: PathBuf,
}

fn hl7_peer_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/interop/hl7_peer.py")
}

impl Hl7Peer {
    fn start(dir: &Path) -> Hl7Peer {
        std::fs::create_dir_all(dir).expect("mkdir");
        let port_file = dir.join("peer.port");
        let log = dir.join("peer.jsonl");
        let mut child = Command::new("python3")
            .arg(hl7_peer_script())
            .args(["serve", "--port-file"])
            .arg(&port_file)
            .arg("--log")
            .arg(&log)
            .stdout(Stdio::null())
            .spawn()
            .expect("python3 with python-hl7 (pip install hl7)");
        for _ in 0..400 {
            if let Some(port) = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|p| p.trim().parse().ok())
            {
                return Hl7Peer { child, port, log };
            }
            assert!(
                child.try_wait().expect("peer status").is_none(),
                "hl7_peer.py exited"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("hl7_peer.py did not listen within 20 s");
    }

    /// `true`: messages whose control id starts with FIX are answered AE.
    fn set_broken(&self, broken: bool) {
        let flag = PathBuf::from(format!("{}.broken", self.log.display()));
        if broken {
            std::fs::write(flag, b"").expect("flag");
        } else {
            let _ = std::fs::remove_file(flag);
        }
    }

    /// (control id, ACK code, message) of each message received, in order.
    fn received(&self) -> Vec<(String, Option<String>, String)> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| {
                (
                    v["control_id"].as_str().unwrap_or_default().to_owned(),
                    v["ack"].as_str().map(str::to_owned),
                    v["raw"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    /// Send `messages` to `addr` with python-hl7's MLLP client; each one's ACK code.
    fn send(dir: &Path, addr: &str, messages: &[String]) -> Vec<Option<String>> {
        let list = dir.join("send.json");
        std::fs::write(&list, serde_json::to_vec(messages).expect("json")).expect("write");
        let (host, port) = addr.rsplit_once(':').expect("host:port");
        let o = Command::new("python3")
            .arg(hl7_peer_script())
            .args(["send", host, port])
            .arg(&list)
            .output()
            .expect("python3 with python-hl7");
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| v["ack"].as_str().map(str::to_owned))
            .collect()
    }
}

impl Drop for Hl7Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn orm(control: &str, patient: &str) -> String {
    format!(
        "MSH|^~\\&|RIS|HOSP_A|GW|TELE|20261203120000||ORM^O01^ORM_O01|{control}|P|2.5\r\
         PID|1||{patient}^^^HOSP_A^MR||MUSTERFRAU^ERIKA||19700101|F\r\
         ORC|NW|{control}-ORD\r\
         OBR|1|{control}-ORD||CT^CT HEAD\r"
    )
}

/// The operator commands on HL7 messages, through the real binary against a running
/// node (an `[[hl7_listener]]` routed to an `hl7` destination, python-hl7 on both sides):
/// messages the receiving system answers AE are dead letters; `status` shows them for the
/// `hl7` destination and `queue list` lists them with their message type, control id and
/// the ACK's coded reason (the patient key only in `--json`); once the receiving system is
/// fixed, `queue retry --destination D --dead` delivers them byte for byte, and `queue
/// purge --id` deletes the one still refused.
#[test]
fn queue_commands_show_replay_and_purge_hl7_dead_letters() {
    let s = Site::new();
    let peer = Hl7Peer::start(&s.dir.join("ris"));
    peer.set_broken(true);
    let base = s.config();
    let base = base.split("[[dicom_listener]]").next().expect("config");
    s.write(&format!(
        r#"{base}[[hl7_listener]]
name = "ris-in"
listen = "127.0.0.1:0"
route_to = ["ris"]
[[destination]]
name = "ris"
kind = "hl7"
address = "127.0.0.1:{}"
send_timeout = "5s"
retry = {{ initial = "100ms", max_delay = "200ms" }}
"#,
        peer.port
    ));
    let node = LoggedNode::spawn(&s);
    let cfg = s.path();
    let cfg = cfg.to_str().expect("utf-8");
    let messages = vec![
        orm("FIX-1", "PAT-1"),
        orm("FIX-2", "PAT-2"),
        orm("ERR-1", "PAT-3"),
    ];
    let acks = Hl7Peer::send(&s.dir, &node.hl7, &messages);
    assert_eq!(acks, vec![Some("AA".to_owned()); 3], "stored: AA");

    let ok = |args: &[&str]| -> String {
        let o = run(args, &[]);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let dead = || -> Vec<serde_json::Value> {
        let v: serde_json::Value =
            serde_json::from_str(&ok(&["queue", "list", "--config", cfg, "--dead", "--json"]))
                .expect("JSON");
        v.as_array()
            .expect("entries")
            .iter()
            .filter(|e| e["state"] == "dead")
            .cloned()
            .collect()
    };
    let wait = |what: &str, done: &dyn Fn() -> bool| {
        for _ in 0..400 {
            if done() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!(
            "not {what}: {:?}\n{}",
            dead(),
            node.logs.lock().map(|l| l.clone()).unwrap_or_default()
        );
    };
    wait("3 dead letters", &|| dead().len() == 3);

    // `status`: the hl7 destination with its dead letters and the last reason.
    let out = ok(&["status", "--config", cfg]);
    let rows = table(&out, STATUS_COLUMNS);
    assert_eq!(rows.len(), 1, "{out}");
    let r = &rows[0];
    assert_eq!(
        (
            r["DESTINATION"].as_str(),
            r["KIND"].as_str(),
            r["QUEUED"].as_str(),
            r["DEAD"].as_str()
        ),
        ("ris", "hl7", "0", "3"),
        "{out}"
    );
    assert!(r["LAST ERROR"].contains("answered AE"), "{out}");

    // `queue list`: message type and control id in the UID columns, the coded reason.
    let out = ok(&["queue", "list", "--config", cfg]);
    let rows = table(&out, QUEUE_COLUMNS);
    assert_eq!(rows.len(), 3, "{out}");
    let mut controls: Vec<&str> = rows
        .iter()
        .map(|r| r["SOP INSTANCE UID"].as_str())
        .collect();
    controls.sort_unstable();
    assert_eq!(controls, ["ERR-1", "FIX-1", "FIX-2"], "{out}");
    for r in &rows {
        assert_eq!(
            (
                r["DESTINATION"].as_str(),
                r["STATE"].as_str(),
                r["ATTEMPTS"].as_str(),
                r["STUDY UID"].as_str()
            ),
            ("ris", "dead", "1", "HL7 ORM^O01"),
            "{out}"
        );
        assert!(
            r["LAST REASON"].contains("answered AE (application error): error 207"),
            "{out}"
        );
    }
    assert!(
        !out.contains("PAT-") && !out.contains("MUSTERFRAU"),
        "no patient data in the table: {out}"
    );
    // --json names the protocol and, for the operator, the patient key.
    let entries = dead();
    let err_id = entries
        .iter()
        .find(|e| e["hl7"]["control_id"] == "ERR-1")
        .and_then(|e| e["id"].as_str())
        .expect("ERR-1 listed")
        .to_owned();
    for e in &entries {
        assert_eq!(e["protocol"], "hl7", "{e}");
        assert_eq!(e["hl7"]["message_type"], "ORM^O01", "{e}");
        assert_eq!(e["study_uid"], "", "{e}");
        assert!(
            e["hl7"]["patient"]
                .as_str()
                .is_some_and(|p| p.starts_with("PAT-") && p.ends_with("^HOSP_A")),
            "{e}"
        );
    }

    // The receiving system is fixed: a replay of every dead letter delivers FIX-1 and
    // FIX-2 byte for byte; ERR-1 is refused again and is a dead letter again.
    peer.set_broken(false);
    let out = ok(&[
        "queue",
        "retry",
        "--config",
        cfg,
        "--destination",
        "ris",
        "--dead",
    ]);
    assert!(out.starts_with("3 matched, 3 replayed,"), "{out}");
    let accepted = || -> Vec<String> {
        peer.received()
            .into_iter()
            .filter(|r| r.1.as_deref() == Some("AA"))
            .map(|r| r.2)
            .collect()
    };
    wait("FIX-1 and FIX-2 delivered", &|| accepted().len() == 2);
    let mut got = accepted();
    got.sort();
    assert_eq!(got, messages[..2].to_vec(), "delivered as sent");
    wait("ERR-1 dead again", &|| {
        let d = dead();
        d.len() == 1 && d[0]["attempts"] == 1 && peer.received().len() == 6
    });
    assert_eq!(dead()[0]["id"], err_id.as_str());

    // `queue purge --id`: gone, and nothing is left.
    let out = ok(&["queue", "purge", "--config", cfg, "--id", &err_id]);
    assert!(out.starts_with("1 matched, 1 purged,"), "{out}");
    let out = ok(&["queue", "list", "--config", cfg]);
    assert!(out.trim_end().ends_with("0 entries"), "{out}");
    let rows = table(&ok(&["status", "--config", cfg]), STATUS_COLUMNS);
    assert_eq!(
        (rows[0]["DEAD"].as_str(), rows[0]["DELIVERED"].as_str()),
        ("0", "2")
    );
    let logs = node.logs.lock().map(|l| l.clone()).unwrap_or_default();
    assert!(
        !logs.contains("MUSTERFRAU") && !logs.contains("PAT-"),
        "no patient data in the logs at info level"
    );
    drop(node);
}

/// What `keys rotate --json` said: version, created, node running, keys rewrapped, retired.
fn rotated(
    r: &serde_json::Value,
) -> (
    Option<u64>,
    Option<bool>,
    Option<bool>,
    Option<u64>,
    serde_json::Value,
) {
    (
        r["version"].as_u64(),
        r["created"].as_bool(),
        r["node_running"].as_bool(),
        r["rewrapped"].as_u64(),
        r["retired"].clone(),
    )
}

/// SIGTERM, then wait for the node to exit.
fn stop_gracefully(mut node: LoggedNode) {
    signal(&node.child, rustix::process::Signal::TERM);
    let _ = node.child.wait();
}

/// `keys rotate` and `keys status`, through a running node's admin socket and on a stopped
/// node's data directory (issue 11, versioned KEKs). Three objects sent by DCMTK's storescu
/// wait for an unreachable peer. Rotated on the running node, their study key and the index
/// key move to version 2 and version 1 is retired: the node then starts without its file
/// and still reads the objects (`queue list` shows their UIDs, which only the unwrapped
/// keys reveal). Stopped, a version an operator put in place (as a Kubernetes Secret key
/// would be) is found, taken and version 2 retired the same way.
#[test]
fn keys_rotate_moves_every_key_to_a_new_version_on_a_running_and_a_stopped_node() {
    let s = Site::new();
    let cfg = s.path();
    let cfg = cfg.to_str().expect("utf-8");
    let ok = |args: &[&str]| -> String {
        let o = run(args, &[]);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let json = |args: &[&str]| -> serde_json::Value {
        serde_json::from_str(&ok(args)).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    };
    let queued_uids = || -> Vec<String> {
        let v = json(&["queue", "list", "--config", cfg, "--json"]);
        let mut u: Vec<String> = v
            .as_array()
            .expect("entries")
            .iter()
            .filter_map(|e| e["sop_instance_uid"].as_str().map(str::to_owned))
            .collect();
        u.sort_unstable();
        u
    };
    let versions = |v: &serde_json::Value| -> Vec<(u64, String, u64)> {
        v["versions"]
            .as_array()
            .expect("versions")
            .iter()
            .map(|x| {
                (
                    x["version"].as_u64().unwrap_or(0),
                    x["state"].as_str().unwrap_or("").to_owned(),
                    x["keys"].as_u64().unwrap_or(u64::MAX),
                )
            })
            .collect()
    };

    let node = LoggedNode::spawn(&s);
    let files = part10_files(&s.dir.join("send"), 3);
    let mut sent: Vec<String> = files.iter().map(|(_, uid)| uid.clone()).collect();
    sent.sort_unstable();
    let (host, port) = node.dicom.rsplit_once(':').expect("host:port");
    let o = Command::new("/usr/bin/storescu")
        .args(["-aet", "TEST_SCU", "-aec", "GW_A", host, port])
        .args(files.iter().map(|(p, _)| p))
        .output()
        .expect("storescu (DCMTK)");
    assert!(o.status.success(), "storescu: {}", stderr(&o));
    assert_eq!(queued_uids(), sent);
    let st = json(&["keys", "status", "--config", cfg, "--json"]);
    // One study key and the index key.
    assert_eq!(versions(&st), [(1, "newest".to_owned(), 2)], "{st}");

    // Through the running node.
    let r = json(&["keys", "rotate", "--config", cfg, "--json"]);
    assert_eq!(
        rotated(&r),
        (
            Some(2),
            Some(true),
            Some(true),
            Some(2),
            serde_json::json!([1])
        ),
        "{r}\n{}",
        node.logs()
    );
    assert_eq!(
        versions(&r["status"]),
        [(1, "retired".to_owned(), 0), (2, "newest".to_owned(), 2)],
        "{r}"
    );
    let v2 = s.dir.join("kek.key.2");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&v2)
            .expect("version 2")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert!(
        node.logs().contains("retired KEK version 1"),
        "{}",
        node.logs()
    );
    stop_gracefully(node);

    // Version 1 is gone: the node starts without it and still reads every object.
    std::fs::remove_file(s.dir.join("kek.key")).expect("remove version 1");
    let node = LoggedNode::spawn(&s);
    assert_eq!(queued_uids(), sent);
    let out = ok(&["keys", "status", "--config", cfg]);
    let rows = table(&out, &["VERSION", "STATE", "KEYS", "FILE"]);
    assert_eq!(rows.len(), 2, "{out}");
    assert_eq!(
        (
            rows[0]["STATE"].as_str(),
            rows[0]["FILE"].ends_with("(absent)")
        ),
        ("retired", true),
        "{out}"
    );
    assert_eq!(
        (
            rows[1]["VERSION"].as_str(),
            rows[1]["STATE"].as_str(),
            rows[1]["KEYS"].as_str()
        ),
        ("2", "newest", "2"),
        "{out}"
    );
    stop_gracefully(node);

    // On the stopped node, with version 3 put in place by hand.
    let v3 = s.dir.join("kek.key.3");
    ok(&["keys", "new-kek", "--out", v3.to_str().expect("utf-8")]);
    let r = json(&["keys", "rotate", "--config", cfg, "--json"]);
    assert_eq!(
        rotated(&r),
        (
            Some(3),
            Some(false),
            Some(false),
            Some(2),
            serde_json::json!([2])
        ),
        "{r}"
    );
    std::fs::remove_file(&v2).expect("remove version 2");
    let node = LoggedNode::spawn(&s);
    assert_eq!(queued_uids(), sent);
    // The next rotation numbers past every version ever used, not past the files left.
    let out = ok(&["keys", "rotate", "--config", cfg]);
    assert!(out.contains("KEK version 4: created"), "{out}");
    assert!(out.contains("retired KEK versions [3]"), "{out}");
    drop(node);

    // A start without the version that holds the keys is a configuration error.
    std::fs::rename(s.dir.join("kek.key.4"), s.dir.join("kek.key.4.away")).expect("move away");
    let o = s.serve();
    assert_config_error(&o, "KEK version 4");
}

/// `keys shred --study` (issue 11, crypto-shredding), through a running node and on a
/// stopped one: DCMTK's storescu sends three objects of one study and two of another; the
/// shred purges exactly the first study's entries and destroys its key (the stored keys go
/// from three to two, the index key included), the other study stays queued; on the stopped
/// node the second study goes the same way, and a second shred finds no key.
#[test]
fn keys_shred_purges_a_study_and_destroys_its_key_on_a_running_and_a_stopped_node() {
    let s = Site::new();
    let cfg = s.path();
    let cfg = cfg.to_str().expect("utf-8");
    let ok = |args: &[&str]| -> String {
        let o = run(args, &[]);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let json = |args: &[&str]| -> serde_json::Value {
        serde_json::from_str(&ok(args)).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    };
    let queued = || -> Vec<(String, String)> {
        let v = json(&["queue", "list", "--config", cfg, "--json"]);
        let mut u: Vec<(String, String)> = v
            .as_array()
            .expect("entries")
            .iter()
            .map(|e| {
                (
                    e["study_uid"].as_str().unwrap_or("").to_owned(),
                    e["sop_instance_uid"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect();
        u.sort_unstable();
        u
    };
    let stored_keys = || -> u64 {
        let v = json(&["keys", "status", "--config", cfg, "--json"]);
        v["versions"][0]["keys"].as_u64().unwrap_or(u64::MAX)
    };

    let node = LoggedNode::spawn(&s);
    let one = part10_files(&s.dir.join("one"), 3);
    let two = part10_files(&s.dir.join("two"), 2);
    let (host, port) = node.dicom.rsplit_once(':').expect("host:port");
    let o = Command::new("/usr/bin/storescu")
        .args(["-aet", "TEST_SCU", "-aec", "GW_A", host, port])
        .args(one.iter().chain(&two).map(|(p, _)| p))
        .output()
        .expect("storescu (DCMTK)");
    assert!(o.status.success(), "storescu: {}", stderr(&o));
    let all = queued();
    assert_eq!(all.len(), 5);
    let study_of = |uid: &str| -> String {
        all.iter()
            .find(|(_, i)| i == uid)
            .map(|(s, _)| s.clone())
            .expect("queued")
    };
    let (s1, s2) = (study_of(&one[0].1), study_of(&two[0].1));
    assert_ne!(s1, s2);
    assert_eq!(stored_keys(), 3, "two study keys and the index key");

    let r = json(&["keys", "shred", "--config", cfg, "--study", &s1, "--json"]);
    assert_eq!(
        (
            r["entries_purged"].as_u64(),
            r["key_shredded"].as_bool(),
            r["objects_left"].as_u64()
        ),
        (Some(3), Some(true), Some(0)),
        "{r}\n{}",
        node.logs()
    );
    let left = queued();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.iter().all(|(s, _)| *s == s2), "{left:?}");
    assert_eq!(stored_keys(), 2);
    stop_gracefully(node);

    // On the stopped node.
    let out = ok(&["keys", "shred", "--config", cfg, "--study", &s2]);
    assert!(
        out.contains("2 queue entries and 0 retained copies purged (node stopped)"),
        "{out}"
    );
    assert!(out.contains("its key is destroyed"), "{out}");
    let r = json(&["keys", "shred", "--config", cfg, "--study", &s2, "--json"]);
    assert_eq!(
        (r["entries_purged"].as_u64(), r["key_shredded"].as_bool()),
        (Some(0), Some(false)),
        "{r}"
    );
    assert_eq!(stored_keys(), 1, "only the index key is left");
    let node = LoggedNode::spawn(&s);
    assert!(queued().is_empty());
    drop(node);
}

/// `verify` through the running node and on the stopped one: the three objects DCMTK's
/// storescu sent are checked whole, and none fails (the spool's unit tests damage objects
/// and see them quarantined).
#[test]
fn verify_checks_every_object_through_the_running_node_and_on_the_stopped_one() {
    let s = Site::new();
    let cfg = s.path();
    let cfg = cfg.to_str().expect("utf-8");
    let node = LoggedNode::spawn(&s);
    let files = part10_files(&s.dir.join("send"), 3);
    let (host, port) = node.dicom.rsplit_once(':').expect("host:port");
    let o = Command::new("/usr/bin/storescu")
        .args(["-aet", "TEST_SCU", "-aec", "GW_A", host, port])
        .args(files.iter().map(|(p, _)| p))
        .output()
        .expect("storescu (DCMTK)");
    assert!(o.status.success(), "storescu: {}", stderr(&o));
    let verify = || -> serde_json::Value {
        let o = run(&["verify", "--config", cfg, "--json"], &[]);
        assert!(o.status.success(), "verify: {}", stderr(&o));
        serde_json::from_slice(&o.stdout).expect("JSON")
    };
    let v = verify();
    assert_eq!(
        (
            v["checked"].as_u64(),
            v["node_running"].as_bool(),
            v["failures"].clone()
        ),
        (Some(3), Some(true), serde_json::json!([])),
        "{v}"
    );
    assert!(v["bytes"].as_u64().is_some_and(|b| b > 3 * 4096), "{v}");
    stop_gracefully(node);
    let v = verify();
    assert_eq!(
        (v["checked"].as_u64(), v["node_running"].as_bool()),
        (Some(3), Some(false)),
        "{v}"
    );
    let o = run(&["verify", "--config", cfg], &[]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("every object is authentic and whole"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
}
