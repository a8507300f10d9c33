//! One running node: wiring config to spool, listeners, dispatchers and the admin endpoint.
//!
//! Start-up order: check the certificate against the node name, load the KEK, open the
//! spool (recovering interrupted ingests), start one dispatcher per destination, bind every
//! listener, and only then report ready. Shutdown runs the other way: stop accepting, let
//! in-flight objects finish, stop dispatchers, close the spool.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::config::{Config, DestinationKind};
use crate::deliver::{Sender, dicom::DicomSender, folder::FolderSender};
use crate::metrics::Metrics;
use crate::receive::DicomServer;
use crate::relay::{client::GatewaySender, server::LinkServer};
use crate::spool::{Spool, SpoolOptions};

/// A running node.
pub struct Node {
    /// Bound address of each DICOM listener, by name.
    pub dicom_addrs: HashMap<String, SocketAddr>,
    /// Bound address of each link listener, by name.
    pub link_addrs: HashMap<String, SocketAddr>,
    /// Bound address of the admin endpoint.
    pub http_addr: Option<SocketAddr>,
    /// The node's metrics.
    pub metrics: Arc<Metrics>,
    spool: Option<Spool>,
    listeners_stop: CancellationToken,
    workers_stop: CancellationToken,
    listener_tasks: TaskTracker,
    worker_tasks: TaskTracker,
}

async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for {what}"))
}

impl Node {
    /// Start a node from a validated config.
    pub async fn start(cfg: Config) -> Result<Node> {
        let file = cfg.file.display().to_string();
        if let Some(tls) = &cfg.tls {
            crate::tls::check_node_name(tls, &cfg.node.name)
                .with_context(|| format!("{file}: [tls] cert"))?;
        }
        let kek = keystore::Kek::load(&cfg.keystore.kek_file)
            .with_context(|| format!("{file}: keystore.kek_file"))?;
        let opts = SpoolOptions {
            segment_bytes: cfg.spool.segment_bytes,
            max_object_bytes: cfg.spool.max_object_bytes,
            dedup_window: Duration::from_secs(cfg.spool.dedup_window_secs),
        };
        let data_dir = cfg.node.data_dir.clone();
        let spool = tokio::task::spawn_blocking(move || Spool::open(&data_dir, kek, opts))
            .await?
            .with_context(|| {
                format!(
                    "{file}: cannot open the spool in node.data_dir {}",
                    cfg.node.data_dir.display()
                )
            })?;
        let metrics = Arc::new(Metrics::new());
        let client_tls = match &cfg.tls {
            Some(t) => Some(Arc::new(crate::tls::client_config(t)?)),
            None => None,
        };

        let listeners_stop = CancellationToken::new();
        let workers_stop = CancellationToken::new();
        let listener_tasks = TaskTracker::new();
        let worker_tasks = TaskTracker::new();

        for dest in &cfg.destination {
            let sender = match &dest.kind {
                DestinationKind::Gateway {
                    url,
                    peer_name,
                    max_in_flight,
                } => {
                    let tls = client_tls
                        .clone()
                        .context("a gateway destination needs [tls]")?;
                    let sender = GatewaySender::new(url, peer_name, tls, &cfg.node.name)
                        .map_err(anyhow::Error::msg)
                        .with_context(|| format!("{file}: destination[{}]", dest.name))?;
                    Sender::Gateway {
                        sender,
                        in_flight: *max_in_flight,
                    }
                }
                DestinationKind::Dicom {
                    address,
                    ae_title,
                    calling_ae_title,
                    associations,
                    max_pdu_length,
                    timeout_secs,
                } => Sender::Dicom(DicomSender::new(
                    address,
                    ae_title,
                    calling_ae_title,
                    *associations,
                    *max_pdu_length,
                    Duration::from_secs(*timeout_secs),
                )),
                DestinationKind::Folder { path } => {
                    Sender::Folder(FolderSender::new(path).with_context(|| {
                        format!("{file}: destination[{}].path {}", dest.name, path.display())
                    })?)
                }
            };
            worker_tasks.spawn(crate::dispatch::run(
                dest.clone(),
                Arc::new(sender),
                spool.clone(),
                metrics.clone(),
                workers_stop.clone(),
            ));
        }

        let mut dicom_addrs = HashMap::new();
        for l in &cfg.dicom_listener {
            let listener = bind(l.listen, &format!("dicom_listener[{}]", l.name)).await?;
            let addr = listener.local_addr()?;
            info!(listener = %l.name, %addr, ae_title = %l.ae_title, "DICOM listener up");
            dicom_addrs.insert(l.name.clone(), addr);
            let server = DicomServer::new(l.clone(), spool.clone(), metrics.clone());
            listener_tasks.spawn(server.run(listener, listeners_stop.clone()));
        }
        let mut link_addrs = HashMap::new();
        for l in &cfg.link_listener {
            let tls = cfg.tls.as_ref().context("a link listener needs [tls]")?;
            let server_tls = Arc::new(crate::tls::server_config(tls, &l.allowed_peers)?);
            let listener = bind(l.listen, &format!("link_listener[{}]", l.name)).await?;
            let addr = listener.local_addr()?;
            info!(listener = %l.name, %addr, peers = ?l.allowed_peers, "link listener up");
            link_addrs.insert(l.name.clone(), addr);
            let server = LinkServer::new(
                l.clone(),
                server_tls,
                spool.clone(),
                metrics.clone(),
                cfg.spool.max_object_bytes,
            )
            .reload_from(tls)?;
            listener_tasks.spawn(server.run(listener, listeners_stop.clone()));
        }
        let ready = Arc::new(AtomicBool::new(false));
        let mut http_addr = None;
        if let Some(h) = &cfg.http {
            let listener = bind(h.listen, "http").await?;
            let addr = listener.local_addr()?;
            info!(%addr, "admin HTTP up (/healthz, /readyz, /metrics)");
            http_addr = Some(addr);
            listener_tasks.spawn(crate::admin_http::run(
                listener,
                metrics.clone(),
                ready.clone(),
                listeners_stop.clone(),
            ));
        }
        ready.store(true, Ordering::SeqCst);
        info!(node = %cfg.node.name, "node ready");
        Ok(Node {
            dicom_addrs,
            link_addrs,
            http_addr,
            metrics,
            spool: Some(spool),
            listeners_stop,
            workers_stop,
            listener_tasks,
            worker_tasks,
        })
    }

    /// The node's spool (for inspection by tests and the demo).
    pub fn spool(&self) -> Option<&Spool> {
        self.spool.as_ref()
    }

    /// Stop in order and wait until the spool is closed.
    pub async fn stop(mut self) {
        self.listeners_stop.cancel();
        self.listener_tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(60), self.listener_tasks.wait()).await;
        self.workers_stop.cancel();
        self.worker_tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(60), self.worker_tasks.wait()).await;
        if let Some(spool) = self.spool.take() {
            // Wait for stray tasks (finished requests) to drop their handles, so the
            // database is closed when this returns and can be reopened at once.
            for _ in 0..200 {
                if spool.handles() <= 1 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            drop(spool);
        }
        info!("node stopped");
    }
}
