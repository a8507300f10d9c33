//! Dispatch: one worker per destination drains its persistent queue.
//!
//! The queue lives in the spool (RocksDB); this module keeps an in-memory index of it
//! (sequence → slot) for scheduling, and publishes each destination's state on the
//! [`Board`] that the admin interface reads.
//!
//! Invariants:
//! - an entry leaves the queue only through [`Spool::complete`] (after the destination
//!   confirmed the object) or an operator's purge;
//! - first attempts go in queue order; a retry goes when no first attempt is due (or once
//!   it has waited [`starvation_bound`] past its due time), before any later retry, so a
//!   failing entry never holds back the entries behind it (see [`pick`]);
//! - the failure taxonomy of [`DeliveryError`] decides everything:
//!   - *unavailable* (the destination is down or busy) opens the destination's circuit: no
//!     new attempts until its backoff (or the peer's `Retry-After`) has passed, then one
//!     probe; the object's own budget is not charged, so a long outage dead-letters nothing
//!     before `max_age`;
//!   - *transient* charges the object's budget; it is retried after an exponential,
//!     jittered, capped delay, and becomes a dead letter after `max_attempts` failures or
//!     once older than `max_age`;
//!   - *permanent* makes it a dead letter at once;
//!   - *local* (our own store failed) pauses the destination and is logged as an error; it
//!     never charges the object or the destination;
//! - failure records (attempt count and the last reasons) are stored with the entry, so a
//!   restart neither resets a budget nor forgets why a dead letter died;
//! - a dead letter is never retried until an operator replays it;
//! - a destination that is down costs no CPU (the worker sleeps until the circuit's next
//!   probe) and logs one warning when it starts failing and one line when it recovers;
//! - at most `concurrency` sends run at once; at shutdown no new send starts, and in-flight
//!   sends get [`SHUTDOWN_GRACE`] to finish (an abandoned one stays queued, and the next hop
//!   deduplicates the re-send).
//!
//! Cancellation: [`run`] is meant to be spawned; the spool operations it awaits run in
//! blocking tasks that finish even if it is dropped, and each is idempotent.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::{Destination, Order, RetryPolicy};
use crate::deliver::{DeliveryError, Sender};
use crate::metrics::Metrics;
use crate::spool::{EntryState, FailureRecord, QueueEntry, QueueEvent, Queued, Spool};

/// How long in-flight sends may run on after shutdown was requested.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Backoff delay before retry number `attempt` (1-based): `initial × multiplier^(n-1)`,
/// capped at `max`, with jitter in [50 %, 100 %] of the nominal delay.
pub fn backoff(initial: Duration, multiplier: f64, max: Duration, attempt: u32) -> Duration {
    let exp = attempt.saturating_sub(1).min(64) as i32;
    let nominal = initial
        .as_secs_f64()
        .mul_add(multiplier.powi(exp), 0.0)
        .min(max.as_secs_f64());
    let jitter = 0.5 + fastrand::f64() * 0.5;
    Duration::from_secs_f64((nominal * jitter).max(0.0))
}

/// A destination's circuit, as the admin interface shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Circuit {
    /// Sending normally.
    Closed,
    /// The destination failed: waiting before the next probe.
    Open,
    /// One probe is in flight; its outcome closes or reopens the circuit.
    HalfOpen,
}

/// One destination's state, as published for the admin interface.
#[derive(Debug, Clone, Serialize)]
pub struct DestinationStatus {
    /// The destination's name.
    pub name: String,
    /// Its kind (`gateway`, `dicom`, `folder`).
    pub kind: &'static str,
    /// Entries waiting (not dead), in flight included.
    pub queued: usize,
    /// Their bytes.
    pub queued_bytes: u64,
    /// Entries being sent now.
    pub in_flight: usize,
    /// Dead letters.
    pub dead: usize,
    /// Age of the oldest waiting entry, in seconds.
    pub oldest_age_seconds: Option<f64>,
    /// The circuit.
    pub circuit: Circuit,
    /// The last failure, with its kind.
    pub last_error: Option<String>,
    /// When it happened (ms since the epoch).
    pub last_error_at_ms: Option<u64>,
    /// Objects delivered since start.
    pub delivered: u64,
    /// The spool failed under this destination (see the logs): it is paused.
    pub local_failure: bool,
    /// Sequence numbers in flight (for the queue listing).
    #[serde(skip)]
    pub in_flight_seqs: Vec<u64>,
}

/// Every destination's published state. Cheap to clone.
#[derive(Clone, Default)]
pub struct Board {
    inner: Arc<Mutex<BTreeMap<String, DestinationStatus>>>,
}

impl Board {
    /// A snapshot of every destination, by name.
    pub fn snapshot(&self) -> Vec<DestinationStatus> {
        self.inner
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// A snapshot of one destination.
    pub fn get(&self, name: &str) -> Option<DestinationStatus> {
        self.inner.lock().ok().and_then(|m| m.get(name).cloned())
    }

    fn publish(&self, s: DestinationStatus) {
        if let Ok(mut m) = self.inner.lock() {
            m.insert(s.name.clone(), s);
        }
    }
}

#[derive(Debug)]
struct Slot {
    entry: QueueEntry,
    length: u64,
    /// Where its age counts from (ms since the epoch): its reception here, or for a resend
    /// the moment this dispatcher took it up (after a restart, that restart).
    received_at_ms: u64,
    /// The object's study ([`crate::spool::study_tag`]), for `order = "study"`; an HL7
    /// message's patient.
    study: u64,
    /// An HL7 message: strictly one at a time and in queue order within its patient.
    serial: bool,
    failures: FailureRecord,
    due: Instant,
    in_flight: bool,
}

/// What a send task reports: the entry, how long the attempt took, and its result.
type SendOutcome = (u64, Duration, Result<(), DeliveryError>);

/// The circuit breaker of one destination.
struct Breaker {
    state: Circuit,
    /// Consecutive openings (drives the probe backoff).
    opens: u32,
    /// When the next probe may start.
    until: Instant,
    /// How loudly openings and recoveries are logged.
    flaps: Flaps,
}

/// Openings of a circuit within this window of the last one logged at WARN are logged at
/// DEBUG, and counted in the next WARN.
const FLAP_WINDOW: Duration = Duration::from_secs(60);

/// The log of a circuit that flaps. A peer under backpressure (a site B answering 503
/// between successes) opens and closes the circuit many times a minute; each opening would
/// log a WARN and each recovery an INFO. At most one WARN per [`FLAP_WINDOW`] is logged; the
/// openings in between go to DEBUG and are counted in the next WARN (`flaps`), and a
/// recovery is logged at INFO only when its opening was.
#[derive(Debug, Default)]
struct Flaps {
    last_warn: Option<Instant>,
    quiet: u32,
    warned: bool,
}

impl Flaps {
    /// The circuit opened: `Some(quiet openings since the last WARN)` if this one is logged
    /// at WARN, `None` if at DEBUG.
    fn opened(&mut self, now: Instant) -> Option<u32> {
        if self
            .last_warn
            .is_some_and(|t| now.saturating_duration_since(t) < FLAP_WINDOW)
        {
            self.quiet = self.quiet.saturating_add(1);
            self.warned = false;
            None
        } else {
            self.last_warn = Some(now);
            self.warned = true;
            Some(std::mem::take(&mut self.quiet))
        }
    }

    /// The circuit closed: true if its opening was logged at WARN (log this at INFO).
    fn closed(&mut self) -> bool {
        std::mem::take(&mut self.warned)
    }
}

impl Breaker {
    /// May a send start now, and is it the probe?
    fn admit(&mut self, now: Instant, in_flight: usize) -> bool {
        match self.state {
            Circuit::Closed => true,
            Circuit::Open if now >= self.until && in_flight == 0 => {
                self.state = Circuit::HalfOpen;
                true
            }
            _ => false,
        }
    }

    fn success(&mut self) -> bool {
        let was_failing = self.state != Circuit::Closed;
        self.state = Circuit::Closed;
        self.opens = 0;
        was_failing
    }

    fn failure(&mut self, policy: &RetryPolicy, retry_after: Option<Duration>) -> Duration {
        if self.state == Circuit::Open {
            // A send that started before the circuit opened (up to `concurrency` of them
            // fail together when a destination goes away): it says nothing new, so it
            // neither grows the backoff nor delays the probe, except for a longer
            // Retry-After from the peer.
            if let Some(ra) = retry_after {
                self.until = self.until.max(Instant::now() + ra.min(policy.max_delay));
            }
            return self.until.saturating_duration_since(Instant::now());
        }
        self.opens = self.opens.saturating_add(1);
        let delay = retry_after
            .map(|d| d.min(policy.max_delay))
            .unwrap_or_else(|| {
                backoff(
                    policy.initial,
                    policy.multiplier,
                    policy.max_delay,
                    self.opens,
                )
            });
        self.state = Circuit::Open;
        self.until = Instant::now() + delay;
        delay
    }
}

/// Drain `dest`'s queue until `shutdown`.
pub async fn run(
    dest: Destination,
    sender: Arc<Sender>,
    spool: Spool,
    metrics: Arc<Metrics>,
    board: Board,
    shutdown: CancellationToken,
) {
    let name = dest.name.clone();
    let policy = dest.retry;
    let order = dest.order;
    let concurrency = sender.concurrency();
    let (stored, mut rx) = match spool.subscribe(&name).await {
        Ok(x) => x,
        Err(e) => {
            error!(destination = %name, error = %e, "cannot read the queue; destination disabled until restart");
            return;
        }
    };
    let mut slots: BTreeMap<u64, Slot> = BTreeMap::new();
    let now = Instant::now();
    // Each entry's attempt history, read off the async workers; an entry whose record
    // cannot be read starts with a fresh one (as a missing record does).
    let seqs: Vec<u64> = stored.iter().map(|q| q.entry.seq).collect();
    let n = seqs.len();
    let histories = {
        let (spool, name) = (spool.clone(), name.clone());
        tokio::task::spawn_blocking(move || {
            seqs.into_iter()
                .map(|seq| {
                    spool
                        .failure_blocking(&name, seq)
                        .ok()
                        .flatten()
                        .unwrap_or_default()
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_else(|_| vec![Default::default(); n])
    };
    for (q, failures) in stored.into_iter().zip(histories) {
        slots.insert(q.entry.seq, slot(q, failures, now));
    }
    if !slots.is_empty() {
        info!(destination = %name, queued = slots.len(), "resuming queue");
    }
    let mut status = DestinationStatus {
        name: name.clone(),
        kind: dest.kind.as_str(),
        queued: 0,
        queued_bytes: 0,
        in_flight: 0,
        dead: 0,
        oldest_age_seconds: None,
        circuit: Circuit::Closed,
        last_error: None,
        last_error_at_ms: None,
        delivered: 0,
        local_failure: false,
        in_flight_seqs: Vec::new(),
    };
    let mut breaker = Breaker {
        state: Circuit::Closed,
        opens: 0,
        until: now,
        flaps: Flaps::default(),
    };
    let depth = metrics.queue_objects.with_label_values(&[&name]);
    let dead_gauge = metrics.dead_letter_objects.with_label_values(&[&name]);
    let bytes_gauge = metrics.queue_bytes.with_label_values(&[&name]);
    let oldest_gauge = metrics.queue_oldest_age.with_label_values(&[&name]);
    let circuit_gauge = metrics.circuit_open.with_label_values(&[&name]);
    let mut tasks: JoinSet<SendOutcome> = JoinSet::new();
    let mut stop_deadline: Option<Instant> = None;
    // Some(until) after our own spool failed to read an object: no attempts until then,
    // then one probe (see `handle_failure`).
    let mut local_pause: Option<Instant> = None;
    loop {
        publish(
            &board,
            &mut status,
            &slots,
            breaker.state,
            local_pause.is_some(),
        );
        spool.set_destination_full(&name, status.queued >= dest.max_queue);
        depth.set(status.queued as i64);
        dead_gauge.set(status.dead as i64);
        bytes_gauge.set(status.queued_bytes as i64);
        oldest_gauge.set(status.oldest_age_seconds.unwrap_or(0.0));
        circuit_gauge.set(i64::from(
            status.circuit != Circuit::Closed || local_pause.is_some(),
        ));
        // Launch what is due, as far as the circuit and concurrency allow: first attempts in
        // queue order, then retries (see `pick`).
        let now = Instant::now();
        // Paused on a local failure: nothing until the pause is over, then one probe alone.
        let probing_local = local_pause.is_some();
        if !shutdown.is_cancelled() && local_pause.is_none_or(|until| now >= until) {
            let free = if probing_local {
                usize::from(tasks.is_empty())
            } else {
                concurrency.saturating_sub(tasks.len())
            };
            for seq in pick(&slots, now, starvation_bound(&policy), free, order) {
                if !breaker.admit(now, tasks.len()) {
                    break;
                }
                let Some(slot) = slots.get_mut(&seq) else {
                    continue;
                };
                slot.in_flight = true;
                let sender = sender.clone();
                let spool = spool.clone();
                let object = slot.entry.object;
                let resend = slot.entry.resend.then_some(seq);
                tasks.spawn(async move {
                    let started = Instant::now();
                    let result = match spool.open_object(object).await {
                        Ok(mut reader) => {
                            reader.resend_seq = resend;
                            sender.send(reader).await
                        }
                        Err(e) => Err(DeliveryError::from_spool(e)),
                    };
                    (seq, started.elapsed(), result)
                });
                if breaker.state == Circuit::HalfOpen {
                    break;
                }
            }
        }
        // Shutdown asked for (perhaps before the first turn): nothing in flight means done,
        // and the grace deadline must be armed before waiting, or nothing would wake us.
        if shutdown.is_cancelled() {
            stop_deadline.get_or_insert_with(|| Instant::now() + SHUTDOWN_GRACE);
            if tasks.is_empty() {
                break;
            }
        }
        let next_due = if let Some(until) = local_pause.filter(|u| *u > now) {
            Some(until)
        } else if breaker.state == Circuit::Open {
            Some(breaker.until)
        } else {
            slots
                .values()
                .filter(|s| !s.in_flight && s.entry.state == EntryState::Queued)
                .map(|s| s.due)
                .min()
        };
        // While probing after a local failure, the probe runs alone.
        let can_launch = tasks.len() < concurrency
            && breaker.state != Circuit::HalfOpen
            && (!probing_local || tasks.is_empty());
        tokio::select! {
            _ = shutdown.cancelled(), if !shutdown.is_cancelled() => {
                debug!(destination = %name, in_flight = tasks.len(), "stopping after in-flight sends");
            }
            Some(event) = rx.recv() => match event {
                QueueEvent::Added(q) => {
                    // A new entry, or a dead letter replayed with a fresh budget.
                    let now = Instant::now();
                    match slots.get_mut(&q.entry.seq) {
                        Some(s) if s.in_flight => {}
                        Some(s) => *s = slot(q, FailureRecord::default(), now),
                        None => { slots.insert(q.entry.seq, slot(q, FailureRecord::default(), now)); }
                    }
                }
                QueueEvent::Removed(seq) => {
                    if slots.get(&seq).is_some_and(|s| !s.in_flight) {
                        slots.remove(&seq);
                    }
                }
            },
            Some(joined) = tasks.join_next() => {
                let Ok((seq, took, result)) = joined else { continue };
                let Some(slot) = slots.get_mut(&seq) else { continue };
                slot.in_flight = false;
                match result {
                    Ok(()) => {
                        if breaker.success() {
                            if breaker.flaps.closed() {
                                info!(destination = %name, "destination recovered");
                            } else {
                                debug!(destination = %name, "destination recovered");
                            }
                        }
                        if local_pause.take().is_some() {
                            info!(destination = %name, "the spool reads again; the destination resumes");
                        }
                        let entry = slot.entry;
                        match spool.complete(&name, entry).await {
                            Ok(_) => {
                                let slot = slots.remove(&seq);
                                status.delivered += 1;
                                metrics.forwarded_objects.with_label_values(&[&name]).inc();
                                metrics.forward_duration.with_label_values(&[&name]).observe(took.as_secs_f64());
                                if let Some(s) = slot {
                                    metrics.forwarded_bytes.with_label_values(&[&name]).inc_by(s.length);
                                    let age_ms = crate::spool::now_ms().saturating_sub(s.received_at_ms);
                                    metrics.end_to_end.with_label_values(&[&name]).observe(age_ms as f64 / 1000.0);
                                    // One line per delivered object; the id is random, never a UID.
                                    info!(destination = %name, object = %entry.object, bytes = s.length, attempts = s.failures.attempts + 1, send_ms = took.as_millis() as u64, end_to_end_ms = age_ms, "delivered");
                                }
                            }
                            Err(e) => {
                                // Delivered but not recorded: it is sent again (at least once),
                                // and the next hop deduplicates it.
                                error!(destination = %name, object = %entry.object, error = %e, "could not record a delivery");
                                slot.due = Instant::now() + policy.max_delay;
                            }
                        }
                    }
                    Err(err) => {
                        metrics
                            .forward_failures
                            .with_label_values(&[&name, err.reason()])
                            .inc();
                        if matches!(err.reason(), "integrity" | "missing_data") {
                            metrics.integrity_failures.with_label_values(&["spool"]).inc();
                        }
                        status.last_error = Some(err.to_string());
                        status.last_error_at_ms = Some(crate::spool::now_ms());
                        // Any answer but a local failure means our spool read the object.
                        if !matches!(err, DeliveryError::Local { .. }) && local_pause.take().is_some() {
                            info!(destination = %name, "the spool reads again; the destination resumes");
                        }
                        handle_failure(&name, &policy, &spool, &mut breaker, &mut local_pause, slot, err).await;
                    }
                }
            }
            _ = sleep_until(next_due), if next_due.is_some() && can_launch => {}
            _ = sleep_until(stop_deadline), if stop_deadline.is_some() => {}
        }
        if shutdown.is_cancelled() {
            let deadline = *stop_deadline.get_or_insert_with(|| Instant::now() + SHUTDOWN_GRACE);
            if tasks.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                // The objects stay queued; the next hop deduplicates a transfer it already has.
                warn!(destination = %name, in_flight = tasks.len(), "abandoning in-flight sends at shutdown; they stay queued");
                tasks.abort_all();
                // Aborted tasks end at their next await; reap them, so that none still
                // holds the sender when it is closed below.
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    while tasks.join_next().await.is_some() {}
                })
                .await;
                break;
            }
        }
    }
    for s in slots.values_mut() {
        s.in_flight = false;
    }
    publish(
        &board,
        &mut status,
        &slots,
        breaker.state,
        local_pause.is_some(),
    );
    sender.close().await;
    info!(destination = %name, "dispatcher stopped");
}

/// How long past its due time a retry may wait behind first attempts before it goes first.
/// It bounds the wait of a retry on a destination that never runs dry (a retry spends no
/// attempt while it waits, but its `max_age` runs on).
fn starvation_bound(policy: &RetryPolicy) -> Duration {
    policy.max_delay.max(Duration::from_secs(60))
}

/// The entries to launch now, at most `n`, in launch order:
/// 1. due entries on their first attempt (no transient failure counted yet), in queue order,
///    and retries overdue by more than `bound`;
/// 2. then due retries, in queue order.
///
/// A retry keeps its place among the retries, but it never holds back an object that has
/// not been tried yet: on a single association, two objects a PACS keeps aborting would
/// otherwise take turns ahead of everything behind them until both were dead letters.
///
/// With [`Order::Study`], a study has at most one entry in flight, so the next hop receives
/// (and queues) its objects in the order they came; and an entry queued after a retry of
/// its own study (one with a failure counted that is not a dead letter, due or not, in
/// flight or not) is not picked: the rest of a study waits for its failing object. Other
/// studies go on in parallel.
///
/// HL7 messages (`serial` slots) go strictly in order within their patient under either
/// order: only a patient's first waiting message is ever picked, so the next one starts
/// only once it was delivered or became a dead letter.
fn pick(
    slots: &BTreeMap<u64, Slot>,
    now: Instant,
    bound: Duration,
    n: usize,
    order: Order,
) -> Vec<u64> {
    let mut held = std::collections::HashSet::new();
    let mut behind = std::collections::HashSet::new();
    // Studies picked (or in flight): none of their other entries goes now.
    let mut taken = std::collections::HashSet::new();
    // HL7 messages, whatever the order setting: only the first waiting message of each
    // patient may go (in flight, being retried or due), so a patient's messages reach the
    // next hop one at a time and in the order they were received. Dead letters hold
    // nothing.
    let mut serial_head = std::collections::HashSet::new();
    for s in slots.values() {
        if s.serial && s.entry.state == EntryState::Queued && !serial_head.insert(s.study) {
            behind.insert(s.entry.seq);
        }
    }
    if order == Order::Study {
        for s in slots.values() {
            if s.in_flight {
                taken.insert(s.study);
            }
            if s.entry.state != EntryState::Queued {
                continue;
            }
            if held.contains(&s.study) {
                behind.insert(s.entry.seq);
            } else if s.failures.attempts > 0 {
                held.insert(s.study);
            }
        }
    }
    let due = |s: &&Slot| {
        !s.in_flight
            && s.entry.state == EntryState::Queued
            && s.due <= now
            && !behind.contains(&s.entry.seq)
    };
    let starved = now.checked_sub(bound);
    let first = |s: &&Slot| s.failures.attempts == 0 || starved.is_some_and(|t| s.due <= t);
    let mut out = Vec::new();
    for firsts in [true, false] {
        for s in slots.values().filter(due).filter(|s| first(s) == firsts) {
            if out.len() >= n {
                return out;
            }
            if order == Order::Study && !taken.insert(s.study) {
                continue;
            }
            out.push(s.entry.seq);
        }
    }
    out
}

fn slot(q: Queued, mut failures: FailureRecord, now: Instant) -> Slot {
    // An operator's replay or resend starts a fresh budget; keeping its start in the
    // failure record keeps it fresh when a later failure is stored and read back.
    failures.budget_from_ms = failures.budget_from_ms.or(q.budget_from_ms);
    Slot {
        // Where its age (max_age, the oldest-entry gauge, end-to-end latency) counts from:
        // the fresh budget's start, or else its reception here. (A resend written before
        // budgets were stored counts from now.)
        received_at_ms: match failures.budget_from_ms {
            Some(t) => t,
            None if q.entry.resend => crate::spool::now_ms(),
            None => q.received_at_ms,
        },
        entry: q.entry,
        length: q.length,
        study: q.study,
        serial: q.serial,
        failures,
        due: now,
        in_flight: false,
    }
}

/// Apply the failure taxonomy to one failed attempt.
async fn handle_failure(
    name: &str,
    policy: &RetryPolicy,
    spool: &Spool,
    breaker: &mut Breaker,
    local_pause: &mut Option<Instant>,
    slot: &mut Slot,
    err: DeliveryError,
) {
    let object = slot.entry.object;
    match &err {
        DeliveryError::Unavailable { retry_after, .. } => {
            let was = breaker.state;
            let delay = breaker.failure(policy, *retry_after);
            slot.due = Instant::now();
            if was == Circuit::Closed {
                match breaker.flaps.opened(Instant::now()) {
                    Some(flaps) => {
                        warn!(destination = %name, error = %err, retry_in_ms = delay.as_millis() as u64, flaps, "destination failing; objects stay queued and the destination is probed with backoff (flaps: quieter openings since the last such line)")
                    }
                    None => {
                        debug!(destination = %name, error = %err, retry_in_ms = delay.as_millis() as u64, "destination failing again")
                    }
                }
            } else {
                debug!(destination = %name, error = %err, retry_in_ms = delay.as_millis() as u64, "probe failed");
            }
            // A long outage still ends in a dead letter for objects past their age budget,
            // when their turn to probe comes.
            if age_spent(policy, slot) {
                slot.failures.push(&err.to_string());
                dead_letter(
                    name,
                    spool,
                    slot,
                    "its retry time budget (max_age) is spent",
                )
                .await;
            }
        }
        DeliveryError::Transient { .. } => {
            slot.failures.push(&err.to_string());
            let attempts = slot.failures.attempts;
            if attempts >= policy.max_attempts || age_spent(policy, slot) {
                dead_letter(name, spool, slot, "its retry budget is spent").await;
            } else {
                let delay = backoff(
                    policy.initial,
                    policy.multiplier,
                    policy.max_delay,
                    attempts,
                );
                slot.due = Instant::now() + delay;
                if let Err(e) = spool
                    .record_failure(name, slot.entry.seq, &slot.failures)
                    .await
                {
                    debug!(destination = %name, error = %e, "could not record a failed attempt");
                }
                debug!(destination = %name, %object, attempt = attempts, retry_in_ms = delay.as_millis() as u64, error = %err, "attempt failed; will retry");
            }
        }
        DeliveryError::Permanent { .. } => {
            slot.failures.push(&err.to_string());
            dead_letter(name, spool, slot, "the destination refused it").await;
        }
        // Our own storage failed: stop the destination (no other object is tried, none is
        // charged), alert once, and probe with one object every `max_delay`.
        DeliveryError::Local { .. } => {
            if local_pause.is_none() {
                error!(destination = %name, %object, error = %err, "the spool failed while reading an object; the destination is paused and probed every max_delay (check the disk and the logs; dicom_gateway_circuit_open is 1 meanwhile)");
            }
            let until = Instant::now() + policy.max_delay;
            *local_pause = Some(until);
            slot.due = until;
        }
    }
}

fn age_spent(policy: &RetryPolicy, slot: &Slot) -> bool {
    let age = crate::spool::now_ms().saturating_sub(slot.received_at_ms);
    Duration::from_millis(age) >= policy.max_age
}

async fn dead_letter(name: &str, spool: &Spool, slot: &mut Slot, why: &str) {
    let reason = slot.failures.last_reason().unwrap_or("").to_owned();
    match spool.dead_letter(name, slot.entry, &slot.failures).await {
        Ok(()) => {
            slot.entry.state = EntryState::Dead;
            warn!(destination = %name, object = %slot.entry.object, attempts = slot.failures.attempts, %reason, "dead letter: {why}; it stays on disk until an operator replays or purges it (dicom-gateway queue list --dead)");
        }
        Err(e) => {
            // Not recorded: keep it waiting, with a long delay, rather than drop it.
            error!(destination = %name, object = %slot.entry.object, error = %e, "could not record a dead letter");
            slot.due = Instant::now() + Duration::from_secs(60);
        }
    }
}

fn publish(
    board: &Board,
    status: &mut DestinationStatus,
    slots: &BTreeMap<u64, Slot>,
    circuit: Circuit,
    local_failure: bool,
) {
    let now = crate::spool::now_ms();
    let (mut queued, mut bytes, mut in_flight, mut dead) = (0, 0, 0, 0);
    let mut oldest: Option<u64> = None;
    let mut seqs = Vec::new();
    for s in slots.values() {
        match s.entry.state {
            EntryState::Dead => dead += 1,
            EntryState::Queued => {
                queued += 1;
                bytes += s.length;
                oldest = Some(oldest.map_or(s.received_at_ms, |o| o.min(s.received_at_ms)));
            }
        }
        if s.in_flight {
            in_flight += 1;
            seqs.push(s.entry.seq);
        }
    }
    status.queued = queued;
    status.queued_bytes = bytes;
    status.in_flight = in_flight;
    status.dead = dead;
    status.oldest_age_seconds = oldest.map(|o| now.saturating_sub(o) as f64 / 1000.0);
    status.circuit = circuit;
    status.local_failure = local_failure;
    status.in_flight_seqs = seqs;
    board.publish(status.clone());
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_slot(seq: u64, attempts: u32, due: Instant) -> Slot {
        Slot {
            entry: QueueEntry {
                seq,
                object: crate::spool::ObjectId([seq as u8; 16]),
                state: EntryState::Queued,
                resend: false,
            },
            length: 1,
            received_at_ms: 0,
            study: 0,
            serial: false,
            failures: FailureRecord {
                attempts,
                ..FailureRecord::default()
            },
            due,
            in_flight: false,
        }
    }

    #[test]
    fn retries_go_after_first_attempts_and_keep_their_order() {
        let now = Instant::now();
        let bound = Duration::from_secs(60);
        let mut slots = BTreeMap::new();
        // Two retries at the head of the queue (due now), then three untried entries, one
        // of them in flight and one not due yet, then a dead letter.
        slots.insert(1, test_slot(1, 2, now));
        slots.insert(2, test_slot(2, 1, now - Duration::from_secs(5)));
        for seq in 3..=5 {
            slots.insert(seq, test_slot(seq, 0, now));
        }
        slots.insert(6, test_slot(6, 0, now + Duration::from_secs(1)));
        if let Some(s) = slots.get_mut(&4) {
            s.in_flight = true;
        }
        let mut dead = test_slot(7, 0, now);
        dead.entry.state = EntryState::Dead;
        slots.insert(7, dead);
        // Untried first, in queue order; then the retries, in queue order.
        assert_eq!(pick(&slots, now, bound, 1, Order::Arrival), vec![3]);
        assert_eq!(
            pick(&slots, now, bound, 10, Order::Arrival),
            vec![3, 5, 1, 2]
        );
        // A retry that waited past the bound goes first again.
        slots.insert(2, test_slot(2, 1, now - Duration::from_secs(61)));
        assert_eq!(pick(&slots, now, bound, 2, Order::Arrival), vec![2, 3]);
        assert_eq!(
            pick(&slots, now, bound, 0, Order::Arrival),
            Vec::<u64>::new()
        );
        assert_eq!(
            starvation_bound(&RetryPolicy::default()),
            Duration::from_secs(300)
        );
    }

    /// `order = "study"`: while an object is retried, the later objects of its study wait
    /// (in flight or not, due or not, it holds them); other studies go on; a dead letter
    /// holds nothing. `order = "arrival"` on the same queue lets them all go.
    #[test]
    fn in_study_order_a_retry_holds_the_rest_of_its_study() {
        let now = Instant::now();
        let bound = Duration::from_secs(60);
        let mut slots = BTreeMap::new();
        let mut put = |seq: u64, study: u64, attempts: u32, due: Instant| {
            let mut s = test_slot(seq, attempts, due);
            s.study = study;
            slots.insert(seq, s);
        };
        // Study 1: its second object is being retried (not due yet); study 2 untouched;
        // study 3: its head is a dead letter.
        put(1, 1, 0, now);
        put(2, 1, 2, now + Duration::from_secs(5));
        put(3, 2, 0, now);
        put(4, 1, 0, now);
        put(5, 3, 1, now);
        put(6, 2, 0, now);
        put(7, 1, 0, now);
        put(8, 3, 0, now);
        if let Some(s) = slots.get_mut(&5) {
            s.entry.state = EntryState::Dead;
        }
        assert_eq!(
            pick(&slots, now, bound, 10, Order::Study),
            vec![1, 3, 8],
            "4 and 7 wait behind 2, 6 behind 3 (one in flight per study); 8 is not held by \
             a dead letter"
        );
        assert_eq!(
            pick(&slots, now, bound, 10, Order::Arrival),
            vec![1, 3, 4, 6, 7, 8]
        );
        // The retry comes due: it goes (after the first attempts), and still holds its study
        // while it is in flight.
        if let Some(s) = slots.get_mut(&2) {
            s.due = now;
        }
        assert_eq!(pick(&slots, now, bound, 10, Order::Study), vec![1, 3, 8]);
        slots.remove(&1);
        assert_eq!(
            pick(&slots, now, bound, 10, Order::Study),
            vec![3, 8, 2],
            "the retry goes after the first attempts"
        );
        if let Some(s) = slots.get_mut(&2) {
            s.in_flight = true;
        }
        assert_eq!(pick(&slots, now, bound, 10, Order::Study), vec![3, 8]);
        // 3 in flight too: 6 waits for it.
        if let Some(s) = slots.get_mut(&3) {
            s.in_flight = true;
        }
        assert_eq!(pick(&slots, now, bound, 10, Order::Study), vec![8]);
        // Delivered (removed): the rest of each study goes, one at a time, in queue order.
        slots.remove(&2);
        slots.remove(&3);
        assert_eq!(pick(&slots, now, bound, 10, Order::Study), vec![4, 6, 8]);
        assert_eq!(pick(&slots, now, bound, 2, Order::Study), vec![4, 6]);
    }

    /// HL7 messages: one patient's go one at a time in queue order, whatever the order
    /// setting; other patients (and DICOM objects) are not held. Sabotage-checked: without
    /// the serial rule, 2 and 5 are picked alongside 1.
    #[test]
    fn hl7_messages_go_one_at_a_time_in_order_per_patient() {
        let now = Instant::now();
        let bound = Duration::from_secs(60);
        let mut slots = BTreeMap::new();
        for (seq, patient) in [(1, 7), (2, 7), (3, 8), (4, 0), (5, 7)] {
            let mut s = test_slot(seq, 0, now);
            s.study = patient;
            s.serial = patient != 0;
            slots.insert(seq, s);
        }
        for order in [Order::Arrival, Order::Study] {
            assert_eq!(pick(&slots, now, bound, 10, order), vec![1, 3, 4]);
        }
        // In flight: nothing else of patient 7 goes.
        slots.get_mut(&1).unwrap().in_flight = true;
        assert_eq!(pick(&slots, now, bound, 10, Order::Arrival), vec![3, 4]);
        // Failed and waiting for its retry: still nothing behind it.
        let s = slots.get_mut(&1).unwrap();
        s.in_flight = false;
        s.failures.attempts = 1;
        s.due = now + Duration::from_secs(5);
        assert_eq!(pick(&slots, now, bound, 10, Order::Arrival), vec![3, 4]);
        // A dead letter holds nothing: the next message of the patient goes.
        slots.get_mut(&1).unwrap().entry.state = EntryState::Dead;
        assert_eq!(pick(&slots, now, bound, 10, Order::Arrival), vec![2, 3, 4]);
    }

    /// A dispatcher whose stop came before its first turn (a node that failed to start, or
    /// stopped at once) returns, and so lets go of the spool.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dispatcher_cancelled_before_it_starts_returns() {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = tempfile::tempdir().unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let spool = Spool::open_blocking(
            &tmp.path().join("spool"),
            keystore::Kek::from_bytes([2; 32]),
            crate::spool::SpoolOptions::default(),
        )
        .unwrap();
        let dest = Destination {
            name: "out".into(),
            kind: crate::config::DestinationKind::Folder {
                path: tmp.path().join("out"),
            },
            retry: RetryPolicy::default(),
            send_timeout: Duration::from_secs(60),
            max_queue: 100,
            order: Order::Arrival,
        };
        let sender = Arc::new(Sender::from_config(&dest, "node", None).unwrap());
        let stop = CancellationToken::new();
        stop.cancel();
        let run = run(
            dest,
            sender,
            spool,
            Arc::new(Metrics::new()),
            Board::default(),
            stop,
        );
        tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .expect("a cancelled dispatcher must return");
    }

    /// Our own spool failing to read an object pauses the destination: no other object is
    /// tried meanwhile, nothing is charged, the pause shows in status and in
    /// `circuit_open`, and one probe after `max_delay` resumes it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_local_read_failure_pauses_the_destination_until_a_probe_reads() {
        use std::os::unix::fs::PermissionsExt as _;
        let _scenario = fail::FailScenario::setup();
        let tmp = tempfile::tempdir().unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let spool = Spool::open_blocking(
            &tmp.path().join("spool"),
            keystore::Kek::from_bytes([2; 32]),
            crate::spool::SpoolOptions {
                failpoints: true,
                ..crate::spool::SpoolOptions::default()
            },
        )
        .unwrap();
        for i in 1..=4 {
            let o =
                crate::demo::generate_object("1.2.40", "1.2.40.1", i, "LOCAL^FAIL", 2000).unwrap();
            let mut w = spool
                .writer(crate::spool::Ingest {
                    sop_class: o.sop_class.clone(),
                    sop_instance: o.sop_instance.clone(),
                    transfer_syntax: o.transfer_syntax.clone(),
                    source: "TEST".into(),
                    routes: vec!["out".into()],
                    dedup: None,
                    strict_uid_match: false,
                })
                .unwrap();
            w.write(&o.dataset).await.unwrap();
            w.commit().await.unwrap();
        }
        let out = tmp.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let files = || std::fs::read_dir(&out).unwrap().count();
        let dest = |max_delay: Duration| Destination {
            name: "out".into(),
            kind: crate::config::DestinationKind::Folder { path: out.clone() },
            retry: RetryPolicy {
                initial: Duration::from_millis(10),
                max_delay,
                ..RetryPolicy::default()
            },
            send_timeout: Duration::from_secs(60),
            max_queue: 100,
            order: Order::Arrival,
        };
        let start = |max_delay: Duration, metrics: Arc<Metrics>, board: Board| {
            let d = dest(max_delay);
            let sender = Arc::new(Sender::from_config(&d, "node", None).unwrap());
            let stop = CancellationToken::new();
            let task = tokio::spawn(run(d, sender, spool.clone(), metrics, board, stop.clone()));
            (stop, task)
        };
        let local = |m: &Metrics| {
            m.forward_failures
                .with_label_values(&["out", "local_storage"])
                .get()
        };
        async fn until(f: impl Fn() -> bool) {
            tokio::time::timeout(Duration::from_secs(30), async {
                while !f() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await
            .expect("timed out");
        }

        // The first two reads fail (the folder sender has two in flight at once); the
        // pause is an hour long.
        fail::cfg("spool::read::open", "2*return").unwrap();
        let metrics = Arc::new(Metrics::new());
        let board = Board::default();
        let (stop, task) = start(Duration::from_secs(3600), metrics.clone(), board.clone());
        until(|| local(&metrics) >= 1).await;
        until(|| board.get("out").is_some_and(|s| s.local_failure)).await;
        // Reads work again from the third on, so any object tried now would be delivered
        // at once: none may be while the destination is paused.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            files(),
            0,
            "objects were tried while the destination was paused"
        );
        assert_eq!(
            metrics.circuit_open.with_label_values(&["out"]).get(),
            1,
            "the pause shows in circuit_open"
        );
        stop.cancel();
        task.await.unwrap();
        fail::remove("spool::read::open");
        // Nothing was charged to the objects.
        let (q, _rx) = spool.subscribe("out").await.unwrap();
        assert_eq!(q.len(), 4);
        for e in &q {
            assert_eq!(spool.failure_blocking("out", e.entry.seq).unwrap(), None);
        }
        drop(q);

        // With a short pause, one probe reads and the destination resumes.
        fail::cfg("spool::read::open", "1*return").unwrap();
        let metrics = Arc::new(Metrics::new());
        let board = Board::default();
        let (stop, task) = start(Duration::from_millis(200), metrics.clone(), board.clone());
        until(|| files() == 4).await;
        assert_eq!(local(&metrics), 1);
        until(|| {
            board
                .get("out")
                .is_some_and(|s| !s.local_failure && s.queued == 0)
        })
        .await;
        assert_eq!(metrics.circuit_open.with_label_values(&["out"]).get(), 0);
        stop.cancel();
        task.await.unwrap();
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let i = Duration::from_millis(100);
        let m = Duration::from_secs(5);
        for attempt in 1..40 {
            let d = backoff(i, 2.0, m, attempt);
            let nominal = (i * 2u32.pow((attempt - 1).min(20))).min(m);
            assert!(
                d <= nominal + Duration::from_millis(1),
                "attempt {attempt}: {d:?} > {nominal:?}"
            );
            assert!(
                d + Duration::from_millis(1) >= nominal / 2,
                "attempt {attempt}: {d:?} < half of {nominal:?}"
            );
        }
        assert!(backoff(i, 2.0, m, 30) <= m);
        assert!(backoff(i, 3.0, Duration::from_secs(3600), 3) >= Duration::from_millis(450));
        let samples: std::collections::HashSet<_> =
            (0..20).map(|_| backoff(i, 2.0, m, 3)).collect();
        assert!(samples.len() > 1, "no jitter");
    }

    /// A resend's age counts from when it was queued again, not from the study's first
    /// arrival: an old study resent is not past max_age (sabotage: using the stored
    /// reception time fails this), while the original entry of an equally old object is.
    /// A replayed dead letter (a fresh budget stored by the spool) is not aged by its first
    /// arrival either, and its slot keeps the budget's start in the failure record it will
    /// store, so a restart after its next failure does not age it again.
    #[test]
    fn a_resend_or_replay_is_not_aged_by_its_first_arrival() {
        let policy = RetryPolicy {
            max_age: Duration::from_secs(3600),
            ..RetryPolicy::default()
        };
        let week_ago = crate::spool::now_ms() - 7 * 24 * 3600 * 1000;
        let queued = |resend, budget_from_ms| Queued {
            entry: QueueEntry {
                seq: 1,
                object: crate::spool::ObjectId([1; 16]),
                state: EntryState::Queued,
                resend,
            },
            length: 1,
            received_at_ms: week_ago,
            budget_from_ms,
            study: 0,
            serial: false,
        };
        let now = Instant::now();
        let none = FailureRecord::default;
        assert!(age_spent(&policy, &slot(queued(false, None), none(), now)));
        let resent = slot(queued(true, None), none(), now);
        assert!(!age_spent(&policy, &resent));
        // The oldest-entry gauge and end-to-end latency read the same clock.
        assert!(crate::spool::now_ms().saturating_sub(resent.received_at_ms) < 60_000);
        // A replay, as the spool announces it (the event carries the fresh budget) ...
        let fresh = FailureRecord::fresh_from_now();
        let replayed = slot(queued(false, fresh.budget_from_ms), none(), now);
        assert!(!age_spent(&policy, &replayed));
        assert_eq!(replayed.failures.budget_from_ms, fresh.budget_from_ms);
        // ... and as a restart reads it back from the stored failure record.
        let mut stored = fresh.clone();
        stored.push("peer unavailable");
        let reread = slot(queued(false, None), stored, now);
        assert!(!age_spent(&policy, &reread));
        assert_eq!(reread.failures.attempts, 1);
    }

    #[test]
    fn the_breaker_admits_one_probe_after_its_delay() {
        let policy = RetryPolicy {
            initial: Duration::from_millis(50),
            ..RetryPolicy::default()
        };
        let now = Instant::now();
        let mut b = Breaker {
            state: Circuit::Closed,
            opens: 0,
            until: now,
            flaps: Flaps::default(),
        };
        assert!(b.admit(now, 5));
        let d = b.failure(&policy, None);
        assert_eq!(b.state, Circuit::Open);
        assert!(
            !b.admit(Instant::now(), 0),
            "open: no send before the delay"
        );
        let later = Instant::now() + d + Duration::from_millis(1);
        assert!(!b.admit(later, 1), "not while another send is in flight");
        assert!(b.admit(later, 0), "one probe after the delay");
        assert_eq!(b.state, Circuit::HalfOpen);
        assert!(!b.admit(later, 0), "only one probe");
        assert!(b.success());
        assert_eq!(b.state, Circuit::Closed);
        let d = b.failure(&policy, Some(Duration::from_secs(7)));
        assert_eq!(d, Duration::from_secs(7), "Retry-After is honoured");
    }

    /// Found by the power-cut test: 20 sends in flight failing together grew the backoff
    /// 20 times (to `max_delay`), so a peer that came back seconds later waited minutes.
    #[test]
    fn sends_failing_together_open_the_circuit_once() {
        let policy = RetryPolicy {
            initial: Duration::from_millis(100),
            max_delay: Duration::from_secs(300),
            ..RetryPolicy::default()
        };
        let mut b = Breaker {
            state: Circuit::Closed,
            opens: 0,
            until: Instant::now(),
            flaps: Flaps::default(),
        };
        let first = b.failure(&policy, None);
        for _ in 0..31 {
            let d = b.failure(&policy, None);
            assert!(d <= first, "{d:?} > {first:?}");
        }
        assert_eq!(b.opens, 1);
        assert!(first <= Duration::from_millis(100));
        // The probe's failure is what grows the backoff.
        b.state = Circuit::HalfOpen;
        b.failure(&policy, None);
        assert_eq!(b.opens, 2);
    }

    /// Seen in the scale-out test: a site B under backpressure answers 503 between
    /// successes, and each opening logged a WARN (about 21 a run). One WARN per window now,
    /// counting the quiet ones; a recovery is loud only when its opening was.
    #[test]
    fn a_flapping_circuit_warns_once_per_window() {
        let mut f = Flaps::default();
        let t0 = Instant::now();
        assert_eq!(f.opened(t0), Some(0), "the first opening warns");
        assert!(f.closed(), "and so does its recovery");
        for i in 1..=20 {
            assert_eq!(f.opened(t0 + Duration::from_secs(i)), None);
            assert!(!f.closed());
        }
        assert_eq!(
            f.opened(t0 + FLAP_WINDOW),
            Some(20),
            "after the window: a WARN that counts the quiet openings"
        );
        assert!(f.closed());
        assert_eq!(
            f.opened(t0 + FLAP_WINDOW * 2 + Duration::from_secs(1)),
            Some(0)
        );
    }
}
