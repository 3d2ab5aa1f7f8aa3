//! The engine runs one job: one file through one pipeline's stage DAG (ARCHITECTURE.md).
//!
//! - Stages whose needs are finished run side by side, up to a per-job limit.
//! - `trigger` and `if` decide whether a stage runs or is skipped; `on_failure = "continue"` lets the job go on.
//! - `for_each` fans a stage out over a list, `max_parallel` at a time, and collects outputs in item order.
//! - Each attempt has the stage's timeout; the job has a deadline; failures are retried with exponential
//!   backoff and jitter when the error says a retry can help, and a provider's `retry_after` wins.
//! - Cancelling the job's token stops every running stage within about a second, kills child processes and
//!   drops requests in flight.
//! - Finished stages are checkpointed before their dependents start; a later run of the same job restores
//!   them instead of running them again, unless their output files are gone.
//! - Progress is reported, coalesced, to a [`ProgressSink`].
//!
//! The work happens in [`scheduler`]; this module holds the types callers use.

pub mod registry;
pub mod scheduler;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use indexmap::IndexMap;
use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::error::ErrorCode;
use crate::job::checkpoint::{CheckpointError, Checkpoints};
use crate::job::progress::ProgressSink;
use crate::job::{JobSpec, StageError};
use crate::pipeline::Pipeline;
use crate::stage::StageKind;
use crate::template::Renderer;
pub use registry::{Kinds, StageRegistry};

/// Limits of the engine.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// Where work directories are created.
    pub work_root: PathBuf,
    /// Stages of one job that may run at once.
    pub max_parallel_stages: usize,
    /// Deadline for a whole job, retries included.
    pub job_timeout: Duration,
    /// Shortest time between two progress updates to a sink.
    pub progress_interval: Duration,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            work_root: std::env::temp_dir(),
            // Four stages at once covers the widest shipped pipeline without oversubscribing two cores.
            max_parallel_stages: 4,
            job_timeout: Duration::from_secs(3600),
            progress_interval: crate::job::progress::DEFAULT_INTERVAL,
        }
    }
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Every stage succeeded, was skipped, or failed with `on_failure = "continue"`.
    Succeeded,
    /// A stage failed, or the deadline passed.
    Failed,
    /// The job's token was cancelled.
    Cancelled,
}

/// How one stage ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StageStatus {
    /// It ran and succeeded.
    Succeeded,
    /// Its checkpoint was reused; it did not run.
    Restored,
    /// Its trigger or `if` said not to run.
    Skipped,
    /// It failed.
    Failed,
    /// It was stopped by cancellation or by another stage's failure.
    Cancelled,
    /// The job ended before it could start.
    NotRun,
}

impl StageStatus {
    /// The status's name, as reports, progress updates and stage events carry it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Restored => "restored",
            Self::Skipped => "skipped",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::NotRun => "not_run",
        }
    }
}

/// One stage's part of a [`JobReport`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageReport {
    /// How it ended.
    pub status: StageStatus,
    /// Attempts made (the largest over `for_each` items).
    pub attempts: u32,
    /// Its output, when it succeeded or was restored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// Why it failed or was skipped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// How long it ran in this run, from its first attempt's start to its end (retries included); `None` when
    /// it did not run (restored, skipped, not run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

/// Why a job failed: the stage and its error.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobFailure {
    /// The failing stage, or `None` for job-level failures such as the deadline.
    pub stage: Option<String>,
    /// A sentence for a person.
    pub message: String,
    /// Whether running the job again can help.
    pub retryable: bool,
    /// The error's class.
    pub code: ErrorCode,
}

/// The result of one job run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobReport {
    /// The job.
    pub job_id: String,
    /// The pipeline.
    pub pipeline: String,
    /// How it ended.
    pub status: JobStatus,
    /// Every stage, in the pipeline's order.
    pub stages: IndexMap<String, StageReport>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<JobFailure>,
}

impl JobReport {
    /// Outputs of the stages that succeeded or were restored.
    pub fn outputs(&self) -> IndexMap<&str, &Value> {
        self.stages.iter().filter_map(|(id, stage)| Some((id.as_str(), stage.output.as_ref()?))).collect()
    }
}

/// Why a job could not start.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Some stage kinds have no implementation in this process.
    #[error("pipeline `{pipeline}` cannot run here: {}", describe_missing(.missing))]
    MissingKinds {
        /// The pipeline.
        pipeline: String,
        /// `(stage id, kind)` pairs.
        missing: Vec<(String, StageKind)>,
    },
    /// The work directory could not be created (the I/O error is the `source`, printed once by a chain).
    #[error("cannot create a work directory under {}", root.display())]
    WorkDir {
        /// The configured root.
        root: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Checkpoints could not be read.
    #[error(transparent)]
    Checkpoints(#[from] CheckpointError),
}

fn describe_missing(missing: &[(String, StageKind)]) -> String {
    missing
        .iter()
        .map(|(stage, kind)| format!("stage `{stage}` uses `{kind}`, which is not available yet"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Runs jobs; cheap to share between tasks.
#[derive(Clone)]
pub struct Engine {
    registry: Arc<StageRegistry>,
    checkpoints: Arc<dyn Checkpoints>,
    settings: EngineSettings,
    renderer: Arc<Renderer>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("registry", &self.registry).field("settings", &self.settings).finish()
    }
}

impl Engine {
    /// An engine over a registry of stage kinds and a checkpoint store.
    pub fn new(registry: StageRegistry, checkpoints: Arc<dyn Checkpoints>, settings: EngineSettings) -> Self {
        Self { registry: Arc::new(registry), checkpoints, settings, renderer: Arc::new(Renderer::default()) }
    }

    /// This engine with another registry of stage kinds: a worker runs each job with the plugins the job carries.
    #[must_use]
    pub fn with_registry(&self, registry: Arc<StageRegistry>) -> Self {
        Self { registry, ..self.clone() }
    }

    /// This engine with another checkpoint store: a worker gives each job one that writes under its lease.
    #[must_use]
    pub fn with_checkpoints(&self, checkpoints: Arc<dyn Checkpoints>) -> Self {
        Self { checkpoints, ..self.clone() }
    }

    /// The engine's limits.
    pub fn settings(&self) -> &EngineSettings {
        &self.settings
    }

    /// Checks that every stage of `pipeline` has an implementation, before any work starts.
    ///
    /// # Errors
    /// [`EngineError::MissingKinds`] listing every stage that cannot run.
    pub fn check(&self, pipeline: &Pipeline) -> Result<(), EngineError> {
        let missing = self.registry.missing(pipeline);
        if missing.is_empty() {
            Ok(())
        } else {
            Err(EngineError::MissingKinds { pipeline: pipeline.name.clone(), missing })
        }
    }

    /// Runs `job` through `pipeline` until it succeeds, fails, is cancelled through `cancel`, or passes the
    /// deadline. Stage failures are part of the report, not errors.
    ///
    /// # Errors
    /// [`EngineError`] when the job cannot start.
    pub async fn run(
        &self,
        pipeline: &Pipeline,
        job: JobSpec,
        sink: Arc<dyn ProgressSink>,
        cancel: CancellationToken,
    ) -> Result<JobReport, EngineError> {
        scheduler::run(self, pipeline, job, sink, cancel, None).await
    }

    /// [`Engine::run`] in a work directory the caller owns and keeps: files that checkpointed stages left there
    /// are still there when the same job runs again in it (a retry on the same worker), and the caller removes
    /// it when the job has ended for good.
    ///
    /// # Errors
    /// [`EngineError`] when the job cannot start.
    pub async fn run_in(
        &self,
        pipeline: &Pipeline,
        job: JobSpec,
        sink: Arc<dyn ProgressSink>,
        cancel: CancellationToken,
        work_dir: Arc<crate::stage::WorkDir>,
    ) -> Result<JobReport, EngineError> {
        scheduler::run(self, pipeline, job, sink, cancel, Some(work_dir)).await
    }
}

/// Turns a failed attempt's error into the failure of the job.
fn failure(stage: Option<&str>, error: &StageError) -> JobFailure {
    JobFailure {
        stage: stage.map(str::to_string),
        message: error.message.clone(),
        retryable: error.retryable,
        code: error.code,
    }
}
