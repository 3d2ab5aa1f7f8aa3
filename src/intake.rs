//! Intake: a request to process a recording turned into a queued job, the same way for the CLI (`echo-worker
//! enqueue`) and the API (`process-recording`, `batch-process`). One place decides which pipeline runs (looked
//! up in the catalog, an unknown name answered with the known ones), whether a source may be used (the download
//! rules, checked before anything is queued), how the recording row is registered (status `queued` before the
//! job exists, so a worker never finds it missing), and what one recording with a live job gets (that job).
//!
//! Source rules at intake: `http(s)://` URLs whose host is, or resolves to, an internal address (loopback,
//! private, link-local, …) are refused unless `download.allow_private` lists it; `supabase://` and the
//! configured project's Storage URLs are accepted; local paths (`file://` or plain) must lie under
//! `paths.storage_root`, except on the command line, where the user's own paths are trusted; every other
//! scheme is refused. The worker checks again when it connects (ARCHITECTURE.md, `net`), so a DNS answer that
//! changes after intake gains nothing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::catalog::{Catalog, UnknownPipeline};
use crate::definition::DefinitionError;
use crate::net::AddressPolicy;
use crate::queue::{Definition, Enqueued, MAX_PRIORITY, MIN_PRIORITY, NewJob, Queue, QueueError};
use crate::source::{Source, SourceError, SourcePolicy};
use crate::store::{NewRecording, RecordingStatus, Store, StoreError};

/// How long intake waits for DNS when checking a source's host. A name that does not resolve in time is let
/// through: the worker resolves it again, checks the answer, and fails the job with the reason.
const RESOLVE_WAIT: Duration = Duration::from_secs(2);

/// Why a request could not be queued.
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    /// No pipeline of that name; the error lists the known ones.
    #[error(transparent)]
    UnknownPipeline(#[from] UnknownPipeline),
    /// The pipeline's files could not be carried (a catalog built without its texts).
    #[error(transparent)]
    Definition(DefinitionError),
    /// The priority is outside the queue's range.
    #[error("priority {0} is out of range: give a number from {MIN_PRIORITY} to {MAX_PRIORITY} (lower runs sooner)")]
    Priority(i64),
    /// The source breaks a download rule.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// No recording with this id (or not one the caller may see), and no source to create it from.
    #[error("no recording with id `{0}`: give fileUrl to create it")]
    UnknownRecording(String),
    /// The recording exists but has no file to process.
    #[error("recording `{0}` has no file_url: give fileUrl")]
    NoSource(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The queue failed, or refused the job.
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// One recording to process.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Submission {
    /// The recording's id; a new one is made when `None`.
    pub recording_id: Option<String>,
    /// The pipeline's name.
    pub pipeline: String,
    /// Where the media is; the recording row's `file_url` when `None`.
    pub source: Option<String>,
    /// A path typed on the command line: exempt from the storage root (never set for API requests).
    pub trusted_source: bool,
    /// Lower runs sooner.
    pub priority: i64,
    /// `job.params`.
    pub params: serde_json::Map<String, Value>,
    /// The file's name, when known.
    pub file_name: Option<String>,
    /// The file's size, when known.
    pub size_bytes: Option<i64>,
    /// The file's MIME type, when the uploader said.
    pub mime_type: Option<String>,
    /// The user asking: a recording owned by someone else is treated as unknown, a new one is theirs. `None` for
    /// service callers, who see every recording.
    pub owner_id: Option<String>,
}

/// A queued (or already live) job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submitted {
    /// The job.
    pub job_id: String,
    /// The recording it runs for.
    pub recording_id: String,
    /// The pipeline it runs.
    pub pipeline: String,
    /// `false` when the recording already had a live job, which is returned instead of a new one.
    pub created: bool,
}

/// Queues jobs under the download rules.
#[derive(Clone)]
pub struct Intake {
    queue: Arc<dyn Queue>,
    store: Arc<dyn Store>,
    policy: Arc<SourcePolicy>,
    max_attempts: u32,
}

impl std::fmt::Debug for Intake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Intake").field("max_attempts", &self.max_attempts).finish_non_exhaustive()
    }
}

/// A submission that passed every check, ready to enqueue.
enum Prepared {
    /// Enqueue this job for this recording.
    New(Box<NewJob>, String),
    /// The recording already has a live job.
    Live(Submitted),
}

impl Intake {
    /// Intake onto `queue`, registering rows in `store`; jobs get `max_attempts` attempts (at least one).
    pub fn new(queue: Arc<dyn Queue>, store: Arc<dyn Store>, policy: SourcePolicy, max_attempts: u32) -> Self {
        Self { queue, store, policy: Arc::new(policy), max_attempts: max_attempts.max(1) }
    }

    /// The download rules in force.
    pub fn policy(&self) -> &SourcePolicy {
        &self.policy
    }

    /// Queues one recording.
    ///
    /// # Errors
    /// Any [`IntakeError`]; nothing is queued then.
    pub async fn submit(&self, catalog: &Catalog, submission: Submission) -> Result<Submitted, IntakeError> {
        let mut results = self.submit_many(catalog, vec![submission]).await?;
        results.pop().unwrap_or_else(|| Err(QueueError::Unavailable("the queue returned no result".into()).into()))
    }

    /// Queues many recordings in one round trip to the queue; each succeeds or fails on its own, in order.
    ///
    /// # Errors
    /// When the queue cannot be reached at all (per-item failures are in the list).
    pub async fn submit_many(
        &self,
        catalog: &Catalog,
        submissions: Vec<Submission>,
    ) -> Result<Vec<Result<Submitted, IntakeError>>, IntakeError> {
        let mut definitions: HashMap<String, Definition> = HashMap::new();
        let mut results: Vec<Option<Result<Submitted, IntakeError>>> = Vec::with_capacity(submissions.len());
        let mut jobs = Vec::new();
        let mut waiting = Vec::new();
        for submission in submissions {
            match self.prepare(catalog, &mut definitions, submission).await {
                Ok(Prepared::Live(submitted)) => results.push(Some(Ok(submitted))),
                Ok(Prepared::New(job, recording)) => {
                    waiting.push((results.len(), recording, job.pipeline.clone()));
                    jobs.push(*job);
                    results.push(None);
                }
                Err(error) => results.push(Some(Err(error))),
            }
        }
        if !jobs.is_empty() {
            let enqueued = self.queue.enqueue_many(jobs).await?;
            for ((index, recording, pipeline), outcome) in waiting.into_iter().zip(enqueued) {
                results[index] = Some(self.settle(recording, pipeline, outcome).await);
            }
        }
        Ok(results
            .into_iter()
            .map(|result| {
                result.unwrap_or_else(|| Err(QueueError::Unavailable("the queue skipped a job".into()).into()))
            })
            .collect())
    }

    /// Records the job id on the row, or the failure.
    async fn settle(
        &self,
        recording: String,
        pipeline: String,
        outcome: Result<Enqueued, QueueError>,
    ) -> Result<Submitted, IntakeError> {
        match outcome {
            Ok(enqueued) => {
                let job_id = enqueued.id().to_string();
                let row =
                    NewRecording { id: recording.clone(), job_id: Some(job_id.clone()), ..NewRecording::default() };
                self.store.register(&row).await?;
                Ok(Submitted {
                    job_id,
                    recording_id: recording,
                    pipeline,
                    created: matches!(enqueued, Enqueued::Created(_)),
                })
            }
            Err(error) => {
                let reason = error.to_string();
                self.store.set_status(&recording, RecordingStatus::Failed, Some("failed"), Some(&reason)).await?;
                Err(error.into())
            }
        }
    }

    async fn prepare(
        &self,
        catalog: &Catalog,
        definitions: &mut HashMap<String, Definition>,
        submission: Submission,
    ) -> Result<Prepared, IntakeError> {
        let definition = match definitions.get(&submission.pipeline) {
            Some(definition) => definition.clone(),
            None => {
                let definition = crate::definition::of(catalog, &submission.pipeline).map_err(|error| match error {
                    DefinitionError::UnknownPipeline(unknown) => IntakeError::UnknownPipeline(unknown),
                    other => IntakeError::Definition(other),
                })?;
                definitions.insert(submission.pipeline.clone(), definition.clone());
                definition
            }
        };
        let priority = i32::try_from(submission.priority)
            .ok()
            .filter(|p| (MIN_PRIORITY..=MAX_PRIORITY).contains(p))
            .ok_or(IntakeError::Priority(submission.priority))?;
        let recording = submission.recording_id.clone().unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let row = match &submission.recording_id {
            Some(id) => self.store.get(id).await?,
            None => None,
        };
        if let (Some(row), Some(owner)) = (&row, &submission.owner_id)
            && row.owner_id.as_ref() != Some(owner)
        {
            return Err(IntakeError::UnknownRecording(recording));
        }
        let source = match (&submission.source, &row) {
            (Some(source), _) => source.clone(),
            (None, Some(row)) => row.file_url.clone().ok_or_else(|| IntakeError::NoSource(recording.clone()))?,
            (None, None) => return Err(IntakeError::UnknownRecording(recording)),
        };
        check_source(&source, submission.trusted_source, &self.policy).await?;
        if let Some(job_id) = self.queue.live_job_for(&recording).await? {
            let pipeline = self.queue.get(&job_id).await?.map_or(submission.pipeline, |job| job.spec.pipeline);
            return Ok(Prepared::Live(Submitted { job_id, recording_id: recording, pipeline, created: false }));
        }
        let new = NewRecording {
            id: recording.clone(),
            file_url: submission.source.clone(),
            file_name: submission.file_name.clone(),
            mime_type: submission.mime_type.clone(),
            size_bytes: submission.size_bytes,
            owner_id: submission.owner_id.clone(),
            pipeline: Some(submission.pipeline.clone()),
            job_id: None,
        };
        self.store.register(&new).await?;
        self.store.set_status(&recording, RecordingStatus::Queued, Some("queued"), None).await?;
        let job = NewJob {
            pipeline: submission.pipeline,
            definition,
            recording_id: Some(recording.clone()),
            source: Some(source),
            trusted_source: submission.trusted_source,
            params: submission.params,
            priority,
            max_attempts: self.max_attempts,
            delay: None,
            idempotency_key: None,
        };
        Ok(Prepared::New(Box::new(job), recording))
    }
}

/// Checks a source against the download rules (see the module docs) without fetching it.
///
/// # Errors
/// [`SourceError::Refused`] naming the rule.
pub async fn check_source(text: &str, trusted: bool, policy: &SourcePolicy) -> Result<(), SourceError> {
    let Source::Http(url) = Source::parse(text, trusted, policy)? else { return Ok(()) };
    let refuse = |reason: String| SourceError::Refused { source_text: crate::net::shown(&url), reason };
    let Some(host) = url.host_str().map(|host| host.trim_start_matches('[').trim_end_matches(']').to_string()) else {
        return Err(refuse("the URL names no host".into()));
    };
    let addresses = AddressPolicy { allow: policy.allow_private.clone(), trusted: Vec::new() };
    let port = url.port_or_known_default();
    let found: Vec<IpAddr> = match host.parse::<IpAddr>() {
        Ok(address) => vec![address],
        Err(_) => match tokio::time::timeout(RESOLVE_WAIT, tokio::net::lookup_host((host.as_str(), 0))).await {
            Ok(Ok(resolved)) => resolved.map(|address| address.ip()).collect(),
            // Not resolvable now: the worker resolves it again and fails the job with the reason.
            _ => Vec::new(),
        },
    };
    for address in found {
        addresses.check(&host, address, port).map_err(|refused| refuse(refused.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sources_outside_the_rules_are_refused_before_anything_is_queued() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("a.mp3"), "x").unwrap();
        let policy = SourcePolicy { storage_root: root.path().to_path_buf(), ..SourcePolicy::default() };
        for accepted in ["a.mp3", "https://93.184.215.14/a.mp3", "supabase://recordings/u/a.mp3"] {
            assert_eq!(check_source(accepted, false, &policy).await, Ok(()), "{accepted}");
        }
        for refused in [
            "file:///etc/passwd",
            "/etc/passwd",
            "gopher://example.com/a",
            "http://127.0.0.1:6379/",
            "http://10.1.2.3/a.mp3",
            "http://[::1]/a.mp3",
            "http://localhost/a.mp3",
            "http://169.254.169.254/latest/meta-data",
        ] {
            let error = check_source(refused, false, &policy).await.expect_err(refused);
            assert!(matches!(error, SourceError::Refused { .. }), "{refused}: {error}");
        }
        let allowed = SourcePolicy { allow_private: vec!["127.0.0.1:9000".parse().unwrap()], ..policy.clone() };
        assert_eq!(check_source("http://127.0.0.1:9000/a.mp3", false, &allowed).await, Ok(()));
        assert!(check_source("http://127.0.0.1:9001/a.mp3", false, &allowed).await.is_err(), "only the allowed port");
        assert_eq!(check_source("/etc/hostname", true, &policy).await, Ok(()), "the command line's own paths");
    }
}
