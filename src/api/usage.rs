//! `GET /api/job/{id}/usage`: what a job has spent at the AI providers so far (audio seconds transcribed,
//! prompt and completion tokens, requests), per stage and in all, for the dashboard's job page and for anyone
//! who bills by job. Read from the `usage` that the `whisper`, `analyze` and `prompt` stages put in their outputs:
//! the outputs of the job's last ended attempt (its result, or the report its worker kept), and the checkpoints
//! of stages that finished in an attempt still running, so "so far" includes work done before a failure or a
//! cancel. A stage whose output was restored from a checkpoint did not spend again and is counted once.

use std::collections::BTreeMap;

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
use super::jobs::visible_job;
use super::{ApiState, ok};
use crate::worker::REPORT_KEY;

/// AI spending, of one stage or of the whole job.
#[derive(Debug, Clone, Default, PartialEq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    /// Seconds of audio sent for transcription.
    pub audio_seconds: f64,
    /// Prompt tokens of chat requests.
    pub prompt_tokens: u64,
    /// Completion tokens of chat requests.
    pub completion_tokens: u64,
    /// Requests made to providers.
    pub requests: u64,
}

impl Usage {
    /// The `usage` of one stage output; a `for_each` stage's output is the list of its items' outputs.
    fn of_output(output: &Value) -> Option<Self> {
        if let Some(items) = output.as_array() {
            let parts: Vec<Self> = items.iter().filter_map(Self::of_output).collect();
            return (!parts.is_empty()).then(|| parts.iter().fold(Self::default(), |sum, part| sum.plus(part)));
        }
        let usage = output.get("usage")?.as_object()?;
        let number = |key: &str| usage.get(key).and_then(Value::as_u64).unwrap_or(0);
        Some(Self {
            audio_seconds: usage.get("audio_seconds").and_then(Value::as_f64).unwrap_or(0.0),
            prompt_tokens: number("prompt_tokens"),
            completion_tokens: number("completion_tokens"),
            requests: number("requests"),
        })
    }

    fn plus(&self, other: &Self) -> Self {
        Self {
            audio_seconds: self.audio_seconds + other.audio_seconds,
            prompt_tokens: self.prompt_tokens + other.prompt_tokens,
            completion_tokens: self.completion_tokens + other.completion_tokens,
            requests: self.requests + other.requests,
        }
    }
}

/// `GET /api/job/{id}/usage`.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageReply {
    /// Always `true`.
    pub success: bool,
    /// The job.
    pub job_id: String,
    /// The whole job so far.
    pub usage: Usage,
    /// Each stage that used a provider, by stage id.
    pub stages: BTreeMap<String, Usage>,
}

pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new().routes(routes!(job_usage))
}

/// The stages' usage from the outputs of a job report (`{ stages: { id: { status, output } } }`); restored stages
/// are left out, since their spending was counted by the run that made them.
fn from_report(report: &Value, into: &mut BTreeMap<String, Usage>) {
    let Some(stages) = report.get("stages").and_then(Value::as_object) else { return };
    for (id, stage) in stages {
        if stage.get("status").and_then(Value::as_str) == Some("restored") {
            continue;
        }
        if let Some(usage) = stage.get("output").and_then(Usage::of_output) {
            into.insert(id.clone(), usage);
        }
    }
}

/// What a job has spent at the AI providers so far, per stage and in all.
#[utoipa::path(
    get,
    path = "/api/job/{id}/usage",
    tag = "jobs",
    params(("id" = String, Path, description = "The job id (a UUID)", pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")),
    responses(
        (status = 200, description = "The job's AI usage so far", body = UsageReply),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 404, description = "No such job (or not yours)", body = ErrorBody),
    )
)]
async fn job_usage(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let job = visible_job(&state, &caller, &id).await?;
    let mut checkpoints = state.queue.checkpoints(&job.id).await?;
    let report = checkpoints.remove(REPORT_KEY).map(|output| output.value);
    let mut stages = BTreeMap::new();
    // Checkpoints: stages that finished in the running attempt (or before the last one ended).
    for (stage, output) in &checkpoints {
        if let Some(usage) = Usage::of_output(&output.value) {
            stages.insert(stage.clone(), usage);
        }
    }
    // The last ended attempt's report knows which outputs were restored rather than made.
    for report in [report.as_ref(), job.result.as_ref()].into_iter().flatten() {
        let mut made = BTreeMap::new();
        from_report(report, &mut made);
        stages.extend(made);
    }
    let usage = stages.values().fold(Usage::default(), |sum, stage| sum.plus(stage));
    Ok(ok(StatusCode::OK, UsageReply { success: true, job_id: job.id, usage, stages }))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn usage_is_read_from_outputs_and_summed_over_for_each_items() {
        let whisper = json!({ "text": "…", "usage": { "requests": 3, "audio_seconds": 61.5, "chunks": 3 } });
        assert_eq!(
            Usage::of_output(&whisper),
            Some(Usage { audio_seconds: 61.5, prompt_tokens: 0, completion_tokens: 0, requests: 3 })
        );
        let items = json!([
            { "usage": { "requests": 1, "prompt_tokens": 100, "completion_tokens": 20 } },
            { "usage": { "requests": 2, "prompt_tokens": 50, "completion_tokens": 5 } },
            { "no": "usage" },
        ]);
        assert_eq!(
            Usage::of_output(&items),
            Some(Usage { audio_seconds: 0.0, prompt_tokens: 150, completion_tokens: 25, requests: 3 })
        );
        assert_eq!(Usage::of_output(&json!({ "text": "no provider" })), None);
        assert_eq!(Usage::of_output(&json!([])), None);
    }

    #[test]
    fn restored_stages_are_not_counted_again() {
        let report = json!({ "stages": {
            "transcript": { "status": "restored", "output": { "usage": { "requests": 3, "audio_seconds": 60.0 } } },
            "analysis": { "status": "succeeded", "output": { "usage": { "requests": 1, "prompt_tokens": 900, "completion_tokens": 120 } } },
            "persist": { "status": "succeeded", "output": {} },
        } });
        let mut stages = BTreeMap::new();
        from_report(&report, &mut stages);
        assert_eq!(stages.keys().collect::<Vec<_>>(), ["analysis"]);
    }
}
