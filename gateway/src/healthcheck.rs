//! `dicom-gateway healthcheck`: a probe of the admin endpoint for container runtimes that
//! run a command (Docker's `HEALTHCHECK`); the runtime image has no shell and no curl.
//!
//! Invariants: one plain HTTP/1.1 GET to a loopback or configured address, every step
//! under one deadline, at most 4 KiB read; success only on status 200.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs as _};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

/// GET `url` (`http://host:port/path`) and succeed only on a 200, within `timeout`.
pub fn probe(url: &str, timeout: Duration) -> Result<()> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("{url:?}: expected http://host:port/path"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let deadline = Instant::now() + timeout;
    let addr: SocketAddr = authority
        .to_socket_addrs()
        .with_context(|| format!("{url:?}: bad address"))?
        .next()
        .with_context(|| format!("{url:?}: no address"))?;
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    let mut s = TcpStream::connect_timeout(&addr, left())
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_nodelay(true)?;
    s.set_write_timeout(Some(left()))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = [0u8; 4096];
    let mut n = 0;
    while n < buf.len() && !buf[..n].windows(2).any(|w| w == b"\r\n") {
        s.set_read_timeout(Some(left()))?;
        let r = s.read(&mut buf[n..]).context("reading the response")?;
        if r == 0 {
            break;
        }
        n += r;
    }
    let line = String::from_utf8_lossy(&buf[..n]);
    let status = line.lines().next().unwrap_or("");
    match status.split_whitespace().nth(1) {
        Some("200") => Ok(()),
        _ => bail!("{url}: {status:?}"),
    }
}
