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
