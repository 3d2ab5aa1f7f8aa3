//! A held job's progress to the queue: each coalesced update (at most 5 a second, from the engine's emitter)
//! becomes the job's stored progress and a `progress` event, and each stage that starts running a `running`
//! stage event. Writes carry the lease token; a refused or failed write is dropped (the renewal task notices a
//! lost lease, and the next update may get through).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use crate::job::progress::{ProgressSink, ProgressUpdate};
use crate::queue::{LeaseToken, Progress, Queue};

/// Progress of one held job, for the queue.
pub struct QueueSink {
    queue: Arc<dyn Queue>,
    job_id: String,
    token: LeaseToken,
    running: Mutex<BTreeSet<String>>,
}

impl QueueSink {
    /// Progress of `job_id`, written under `token`.
    pub fn new(queue: Arc<dyn Queue>, job_id: impl Into<String>, token: LeaseToken) -> Self {
        Self { queue, job_id: job_id.into(), token, running: Mutex::new(BTreeSet::new()) }
    }
}

#[async_trait::async_trait]
impl ProgressSink for QueueSink {
    async fn update(&self, update: ProgressUpdate) {
        let started: Vec<String> = {
            let mut running = self.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let started = update.running.iter().filter(|stage| !running.contains(*stage)).cloned().collect();
            *running = update.running.iter().cloned().collect();
            started
        };
        for stage in started {
            if let Err(error) = self.queue.stage_event(&self.job_id, &self.token, &stage, "running").await {
                tracing::debug!(job = %self.job_id, %stage, %error, "stage event not written");
            }
        }
        let stage = update.stage.filter(|stage| !stage.is_empty());
        let progress = Progress { percent: update.percent, stage, message: update.message };
        if let Err(error) = self.queue.progress(&self.job_id, &self.token, progress).await {
            tracing::debug!(job = %self.job_id, %error, "progress not written");
        }
    }
}
