//! A held job's notes to the queue: each coalesced progress update (at most 5 a second, from the engine's
//! emitter) becomes the job's stored progress and a `progress` event, each stage that starts running a `running`
//! stage event, and the worker adds log lines. Writes carry the lease token; a refused or failed write is dropped
//! (the renewal task notices a lost lease, and the next update may get through).
//!
//! Notes are held back while the job is young ([`HOLD`]): most jobs of a busy queue end before that, and their
//! notes then travel in the call that completes the job ([`crate::queue::Queue::complete_and_take`]) instead of
//! one call each. Of the progress held back only the newest is kept (the events that matter are the stage
//! events, kept in order). Once the job is older than [`HOLD`], notes are written as they come; the renewal task
//! writes those that wait longer than that with no update behind them ([`QueueSink::flush_due`]). The job's final
//! state is never held back: the queue writes it in the call that ends the job.
//!
//! Stage checkpoints made while the job is young are held back the same way ([`QueueSink::hold_checkpoint`]):
//! a job that completes drops them (its checkpoints go anyway), so a short job writes none; a job that fails,
//! is cancelled or is handed back writes them first, so its retry resumes from them. A worker killed within
//! [`HOLD`] of a job's start loses them, and those stages (under half a second of work) run again. Checkpoints
//! of paid calls (transcribed chunks) are never held back: [`super::checkpoints::QueueCheckpoints`] writes them
//! at once.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::job::StageOutput;
use crate::job::progress::{ProgressSink, ProgressUpdate};
use crate::queue::{EventKind, LeaseToken, Notes, Progress, Queue};

/// How long notes of a new job are held back.
pub const HOLD: Duration = Duration::from_millis(500);

/// Notes of one held job, for the queue.
pub struct QueueSink {
    queue: Arc<dyn Queue>,
    job_id: String,
    token: LeaseToken,
    started: Instant,
    state: Mutex<State>,
    /// Serialises writes, so that notes reach the stream in the order they were made.
    writing: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    running: BTreeSet<String>,
    pending: Notes,
    /// When the oldest pending note was made.
    since: Option<Instant>,
}

impl State {
    fn note(&mut self) {
        self.since.get_or_insert_with(Instant::now);
    }
}

impl std::fmt::Debug for QueueSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueSink").field("job_id", &self.job_id).finish_non_exhaustive()
    }
}

impl QueueSink {
    /// Notes of `job_id`, written under `token`.
    pub fn new(queue: Arc<dyn Queue>, job_id: impl Into<String>, token: LeaseToken) -> Self {
        Self {
            queue,
            job_id: job_id.into(),
            token,
            started: Instant::now(),
            state: Mutex::new(State::default()),
            writing: tokio::sync::Mutex::new(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds a line for the job's log.
    pub fn log(&self, line: impl Into<String>) {
        let mut state = self.lock();
        state.pending.log.push(line.into());
        state.note();
    }

    /// Adds a stage event.
    pub fn stage(&self, stage: &str, status: &str) {
        let mut state = self.lock();
        state.pending.events.push(EventKind::Stage { stage: stage.to_string(), status: status.to_string() });
        state.note();
    }

    /// Holds a stage checkpoint back with the notes while the job is young; `false` when it is past [`HOLD`] (the
    /// caller then writes it itself, and an older copy held back under the same key is dropped so that it cannot
    /// overwrite the newer one later).
    pub fn hold_checkpoint(&self, key: &str, output: &StageOutput) -> bool {
        let young = !self.past_hold();
        let mut state = self.lock();
        state.pending.checkpoints.retain(|(held, _)| held != key);
        if young {
            state.pending.checkpoints.push((key.to_string(), output.clone()));
            state.note();
        }
        young
    }

    /// Everything held back, for the call that ends the job; nothing is left to write.
    pub fn take(&self) -> Notes {
        let mut state = self.lock();
        state.since = None;
        std::mem::take(&mut state.pending)
    }

    /// Everything held back, once no write of it is under way: for the call that ends the job.
    pub async fn take_all(&self) -> Notes {
        let _writing = self.writing.lock().await;
        self.take()
    }

    /// Whether the job is past the hold, so notes go out as they come.
    fn past_hold(&self) -> bool {
        self.started.elapsed() >= HOLD
    }

    /// Writes what is held back now.
    pub async fn flush(&self) {
        let _writing = self.writing.lock().await;
        let notes = self.take();
        if notes.is_empty() {
            return;
        }
        if let Err(error) = self.queue.note(&self.job_id, &self.token, &notes).await {
            tracing::debug!(job = %self.job_id, %error, "notes not written");
        }
    }

    /// Whether notes have waited longer than [`HOLD`]; the renewal task then calls [`Self::flush`].
    pub fn flush_due(&self) -> bool {
        self.lock().since.is_some_and(|since| since.elapsed() >= HOLD || self.past_hold())
    }
}

#[async_trait::async_trait]
impl ProgressSink for QueueSink {
    async fn update(&self, update: ProgressUpdate) {
        {
            let mut state = self.lock();
            let started: Vec<String> =
                update.running.iter().filter(|stage| !state.running.contains(*stage)).cloned().collect();
            state.running = update.running.iter().cloned().collect();
            for stage in started {
                state.pending.events.push(EventKind::Stage { stage, status: "running".into() });
            }
            // Only the newest progress is worth writing.
            state.pending.events.retain(|event| !matches!(event, EventKind::Progress(_)));
            let stage = update.stage.filter(|stage| !stage.is_empty());
            let progress = Progress { percent: update.percent, stage, message: update.message };
            state.pending.events.push(EventKind::Progress(progress));
            state.note();
        }
        if self.past_hold() {
            self.flush().await;
        }
    }
}
