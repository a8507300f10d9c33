//! One running node: wiring config to spool, listeners, dispatchers and the admin endpoints.
//!
//! Start-up order: check the certificate against the node name, load the KEK, open the
//! spool (recovering interrupted ingests and orphan segments), make every destination's
//! sender, bind every listener and the admin socket, then start one dispatcher per
//! destination and the servers, and only then report ready. Nothing is started before the
//! last step that can fail, so a start that fails (a port taken, say) leaves no task
//! behind and closes the spool before it returns its error.
//!
//! Shutdown ([`Node::stop`]) runs the other way, in phases:
//! 1. readiness goes false (`/readyz` answers 503 "draining");
//! 2. the DICOM and link listeners and the admin socket stop accepting and close their
//!    sockets, so new connections are refused (the admin HTTP endpoint stays up, answering
//!    `/readyz` 503 and `/metrics`, until phase 3); associations and link requests in
//!    flight get their grace
//!    (an association finishes its current object, a link connection drains for up to
//!    30 s);
//! 3. dispatchers start nothing new; in-flight sends get [`crate::dispatch::SHUTDOWN_GRACE`]
//!    (10 s) and are then abandoned (their objects stay queued);
//! 4. commit and cleanup tasks of the spool finish;
//! 5. RocksDB is flushed and closed.
//!
//! Every task the node starts belongs to one of its [`TaskTracker`]s, so `stop` waits on the
//! trackers, never on reference counts.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::admin_http::Readiness;
use crate::config::Config;
use crate::deliver::Sender;
use crate::dispatch::Board;
use crate::metrics::Metrics;
use crate::receive::DicomServer;
use crate::relay::server::LinkServer;
use crate::spool::{Spool, SpoolOptions};

/// A running node.
pub struct Node {
    /// Bound address of each DICOM listener, by name.
    pub dicom_addrs: HashMap<String, SocketAddr>,
    /// Bound address of each link listener, by name.
    pub link_addrs: HashMap<String, SocketAddr>,
    /// Bound address of each HL7 listener, by name.
    pub hl7_addrs: HashMap<String, SocketAddr>,
    /// Bound address of the admin endpoint.
    pub http_addr: Option<SocketAddr>,
    /// The node's metrics.
    pub metrics: Arc<Metrics>,
    /// The dispatchers' published state (what `status` shows).
    pub board: Board,
    /// The admin socket.
    pub admin_socket: PathBuf,
    /// Readiness, shared with `/readyz` and the admin socket.
    pub readiness: Arc<Readiness>,
    spool: Option<Spool>,
    /// Stops the listeners (DICOM, link, admin HTTP and socket).
    listeners_stop: CancellationToken,
    /// Stops the dispatchers.
    workers_stop: CancellationToken,
    /// Listener tasks and every connection task they start.
    listener_tasks: TaskTracker,
    /// Dispatchers.
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
        let opts = Self::spool_options(&cfg);
        Self::start_with(cfg, opts).await
    }

    /// The spool options `cfg` asks for.
    pub fn spool_options(cfg: &Config) -> SpoolOptions {
        SpoolOptions {
            segment_bytes: cfg.spool.segment_bytes,
            max_object_bytes: cfg.spool.max_object_bytes,
            dedup_window: Duration::from_secs(cfg.spool.dedup_window_secs),
            min_free: cfg.spool.min_free.as_u64(),
            retention: cfg.spool.retention,
            ..SpoolOptions::default()
        }
    }

    /// Start a node with explicit spool options (tests use this for fault injection).
    pub async fn start_with(cfg: Config, opts: SpoolOptions) -> Result<Node> {
        let file = cfg.file.display().to_string();
        if let Some(tls) = &cfg.tls {
            crate::tls::check_node_name(tls, &cfg.node.name)
                .with_context(|| format!("{file}: [tls] cert"))?;
        }
        let kek = keystore::KekRing::load(&cfg.keystore.kek_file)
            .with_context(|| format!("{file}: keystore.kek_file"))?;
        let data_dir = cfg.node.data_dir.clone();
        let spool = tokio::task::spawn_blocking(move || Spool::open_blocking(&data_dir, kek, opts))
            .await?
            .with_context(|| {
                format!(
                    "{file}: cannot open the spool in node.data_dir {}",
                    cfg.node.data_dir.display()
                )
            })?;
        let metrics = Arc::new(Metrics::new());
        crate::observe::install(&metrics, &cfg, &spool).with_context(|| file.clone())?;
        // The client config towards peer gateways, reloaded when its files change (the
        // reloader's task starts with the others below).
        let (client_reloader, client_tls) = match &cfg.tls {
            Some(t) => {
                let (r, rx) = crate::tls::ClientConfigReloader::client(t)?;
                (Some(r), Some(rx))
            }
            None => (None, None),
        };

        // Everything that can fail comes first and starts nothing: the senders, every
        // listener bound, the admin socket. A start that fails leaves no task behind, so the
        // spool closes when it returns (and the same config can be started again).
        let mut senders = Vec::new();
        for dest in &cfg.destination {
            let sender = Sender::from_config(dest, &cfg.node.name, client_tls.as_ref())
                .with_context(|| format!("{file}: destination[{}]", dest.name))?;
            senders.push((dest.clone(), Arc::new(sender)));
        }
        let router = crate::routing::Router::from_config(&cfg);
        let mut dicom_addrs = HashMap::new();
        let mut dicom_servers = Vec::new();
        for l in &cfg.dicom_listener {
            let listener = bind(l.listen, &format!("dicom_listener[{}]", l.name)).await?;
            let addr = listener.local_addr()?;
            dicom_addrs.insert(l.name.clone(), addr);
            let server = DicomServer::new(l.clone(), spool.clone(), metrics.clone())
                .with_router(router.clone())
                .with_tls()
                .with_context(|| format!("{file}: dicom_listener[{}].tls", l.name))?;
            dicom_servers.push((l, addr, listener, server));
        }
        let mut link_addrs = HashMap::new();
        let mut link_servers = Vec::new();
        for l in &cfg.link_listener {
            let tls = cfg.tls.as_ref().context("a link listener needs [tls]")?;
            let server_tls = Arc::new(crate::tls::server_config(tls, &l.allowed_peers)?);
            let listener = bind(l.listen, &format!("link_listener[{}]", l.name)).await?;
            let addr = listener.local_addr()?;
            link_addrs.insert(l.name.clone(), addr);
            let server = LinkServer::new(
                l.clone(),
                server_tls,
                spool.clone(),
                metrics.clone(),
                cfg.spool.max_object_bytes,
            )
            .reload_from(tls)?
            .with_router(router.clone())
            .with_protocols(&cfg);
            link_servers.push((l, addr, listener, server));
        }
        let mut hl7_addrs = HashMap::new();
        let mut hl7_servers = Vec::new();
        for l in &cfg.hl7_listener {
            let listener = bind(l.listen, &format!("hl7_listener[{}]", l.name)).await?;
            let addr = listener.local_addr()?;
            hl7_addrs.insert(l.name.clone(), addr);
            let server =
                crate::hl7::listener::Hl7Server::new(l.clone(), spool.clone(), metrics.clone());
            hl7_servers.push((l, addr, listener, server));
        }
        let mut http = None;
        if let Some(h) = &cfg.http {
            let listener = bind(h.listen, "http").await?;
            http = Some((listener.local_addr()?, listener));
        }
        let http_addr = http.as_ref().map(|(addr, _)| *addr);
        let admin_socket = crate::admin::socket_path(&cfg.node.data_dir);
        let admin = crate::admin::bind(&admin_socket)?;

        // Then the tasks: dispatchers, the spool's housekeeping, and the servers.
        let listeners_stop = CancellationToken::new();
        let workers_stop = CancellationToken::new();
        let listener_tasks = TaskTracker::new();
        let worker_tasks = TaskTracker::new();
        let board = Board::default();
        for (dest, sender) in senders {
            if let Some(r) = sender.take_tls_reloader() {
                worker_tasks.spawn(crate::tls::reload(
                    r,
                    dest.name.clone(),
                    metrics.clone(),
                    workers_stop.clone(),
                ));
            }
            worker_tasks.spawn(crate::dispatch::run(
                dest,
                sender,
                spool.clone(),
                metrics.clone(),
                board.clone(),
                workers_stop.clone(),
            ));
        }
        let readiness = Arc::new(Readiness::default());
        worker_tasks.spawn(watch_disk(spool.clone(), workers_stop.clone()));
        if !cfg.spool.retention.is_zero() {
            worker_tasks.spawn(expire_retained(spool.clone(), workers_stop.clone()));
        }
        worker_tasks.spawn(expire_dedup(spool.clone(), workers_stop.clone()));
        worker_tasks.spawn(shred_unused_keys(spool.clone(), workers_stop.clone()));
        let rotation = Arc::new(crate::rotation::Rotation::new(
            spool.clone(),
            cfg.node.data_dir.clone(),
            cfg.keystore.kek_file.clone(),
            cfg.keystore.retire_old_versions,
        ));
        worker_tasks.spawn(rotation.clone().run(workers_stop.clone()));
        // Only gateway destinations use the client config; a node without one has nothing
        // to reload on that side.
        if let Some(r) = client_reloader.filter(|_| {
            cfg.destination
                .iter()
                .any(|d| matches!(d.kind, crate::config::DestinationKind::Gateway { .. }))
        }) {
            worker_tasks.spawn(crate::tls::reload(
                r,
                "sender".to_owned(),
                metrics.clone(),
                workers_stop.clone(),
            ));
        }

        for (l, addr, listener, server) in dicom_servers {
            info!(listener = %l.name, %addr, ae_title = %l.ae_title, "DICOM listener up");
            listener_tasks.spawn(server.run(listener, listeners_stop.clone()));
        }
        for (l, addr, listener, server) in link_servers {
            info!(listener = %l.name, %addr, peers = ?l.allowed_peers, "link listener up");
            listener_tasks.spawn(server.run(listener, listeners_stop.clone()));
        }
        for (l, addr, listener, server) in hl7_servers {
            info!(listener = %l.name, %addr, "HL7 listener up");
            listener_tasks.spawn(server.run(listener, listeners_stop.clone()));
        }
        if let Some((addr, listener)) = http {
            info!(%addr, "admin HTTP up (/healthz, /readyz, /metrics)");
            // With the workers, not the listeners: through the drain, /readyz answers 503
            // "draining" (rather than refusing connections) and /metrics stays scrapeable.
            worker_tasks.spawn(crate::admin_http::run(
                listener,
                metrics.clone(),
                readiness.clone(),
                spool.clone(),
                worker_tasks.clone(),
                workers_stop.clone(),
            ));
        }
        listener_tasks.spawn(crate::admin::run(
            admin,
            crate::admin::AdminState {
                node: cfg.node.name.clone(),
                spool: spool.clone(),
                board: board.clone(),
                destinations: cfg.destination.iter().map(|d| d.name.clone()).collect(),
                readiness: readiness.clone(),
                retention: cfg.spool.retention,
                rotation,
                metrics: metrics.clone(),
            },
            listener_tasks.clone(),
            listeners_stop.clone(),
        ));
        readiness.set_started();
        info!(
            node = %cfg.node.name,
            socket = %admin_socket.display(),
            crypto = keystore::BACKEND,
            "node ready"
        );
        Ok(Node {
            dicom_addrs,
            link_addrs,
            hl7_addrs,
            http_addr,
            metrics,
            board,
            admin_socket,
            readiness,
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

    /// Stop in the order of the module docs and wait until the spool is closed.
    pub async fn stop(mut self) {
        self.readiness.set_draining();
        self.listeners_stop.cancel();
        self.listener_tasks.close();
        // Bounded so that the whole drain fits a 60 s grace period (see the module docs).
        if tokio::time::timeout(Duration::from_secs(35), self.listener_tasks.wait())
            .await
            .is_err()
        {
            warn!("listeners did not drain within 35 s");
        }
        self.workers_stop.cancel();
        self.worker_tasks.close();
        if tokio::time::timeout(Duration::from_secs(15), self.worker_tasks.wait())
            .await
            .is_err()
        {
            warn!("dispatchers did not stop within 15 s");
        }
        if let Some(spool) = self.spool.take() {
            spool.quiesce().await;
            let _ = std::fs::remove_file(&self.admin_socket);
            match tokio::task::spawn_blocking(move || spool.flush_blocking()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    warn!(error = %e, "could not flush the spool at shutdown (the WAL has everything)")
                }
                Err(e) => warn!(error = %e, "spool flush task failed"),
            }
        }
        info!("node stopped");
    }
}

/// Re-check the data volume's free space every second, so that readiness and admission
/// recover by themselves once space returns, even without traffic.
async fn watch_disk(spool: Spool, stop: CancellationToken) {
    loop {
        let s = spool.clone();
        let _ = tokio::task::spawn_blocking(move || s.check_disk()).await;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Delete retained objects past `[spool] retention`, at start and then every minute. The
/// deletions are the spool's synced batches, each complete by itself, so stopping between
/// them loses nothing.
async fn expire_retained(spool: Spool, stop: CancellationToken) {
    const ROUND: usize = 4096;
    loop {
        let pause = match spool.expire_retained(ROUND).await {
            // More may be due: go on at once (but let a stop in first).
            Ok(n) if n == ROUND => Duration::ZERO,
            Ok(_) => Duration::from_secs(60),
            Err(e) => {
                warn!(error = %e, "retention sweep failed; it is tried again in a minute");
                Duration::from_secs(60)
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// Delete link dedup records older than `[spool] dedup_window`, at start and then hourly
/// (each record says only that a transfer passed; none is kept longer than it can serve).
async fn expire_dedup(spool: Spool, stop: CancellationToken) {
    loop {
        let s = spool.clone();
        match tokio::task::spawn_blocking(move || s.expire_dedup_blocking(crate::spool::now_ms()))
            .await
        {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => info!(
                records = n,
                "expired link deduplication records past spool.dedup_window"
            ),
            Ok(Err(e)) => warn!(error = %e, "dedup expiry failed; it is tried again in an hour"),
            Err(e) => warn!(error = %e, "dedup expiry task failed"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
        }
    }
}

/// How often study keys that no stored object uses are shredded.
pub const KEY_SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Shred the study keys that no stored object uses and no writer holds, at start and then
/// every [`KEY_SWEEP_INTERVAL`]: a study's key outlives its last object by at most that
/// (plus one sweep if a commit of the study raced the sweep). Each sweep is one synced
/// batch, so stopping between sweeps loses nothing. After it, the keys deleted since the
/// last sweep (by it, or by deliveries, purges and expiry) are compacted out of the
/// database's files, so a deleted key's wrapped bytes are gone from them within a sweep.
async fn shred_unused_keys(spool: Spool, stop: CancellationToken) {
    loop {
        let s = spool.clone();
        let swept = tokio::task::spawn_blocking(move || {
            let n = s.shred_unused_keys_blocking()?;
            // Deleted keys, by this sweep or by deliveries, purges and expiry since the last.
            s.compact_deleted_keys_blocking()?;
            Ok::<_, crate::spool::SpoolError>(n)
        });
        match swept.await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => info!(keys = n, "shredded study keys that no stored object uses"),
            Ok(Err(e)) => {
                warn!(error = %e, "study key sweep failed; it is tried again in a minute")
            }
            Err(e) => warn!(error = %e, "study key sweep task failed"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(KEY_SWEEP_INTERVAL) => {}
        }
    }
}

pub use crate::spool::free_bytes;
