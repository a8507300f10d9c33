//! Dispatch: one worker per destination drains its persistent queue.
//!
//! The queue lives in the spool (RocksDB); this module keeps an in-memory index of it
//! (sequence → state) for scheduling. Invariants:
//! - an entry leaves the queue only through [`Spool::complete`], called after the
//!   destination confirmed the object;
//! - a failed send is retried with exponential backoff and jitter, capped at the
//!   destination's `retry_max_ms`; a restart resumes every entry still in the queue;
//! - a permanent refusal parks the entry (kept on disk, counted in metrics, never deleted);
//! - at most `concurrency` sends run at once; shutdown lets them finish.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::Destination;
use crate::deliver::Sender;
use crate::metrics::Metrics;
use crate::spool::{QueueEntry, Spool};

/// Why a send failed, and whether to try again.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SendError {
    /// Worth retrying (connection lost, peer busy, timeout...).
    #[error("{0}")]
    Transient(String),
    /// Retrying cannot help; park the entry for an operator.
    #[error("{0}")]
    Permanent(String),
}

/// Backoff delay before attempt `attempt` (1-based): exponential, capped, with jitter in
/// [50 %, 100 %] of the nominal delay.
pub fn backoff(initial: Duration, max: Duration, attempt: u32) -> Duration {
    let exp = attempt.saturating_sub(1).min(30);
    let nominal = initial.saturating_mul(1u32 << exp.min(20)).min(max);
    let jitter = 0.5 + fastrand::f64() * 0.5;
    nominal.mul_f64(jitter)
}

/// What a send task reports: the queue sequence, and the object's (bytes, received-at ms).
type SendOutcome = (u64, Result<(u64, u64), SendError>);

/// How long in-flight sends may run on after shutdown was requested.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Slot {
    entry: QueueEntry,
    attempts: u32,
    due: Instant,
    in_flight: bool,
}

/// Drain `dest`'s queue until `shutdown`.
pub async fn run(
    dest: Destination,
    sender: Arc<Sender>,
    spool: Spool,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let name = dest.name.clone();
    let initial = Duration::from_millis(dest.retry_initial_ms);
    let max = Duration::from_millis(dest.retry_max_ms);
    let concurrency = sender.concurrency();
    let (stored, mut rx) = match spool.subscribe(&name) {
        Ok(x) => x,
        Err(e) => {
            error!(destination = %name, error = %e, "cannot read the queue; destination disabled");
            return;
        }
    };
    let mut slots: BTreeMap<u64, Slot> = BTreeMap::new();
    let now = Instant::now();
    for entry in stored {
        slots.insert(
            entry.seq,
            Slot {
                entry,
                attempts: 0,
                due: now,
                in_flight: false,
            },
        );
    }
    if !slots.is_empty() {
        info!(destination = %name, queued = slots.len(), "resuming queue");
    }
    let depth = metrics.queue_depth.with_label_values(&[&name]);
    let parked = metrics.queue_parked.with_label_values(&[&name]);
    let mut tasks: JoinSet<SendOutcome> = JoinSet::new();
    // Log a failing destination once (warn) and its recovery once (info); per-object
    // retries go to debug, so a peer that is down does not flood the log.
    let mut failing = false;
    let mut stop_deadline: Option<Instant> = None;
    loop {
        depth.set(slots.values().filter(|s| !s.entry.parked).count() as i64);
        parked.set(slots.values().filter(|s| s.entry.parked).count() as i64);
        // Launch what is due, oldest first.
        let now = Instant::now();
        if !shutdown.is_cancelled() {
            for slot in slots.values_mut() {
                if tasks.len() >= concurrency {
                    break;
                }
                if slot.in_flight || slot.entry.parked || slot.due > now {
                    continue;
                }
                slot.in_flight = true;
                let sender = sender.clone();
                let spool = spool.clone();
                let entry = slot.entry;
                tasks.spawn(async move {
                    let result = async {
                        let reader = spool
                            .open_object(entry.object)
                            .await
                            .map_err(|e| SendError::Transient(format!("spool: {e}")))?;
                        let received = reader.meta.received_at_ms;
                        let bytes = reader.meta.length;
                        sender.send(reader).await?;
                        Ok((bytes, received))
                    }
                    .await;
                    (entry.seq, result)
                });
            }
        }
        let next_due = slots
            .values()
            .filter(|s| !s.in_flight && !s.entry.parked)
            .map(|s| s.due)
            .min();
        tokio::select! {
            _ = shutdown.cancelled(), if !shutdown.is_cancelled() => {
                debug!(destination = %name, in_flight = tasks.len(), "stopping after in-flight sends");
            }
            Some(entry) = rx.recv() => {
                slots.entry(entry.seq).or_insert(Slot { entry, attempts: 0, due: Instant::now(), in_flight: false });
            }
            Some(joined) = tasks.join_next() => {
                let Ok((seq, result)) = joined else { continue };
                let Some(slot) = slots.get_mut(&seq) else { continue };
                slot.in_flight = false;
                match result {
                    Ok((bytes, received_ms)) => {
                        let entry = slot.entry;
                        match spool.complete(&name, entry).await {
                            Ok(_) => {
                                slots.remove(&seq);
                                if failing {
                                    failing = false;
                                    info!(destination = %name, "destination recovered");
                                }
                                metrics.objects_delivered.with_label_values(&[&name]).inc();
                                metrics.bytes_delivered.with_label_values(&[&name]).inc_by(bytes);
                                let age_ms = crate::spool::now_ms().saturating_sub(received_ms);
                                metrics.delivery_seconds.with_label_values(&[&name]).observe(age_ms as f64 / 1000.0);
                                debug!(destination = %name, object = %entry.object, "delivered");
                            }
                            Err(e) => {
                                // Delivered but not recorded: it will be sent again (at least once).
                                error!(destination = %name, object = %entry.object, error = %e, "could not record delivery");
                                slot.attempts += 1;
                                slot.due = Instant::now() + backoff(initial, max, slot.attempts);
                            }
                        }
                    }
                    Err(SendError::Transient(msg)) => {
                        slot.attempts += 1;
                        let delay = backoff(initial, max, slot.attempts);
                        slot.due = Instant::now() + delay;
                        metrics.delivery_failures.with_label_values(&[&name, "transient"]).inc();
                        if failing {
                            debug!(destination = %name, object = %slot.entry.object, attempt = slot.attempts, retry_in_ms = delay.as_millis() as u64, reason = %msg, "delivery failed; will retry");
                        } else {
                            failing = true;
                            warn!(destination = %name, reason = %msg, queued = slots.len(), "destination failing; objects stay queued and are retried with backoff");
                        }
                    }
                    Err(SendError::Permanent(msg)) => {
                        metrics.delivery_failures.with_label_values(&[&name, "permanent"]).inc();
                        error!(destination = %name, object = %slot.entry.object, reason = %msg, "delivery refused permanently; object parked");
                        let entry = slot.entry;
                        if let Err(e) = spool.park(&name, entry).await {
                            error!(destination = %name, error = %e, "could not park entry");
                        }
                        slot.entry.parked = true;
                    }
                }
            }
            _ = sleep_until(next_due), if next_due.is_some() && tasks.len() < concurrency => {}
            _ = sleep_until(stop_deadline), if stop_deadline.is_some() => {}
        }
        if shutdown.is_cancelled() {
            let deadline = *stop_deadline.get_or_insert_with(|| Instant::now() + SHUTDOWN_GRACE);
            if tasks.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                // The objects stay queued; the peer deduplicates a transfer it already has.
                warn!(destination = %name, in_flight = tasks.len(), "abandoning in-flight sends at shutdown");
                tasks.abort_all();
                break;
            }
        }
    }
    sender.close().await;
    info!(destination = %name, "dispatcher stopped");
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

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let i = Duration::from_millis(100);
        let m = Duration::from_secs(5);
        for attempt in 1..40 {
            let d = backoff(i, m, attempt);
            let nominal = (i * 2u32.pow((attempt - 1).min(20))).min(m);
            assert!(d <= nominal, "attempt {attempt}: {d:?} > {nominal:?}");
            assert!(
                d >= nominal / 2,
                "attempt {attempt}: {d:?} < half of {nominal:?}"
            );
        }
        assert!(backoff(i, m, 30) <= m);
        let samples: std::collections::HashSet<_> = (0..20).map(|_| backoff(i, m, 3)).collect();
        assert!(samples.len() > 1, "no jitter");
    }
}
