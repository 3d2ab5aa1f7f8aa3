//! Jobs: `GET /api/job/{id}/status` (state, progress, attempts, each stage's state and duration, error, times),
//! `POST /api/job/{id}/cancel` (409 when it has already ended), `POST /api/job/{id}/retry` (409 unless failed or
//! cancelled; it resumes from its checkpoints), `GET /api/jobs` (filtered, paged) and `GET /api/job/{id}/logs`.
//!
//! A caller limited to one user's recordings sees only the jobs of those recordings; any other job is answered
//! 404, as if it did not exist.

use std::collections::HashMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::caller::Caller;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiPath, ApiQuery};
use super::{ApiState, job_id, ok, time};
use crate::queue::{CancelOutcome, Job, JobState, QueueError};
use crate::store::RecordingStatus;

pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(job_status))
        .routes(routes!(cancel_job))
        .routes(routes!(retry_job))
        .routes(routes!(list_jobs))
        .routes(routes!(job_logs))
}

/// One stage of a job's last attempt.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StageView {
    /// The stage id.
    pub id: String,
    /// `succeeded`, `restored`, `skipped`, `failed`, `cancelled` or `not_run`.
    pub status: String,
    /// Attempts made.
    pub attempts: u64,
    /// How long it ran, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Why it failed or was skipped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A job as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobView {
    /// The job id.
    pub job_id: String,
    /// `waiting`, `delayed`, `active`, `completed`, `failed` or `cancelled`.
    pub state: String,
    /// The pipeline it runs.
    pub pipeline: String,
    /// The recording it runs for.
    pub recording_id: Option<String>,
    /// Where the media is (credentials and query strings of URLs removed).
    pub source: Option<String>,
    /// Lower runs sooner.
    pub priority: i32,
    /// Attempts started so far.
    pub attempts: u32,
    /// Attempts allowed in all.
    pub max_attempts: u32,
    /// Times its worker vanished while it ran.
    pub stalls: u32,
    /// 0 to 100.
    pub progress: u8,
    /// The stage that reported last.
    pub stage: Option<String>,
    /// A human message about where it is.
    pub message: Option<String>,
    /// Why it failed last.
    pub error: Option<String>,
    /// A cancel was asked while it ran; its worker is stopping it.
    pub cancel_requested: bool,
    /// The worker that holds it or held it last.
    pub worker: Option<String>,
    /// When it was queued (RFC 3339).
    pub created_at: String,
    /// When its current or last attempt started.
    pub started_at: Option<String>,
    /// When it ended.
    pub finished_at: Option<String>,
    /// When a delayed job becomes ready.
    pub ready_at: Option<String>,
    /// `job.params`.
    #[schema(value_type = Object)]
    pub params: serde_json::Map<String, Value>,
}

impl JobView {
    /// The view of a stored job.
    pub fn of(job: &Job) -> Self {
        let source = job.spec.source.as_deref().map(|source| {
            if source.contains("://") && !source.starts_with("file://") && !source.starts_with("supabase://") {
                crate::secret::redact_url(source)
            } else {
                source.to_string()
            }
        });
        let progress = match (&job.progress, job.state) {
            (_, JobState::Completed) => 100,
            (Some(progress), _) => progress.percent,
            (None, _) => 0,
        };
        Self {
            job_id: job.id.clone(),
            state: job.state.to_string(),
            pipeline: job.spec.pipeline.clone(),
            recording_id: job.spec.recording_id.clone(),
            source,
            priority: job.spec.priority,
            attempts: job.attempts,
            max_attempts: job.spec.max_attempts,
            stalls: job.stalls,
            progress,
            stage: job.progress.as_ref().and_then(|p| p.stage.clone()),
            message: job.progress.as_ref().map(|p| p.message.clone()),
            error: job.error.clone(),
            cancel_requested: job.cancel_requested,
            worker: job.worker.clone(),
            created_at: time::rfc3339(job.created_at),
            started_at: job.started_at.map(time::rfc3339),
            finished_at: job.finished_at.map(time::rfc3339),
            ready_at: job.ready_at.map(time::rfc3339),
            params: job.spec.params.clone(),
        }
    }
}

/// `GET /api/job/{id}/status`.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobStatusReply {
    /// Always `true`.
    pub success: bool,
    /// The job.
    pub job: JobView,
    /// Each stage of the last attempt that ended, in the pipeline's order (empty before one has).
    pub stages: Vec<StageView>,
    /// The failing stage, when the job failed in one.
    pub failed_stage: Option<String>,
    /// Each stage's output, for a completed job.
    #[schema(value_type = Option<Object>)]
    pub result: Option<Value>,
}

/// The job `id`, when the caller may see it.
///
/// # Errors
/// 400 for a malformed id; 404 when there is no such job or it belongs to another user.
pub(super) async fn visible_job(state: &ApiState, caller: &Caller, id: &str) -> Result<Job, ApiError> {
    let id = job_id(id)?;
    let not_found = || ApiError::not_found("job_not_found", format!("no job with id `{id}`"));
    let job = state.queue.get(&id).await?.ok_or_else(not_found)?;
    if caller.owner().is_some() {
        let owner = match &job.spec.recording_id {
            Some(recording) => state.store.get(recording).await?.and_then(|row| row.owner_id),
            None => None,
        };
        if !caller.may_see(owner.as_deref()) {
            return Err(not_found());
        }
    }
    Ok(job)
}

/// The engine's report of the job's last ended attempt: the result of a completed job, else the report its
/// worker saved beside the checkpoints.
async fn report(state: &ApiState, job: &Job) -> Result<Option<Value>, ApiError> {
    if let Some(result) = &job.result {
        return Ok(Some(result.clone()));
    }
    Ok(state.queue.checkpoints(&job.id).await?.remove(crate::worker::REPORT_KEY).map(|output| output.value))
}

/// A job's state, progress, attempts, stages and error.
#[utoipa::path(
    get,
    path = "/api/job/{id}/status",
    tag = "jobs",
    params(("id" = String, Path, description = "The job id (a UUID)", pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")),
    responses(
        (status = 200, description = "The job", body = JobStatusReply),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
    )
)]
async fn job_status(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let job = visible_job(&state, &caller, &id).await?;
    let report = report(&state, &job).await?;
    let stages = report
        .as_ref()
        .and_then(|report| report["stages"].as_object())
        .map(|stages| {
            stages
                .iter()
                .map(|(id, stage)| StageView {
                    id: id.clone(),
                    status: stage["status"].as_str().unwrap_or("").to_string(),
                    attempts: stage["attempts"].as_u64().unwrap_or(0),
                    duration_ms: stage["duration_ms"].as_u64(),
                    reason: stage["reason"].as_str().map(str::to_string),
                })
                .collect()
        })
        .unwrap_or_default();
    let failed_stage = report.as_ref().and_then(|report| report["failure"]["stage"].as_str().map(str::to_string));
    let result = (job.state == JobState::Completed).then(|| {
        let outputs: serde_json::Map<String, Value> = report
            .as_ref()
            .and_then(|report| report["stages"].as_object())
            .map(|stages| {
                stages
                    .iter()
                    .filter_map(|(id, stage)| stage.get("output").map(|output| (id.clone(), output.clone())))
                    .collect()
            })
            .unwrap_or_default();
        Value::Object(outputs)
    });
    let reply = JobStatusReply { success: true, job: JobView::of(&job), stages, failed_stage, result };
    Ok(ok(StatusCode::OK, reply))
}

/// What a cancel or a retry did.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobActionReply {
    /// Always `true`.
    pub success: bool,
    /// The job.
    pub job_id: String,
    /// Its state now.
    pub state: String,
    /// What happened, for a person.
    pub message: String,
}

/// Held from a cancel's or retry's queue change until its recording row is marked, so that a cancel racing a
/// retry cannot leave the row `cancelled` beside a waiting job (the two marks landing in the other order). One
/// lock for the process: these actions are rare and quick. Two API processes may still interleave; the worker
/// marks the row again when it takes the job.
pub(super) static JOB_ACTIONS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Marks the job's recording; a failure is logged (the queue is what counts).
async fn mark(state: &ApiState, job: &Job, status: RecordingStatus, message: &str) {
    if let Some(recording) = &job.spec.recording_id
        && let Err(error) = state.store.set_status(recording, status, Some(message), None).await
    {
        tracing::warn!(recording, %error, "could not update the recording row");
    }
}

/// Cancels a job: a waiting or delayed one at once (200), a running one by its worker within about 2 s (202).
#[utoipa::path(
    post,
    path = "/api/job/{id}/cancel",
    tag = "jobs",
    params(("id" = String, Path, description = "The job id (a UUID)", pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")),
    responses(
        (status = 200, description = "Cancelled", body = JobActionReply),
        (status = 202, description = "Running: its worker was asked to stop it", body = JobActionReply),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "The job has already ended", body = ErrorBody),
    )
)]
async fn cancel_job(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    caller.can_write()?;
    let job = visible_job(&state, &caller, &id).await?;
    let reply = |state: &str, message: String| JobActionReply {
        success: true,
        job_id: job.id.clone(),
        state: state.to_string(),
        message,
    };
    let _serial = JOB_ACTIONS.lock().await;
    match state.queue.cancel(&job.id).await? {
        CancelOutcome::Cancelled => {
            state.endings.ended(&job.id).await;
            Ok(ok(StatusCode::OK, reply("cancelled", format!("job {} cancelled", job.id))))
        }
        CancelOutcome::Requested => Ok(ok(
            StatusCode::ACCEPTED,
            reply("active", format!("job {} is running: its worker was asked to stop it (within about 2 s)", job.id)),
        )),
        CancelOutcome::AlreadyFinal(ended) => Err(ApiError::conflict(
            "job_ended",
            format!("job {} has already ended ({ended}); there is nothing to cancel", job.id),
        )
        .with_details(serde_json::json!({ "state": ended }))),
    }
}

/// Runs a failed or cancelled job again, from its checkpoints.
#[utoipa::path(
    post,
    path = "/api/job/{id}/retry",
    tag = "jobs",
    params(("id" = String, Path, description = "The job id (a UUID)", pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")),
    responses(
        (status = 202, description = "Queued again", body = JobActionReply),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "The job is not failed or cancelled, or its recording has another live job", body = ErrorBody),
    )
)]
async fn retry_job(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    caller.can_write()?;
    let job = visible_job(&state, &caller, &id).await?;
    let _serial = JOB_ACTIONS.lock().await;
    match state.queue.retry(&job.id).await {
        Ok(()) => {}
        Err(QueueError::WrongState { state: now, .. }) => {
            return Err(ApiError::conflict(
                "job_not_retryable",
                format!("job {} is {now}: only a failed or cancelled job can be retried", job.id),
            )
            .with_details(serde_json::json!({ "state": now })));
        }
        Err(QueueError::Invalid(message)) => return Err(ApiError::conflict("recording_busy", message)),
        Err(error) => return Err(error.into()),
    }
    mark(&state, &job, RecordingStatus::Queued, "queued again").await;
    let reply = JobActionReply {
        success: true,
        job_id: job.id.clone(),
        state: "waiting".into(),
        message: format!("job {} queued again; it resumes from its checkpoints", job.id),
    };
    Ok(ok(StatusCode::ACCEPTED, reply))
}

/// A job's state.
// The document's list of `JobState` names (a unit test keeps the two equal): the handler reads the text, so that
// an unknown state is answered with the known ones.
#[derive(Debug, Clone, Copy, ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code, reason = "named in the OpenAPI document only")]
pub enum JobStateName {
    /// Ready to be taken.
    Waiting,
    /// Waiting for a time (a delay, or the backoff before a retry).
    Delayed,
    /// Running.
    Active,
    /// Finished with a result.
    Completed,
    /// Failed for good.
    Failed,
    /// Cancelled.
    Cancelled,
}

/// `GET /api/jobs` filters.
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct JobsQuery {
    /// Only this state; every state when absent.
    #[param(value_type = Option<JobStateName>, inline)]
    pub state: Option<String>,
    /// Only this pipeline's jobs.
    pub pipeline: Option<String>,
    /// Only this recording's jobs.
    #[serde(alias = "recording_id")]
    pub recording_id: Option<String>,
    /// `nextCursor` of the previous page, with the same filters: the state it has reached (one the `state`
    /// filter lets through), then `:` and where the queue stopped within it.
    #[param(pattern = "^(waiting|delayed|active|completed|failed|cancelled)(:.*)?$")]
    pub cursor: Option<String>,
    /// Jobs per page, 1 to 200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<usize>,
}

/// A page of jobs.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobsReply {
    /// Always `true`.
    pub success: bool,
    /// The jobs: per state (in the order waiting, delayed, active, completed, failed, cancelled), waiting ones in
    /// run order, ended ones newest first.
    pub jobs: Vec<JobView>,
    /// Give it as `cursor` for the next page; absent on the last.
    pub next_cursor: Option<String>,
}

/// Pages read from the queue per request at most, so a filter that matches little cannot make one request scan
/// the whole queue; the caller follows `nextCursor`.
const MAX_SCANNED_PAGES: usize = 20;

/// Jobs, filtered by state, pipeline and recording, a page at a time.
#[utoipa::path(
    get,
    path = "/api/jobs",
    tag = "jobs",
    params(JobsQuery),
    responses(
        (status = 200, description = "A page of jobs", body = JobsReply),
        (status = 400, description = "Unknown state, bad cursor or limit", body = ErrorBody),
    )
)]
async fn list_jobs(
    State(state): State<ApiState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<JobsQuery>,
) -> Result<Response, ApiError> {
    let field = |field: &str, message: String| {
        ApiError::bad_request("invalid_query", message).with_details(serde_json::json!({ "field": field }))
    };
    let states: Vec<JobState> = match &query.state {
        Some(name) => vec![JobState::from_name(name).ok_or_else(|| {
            let known: Vec<&str> = JobState::ALL.iter().map(|s| s.name()).collect();
            field("state", format!("unknown state `{name}` (known: {})", known.join(", ")))
        })?],
        None => JobState::ALL.to_vec(),
    };
    let limit = query.limit.unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(field("limit", format!("limit {limit} is out of range: give 1 to 200")));
    }
    // The cursor is `STATE:INNER`: the state being read and the queue's own cursor within it.
    let (mut at, mut inner) = match &query.cursor {
        Some(cursor) => {
            let (name, inner) = cursor.split_once(':').unwrap_or((cursor.as_str(), ""));
            let index = states
                .iter()
                .position(|state| state.name() == name)
                .ok_or_else(|| field("cursor", format!("cursor `{cursor}` was not made by this listing")))?;
            (index, Some(inner.to_string()).filter(|inner| !inner.is_empty()))
        }
        None => (0, None),
    };
    let mut jobs = Vec::new();
    let mut owners: HashMap<String, Option<String>> = HashMap::new();
    let mut next = None;
    for _ in 0..MAX_SCANNED_PAGES {
        let Some(&reading) = states.get(at) else { break };
        let page = match state.queue.list(reading, inner.as_deref(), limit - jobs.len()).await {
            Ok(page) => page,
            Err(QueueError::Invalid(message)) => return Err(field("cursor", message)),
            Err(error) => return Err(error.into()),
        };
        for job in page.jobs {
            if query.pipeline.as_ref().is_some_and(|pipeline| *pipeline != job.spec.pipeline)
                || query.recording_id.as_ref().is_some_and(|id| Some(id) != job.spec.recording_id.as_ref())
            {
                continue;
            }
            if caller.owner().is_some() {
                let recording = job.spec.recording_id.clone().unwrap_or_default();
                let owner = match owners.get(&recording) {
                    Some(owner) => owner.clone(),
                    None => {
                        let owner = state.store.get(&recording).await?.and_then(|row| row.owner_id);
                        owners.insert(recording, owner.clone());
                        owner
                    }
                };
                if !caller.may_see(owner.as_deref()) {
                    continue;
                }
            }
            jobs.push(JobView::of(&job));
        }
        match page.next_cursor {
            Some(cursor) => inner = Some(cursor),
            None => {
                at += 1;
                inner = None;
            }
        }
        if let Some(reading) = states.get(at) {
            next = Some(format!("{}:{}", reading.name(), inner.clone().unwrap_or_default()));
        } else {
            next = None;
        }
        if jobs.len() >= limit {
            break;
        }
    }
    Ok(ok(StatusCode::OK, JobsReply { success: true, jobs, next_cursor: next }))
}

/// One log line.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct LogLineView {
    /// When (RFC 3339).
    pub at: String,
    /// The text.
    pub line: String,
}

/// `GET /api/job/{id}/logs`.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobLogsReply {
    /// Always `true`.
    pub success: bool,
    /// The job.
    pub job_id: String,
    /// Its log, oldest first.
    pub logs: Vec<LogLineView>,
}

/// A job's log lines, oldest first.
#[utoipa::path(
    get,
    path = "/api/job/{id}/logs",
    tag = "jobs",
    params(("id" = String, Path, description = "The job id (a UUID)", pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")),
    responses(
        (status = 200, description = "The log", body = JobLogsReply),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
    )
)]
async fn job_logs(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let job = visible_job(&state, &caller, &id).await?;
    let logs = state.queue.logs(&job.id).await?;
    let logs = logs.into_iter().map(|line| LogLineView { at: time::rfc3339(line.at), line: line.line }).collect();
    Ok(ok(StatusCode::OK, JobLogsReply { success: true, job_id: job.id, logs }))
}
