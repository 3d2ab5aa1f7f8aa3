//! Recordings: `GET /api/recording/{id}/status`, the row the store keeps (status, progress, stage, message,
//! results) with the old worker's fields beside the new ones (`hasTranscript`, `errorMessage`, ...).
//!
//! A caller limited to one user's recordings gets 404 for anyone else's, as if it did not exist.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::caller::Caller;
use super::error::{ApiError, ErrorBody};
use super::extract::ApiPath;
use super::{ApiState, ok, recording_id};

pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new().routes(routes!(recording_status))
}

/// Where a recording is.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecordingState {
    /// `pending`, `queued`, `processing`, `completed`, `failed` or `cancelled`.
    pub state: String,
    /// 0 to 100.
    pub progress: i64,
    /// The stage running now.
    pub stage: Option<String>,
    /// A human message.
    pub message: Option<String>,
    /// When the row last changed (RFC 3339).
    pub updated_at: String,
    /// Why it failed (the old worker's name for `error`).
    pub error_message: Option<String>,
    /// Whether a transcript is stored.
    pub has_transcript: bool,
}

/// `GET /api/recording/{id}/status`.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecordingStatusReply {
    /// Always `true`.
    pub success: bool,
    /// The recording.
    pub recording_id: String,
    /// Its last job.
    pub job_id: Option<String>,
    /// The pipeline it ran or runs through.
    pub pipeline: Option<String>,
    /// Where it is.
    pub status: RecordingState,
    /// The transcript, once completed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transcript: Option<String>,
    /// The results by field (summary, analysis, …), once completed.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub result: Option<Value>,
    /// The media's duration in seconds, once known.
    pub duration: Option<f64>,
    /// When it completed (RFC 3339).
    pub completed_at: Option<String>,
}

/// A recording's status, progress and, once completed, its transcript and results.
#[utoipa::path(
    get,
    path = "/api/recording/{id}/status",
    tag = "recordings",
    params(("id" = String, Path, description = "The recording id: 1 to 128 letters, digits, `-`, `_`, `.` or `:`, not dots alone", pattern = r"^(?!\.+$)[A-Za-z0-9._:-]{1,128}$")),
    responses(
        (status = 200, description = "The recording", body = RecordingStatusReply),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 404, description = "No such recording", body = ErrorBody),
    )
)]
async fn recording_status(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let id = recording_id(&id, "id")?;
    let not_found = || ApiError::not_found("recording_not_found", format!("no recording with id `{id}`"));
    let row = state.store.get(&id).await?.ok_or_else(not_found)?;
    if !caller.may_see(row.owner_id.as_deref()) {
        return Err(not_found());
    }
    let reply = RecordingStatusReply {
        success: true,
        recording_id: row.id,
        job_id: row.job_id,
        pipeline: row.pipeline,
        status: RecordingState {
            state: row.status.as_str().to_string(),
            progress: row.progress,
            stage: row.stage,
            message: row.message,
            updated_at: row.updated_at,
            error_message: row.error,
            has_transcript: row.transcript.is_some(),
        },
        transcript: row.transcript,
        result: row.result,
        duration: row.duration_s,
        completed_at: row.completed_at,
    };
    Ok(ok(StatusCode::OK, reply))
}
