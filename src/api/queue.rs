//! The queue as a whole: `GET /api/queue/stats` (counts per state, paused, live workers, completed and failed
//! per minute), `POST /api/queue/clean` (remove ended jobs older than an age), `POST /api/queue/pause` and
//! `/resume` (workers stop or start taking jobs; running ones go on), `POST /api/queue/retry-failed` (every
//! failed job, or one pipeline's, queued again).
//!
//! Bodies may be left out, as the old worker's clients do: `clean` then removes completed, failed and cancelled
//! jobs ended more than a day ago, as the old Bull setup did; `retry-failed` retries every failed job.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::caller::Caller;
use super::error::{ApiError, ErrorBody};
use super::extract::OptionalJson;
use super::{ApiState, ok, time};
use crate::queue::JobState;
use crate::store::RecordingStatus;
use crate::units::HumanDuration;

/// Jobs `clean` removes per call at most when no `limit` is given, and the largest `limit` accepted: bounded so
/// one request never holds the queue for long.
const DEFAULT_CLEAN_LIMIT: usize = 1000;
pub(super) const MAX_CLEAN_LIMIT: usize = 100_000;

/// The queue as a whole is for service callers: a caller limited to one user's recordings gets 403.
fn service_only(caller: &Caller) -> Result<(), ApiError> {
    match caller.owner() {
        None => Ok(()),
        Some(_) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the queue as a whole is for service tokens; a user's token sees only that user's recordings and jobs",
        )),
    }
}

pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(queue_stats))
        .routes(routes!(queue_clean))
        .routes(routes!(queue_pause))
        .routes(routes!(queue_resume))
        .routes(routes!(queue_retry_failed))
}

/// A worker process, as its heartbeats describe it.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerView {
    /// Unique per process start.
    pub id: String,
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// echo-worker version.
    pub version: String,
    /// Jobs it runs at once.
    pub concurrency: u32,
    /// Jobs it runs now.
    pub running: u32,
    /// Its last heartbeat (RFC 3339).
    pub last_heartbeat: String,
}

/// Completed and failed in one minute.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct MinuteView {
    /// The minute's start (RFC 3339).
    pub minute: String,
    /// Jobs completed in it.
    pub completed: u64,
    /// Jobs failed for good in it.
    pub failed: u64,
}

/// The queue's figures; the counts sit at the top, where the old worker's clients read them.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StatsView {
    /// Jobs waiting.
    pub waiting: u64,
    /// Jobs delayed (a delay, or the backoff before a retry).
    pub delayed: u64,
    /// Jobs running.
    pub active: u64,
    /// Jobs completed (kept for the retention).
    pub completed: u64,
    /// Jobs failed for good.
    pub failed: u64,
    /// Jobs cancelled.
    pub cancelled: u64,
    /// All of them.
    pub total: u64,
    /// Whether workers are stopped from taking jobs.
    pub paused: bool,
    /// `redis` or `memory`.
    pub mode: String,
    /// Whether the queue is Redis (the old worker's field).
    pub redis_enabled: bool,
    /// Live workers.
    pub workers: Vec<WorkerView>,
    /// Completed and failed per minute over the last hour, oldest first.
    pub per_minute: Vec<MinuteView>,
}

/// `GET /api/queue/stats`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct StatsReply {
    /// Always `true`.
    pub success: bool,
    /// The figures.
    pub stats: StatsView,
}

/// Counts per state, workers and throughput.
#[utoipa::path(
    get,
    path = "/api/queue/stats",
    tag = "queue",
    responses((status = 200, description = "The queue's figures", body = StatsReply))
)]
async fn queue_stats(State(state): State<ApiState>, caller: Caller) -> Result<Response, ApiError> {
    service_only(&caller)?;
    let stats = state.queue.stats().await?;
    let count = |job: JobState| stats.counts.get(&job).copied().unwrap_or(0);
    let redis = state.settings.redis.url.is_some();
    let view = StatsView {
        waiting: count(JobState::Waiting),
        delayed: count(JobState::Delayed),
        active: count(JobState::Active),
        completed: count(JobState::Completed),
        failed: count(JobState::Failed),
        cancelled: count(JobState::Cancelled),
        total: stats.counts.values().sum(),
        paused: stats.paused,
        mode: if redis { "redis" } else { "memory" }.into(),
        redis_enabled: redis,
        workers: stats
            .workers
            .iter()
            .map(|worker| WorkerView {
                id: worker.id.clone(),
                host: worker.host.clone(),
                pid: worker.pid,
                version: worker.version.clone(),
                concurrency: worker.concurrency,
                running: worker.running,
                last_heartbeat: time::rfc3339(worker.last_heartbeat),
            })
            .collect(),
        per_minute: stats
            .per_minute
            .iter()
            .map(|minute| MinuteView {
                minute: time::rfc3339(minute.minute),
                completed: minute.completed,
                failed: minute.failed,
            })
            .collect(),
    };
    Ok(ok(StatusCode::OK, StatsReply { success: true, stats: view }))
}

/// The state of a job that has ended.
// The document's list of the final `JobState` names (a unit test keeps them equal): the handler reads the text,
// so that a state that has not ended is answered with a sentence.
#[derive(Debug, Clone, Copy, ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code, reason = "named in the OpenAPI document only")]
pub enum EndedState {
    /// Finished with a result.
    Completed,
    /// Failed for good.
    Failed,
    /// Cancelled.
    Cancelled,
}

/// `POST /api/queue/clean`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CleanRequest {
    /// Only jobs in this state; all three when absent.
    #[schema(value_type = Option<EndedState>)]
    pub state: Option<String>,
    /// Only jobs that ended longer ago than this (default `24h`): 1 to 8 parts of a number (up to 10 digits) and a
    /// unit, `ms`, `s`, `m`, `h` or `d`, as in `30m`, `12h`, `7d`, `1h30m`. Also `older_than`.
    #[serde(alias = "older_than")]
    #[schema(pattern = "^([0-9]{1,10}(ms|s|m|h|d)){1,8}$")]
    pub older_than: Option<String>,
    /// Jobs removed per state at most: 1 to 100000 (default 1000).
    #[schema(minimum = 1, maximum = 100_000)]
    #[serde(default, deserialize_with = "super::extract::whole")]
    pub limit: Option<usize>,
}

/// How many were removed.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CleanReply {
    /// Always `true`.
    pub success: bool,
    /// Jobs removed in all.
    pub removed: u64,
    /// Jobs removed per state.
    pub by_state: BTreeMap<String, u64>,
    /// The age used.
    pub older_than: String,
}

/// Removes ended jobs (with their checkpoints and logs) older than an age.
#[utoipa::path(
    post,
    path = "/api/queue/clean",
    tag = "queue",
    request_body(content = Option<CleanRequest>, description = "May be left out: completed, failed and cancelled jobs older than 24h"),
    responses(
        (status = 200, description = "Removed", body = CleanReply),
        (status = 400, description = "A state that has not ended, a bad age or limit", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "A body that is not JSON", body = ErrorBody),
    )
)]
async fn queue_clean(
    State(state): State<ApiState>,
    caller: Caller,
    OptionalJson(body): OptionalJson<CleanRequest>,
) -> Result<Response, ApiError> {
    service_only(&caller)?;
    caller.can_write()?;
    let body = body.unwrap_or_default();
    let field = |field: &str, message: String| {
        ApiError::bad_request("invalid_field", message).with_details(json!({ "field": field }))
    };
    let states = match &body.state {
        None => vec![JobState::Completed, JobState::Failed, JobState::Cancelled],
        Some(name) => match JobState::from_name(name) {
            Some(found) if found.is_final() => vec![found],
            _ => {
                return Err(field(
                    "state",
                    format!("`state` must be completed, failed or cancelled (jobs that have ended), not `{name}`"),
                ));
            }
        },
    };
    let older_than = match &body.older_than {
        None => HumanDuration(std::time::Duration::from_secs(24 * 3600)),
        Some(text) => HumanDuration::parse(text)
            .map_err(|error| field("olderThan", format!("`olderThan` `{text}`: {error} (e.g. 30m, 12h, 7d)")))?,
    };
    let limit = body.limit.unwrap_or(DEFAULT_CLEAN_LIMIT);
    if !(1..=MAX_CLEAN_LIMIT).contains(&limit) {
        return Err(field("limit", format!("`limit` {limit} is out of range: give 1 to {MAX_CLEAN_LIMIT}")));
    }
    let mut by_state = BTreeMap::new();
    for job_state in states {
        let removed = state.queue.clean(job_state, older_than.0, limit).await?;
        by_state.insert(job_state.to_string(), removed);
    }
    let reply =
        CleanReply { success: true, removed: by_state.values().sum(), by_state, older_than: older_than.to_string() };
    Ok(ok(StatusCode::OK, reply))
}

/// Whether the queue is paused now.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PauseReply {
    /// Always `true`.
    pub success: bool,
    /// Whether workers are stopped from taking jobs.
    pub paused: bool,
    /// What it means, for a person.
    pub message: String,
}

/// Stops workers from taking jobs (running ones finish); kept until `resume`.
#[utoipa::path(
    post,
    path = "/api/queue/pause",
    tag = "queue",
    responses((status = 200, description = "Paused", body = PauseReply))
)]
async fn queue_pause(State(state): State<ApiState>, caller: Caller) -> Result<Response, ApiError> {
    service_only(&caller)?;
    caller.can_write()?;
    state.queue.set_paused(true).await?;
    let message = "paused: workers take no new jobs (running ones go on) until /api/queue/resume".to_string();
    Ok(ok(StatusCode::OK, PauseReply { success: true, paused: true, message }))
}

/// Lets workers take jobs again.
#[utoipa::path(
    post,
    path = "/api/queue/resume",
    tag = "queue",
    responses((status = 200, description = "Resumed", body = PauseReply))
)]
async fn queue_resume(State(state): State<ApiState>, caller: Caller) -> Result<Response, ApiError> {
    service_only(&caller)?;
    caller.can_write()?;
    state.queue.set_paused(false).await?;
    Ok(ok(
        StatusCode::OK,
        PauseReply { success: true, paused: false, message: "resumed: workers take jobs again".into() },
    ))
}

/// `POST /api/queue/retry-failed`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryFailedRequest {
    /// Only this pipeline's failed jobs.
    pub pipeline: Option<String>,
}

/// The jobs queued again.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RetryFailedReply {
    /// Always `true`.
    pub success: bool,
    /// How many.
    pub count: usize,
    /// Their ids.
    pub retried: Vec<String>,
}

/// Retries every failed job, or one pipeline's.
#[utoipa::path(
    post,
    path = "/api/queue/retry-failed",
    tag = "queue",
    request_body(content = Option<RetryFailedRequest>, description = "May be left out: every failed job"),
    responses(
        (status = 200, description = "Queued again", body = RetryFailedReply),
        (status = 400, description = "Bad body", body = ErrorBody),
        (status = 404, description = "Unknown pipeline (the available ones are listed)", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "A body that is not JSON", body = ErrorBody),
    )
)]
async fn queue_retry_failed(
    State(state): State<ApiState>,
    caller: Caller,
    OptionalJson(body): OptionalJson<RetryFailedRequest>,
) -> Result<Response, ApiError> {
    service_only(&caller)?;
    caller.can_write()?;
    let pipeline = body.unwrap_or_default().pipeline;
    if let Some(name) = &pipeline {
        // A misspelt name would otherwise match no job and answer a silent `count: 0`.
        state
            .catalog
            .current()
            .pipeline(name)
            .map_err(|unknown| ApiError::from(crate::intake::IntakeError::from(unknown)))?;
    }
    let _serial = super::jobs::JOB_ACTIONS.lock().await;
    let retried = state.queue.retry_failed(pipeline.as_deref()).await?;
    for id in &retried {
        if let Ok(Some(job)) = state.queue.get(id).await
            && let Some(recording) = &job.spec.recording_id
            && let Err(error) =
                state.store.set_status(recording, RecordingStatus::Queued, Some("queued again"), None).await
        {
            tracing::warn!(recording, %error, "could not update the recording row");
        }
    }
    Ok(ok(StatusCode::OK, RetryFailedReply { success: true, count: retried.len(), retried }))
}
