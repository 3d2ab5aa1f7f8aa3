//! The job queue: where jobs wait, who runs them, and what happens when a worker dies (ARCHITECTURE.md, "The
//! queue"). One [`Queue`] trait with two backends that pass the same contract suite (`tests/queue.rs`):
//! `redis::RedisQueue` for production, where any number of workers share one Redis (or Redis Cluster), and
//! `memory::MemoryQueue` for `serve` with no `REDIS_URL`, where jobs do not survive a restart.
//!
//! Delivery is at least once, with leases: [`Queue::take`] hands a job out with a [`LeaseToken`] that the
//! worker renews ([`Queue::renew`]); a job whose lease expires goes back to waiting ([`Queue::recover_stalled`])
//! and counts a stall; after `max_stalls` it fails. Every write a worker makes about a job it holds (progress,
//! checkpoints, complete, fail, release) carries the token and is refused with [`QueueError::LeaseLost`] once
//! the lease has passed to someone else (fencing), so a worker that lost its lease cannot overwrite the work of
//! the one that has it.
//!
//! States: `waiting` → `active` → `completed` | `failed` | `cancelled`, with `delayed` before `waiting` (a delay
//! at enqueue, or the backoff before a retry). One live job per idempotency key (by default the recording id):
//! enqueueing the same key again while a job with it is waiting, delayed or active returns that job.
//!
//! Times that decide order or expiry (delays, lease deadlines, retention) are taken from one clock: the Redis
//! server's `TIME` for Redis, the process clock for memory. Workers on different machines never compare their
//! own clocks.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::job::StageOutput;

pub mod memory;
pub mod redis;

/// A job's id: a UUID v4 in text form, made at enqueue.
pub type JobId = String;

/// The states a job goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Ready to be taken, ordered by priority then enqueue order.
    Waiting,
    /// Not ready before a time: enqueued with a delay, or waiting out the backoff before a retry.
    Delayed,
    /// Held by a worker under a lease.
    Active,
    /// Finished with a result. Final.
    Completed,
    /// Failed for good: a permanent error, attempts or stalls used up. Final, but [`Queue::retry`] can revive it.
    Failed,
    /// Cancelled by someone. Final, but [`Queue::retry`] can revive it.
    Cancelled,
}

impl JobState {
    /// Every state, in the order above.
    pub const ALL: [Self; 6] =
        [Self::Waiting, Self::Delayed, Self::Active, Self::Completed, Self::Failed, Self::Cancelled];

    /// The state's name, as stored and as the API shows it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Delayed => "delayed",
            Self::Active => "active",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// The state called `name`, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.name() == name)
    }

    /// True for `completed`, `failed` and `cancelled`: nothing more happens unless someone retries the job.
    pub const fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A job that [`Queue::recover_stalled`] took back from a worker whose lease expired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// The job.
    pub id: JobId,
    /// Where it went: `waiting` (to run again), `failed` (stalled more than `max_stalls` times) or `cancelled`
    /// (a cancel had been asked).
    pub state: JobState,
}

/// One definition file a job runs with, as it was when the job was enqueued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DefinitionFile {
    /// The file name (`meeting.toml`), for messages.
    pub file: String,
    /// The whole text.
    pub text: String,
    /// SHA-256 of the text, lowercase hex.
    pub sha256: String,
}

/// The pipeline and the plugin files a job runs with. Stored with the job so that every worker, and every
/// retry, runs what was enqueued, whatever the files on its own disk say now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Definition {
    /// The pipeline file.
    pub pipeline: DefinitionFile,
    /// The plugin files the pipeline uses, by plugin name.
    pub plugins: BTreeMap<String, DefinitionFile>,
}

/// What a caller asks to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewJob {
    /// The pipeline's name.
    pub pipeline: String,
    /// The definition to run; see [`Definition`].
    pub definition: Definition,
    /// The recording the job belongs to, if any.
    pub recording_id: Option<String>,
    /// Where the media is.
    pub source: Option<String>,
    /// The source is a local path typed by the user on `echo-worker enqueue`'s command line, so it need not be
    /// under `paths.storage_root` (the worker must be able to read the same path). Never set for jobs from the
    /// API.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub trusted_source: bool,
    /// `job.params`.
    pub params: serde_json::Map<String, Value>,
    /// Lower runs sooner (as in Bull and BullMQ); jobs of one priority run in enqueue order.
    /// Range [`MIN_PRIORITY`]..=[`MAX_PRIORITY`]; 0 by default.
    pub priority: i32,
    /// Attempts in all, including the first (a stall does not count as an attempt).
    pub max_attempts: u32,
    /// Not before this long from now.
    pub delay: Option<Duration>,
    /// One live job per key; `None` means the recording id, or no key when there is no recording.
    pub idempotency_key: Option<String>,
    /// Where to POST the job's final status when it ends (`crate::callback`); checked by whoever enqueues it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
}

impl NewJob {
    /// Refuses a request that no backend would run, saying what is wrong with which job.
    ///
    /// # Errors
    /// [`QueueError::Invalid`]: an empty pipeline name, a priority out of range, zero attempts, an empty
    /// idempotency key, or a delay of more than ten years.
    pub fn check(&self) -> Result<(), QueueError> {
        let what = match &self.recording_id {
            Some(recording) => format!("job for pipeline `{}` (recording {recording})", self.pipeline),
            None => format!("job for pipeline `{}`", self.pipeline),
        };
        if self.pipeline.trim().is_empty() {
            return Err(QueueError::Invalid("the pipeline name is empty".into()));
        }
        if !(MIN_PRIORITY..=MAX_PRIORITY).contains(&self.priority) {
            return Err(QueueError::Invalid(format!(
                "{what}: priority {} is outside {MIN_PRIORITY}..={MAX_PRIORITY}",
                self.priority
            )));
        }
        if self.max_attempts == 0 {
            return Err(QueueError::Invalid(format!("{what}: max_attempts is 0; a job needs at least 1 attempt")));
        }
        if self.idempotency_key.as_deref().is_some_and(|key| key.trim().is_empty()) {
            return Err(QueueError::Invalid(format!("{what}: the idempotency key is empty")));
        }
        if self.delay.is_some_and(|delay| delay > MAX_DELAY) {
            return Err(QueueError::Invalid(format!("{what}: a delay longer than ten years")));
        }
        Ok(())
    }
}

/// Longest delay a job may ask for.
pub const MAX_DELAY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Most urgent priority.
pub const MIN_PRIORITY: i32 = -(1 << 20);
/// Least urgent priority. The range keeps `priority × 2³² + sequence` exact in a Redis sorted-set score.
pub const MAX_PRIORITY: i32 = (1 << 20) - 1;

/// Live progress of an active job, as the last coalesced update said.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// 0 to 100.
    pub percent: u8,
    /// The stage that reported last.
    pub stage: Option<String>,
    /// A short human message.
    pub message: String,
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Its id.
    pub id: JobId,
    /// Its state now.
    pub state: JobState,
    /// What was asked.
    #[serde(flatten)]
    pub spec: NewJob,
    /// Attempts counted so far: those started, less those that ended in a stall or a release, which do not count
    /// against `max_attempts`.
    pub attempts: u32,
    /// Times its lease expired while it was active.
    pub stalls: u32,
    /// Milliseconds since the Unix epoch on the queue's clock.
    pub created_at: u64,
    /// When the current or last attempt started.
    pub started_at: Option<u64>,
    /// When it reached a final state.
    pub finished_at: Option<u64>,
    /// When a delayed job becomes waiting.
    pub ready_at: Option<u64>,
    /// The worker holding it (active) or that held it last.
    pub worker: Option<String>,
    /// Live progress.
    pub progress: Option<Progress>,
    /// The result of a completed job (the engine's report).
    pub result: Option<Value>,
    /// Why it failed last (also kept while a retry is pending).
    pub error: Option<String>,
    /// A cancel was asked while it was active; the holder stops it.
    pub cancel_requested: bool,
}

/// Proof that a worker holds a job: compared on every write about the job.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LeaseToken(pub String);

/// A job handed to a worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    /// The job, with `attempts` already counting this attempt.
    pub job: Job,
    /// The token for every write about it.
    pub token: LeaseToken,
    /// The job may have checkpoints (an earlier attempt saved some): read them before running. `false` means
    /// nothing was ever saved for it, so there is nothing to restore.
    pub resume: bool,
}

/// What a worker held back about a job while it ran, written in the same call that ends it (see
/// [`Queue::complete_and_take`]), so that a short job costs one round trip at its end instead of one per note.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Notes {
    /// Stage and progress events, oldest first, appended before the job's final state event. The last progress
    /// among them also becomes the job's stored progress. State events are not notes: they are refused.
    pub events: Vec<EventKind>,
    /// Lines for the job's log, oldest first.
    pub log: Vec<String>,
    /// Stage checkpoints held back (key, output), saved by [`Queue::note`] as [`Queue::save_checkpoint`] would.
    /// The call that completes the job drops them: a completed job's checkpoints go anyway.
    pub checkpoints: Vec<(String, StageOutput)>,
}

impl Notes {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.log.is_empty() && self.checkpoints.is_empty()
    }

    /// Refuses state events, which only the queue writes.
    ///
    /// # Errors
    /// [`QueueError::Invalid`] naming the job and the event.
    pub fn check(&self, id: &str) -> Result<(), QueueError> {
        match self.events.iter().find(|event| matches!(event, EventKind::State { .. })) {
            Some(event) => Err(QueueError::Invalid(format!(
                "notes about job {id} carry a state event ({event:?}); only the queue writes state events"
            ))),
            None => Ok(()),
        }
    }

    /// The events a call streams: all of them, except that a completion streams no progress (the `completed`
    /// event that follows says more; the last progress is still stored).
    pub fn streamed(&self, completing: bool) -> impl Iterator<Item = &EventKind> {
        self.events.iter().filter(move |event| !(completing && matches!(event, EventKind::Progress(_))))
    }

    /// The last progress among the events.
    pub fn last_progress(&self) -> Option<&Progress> {
        self.events.iter().rev().find_map(|event| match event {
            EventKind::Progress(progress) => Some(progress),
            _ => None,
        })
    }
}

/// What a renewal found for one lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Still ours, extended.
    Held,
    /// Still ours, extended, and someone asked to cancel it: stop it and call [`Queue::cancelled`].
    CancelRequested,
    /// No longer ours (expired and recovered, or the job is gone): stop our copy, write nothing more.
    Lost,
}

/// How [`Queue::enqueue`] went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enqueued {
    /// A new job.
    Created(JobId),
    /// A live job with the same idempotency key already exists; nothing was added.
    Existing(JobId),
}

impl Enqueued {
    /// The job id either way.
    pub fn id(&self) -> &str {
        match self {
            Self::Created(id) | Self::Existing(id) => id,
        }
    }
}

/// How a failure was recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailOutcome {
    /// Another attempt will run after the backoff (the job is `delayed` until then).
    Retrying {
        /// When, on the queue's clock (ms).
        at: u64,
    },
    /// Failed for good.
    Failed,
}

/// How a cancel went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The job was waiting or delayed and is now `cancelled`.
    Cancelled,
    /// The job is active; its worker has been asked to stop it and will mark it `cancelled`.
    Requested,
    /// The job had already ended in this state; nothing changed.
    AlreadyFinal(JobState),
}

/// A failure reported by the worker holding a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// A sentence saying what failed (stage and reason).
    pub message: String,
    /// Whether another attempt can help. A permanent failure ends the job whatever attempts are left.
    pub retryable: bool,
    /// Wait before the next attempt; the queue's backoff when `None`.
    pub retry_after: Option<Duration>,
}

/// One line of a job's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// When, on the queue's clock (ms).
    pub at: u64,
    /// The text.
    pub line: String,
}

/// What happened to a job, as the event stream carries it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// The job changed state.
    State {
        /// The new state.
        state: JobState,
        /// Why, for failures, retries, stalls and cancels.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// A stage started, finished, failed or was skipped.
    Stage {
        /// The stage id.
        stage: String,
        /// `running`, `succeeded`, `failed`, `skipped`, `restored`.
        status: String,
    },
    /// Coalesced progress.
    Progress(Progress),
}

/// One entry of the event stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The stream id (`1700000000000-0` for Redis); read on from here with [`Queue::events`].
    pub id: String,
    /// The job.
    pub job_id: JobId,
    /// When, on the queue's clock (ms).
    pub at: u64,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// A worker process, as its heartbeats describe it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// Unique per process start (host, pid and a random part), so a restarted worker is a new worker.
    pub id: String,
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// echo-worker version.
    pub version: String,
    /// Jobs it runs at once.
    pub concurrency: u32,
    /// Jobs it runs now.
    pub running: u32,
    /// Its last heartbeat, on the queue's clock (ms).
    pub last_heartbeat: u64,
}

/// Counts for one minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MinuteCounts {
    /// The minute's start, ms since the epoch.
    pub minute: u64,
    /// Jobs completed in it.
    pub completed: u64,
    /// Jobs failed for good in it.
    pub failed: u64,
}

/// The queue at a glance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Jobs per state (every state present, zero included).
    pub counts: BTreeMap<JobState, u64>,
    /// Whether workers may take jobs.
    pub paused: bool,
    /// Workers whose last heartbeat is recent.
    pub workers: Vec<WorkerInfo>,
    /// Completed and failed per minute, oldest first, for the last hour at most.
    pub per_minute: Vec<MinuteCounts>,
}

/// A page of [`Queue::list`].
#[derive(Debug, Clone, PartialEq)]
pub struct JobPage {
    /// The jobs, newest first for final states, in run order for waiting and delayed ones.
    pub jobs: Vec<Job>,
    /// Pass it back to get the next page; `None` at the end.
    pub next_cursor: Option<String>,
}

/// How long things last; the same for every backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSettings {
    /// A lease lasts this long unless renewed; a dead worker's job is back in waiting within about this long.
    pub lease: Duration,
    /// Stalls allowed before the job fails (`job stalled more than 2 times`).
    pub max_stalls: u32,
    /// First retry backoff; doubled per attempt, capped at `max_backoff`.
    pub backoff: Duration,
    /// Longest retry backoff.
    pub max_backoff: Duration,
    /// Completed jobs are kept this long…
    pub keep_completed_for: Duration,
    /// …and at most this many.
    pub keep_completed: u64,
    /// Failed and cancelled jobs are kept this long…
    pub keep_failed_for: Duration,
    /// …and at most this many.
    pub keep_failed: u64,
    /// Events kept in the stream (approximately).
    pub max_events: u64,
    /// Log lines kept per job.
    pub max_log_lines: u64,
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(30),
            max_stalls: 2,
            backoff: Duration::from_secs(5),
            max_backoff: Duration::from_secs(10 * 60),
            keep_completed_for: Duration::from_secs(7 * 24 * 3600),
            keep_completed: 10_000,
            keep_failed_for: Duration::from_secs(30 * 24 * 3600),
            keep_failed: 10_000,
            max_events: 10_000,
            max_log_lines: 500,
        }
    }
}

/// What can go wrong talking to the queue.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The backend could not be reached or refused the command; a retry after a pause may help.
    #[error("queue backend unavailable: {0}")]
    Unavailable(String),
    /// No job has this id (never existed, or cleaned).
    #[error("no job with id {0}")]
    NotFound(JobId),
    /// The worker's lease on the job is gone; it must stop its copy and write nothing more about it.
    #[error("lease on job {0} lost: another worker holds it, or it ended")]
    LeaseLost(JobId),
    /// The operation does not apply to the job's state (retry of an active job, promote of a waiting one).
    #[error("job {id} is {state}: {action} needs {needs}")]
    WrongState {
        /// The job.
        id: JobId,
        /// Its state.
        state: JobState,
        /// What was asked.
        action: &'static str,
        /// The states that would allow it.
        needs: &'static str,
    },
    /// The request itself is invalid (priority out of range, zero attempts).
    #[error("invalid job: {0}")]
    Invalid(String),
    /// Stored data could not be decoded (a job written by an incompatible version).
    #[error("job {id} cannot be read: {message}")]
    Corrupt {
        /// The job.
        id: JobId,
        /// What was wrong.
        message: String,
    },
}

/// The queue's operations. Every state change is atomic; see the module docs for the model.
#[async_trait::async_trait]
pub trait Queue: Send + Sync {
    /// Adds a job, or returns the live job that has the same idempotency key.
    ///
    /// # Errors
    /// [`QueueError::Invalid`] for a bad request; [`QueueError::Unavailable`].
    async fn enqueue(&self, job: NewJob) -> Result<Enqueued, QueueError>;

    /// Adds many jobs in one round trip; each item succeeds or fails on its own.
    ///
    /// # Errors
    /// [`QueueError::Unavailable`] when nothing could be added.
    async fn enqueue_many(&self, jobs: Vec<NewJob>) -> Result<Vec<Result<Enqueued, QueueError>>, QueueError>;

    /// Takes the next ready job for `worker`, waiting up to `wait` for one. Idle callers wait inside the backend
    /// (Redis: a blocking pop on a connection of its own), never in a polling loop. Returns `None` when the wait
    /// ends with nothing ready, or while the queue is paused. Due delayed jobs are promoted on the way.
    ///
    /// # Errors
    /// [`QueueError::Unavailable`].
    async fn take(&self, worker: &WorkerInfo, wait: Duration) -> Result<Option<Lease>, QueueError>;

    /// Takes up to `max` ready jobs at once (at least one, waiting up to `wait` for the first, as [`Queue::take`]
    /// does), in run order: one round trip for many free slots. Empty when the wait ends with nothing ready, while
    /// the queue is paused, or when `max` is 0.
    ///
    /// # Errors
    /// [`QueueError::Unavailable`].
    async fn take_many(&self, worker: &WorkerInfo, wait: Duration, max: usize) -> Result<Vec<Lease>, QueueError>;

    /// Extends every given lease by the lease length, in one round trip, and says for each whether it is
    /// still held and whether a cancel was asked.
    ///
    /// # Errors
    /// [`QueueError::Unavailable`].
    async fn renew(&self, leases: &[(JobId, LeaseToken)]) -> Result<Vec<Renewal>, QueueError>;

    /// Finishes a held job with its result.
    ///
    /// # Errors
    /// [`QueueError::LeaseLost`]; [`QueueError::Unavailable`].
    async fn complete(&self, id: &str, token: &LeaseToken, result: Value) -> Result<(), QueueError>;

    /// Finishes a held job with its result after writing the notes held back about it, and, when `next` names the
    /// worker, takes the next ready job for it in the same round trip (never waiting; nothing while paused). The
    /// job is completed whether or not another is taken. Progress events among the notes are not streamed (the
    /// `completed` event that follows says more); the last progress is stored. A backend may decline the take when other takes of
    /// this process are in flight (the Redis backend does, so that concurrent takes need not each offer the
    /// whole head of the queue); the worker's batched take then fills the slot.
    ///
    /// # Errors
    /// [`QueueError::LeaseLost`] (nothing is written, nothing taken); [`QueueError::Invalid`] for notes with a
    /// state event; [`QueueError::Unavailable`].
    async fn complete_and_take(
        &self,
        id: &str,
        token: &LeaseToken,
        result: Value,
        notes: &Notes,
        next: Option<&WorkerInfo>,
    ) -> Result<Option<Lease>, QueueError>;

    /// Writes the notes held back about a held job (stage and progress events, log lines) in one round trip.
    ///
    /// # Errors
    /// [`QueueError::LeaseLost`]; [`QueueError::Invalid`] for a state event; [`QueueError::Unavailable`].
    async fn note(&self, id: &str, token: &LeaseToken, notes: &Notes) -> Result<(), QueueError>;

    /// Records a failed attempt of a held job: retried after a backoff while attempts are left and the failure
    /// is retryable, failed for good otherwise.
    ///
    /// # Errors
    /// [`QueueError::LeaseLost`]; [`QueueError::Unavailable`].
    async fn fail(&self, id: &str, token: &LeaseToken, failure: Failure) -> Result<FailOutcome, QueueError>;

    /// Marks a held job `cancelled` after its worker stopped it on request.
    ///
    /// # Errors
    /// [`QueueError::LeaseLost`]; [`QueueError::Unavailable`].
    async fn cancelled(&self, id: &str, token: &LeaseToken) -> Result<(), QueueError>;

    /// Hands a held job back to waiting at the front of its priority, without counting an attempt or a stall
    /// (a worker shutting down). A job someone asked to cancel becomes `cancelled` instead.
    ///
    /// # Errors
    /// [`QueueError::LeaseLost`]; [`QueueError::Unavailable`].
    async fn release(&self, id: &str, token: &LeaseToken) -> Result<(), QueueError>;

    /// Sends every active job whose lease has expired back to waiting at the front of its priority (or to failed
    /// after `max_stalls`, or to cancelled when a cancel was asked), and returns each with the state it went to.
    /// Safe to call from every worker at once: each recovery happens exactly once, and only its caller hears of
    /// it (so that one process reports the jobs it ended, see `ending`).
    ///
    /// # Errors
    /// [`QueueError::Unavailable`].
    async fn recover_stalled(&self) -> Result<Vec<Recovered>, QueueError>;

    /// Cancels a job in any state: removed from waiting or delayed at once; an active one is asked to stop (see
    /// [`Renewal::CancelRequested`]) and becomes `cancelled` when its worker stops it, hands it back, or dies.
    ///
    /// # Errors
    /// [`QueueError::NotFound`]; [`QueueError::Unavailable`].
    async fn cancel(&self, id: &str) -> Result<CancelOutcome, QueueError>;

    /// Sends a failed or cancelled job back to waiting, keeping its checkpoints, with fresh attempts.
    ///
    /// # Errors
    /// [`QueueError::WrongState`] for other states; [`QueueError::Invalid`] when another live job holds its
    /// idempotency key; [`QueueError::NotFound`]; [`QueueError::Unavailable`].
    async fn retry(&self, id: &str) -> Result<(), QueueError>;

    /// Retries every failed job, or those of one pipeline; returns their ids. A job whose idempotency key another
    /// live job holds stays failed.
    ///
    /// # Errors
    /// [`QueueError::Unavailable`].
    async fn retry_failed(&self, pipeline: Option<&str>) -> Result<Vec<JobId>, QueueError>;

    /// Makes a delayed job waiting now.
    ///
    /// # Errors
    /// [`QueueError::WrongState`] unless delayed; [`QueueError::NotFound`]; [`QueueError::Unavailable`].
    async fn promote(&self, id: &str) -> Result<(), QueueError>;

    /// Stops or restarts handing out jobs (running ones go on). Kept by the backend, so it survives restarts.
    ///
    /// # Errors
    /// [`QueueError::Unavailable`].
    async fn set_paused(&self, paused: bool) -> Result<(), QueueError>;

    /// One job.
    ///
    /// # Errors
    /// [`QueueError::Unavailable`]; [`QueueError::Corrupt`].
    async fn get(&self, id: &str) -> Result<Option<Job>, QueueError>;

    /// The live job (waiting, delayed or active) holding an idempotency key, if any.
    ///
    /// # Errors
    /// [`QueueError::Unavailable`].
    async fn live_job_for(&self, key: &str) -> Result<Option<JobId>, QueueError>;

    /// Jobs in one state, a page at a time.
    ///
    /// # Errors
    /// [`QueueError::Invalid`] for a cursor this backend did not make or a zero limit; [`QueueError::Unavailable`].
    async fn list(&self, state: JobState, cursor: Option<&str>, limit: usize) -> Result<JobPage, QueueError>;

    /// Counts, workers and per-minute figures.
    ///
    /// # Errors
    /// [`QueueError::Unavailable`].
    async fn stats(&self) -> Result<Stats, QueueError>;

    /// Removes up to `limit` jobs in a final state that ended more than `older_than` ago, with their
    /// checkpoints and logs; returns how many. (Retention also trims by age and count on its own.)
    ///
    /// # Errors
    /// [`QueueError::Invalid`] for a state that is not final; [`QueueError::Unavailable`].
    async fn clean(&self, state: JobState, older_than: Duration, limit: usize) -> Result<u64, QueueError>;

    /// Records a worker's heartbeat; workers silent for three lease lengths drop out of [`Stats::workers`].
    ///
    /// # Errors
    /// [`QueueError::Unavailable`].
    async fn heartbeat(&self, worker: &WorkerInfo) -> Result<(), QueueError>;

    /// Stores coalesced progress of a held job and appends it to the event stream.
    ///
    /// # Errors
    /// [`QueueError::LeaseLost`]; [`QueueError::Unavailable`].
    async fn progress(&self, id: &str, token: &LeaseToken, progress: Progress) -> Result<(), QueueError>;

    /// Appends a stage event of a held job to the event stream.
    ///
    /// # Errors
    /// [`QueueError::LeaseLost`]; [`QueueError::Unavailable`].
    async fn stage_event(&self, id: &str, token: &LeaseToken, stage: &str, status: &str) -> Result<(), QueueError>;

    /// Appends a line to a job's log (capped at `max_log_lines`, oldest dropped). A line for a job that does not
    /// exist (or was cleaned) is dropped.
    ///
    /// # Errors
    /// [`QueueError::Unavailable`].
    async fn log(&self, id: &str, line: &str) -> Result<(), QueueError>;

    /// A job's log lines, oldest first; none for a job that does not exist.
    ///
    /// # Errors
    /// [`QueueError::Unavailable`].
    async fn logs(&self, id: &str) -> Result<Vec<LogLine>, QueueError>;

    /// Events after `after` (from the start of the stream when `None`), at most `limit`, waiting up to `wait`
    /// for the first one when there are none yet.
    ///
    /// # Errors
    /// [`QueueError::Invalid`] for a malformed id or a zero limit; [`QueueError::Unavailable`].
    async fn events(&self, after: Option<&str>, limit: usize, wait: Duration) -> Result<Vec<Event>, QueueError>;

    /// Every checkpoint of a job (stage outputs and chunk transcripts), kept beside the job while it may run
    /// again: dropped when it completes, kept when it fails or is cancelled (a retry resumes from them), removed
    /// with the job by [`Queue::clean`] and retention. Empty for a job that does not exist.
    ///
    /// # Errors
    /// [`QueueError::Unavailable`]; [`QueueError::Corrupt`].
    async fn checkpoints(&self, id: &str) -> Result<BTreeMap<String, StageOutput>, QueueError>;

    /// Saves one checkpoint of a held job.
    ///
    /// # Errors
    /// [`QueueError::LeaseLost`]; [`QueueError::Unavailable`].
    async fn save_checkpoint(
        &self,
        id: &str,
        token: &LeaseToken,
        key: &str,
        output: &StageOutput,
    ) -> Result<(), QueueError>;
}
