//! The store: where recordings, their live status and their results live, so the frontend can read them
//! (ARCHITECTURE.md). One [`Store`] trait; [`sql::SqlStore`] implements it on SQLite (the embedded default,
//! `sqlite://echo.db`) and PostgreSQL (Supabase included, so Supabase Realtime sees every update).
//!
//! Status rules, enforced in SQL so that no writer can break them: a completed recording never goes back to
//! `processing`, failed or cancelled; progress is only written while `processing`; and writing the same
//! result twice leaves the row as it was.
//!
//! Where each field lives is a [`Layout`]: the store's own table (`echo`), or the live frontend's Supabase
//! `recordings` table (`supabase-legacy`), which the store reads and updates but never creates or alters.

pub mod layout;
pub mod sink;
pub mod sql;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use layout::{Layout, Profile};
pub use sink::StoreSink;
pub use sql::SqlStore;

/// Where a recording is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordingStatus {
    /// Known, not yet queued.
    Pending,
    /// Waiting for a worker.
    Queued,
    /// A worker is on it.
    Processing,
    /// Results are stored.
    Completed,
    /// It failed; `error` says why.
    Failed,
    /// Someone cancelled it.
    Cancelled,
}

impl RecordingStatus {
    /// The value stored in the `status` column.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Queued => "queued",
            Self::Processing => "processing",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// Reads a `status` column value.
    pub fn parse(text: &str) -> Option<Self> {
        [Self::Pending, Self::Queued, Self::Processing, Self::Completed, Self::Failed, Self::Cancelled]
            .into_iter()
            .find(|status| status.as_str() == text)
    }

    /// The states a recording may move to this one from.
    pub(crate) const fn allowed_from(self) -> &'static [&'static str] {
        match self {
            // Re-running a recording (retry, reprocess) queues it again from any settled state.
            Self::Pending | Self::Queued => &["pending", "queued", "failed", "cancelled", "completed"],
            Self::Processing => &["pending", "queued", "processing", "failed", "cancelled"],
            Self::Completed => &["pending", "queued", "processing", "completed"],
            Self::Failed | Self::Cancelled => &["pending", "queued", "processing"],
        }
    }
}

/// One row of the recordings table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Recording {
    /// The recording id (the frontend's row id).
    pub id: String,
    /// Where the media is.
    pub file_url: Option<String>,
    /// The uploaded file's name.
    pub file_name: Option<String>,
    /// The sniffed MIME type.
    pub mime_type: Option<String>,
    /// The file size.
    pub size_bytes: Option<i64>,
    /// The duration in seconds.
    pub duration_s: Option<f64>,
    /// Where it is in its life.
    pub status: RecordingStatus,
    /// 0 to 100.
    pub progress: i64,
    /// The stage running now.
    pub stage: Option<String>,
    /// A message for people.
    pub message: Option<String>,
    /// The job working on it.
    pub job_id: Option<String>,
    /// The pipeline it runs through.
    pub pipeline: Option<String>,
    /// The transcript text.
    pub transcript: Option<String>,
    /// The results, by field name.
    pub result: Option<Value>,
    /// Why it failed.
    pub error: Option<String>,
    /// The user it belongs to.
    pub owner_id: Option<String>,
    /// When the row was created (RFC 3339, UTC).
    pub created_at: String,
    /// When the row last changed (RFC 3339, UTC).
    pub updated_at: String,
    /// When it completed.
    pub completed_at: Option<String>,
}

/// What is known about a recording when it is registered.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NewRecording {
    /// The id.
    pub id: String,
    /// Where the media is.
    pub file_url: Option<String>,
    /// The file's name.
    pub file_name: Option<String>,
    /// The MIME type, when the uploader said.
    pub mime_type: Option<String>,
    /// The size, when the uploader said.
    pub size_bytes: Option<i64>,
    /// The owner.
    pub owner_id: Option<String>,
    /// The pipeline.
    pub pipeline: Option<String>,
    /// The job.
    pub job_id: Option<String>,
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or refused a statement.
    #[error("database error while {action}: {cause}")]
    Database {
        /// What was being done, naming the recording.
        action: String,
        /// The driver error (kept out of the error chain so that it is printed once).
        cause: sqlx::Error,
    },
    /// The configuration is unusable (URL scheme, table name).
    #[error("store configuration: {0}")]
    Config(String),
    /// No recording has this id.
    #[error("no recording with id {0}")]
    NotFound(String),
    /// The recording's state does not allow the change.
    #[error("{0}")]
    Refused(String),
}

/// Recordings, their status and their results.
#[async_trait::async_trait]
pub trait Store: Send + Sync {
    /// Registers a recording, or refreshes the job, pipeline and file fields of an existing one.
    async fn register(&self, recording: &NewRecording) -> Result<Recording, StoreError>;

    /// One recording.
    async fn get(&self, id: &str) -> Result<Option<Recording>, StoreError>;

    /// Moves a recording to `status` with a message and (for failures) an error. Returns `false`, changing
    /// nothing, when the move is not allowed (a completed recording never becomes `processing` again).
    async fn set_status(
        &self,
        id: &str,
        status: RecordingStatus,
        message: Option<&str>,
        error: Option<&str>,
    ) -> Result<bool, StoreError>;

    /// Records progress, the current stage and a message; ignored unless the recording is `processing`.
    async fn set_progress(&self, id: &str, progress: u8, stage: Option<&str>, message: &str) -> Result<(), StoreError>;

    /// Records media facts found by `validate`; the same facts again change nothing.
    async fn set_media(
        &self,
        id: &str,
        mime_type: &str,
        size_bytes: Option<i64>,
        duration_s: Option<f64>,
    ) -> Result<(), StoreError>;

    /// Writes the results and marks the recording completed. Writing the same results again changes nothing,
    /// not even `updated_at`.
    async fn persist(&self, id: &str, transcript: Option<&str>, result: &Value) -> Result<(), StoreError>;

    /// One named column of a recording's row as text (a boolean reads `true`/`false` on PostgreSQL, `1`/`0` on
    /// SQLite); `None` when the row or the column does not exist. For columns the frontend owns, such as the
    /// legacy table's `enable_coaching`.
    ///
    /// # Errors
    /// [`StoreError::Database`] when the database cannot be read.
    async fn read_column(&self, id: &str, column: &str) -> Result<Option<String>, StoreError> {
        let _ = (id, column);
        Ok(None)
    }

    /// [`Store::persist`], also writing named `columns` of the row (a pipeline's `persist` `columns`). A null
    /// value leaves its column as it was, so a missing result never erases a known one.
    ///
    /// # Errors
    /// [`StoreError::Refused`] naming a column the table lacks, one the store keeps itself, or a value the
    /// column's type cannot take; the default implementation refuses any column.
    async fn persist_columns(
        &self,
        id: &str,
        transcript: Option<&str>,
        result: &Value,
        columns: &indexmap::IndexMap<String, Value>,
    ) -> Result<(), StoreError> {
        if let Some(name) = columns.iter().find(|(_, value)| !value.is_null()).map(|(name, _)| name) {
            return Err(StoreError::Refused(format!("this store cannot write named columns (`{name}`)")));
        }
        self.persist(id, transcript, result).await
    }
}
