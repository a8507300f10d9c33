//! The two-site fixture: site A (DICOM in → gateway B) and site B (link in → the PACS),
//! in one temporary folder, with the PKI, KEKs and configs of
//! [`dicom_gateway::twosite`] (the layout `dicom-gateway demo` uses too).
//!
//! Ports are held, never guessed. Every node listener in the configs says port 0, so each
//! port belongs to its node from the moment the node binds it, and the fixture reads the
//! bound addresses from the started [`Node`] (`dicom_addrs`, `link_addrs`, `http_addr`).
//! Site B starts first; site A's config is written after it, naming the link address B
//! bound.
//!
//! The one port named again is B's link port, because A's config names it: after B's first
//! start, `site-b.toml` is rewritten with the port B got, so that every restart of B binds
//! that same port explicitly. Between B's stop and its restart another process could take
//! the port (the kernel may hand it to any `bind(0)` or outgoing connection meanwhile), so
//! while B is stopped by [`TwoSites::stop_b`] the fixture holds the port with a socket that
//! is bound but not listening (A's connections are refused, as by a stopped node) and
//! lets go of it just before B binds again. A restart that still finds it in use tries
//! again a few times, and then fails the test with that reason. A node that fails to start has started no task and closed its spool, so the
//! next try can open it again.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use dicom_gateway::config::Config;
use dicom_gateway::node::Node;
use dicom_gateway::twosite::{self, Delivery, SiteA, SiteB};

use crate::objects::eventually;
use crate::storescp::Storescp;

/// Bind `port` on loopback without listening, so that no `bind(0)` or outgoing connection
/// gets it; `None` if something already has it (the restart's retries deal with that).
fn hold_port(port: u16) -> Option<tokio::net::TcpSocket> {
    let s = tokio::net::TcpSocket::new_v4().ok()?;
    s.bind(SocketAddr::from(([127, 0, 0, 1], port))).ok()?;
    Some(s)
}

/// Tries of a restart of site B whose link port is in use, 200 ms apart.
const RESTART_ATTEMPTS: usize = 10;

/// Two sites, A (DICOM in → gateway B) and B (link in → DICOM out), in one temp folder.
pub struct TwoSites {
    /// The work folder.
    pub dir: tempfile::TempDir,
    /// Site A, while running.
    pub a: Option<Node>,
    /// Site B, while running.
    pub b: Option<Node>,
    /// Site B's link port: the one it bound at its first start, kept across restarts.
    pub link_port: u16,
    /// Start site B with its spool's fault-injection points live (`fail::cfg` drives them;
    /// no other node of the test process is affected).
    pub b_failpoints: bool,
    /// B's link port while B is stopped: bound, not listening.
    b_port_hold: Option<tokio::net::TcpSocket>,
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
    /// Extra lines of B's PACS `[[destination]]` (e.g. `order = "study"`).
    pub b_destination_extra: String,
    /// Extra lines of A's `site-b` `[[destination]]` (e.g. `max_queue = 5`).
    pub a_destination_extra: String,
}

impl SiteOptions {
    /// B's default retry budget in tests: fast retries, the default attempt budget.
    pub const B_RETRY: &'static str = r#"initial = "100ms", max_delay = "1s""#;
}

/// `[spool]` of both sites in tests: a watermark the disk-full tests can reach.
const MIN_FREE: &str = r#"min_free = "64MiB""#;

impl TwoSites {
    /// Make the PKI, KEKs and configs, then start B and A.
    pub async fn start(opts: SiteOptions) -> TwoSites {
        crate::logs::init_logging();
        let dir = tempfile::tempdir().expect("temp dir");
        twosite::init(dir.path()).expect("PKI and KEKs");
        let mut site_b = SiteB {
            spool: MIN_FREE.to_owned(),
            destination_extra: opts.b_destination_extra,
            ..SiteB::new(Delivery::Dicom {
                address: SocketAddr::from(([127, 0, 0, 1], opts.pacs_port)),
                ae_title: "STORESCP".to_owned(),
                retry: opts.b_retry,
            })
        };
        let mut sites = TwoSites {
            dir,
            a: None,
            b: None,
            link_port: 0,
            b_failpoints: false,
            b_port_hold: None,
        };
        twosite::write(&sites.config_path("b"), &site_b.toml()).expect("write config b");
        sites.start_b().await;
        let link = sites.b.as_ref().expect("site b running").link_addrs[twosite::B_LISTENER];
        sites.link_port = link.port();
        // Restarts of B bind the port A's config names.
        site_b.link_listen = link;
        twosite::write(&sites.config_path("b"), &site_b.toml()).expect("write config b");
        let site_a = SiteA {
            spool: format!("{MIN_FREE}\n{}", opts.a_spool),
            listener_extra: opts.a_listener_extra,
            destination_extra: format!(
                "retry_initial_ms = 100\nretry_max_ms = 1000\n{}",
                opts.a_destination_extra
            ),
            ..SiteA::new(link)
        };
        twosite::write(&sites.config_path("a"), &site_a.toml()).expect("write config a");
        let cfg = Config::load(&sites.config_path("a")).expect("config a");
        sites.a = Some(Node::start(cfg).await.expect("start a"));
        sites
    }

    /// A site's config file (`"a"` or `"b"`).
    fn config_path(&self, site: &str) -> PathBuf {
        self.dir.path().join(match site {
            "a" => twosite::A_CONFIG,
            _ => twosite::B_CONFIG,
        })
    }

    /// (Re)start site B from its config. A restart binds B's link port again; if another
    /// process holds it, it is tried again a few times (see the module docs).
    pub async fn start_b(&mut self) {
        assert!(self.b.is_none());
        let mut attempt = 1;
        loop {
            let cfg = Config::load(&self.config_path("b")).expect("config b");
            let opts = dicom_gateway::spool::SpoolOptions {
                failpoints: self.b_failpoints,
                ..Node::spool_options(&cfg)
            };
            // Let go of the port just before B binds it.
            drop(self.b_port_hold.take());
            match Node::start_with(cfg, opts).await {
                Ok(node) => {
                    self.b = Some(node);
                    return;
                }
                Err(e) if attempt < RESTART_ATTEMPTS && addr_in_use(&e) => {
                    eprintln!(
                        "site B: link port {} in use ({e:#}); try {attempt} of {RESTART_ATTEMPTS}",
                        self.link_port
                    );
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("start b: {e:?}"),
            }
        }
    }

    /// Stop site A and start it again from its config and data folder.
    pub async fn restart_a(&mut self) {
        if let Some(a) = self.a.take() {
            a.stop().await;
        }
        let cfg = Config::load(&self.config_path("a")).expect("config a");
        self.a = Some(Node::start(cfg).await.expect("restart a"));
    }

    /// Stop site B and wait until its spool is closed.
    pub async fn stop_b(&mut self) {
        if let Some(b) = self.b.take() {
            b.stop().await;
            self.b_port_hold = hold_port(self.link_port);
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
        self.a.as_ref().expect("site a running").dicom_addrs[twosite::A_LISTENER]
    }

    /// A node's data folder.
    pub fn data_dir(&self, site: &str) -> PathBuf {
        self.dir.path().join(format!("data-{site}"))
    }

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

    /// Wait until neither site holds an object (each one confirmed by its next hop; both
    /// sites running). After that nothing more can reach the PACS, and every file the PACS
    /// wrote is whole: storescp answers after closing its file, and B forgets an object only
    /// after that answer. This replaces "wait a moment for late duplicates".
    pub async fn settled(&self, timeout: Duration) -> bool {
        let (a, b) = (self.a_spool(), self.b_spool());
        eventually(timeout, || {
            a.object_count_blocking().is_ok_and(|n| n == 0)
                && b.object_count_blocking().is_ok_and(|n| n == 0)
        })
        .await
    }
}

/// True if a start failed because an address was in use.
fn addr_in_use(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::AddrInUse)
    })
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
            b_destination_extra: String::new(),
            a_destination_extra: String::new(),
        })
        .await;
        Fixture { tmp, pacs, sites }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A restart of site B binds the link port it got first, and waits out another process
    /// holding it for a moment (the failed tries leave its spool closed for the next one).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn site_b_restarts_on_its_link_port_after_it_was_taken_for_a_moment() {
        // Between B's stop and the fixture's hold, another test of this process may take
        // the port (a test here picks ports and listens on them): then the hold could not
        // be taken, which this test cannot examine, so it starts over on another port.
        let mut tries = 0;
        let (mut sites, port) = loop {
            tries += 1;
            let mut sites = TwoSites::start(SiteOptions {
                pacs_port: 9,
                a_listener_extra: String::new(),
                a_spool: String::new(),
                b_retry: SiteOptions::B_RETRY.to_owned(),
                b_destination_extra: String::new(),
                a_destination_extra: String::new(),
            })
            .await;
            let port = sites.link_port;
            assert_ne!(port, 0);
            let a_cfg = std::fs::read_to_string(sites.config_path("a")).unwrap();
            assert!(a_cfg.contains(&format!("url = \"https://127.0.0.1:{port}\"")));
            sites.stop_b().await;
            if sites.b_port_hold.is_some() {
                break (sites, port);
            }
            assert!(
                tries < 5,
                "B's port was taken before the fixture could hold it, 5 times"
            );
            eprintln!("port {port} was taken between B's stop and the hold; starting over");
            sites.stop().await;
        };
        // While B is down the fixture holds its port: nothing else can bind it...
        assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_err());
        // ...and A's connections are refused, as by a stopped node.
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
        // Another process holding it anyway (taken before the fixture could) for a moment.
        drop(sites.b_port_hold.take());
        let holder = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(700));
            drop(holder);
        });
        sites.start_b().await;
        release.join().unwrap();
        let b = sites.b.as_ref().unwrap();
        assert_eq!(b.link_addrs[twosite::B_LISTENER].port(), port);
        sites.stop().await;
    }
}
