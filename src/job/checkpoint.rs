//! Checkpoints: a finished stage's output, saved before its dependents start, so that a retried or recovered
//! job resumes after its last finished stage instead of paying for the same work twice. The trait is small so
//! that the queue can keep checkpoints in Redis next to the job; [`MemoryCheckpoints`] serves local runs and
//! tests.
//!
//! The engine saves and loads checkpoints but never clears them: only the job's owner (`process`, the queue)
//! knows whether the job will run again. See [`Checkpoints::clear`].

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

    /// Forgets every checkpoint of a job. The job's owner calls it once the job has **ended for good**, that is
    /// when no later run of the same job id will happen:
    ///
    /// - it succeeded and its result has been recorded;
    /// - it failed or was cancelled and will not be retried (no attempt left, the owner gave up, or, as in
    ///   `echo-worker process`, job ids are never reused).
    ///
    /// A job that failed and may still be retried keeps its checkpoints: the retry restores its finished stages
    /// and whisper's transcribed chunks instead of paying for them again. The engine itself never calls this.
    ///
    /// # Errors
    /// [`CheckpointError`] when the store cannot be written.
    async fn clear(&self, job_id: &str) -> Result<(), CheckpointError>;
}

/// Checkpoints in this process's memory; they last until their job is cleared, or as long as the process.
#[derive(Debug, Default)]
pub struct MemoryCheckpoints {
    jobs: Mutex<HashMap<String, HashMap<String, StageOutput>>>,
}

impl MemoryCheckpoints {
    /// How many jobs have checkpoints here.
    pub fn job_count(&self) -> usize {
        self.jobs().len()
    }

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
