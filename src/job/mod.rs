//! The job contract that the engine, the stages, the store and the queue share: what a job is ([`JobSpec`]),
//! what one stage attempt gives back ([`StageOutput`] or [`StageError`]), where finished stages are kept
//! ([`checkpoint`]) and where progress goes ([`progress`]). It sits below all of them so that each can depend
//! on it without depending on the others (ARCHITECTURE.md).

pub mod checkpoint;
pub mod progress;

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ErrorCode;

/// The job as stages and templates see it (`job.*`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    /// The job id; checkpoints are kept under it.
    pub id: String,
    /// The recording the job belongs to, when it came through the API.
    pub recording_id: Option<String>,
    /// The pipeline's name.
    pub pipeline: String,
    /// Free parameters from the caller (`job.params.language`).
    #[serde(default)]
    pub params: serde_json::Map<String, Value>,
    /// Where the media is: a URL, `supabase://bucket/path` or a local path.
    pub source: Option<String>,
    /// The source was typed by the user on the command line, so a local path need not be under the storage
    /// root. Never set for jobs from the API or the queue.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub trusted_source: bool,
}

/// A stage's result: a JSON value for templates and the store, and the files it left in the work directory.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StageOutput {
    /// The output value, readable as `stages.<id>` by dependent stages.
    pub value: Value,
    /// Files the output refers to; a checkpoint is only reused while they all exist.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<PathBuf>,
}

impl From<Value> for StageOutput {
    fn from(value: Value) -> Self {
        Self { value, files: Vec::new() }
    }
}

/// Why an attempt failed, and whether another attempt can help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct StageError {
    /// A sentence naming what failed.
    pub message: String,
    /// Whether a retry can help (a timeout, a 5xx or 429, a dropped connection).
    pub retryable: bool,
    /// How long the provider asked us to wait before the next attempt; it wins over the backoff.
    pub retry_after: Option<Duration>,
    /// A stable class for tools, such as `timeout`, `http_status` or `invalid_output`.
    pub code: ErrorCode,
}

impl StageError {
    /// An error another attempt may not repeat.
    pub fn transient(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { message: message.into(), retryable: true, retry_after: None, code }
    }

    /// An error every attempt would repeat (bad input, 4xx, schema mismatch).
    pub fn permanent(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { message: message.into(), retryable: false, retry_after: None, code }
    }

    /// The attempt stopped because the job was cancelled.
    pub fn cancelled() -> Self {
        Self::permanent(ErrorCode::Cancelled, "cancelled")
    }

    /// Whether the attempt stopped because of cancellation (its code is [`ErrorCode::Cancelled`]), whatever
    /// its message says.
    pub const fn is_cancelled(&self) -> bool {
        self.code.is_cancelled()
    }

    /// Sets the wait the provider asked for.
    #[must_use]
    pub fn with_retry_after(mut self, wait: Option<Duration>) -> Self {
        self.retry_after = wait;
        self
    }
}
