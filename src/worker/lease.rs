//! The leases one worker holds, and the one task that renews them all. The task runs on its own Tokio task, so
//! busy stages cannot starve it, and renews every lease in one call. Its answers are how the worker hears
//! about a job: `CancelRequested` stops the job (it is then marked cancelled), `Lost` stops our copy, which
//! writes nothing more about it.
//!
//! The same tick writes the notes (progress, stage events, log lines) of jobs whose notes were held back longer
//! than [`super::sink::HOLD`] with nothing behind them to carry them out.
//!
//! It renews twice a second while it holds jobs, or every third of the lease when that is shorter: a renewal
//! is the only way a cancel asked from another process reaches the worker, and a cancelled job must stop
//! within 2 s. An idle worker holds nothing and sends no renewals.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::sink::QueueSink;
use crate::queue::{JobId, LeaseToken, Renewal};

/// Longest time between two renewals while jobs are held; it bounds how late a cancel is heard.
pub const CANCEL_CHECK: Duration = Duration::from_millis(500);

/// Why a held job was stopped before it ended by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Someone asked to cancel it: stop it and mark it cancelled.
    Cancel,
    /// The lease passed to another worker, or the job is gone: stop our copy and write nothing more.
    Lost,
    /// The worker is shutting down and the grace period is over: stop it and hand it back.
    Shutdown,
}

/// One job this worker holds.
#[derive(Debug)]
pub struct Held {
    /// The lease token every write about the job carries.
    pub token: LeaseToken,
    /// Cancelled to stop the job's run.
    pub cancel: CancellationToken,
    /// Where the job's notes are held back; `None` for a job handed back without running.
    pub sink: Option<Arc<QueueSink>>,
    stop: Mutex<Option<Stop>>,
    renewed: Mutex<Instant>,
    /// Set when the call that ends the lease (complete, fail, cancelled, release) is under way: a renewal that
    /// finds the lease gone meanwhile is that call's doing, not a loss.
    ending: AtomicBool,
}

impl Held {
    /// A job just taken with `token`.
    pub fn new(token: LeaseToken) -> Self {
        Self {
            token,
            cancel: CancellationToken::new(),
            sink: None,
            stop: Mutex::new(None),
            renewed: Mutex::new(Instant::now()),
            ending: AtomicBool::new(false),
        }
    }

    /// A job just taken with `token`, whose notes go through `sink`.
    pub fn with_sink(token: LeaseToken, sink: Arc<QueueSink>) -> Self {
        Self { sink: Some(sink), ..Self::new(token) }
    }

    /// Says that the call ending the lease is under way.
    pub fn ending(&self) {
        self.ending.store(true, Ordering::Release);
    }

    fn is_ending(&self) -> bool {
        self.ending.load(Ordering::Acquire)
    }

    /// Stops the job's run for `why`; the first reason wins.
    pub fn stop(&self, why: Stop) {
        self.stop.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get_or_insert(why);
        self.cancel.cancel();
    }

    /// Why it was stopped, if it was.
    pub fn why(&self) -> Option<Stop> {
        *self.stop.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// When the lease was last known to be ours.
    pub fn renewed(&self) -> Instant {
        *self.renewed.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn mark_renewed(&self) {
        *self.renewed.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Instant::now();
    }
}

/// Every job this worker holds, by id.
#[derive(Debug, Default)]
pub struct Leases {
    held: Mutex<HashMap<JobId, Arc<Held>>>,
}

impl Leases {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, Arc<Held>>> {
        self.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts renewing a job.
    pub fn insert(&self, id: &str, held: Arc<Held>) {
        self.lock().insert(id.to_string(), held);
    }

    /// Stops renewing a job.
    pub fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    /// How many jobs are held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Every held job.
    pub fn all(&self) -> Vec<(JobId, Arc<Held>)> {
        self.lock().iter().map(|(id, held)| (id.clone(), held.clone())).collect()
    }
}

/// How often to renew with leases of `lease`.
pub fn renew_every(lease: Duration) -> Duration {
    (lease / 3).min(CANCEL_CHECK).max(Duration::from_millis(20))
}

/// Renews every held lease until `done` fires, acting on what the queue says.
pub(super) async fn renew_loop(shared: Arc<Shared>, done: CancellationToken) {
    let every = renew_every(shared.options.lease);
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = done.cancelled() => return,
        }
        let held = shared.leases.all();
        if held.is_empty() {
            continue;
        }
        let pairs: Vec<(JobId, LeaseToken)> = held.iter().map(|(id, held)| (id.clone(), held.token.clone())).collect();
        let answers = match shared.queue.renew(&pairs).await {
            Ok(answers) => {
                shared.outage.ok();
                answers
            }
            Err(error) => {
                shared.outage.failed("renewing leases", &error);
                continue;
            }
        };
        for ((id, held), answer) in held.iter().zip(answers) {
            heard(id, held, answer);
        }
        for (_, held) in &held {
            if let Some(sink) = &held.sink
                && !held.is_ending()
                && held.why().is_none()
                && sink.flush_due()
            {
                let sink = sink.clone();
                tokio::spawn(async move { sink.flush().await });
            }
        }
    }
}

/// Acts on what a renewal said about one held job.
fn heard(id: &str, held: &Held, answer: Renewal) {
    match answer {
        Renewal::Held => held.mark_renewed(),
        Renewal::CancelRequested => {
            held.mark_renewed();
            if held.why().is_none() {
                tracing::info!(job = %id, "cancel asked: stopping the job");
            }
            held.stop(Stop::Cancel);
        }
        // The job's own ending call got there first: the lease ended, it was not lost.
        Renewal::Lost if held.is_ending() => {
            tracing::debug!(job = %id, "lease ended by its job's own final call while renewing");
        }
        Renewal::Lost => {
            if held.why() != Some(Stop::Lost) {
                tracing::warn!(
                    job = %id,
                    "lease lost (it expired and the job was recovered by another worker, or the job is gone): \
                     stopping our copy; nothing more is written about it"
                );
            }
            held.stop(Stop::Lost);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewals_come_often_enough_to_hear_a_cancel_within_two_seconds() {
        assert_eq!(renew_every(Duration::from_secs(30)), CANCEL_CHECK);
        assert_eq!(renew_every(Duration::from_millis(900)), Duration::from_millis(300));
        let held = Held::new(LeaseToken("t".into()));
        held.stop(Stop::Cancel);
        held.stop(Stop::Lost);
        assert_eq!(held.why(), Some(Stop::Cancel), "the first reason wins");
        assert!(held.cancel.is_cancelled());
    }

    #[test]
    fn a_renewal_racing_the_jobs_own_completion_is_not_a_lost_lease() {
        let held = Held::new(LeaseToken("t".into()));
        heard("job", &held, Renewal::Held);
        assert_eq!(held.why(), None);
        held.ending();
        heard("job", &held, Renewal::Lost);
        assert_eq!(held.why(), None, "the completion ended the lease; nothing is stopped");
        assert!(!held.cancel.is_cancelled());

        let other = Held::new(LeaseToken("u".into()));
        heard("job", &other, Renewal::Lost);
        assert_eq!(other.why(), Some(Stop::Lost), "without an ending call under way, a lost lease stops the copy");
        assert!(other.cancel.is_cancelled());
    }
}
