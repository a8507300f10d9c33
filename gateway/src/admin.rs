//! The admin interface: HTTP/JSON over a Unix socket in the data directory.
//!
//! Owns the socket, its API and the client the `status` and `queue` commands use. The API:
//! - `GET /v1/status`: the node's readiness and, per destination, queue depth, bytes, age
//!   of the oldest entry, dead letters, in-flight sends, circuit state and last error;
//! - `GET /v1/queue[?destination=D][&dead=1]`: the entries, with Study and SOP Instance
//!   UIDs read from their sealed metadata (for an HL7 message: its type, control id and
//!   patient key instead);
//! - `POST /v1/queue/retry` and `POST /v1/queue/purge` with a JSON [`Selector`]: replay
//!   dead letters (a fresh retry budget) or delete entries for good (the object, and its
//!   study key when nothing of the study is left, once no destination waits for it);
//! - `POST /v1/queue/resend` with a JSON [`ResendRequest`]: queue a study's retained
//!   objects (`[spool] retention`) again, for the destinations they were delivered to or
//!   the one named;
//! - `GET /v1/keys`: the KEK versions ([`crate::rotation::KeysStatus`]), and
//!   `POST /v1/keys/reload`: look for new KEK version files now (what `keys rotate` asks
//!   after writing one), then the same answer;
//! - `POST /v1/verify` with a JSON [`crate::verify::VerifyRequest`]: check one bounded
//!   batch of stored objects and quarantine those that fail (what `verify` asks, batch after
//!   batch);
//! - `POST /v1/keys/shred` with a JSON [`ShredRequest`]: purge every DICOM entry and
//!   retained copy of a study, then destroy its key and compact it out of the files
//!   (refused while an entry of the study is being sent).
//!
//! Invariants:
//! - the socket is `admin.sock` in the data directory, mode 0600: only the operator who can
//!   read the spool's directory can talk to it, which is why it may show UIDs; nothing of it
//!   is reachable over the network;
//! - requests are bounded (64 KiB body, 10 s to arrive) and entries in flight are never
//!   purged or replayed (they are reported as skipped);
//! - every change goes through the spool's synced operations, and the dispatcher hears of
//!   it at once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::admin_http::Readiness;
use crate::dispatch::{Board, DestinationStatus};
use crate::spool::{EntryState, QueueEntry, Spool};

/// The socket's file name in the data directory.
pub const SOCKET_NAME: &str = "admin.sock";
/// Largest request or response body.
const MAX_BODY: usize = 64 * 1024;
/// Largest response body the client reads (a queue listing can be long).
const MAX_RESPONSE: usize = 256 << 20;

/// Where a node's admin socket is.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_NAME)
}

/// `GET /v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// The node's name.
    pub node: String,
    /// Whether it acknowledges new objects, and if not, why.
    pub ready: bool,
    /// The readiness detail (`ready`, `starting`, `draining`, `storage failed`...).
    pub readiness: String,
    /// Per destination.
    pub destinations: Vec<DestinationView>,
    /// Delivered objects kept for `queue resend` (`[spool] retention`).
    #[serde(default)]
    pub retained: usize,
}

/// One destination in [`Status`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DestinationView {
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: String,
    /// Entries waiting (in flight included).
    pub queued: usize,
    /// Their bytes.
    pub queued_bytes: u64,
    /// Being sent now.
    pub in_flight: usize,
    /// Dead letters.
    pub dead: usize,
    /// Age of the oldest waiting entry, in seconds.
    pub oldest_age_seconds: Option<f64>,
    /// `closed`, `open` or `half_open`.
    pub circuit: String,
    /// The last failure.
    pub last_error: Option<String>,
    /// Delivered since start.
    pub delivered: u64,
}

impl From<DestinationStatus> for DestinationView {
    fn from(s: DestinationStatus) -> Self {
        DestinationView {
            name: s.name,
            kind: s.kind.to_owned(),
            queued: s.queued,
            queued_bytes: s.queued_bytes,
            in_flight: s.in_flight,
            dead: s.dead,
            oldest_age_seconds: s.oldest_age_seconds,
            circuit: serde_json::to_value(s.circuit)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            last_error: s.last_error,
            delivered: s.delivered,
        }
    }
}

/// One entry of `GET /v1/queue`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EntryView {
    /// The object id (hex).
    pub id: String,
    /// The destination.
    pub destination: String,
    /// Position in its queue.
    pub seq: u64,
    /// `queued`, `in_flight` or `dead`.
    pub state: String,
    /// Failed attempts.
    pub attempts: u32,
    /// The last failure reason.
    pub last_reason: Option<String>,
    /// The most recent failed attempts, oldest first (at most the spool's history bound;
    /// `attempts` counts them all).
    #[serde(default)]
    pub history: Vec<AttemptView>,
    /// Stored bytes.
    pub size: u64,
    /// Study Instance UID (empty for an HL7 message).
    pub study_uid: String,
    /// SOP Instance UID (empty for an HL7 message).
    pub sop_instance_uid: String,
    /// When it was received here (ms since the epoch).
    pub received_at_ms: u64,
    /// `dicom` or `hl7`.
    #[serde(default)]
    pub protocol: String,
    /// HL7 only: the message type (MSH-9, `ORM^O01`) and control id (MSH-10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hl7: Option<Hl7View>,
}

/// What `GET /v1/queue` shows of an HL7 message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hl7View {
    /// MSH-9.
    pub message_type: String,
    /// MSH-10.
    pub control_id: String,
    /// The patient key (PID-3.1 and ^PID-3.4), shown here only, as the DICOM rows' UIDs.
    pub patient: String,
}

/// One failed delivery attempt of an entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttemptView {
    /// When it failed (ms since the epoch).
    pub at_ms: u64,
    /// Why (the gateway's own words and status codes, never a peer's free text).
    pub reason: String,
}

/// Which entries a retry or purge applies to: exactly one of `id`, `study`, or
/// `destination` with `dead`; `destination` also narrows `id` and `study`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Selector {
    /// One object (hex id).
    pub id: Option<String>,
    /// Every entry of one study.
    pub study: Option<String>,
    /// One destination.
    pub destination: Option<String>,
    /// Only dead letters.
    #[serde(default)]
    pub dead: bool,
}

/// The answer to a retry or purge.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Changed {
    /// Entries that matched.
    pub matched: usize,
    /// Entries changed.
    pub changed: usize,
    /// Entries left alone because they were being sent.
    pub skipped_in_flight: usize,
    /// Entries left alone because they were not dead letters (retry only).
    pub skipped_not_dead: usize,
    /// Retained (delivered) copies deleted with the study (purge `--study` only).
    #[serde(default)]
    pub retained_purged: usize,
}

/// `POST /v1/queue/resend`: which retained objects to queue again.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ResendRequest {
    /// The Study Instance UID.
    pub study: String,
    /// Only this destination (by default: every destination each object was delivered to).
    pub destination: Option<String>,
}

/// The answer to a resend.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Resended {
    /// Objects queued again.
    pub objects: usize,
    /// Queue entries made (an object delivered to two destinations makes two).
    pub entries: usize,
    /// The destinations they were queued for.
    pub destinations: Vec<String>,
    /// Each queue entry made: (object id, destination), to follow their delivery.
    #[serde(default)]
    pub queued: Vec<(String, String)>,
}

/// `POST /v1/keys/shred`: the study whose key to destroy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShredRequest {
    /// The Study Instance UID.
    pub study: String,
}

/// The answer to a shred.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Shredded {
    /// Queue entries of the study purged.
    pub entries_purged: usize,
    /// Retained (delivered) copies purged.
    pub retained_purged: usize,
    /// The study's key was stored and is destroyed now.
    pub key_shredded: bool,
    /// Objects of the study still stored (unreadable now).
    pub objects_left: usize,
}

/// What the admin server needs.
#[derive(Clone)]
pub struct AdminState {
    /// The node's name.
    pub node: String,
    /// The spool.
    pub spool: Spool,
    /// The dispatchers' published state.
    pub board: Board,
    /// Destination names, in config order.
    pub destinations: Vec<String>,
    /// Readiness.
    pub readiness: Arc<Readiness>,
    /// `[spool] retention`: zero keeps nothing after delivery.
    pub retention: Duration,
    /// KEK rotation.
    pub rotation: Arc<crate::rotation::Rotation>,
    /// The node's metrics (`integrity_failures_total{stage="verify"}`).
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// Bind the socket (replacing a stale one) with mode 0600.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if path.exists() {
        std::fs::remove_file(path)
            .with_context(|| format!("removing a stale admin socket {}", path.display()))?;
    }
    let l = UnixListener::bind(path)
        .with_context(|| format!("cannot create the admin socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot set mode 0600 on {}", path.display()))?;
    Ok(l)
}

/// Serve the admin socket until `shutdown`; connections run in `tasks`.
pub async fn run(
    listener: UnixListener,
    state: AdminState,
    tasks: TaskTracker,
    shutdown: CancellationToken,
) {
    loop {
        let socket = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => match a {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "admin socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, std::convert::Infallible>(route(req, &state).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .header_read_timeout(Duration::from_secs(10))
                .timer(hyper_util::rt::TokioTimer::new())
                .serve_connection(TokioIo::new(socket), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => { if let Err(e) = r { debug!(error = %e, "admin connection"); } }
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

fn json<T: Serialize>(status: StatusCode, v: &T) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(v).unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, msg: &str) -> Response<Full<Bytes>> {
    json(status, &serde_json::json!({ "error": msg }))
}

async fn route(req: Request<Incoming>, st: &AdminState) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let query = parse_query(req.uri().query().unwrap_or(""));
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/v1/status") => {
            // The status reads the spool (readiness, the retained count): off the async
            // workers.
            let st = st.clone();
            match tokio::task::spawn_blocking(move || status_blocking(&st)).await {
                Ok(s) => json(StatusCode::OK, &s),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &format!("status: {e}")),
            }
        }
        (Method::GET, "/v1/queue") => {
            let sel = Selector {
                destination: query.get("destination").cloned(),
                dead: query.get("dead").is_some_and(|v| v == "1" || v == "true"),
                id: query.get("id").cloned(),
                study: query.get("study").cloned(),
            };
            match list(st, &sel).await {
                Ok(v) => json(StatusCode::OK, &v),
                Err(e) => error(StatusCode::BAD_REQUEST, &format!("{e:#}")),
            }
        }
        (Method::POST, "/v1/queue/retry" | "/v1/queue/purge" | "/v1/queue/resend") => {
            let body = match read_body(req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            if path.ends_with("resend") {
                let r: ResendRequest = match serde_json::from_slice(&body) {
                    Ok(r) => r,
                    Err(e) => {
                        return error(StatusCode::BAD_REQUEST, &format!("bad resend request: {e}"));
                    }
                };
                return match resend(st, r).await {
                    Ok(c) => json(StatusCode::OK, &c),
                    Err(e) => error(StatusCode::BAD_REQUEST, &format!("{e:#}")),
                };
            }
            let sel: Selector = match serde_json::from_slice(&body) {
                Ok(s) => s,
                Err(e) => return error(StatusCode::BAD_REQUEST, &format!("bad selector: {e}")),
            };
            let purge = path.ends_with("purge");
            match change(st, &sel, purge).await {
                Ok(c) => json(StatusCode::OK, &c),
                Err(e) => error(StatusCode::BAD_REQUEST, &format!("{e:#}")),
            }
        }
        (Method::POST, "/v1/verify") => {
            let r: crate::verify::VerifyRequest = match read_json(req, "verify request").await {
                Ok(r) => r,
                Err(r) => return r,
            };
            let after = match r.after.as_deref().map(crate::verify::parse_id).transpose() {
                Ok(a) => a,
                Err(e) => return error(StatusCode::BAD_REQUEST, &format!("{e:#}")),
            };
            let (spool, metrics) = (st.spool.clone(), st.metrics.clone());
            // The batch, its quarantines and its counts finish even if this request is
            // dropped (see `verify`).
            let job = tokio::task::spawn_blocking(move || {
                let b = crate::verify::batch_blocking(&spool, after)?;
                metrics
                    .integrity_failures
                    .with_label_values(&["verify"])
                    .inc_by(b.failures.len() as u64);
                Ok::<_, anyhow::Error>(b)
            });
            match job.await {
                Ok(Ok(b)) => json(StatusCode::OK, &b),
                Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e:#}")),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &format!("verify: {e}")),
            }
        }
        (Method::POST, "/v1/keys/shred") => {
            let r: ShredRequest = match read_json(req, "shred request").await {
                Ok(r) => r,
                Err(r) => return r,
            };
            match shred(st, r.study).await {
                Ok(s) => json(StatusCode::OK, &s),
                Err(e) => error(StatusCode::CONFLICT, &format!("{e:#}")),
            }
        }
        (Method::GET, "/v1/keys") => match st.rotation.status().await {
            Ok(s) => json(StatusCode::OK, &s),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e:#}")),
        },
        (Method::POST, "/v1/keys/reload") => match st.rotation.reload_with_status().await {
            Ok((_, s)) => json(StatusCode::OK, &s),
            Err(e) => error(StatusCode::CONFLICT, &format!("{e:#}")),
        },
        _ => error(StatusCode::NOT_FOUND, "unknown admin request"),
    }
}

/// A request body: at most [`MAX_BODY`] bytes, arriving within 10 s.
async fn read_body(req: Request<Incoming>) -> Result<Bytes, Response<Full<Bytes>>> {
    match tokio::time::timeout(
        Duration::from_secs(10),
        Limited::new(req.into_body(), MAX_BODY).collect(),
    )
    .await
    {
        Ok(Ok(b)) => Ok(b.to_bytes()),
        _ => Err(error(
            StatusCode::BAD_REQUEST,
            "request body too large or too slow",
        )),
    }
}

/// A JSON request body ([`read_body`]) of type `T`; `what` names it in the error.
async fn read_json<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
    what: &str,
) -> Result<T, Response<Full<Bytes>>> {
    let body = read_body(req).await?;
    serde_json::from_slice(&body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("bad {what}: {e}")))
}

fn parse_query(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// The status document (reads the spool: call it inside `spawn_blocking`).
pub fn status_blocking(st: &AdminState) -> Status {
    let (ready, readiness) = st.readiness.check(&st.spool);
    let board = st.board.snapshot();
    let destinations = st
        .destinations
        .iter()
        .filter_map(|n| board.iter().find(|s| &s.name == n).cloned())
        .map(DestinationView::from)
        .collect();
    Status {
        node: st.node.clone(),
        ready,
        readiness,
        destinations,
        retained: st.spool.retained_count_blocking().unwrap_or(0),
    }
}

async fn resend(st: &AdminState, r: ResendRequest) -> anyhow::Result<Resended> {
    if st.retention.is_zero() {
        bail!(
            "this node keeps nothing after delivery: set `retention` in [spool] (e.g. \"7d\") for later studies; for this one, send it again from its source"
        );
    }
    if let Some(d) = &r.destination
        && !st.destinations.contains(d)
    {
        bail!("no destination named {d:?}");
    }
    let study = r.study.trim().to_owned();
    if study.is_empty() || study.len() > 64 {
        bail!("--study takes a Study Instance UID (at most 64 characters)");
    }
    let configured = st.destinations.clone();
    let only = r.destination.clone();
    let resent = st
        .spool
        .resend_study(study, move |d| {
            configured.iter().any(|c| c == d) && only.as_deref().is_none_or(|o| o == d)
        })
        .await?;
    let mut destinations: Vec<String> = resent
        .iter()
        .flat_map(|r| r.destinations.iter().cloned())
        .collect();
    destinations.sort();
    destinations.dedup();
    Ok(Resended {
        objects: resent.len(),
        entries: resent.iter().map(|r| r.destinations.len()).sum(),
        destinations,
        queued: resent
            .iter()
            .flat_map(|r| r.destinations.iter().map(|d| (r.object.hex(), d.clone())))
            .collect(),
    })
}

/// The entries a selector names, with their object's UIDs.
async fn selected(
    st: &AdminState,
    sel: &Selector,
) -> anyhow::Result<Vec<(String, QueueEntry, EntryView)>> {
    if let Some(d) = &sel.destination
        && !st.destinations.contains(d)
    {
        bail!("no destination named {d:?}");
    }
    let id = match &sel.id {
        Some(h) => Some(crate::verify::parse_id(h)?),
        None => None,
    };
    let spool = st.spool.clone();
    let dests: Vec<String> = st
        .destinations
        .iter()
        .filter(|d| sel.destination.as_ref().is_none_or(|s| s == *d))
        .cloned()
        .collect();
    let sel = sel.clone();
    let rows = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<_>> {
        let mut rows = Vec::new();
        for d in dests {
            for e in spool.entries_blocking(&d)? {
                if id.is_some_and(|i| i != e.object) || (sel.dead && e.state != EntryState::Dead) {
                    continue;
                }
                let meta = spool.meta_blocking(e.object).ok().map(|(m, _)| m);
                if let Some(study) = &sel.study
                    && meta.as_ref().is_none_or(|m| &m.study_uid != study)
                {
                    continue;
                }
                let failures = spool.failure_blocking(&d, e.seq)?.unwrap_or_default();
                let hl7 = meta.as_ref().filter(|m| m.is_hl7()).map(|m| Hl7View {
                    message_type: m.transfer_syntax.clone(),
                    control_id: m.sop_instance_uid.clone(),
                    patient: m.study_uid.clone(),
                });
                let dicom = meta.as_ref().filter(|m| !m.is_hl7());
                let view = EntryView {
                    id: e.object.hex(),
                    destination: d.clone(),
                    seq: e.seq,
                    state: e.state.as_str().to_owned(),
                    attempts: failures.attempts,
                    last_reason: failures.last_reason().map(str::to_owned),
                    history: failures
                        .history
                        .iter()
                        .map(|a| AttemptView {
                            at_ms: a.at_ms,
                            reason: a.reason.clone(),
                        })
                        .collect(),
                    size: meta.as_ref().map_or(0, |m| m.length),
                    study_uid: dicom.map(|m| m.study_uid.clone()).unwrap_or_default(),
                    sop_instance_uid: dicom
                        .map(|m| m.sop_instance_uid.clone())
                        .unwrap_or_default(),
                    received_at_ms: meta.as_ref().map_or(0, |m| m.received_at_ms),
                    protocol: if hl7.is_some() { "hl7" } else { "dicom" }.to_owned(),
                    hl7,
                };
                rows.push((d.clone(), e, view));
            }
        }
        Ok(rows)
    })
    .await??;
    // Mark what the dispatchers have in flight.
    let board = st.board.clone();
    Ok(rows
        .into_iter()
        .map(|(d, e, mut v)| {
            if board
                .get(&d)
                .is_some_and(|s| s.in_flight_seqs.contains(&e.seq))
            {
                v.state = "in_flight".into();
            }
            (d, e, v)
        })
        .collect())
}

async fn list(st: &AdminState, sel: &Selector) -> anyhow::Result<Vec<EntryView>> {
    Ok(selected(st, sel)
        .await?
        .into_iter()
        .map(|(_, _, v)| v)
        .collect())
}

async fn change(st: &AdminState, sel: &Selector, purge: bool) -> anyhow::Result<Changed> {
    let kinds = [sel.id.is_some(), sel.study.is_some(), sel.dead]
        .iter()
        .filter(|b| **b)
        .count();
    if kinds != 1 || (sel.dead && sel.destination.is_none()) {
        bail!("name exactly one of: --id ID, --study UID, or --destination D --dead");
    }
    let rows = selected(st, sel).await?;
    let mut out = Changed {
        matched: rows.len(),
        ..Changed::default()
    };
    for (dest, entry, view) in rows {
        if view.state == "in_flight" {
            out.skipped_in_flight += 1;
            continue;
        }
        if purge {
            st.spool.purge(&dest, entry).await?;
        } else if entry.state != EntryState::Dead {
            out.skipped_not_dead += 1;
            continue;
        } else {
            st.spool.replay(&dest, entry).await?;
        }
        out.changed += 1;
    }
    // A purge of a study takes its retained copies too: the operator wants it gone.
    if purge
        && sel.destination.is_none()
        && let Some(study) = &sel.study
    {
        out.retained_purged = st.spool.purge_retained_study(study.clone()).await?;
    }
    Ok(out)
}

/// `POST /v1/keys/shred`: every DICOM entry of the study purged (none may be in flight),
/// its retained copies purged, then its key destroyed.
async fn shred(st: &AdminState, study: String) -> anyhow::Result<Shredded> {
    let sel = Selector {
        study: Some(study.clone()),
        ..Selector::default()
    };
    let rows: Vec<_> = selected(st, &sel)
        .await?
        .into_iter()
        .filter(|(_, _, v)| v.protocol == "dicom")
        .collect();
    let in_flight = rows
        .iter()
        .filter(|(_, _, v)| v.state == "in_flight")
        .count();
    if in_flight > 0 {
        bail!(
            "{in_flight} entries of this study are being sent right now; nothing was changed: run `keys shred` again in a moment"
        );
    }
    let (spool, uid) = (st.spool.clone(), study.clone());
    // The purge below deletes the key with the study's last object: ask first.
    let existed = tokio::task::spawn_blocking(move || spool.study_key_exists_blocking(&uid))
        .await
        .context("shred task")??;
    let mut out = Shredded::default();
    for (dest, entry, _) in rows {
        st.spool.purge(&dest, entry).await?;
        out.entries_purged += 1;
    }
    out.retained_purged = st.spool.purge_retained_study(study.clone()).await?;
    let spool = st.spool.clone();
    let r = tokio::task::spawn_blocking(move || spool.shred_study_key_blocking(&study))
        .await
        .context("shred task")??;
    out.key_shredded = existed || r.key_deleted;
    out.objects_left = r.objects_left;
    Ok(out)
}

/// Send one request to a node's admin socket and return the JSON body.
pub async fn request(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> anyhow::Result<serde_json::Value> {
    let stream = tokio::time::timeout(Duration::from_secs(5), UnixStream::connect(socket))
        .await
        .map_err(|_| anyhow::anyhow!("timed out connecting to {}", socket.display()))?
        .with_context(|| {
            format!(
                "cannot reach the node's admin socket {}: is the node running with this config, and are you allowed to read its data directory?",
                socket.display()
            )
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("admin socket handshake")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, "localhost")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .context("admin request")?;
    let resp = tokio::time::timeout(Duration::from_secs(120), sender.send_request(req))
        .await
        .map_err(|_| anyhow::anyhow!("the node did not answer in time"))?
        .context("admin request failed")?;
    let status = resp.status();
    let bytes = Limited::new(resp.into_body(), MAX_RESPONSE)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("admin response: {e}"))?
        .to_bytes();
    let v: serde_json::Value =
        serde_json::from_slice(&bytes).context("the admin response is not JSON")?;
    if !status.is_success() {
        bail!(
            "{}",
            v.get("error")
                .and_then(|e| e.as_str())
                .unwrap_or("the node refused the request")
        );
    }
    Ok(v)
}
