//! A completed recording's transcript, as the frontend and batch users download it: `GET
//! /api/recording/{id}/subtitles.srt` and `.vtt` (made from the timed segments its `result` keeps, by
//! [`crate::subtitle`]), and `GET /api/recording/{id}/transcript` (plain text, or the segments as JSON when the
//! request prefers `application/json`).
//!
//! A recording that does not exist, or that the caller may not see, is 404 `recording_not_found`; one that has
//! not completed is 409 `not_completed` (a transcript appears only once the whole job succeeded); a completed one
//! whose pipeline kept no segments (or no transcript) is 404 `no_transcript`.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::caller::Caller;
use super::error::{ApiError, ErrorBody};
use super::extract::ApiPath;
use super::{ApiState, recording_id};
use crate::store::{Recording, RecordingStatus};
use crate::subtitle::{self, Cue};

/// One timed piece of the transcript.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Segment {
    /// Start, seconds from the beginning of the recording.
    pub start: f64,
    /// End, seconds.
    pub end: f64,
    /// What was said.
    pub text: String,
}

/// `GET /api/recording/{id}/transcript` with `Accept: application/json`.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Transcript {
    /// Always `true`.
    pub success: bool,
    /// The recording.
    pub recording_id: String,
    /// The whole text.
    pub text: String,
    /// The timed segments, in order (empty when the pipeline kept none).
    pub segments: Vec<Segment>,
}

pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new().routes(routes!(srt)).routes(routes!(vtt)).routes(routes!(transcript))
}

/// The recording, when it exists and the caller may see it.
///
/// # Errors
/// 400 `invalid_id` for an id that cannot be one; 404 `recording_not_found`; the store's errors.
pub(super) async fn visible_recording(
    state: &ApiState,
    caller: &Caller,
    id: &str,
    field: &str,
) -> Result<Recording, ApiError> {
    let id = recording_id(id, field)?;
    match state.store.get(&id).await? {
        Some(recording) if caller.may_see(recording.owner_id.as_deref()) => Ok(recording),
        _ => Err(ApiError::not_found("recording_not_found", format!("no recording with id `{id}`"))),
    }
}

/// The completed recording's cues (none when it kept no segments).
async fn completed(state: &ApiState, caller: &Caller, id: &str) -> Result<(Recording, Option<Vec<Cue>>), ApiError> {
    let recording = visible_recording(state, caller, id, "id").await?;
    if recording.status != RecordingStatus::Completed {
        return Err(ApiError::conflict(
            "not_completed",
            format!("recording `{id}` is {}: its transcript is ready once it is completed", recording.status.as_str()),
        )
        .with_details(serde_json::json!({ "status": recording.status.as_str() })));
    }
    let cues = match recording.result.as_ref().and_then(subtitle::segments_in) {
        Some(segments) => Some(subtitle::cues_from(segments).map_err(|error| {
            ApiError::internal(format!("recording {id}: the stored segments cannot be read: {error}"))
        })?),
        None => None,
    };
    Ok((recording, cues))
}

fn no_segments(id: &str) -> ApiError {
    ApiError::not_found(
        "no_transcript",
        format!("recording `{id}` has no timed transcript: its pipeline did not keep the segments (whisper_segments)"),
    )
}

/// A text reply with its type and a file name for downloads.
fn text_reply(body: String, content_type: &'static str, file_name: Option<String>) -> Response {
    let mut response = ([(header::CONTENT_TYPE, HeaderValue::from_static(content_type))], body).into_response();
    if let Some(name) = file_name
        && let Ok(value) = HeaderValue::from_str(&format!("inline; filename=\"{name}\""))
    {
        response.headers_mut().insert(header::CONTENT_DISPOSITION, value);
    }
    response
}

/// The recording's subtitles as SubRip.
#[utoipa::path(
    get,
    path = "/api/recording/{id}/subtitles.srt",
    tag = "recordings",
    params(("id" = String, Path, description = "The recording id: 1 to 128 letters, digits, `-`, `_`, `.` or `:`, not dots alone", pattern = r"^(?!\.+$)[A-Za-z0-9._:-]{1,128}$")),
    responses(
        (status = 200, description = "SubRip subtitles", content_type = "text/plain", body = String),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 404, description = "No such recording, or it kept no segments", body = ErrorBody),
        (status = 409, description = "The recording has not completed", body = ErrorBody),
    )
)]
async fn srt(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let (_, cues) = completed(&state, &caller, &id).await?;
    let cues = cues.ok_or_else(|| no_segments(&id))?;
    Ok(text_reply(subtitle::srt(&cues), "text/plain; charset=utf-8", Some(format!("{}.srt", id))))
}

/// The recording's subtitles as WebVTT.
#[utoipa::path(
    get,
    path = "/api/recording/{id}/subtitles.vtt",
    tag = "recordings",
    params(("id" = String, Path, description = "The recording id: 1 to 128 letters, digits, `-`, `_`, `.` or `:`, not dots alone", pattern = r"^(?!\.+$)[A-Za-z0-9._:-]{1,128}$")),
    responses(
        (status = 200, description = "WebVTT subtitles", content_type = "text/vtt", body = String),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 404, description = "No such recording, or it kept no segments", body = ErrorBody),
        (status = 409, description = "The recording has not completed", body = ErrorBody),
    )
)]
async fn vtt(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let (_, cues) = completed(&state, &caller, &id).await?;
    let cues = cues.ok_or_else(|| no_segments(&id))?;
    Ok(text_reply(subtitle::vtt(&cues), "text/vtt; charset=utf-8", Some(format!("{}.vtt", id))))
}

/// Whether `Accept` prefers JSON to plain text (by quality; a tie, or no mention of either, is text).
fn wants_json(headers: &HeaderMap) -> bool {
    let Some(accept) = headers.get(header::ACCEPT).and_then(|value| value.to_str().ok()) else { return false };
    let quality = |wanted: &[&str]| -> f32 {
        accept
            .split(',')
            .filter_map(|range| {
                let mut parts = range.split(';');
                let media = parts.next()?.trim().to_ascii_lowercase();
                let q = parts
                    .filter_map(|p| p.trim().strip_prefix("q=").and_then(|q| q.trim().parse::<f32>().ok()))
                    .next()
                    .unwrap_or(1.0);
                wanted.contains(&media.as_str()).then_some(q)
            })
            .fold(0.0, f32::max)
    };
    let json = quality(&["application/json"]);
    json > 0.0 && json > quality(&["text/plain", "text/*"])
}

/// The recording's transcript: plain text, or `Accept: application/json` for the text and its timed segments.
#[utoipa::path(
    get,
    path = "/api/recording/{id}/transcript",
    tag = "recordings",
    params(("id" = String, Path, description = "The recording id: 1 to 128 letters, digits, `-`, `_`, `.` or `:`, not dots alone", pattern = r"^(?!\.+$)[A-Za-z0-9._:-]{1,128}$")),
    responses(
        (status = 200, description = "The transcript: text/plain, or JSON with its segments when the request \
                                      prefers application/json",
         content((String = "text/plain"), (Transcript = "application/json"))),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 404, description = "No such recording, or it kept no transcript", body = ErrorBody),
        (status = 409, description = "The recording has not completed", body = ErrorBody),
    )
)]
async fn transcript(
    State(state): State<ApiState>,
    caller: Caller,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let (recording, cues) = completed(&state, &caller, &id).await?;
    let text = match (&recording.transcript, &cues) {
        (Some(text), _) if !text.trim().is_empty() => text.clone(),
        (_, Some(cues)) => subtitle::plain_text(cues),
        _ => {
            return Err(ApiError::not_found(
                "no_transcript",
                format!("recording `{}` has no transcript: its pipeline did not store one", id),
            ));
        }
    };
    if wants_json(&headers) {
        let segments = cues
            .unwrap_or_default()
            .into_iter()
            .filter(|cue| !cue.text.trim().is_empty())
            .map(|cue| Segment { start: cue.start, end: cue.end, text: cue.text.trim().to_string() })
            .collect();
        let body = Transcript { success: true, recording_id: recording.id, text, segments };
        return Ok(axum::Json(body).into_response());
    }
    Ok(text_reply(text, "text/plain; charset=utf-8", None))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn json_is_chosen_only_when_preferred() {
        assert!(wants_json(&accept("application/json")));
        assert!(wants_json(&accept("text/plain;q=0.5, application/json")));
        assert!(!wants_json(&accept("text/plain, application/json;q=0.9")));
        assert!(!wants_json(&accept("*/*")));
        assert!(!wants_json(&accept("application/json;q=0")));
        assert!(!wants_json(&accept("text/html")));
        assert!(!wants_json(&HeaderMap::new()));
    }
}
