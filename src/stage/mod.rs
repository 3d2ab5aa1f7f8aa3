//! Stages: the [`Stage`] trait every stage kind implements, the [`StageContext`] a stage runs with, the
//! [`StageError`] that tells the engine whether a retry can help, and the [`StageKind`]s a pipeline's `uses`
//! can name.
//!
//! A kind is a builtin (each declares its `with` parameters as a Rust struct in `builtin/`), a plugin from
//! `plugins/`, or a custom kind an embedding program registers in code. All of them go through one
//! [`StageRegistry`].

pub mod builtin;
pub mod workdir;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

pub use builtin::BuiltinKind;
pub use workdir::WorkDir;

use crate::job::checkpoint::Checkpoints;
use crate::job::progress::ProgressReporter;
use crate::job::{JobSpec, StageError, StageOutput};

/// What a stage's `uses` resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StageKind {
    /// A kind implemented in this crate.
    Builtin(BuiltinKind),
    /// A plugin declared in `plugins/NAME.toml`.
    Plugin(String),
    /// A kind registered in code by the program embedding the engine; its `with` is not checked at load time.
    Custom(String),
}

impl StageKind {
    /// The name written in `uses`.
    pub fn name(&self) -> &str {
        match self {
            Self::Builtin(kind) => kind.name(),
            Self::Plugin(name) | Self::Custom(name) => name,
        }
    }
}

impl fmt::Display for StageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One stage kind's behaviour.
#[async_trait::async_trait]
pub trait Stage: Send + Sync {
    /// Runs one attempt. The stage must return promptly (within about a second) once `ctx.cancel` fires,
    /// killing any process it started and dropping any request in flight.
    ///
    /// # Errors
    /// A [`StageError`] saying whether another attempt can help.
    async fn run(&self, ctx: StageContext) -> Result<StageOutput, StageError>;
}

/// Everything one attempt of a stage can see.
#[derive(Clone)]
pub struct StageContext {
    /// The job being run.
    pub job: Arc<JobSpec>,
    /// This stage's id in the pipeline.
    pub stage_id: String,
    /// The stage's `with` values, rendered.
    pub params: Value,
    /// The job's private work directory, made when a stage first calls [`WorkDir::ensure`]; removed when the job
    /// ends.
    pub work_dir: Arc<WorkDir>,
    /// Outputs of the stage's ancestors, by stage id.
    pub inputs: Arc<BTreeMap<String, Value>>,
    /// Where to report sub-progress (fraction and message).
    pub progress: ProgressReporter,
    /// Fires when the job is cancelled, fails elsewhere, or the attempt times out.
    pub cancel: CancellationToken,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// The `for_each` item and its index, when the stage fans out.
    pub item: Option<(usize, Value)>,
    /// The job's checkpoint store, for stages that save progress inside themselves (one transcribed chunk at a
    /// time) under keys of their own.
    pub checkpoints: Arc<dyn Checkpoints>,
}

impl std::fmt::Debug for StageContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StageContext")
            .field("job", &self.job.id)
            .field("stage_id", &self.stage_id)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use crate::ai::AiError;
    use crate::error::ErrorCode;
    use crate::job::StageError;

    #[test]
    fn cancellation_is_known_by_its_code_not_by_its_words() {
        let cancelled = StageError::cancelled();
        assert_eq!(cancelled.code, ErrorCode::Cancelled);
        assert!(cancelled.is_cancelled());
        let worded = StageError::permanent(ErrorCode::ExitStatus, "plugin `x` exited with status 1: cancelled");
        assert!(!worded.is_cancelled(), "a message that says cancelled is not a cancellation");
        let ai =
            AiError { message: "cancelled".into(), retryable: false, code: ErrorCode::Cancelled, retry_after: None };
        assert!(ai.is_cancelled() && StageError::from(ai).is_cancelled(), "an AI cancellation stays one");
        let quota = AiError {
            message: "provider `p`: the account's quota is used up (insufficient_quota)".into(),
            retryable: false,
            code: ErrorCode::InsufficientQuota,
            retry_after: None,
        };
        let stage = StageError::from(quota);
        assert_eq!((stage.code, stage.retryable), (ErrorCode::InsufficientQuota, false), "the class carries over");
    }
}
