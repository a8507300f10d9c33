//! The binary's logs as an operator sees them: `serve` with stderr to a pipe (never a
//! terminal here), in text and JSON format, with a real DICOM peer (DCMTK's `echoscu`)
//! opening an association.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_dicom-gateway");
const ECHOSCU: &str = "/usr/bin/echoscu";

/// A running `serve` whose stderr lines arrive on a channel.
struct Served {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Served {
    fn start(dir: &Path, config_extra: &str, args: &[&str]) -> Served {
        let kek = dir.join("kek.key");
        if !kek.exists() {
            let st = Command::new(BIN)
                .args(["keys", "new-kek", "--out"])
                .arg(&kek)
                .stdout(Stdio::null())
                .status()
                .unwrap();
            assert!(st.success());
        }
        let cfg = dir.join("node.toml");
        std::fs::write(
            &cfg,
            format!(
                r#"
[node]
name = "logtest"
data_dir = "data"
[keystore]
kek_file = "kek.key"
[[dicom_listener]]
name = "lan"
listen = "127.0.0.1:0"
ae_title = "GW_LOG"
route_to = ["out"]
[[destination]]
name = "out"
kind = "folder"
path = "out"
{config_extra}
"#
            ),
        )
        .unwrap();
        let mut child = Command::new(BIN)
            .args(args)
            .arg("serve")
            .arg("--config")
            .arg(&cfg)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Served {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The first line (from now on) containing `needle`, within 30 s.
    fn wait_line(&mut self, needle: &str) -> String {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(30)) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(needle) {
                        return l;
                    }
                }
                Err(_) => panic!("no line with {needle:?}; got:\n{}", self.seen.join("\n")),
            }
        }
    }

    fn stop(mut self) -> Vec<String> {
        let pid = rustix::process::Pid::from_child(&self.child);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let _ = self.child.wait();
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(l);
        }
        self.seen
    }
}

/// The port in `addr=127.0.0.1:PORT` (text) or `"addr":"127.0.0.1:PORT"` (JSON).
fn port_in(line: &str) -> u16 {
    let at = line.find("127.0.0.1:").expect("an address") + "127.0.0.1:".len();
    line[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap()
}

fn echo(port: u16) {
    let st = Command::new(ECHOSCU)
        .args(["-aec", "GW_LOG", "-aet", "LOGTEST_SCU", "127.0.0.1"])
        .arg(port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("DCMTK echoscu (apt-get install dcmtk)");
    assert!(st.success(), "C-ECHO failed");
}

#[test]
fn text_logs_to_a_pipe_have_no_ansi_and_one_line_per_association() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Served::start(dir.path(), "", &[]);
    let up = s.wait_line("DICOM listener up");
    s.wait_line("node ready");
    echo(port_in(&up));
    let line = s.wait_line("association ended");
    assert!(line.contains("listener=lan"), "{line}");
    assert!(line.contains("calling_ae=LOGTEST_SCU"), "{line}");
    assert!(
        line.contains("objects=0") && line.contains("duration_ms="),
        "{line}"
    );
    assert!(line.contains(" INFO "), "{line}");
    let all = s.stop();
    assert!(all.len() >= 4, "{all:?}");
    for l in &all {
        assert!(
            !l.contains('\x1b'),
            "ANSI escape in a log line to a pipe: {l:?}"
        );
    }
    assert_eq!(
        all.iter()
            .filter(|l| l.contains("association ended"))
            .count(),
        1,
        "{all:?}"
    );
}

#[test]
fn json_logs_from_config_or_flag_are_one_object_per_line() {
    for (extra, args) in [
        ("[log]\nformat = \"json\"\n", &[][..]),
        ("[log]\nformat = \"text\"\n", &["--log-format", "json"][..]),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Served::start(dir.path(), extra, args);
        let up = s.wait_line("DICOM listener up");
        s.wait_line("node ready");
        echo(port_in(&up));
        let line = s.wait_line("association ended");
        for field in [
            "\"level\":\"INFO\"",
            "\"message\":\"association ended\"",
            "\"listener\":\"lan\"",
            "\"objects\":0",
            "\"duration_ms\":",
        ] {
            assert!(line.contains(field), "{field} missing in {line}");
        }
        let all = s.stop();
        for l in &all {
            assert!(
                l.starts_with('{') && l.ends_with('}'),
                "not a JSON object: {l}"
            );
            assert!(!l.contains('\x1b'), "{l:?}");
        }
    }
}

#[test]
fn an_unknown_log_format_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let s = Served::start(dir.path(), "[log]\nformat = \"xml\"\n", &[]);
    let mut child = s.child;
    let status = child.wait().unwrap();
    // EX_CONFIG, like every configuration error.
    assert_eq!(status.code(), Some(78));
}
