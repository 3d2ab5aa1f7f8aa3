//! The worker: takes jobs from any [`Queue`] and runs `concurrency` of them at once through the [`Engine`], each
//! compiled from the definition it carries (`crate::definition`), so every worker and every retry runs what was
//! enqueued (ARCHITECTURE.md, "The queue").
//!
//! - **Leases.** One task renews every held lease ([`lease`]); it hears cancels (the job stops within 2 s and
//!   is marked cancelled) and lost leases (our copy stops and writes nothing more).
//! - **Resume.** Checkpoints live in the queue beside the job ([`checkpoints`]), written under the lease, so a
//!   recovered or retried job resumes on any worker. A job's work directory is kept while a retry of it is
//!   pending (the retry, if this worker takes it, reuses the files its checkpointed stages left), and removed
//!   when the job ends for good, when another worker takes it, or when the worker stops.
//! - **Progress** goes to the recording row (coalesced to one write a second) and to the queue ([`sink`]).
//! - **Endings.** Success completes the job with the engine's report and settles the row; a failure is retried
//!   with backoff when it can help and attempts remain, else fails the job and the row; both say why in the
//!   job's log.
//! - **Shutdown.** [`Worker::run`] stops taking jobs when its token fires, lets running jobs finish within the
//!   grace period, then stops them and hands them back to waiting, where another worker takes them at once.
//! - **Callbacks.** After a job ends for good, its `callbackUrl` (if any) gets the final status on a task of its
//!   own ([`crate::callback`]); the job never waits for it. A job that this worker's stall recovery fails or
//!   cancels is reported through [`crate::ending`].
//! - **Outages.** A queue that cannot be reached (Redis restarting, a dropped connection) is retried with a
//!   bounded, jittered backoff, logged once per outage; the worker neither exits nor spins, and a job whose lease
//!   ran out meanwhile is recovered by the queue and resumes from its checkpoints.

pub mod checkpoints;
pub mod lease;
pub mod sink;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::callback::Callbacks;
use crate::definition::{self, DefinitionError};
use crate::ending::Endings;
use crate::engine::{Engine, EngineError, JobReport, JobStatus, Kinds, StageRegistry, StageStatus};
use crate::job::JobSpec;
use crate::job::progress::{ProgressSink, Tee};
use crate::pipeline::Pipeline;
use crate::queue::{Definition, FailOutcome, Failure, Job, JobState, Lease, LeaseToken, Queue, QueueError, WorkerInfo};
use crate::stage::WorkDir;
use crate::store::{NewRecording, RecordingStatus, Store, StoreError, StoreSink};
use checkpoints::QueueCheckpoints;
use lease::{Held, Leases, Stop};
use sink::QueueSink;

/// Longest wait of one take: an idle worker asks again this often (the queue waits inside the backend).
const TAKE_WAIT: Duration = Duration::from_secs(5);
/// Backoff after a failed queue call: from this…
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// …doubling up to this, so a Redis restart is noticed within seconds without a busy loop.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// After the grace period, how long stopped jobs get to wind down and be handed back before their tasks are
/// aborted (stages stop within 2 s; the hand-back may wait for the queue).
const STOP_WAIT: Duration = Duration::from_secs(10);
/// Compiled definitions kept for reuse; jobs of one deployment share a handful.
const COMPILED_KEPT: usize = 64;
/// The checkpoint key under which the report of an attempt that did not complete is kept, so that `job ID`
/// shows its stages. Stage ids never start with `_`, so no stage can restore it.
pub const REPORT_KEY: &str = "_report";

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Jobs at once (`worker.concurrency`).
    pub concurrency: usize,
    /// The queue's lease length (`queue.lease`): renewals, heartbeats and recovery are paced by it.
    pub lease: Duration,
    /// How long running jobs may go on after a shutdown signal (`worker.shutdown_grace`).
    pub shutdown_grace: Duration,
    /// Where carried pipeline files are taken to lie (for messages).
    pub pipelines_dir: PathBuf,
    /// Where carried plugin files are taken to lie: `command` plugins find their programs there.
    pub plugins_dir: PathBuf,
}

/// What a worker did, for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerSummary {
    /// Jobs completed.
    pub completed: u64,
    /// Jobs failed for good.
    pub failed: u64,
    /// Failed attempts that will be retried.
    pub retried: u64,
    /// Jobs cancelled on request.
    pub cancelled: u64,
    /// Jobs handed back at shutdown.
    pub released: u64,
    /// Jobs whose lease was lost.
    pub lost: u64,
}

/// Notes a queue outage once, and its end once.
#[derive(Debug, Default)]
pub(crate) struct Outage {
    since: Mutex<Option<Instant>>,
}

impl Outage {
    pub(crate) fn failed(&self, doing: &str, error: &QueueError) {
        let mut since = self.since.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if since.is_none() {
            *since = Some(Instant::now());
            tracing::warn!(%error, "the queue cannot be reached while {doing}; retrying with backoff until it answers");
        }
    }

    pub(crate) fn ok(&self) {
        let mut since = self.since.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(at) = since.take() {
            tracing::info!("the queue answers again after {:.1} s", at.elapsed().as_secs_f64());
        }
    }
}

/// A bounded, jittered exponential backoff.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let full = BACKOFF_MIN.saturating_mul(1 << self.failures.min(10)).min(BACKOFF_MAX);
        self.failures = self.failures.saturating_add(1);
        // Half to all of it, so that many workers do not come back in step.
        full.mul_f64(0.5 + crate::retry::random_unit() / 2.0)
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}

/// A definition compiled, with the registry of its plugins.
struct Runnable {
    pipeline: Pipeline,
    registry: Arc<StageRegistry>,
}

/// What every task of a worker shares.
pub(crate) struct Shared {
    queue: Arc<dyn Queue>,
    store: Arc<dyn Store>,
    engine: Engine,
    kinds: Kinds,
    options: WorkerOptions,
    info: WorkerInfo,
    leases: Leases,
    outage: Outage,
    /// Work directories of jobs whose retry is pending, by job id, with when they were kept.
    kept: Mutex<HashMap<String, (Arc<WorkDir>, Instant)>>,
    compiled: Mutex<HashMap<String, Arc<Runnable>>>,
    summary: Mutex<WorkerSummary>,
    /// Sends a job's callback after it ends; `None` sends none.
    callbacks: Option<Callbacks>,
}

impl Shared {
    fn count(&self, add: impl FnOnce(&mut WorkerSummary)) {
        add(&mut self.summary.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    }

    /// The worker as its heartbeat and takes describe it now.
    fn info_now(&self) -> WorkerInfo {
        WorkerInfo { running: u32::try_from(self.leases.len()).unwrap_or(u32::MAX), ..self.info.clone() }
    }

    fn runnable(&self, definition: &Definition) -> Result<Arc<Runnable>, DefinitionError> {
        let digest = definition::digest(definition);
        if let Some(found) = self.compiled.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&digest) {
            return Ok(found.clone());
        }
        let compiled = definition::compile(definition, &self.options.pipelines_dir, &self.options.plugins_dir)?;
        let registry = Arc::new(self.kinds.registry(compiled.plugins.values()));
        let runnable = Arc::new(Runnable { pipeline: compiled.pipeline, registry });
        let mut cache = self.compiled.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if cache.len() >= COMPILED_KEPT {
            cache.clear();
        }
        cache.insert(digest, runnable.clone());
        Ok(runnable)
    }

    fn take_kept(&self, id: &str) -> Option<Arc<WorkDir>> {
        self.kept.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(id).map(|(dir, _)| dir)
    }

    fn keep(&self, id: &str, dir: Arc<WorkDir>) {
        self.kept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id.to_string(), (dir, Instant::now()));
    }

    /// Adds a line to the job's log; a line that cannot be written is only traced.
    async fn log(&self, id: &str, line: &str) {
        if let Err(error) = self.queue.log(id, line).await {
            tracing::debug!(job = id, %error, "job log line not written");
        }
    }
}

/// Takes jobs from a queue and runs them.
pub struct Worker {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("info", &self.shared.info).field("options", &self.shared.options).finish()
    }
}

/// This machine's name, for worker ids and stats.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "unknown-host".into())
}

impl Worker {
    /// A worker on `queue` that settles recording rows in `store` and runs jobs through `engine` (whose
    /// registry is replaced per job by one made from `kinds` and the job's plugins).
    pub fn new(
        queue: Arc<dyn Queue>,
        store: Arc<dyn Store>,
        engine: Engine,
        kinds: Kinds,
        options: WorkerOptions,
    ) -> Self {
        let host = host_name();
        let pid = std::process::id();
        let random = uuid::Uuid::new_v4().simple().to_string();
        let info = WorkerInfo {
            id: format!("{host}-{pid}-{}", &random[..8]),
            host,
            pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            concurrency: u32::try_from(options.concurrency.max(1)).unwrap_or(u32::MAX),
            running: 0,
            last_heartbeat: 0,
        };
        let shared = Shared {
            queue,
            store,
            engine,
            kinds,
            options,
            info,
            leases: Leases::default(),
            outage: Outage::default(),
            kept: Mutex::new(HashMap::new()),
            compiled: Mutex::new(HashMap::new()),
            summary: Mutex::new(WorkerSummary::default()),
            callbacks: None,
        };
        Self { shared: Arc::new(shared) }
    }

    /// Sends each job's callback (when it asked for one) after the job ends under this worker.
    #[must_use]
    pub fn with_callbacks(mut self, callbacks: Callbacks) -> Self {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.callbacks = Some(callbacks);
        }
        self
    }

    /// The worker as heartbeats describe it.
    pub fn info(&self) -> &WorkerInfo {
        &self.shared.info
    }

    /// Runs until `shutdown` fires, then stops taking jobs, lets running ones finish within the grace period,
    /// stops the rest and hands them back to the queue. `hurry` (a second signal) ends the grace period at
    /// once.
    pub async fn run(self, shutdown: CancellationToken, hurry: CancellationToken) -> WorkerSummary {
        let shared = self.shared;
        let background = CancellationToken::new();
        let renewals = tokio::spawn(lease::renew_loop(shared.clone(), background.clone()));
        let upkeep = tokio::spawn(upkeep(shared.clone(), background.clone()));
        tracing::info!(
            worker = %shared.info.id,
            concurrency = shared.info.concurrency,
            "worker started: taking jobs"
        );
        let permits = Arc::new(Semaphore::new(shared.options.concurrency.max(1)));
        let mut jobs = JoinSet::new();
        let mut backoff = Backoff::default();
        loop {
            while let Some(ended) = jobs.try_join_next() {
                if let Err(error) = ended {
                    tracing::error!(%error, "a job task ended unexpectedly");
                }
            }
            let permit = tokio::select! {
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
                () = shutdown.cancelled() => break,
            };
            // Every free slot is filled by one take: one round trip for many jobs.
            let mut slots = vec![permit];
            while let Ok(permit) = permits.clone().try_acquire_owned() {
                slots.push(permit);
            }
            let want = slots.len();
            let (queue, info) = (shared.queue.clone(), shared.info_now());
            let asked = Instant::now();
            // The take runs on a task of its own: a shutdown does not drop it halfway (a job taken by a dropped
            // call would wait for its lease to run out); jobs it brings after the shutdown are handed back.
            let mut take = tokio::spawn(async move { queue.take_many(&info, TAKE_WAIT, want).await });
            let taken = tokio::select! {
                taken = &mut take => taken,
                () = shutdown.cancelled() => {
                    let shared = shared.clone();
                    jobs.spawn(async move {
                        if let Ok(Ok(Ok(leases))) = tokio::time::timeout(TAKE_WAIT * 4, take).await {
                            for lease in leases {
                                hand_back(&shared, &lease.job.id, &lease.token).await;
                            }
                        }
                    });
                    break;
                }
            };
            match taken {
                Ok(Ok(leases)) if !leases.is_empty() => {
                    shared.outage.ok();
                    backoff.reset();
                    let mut slots = slots.into_iter();
                    for lease in leases {
                        match slots.next() {
                            Some(permit) => {
                                jobs.spawn(run_job(shared.clone(), lease, permit, shutdown.clone()));
                            }
                            None => hand_back(&shared, &lease.job.id, &lease.token).await,
                        }
                    }
                }
                Ok(Ok(_)) => {
                    shared.outage.ok();
                    backoff.reset();
                    // A paused queue answers at once; wait a little rather than ask again in a loop.
                    if asked.elapsed() < TAKE_WAIT / 2 {
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                            () = shutdown.cancelled() => {}
                        }
                    }
                }
                Ok(Err(error)) => {
                    shared.outage.failed("taking jobs", &error);
                    tokio::select! {
                        () = tokio::time::sleep(backoff.next()) => {}
                        () = shutdown.cancelled() => {}
                    }
                }
                Err(error) => {
                    tracing::error!(%error, "taking a job panicked");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        let grace = shared.options.shutdown_grace;
        tracing::info!(
            running = shared.leases.len(),
            "shutting down: no new jobs; running jobs get {} to finish",
            crate::units::HumanDuration(grace)
        );
        let grace_end = Instant::now() + grace;
        while !jobs.is_empty() {
            tokio::select! {
                _ = jobs.join_next() => {}
                () = tokio::time::sleep_until(grace_end) => break,
                () = hurry.cancelled() => break,
            }
        }
        if !jobs.is_empty() {
            let held = shared.leases.all();
            tracing::info!(jobs = held.len(), "grace period over: stopping the running jobs and handing them back");
            for (_, held) in held {
                held.stop(Stop::Shutdown);
            }
            let hard = Instant::now() + STOP_WAIT;
            while !jobs.is_empty() {
                tokio::select! {
                    _ = jobs.join_next() => {}
                    () = tokio::time::sleep_until(hard) => {
                        tracing::warn!(jobs = jobs.len(), "jobs did not stop in time; aborting them");
                        jobs.abort_all();
                        while jobs.join_next().await.is_some() {}
                    }
                }
            }
        }
        background.cancel();
        let _ = renewals.await;
        let _ = upkeep.await;
        shared.kept.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
        let summary = *shared.summary.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        tracing::info!(?summary, "worker stopped");
        summary
    }
}

/// Heartbeats, recovery of stalled jobs and the pruning of kept work directories, paced by the lease.
async fn upkeep(shared: Arc<Shared>, done: CancellationToken) {
    let lease = shared.options.lease;
    // Heartbeats: workers silent for three leases drop out of the stats.
    let beat_every = (lease / 3).max(Duration::from_millis(50));
    // Recovery: an expired lease is noticed within this, so a dead worker's job is back within lease + this.
    let recover_every = (lease / 2).min(Duration::from_secs(5)).max(Duration::from_millis(50));
    let tick = beat_every.min(recover_every);
    let (mut next_beat, mut next_recover) = (Instant::now(), Instant::now());
    loop {
        let now = Instant::now();
        if now >= next_beat {
            next_beat = now + beat_every;
            match shared.queue.heartbeat(&shared.info_now()).await {
                Ok(()) => shared.outage.ok(),
                Err(error) => shared.outage.failed("sending a heartbeat", &error),
            }
            prune_kept(&shared).await;
        }
        if now >= next_recover {
            next_recover = now + recover_every;
            match shared.queue.recover_stalled().await {
                Ok(recovered) if !recovered.is_empty() => {
                    tracing::info!(jobs = ?recovered, "recovered jobs whose lease had expired");
                    // A job the recovery ended has no worker to report it: this process does, once.
                    let endings = Endings::new(shared.queue.clone(), shared.store.clone(), shared.callbacks.clone());
                    for job in recovered.iter().filter(|job| job.state.is_final()) {
                        endings.ended(&job.id).await;
                    }
                }
                Ok(_) => {}
                Err(error) => shared.outage.failed("recovering stalled jobs", &error),
            }
        }
        tokio::select! {
            () = tokio::time::sleep(tick) => {}
            () = done.cancelled() => return,
        }
    }
}

/// Removes kept work directories that no retry of ours will use: the job ended, another worker took it, or it
/// has waited longer than any backoff.
async fn prune_kept(shared: &Shared) {
    let ids: Vec<(String, Instant)> = shared
        .kept
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .map(|(id, (_, at))| (id.clone(), *at))
        .collect();
    let longest = Duration::from_secs(3600);
    for (id, kept_at) in ids {
        let stale = match shared.queue.get(&id).await {
            Ok(Some(job)) => {
                job.state.is_final()
                    || (job.state == JobState::Active && job.worker.as_deref() != Some(shared.info.id.as_str()))
                    || kept_at.elapsed() > longest
            }
            Ok(None) => true,
            Err(_) => false,
        };
        if stale && !shared.leases.all().iter().any(|(held, _)| held == &id) {
            shared.kept.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&id);
        }
    }
}

/// How a run of a job turned out, before the queue is told.
enum Ran {
    /// The engine ran it.
    Report(JobReport, Arc<WorkDir>),
    /// It could not start; `retryable` says whether another attempt can help.
    NotStarted { message: String, retryable: bool, dir: Option<Arc<WorkDir>> },
}

/// Runs one taken job to its end and tells the queue and the store; then, holding the same slot, the next job
/// that completing it took (until the worker shuts down).
async fn run_job(
    shared: Arc<Shared>,
    lease: Lease,
    _permit: tokio::sync::OwnedSemaphorePermit,
    shutdown: CancellationToken,
) {
    let mut next = Some(lease);
    while let Some(lease) = next.take() {
        let Lease { job, token, resume } = lease;
        if shutdown.is_cancelled() {
            hand_back(&shared, &job.id, &token).await;
            break;
        }
        let sink = Arc::new(QueueSink::new(shared.queue.clone(), &job.id, token.clone()));
        let held = Arc::new(Held::with_sink(token, sink.clone()));
        shared.leases.insert(&job.id, held.clone());
        let began = Instant::now();
        sink.log(format!("attempt {} started on worker {}", job.attempts, shared.info.id));
        let ran = execute(&shared, &job, &held, resume).await;
        next = finish(&shared, &job, &held, ran, began, &shutdown).await;
        shared.leases.remove(&job.id);
        if let Some(callbacks) = &shared.callbacks {
            callbacks.job_ended(shared.queue.clone(), &job, Some(&shared.info.id));
        }
    }
}

/// Compiles the job's definition and runs it.
async fn execute(shared: &Shared, job: &Job, held: &Held, resume: bool) -> Ran {
    let runnable = match shared.runnable(&job.spec.definition) {
        Ok(runnable) => runnable,
        Err(error) => {
            if let DefinitionError::Invalid(problems) = &error {
                for problem in problems {
                    if let Some(sink) = &held.sink {
                        sink.log(format!("definition: {problem}"));
                    }
                }
            }
            return Ran::NotStarted { message: error.to_string(), retryable: false, dir: None };
        }
    };
    if let Some(recording) = &job.spec.recording_id
        && let Err(error) = start_row(shared.store.as_ref(), recording, job).await
    {
        // The row follows the job; a database hiccup must not stop the job itself.
        tracing::warn!(job = %job.id, recording = %recording, %error, "could not mark the recording processing");
    }
    // Made when a stage first asks for it.
    let dir = shared
        .take_kept(&job.id)
        .unwrap_or_else(|| Arc::new(WorkDir::new(&shared.engine.settings().work_root, &job.id)));
    let spec = JobSpec {
        id: job.id.clone(),
        recording_id: job.spec.recording_id.clone(),
        pipeline: job.spec.pipeline.clone(),
        params: job.spec.params.clone(),
        source: job.spec.source.clone(),
        trusted_source: job.spec.trusted_source,
    };
    let mut checkpoints = QueueCheckpoints::new(shared.queue.clone(), &job.id, held.token.clone(), resume);
    if let Some(sink) = &held.sink {
        checkpoints = checkpoints.holding_in(sink.clone());
    }
    let checkpoints = Arc::new(checkpoints);
    let engine = shared.engine.with_registry(runnable.registry.clone()).with_checkpoints(checkpoints);
    let mut sinks: Vec<Arc<dyn ProgressSink>> = Vec::new();
    if let Some(sink) = &held.sink {
        sinks.push(sink.clone());
    }
    if let Some(recording) = &job.spec.recording_id {
        sinks.push(Arc::new(StoreSink::new(shared.store.clone(), recording.clone())));
    }
    let sink: Arc<dyn ProgressSink> = if sinks.len() == 1 { sinks.remove(0) } else { Arc::new(Tee(sinks)) };
    match engine.run_in(&runnable.pipeline, spec, sink, held.cancel.clone(), dir.clone()).await {
        Ok(report) => Ran::Report(report, dir),
        Err(error) => {
            let retryable = matches!(error, EngineError::WorkDir { .. } | EngineError::Checkpoints(_));
            let message = match &error {
                EngineError::MissingKinds { .. } => format!("{error} on worker {}", shared.info.id),
                _ => format!("{error:#}"),
            };
            Ran::NotStarted { message, retryable, dir: Some(dir) }
        }
    }
}

/// Registers the recording when it is not known yet, and marks it processing.
async fn start_row(store: &dyn Store, recording: &str, job: &Job) -> Result<(), StoreError> {
    if store.get(recording).await?.is_none() {
        let new = NewRecording {
            id: recording.to_string(),
            file_url: job.spec.source.clone(),
            pipeline: Some(job.spec.pipeline.clone()),
            job_id: Some(job.id.clone()),
            ..NewRecording::default()
        };
        store.register(&new).await?;
    }
    let message = format!("attempt {}", job.attempts);
    store.set_status(recording, RecordingStatus::Processing, Some(&message), None).await.map(drop)
}

/// Tells the queue, the job's log and the recording row how the run ended; returns the next job that
/// completing this one took for the same slot, if any.
async fn finish(
    shared: &Shared,
    job: &Job,
    held: &Held,
    ran: Ran,
    began: Instant,
    shutdown: &CancellationToken,
) -> Option<Lease> {
    let id = job.id.as_str();
    let took = format!("{:.1} s", began.elapsed().as_secs_f64());
    match held.why() {
        Some(Stop::Lost) => {
            shared.count(|s| s.lost += 1);
            return None;
        }
        Some(Stop::Shutdown) => {
            flush_notes(held).await;
            if let Ran::Report(report, _) = &ran {
                save_report(shared, job, held, report).await;
            }
            held.ending();
            hand_back(shared, id, &held.token).await;
            return None;
        }
        Some(Stop::Cancel) => {
            if let Ran::Report(report, _) = &ran {
                note_stages(held, report);
            }
            flush_notes(held).await;
            if let Ran::Report(report, _) = &ran {
                save_report(shared, job, held, report).await;
            }
            held.ending();
            let told =
                until_told(shared, held, "marking a job cancelled", || shared.queue.cancelled(id, &held.token)).await;
            if told.is_ok() || confirmed(shared, id, JobState::Cancelled).await {
                shared.count(|s| s.cancelled += 1);
                shared.log(id, &format!("cancelled on request after {took}")).await;
                if let Some(recording) = &job.spec.recording_id {
                    let set = shared.store.set_status(recording, RecordingStatus::Cancelled, Some("cancelled"), None);
                    if let Err(error) = set.await {
                        tracing::warn!(job = id, %error, "could not mark the recording cancelled");
                    }
                }
            }
            return None;
        }
        None => {}
    }
    let (report, dir) = match ran {
        Ran::Report(report, dir) => (report, Some(dir)),
        Ran::NotStarted { message, retryable, dir } => {
            flush_notes(held).await;
            let failure = Failure { message: message.clone(), retryable, retry_after: None };
            fail(shared, job, held, failure, dir, None).await;
            return None;
        }
    };
    note_stages(held, &report);
    if let Some(sink) = &held.sink {
        for line in stage_lines(&report) {
            sink.log(line);
        }
    }
    match report.status {
        JobStatus::Succeeded => {
            let result = serde_json::to_value(&report).unwrap_or(Value::Null);
            held.ending();
            let mut notes = match &held.sink {
                Some(sink) => sink.take_all().await,
                None => crate::queue::Notes::default(),
            };
            notes.log.push(format!("completed in {took}"));
            // The next job for this slot comes with the completion, unless the worker is stopping. Only the first
            // call asks for one: a retry after a lost reply must not take a second job for one slot.
            let info = shared.info_now();
            let first = std::sync::atomic::AtomicBool::new(!shutdown.is_cancelled());
            let told = until_told(shared, held, "completing a job", || {
                let next = first.swap(false, std::sync::atomic::Ordering::AcqRel).then_some(&info);
                shared.queue.complete_and_take(id, &held.token, result.clone(), &notes, next)
            })
            .await;
            let (done, next) = match told {
                Ok(next) => (true, next),
                Err(_) => (confirmed(shared, id, JobState::Completed).await, None),
            };
            if done {
                shared.count(|s| s.completed += 1);
                if let Some(recording) = &job.spec.recording_id
                    && let Err(error) = settle(shared.store.as_ref(), recording, &report).await
                {
                    tracing::warn!(job = id, %error, "could not record the completed job in its recording row");
                }
            }
            next
        }
        JobStatus::Failed => {
            flush_notes(held).await;
            let failure = report.failure.as_ref();
            let message = failure.map_or_else(
                || "failed".to_string(),
                |f| match &f.stage {
                    Some(stage) => format!("stage `{stage}`: {}", f.message),
                    None => f.message.clone(),
                },
            );
            let retryable = failure.is_some_and(|f| f.retryable);
            save_report(shared, job, held, &report).await;
            fail(shared, job, held, Failure { message, retryable, retry_after: None }, dir, Some(&report)).await;
            None
        }
        JobStatus::Cancelled => {
            // Only a stop of ours cancels a run, and those were handled above; hand it back to be safe.
            flush_notes(held).await;
            held.ending();
            hand_back(shared, id, &held.token).await;
            None
        }
    }
}

/// Records a failed attempt: retried after a backoff (the work directory is kept for it), or failed for good.
async fn fail(
    shared: &Shared,
    job: &Job,
    held: &Held,
    failure: Failure,
    dir: Option<Arc<WorkDir>>,
    report: Option<&JobReport>,
) {
    let id = job.id.as_str();
    let message = failure.message.clone();
    held.ending();
    let told = until_told(shared, held, "failing a job", || shared.queue.fail(id, &held.token, failure.clone())).await;
    match told {
        Ok(FailOutcome::Retrying { at }) => {
            shared.count(|s| s.retried += 1);
            shared.log(id, &format!("attempt {} failed: {message}; retrying (due at {at} ms)", job.attempts)).await;
            if let Some(dir) = dir {
                shared.keep(id, dir);
            }
            if let Some(recording) = &job.spec.recording_id {
                let note = format!("attempt {} failed; retrying", job.attempts);
                if let Err(error) = shared.store.set_progress(recording, 0, None, &note).await {
                    tracing::debug!(job = id, %error, "could not note the retry in the recording row");
                }
            }
        }
        Ok(FailOutcome::Failed) => {
            shared.count(|s| s.failed += 1);
            shared.log(id, &format!("failed for good: {message}")).await;
            if let Some(recording) = &job.spec.recording_id {
                let set = match report {
                    Some(report) => settle(shared.store.as_ref(), recording, report).await,
                    None => shared
                        .store
                        .set_status(recording, RecordingStatus::Failed, Some("failed"), Some(&message))
                        .await
                        .map(drop),
                };
                if let Err(error) = set {
                    tracing::warn!(job = id, %error, "could not mark the recording failed");
                }
            }
        }
        Err(_) => {}
    }
}

/// Hands a held job back to waiting (a worker shutting down): another worker takes it at once.
async fn hand_back(shared: &Shared, id: &str, token: &LeaseToken) {
    let held = Held::new(token.clone());
    if until_told(shared, &held, "handing a job back", || shared.queue.release(id, token)).await.is_ok() {
        shared.count(|s| s.released += 1);
        shared.log(id, &format!("handed back to the queue: worker {} is shutting down", shared.info.id)).await;
        tracing::info!(job = id, "handed back to the queue");
    }
}

/// Writes the notes held back about a job now (before a call that is not the completion).
async fn flush_notes(held: &Held) {
    if let Some(sink) = &held.sink {
        sink.flush().await;
    }
}

/// Why a write about a held job did not happen.
#[derive(Debug)]
enum Untold {
    /// The lease is not ours any more.
    Lost,
    /// The queue stayed unreachable until the lease must have run out.
    GaveUp,
}

/// Retries a fenced write while the queue is unreachable and the lease may still be ours.
async fn until_told<T, F, Fut>(shared: &Shared, held: &Held, doing: &str, call: F) -> Result<T, Untold>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, QueueError>>,
{
    let mut backoff = Backoff::default();
    loop {
        match call().await {
            Ok(value) => {
                shared.outage.ok();
                return Ok(value);
            }
            Err(QueueError::LeaseLost(id)) => {
                tracing::warn!(job = %id, "{doing}: refused, the lease on the job is lost; nothing more is written");
                return Err(Untold::Lost);
            }
            Err(error) => {
                shared.outage.failed(doing, &error);
                let expired = held.renewed() + shared.options.lease + Duration::from_secs(5);
                if held.why() == Some(Stop::Lost) || Instant::now() > expired {
                    tracing::warn!(
                        %error,
                        "{doing}: gave up while the queue is unreachable; the job's lease runs out and it is recovered, \
                         resuming from its checkpoints"
                    );
                    return Err(Untold::GaveUp);
                }
                tokio::time::sleep(backoff.next()).await;
            }
        }
    }
}

/// Whether a write whose answer was lost (the lease looks gone now) did happen: the job is in `state` and was
/// last held by this worker.
async fn confirmed(shared: &Shared, id: &str, state: JobState) -> bool {
    matches!(shared.queue.get(id).await, Ok(Some(job)) if job.state == state && job.worker.as_deref() == Some(shared.info.id.as_str()))
}

/// Each stage's final status as a stage event, held with the job's other notes: the sink notes it once, so a
/// stage whose end a progress update already told is not told again.
fn note_stages(held: &Held, report: &JobReport) {
    let Some(sink) = &held.sink else { return };
    for (stage, outcome) in &report.stages {
        if outcome.status != StageStatus::NotRun {
            sink.stage(stage, outcome.status.name());
        }
    }
}

/// Keeps the report of an attempt that did not complete beside the job, for `echo-worker job ID`.
async fn save_report(shared: &Shared, job: &Job, held: &Held, report: &JobReport) {
    let value = serde_json::to_value(report).unwrap_or(Value::Null);
    let output = crate::job::StageOutput::from(value);
    if let Err(error) = shared.queue.save_checkpoint(&job.id, &held.token, REPORT_KEY, &output).await {
        tracing::debug!(job = %job.id, %error, "report not kept");
    }
}

/// Log lines for stages that failed, were retried or continued after a failure.
fn stage_lines(report: &JobReport) -> Vec<String> {
    let mut lines = Vec::new();
    for (stage, outcome) in &report.stages {
        let reason = outcome.reason.as_deref().unwrap_or("no reason given");
        match outcome.status {
            StageStatus::Failed if report.failure.as_ref().and_then(|f| f.stage.as_deref()) == Some(stage) => {
                lines.push(format!("stage `{stage}` failed after {} attempt(s): {reason}", outcome.attempts));
            }
            StageStatus::Failed => {
                lines.push(format!("warning: stage `{stage}` failed and the job went on: {reason}"));
            }
            StageStatus::Succeeded if outcome.attempts > 1 => {
                lines.push(format!("warning: stage `{stage}` succeeded after {} attempts", outcome.attempts));
            }
            _ => {}
        }
    }
    lines
}

/// Records how a job ended in its recording row: completed with the results (unless `persist` already did),
/// failed with the stage and reason, or cancelled.
///
/// # Errors
/// [`StoreError`] when the row cannot be written.
pub async fn settle(store: &dyn Store, id: &str, report: &JobReport) -> Result<(), StoreError> {
    match report.status {
        JobStatus::Succeeded => {
            let completed = store.get(id).await?.is_some_and(|r| r.status == RecordingStatus::Completed);
            if !completed {
                let outputs = serde_json::to_value(report.outputs()).unwrap_or_default();
                store.persist(id, None, &outputs).await?;
            }
        }
        JobStatus::Failed => {
            let failure = report.failure.as_ref();
            let reason = failure.map_or_else(
                || "failed".to_string(),
                |f| match &f.stage {
                    Some(stage) => format!("stage `{stage}`: {}", f.message),
                    None => f.message.clone(),
                },
            );
            store.set_status(id, RecordingStatus::Failed, Some("failed"), Some(&reason)).await?;
        }
        JobStatus::Cancelled => {
            store.set_status(id, RecordingStatus::Cancelled, Some("cancelled"), None).await?;
        }
    }
    Ok(())
}
