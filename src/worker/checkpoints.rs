//! A job's checkpoints kept in the queue, beside the job: the engine's [`Checkpoints`] on top of
//! [`Queue::checkpoints`] and [`Queue::save_checkpoint`]. Saves carry the job's lease token, so a worker whose
//! lease passed to another cannot write checkpoints any more (the save fails and the stage with it), and a job
//! recovered or retried on any worker resumes from what was saved.
//!
//! A stage's own output saved while the job is young goes with the job's held-back notes instead of a round
//! trip of its own (see [`super::sink`]); keys with a `/` (a stage's partial results, such as a transcribed
//! chunk whose reply was paid for) are always written at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::sink::QueueSink;
use crate::job::StageOutput;
use crate::job::checkpoint::{CheckpointError, Checkpoints};
use crate::queue::{LeaseToken, Queue, QueueError};

/// The checkpoints of one held job.
pub struct QueueCheckpoints {
    queue: Arc<dyn Queue>,
    job_id: String,
    token: LeaseToken,
    /// Where a young job's stage checkpoints are held back, if anywhere.
    notes: Option<Arc<QueueSink>>,
    /// Whether the queue may hold checkpoints of the job: it said so when the job was taken
    /// ([`crate::queue::Lease::resume`]), or this attempt saved some.
    stored: AtomicBool,
}

impl QueueCheckpoints {
    /// Checkpoints of `job_id`, written under `token`; `resume` is the lease's word on whether any exist yet
    /// (when not, loading them costs no round trip until this attempt saves one).
    pub fn new(queue: Arc<dyn Queue>, job_id: impl Into<String>, token: LeaseToken, resume: bool) -> Self {
        Self { queue, job_id: job_id.into(), token, notes: None, stored: AtomicBool::new(resume) }
    }

    /// Holds stage checkpoints back in `sink` while the job is young ([`QueueSink::hold_checkpoint`]).
    pub fn holding_in(mut self, sink: Arc<QueueSink>) -> Self {
        self.notes = Some(sink);
        self
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
        if !key.contains('/')
            && let Some(sink) = &self.notes
            && sink.hold_checkpoint(key, output)
        {
            return Ok(());
        }
        self.queue.save_checkpoint(job_id, &self.token, key, output).await.map_err(|e| error(job_id, &e))
    }

    /// The queue removes a job's checkpoints itself: when the job completes, and with the job when retention or
    /// `clean` removes it. A failed or cancelled job keeps them, so that a retry resumes from them.
    async fn clear(&self, job_id: &str) -> Result<(), CheckpointError> {
        self.same_job(job_id)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::collections::BTreeMap;

    use serde_json::json;

    use super::*;
    use crate::queue::memory::MemoryQueue;
    use crate::queue::{Definition, DefinitionFile, NewJob, QueueSettings, WorkerInfo};

    /// A memory queue holding one job, taken: the queue, the job's id and its lease token.
    pub(crate) async fn held_job() -> (Arc<dyn Queue>, String, LeaseToken) {
        let queue: Arc<dyn Queue> = Arc::new(MemoryQueue::new(QueueSettings::default()));
        let (id, token) = take_one(&queue).await;
        (queue, id, token)
    }

    /// Enqueues a job on `queue` and takes it: its id and lease token.
    pub(crate) async fn take_one(queue: &Arc<dyn Queue>) -> (String, LeaseToken) {
        let file = DefinitionFile { file: "p.toml".into(), sha256: "0".repeat(64), text: "name = \"p\"".into() };
        let job = NewJob {
            pipeline: "p".into(),
            definition: Definition { pipeline: file, plugins: BTreeMap::new() },
            recording_id: None,
            source: None,
            trusted_source: false,
            params: serde_json::Map::new(),
            priority: 0,
            max_attempts: 1,
            delay: None,
            idempotency_key: None,
            callback_url: None,
        };
        let id = queue.enqueue(job).await.unwrap().id().to_string();
        let worker = WorkerInfo {
            id: "w".into(),
            host: "h".into(),
            pid: 1,
            version: "0".into(),
            concurrency: 1,
            running: 0,
            last_heartbeat: 0,
        };
        let lease = queue.take(&worker, std::time::Duration::ZERO).await.unwrap().expect("a job");
        assert_eq!(lease.job.id, id, "the job just enqueued is the one taken");
        (id, lease.token)
    }

    #[tokio::test]
    async fn a_young_jobs_stage_checkpoints_wait_in_its_notes_but_chunk_checkpoints_do_not() {
        let (queue, id, token) = held_job().await;
        let sink = Arc::new(QueueSink::new(queue.clone(), &id, token.clone()));
        let checkpoints = QueueCheckpoints::new(queue.clone(), &id, token, false).holding_in(sink.clone());
        let stage = StageOutput::from(json!({ "stage": 1 }));
        let chunk = StageOutput::from(json!({ "text": "paid for" }));
        checkpoints.save(&id, "probe", &stage).await.unwrap();
        checkpoints.save(&id, "transcribe/chunk/abc", &chunk).await.unwrap();
        let saved = queue.checkpoints(&id).await.unwrap();
        assert_eq!(saved.keys().collect::<Vec<_>>(), ["transcribe/chunk/abc"], "the paid chunk is written at once");
        sink.flush().await;
        let saved = queue.checkpoints(&id).await.unwrap();
        assert_eq!(saved.get("probe"), Some(&stage), "the held stage checkpoint is written with the notes");
        assert_eq!(checkpoints.load(&id).await.unwrap().len(), 2, "this attempt saved some: load reads them");
    }

    #[tokio::test]
    async fn past_the_hold_stage_checkpoints_are_written_at_once_and_an_older_held_copy_is_dropped() {
        let (queue, id, token) = held_job().await;
        let sink = Arc::new(QueueSink::new(queue.clone(), &id, token.clone()));
        let checkpoints = QueueCheckpoints::new(queue.clone(), &id, token, false).holding_in(sink.clone());
        let (old, new) = (StageOutput::from(json!("old")), StageOutput::from(json!("new")));
        checkpoints.save(&id, "summary", &old).await.unwrap();
        assert!(queue.checkpoints(&id).await.unwrap().is_empty(), "held while the job is young");
        tokio::time::sleep(super::super::sink::HOLD + std::time::Duration::from_millis(20)).await;
        checkpoints.save(&id, "summary", &new).await.unwrap();
        assert_eq!(queue.checkpoints(&id).await.unwrap().get("summary"), Some(&new), "written at once");
        sink.flush().await;
        assert_eq!(
            queue.checkpoints(&id).await.unwrap().get("summary"),
            Some(&new),
            "the older held copy does not overwrite it"
        );
    }

    #[tokio::test]
    async fn checkpoints_of_another_job_are_refused_and_a_stale_lease_saves_nothing() {
        let (queue, id, token) = held_job().await;
        let checkpoints = QueueCheckpoints::new(queue.clone(), &id, token, true);
        let output = StageOutput::from(json!(1));
        let refused = [
            checkpoints.load("other").await.unwrap_err(),
            checkpoints.save("other", "probe", &output).await.unwrap_err(),
            checkpoints.clear("other").await.unwrap_err(),
        ];
        for error in refused {
            assert_eq!(error.job_id, "other");
            assert!(error.message.contains(&id), "{error}");
        }
        checkpoints.clear(&id).await.unwrap();
        assert!(checkpoints.load(&id).await.unwrap().is_empty());

        let stale = QueueCheckpoints::new(queue.clone(), &id, LeaseToken("stale".into()), true);
        let error = stale.save(&id, "probe", &output).await.unwrap_err();
        assert!(error.message.contains("lease on the job was lost"), "{error}");
        assert!(queue.checkpoints(&id).await.unwrap().is_empty(), "a stale lease writes nothing");
    }
}
