//! A job's checkpoints kept in the queue, beside the job: the engine's [`Checkpoints`] on top of
//! [`Queue::checkpoints`] and [`Queue::save_checkpoint`]. Saves carry the job's lease token, so a worker whose
//! lease passed to another cannot write checkpoints any more (the save fails and the stage with it), and a job
//! recovered or retried on any worker resumes from what was saved.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::job::StageOutput;
use crate::job::checkpoint::{CheckpointError, Checkpoints};
use crate::queue::{LeaseToken, Queue, QueueError};

/// The checkpoints of one held job.
pub struct QueueCheckpoints {
    queue: Arc<dyn Queue>,
    job_id: String,
    token: LeaseToken,
    /// Whether the queue may hold checkpoints of the job: it said so when the job was taken
    /// ([`crate::queue::Lease::resume`]), or this attempt saved some.
    stored: AtomicBool,
}

impl QueueCheckpoints {
    /// Checkpoints of `job_id`, written under `token`; `resume` is the lease's word on whether any exist yet
    /// (when not, loading them costs no round trip until this attempt saves one).
    pub fn new(queue: Arc<dyn Queue>, job_id: impl Into<String>, token: LeaseToken, resume: bool) -> Self {
        Self { queue, job_id: job_id.into(), token, stored: AtomicBool::new(resume) }
    }

    /// Refuses a job other than the one this store was made for.
    fn same_job(&self, job_id: &str) -> Result<(), CheckpointError> {
        if job_id == self.job_id {
            Ok(())
        } else {
            Err(CheckpointError {
                job_id: job_id.to_string(),
                message: format!("these checkpoints belong to job {}", self.job_id),
            })
        }
    }
}

fn error(job_id: &str, error: &QueueError) -> CheckpointError {
    let message = match error {
        QueueError::LeaseLost(_) => "the lease on the job was lost: another worker holds it, or it ended".to_string(),
        other => other.to_string(),
    };
    CheckpointError { job_id: job_id.to_string(), message }
}

#[async_trait::async_trait]
impl Checkpoints for QueueCheckpoints {
    async fn load(&self, job_id: &str) -> Result<HashMap<String, StageOutput>, CheckpointError> {
        self.same_job(job_id)?;
        if !self.stored.load(Ordering::Acquire) {
            return Ok(HashMap::new());
        }
        let saved = self.queue.checkpoints(job_id).await.map_err(|e| error(job_id, &e))?;
        Ok(saved.into_iter().collect())
    }

    async fn save(&self, job_id: &str, key: &str, output: &StageOutput) -> Result<(), CheckpointError> {
        self.same_job(job_id)?;
        // Set before the write: a save whose answer is lost may still have landed.
        self.stored.store(true, Ordering::Release);
        self.queue.save_checkpoint(job_id, &self.token, key, output).await.map_err(|e| error(job_id, &e))
    }

    /// The queue removes a job's checkpoints itself: when the job completes, and with the job when retention or
    /// `clean` removes it. A failed or cancelled job keeps them, so that a retry resumes from them.
    async fn clear(&self, job_id: &str) -> Result<(), CheckpointError> {
        self.same_job(job_id)
    }
}
