//! `POST /api/process-direct`: runs a small source through a pipeline now, in the API process, and answers
//! with the results, as the old worker's route of that name did (its results keep the same shape: the stored
//! fields, `transcript` among them). It goes through the same engine, stage kinds and download rules as a
//! queued job (the way `echo-worker process` runs jobs in its own process), and writes the recording row the
//! same way, so the frontend sees no difference.
//!
//! Limits, so that a request cannot tie the API up: the source may be at most `server.direct_max_size` (25 MB;
//! `validate` checks the size before anything is downloaded, `download` again while it streams), the run may
//! take at most `server.direct_timeout` (5 min), and at most `worker.concurrency` runs go at once (more are
//! answered 429). A source over the size is answered 413 and one that runs too long 422, both naming
//! `POST /api/process-recording`, which queues any size. A caller that hangs up stops its run (child
//! processes killed, work directory removed) and the row ends `cancelled`.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::ApiState;
use super::caller::Caller;
use super::error::{ApiError, ErrorBody};
use super::extract::ApiJson;
use super::transcript::visible_recording;
use crate::engine::{Engine, JobReport, JobStatus, Kinds};
use crate::error::ErrorCode;
use crate::intake::IntakeError;
use crate::job::JobSpec;
use crate::job::checkpoint::MemoryCheckpoints;
use crate::source::Fetcher;
use crate::stage::builtin::BuiltinKind;
use crate::stage::builtin::download::DownloadStage;
use crate::stage::builtin::validate::ValidateStage;
use crate::store::{NewRecording, RecordingStatus, StoreSink};

/// `POST /api/process-direct`. snake_case names (`recording_id`, `file_url`) are accepted too.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DirectRequest {
    /// The recording: an existing row (its `file_url` is the source unless `fileUrl` is given), or a new one
    /// made with this id: 1 to 128 letters, digits, `-`, `_`, `.` or `:`, not dots alone. A new id is made when
    /// absent.
    #[serde(default, alias = "recording_id")]
    #[schema(pattern = r"^(?!\.+$)[A-Za-z0-9._:-]{1,128}$")]
    pub recording_id: Option<String>,
    /// Where the media is: `https://…`, `supabase://bucket/path`, or a path under the storage root; not blank.
    /// A source the download rules refuse is answered 400 `source_refused`.
    #[serde(default, alias = "file_url")]
    #[schema(pattern = r"[^\t\n\u000b\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]")]
    pub file_url: Option<String>,
    /// The pipeline (default `default`). An unknown one is answered 404.
    #[serde(default)]
    pub pipeline: Option<String>,
    /// `job.params`.
    #[serde(default)]
    pub params: serde_json::Map<String, Value>,
}

/// One stage of the run.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DirectStage {
    /// `succeeded`, `skipped`, `failed`, …
    pub status: String,
    /// How long it ran, when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

/// The answer of a run that completed.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DirectReply {
    /// Always `true`.
    pub success: bool,
    /// The recording the results were stored in.
    pub recording_id: String,
    /// The pipeline that ran.
    pub pipeline: String,
    /// `completed`.
    pub status: String,
    /// What the pipeline stored (its `persist` fields, or every stage's output), with `transcript` and
    /// `duration` (seconds) when known: the old worker's `results`.
    #[schema(value_type = Object)]
    pub results: Value,
    /// Each stage, in the pipeline's order.
    #[schema(value_type = std::collections::BTreeMap<String, DirectStage>)]
    pub stages: IndexMap<String, DirectStage>,
    /// How long the run took.
    pub duration_ms: u64,
}

/// What direct runs share: the stage kinds (made on the first request, since they may connect to Redis), the
/// fetcher for the size-capped `validate` and `download`, and the slots.
pub struct Direct {
    kinds: Kinds,
    fetcher: Fetcher,
    slots: Arc<Semaphore>,
}

impl std::fmt::Debug for Direct {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Direct").field("free_slots", &self.slots.available_permits()).finish_non_exhaustive()
    }
}

impl Direct {
    async fn build(state: &ApiState) -> Result<Self, ApiError> {
        let settings = &state.settings;
        let kinds = crate::app::kinds(settings, state.store.clone())
            .await
            .map_err(|error| ApiError::internal(format!("setting up process-direct's stage kinds: {error:#}")))?;
        let policy = settings.source_policy().map_err(ApiError::internal)?;
        let fetcher = Fetcher::new(policy).map_err(ApiError::internal)?;
        let slots = Arc::new(Semaphore::new(settings.worker.concurrency.max(1) as usize));
        Ok(Self { kinds, fetcher, slots })
    }
}

pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new().routes(routes!(process_direct))
}

/// Seconds a caller turned away because every slot is busy should wait.
const BUSY_RETRY_AFTER: u64 = 10;

/// Runs a small recording now and answers with its results.
#[utoipa::path(
    post,
    path = "/api/process-direct",
    tag = "jobs",
    request_body = DirectRequest,
    responses(
        (status = 200, description = "The run completed; its results", body = DirectReply),
        (status = 400, description = "Bad body, or a fileUrl the download rules refuse", body = ErrorBody),
        (status = 404, description = "Unknown pipeline or recording", body = ErrorBody),
        (status = 409, description = "The recording has a queued or running job", body = ErrorBody),
        (status = 413, description = "The source is over server.direct_max_size: use process-recording", body = ErrorBody),
        (status = 422, description = "The run failed, or took longer than server.direct_timeout", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 429, description = "Every direct slot is busy", body = ErrorBody),
        (status = 422, description = "The pipeline needs something this server lacks (an AI provider): choose another pipeline", body = ErrorBody),
    )
)]
async fn process_direct(
    State(state): State<ApiState>,
    caller: Caller,
    ApiJson(mut request): ApiJson<DirectRequest>,
) -> Result<Json<DirectReply>, ApiError> {
    caller.can_write()?;
    // A blank fileUrl would name the storage root itself, as `process-recording` refuses it.
    request.file_url = super::process::non_empty(request.file_url.take(), "fileUrl")?;
    let began = std::time::Instant::now();
    let name = request.pipeline.clone().unwrap_or_else(|| "default".to_string());
    let catalog = state.catalog.current();
    let pipeline = catalog.pipeline(&name).map_err(|unknown| ApiError::from(IntakeError::UnknownPipeline(unknown)))?;
    let row = match &request.recording_id {
        Some(id) => match visible_recording(&state, &caller, id, "recordingId").await {
            Ok(row) => Some(row),
            Err(error) if error.code == "recording_not_found" && request.file_url.is_some() => None,
            Err(error) => return Err(error),
        },
        None => None,
    };
    let recording = request.recording_id.clone().unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let source = match (&request.file_url, &row) {
        (Some(url), _) => url.clone(),
        (None, Some(row)) => row.file_url.clone().ok_or_else(|| IntakeError::NoSource(recording.clone()))?,
        (None, None) => return Err(IntakeError::UnknownRecording(recording).into()),
    };
    crate::intake::check_source(&source, false, state.intake.policy()).await.map_err(IntakeError::Source)?;
    if let Some(job) = state.queue.live_job_for(&recording).await? {
        return Err(ApiError::conflict(
            "job_in_progress",
            format!("recording `{recording}` has a queued or running job ({job}); wait for it, or cancel it first"),
        )
        .with_details(json!({ "jobId": job })));
    }
    let direct = state.direct.get_or_try_init(|| Direct::build(&state)).await?;
    let max = state.settings.server.direct_max_size;
    let mut registry = direct.kinds.registry(catalog.plugins.values());
    let validate =
        ValidateStage::new(direct.fetcher.clone(), max).with_max_duration(state.settings.limits.max_duration);
    registry.register(BuiltinKind::Validate.name(), Arc::new(validate));
    registry.register(BuiltinKind::Download.name(), Arc::new(DownloadStage::new(direct.fetcher.clone(), max)));
    let mut limits = state.settings.engine();
    limits.job_timeout = state.settings.server.direct_timeout.0;
    let engine = Engine::new(registry, Arc::new(MemoryCheckpoints::default()), limits);
    engine
        .check(pipeline)
        .map_err(|error| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "pipeline_unavailable", error.to_string()))?;
    let Ok(slot) = direct.slots.clone().try_acquire_owned() else {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "direct_busy",
            "every process-direct slot is busy; try again shortly, or queue it with POST /api/process-recording",
        )
        .with_retry_after(BUSY_RETRY_AFTER));
    };
    let job_id = format!("direct-{}", uuid::Uuid::new_v4());
    let new = NewRecording {
        id: recording.clone(),
        file_url: request.file_url.clone(),
        owner_id: caller.owner().map(str::to_string),
        pipeline: Some(name.clone()),
        job_id: Some(job_id.clone()),
        ..NewRecording::default()
    };
    state.store.register(&new).await?;
    state.store.set_status(&recording, RecordingStatus::Processing, Some("running now (process-direct)"), None).await?;
    let spec = JobSpec {
        id: job_id,
        recording_id: Some(recording.clone()),
        pipeline: name.clone(),
        params: request.params,
        source: Some(source),
        trusted_source: false,
    };
    // The run has a task of its own: when the caller hangs up, this handler is dropped, the guard cancels the
    // run, and the task still ends it cleanly (children killed, work directory removed, row settled).
    let cancel = CancellationToken::new();
    let _stop_when_dropped = cancel.clone().drop_guard();
    let (store, pipeline) = (state.store.clone(), pipeline.clone());
    let run = tokio::spawn(async move {
        let _slot = slot;
        let sink = Arc::new(StoreSink::new(store.clone(), spec.recording_id.clone().unwrap_or_default()));
        let id = spec.recording_id.clone().unwrap_or_default();
        let report = engine.run(&pipeline, spec, sink, cancel).await;
        if let Ok(report) = &report
            && let Err(error) = crate::worker::settle(store.as_ref(), &id, report).await
        {
            tracing::warn!(recording = %id, %error, "process-direct: could not settle the recording row");
        }
        report
    });
    let report = run
        .await
        .map_err(|error| ApiError::internal(format!("process-direct run: {error}")))?
        .map_err(|error| ApiError::internal(format!("process-direct run could not start: {error}")))?;
    answer(&state, &recording, &name, report, began).await
}

/// The reply for a finished run: its results, or the failure as an error that says what to do.
async fn answer(
    state: &ApiState,
    recording: &str,
    pipeline: &str,
    report: JobReport,
    began: std::time::Instant,
) -> Result<Json<DirectReply>, ApiError> {
    let stages = report
        .stages
        .iter()
        .map(|(id, stage)| {
            let status = serde_json::to_value(stage.status).ok().and_then(|v| v.as_str().map(str::to_string));
            (id.clone(), DirectStage { status: status.unwrap_or_default(), duration_ms: stage.duration_ms })
        })
        .collect();
    match report.status {
        JobStatus::Succeeded => {
            let row = state.store.get(recording).await?;
            let mut results = row.as_ref().and_then(|row| row.result.clone()).unwrap_or_else(|| json!({}));
            if let (Some(object), Some(row)) = (results.as_object_mut(), &row) {
                if let Some(transcript) = &row.transcript {
                    object.entry("transcript").or_insert_with(|| json!(transcript));
                }
                if let Some(duration) = row.duration_s {
                    object.entry("duration").or_insert_with(|| json!(duration));
                }
            }
            Ok(Json(DirectReply {
                success: true,
                recording_id: recording.to_string(),
                pipeline: pipeline.to_string(),
                status: "completed".into(),
                results,
                stages,
                duration_ms: u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX),
            }))
        }
        JobStatus::Failed | JobStatus::Cancelled => {
            let failure = report.failure.as_ref();
            let stage = failure.and_then(|f| f.stage.clone());
            let reason = failure.map_or_else(|| "the run was stopped".to_string(), |f| f.message.clone());
            let code = failure.map(|f| f.code);
            let details = json!({
                "recordingId": recording,
                "stage": stage,
                "reason": code.map(|c| c.to_string()),
                "stages": stages,
            });
            let error = match code {
                Some(ErrorCode::TooLarge) => ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large_for_direct",
                    format!(
                        "{reason}, the most process-direct takes (server.direct_max_size); send larger sources to \
                         POST /api/process-recording, which queues them"
                    ),
                ),
                Some(ErrorCode::Deadline) => ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "too_long_for_direct",
                    format!(
                        "the run took longer than process-direct allows ({}, server.direct_timeout) and was stopped; \
                         send the recording to POST /api/process-recording, which queues it",
                        state.settings.server.direct_timeout
                    ),
                ),
                _ => {
                    let at = stage.as_ref().map(|s| format!("stage `{s}`: ")).unwrap_or_default();
                    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "processing_failed", format!("{at}{reason}"))
                }
            };
            Err(error.with_details(details))
        }
    }
}
