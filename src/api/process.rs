//! Queuing work: `POST /api/process-recording` (one recording; 202 with a new job, 200 with the live job when
//! the recording already has one) and `POST /api/batch-process` (many recordings in one bulk enqueue; each
//! item is accepted with its job id or rejected with its reason, so one bad item does not sink the batch).
//! Both go through `crate::intake`, as `echo-worker enqueue` does: the pipeline is looked up in the live
//! catalog, the source checked against the download rules, the recording row registered before the job exists.
//!
//! Bodies take the camelCase names and the old worker's snake_case ones (`recording_id`, `file_url`,
//! `recording_ids`). The old worker's hints (`file_size_mb`, `duration_minutes`, `enable_streaming`,
//! `concurrency`) are accepted and not used: the pipeline decides how a recording is cut and how many run.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{AllOfBuilder, ObjectBuilder, OneOfBuilder, Ref, Schema, Type};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::caller::Caller;
use super::error::{ApiError, ErrorBody};
use super::extract::ApiJson;
use super::{ApiState, ok, recording_id};
use crate::intake::{Submission, Submitted};

/// The pipeline a request that names none runs.
pub const DEFAULT_PIPELINE: &str = "default";
/// Items one batch may hold; more is a 400 (send several batches).
pub const MAX_BATCH: usize = 1000;

pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new().routes(routes!(process_recording)).routes(routes!(batch_process))
}

/// `POST /api/process-recording`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProcessRecording {
    /// The recording's id (the frontend's row id): 1 to 128 letters, digits, `-`, `_`, `.` or `:`, not dots
    /// alone. Also `recording_id`.
    #[serde(alias = "recording_id")]
    #[schema(pattern = r"^(?!\.+$)[A-Za-z0-9._:-]{1,128}$")]
    pub recording_id: String,
    /// Where the media is: `https://…`, `supabase://bucket/path`, or a path under the storage root; not blank.
    /// Creates the recording row when given; without it the row's `file_url` is used. Also `file_url`. A source
    /// the download rules refuse (an internal address, a file that is not under the storage root) is answered
    /// 400 `source_refused`.
    #[serde(alias = "file_url")]
    #[schema(pattern = r"[^\t\n\u000b\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]")]
    pub file_url: Option<String>,
    /// The pipeline to run (default `default`); not blank. An unknown one is answered 404.
    #[schema(pattern = r"[^\t\n\u000b\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]")]
    pub pipeline: Option<String>,
    /// Lower runs sooner (default 0): -1048576 to 1048575.
    #[schema(minimum = -1_048_576, maximum = 1_048_575)]
    #[serde(default, deserialize_with = "super::extract::whole")]
    pub priority: Option<i64>,
    /// `job.params` for the pipeline's templates.
    #[schema(value_type = Option<Object>)]
    pub params: Option<serde_json::Map<String, Value>>,
    /// The file's name. Also `file_name`.
    #[serde(alias = "file_name")]
    pub file_name: Option<String>,
    /// The file's size in bytes. Also `file_size`.
    #[serde(alias = "file_size")]
    #[schema(minimum = 0)]
    #[serde(default, deserialize_with = "super::extract::whole")]
    pub file_size: Option<i64>,
    /// The file's MIME type (`audio/mpeg`) or kind (`audio`, `video`). Also `file_type`.
    #[serde(alias = "file_type")]
    pub file_type: Option<String>,
    /// Where to POST the job's final status, signed, when it ends (see the README, "Callbacks"); not blank.
    /// Checked with the download rules (400 `callback_refused`), and refused while the server has no
    /// `callback.secret` (400 `callbacks_disabled`). Also `callback_url`.
    #[serde(alias = "callback_url")]
    #[schema(pattern = r"[^\t\n\u000b\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]")]
    pub callback_url: Option<String>,
    /// The old worker's size hint; accepted, not used.
    #[serde(alias = "file_size_mb")]
    #[allow(dead_code, reason = "read so that old clients are not refused; nothing uses it")]
    pub file_size_mb: Option<f64>,
    /// The old worker's duration hint; accepted, not used.
    #[serde(alias = "duration_minutes")]
    #[allow(dead_code, reason = "read so that old clients are not refused; nothing uses it")]
    pub duration_minutes: Option<f64>,
    /// The old worker's streaming switch; accepted, not used.
    #[serde(alias = "enable_streaming")]
    #[allow(dead_code, reason = "read so that old clients are not refused; nothing uses it")]
    pub enable_streaming: Option<bool>,
}

/// The answer to `process-recording`.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProcessReply {
    /// Always `true`.
    pub success: bool,
    /// The job.
    pub job_id: String,
    /// The recording.
    pub recording_id: String,
    /// The pipeline the job runs.
    pub pipeline: String,
    /// `queued` for a new job; the live job's state otherwise.
    pub status: String,
    /// `true` when the recording already had a live job, which this is.
    pub existing: bool,
    /// What happened, for a person.
    pub message: String,
}

/// A non-empty text field, or a 400 naming it.
pub(super) fn non_empty(value: Option<String>, field: &str) -> Result<Option<String>, ApiError> {
    match value {
        Some(text) if text.trim().is_empty() => {
            Err(ApiError::bad_request("invalid_field", format!("`{field}` is empty: leave it out or give a value"))
                .with_details(json!({ "field": field })))
        }
        other => Ok(other),
    }
}

/// A file size in bytes, or a 400 naming the field when it is negative.
fn file_size(value: Option<i64>) -> Result<Option<i64>, ApiError> {
    match value {
        Some(size) if size < 0 => Err(ApiError::bad_request(
            "invalid_field",
            format!("`fileSize` {size} is negative: give the file's size in bytes, or leave it out"),
        )
        .with_details(json!({ "field": "fileSize" }))),
        other => Ok(other),
    }
}

/// A MIME type from `fileType`: kept when it is one (`audio/mpeg`); the old frontend's `audio` or `video`
/// say nothing the validate stage does not find out.
fn mime(file_type: Option<String>) -> Option<String> {
    file_type.filter(|kind| kind.contains('/'))
}

async fn live_state(state: &ApiState, submitted: &Submitted) -> String {
    if submitted.created {
        return "queued".into();
    }
    match state.queue.get(&submitted.job_id).await {
        Ok(Some(job)) => job.state.to_string(),
        _ => "queued".into(),
    }
}

/// Queues a recording through a pipeline.
#[utoipa::path(
    post,
    path = "/api/process-recording",
    tag = "jobs",
    request_body = ProcessRecording,
    responses(
        (status = 202, description = "A new job", body = ProcessReply),
        (status = 200, description = "The recording already has a live job: that job", body = ProcessReply),
        (status = 400, description = "Bad body, or a source the download rules refuse", body = ErrorBody),
        (status = 404, description = "Unknown pipeline (the available ones are listed), or unknown recording without fileUrl", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
    )
)]
pub(super) async fn process_recording(
    State(state): State<ApiState>,
    caller: Caller,
    ApiJson(body): ApiJson<ProcessRecording>,
) -> Result<Response, ApiError> {
    caller.can_write()?;
    let recording = recording_id(&body.recording_id, "recordingId")?;
    let submission = Submission {
        recording_id: Some(recording),
        pipeline: non_empty(body.pipeline, "pipeline")?.unwrap_or_else(|| DEFAULT_PIPELINE.into()),
        source: non_empty(body.file_url, "fileUrl")?,
        trusted_source: false,
        priority: body.priority.unwrap_or(0),
        params: body.params.unwrap_or_default(),
        file_name: body.file_name,
        size_bytes: file_size(body.file_size)?,
        mime_type: mime(body.file_type),
        owner_id: caller.owner().map(str::to_string),
        callback_url: non_empty(body.callback_url, "callbackUrl")?,
    };
    let catalog = state.catalog.current();
    let submitted = state.intake.submit(&catalog, submission).await?;
    let status = live_state(&state, &submitted).await;
    let (code, message) = if submitted.created {
        (StatusCode::ACCEPTED, format!("recording {} queued as job {}", submitted.recording_id, submitted.job_id))
    } else {
        (
            StatusCode::OK,
            format!(
                "recording {} already has a live job ({}, {status}); no new job was made",
                submitted.recording_id, submitted.job_id
            ),
        )
    };
    let reply = ProcessReply {
        success: true,
        existing: !submitted.created,
        job_id: submitted.job_id,
        recording_id: submitted.recording_id,
        pipeline: submitted.pipeline,
        status,
        message,
    };
    Ok(ok(code, reply))
}

/// One item of a batch given as `items`. Its fields are checked as `process-recording` checks them (the id's
/// form, a blank `fileUrl`, a negative `fileSize`, the priority's range, the download rules), but an item that
/// fails is rejected on its own, in the reply's `items`, not with a 400 for the batch.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BatchItem {
    /// The recording's id. Also `recording_id`.
    #[serde(alias = "recording_id")]
    pub recording_id: String,
    /// Where the media is (see `process-recording`). Also `file_url`.
    #[serde(alias = "file_url")]
    pub file_url: Option<String>,
    /// This item's priority (default: the batch's).
    #[serde(default, deserialize_with = "super::extract::whole")]
    pub priority: Option<i64>,
    /// This item's params, laid over the batch's.
    #[schema(value_type = Option<Object>)]
    pub params: Option<serde_json::Map<String, Value>>,
    /// The file's name. Also `file_name`.
    #[serde(alias = "file_name")]
    pub file_name: Option<String>,
    /// The file's size in bytes. Also `file_size`.
    #[serde(alias = "file_size")]
    #[serde(default, deserialize_with = "super::extract::whole")]
    pub file_size: Option<i64>,
    /// The file's MIME type. Also `file_type`.
    #[serde(alias = "file_type")]
    pub file_type: Option<String>,
}

/// `POST /api/batch-process`: `recordingIds` (recordings whose rows name their files) or `items`, one pipeline.
/// Exactly one of the two is given.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BatchProcess {
    /// Recordings to process, by id: 1 to 1000. An id that is not a recording id is rejected on its own, in
    /// the reply's `items`. Also `recording_ids`.
    #[serde(alias = "recording_ids")]
    #[schema(min_items = 1, max_items = 1000)]
    pub recording_ids: Option<Vec<String>>,
    /// Recordings to process, with their sources: 1 to 1000.
    #[schema(min_items = 1, max_items = 1000)]
    pub items: Option<Vec<BatchItem>>,
    /// The pipeline every item runs (default `default`); not blank. An unknown one is answered 404.
    #[schema(pattern = r"[^\t\n\u000b\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]")]
    pub pipeline: Option<String>,
    /// Lower runs sooner (default 0); an item whose priority is outside -1048576 to 1048575 is rejected.
    #[serde(default, deserialize_with = "super::extract::whole")]
    pub priority: Option<i64>,
    /// `job.params` for every item.
    #[schema(value_type = Option<Object>)]
    pub params: Option<serde_json::Map<String, Value>>,
    /// Where to POST each item's final status when its job ends (see `process-recording`); not blank. Each item
    /// is rejected when it is refused (`callback_refused`, `callbacks_disabled`). Also `callback_url`.
    #[serde(alias = "callback_url")]
    #[schema(pattern = r"[^\t\n\u000b\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]")]
    pub callback_url: Option<String>,
    /// The old worker's parallelism; accepted, not used (workers decide).
    #[allow(dead_code, reason = "read so that old clients are not refused; nothing uses it")]
    #[serde(default, deserialize_with = "super::extract::whole")]
    pub concurrency: Option<i32>,
}

/// The body of `POST /api/batch-process` as the document states it: the fields of [`BatchProcess`], with exactly
/// one of `recordingIds` and `items` given (not `null`). A struct's derived schema cannot say "one of two
/// fields", so this adds it beside a reference to the fields.
pub struct BatchProcessBody;

impl utoipa::PartialSchema for BatchProcessBody {
    fn schema() -> RefOr<Schema> {
        // One branch: `given` is required and an array; `other` is absent or null.
        let branch = |given: &str, other: &str| {
            ObjectBuilder::new()
                .required(given)
                .property(given, ObjectBuilder::new().schema_type(Type::Array))
                .property(other, ObjectBuilder::new().schema_type(Type::Null))
        };
        AllOfBuilder::new()
            .description(Some("`BatchProcess` with exactly one of `recordingIds` and `items`."))
            .item(Ref::from_schema_name(<BatchProcess as ToSchema>::name()))
            .item(OneOfBuilder::new().item(branch("recordingIds", "items")).item(branch("items", "recordingIds")))
            .into()
    }
}

impl ToSchema for BatchProcessBody {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas
            .push((<BatchProcess as ToSchema>::name().into_owned(), <BatchProcess as utoipa::PartialSchema>::schema()));
        <BatchProcess as ToSchema>::schemas(schemas);
    }
}

/// How one item of a batch went.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchItemReply {
    /// The recording, as given.
    pub recording_id: String,
    /// Whether it is queued (or already had a live job).
    pub accepted: bool,
    /// Its job, when accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// `true` when the recording already had a live job.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub existing: Option<bool>,
    /// Why it was rejected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The rejection's code, as an error reply would carry it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

/// The answer to `batch-process`.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchReply {
    /// Always `true`: the batch was read; each item says how it went.
    pub success: bool,
    /// The pipeline.
    pub pipeline: String,
    /// Items given.
    pub total: usize,
    /// Items queued (or already live).
    pub accepted: usize,
    /// Items rejected.
    pub rejected: usize,
    /// Each item, in the order given.
    pub items: Vec<BatchItemReply>,
}

/// Queues many recordings through one pipeline in one bulk enqueue.
#[utoipa::path(
    post,
    path = "/api/batch-process",
    tag = "jobs",
    request_body = BatchProcessBody,
    responses(
        (status = 202, description = "Read; at least one new job; each item says how it went", body = BatchReply),
        (status = 200, description = "Read; no new job (all rejected or already live)", body = BatchReply),
        (status = 400, description = "Bad body: neither or both of recordingIds and items, none, or too many", body = ErrorBody),
        (status = 404, description = "Unknown pipeline (the available ones are listed)", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
    )
)]
async fn batch_process(
    State(state): State<ApiState>,
    caller: Caller,
    ApiJson(body): ApiJson<BatchProcess>,
) -> Result<Response, ApiError> {
    caller.can_write()?;
    let items: Vec<BatchItem> = match (body.recording_ids, body.items) {
        (Some(ids), None) => ids
            .into_iter()
            .map(|recording_id| BatchItem {
                recording_id,
                file_url: None,
                priority: None,
                params: None,
                file_name: None,
                file_size: None,
                file_type: None,
            })
            .collect(),
        (None, Some(items)) => items,
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request("invalid_field", "give either `recordingIds` or `items`, not both")
                .with_details(json!({ "field": "items" })));
        }
        (None, None) => {
            return Err(ApiError::bad_request(
                "missing_field",
                "missing field `recordingIds` (or `items`): the recordings to process",
            )
            .with_details(json!({ "field": "recordingIds" })));
        }
    };
    if items.is_empty() || items.len() > MAX_BATCH {
        return Err(ApiError::bad_request(
            "invalid_field",
            format!("a batch holds 1 to {MAX_BATCH} recordings; this one has {}", items.len()),
        )
        .with_details(json!({ "field": "recordingIds", "max": MAX_BATCH })));
    }
    let pipeline = non_empty(body.pipeline, "pipeline")?.unwrap_or_else(|| DEFAULT_PIPELINE.into());
    let catalog = state.catalog.current();
    catalog.pipeline(&pipeline).map_err(|unknown| ApiError::from(crate::intake::IntakeError::from(unknown)))?;
    let base = body.params.unwrap_or_default();
    let callback_url = non_empty(body.callback_url, "callbackUrl")?;
    let mut replies: Vec<Option<BatchItemReply>> = Vec::with_capacity(items.len());
    let mut submissions = Vec::new();
    let mut slots = Vec::new();
    for item in items {
        let shown = item.recording_id.clone();
        let rejected = |error: ApiError| BatchItemReply {
            recording_id: shown.clone(),
            accepted: false,
            job_id: None,
            existing: None,
            reason: Some(error.message.clone()),
            code: Some(error.code.to_string()),
        };
        let checked = recording_id(&item.recording_id, "recordingId")
            .and_then(|id| Ok((id, non_empty(item.file_url.clone(), "fileUrl")?, file_size(item.file_size)?)));
        let (id, source, size_bytes) = match checked {
            Ok(checked) => checked,
            Err(error) => {
                replies.push(Some(rejected(error)));
                continue;
            }
        };
        let mut params = base.clone();
        params.extend(item.params.unwrap_or_default());
        submissions.push(Submission {
            recording_id: Some(id),
            pipeline: pipeline.clone(),
            source,
            trusted_source: false,
            priority: item.priority.or(body.priority).unwrap_or(0),
            params,
            file_name: item.file_name,
            size_bytes,
            mime_type: mime(item.file_type),
            owner_id: caller.owner().map(str::to_string),
            callback_url: callback_url.clone(),
        });
        slots.push((replies.len(), shown));
        replies.push(None);
    }
    let results = state.intake.submit_many(&catalog, submissions).await?;
    let mut created = false;
    for ((slot, shown), result) in slots.into_iter().zip(results) {
        replies[slot] = Some(match result {
            Ok(submitted) => {
                created |= submitted.created;
                BatchItemReply {
                    recording_id: shown,
                    accepted: true,
                    job_id: Some(submitted.job_id),
                    existing: Some(!submitted.created),
                    reason: None,
                    code: None,
                }
            }
            Err(error) => {
                let error = ApiError::from(error);
                if error.status.is_server_error() {
                    tracing::warn!(recording = %shown, cause = ?error, "a batch item could not be queued");
                }
                BatchItemReply {
                    recording_id: shown,
                    accepted: false,
                    job_id: None,
                    existing: None,
                    reason: Some(error.message.clone()),
                    code: Some(error.code.to_string()),
                }
            }
        });
    }
    let items: Vec<BatchItemReply> = replies.into_iter().flatten().collect();
    let accepted = items.iter().filter(|item| item.accepted).count();
    let reply =
        BatchReply { success: true, pipeline, total: items.len(), accepted, rejected: items.len() - accepted, items };
    Ok(ok(if created { StatusCode::ACCEPTED } else { StatusCode::OK }, reply))
}
