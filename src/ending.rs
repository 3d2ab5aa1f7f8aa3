//! Jobs that end without their worker: a job cancelled while waiting or delayed (by the API or the CLI), and a
//! job that stall recovery fails after `max_stalls` or cancels because its worker died after a cancel was
//! asked. Nobody runs such a job's end, so this says it where a worker would have (ARCHITECTURE.md): the
//! recording row is set to failed or cancelled, and the job's `callbackUrl` gets its signed callback.
//!
//! Each such ending is reported by the one process whose call ended it (the queue changes a job's state in one
//! atomic step and tells only that caller), so a row is set and a callback sent once. A process that dies
//! between the queue's step and this report leaves them unsaid: the queue's state stays the truth, and the
//! `GET /api/job/:id/status` route shows it.

use std::sync::Arc;
use std::time::Duration;

use crate::callback::Callbacks;
use crate::queue::{Job, JobState, Queue};
use crate::store::{RecordingStatus, Store};

/// Reports the endings of jobs that no worker ended. Cheap to clone.
#[derive(Clone)]
pub struct Endings {
    queue: Arc<dyn Queue>,
    store: Arc<dyn Store>,
    callbacks: Option<Callbacks>,
}

impl std::fmt::Debug for Endings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endings").field("callbacks", &self.callbacks).finish_non_exhaustive()
    }
}

impl Endings {
    /// Endings of jobs on `queue`, written to `store`, called back through `callbacks` (none: no callbacks).
    pub fn new(queue: Arc<dyn Queue>, store: Arc<dyn Store>, callbacks: Option<Callbacks>) -> Self {
        Self { queue, store, callbacks }
    }

    /// Job `id` was just ended by this process's call to the queue (a cancel answered `Cancelled`, or a
    /// recovery that returned it): sets its recording row and sends its callback on a task of its own. A job
    /// that is not in a final state, or completed, is left alone (its worker reports those).
    pub async fn ended(&self, id: &str) {
        let job = match self.queue.get(id).await {
            Ok(Some(job)) => job,
            Ok(None) => return,
            Err(error) => {
                tracing::warn!(job = id, %error, "the job ended, but could not be read to say so in its row and callback");
                return;
            }
        };
        if !matches!(job.state, JobState::Failed | JobState::Cancelled) {
            return;
        }
        self.mark(&job).await;
        if let Some(callbacks) = &self.callbacks {
            callbacks.job_ended(self.queue.clone(), &job, None);
        }
    }

    /// Lets callbacks in flight end, for at most `within` (a process about to exit).
    pub async fn finish(&self, within: Duration) {
        if let Some(callbacks) = &self.callbacks {
            callbacks.finish(within).await;
        }
    }

    /// Sets the recording row of a failed or cancelled job; a failure is only logged (the queue is what counts).
    async fn mark(&self, job: &Job) {
        let Some(recording) = job.spec.recording_id.as_deref() else { return };
        let set = match job.state {
            JobState::Failed => {
                let reason = job.error.as_deref().unwrap_or("failed");
                self.store.set_status(recording, RecordingStatus::Failed, Some("failed"), Some(reason)).await
            }
            _ => self.store.set_status(recording, RecordingStatus::Cancelled, Some("cancelled"), None).await,
        };
        if let Err(error) = set {
            tracing::warn!(recording, %error, "could not update the recording row");
        }
    }
}
