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
    use crate::queue::memory::MemoryQueue;
    use crate::queue::{Queue, QueueSettings};
    use crate::worker::checkpoints::tests::take_one;

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

    #[test]
    fn leases_hold_what_was_inserted_until_it_is_removed() {
        let leases = Leases::default();
        assert!(leases.is_empty());
        assert_eq!(leases.len(), 0);
        leases.insert("a", Arc::new(Held::new(LeaseToken("ta".into()))));
        leases.insert("b", Arc::new(Held::new(LeaseToken("tb".into()))));
        assert!(!leases.is_empty());
        assert_eq!(leases.len(), 2);
        let mut all: Vec<(JobId, String)> =
            leases.all().into_iter().map(|(id, held)| (id, held.token.0.clone())).collect();
        all.sort();
        assert_eq!(all, [("a".to_string(), "ta".to_string()), ("b".to_string(), "tb".to_string())]);
        leases.remove("a");
        assert_eq!(leases.len(), 1);
        assert_eq!(leases.all().first().map(|(id, _)| id.as_str()), Some("b"), "the other job is still renewed");
        leases.remove("b");
        assert!(leases.is_empty());
    }

    #[test]
    fn a_held_or_cancel_asked_answer_marks_the_lease_renewed_and_a_lost_one_does_not() {
        let held = Held::new(LeaseToken("t".into()));
        let taken = held.renewed();
        std::thread::sleep(Duration::from_millis(5));
        heard("job", &held, Renewal::Held);
        let renewed = held.renewed();
        assert!(renewed > taken, "a held lease was extended");
        std::thread::sleep(Duration::from_millis(5));
        heard("job", &held, Renewal::CancelRequested);
        let asked = held.renewed();
        assert!(asked > renewed, "a lease whose job is asked to cancel was extended too");
        assert_eq!(held.why(), Some(Stop::Cancel));
        std::thread::sleep(Duration::from_millis(5));
        heard("job", &held, Renewal::Lost);
        assert_eq!(held.renewed(), asked, "a lost lease was not extended");
    }

    /// Log output, for tests that count warnings.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Capture {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_lost_lease_and_an_asked_cancel_are_logged_once_not_on_every_renewal() {
        let capture = Capture::default();
        let writer = capture.clone();
        let subscriber = tracing_subscriber::fmt().with_ansi(false).with_writer(move || writer.clone()).finish();
        tracing::subscriber::with_default(subscriber, || {
            let (lost, cancelled) = (Held::new(LeaseToken("t".into())), Held::new(LeaseToken("u".into())));
            for _ in 0..3 {
                heard("lost-job", &lost, Renewal::Lost);
                heard("cancelled-job", &cancelled, Renewal::CancelRequested);
            }
        });
        let text = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.matches("lease lost").count(), 1, "{text}");
        assert_eq!(text.matches("cancel asked").count(), 1, "{text}");
    }

    /// A worker's shared state on `queue`, with its SQLite store in `dir`, for driving the renewal task by hand.
    async fn shared(queue: Arc<dyn Queue>, dir: &std::path::Path) -> Arc<Shared> {
        let mut settings = crate::config::Settings::default();
        settings.database.url = crate::config::SecretUrl::new(format!("sqlite://{}", dir.join("echo.db").display()));
        let store = crate::app::store(&settings).await.unwrap();
        let kinds = crate::app::kinds(&settings, store.clone()).await.unwrap();
        let checkpoints = Arc::new(crate::job::checkpoint::MemoryCheckpoints::default());
        let engine = crate::engine::Engine::new(crate::engine::StageRegistry::new(), checkpoints, settings.engine());
        let options = super::super::WorkerOptions {
            concurrency: 1,
            lease: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(1),
            pipelines_dir: dir.to_path_buf(),
            plugins_dir: dir.to_path_buf(),
        };
        super::super::Worker::new(queue, store, engine, kinds, options).shared
    }

    /// Polls `check` every 20 ms for at most `limit`; whether it came true.
    async fn within(limit: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if check().await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        check().await
    }

    #[tokio::test]
    async fn the_renewal_task_hears_cancels_and_losses_and_writes_notes_that_waited_past_the_hold() {
        let dir = tempfile::tempdir().unwrap();
        let queue: Arc<dyn Queue> = Arc::new(MemoryQueue::new(QueueSettings::default()));
        let shared = shared(queue.clone(), dir.path()).await;
        let (running, running_token) = take_one(&queue).await;
        let (ending, ending_token) = take_one(&queue).await;
        let running_sink = Arc::new(QueueSink::new(queue.clone(), &running, running_token.clone()));
        let running_held = Arc::new(Held::with_sink(running_token, running_sink.clone()));
        let ending_sink = Arc::new(QueueSink::new(queue.clone(), &ending, ending_token.clone()));
        let ending_held = Arc::new(Held::with_sink(ending_token, ending_sink.clone()));
        ending_held.ending();
        let gone = Arc::new(Held::new(LeaseToken("not ours".into())));
        shared.leases.insert(&running, running_held.clone());
        shared.leases.insert(&ending, ending_held.clone());
        shared.leases.insert("gone", gone.clone());
        running_sink.log("held back while young");
        ending_sink.log("for the ending call");
        let done = CancellationToken::new();
        let task = tokio::spawn(renew_loop(shared.clone(), done.clone()));

        let logged = async || queue.logs(&running).await.unwrap().iter().any(|l| l.line == "held back while young");
        assert!(
            within(Duration::from_secs(3), logged).await,
            "the renewal task wrote the notes that waited past the hold"
        );
        // A tick later, any write the renewal task started is done.
        tokio::time::sleep(CANCEL_CHECK + Duration::from_millis(100)).await;
        assert!(
            queue.logs(&ending).await.unwrap().is_empty(),
            "the notes of a job being ended wait for its ending call"
        );
        assert_eq!(ending_sink.take().log, ["for the ending call"]);
        assert_eq!(gone.why(), Some(Stop::Lost), "a lease the queue does not know is lost");
        assert_eq!(running_held.why(), None);

        queue.cancel(&running).await.unwrap();
        let stopped = async || running_held.why().is_some();
        assert!(within(CANCEL_CHECK * 4, stopped).await, "a cancel asked elsewhere is heard");
        assert_eq!(running_held.why(), Some(Stop::Cancel));
        assert!(running_held.cancel.is_cancelled());
        assert_eq!(ending_held.why(), None, "a job being ended is not stopped");

        done.cancel();
        tokio::time::timeout(Duration::from_secs(2), task).await.expect("the renewal task ends when told").unwrap();
    }
}
