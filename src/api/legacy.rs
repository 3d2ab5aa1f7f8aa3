//! The old Node worker's routes that the live SoundScribe frontend and its Edge Functions call (ARCHITECTURE.md,
//! "The API"; README "Replacing the Node worker"):
//!
//! - `POST /api/process-audio` takes the frontend's exact body `{recording_id, file_url, file_size,
//!   is_large_file, file_type}` (and the `optimization_mode` / `test_mode` other callers add), queues the
//!   recording through the same intake as `process-recording`, and answers 200 `success: true` with no `error`
//!   key (the frontend counts any reply carrying `error` as a failure). The row's `enable_coaching` becomes
//!   `params.enable_coaching`, so the `soundscribe` pipeline coaches only when the row asks for it.
//!   `test_mode: true` (the connectivity check) queues nothing.
//! - `POST /api/process-streaming` is `process-recording` under the old worker's other name.
//! - `GET /api/system/stats`: real figures (queue counts, workers, memory, uptime) where the old worker
//!   answered hard-coded zeros.

use axum::extract::State;
use axum::response::{IntoResponse as _, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::caller::Caller;
use super::error::ApiError;
use super::extract::ApiJson;
use super::{ApiState, time};
use crate::intake::Submission;

/// The body the frontend posts (`useFileOperations.ts`, `fileUpload.ts`).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProcessAudio {
    /// The `recordings` row the frontend inserted: 1 to 128 letters, digits, `-`, `_`, `.` or `:`, not dots alone
    /// (the frontend's are UUIDs).
    #[serde(alias = "recordingId")]
    #[schema(pattern = r"^(?!\.+$)[A-Za-z0-9._:-]{1,128}$")]
    pub recording_id: String,
    /// Where the upload is: the Storage URL of the `recordings` bucket, or any URL the download rules allow; not
    /// blank. One they refuse is answered 400 `source_refused`.
    #[serde(alias = "fileUrl")]
    #[schema(pattern = r"[^\t\n\u000b\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]")]
    pub file_url: String,
    /// The upload's size in bytes.
    #[serde(default, alias = "fileSize")]
    pub file_size: Option<f64>,
    /// Sent by the frontend; every file takes the same path through the queue.
    #[serde(default, alias = "isLargeFile")]
    pub is_large_file: Option<bool>,
    /// `audio` or `video` (or a MIME type, as one Edge Function sends).
    #[serde(default, alias = "fileType")]
    pub file_type: Option<String>,
    /// Sent by some callers (`fast_track`, `turbo`); the pipeline decides how the work is done.
    #[serde(default, alias = "optimizationMode")]
    pub optimization_mode: Option<String>,
    /// The connectivity check's flag: answer, queue nothing.
    #[serde(default, alias = "testMode")]
    pub test_mode: Option<bool>,
}

/// `POST /api/process-audio` accepted the recording.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProcessAudioReply {
    /// Always true.
    pub success: bool,
    /// For people (the Edge Functions log it).
    pub message: String,
    /// The recording.
    pub recording_id: String,
    /// The job working on it (absent in test mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// The pipeline it runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<String>,
    /// `processing_started` (as the old worker said), `already_processing` when a job was live, `test_ok`.
    pub status: String,
    /// The size in MB with one decimal, or `unknown`.
    #[serde(rename = "file_size_mb")]
    pub file_size_mb: String,
    /// As posted.
    #[serde(rename = "file_type", skip_serializing_if = "Option::is_none")]
    pub file_type: Option<String>,
    /// Now (RFC 3339).
    pub timestamp: String,
}

pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new().routes(routes!(process_audio)).routes(routes!(process_streaming)).routes(routes!(system_stats))
}

/// Whether a column value read as text says true; an absent value takes the column's default (true).
fn truthy(text: Option<&str>) -> bool {
    !matches!(text.map(str::trim), Some("false" | "f" | "0" | "no"))
}

/// Queues a recording the way the live frontend asks: its exact body, 200 with `success: true`.
#[utoipa::path(
    post,
    path = "/api/process-audio",
    tag = "legacy",
    request_body = ProcessAudio,
    responses(
        (status = 200, description = "Queued (or already being processed)", body = ProcessAudioReply),
        (status = 400, description = "A field is missing, mistyped or unknown, or the file URL breaks a download rule", body = super::error::ErrorBody),
        (status = 413, description = "Body too large", body = super::error::ErrorBody),
        (status = 415, description = "The body is not JSON", body = super::error::ErrorBody),
        (status = 404, description = "No such recording row", body = super::error::ErrorBody),
    )
)]
async fn process_audio(
    State(state): State<ApiState>,
    headers: axum::http::HeaderMap,
    caller: Result<Caller, ApiError>,
    ApiJson(body): ApiJson<ProcessAudio>,
) -> Result<Response, ApiError> {
    // The live frontend sends no token: with `legacy.open_process_audio` a call without one is let through,
    // limited to rows that exist and to the file_url stored in them (below).
    let anonymous = caller.is_err()
        && state.settings.legacy.open_process_audio
        && !headers.contains_key(axum::http::header::AUTHORIZATION);
    let owner = match caller {
        Ok(caller) => {
            caller.can_write()?;
            caller.owner().map(str::to_string)
        }
        Err(_) if anonymous => None,
        Err(error) => return Err(error),
    };
    tracing::debug!(
        recording = %body.recording_id,
        is_large_file = ?body.is_large_file,
        optimization_mode = ?body.optimization_mode,
        "process-audio"
    );
    let file_size_mb = body
        .file_size
        .filter(|size| size.is_finite() && *size >= 0.0)
        .map_or_else(|| "unknown".to_string(), |bytes| format!("{:.1}", bytes / (1024.0 * 1024.0)));
    let reply = |job_id: Option<String>, pipeline: Option<String>, status: &str, message: String| ProcessAudioReply {
        success: true,
        message,
        recording_id: body.recording_id.clone(),
        job_id,
        pipeline,
        status: status.into(),
        file_size_mb: file_size_mb.clone(),
        file_type: body.file_type.clone(),
        timestamp: time::rfc3339(time::now_ms()),
    };
    // The fields are checked in test mode too, so that one body is valid or not whatever the mode (the
    // connectivity check sends real-looking ones).
    if body.recording_id.trim().is_empty() {
        return Err(ApiError::bad_request("missing_field", "recording_id is required")
            .with_details(json!({ "field": "recording_id" })));
    }
    // An id the other routes could not reach (`/api/recording/{id}/status`) is not made into a row.
    super::recording_id(&body.recording_id, "recording_id")?;
    if body.file_url.trim().is_empty() {
        return Err(
            ApiError::bad_request("missing_field", "file_url is required").with_details(json!({ "field": "file_url" }))
        );
    }
    if body.test_mode == Some(true) {
        let message = "test mode: the worker answers; nothing was queued".to_string();
        return Ok(axum::Json(reply(None, None, "test_ok", message)).into_response());
    }
    // As the old worker did, the row's own file_url is what gets processed; the body's is used only for a row
    // that has none (and never for a call without a token).
    let stored_url =
        state.store.read_column(&body.recording_id, "file_url").await?.filter(|url| !url.trim().is_empty());
    let source = match (stored_url, anonymous) {
        (Some(url), _) => url,
        (None, false) => body.file_url.clone(),
        (None, true) => {
            return Err(ApiError::not_found(
                "recording_not_found",
                format!("no recording {} with a file_url to process", body.recording_id),
            ));
        }
    };
    let coaching = state.store.read_column(&body.recording_id, "enable_coaching").await?;
    let pipeline = state.settings.legacy.pipeline(state.settings.database.profile).to_string();
    let mut params = serde_json::Map::new();
    params.insert("enable_coaching".into(), Value::Bool(truthy(coaching.as_deref())));
    #[allow(clippy::cast_possible_truncation)] // a file size in bytes, checked finite and non-negative
    let size_bytes = body.file_size.filter(|size| size.is_finite() && *size >= 0.0).map(|size| size.round() as i64);
    let submission = Submission {
        recording_id: Some(body.recording_id.clone()),
        pipeline,
        source: Some(source),
        trusted_source: false,
        priority: 0,
        params,
        file_name: None,
        size_bytes,
        mime_type: body.file_type.clone().filter(|kind| kind.contains('/')),
        owner_id: owner,
        callback_url: None,
    };
    let submitted = state.intake.submit(&state.catalog.current(), submission).await?;
    let (status, message) = if submitted.created {
        ("processing_started", "Processing started")
    } else {
        ("already_processing", "This recording is already being processed")
    };
    let reply = reply(Some(submitted.job_id), Some(submitted.pipeline), status, message.to_string());
    Ok(axum::Json(reply).into_response())
}

/// The old worker's streaming route, now the same as `process-recording`: every job streams its file to disk
/// and transcribes it in chunks.
#[utoipa::path(
    post,
    path = "/api/process-streaming",
    tag = "legacy",
    request_body = super::process::ProcessRecording,
    responses(
        (status = 202, description = "A new job", body = super::process::ProcessReply),
        (status = 200, description = "The recording already has a live job: that job", body = super::process::ProcessReply),
        (status = 400, description = "Bad body, or a source the download rules refuse", body = super::error::ErrorBody),
        (status = 413, description = "Body too large", body = super::error::ErrorBody),
        (status = 415, description = "The body is not JSON", body = super::error::ErrorBody),
        (status = 404, description = "Unknown pipeline or recording", body = super::error::ErrorBody),
    )
)]
async fn process_streaming(
    state: State<ApiState>,
    caller: Caller,
    body: ApiJson<super::process::ProcessRecording>,
) -> Result<Response, ApiError> {
    super::process::process_recording(state, caller, body).await
}

/// The process's memory from `/proc/self/status`, in bytes: (resident now, peak resident).
fn memory() -> (Option<u64>, Option<u64>) {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else { return (None, None) };
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok().map(|kib| kib * 1024))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// `GET /api/system/stats`.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SystemStats {
    /// Always true.
    pub success: bool,
    /// Now (RFC 3339).
    pub timestamp: String,
    /// Seconds since this server started.
    pub uptime: f64,
    /// This process's memory.
    pub memory: MemoryStats,
    /// The queue: jobs per state, paused, live workers.
    #[schema(value_type = Object)]
    pub queue: Value,
    /// Where it runs.
    #[schema(value_type = Object)]
    pub environment: Value,
}

/// Memory figures, in bytes.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemoryStats {
    /// Resident set size now.
    pub rss_bytes: Option<u64>,
    /// Highest resident set size so far.
    pub peak_rss_bytes: Option<u64>,
}

/// Real figures about this server, its queue and its workers.
#[utoipa::path(
    get,
    path = "/api/system/stats",
    tag = "legacy",
    responses(
        (status = 200, description = "Figures", body = SystemStats),
        (status = 503, description = "The queue does not answer", body = super::error::ErrorBody),
    )
)]
async fn system_stats(State(state): State<ApiState>, _caller: Caller) -> Result<Response, ApiError> {
    let stats = state.queue.stats().await?;
    let counts: serde_json::Map<String, Value> =
        stats.counts.iter().map(|(state, count)| (state.name().to_string(), json!(count))).collect();
    let total: u64 = stats.counts.values().sum();
    let workers: Vec<Value> =
        stats.workers.iter().map(|worker| serde_json::to_value(worker).unwrap_or(Value::Null)).collect();
    let settings = &state.settings;
    let (rss, peak) = memory();
    let body = SystemStats {
        success: true,
        timestamp: time::rfc3339(time::now_ms()),
        uptime: state.started_at.elapsed().as_secs_f64(),
        memory: MemoryStats { rss_bytes: rss, peak_rss_bytes: peak },
        queue: json!({
            "mode": if settings.redis.url.is_some() { "redis" } else { "memory" },
            "redisEnabled": settings.redis.url.is_some(),
            "paused": stats.paused,
            "counts": counts,
            "total": total,
            "workers": workers,
        }),
        environment: json!({
            "version": env!("CARGO_PKG_VERSION"),
            "environment": settings.environment,
            "os": std::env::consts::OS,
            "arch": std::env::consts::ARCH,
            "cpus": std::thread::available_parallelism().map(std::num::NonZero::get).unwrap_or(1),
            "workerConcurrency": settings.worker.concurrency,
            "database": if settings.database.url.expose().starts_with("postgres") { "postgres" } else { "sqlite" },
            "databaseProfile": settings.database.profile.name(),
        }),
    };
    Ok(axum::Json(body).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frontends_body_parses_and_coaching_defaults_to_on() {
        let body: ProcessAudio = serde_json::from_value(json!({
            "recording_id": "r", "file_url": "https://x/y.mp3", "file_size": 1234, "is_large_file": true, "file_type": "audio"
        }))
        .unwrap();
        assert_eq!((body.file_size, body.is_large_file), (Some(1234.0), Some(true)));
        assert!(truthy(None) && truthy(Some("true")) && truthy(Some("1")));
        assert!(!truthy(Some("false")) && !truthy(Some("0")));
    }
}
