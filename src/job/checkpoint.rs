//! Checkpoints: a finished stage's output, saved before its dependents start, so that a retried or recovered
//! job resumes after its last finished stage instead of paying for the same work twice. The trait is small so
//! that the queue can keep checkpoints in Redis next to the job; [`MemoryCheckpoints`] serves local runs and
//! tests.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::job::StageOutput;

/// The checkpoint store could not be read or written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("checkpoints of job {job_id}: {message}")]
pub struct CheckpointError {
    /// The job whose checkpoints failed.
    pub job_id: String,
    /// What went wrong.
    pub message: String,
}

/// Where checkpoints live. Keys are stage ids; stages may add their own keys (e.g. one per transcribed chunk).
#[async_trait::async_trait]
pub trait Checkpoints: Send + Sync {
    /// Every checkpoint of a job.
    ///
    /// # Errors
    /// [`CheckpointError`] when the store cannot be read.
    async fn load(&self, job_id: &str) -> Result<HashMap<String, StageOutput>, CheckpointError>;

    /// Saves one checkpoint, replacing an older one under the same key.
    ///
    /// # Errors
    /// [`CheckpointError`] when the store cannot be written.
    async fn save(&self, job_id: &str, key: &str, output: &StageOutput) -> Result<(), CheckpointError>;

    /// Forgets every checkpoint of a job.
    ///
    /// # Errors
    /// [`CheckpointError`] when the store cannot be written.
    async fn clear(&self, job_id: &str) -> Result<(), CheckpointError>;
}

/// Checkpoints in this process's memory; they last as long as the process.
#[derive(Debug, Default)]
pub struct MemoryCheckpoints {
    jobs: Mutex<HashMap<String, HashMap<String, StageOutput>>>,
}

impl MemoryCheckpoints {
    fn jobs(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<String, StageOutput>>> {
        // Each operation is a single map access, so a poisoned lock still holds consistent data.
        self.jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait::async_trait]
impl Checkpoints for MemoryCheckpoints {
    async fn load(&self, job_id: &str) -> Result<HashMap<String, StageOutput>, CheckpointError> {
        Ok(self.jobs().get(job_id).cloned().unwrap_or_default())
    }

    async fn save(&self, job_id: &str, key: &str, output: &StageOutput) -> Result<(), CheckpointError> {
        self.jobs().entry(job_id.to_string()).or_default().insert(key.to_string(), output.clone());
        Ok(())
    }

    async fn clear(&self, job_id: &str) -> Result<(), CheckpointError> {
        self.jobs().remove(job_id);
        Ok(())
    }
}
