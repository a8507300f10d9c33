//! Receive: the DICOM upper-layer acceptor (C-ECHO and C-STORE SCP).
//!
//! Owns the listener socket, association negotiation, PDV reassembly and the DIMSE exchange.
//! Invariants:
//! - called and calling AE titles are checked during negotiation; a mismatch is an
//!   A-ASSOCIATE-RJ;
//! - with `[dicom_listener.tls]` (DICOM TLS, PS3.15 Annex B) every connection starts with
//!   a TLS handshake (plaintext is refused), counted within `negotiation_timeout` and
//!   `max_negotiating`; a calling AE title bound to a certificate identity
//!   (`bind_ae_titles`) is accepted only when this connection's verified client
//!   certificate carries it, checked in the same AE title check (A-ASSOCIATE-RJ otherwise);
//! - PDUs are read in strict mode with a bounded max length, command fragments are bounded
//!   by [`dimse::MAX_COMMAND_BYTES`], and data PDVs go straight into the spool writer, so
//!   memory per association is bounded by the PDU and segment sizes, never the object size;
//! - a C-STORE-RSP with Success is sent only after [`crate::spool::ObjectWriter::commit`]
//!   returned, which is after a synced write; any failure to persist answers 0xA700
//!   (or a more specific failure) and the writer's drop removes what was written;
//! - a PDV on a presentation context that was not accepted aborts the association;
//! - A-ABORT, A-RELEASE, a timeout or a dropped connection at any point discards the
//!   partial object, and nothing committed is affected;
//! - every wait has a deadline, and every resource a peer can hold has a cap
//!   (`[[dicom_listener]]` keys, defaults in brackets): at most `max_negotiating` [16]
//!   connections negotiate at once, each for at most `negotiation_timeout` [10s];
//!   at most `max_associations` [64] negotiated associations run at once, each for at
//!   most `max_association_time` [4h]; every PDU must arrive whole within `timeout`
//!   [60] of the previous one, which caps idle time and defeats a byte-per-minute trickle.
//!   Memory per association is bounded by one PDU (`max_pdu_length`), the command set,
//!   the identity prefix ([`crate::dataset::MAX_IDENTITY_PREFIX`]) and one segment: about
//!   6 MiB with the defaults, so about 400 MiB for 64 associations at their worst, and
//!   one PDU per negotiating connection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dicom_ul::association::AsyncServerAssociation;
use dicom_ul::association::server::{AccessControl, DefaultNegotiation};
use dicom_ul::pdu::{
    AbortRQSource, AssociationRJServiceUserReason, PDataValue, PDataValueType,
    PresentationContextResultReason, UserIdentity,
};
use dicom_ul::{Pdu, ServerAssociationOptions};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::DicomListener;
use crate::dimse::{self, Command, field, status};
use crate::metrics::{ActiveGuard, Metrics, cstore_status};
use crate::spool::{Ingest, ObjectWriter, Spool, SpoolError};
use crate::tls::{ConfigReloader, Current, DicomServerTls, PeerCert};

/// Checks the called AE title against ours and the calling AE title against the allow-list
/// and, on a DICOM TLS connection, against the certificate its handshake verified.
#[derive(Debug, Clone)]
struct AeAccess {
    allowed_calling: Vec<String>,
    /// The listener's TLS material and the client certificate of this connection.
    tls: Option<(Arc<DicomServerTls>, PeerCert)>,
}

impl AccessControl for AeAccess {
    fn check_access(
        &self,
        this_ae_title: &str,
        calling_ae_title: &str,
        called_ae_title: &str,
        _user_identity: Option<&UserIdentity>,
    ) -> Result<(), AssociationRJServiceUserReason> {
        if called_ae_title.trim() != this_ae_title.trim() {
            return Err(AssociationRJServiceUserReason::CalledAETitleNotRecognized);
        }
        if !self.allowed_calling.is_empty()
            && !self
                .allowed_calling
                .iter()
                .any(|a| a.trim() == calling_ae_title.trim())
        {
            return Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized);
        }
        if let Some((tls, cert)) = &self.tls
            && !tls.may_call(calling_ae_title, cert.get())
        {
            info!(
                calling_ae = ?calling_ae_title.trim(),
                "calling AE title refused: not in bind_ae_titles, or the client certificate does not carry its bound name"
            );
            return Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized);
        }
        Ok(())
    }
}

/// A running DICOM listener.
pub struct DicomServer {
    cfg: DicomListener,
    options: ServerAssociationOptions<'static, AeAccess, DefaultNegotiation>,
    spool: Spool,
    metrics: Arc<Metrics>,
    router: crate::routing::Router,
    /// DICOM TLS material for new handshakes (replaced by the reloader when files change).
    tls: Option<Current<DicomServerTls>>,
    reloader: Option<ConfigReloader<DicomServerTls>>,
}

impl DicomServer {
    /// Prepare a listener (does not bind).
    pub fn new(cfg: DicomListener, spool: Spool, metrics: Arc<Metrics>) -> DicomServer {
        let timeout = Duration::from_secs(cfg.timeout_secs);
        let mut options = ServerAssociationOptions::new()
            .ae_access_control(AeAccess {
                allowed_calling: cfg.allowed_calling_ae_titles.clone(),
                tls: None,
            })
            .ae_title(cfg.ae_title.clone())
            .strict(true)
            .max_pdu_length(cfg.max_pdu_length)
            .read_timeout(timeout)
            .write_timeout(timeout)
            .with_abstract_syntax(dimse::VERIFICATION_SOP_CLASS);
        if cfg.sop_classes.is_empty() {
            // Transparent by default (as `storescp --promiscuous`, Orthanc's
            // UnknownSopClassAccepted): any abstract syntax is accepted at negotiation, and a
            // C-STORE of a class that may not be stored gets 0x0122 ([`crate::sop::may_be_stored`]).
            options = options.promiscuous(true);
            for (uid, _) in crate::sop::STORAGE_SOP_CLASSES {
                options = options.with_abstract_syntax(*uid);
            }
        } else {
            for uid in &cfg.sop_classes {
                options = options.with_abstract_syntax(uid.clone());
            }
        }
        for (uid, _) in crate::sop::accepted_transfer_syntaxes() {
            options = options.with_transfer_syntax(*uid);
        }
        DicomServer {
            cfg,
            options,
            spool,
            metrics,
            router: crate::routing::Router::default(),
            tls: None,
            reloader: None,
        }
    }

    /// Load `[dicom_listener.tls]`, if the listener has it, and reload it whenever its
    /// files change (checked every [`crate::tls::RELOAD_INTERVAL`]): new handshakes use the
    /// new certificate, associations in progress go on, and a broken file keeps the old
    /// material (logged and counted in `tls_reloads_total{listener}`).
    pub fn with_tls(mut self) -> Result<DicomServer, crate::tls::TlsError> {
        if let Some(t) = &self.cfg.tls {
            let (reloader, rx) = ConfigReloader::dicom_listener(t)?;
            self.tls = Some(rx);
            self.reloader = Some(reloader);
        }
        Ok(self)
    }

    /// Apply the `[[route]]` rules to what this listener receives.
    pub fn with_router(mut self, router: crate::routing::Router) -> DicomServer {
        self.router = router;
        self
    }

    /// Accept associations until `shutdown`; each runs in its own task.
    pub async fn run(mut self, listener: TcpListener, shutdown: CancellationToken) {
        let tasks = tokio_util::task::TaskTracker::new();
        if let Some(r) = self.reloader.take() {
            tasks.spawn(crate::tls::reload(
                r,
                self.cfg.name.clone(),
                self.metrics.clone(),
                shutdown.clone(),
            ));
        }
        let server = Arc::new(self);
        // A connection holds a negotiation slot until negotiated, then an association
        // permit: a peer that never finishes negotiating cannot keep others out for long.
        let negotiating = Arc::new(Semaphore::new(server.cfg.max_negotiating));
        let permits = Arc::new(Semaphore::new(server.cfg.max_associations));
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                a = listener.accept() => a,
            };
            let (socket, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    warn!(listener = %server.cfg.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = negotiating.clone().try_acquire_owned() else {
                warn!(listener = %server.cfg.name, %peer, "too many connections negotiating; closing connection");
                server
                    .metrics
                    .associations
                    .with_label_values(&[&server.cfg.name, "over_limit"])
                    .inc();
                drop(socket);
                continue;
            };
            let server = server.clone();
            let shutdown = shutdown.clone();
            let permits = permits.clone();
            tasks.spawn(async move {
                server.handle(socket, slot, &permits, shutdown).await;
            });
        }
        // Close the socket now, not when the drain ends: a new connection is refused at
        // once (and its sender retries elsewhere or later) instead of waiting in the
        // kernel's backlog for a node that will never accept it.
        drop(listener);
        tasks.close();
        tasks.wait().await;
    }

    async fn handle(
        &self,
        socket: TcpStream,
        slot: OwnedSemaphorePermit,
        permits: &Arc<Semaphore>,
        shutdown: CancellationToken,
    ) {
        let name = &self.cfg.name;
        let started = Instant::now();
        let peer = socket
            .peer_addr()
            .map_or_else(|_| "unknown".to_owned(), |a| a.to_string());
        let _ = socket.set_nodelay(true);
        let timeout = Duration::from_secs(self.cfg.negotiation_timeout_secs);
        // The whole negotiation, TLS handshake included, runs under one deadline:
        // dicom-ul's read timeout starts only after the handshake.
        match &self.tls {
            None => {
                let negotiated =
                    tokio::time::timeout(timeout, self.options.establish_async(socket)).await;
                drop(slot);
                if let Some(assoc) = self.negotiated(&peer, negotiated) {
                    self.serve(assoc, &peer, started, permits, shutdown).await;
                }
            }
            Some(current) => {
                let material = current.borrow().clone();
                let cert = PeerCert::default();
                let config = match material.config(cert.clone()) {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(listener = %name, error = %e, "DICOM TLS configuration failed; closing connection");
                        return;
                    }
                };
                let options = self
                    .options
                    .clone()
                    .ae_access_control(AeAccess {
                        allowed_calling: self.cfg.allowed_calling_ae_titles.clone(),
                        tls: Some((material, cert)),
                    })
                    .tls_config(config);
                let negotiated =
                    tokio::time::timeout(timeout, options.establish_tls_async(socket)).await;
                drop(slot);
                if let Some(assoc) = self.negotiated(&peer, negotiated) {
                    self.serve(assoc, &peer, started, permits, shutdown).await;
                }
            }
        }
    }

    /// The association of a negotiation that succeeded; a failure is logged and counted
    /// (`rejected`, `handshake_failed` or `timeout`).
    fn negotiated<S>(
        &self,
        peer: &str,
        negotiated: Result<
            Result<AsyncServerAssociation<S>, dicom_ul::association::Error>,
            tokio::time::error::Elapsed,
        >,
    ) -> Option<AsyncServerAssociation<S>> {
        let name = &self.cfg.name;
        match negotiated {
            Ok(Ok(a)) => Some(a),
            Ok(Err(e)) => {
                let outcome = match &e {
                    dicom_ul::association::Error::TlsHandshake { source, .. } => {
                        let reason = crate::metrics::tls_failure_reason(source);
                        info!(listener = %name, %peer, %reason, error = %source, "DICOM TLS handshake failed");
                        self.metrics
                            .tls_handshake_failures
                            .with_label_values(&[name, reason])
                            .inc();
                        "handshake_failed"
                    }
                    _ => {
                        info!(listener = %name, %peer, error = %e, "association refused");
                        "rejected"
                    }
                };
                self.metrics
                    .associations
                    .with_label_values(&[name, outcome])
                    .inc();
                None
            }
            Err(_) => {
                info!(listener = %name, %peer, "association negotiation timed out");
                self.metrics
                    .associations
                    .with_label_values(&[name, "timeout"])
                    .inc();
                None
            }
        }
    }

    /// Run a negotiated association to its end.
    async fn serve<S>(
        &self,
        mut assoc: AsyncServerAssociation<S>,
        peer: &str,
        started: Instant,
        permits: &Arc<Semaphore>,
        shutdown: CancellationToken,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
    {
        let name = &self.cfg.name;
        let Ok(_permit) = permits.clone().try_acquire_owned() else {
            warn!(listener = %name, %peer, "too many associations; aborting the new one");
            self.metrics
                .associations
                .with_label_values(&[name, "over_limit"])
                .inc();
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                assoc.send(&Pdu::AbortRQ {
                    source: AbortRQSource::ServiceUser,
                }),
            )
            .await;
            return;
        };
        self.metrics
            .associations
            .with_label_values(&[name, "accepted"])
            .inc();
        let _active = ActiveGuard::new(self.metrics.associations_active.with_label_values(&[name]));
        let calling_ae = {
            use dicom_ul::association::Association;
            assoc.peer_ae_title().trim().to_owned()
        };
        debug!(listener = %name, %peer, %calling_ae, "association accepted");
        let mut session = Session {
            server: self,
            assoc,
            command: dimse::CommandAssembler::default(),
            state: State::Idle,
            objects: 0,
            bytes: 0,
            refused: 0,
        };
        let outcome = session.run(shutdown).await;
        let end = match &outcome {
            Outcome::Released => "released",
            Outcome::Aborted => "aborted",
            Outcome::Closed(reason) => {
                debug!(listener = %name, %peer, %reason, "association closed");
                "closed"
            }
            Outcome::Shutdown => "shutdown",
            Outcome::Expired(deadline) => {
                info!(listener = %name, %peer, deadline, "association cut off at its deadline");
                "expired"
            }
        };
        // One line per association: a busy node logs one line per study, not per object.
        info!(
            listener = %name,
            %peer,
            %calling_ae,
            objects = session.objects,
            bytes = session.bytes,
            refused = session.refused,
            duration_ms = started.elapsed().as_millis() as u64,
            end = %end,
            "association ended"
        );
    }
}

/// What the association is doing between PDVs.
enum State {
    /// Waiting for a command.
    Idle,
    /// Receiving the data set of a C-STORE.
    Storing {
        request: Command,
        context_id: u8,
        /// `None` once a failure was decided; the rest of the data set is discarded.
        writer: Option<Box<ObjectWriter>>,
        failure: Option<(u16, String)>,
    },
    /// Discarding the data set of a command we refuse.
    Discarding { request: Command, context_id: u8 },
}

#[derive(Debug)]
enum Outcome {
    Released,
    Aborted,
    Closed(String),
    /// A deadline passed: the association's lifetime, or the wait for a PDU.
    Expired(&'static str),
    Shutdown,
}

struct Session<'a, S> {
    server: &'a DicomServer,
    assoc: AsyncServerAssociation<S>,
    /// The command set being gathered from its PDVs.
    command: dimse::CommandAssembler,
    state: State,
    /// Objects stored on this association (for its log line).
    objects: u64,
    /// Bytes of those objects.
    bytes: u64,
    /// C-STORE requests refused.
    refused: u64,
}

impl<S> Session<'_, S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
{
    async fn run(&mut self, shutdown: CancellationToken) -> Outcome {
        let cfg = &self.server.cfg;
        let end_of_life =
            tokio::time::Instant::now() + Duration::from_secs(cfg.max_association_secs);
        let per_pdu = Duration::from_secs(cfg.timeout_secs);
        loop {
            let pdu = tokio::select! {
                // Only stop between objects; a transfer in progress finishes or times out.
                _ = shutdown.cancelled(), if matches!(self.state, State::Idle) => {
                    self.abort().await;
                    return Outcome::Shutdown;
                }
                _ = tokio::time::sleep_until(end_of_life) => {
                    self.abort().await;
                    return Outcome::Expired("lifetime");
                }
                pdu = tokio::time::timeout(per_pdu, self.assoc.receive()) => pdu,
            };
            let pdu = match pdu {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => return Outcome::Closed(e.to_string()),
                Err(_) => {
                    self.abort().await;
                    return Outcome::Expired("pdu_timeout");
                }
            };
            match pdu {
                Pdu::PData { data } => {
                    for pdv in data {
                        if let Err(reason) = self.pdv(pdv).await {
                            warn!(listener = %self.server.cfg.name, %reason, "aborting association");
                            self.abort().await;
                            return Outcome::Aborted;
                        }
                    }
                }
                Pdu::ReleaseRQ => {
                    let _ = self.assoc.send(&Pdu::ReleaseRP).await;
                    return Outcome::Released;
                }
                Pdu::AbortRQ { .. } => return Outcome::Aborted,
                other => {
                    warn!(listener = %self.server.cfg.name, pdu = %other.short_description(), "unexpected PDU");
                    self.abort().await;
                    return Outcome::Aborted;
                }
            }
        }
    }

    async fn abort(&mut self) {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.assoc.send(&Pdu::AbortRQ {
                source: AbortRQSource::ServiceUser,
            }),
        )
        .await;
    }

    /// The accepted presentation context `id`: (abstract syntax, transfer syntax).
    fn accepted_context(&self, id: u8) -> Option<(&str, &str)> {
        self.assoc
            .presentation_contexts()
            .iter()
            .find(|pc| pc.id == id && pc.reason == PresentationContextResultReason::Acceptance)
            .map(|pc| (pc.abstract_syntax.as_str(), pc.transfer_syntax.as_str()))
    }

    /// Handle one PDV. An `Err` aborts the association.
    async fn pdv(&mut self, pdv: PDataValue) -> Result<(), String> {
        if self.accepted_context(pdv.presentation_context_id).is_none() {
            return Err(format!(
                "PDV on presentation context {} which was not accepted",
                pdv.presentation_context_id
            ));
        }
        match pdv.value_type {
            PDataValueType::Command => {
                if !matches!(self.state, State::Idle) {
                    return Err("command received while a data set was expected".into());
                }
                // Bounded by dimse::MAX_COMMAND_BYTES before anything is copied.
                let assembled = self
                    .command
                    .push(&pdv.data, pdv.is_last)
                    .map_err(|e| e.to_string())?;
                if let Some(cmd) = assembled {
                    self.command_received(cmd, pdv.presentation_context_id)
                        .await?;
                }
                Ok(())
            }
            PDataValueType::Data => self.data(pdv).await,
        }
    }

    async fn command_received(&mut self, cmd: Command, context_id: u8) -> Result<(), String> {
        match cmd.field {
            field::C_ECHO_RQ if cmd.has_data_set => {
                // A C-ECHO never carries a data set: discard it, then refuse.
                self.state = State::Discarding {
                    request: cmd,
                    context_id,
                };
                Ok(())
            }
            field::C_ECHO_RQ => {
                self.respond(context_id, &cmd.response(status::SUCCESS))
                    .await
            }
            field::C_STORE_RQ => {
                if !cmd.has_data_set {
                    self.count_response(status::CANNOT_UNDERSTAND);
                    return self
                        .respond(context_id, &cmd.response(status::CANNOT_UNDERSTAND))
                        .await;
                }
                let (writer, failure) = match self.start_store(&cmd, context_id) {
                    Ok(w) => (Some(Box::new(w)), None),
                    Err(f) => (None, Some(f)),
                };
                self.state = State::Storing {
                    request: cmd,
                    context_id,
                    writer,
                    failure,
                };
                Ok(())
            }
            field::C_CANCEL_RQ => Ok(()),
            f if cmd.is_request() => {
                debug!(command = format!("0x{f:04X}"), "unsupported DIMSE command");
                if cmd.has_data_set {
                    self.state = State::Discarding {
                        request: cmd,
                        context_id,
                    };
                    Ok(())
                } else {
                    self.respond(context_id, &cmd.response(status::UNRECOGNIZED_OPERATION))
                        .await
                }
            }
            _ => Err("unexpected response command from the requestor".into()),
        }
    }

    /// Validate a C-STORE-RQ and open a spool writer for it.
    fn start_store(&self, cmd: &Command, context_id: u8) -> Result<ObjectWriter, (u16, String)> {
        let (abstract_syntax, ts) = self
            .accepted_context(context_id)
            .ok_or((status::PROCESSING_FAILURE, "no context".to_owned()))?;
        let class = cmd
            .affected_sop_class
            .clone()
            .filter(|u| dimse::is_valid_uid(u))
            .ok_or((
                status::INVALID_ARGUMENT_VALUE,
                "invalid Affected SOP Class UID".to_owned(),
            ))?;
        let instance = cmd
            .affected_sop_instance
            .clone()
            .filter(|u| dimse::is_valid_uid(u))
            .ok_or((
                status::INVALID_ARGUMENT_VALUE,
                "invalid Affected SOP Instance UID".to_owned(),
            ))?;
        if class != abstract_syntax {
            return Err((
                status::DATASET_DOES_NOT_MATCH,
                "Affected SOP Class differs from the presentation context".to_owned(),
            ));
        }
        if !crate::sop::may_be_stored(&class) {
            return Err((
                status::SOP_CLASS_NOT_SUPPORTED,
                "not a storage SOP class".to_owned(),
            ));
        }
        use dicom_ul::association::Association;
        let calling = self.assoc.peer_ae_title().trim().to_owned();
        let router = self.server.router.for_origin(crate::routing::Origin {
            listener: self.server.cfg.name.clone(),
            link: false,
            calling_ae: Some(calling.clone()),
            called_ae: Some(self.server.cfg.ae_title.clone()),
            peer: None,
        });
        let ingest = Ingest {
            sop_class: class,
            sop_instance: instance,
            transfer_syntax: ts.to_owned(),
            source: calling,
            routes: self.server.cfg.route_to.clone(),
            dedup: None,
            strict_uid_match: self.server.cfg.strict_uid_match,
        };

        let mut writer = self
            .server
            .spool
            .writer(ingest)
            .map_err(|e| failure_status(&e))?;
        writer.route_with(router);
        Ok(writer)
    }

    async fn data(&mut self, pdv: PDataValue) -> Result<(), String> {
        match &mut self.state {
            State::Idle => Err("data set received without a command".into()),
            State::Discarding {
                request,
                context_id,
            } => {
                if *context_id != pdv.presentation_context_id {
                    return Err("data set on another presentation context".into());
                }
                if pdv.is_last {
                    let rsp = request.response(status::UNRECOGNIZED_OPERATION);
                    let ctx = *context_id;
                    self.state = State::Idle;
                    self.respond(ctx, &rsp).await?;
                }
                Ok(())
            }
            State::Storing {
                context_id,
                writer,
                failure,
                ..
            } => {
                if *context_id != pdv.presentation_context_id {
                    return Err("data set on another presentation context".into());
                }
                if let Some(w) = writer.as_mut()
                    && let Err(e) = w.write(&pdv.data).await
                {
                    *failure = Some(failure_status(&e));
                    // Dropping the writer removes what it stored.
                    *writer = None;
                }
                if pdv.is_last {
                    self.finish_store().await?;
                }
                Ok(())
            }
        }
    }

    /// Count one C-STORE response with `code` (and a refusal on the association).
    fn count_response(&mut self, code: u16) {
        let server = self.server;
        let m = &server.metrics;
        let listener = server.cfg.name.as_str();
        m.cstore_responses
            .with_label_values(&[listener, cstore_status(code)])
            .inc();
        if code == status::DATASET_DOES_NOT_MATCH {
            m.uid_mismatch.with_label_values(&[listener]).inc();
        }
        if code != status::SUCCESS {
            self.refused += 1;
        }
    }

    async fn finish_store(&mut self) -> Result<(), String> {
        // The last PDV is in: from here to the response sent is the ack latency.
        let started = Instant::now();
        let State::Storing {
            request,
            context_id,
            writer,
            failure,
        } = std::mem::replace(&mut self.state, State::Idle)
        else {
            return Ok(());
        };
        let server = self.server;
        let listener = &server.cfg.name;
        let m = &server.metrics;
        let (code, comment) = match (writer, failure) {
            (Some(mut w), None) => {
                let bytes = w.len();
                let identity = w.finish_identity().await;
                if w.uid_mismatch() {
                    m.uid_mismatch.with_label_values(&[listener]).inc();
                    warn!(%listener, "a data set's SOP Class or Instance UID differs from its C-STORE command; stored under the data set's own UIDs (strict_uid_match = true refuses such objects)");
                }
                let committed = match identity {
                    Err(e) => Err(e),
                    Ok(()) => w.commit().await,
                };
                match committed {
                    Err(e) => {
                        let (code, comment) = failure_status(&e);
                        (code, Some(comment))
                    }
                    Ok(committed) => {
                        m.received_objects.with_label_values(&[listener]).inc();
                        m.received_bytes
                            .with_label_values(&[listener])
                            .inc_by(bytes);
                        self.objects += 1;
                        self.bytes += bytes;
                        debug!(%listener, ?committed, bytes, "stored");
                        (status::SUCCESS, None)
                    }
                }
            }
            (_, Some((code, comment))) => (code, Some(comment)),
            (None, None) => (status::PROCESSING_FAILURE, Some("internal".to_owned())),
        };
        if code != status::SUCCESS {
            warn!(%listener, status = format!("0x{code:04X}"), reason = comment.as_deref().unwrap_or(""), "C-STORE refused");
        }
        self.count_response(code);
        let mut rsp = request.response(code);
        rsp.error_comment = comment;
        let sent = self.respond(context_id, &rsp).await;
        m.store_duration
            .with_label_values(&[listener])
            .observe(started.elapsed().as_secs_f64());
        sent
    }

    async fn respond(&mut self, context_id: u8, rsp: &Command) -> Result<(), String> {
        let pdu = Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: context_id,
                value_type: PDataValueType::Command,
                is_last: true,
                data: rsp.encode(),
            }],
        };
        self.assoc
            .send(&pdu)
            .await
            .map_err(|e| format!("could not send response: {e}"))
    }
}

/// Map a spool failure to a C-STORE status and a comment for the peer. The comment names
/// the kind of failure only: storage errors may carry local paths and stay in our log.
fn failure_status(e: &SpoolError) -> (u16, String) {
    let (code, comment) = match e {
        SpoolError::Store(_) => (status::OUT_OF_RESOURCES, "storage failure".to_owned()),
        SpoolError::Key(_) | SpoolError::KekCheck(_) => {
            (status::OUT_OF_RESOURCES, "key failure".to_owned())
        }
        // Only at open, never while storing; the path stays in our log.
        SpoolError::DataDirPermissions { .. } => {
            (status::OUT_OF_RESOURCES, "storage failure".to_owned())
        }
        SpoolError::Internal(_) => (status::OUT_OF_RESOURCES, "internal failure".to_owned()),
        // Busy names a configured destination or the watermark, never a path: the sender's
        // operator needs to know why to retry later.
        SpoolError::Busy(d) if !d.contains('/') => (status::OUT_OF_RESOURCES, e.to_string()),
        SpoolError::Busy(_) => (status::OUT_OF_RESOURCES, "gateway busy".to_owned()),
        SpoolError::TooLarge(_) => (status::OUT_OF_RESOURCES, e.to_string()),
        SpoolError::IdentityMismatch(_) => (status::DATASET_DOES_NOT_MATCH, e.to_string()),
        SpoolError::Format(_) => (status::CANNOT_UNDERSTAND, e.to_string()),
        SpoolError::Unrouted => (status::PROCESSING_FAILURE, e.to_string()),
        SpoolError::Corrupt(..) | SpoolError::MissingSegment(..) | SpoolError::NotFound(_) => {
            (status::PROCESSING_FAILURE, "processing failure".to_owned())
        }
    };
    if matches!(
        e,
        SpoolError::Store(_)
            | SpoolError::Key(_)
            | SpoolError::KekCheck(_)
            | SpoolError::Internal(_)
    ) {
        warn!(error = %e, "spool failure while storing");
    }
    (code, comment)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_for_the_peer_carry_no_local_paths() {
        // A storage error as RocksDB reports it, naming the data folder.
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("spool-is-a-file");
        std::fs::write(&blocker, b"x").unwrap();
        let e = Spool::open_blocking(
            &blocker,
            keystore::Kek::from_bytes([1; 32]),
            Default::default(),
        )
        .err()
        .expect("a spool on a file must fail");
        assert!(
            e.to_string().contains("spool-is-a-file"),
            "premise: the error names the path: {e}"
        );
        let (code, comment) = failure_status(&e);
        assert_eq!(code, status::OUT_OF_RESOURCES);
        assert!(
            !comment.contains('/') && !comment.contains("spool-is-a-file"),
            "{comment}"
        );
    }
}
