//! The two-site layout that `dicom-gateway demo` and the end-to-end tests share: one work
//! folder, site A (DICOM listener `lan` → gateway destination `site-b`) and site B (link
//! listener `wan`, peer `site-a` → one destination), and the config text of each site.
//!
//! This module owns the layout, so that the demo and the test kit
//! (`tests/testkit`, package `dicom-gateway-testkit`) cannot drift apart:
//! - [`init`] makes `pki/` (a CA and the certificates of `site-a` and `site-b`),
//!   `kek-a.key` and `kek-b.key`;
//! - [`SiteA::toml`] and [`SiteB::toml`] write the configs, `site-a.toml` and
//!   `site-b.toml` ([`A_CONFIG`], [`B_CONFIG`]); every path in them is relative to the work
//!   folder (the config's own folder), and each site keeps its spool in `data-a` or
//!   `data-b`.
//!
//! Invariants:
//! - listen addresses are loopback; the defaults are port 0, so the kernel picks a port
//!   and the caller reads the bound one from the started [`crate::node::Node`]
//!   (`dicom_addrs`, `link_addrs`, `http_addr`): nothing guesses a free port;
//! - site A's destination names site B's link address, so site B starts first;
//! - the fixed lines are the same for every caller; callers add only the documented
//!   extras (TOML text appended to a table, whose keys they own).

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, Result};

/// Site A's config file, in the work folder.
pub const A_CONFIG: &str = "site-a.toml";
/// Site B's config file, in the work folder.
pub const B_CONFIG: &str = "site-b.toml";
/// Site A's DICOM listener.
pub const A_LISTENER: &str = "lan";
/// Site A's called AE title.
pub const A_AE_TITLE: &str = "GW_A";
/// Site B's link listener.
pub const B_LISTENER: &str = "wan";
/// The calling AE title of site B towards its PACS ([`Delivery::Dicom`]).
pub const B_CALLING_AE_TITLE: &str = "GW_B";

/// A loopback address with port 0: the kernel picks the port when the node binds.
pub fn any_loopback_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Make the development PKI (`pki/`) and both KEKs (`kek-a.key`, `kek-b.key`) in `dir`.
pub fn init(dir: &Path) -> Result<()> {
    crate::pki::init(
        &dir.join("pki"),
        &["site-a".to_owned(), "site-b".to_owned()],
    )?;
    keystore::Kek::generate_file(&dir.join("kek-a.key"))?;
    keystore::Kek::generate_file(&dir.join("kek-b.key"))?;
    Ok(())
}

/// Write a config text to `path`.
pub fn write(path: &Path, toml: &str) -> Result<()> {
    std::fs::write(path, toml).with_context(|| format!("cannot write {}", path.display()))
}

/// Where site B delivers what it receives over the link.
#[derive(Debug, Clone)]
pub enum Delivery {
    /// A hand-off folder (the demo): destination `handoff`, kind `folder`.
    Folder {
        /// The folder, relative to the work folder.
        path: String,
    },
    /// A DICOM SCP (the tests' PACS): destination `pacs`, kind `dicom`, calling AE title
    /// [`B_CALLING_AE_TITLE`].
    Dicom {
        /// The SCP's address.
        address: SocketAddr,
        /// The SCP's AE title.
        ae_title: String,
        /// `[destination.retry]` as the content of an inline table, e.g.
        /// `initial = "100ms", max_delay = "1s"`.
        retry: String,
    },
}

impl Delivery {
    /// The destination's name (what the link listener routes to).
    pub fn name(&self) -> &'static str {
        match self {
            Delivery::Folder { .. } => "handoff",
            Delivery::Dicom { .. } => "pacs",
        }
    }
}

/// Site B: link listener [`B_LISTENER`] (peer `site-a`) → one [`Delivery`].
#[derive(Debug, Clone)]
pub struct SiteB {
    /// The link listener's address; port 0 lets the kernel pick (a restart names the port
    /// it got, since site A's config names it).
    pub link_listen: SocketAddr,
    /// The admin HTTP address.
    pub http_listen: SocketAddr,
    /// The lines of a `[spool]` section; no section when empty.
    pub spool: String,
    /// Extra lines of B's `[[destination]]` table (e.g. `order = "study"`).
    pub destination_extra: String,
    /// Where B delivers.
    pub delivery: Delivery,
}

impl SiteB {
    /// Site B on loopback ports the kernel picks, delivering to `delivery`.
    pub fn new(delivery: Delivery) -> SiteB {
        SiteB {
            link_listen: any_loopback_port(),
            http_listen: any_loopback_port(),
            spool: String::new(),
            destination_extra: String::new(),
            delivery,
        }
    }

    /// The config text.
    pub fn toml(&self) -> String {
        let link = self.link_listen;
        let http = self.http_listen;
        let spool = spool_section(&self.spool);
        let dest = self.delivery.name();
        let extra = lines(&self.destination_extra);
        let delivery = match &self.delivery {
            Delivery::Folder { path } => format!("kind = \"folder\"\npath = \"{path}\"\n"),
            Delivery::Dicom {
                address,
                ae_title,
                retry,
            } => format!(
                "kind = \"dicom\"\naddress = \"{address}\"\nae_title = \"{ae_title}\"\n\
                 calling_ae_title = \"{B_CALLING_AE_TITLE}\"\nretry = {{ {retry} }}\n"
            ),
        };
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
listen = "{http}"
{spool}[[link_listener]]
name = "{B_LISTENER}"
listen = "{link}"
allowed_peers = ["site-a"]
route_to = ["{dest}"]
[[destination]]
name = "{dest}"
{delivery}{extra}"#
        )
    }
}

/// Site A: DICOM listener [`A_LISTENER`] (AE title [`A_AE_TITLE`]) → gateway destination
/// `site-b` at site B's link address.
#[derive(Debug, Clone)]
pub struct SiteA {
    /// Site B's link listener, as bound (the destination's URL is `https://{link}`).
    pub link: SocketAddr,
    /// The DICOM listener's address.
    pub dicom_listen: SocketAddr,
    /// The admin HTTP address.
    pub http_listen: SocketAddr,
    /// The lines of a `[spool]` section; no section when empty.
    pub spool: String,
    /// Lines appended to the `[[dicom_listener]]` table.
    pub listener_extra: String,
    /// Lines appended to the `site-b` `[[destination]]` table.
    pub destination_extra: String,
}

impl SiteA {
    /// Site A on loopback ports the kernel picks, sending to site B at `link`.
    pub fn new(link: SocketAddr) -> SiteA {
        SiteA {
            link,
            dicom_listen: any_loopback_port(),
            http_listen: any_loopback_port(),
            spool: String::new(),
            listener_extra: String::new(),
            destination_extra: String::new(),
        }
    }

    /// The config text.
    pub fn toml(&self) -> String {
        let link = self.link;
        let dicom = self.dicom_listen;
        let http = self.http_listen;
        let spool = spool_section(&self.spool);
        let listener_extra = lines(&self.listener_extra);
        let destination_extra = lines(&self.destination_extra);
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
listen = "{http}"
{spool}[[dicom_listener]]
name = "{A_LISTENER}"
listen = "{dicom}"
ae_title = "{A_AE_TITLE}"
route_to = ["site-b"]
{listener_extra}[[destination]]
name = "site-b"
kind = "gateway"
url = "https://{link}"
peer_name = "site-b"
{destination_extra}"#
        )
    }
}

/// `text` as whole lines: empty stays empty, otherwise it ends with a newline.
fn lines(text: &str) -> String {
    if text.trim().is_empty() {
        String::new()
    } else if text.ends_with('\n') {
        text.to_owned()
    } else {
        format!("{text}\n")
    }
}

fn spool_section(body: &str) -> String {
    let body = lines(body);
    if body.is_empty() {
        body
    } else {
        format!("[spool]\n{body}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(dir: &Path, name: &str, text: &str) -> crate::config::Config {
        let path = dir.join(name);
        write(&path, text).unwrap();
        crate::config::Config::load(&path).unwrap()
    }

    /// Both layouts load, and say what they were asked to.
    #[test]
    fn both_sites_load_with_the_extras_they_were_given() {
        let tmp = tempfile::tempdir().unwrap();
        init(tmp.path()).unwrap();
        let b = SiteB {
            spool: "min_free = \"64MiB\"".into(),
            ..SiteB::new(Delivery::Dicom {
                address: "127.0.0.1:4242".parse().unwrap(),
                ae_title: "STORESCP".into(),
                retry: r#"initial = "100ms", max_delay = "1s", max_attempts = 3"#.into(),
            })
        };
        let cfg = load(tmp.path(), B_CONFIG, &b.toml());
        assert_eq!(cfg.spool.min_free.as_u64(), 64 << 20);
        assert_eq!(cfg.link_listener[0].listen, any_loopback_port());
        assert_eq!(cfg.destination[0].name, "pacs");
        assert_eq!(cfg.destination[0].retry.max_attempts, 3);
        assert_eq!(cfg.destination[0].retry.initial.as_millis(), 100);

        let folder = SiteB::new(Delivery::Folder {
            path: "received".into(),
        });
        let cfg = load(tmp.path(), B_CONFIG, &folder.toml());
        assert_eq!(cfg.destination[0].name, "handoff");
        assert!(!folder.toml().contains("[spool]"));

        let a = SiteA {
            spool: "min_free = \"64MiB\"\nretention = \"1h\"".into(),
            listener_extra: "strict_uid_match = true".into(),
            destination_extra: "retry_initial_ms = 100\nretry_max_ms = 1000".into(),
            ..SiteA::new("127.0.0.1:4343".parse().unwrap())
        };
        let cfg = load(tmp.path(), A_CONFIG, &a.toml());
        assert!(cfg.dicom_listener[0].strict_uid_match);
        assert_eq!(cfg.destination[0].retry.max_delay.as_millis(), 1000);
        assert!(!cfg.spool.retention.is_zero());
        assert!(a.toml().contains("url = \"https://127.0.0.1:4343\""));
    }
}
