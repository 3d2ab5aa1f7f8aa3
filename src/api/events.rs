//! `GET /api/job/:id/events`: a job's state changes, stage events and progress as server-sent events, read from
//! the queue's event stream (ARCHITECTURE.md, "The API").
//!
//! Each SSE event's `id` is the stream id of the queue event, so a client that reconnects with `Last-Event-ID`
//! (or `?lastEventId=`, for clients that cannot set headers) resumes right after the last event it saw and misses
//! nothing the stream still holds (the stream is capped at `queue.max_events` for all jobs together). The
//! stream ends after the job's final state (`completed`, `failed`, `cancelled`); a reconnect after that final
//! event is answered 204, which tells an `EventSource` to stop reconnecting.
//!
//! Waiting never spins: each read blocks in the queue (`XREAD BLOCK` on a connection of its own for Redis, a
//! notification for the memory queue) for up to [`READ_WAIT`], and a client that goes away drops its read.
//! Every [`RECHECK`] the job itself is read too, so a final state whose event the capped stream lost still
//! ends the stream (with an event that has no id).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse as _, Response};
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::caller::Caller;
use super::error::ApiError;
use super::extract::{ApiPath, ApiQuery};
use super::jobs::visible_job;
use super::{ApiState, time};
use crate::queue::{Event, EventKind, Job, Queue, QueueError};

/// How long one read blocks in the queue before the job is looked at again: short enough that a stream whose
/// final event was trimmed away ends soon, long enough that an idle stream costs one read per this long.
const READ_WAIT: Duration = Duration::from_secs(5);
/// How often the job itself is read while its events keep coming (to notice a final state the stream lost).
const RECHECK: Duration = Duration::from_secs(5);
/// Events read from the queue per call.
const BATCH: usize = 256;
/// Batches read at most when catching up to the stream's end before deciding that a final event is gone
/// (the stream holds 10,000 events by default: 40 batches).
const MAX_CATCH_UP: usize = 64;
/// A comment line at least this often keeps proxies from closing an idle stream (the SSE convention is 15–30 s).
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// How long a client waits before reconnecting after the connection drops (the `retry:` field).
const RECONNECT: Duration = Duration::from_secs(2);

pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new().routes(routes!(job_events))
}

/// Where to resume.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Resume after this event id (as `Last-Event-ID` does; the header wins when both are given).
    pub last_event_id: Option<String>,
}

/// Live progress, as a `progress` event carries it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProgressData {
    /// 0 to 100.
    pub percent: u8,
    /// The stage that reported last.
    pub stage: Option<String>,
    /// A short human message.
    pub message: String,
}

/// The `data:` of every event (JSON). `event:` is the same as `type`.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobEvent {
    /// `state`, `stage` or `progress`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The job.
    pub job_id: String,
    /// When it happened (RFC 3339).
    pub at: String,
    /// `state` events: the new state (`waiting`, `delayed`, `active`, `completed`, `failed`, `cancelled`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// `state` events: why (failures, retries, stalls, cancels).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// `stage` events: the stage id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// `stage` events: `running`, `succeeded`, `failed`, `skipped` or `restored`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// `progress` events: the job's progress.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<ProgressData>,
}

impl JobEvent {
    fn from_queue(event: &Event) -> Self {
        let mut data = Self {
            kind: String::new(),
            job_id: event.job_id.clone(),
            at: time::rfc3339(event.at),
            state: None,
            reason: None,
            stage: None,
            status: None,
            progress: None,
        };
        match &event.kind {
            EventKind::State { state, reason } => {
                data.kind = "state".into();
                data.state = Some(state.name().into());
                data.reason.clone_from(reason);
            }
            EventKind::Stage { stage, status } => {
                data.kind = "stage".into();
                data.stage = Some(stage.clone());
                data.status = Some(status.clone());
            }
            EventKind::Progress(progress) => {
                data.kind = "progress".into();
                data.progress = Some(ProgressData {
                    percent: progress.percent,
                    stage: progress.stage.clone(),
                    message: progress.message.clone(),
                });
            }
        }
        data
    }

    /// The final state of a job whose own event the stream no longer holds.
    fn final_state(job: &Job) -> Self {
        Self {
            kind: "state".into(),
            job_id: job.id.clone(),
            at: time::rfc3339(job.finished_at.unwrap_or(job.created_at)),
            state: Some(job.state.name().into()),
            reason: job.error.clone(),
            stage: None,
            status: None,
            progress: None,
        }
    }

    fn sse(&self, id: Option<&str>) -> SseEvent {
        let event = SseEvent::default().event(self.kind.clone());
        let event = match id {
            Some(id) => event.id(id),
            None => event,
        };
        // A struct of strings and numbers always serializes.
        event.json_data(self).unwrap_or_else(|_| SseEvent::default().comment("unserializable event"))
    }
}

/// A job's events as server-sent events.
#[utoipa::path(
    get,
    path = "/api/job/{id}/events",
    tag = "jobs",
    params(
        ("id" = String, Path, description = "The job id (a UUID)"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id (`<ms>-<seq>`)"),
        EventsQuery,
    ),
    responses(
        (status = 200, description = "An event stream (`text/event-stream`): `event:` is `state`, `stage` or \
            `progress`, `id:` the queue's stream id, `data:` a JobEvent as JSON. Comment lines keep it alive; \
            it ends after the job's final state.", content_type = "text/event-stream", body = String),
        (status = 204, description = "Resumed after the job's final event: nothing more will come"),
        (status = 400, description = "A malformed job id or event id", body = super::error::ErrorBody),
        (status = 404, description = "No such job (or not yours)", body = super::error::ErrorBody),
        (status = 503, description = "The queue does not answer", body = super::error::ErrorBody),
    )
)]
async fn job_events(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<EventsQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let job = visible_job(&state, &caller, &id).await?;
    let header = match headers.get("last-event-id") {
        Some(value) => Some(
            value.to_str().map_err(|_| invalid_event_id("the Last-Event-ID header", "(not text)"))?.trim().to_string(),
        ),
        None => None,
    };
    let (resume, from) = match (header.filter(|id| !id.is_empty()), query.last_event_id) {
        (Some(id), _) => (Some(event_id(&id, "the Last-Event-ID header")?), true),
        (None, Some(id)) => (Some(event_id(&id, "the lastEventId query parameter")?), true),
        // Every event of the job comes after it was created (both times are the queue's clock).
        (None, None) => (Some(job.created_at.saturating_sub(1).to_string()), false),
    };
    let mut follow = Follow::new(state.queue.clone(), job.id.clone(), resume);
    if from && job.state.is_final() {
        // A client resuming after the final event is told to stop reconnecting.
        follow.catch_up().await?;
        if follow.pending.is_empty() {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
    }
    let hint = futures_util::stream::once(async { Ok(SseEvent::default().retry(RECONNECT)) });
    let stream = futures_util::StreamExt::chain(hint, follow.into_stream());
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE).text("keep-alive")).into_response())
}

fn invalid_event_id(place: &str, shown: &str) -> ApiError {
    ApiError::bad_request(
        "invalid_event_id",
        format!("{place} `{shown}` is not an event id: event ids look like 1700000000000-0"),
    )
    .with_details(
        serde_json::json!({ "field": if place.contains("header") { "Last-Event-ID" } else { "lastEventId" } }),
    )
}

/// An event id as the queue makes them: `<ms>` or `<ms>-<seq>`, digits only.
fn event_id(text: &str, place: &str) -> Result<String, ApiError> {
    let digits = |part: &str| !part.is_empty() && part.len() <= 20 && part.bytes().all(|b| b.is_ascii_digit());
    let mut parts = text.splitn(2, '-');
    let valid = parts.next().is_some_and(digits) && parts.next().is_none_or(digits);
    if valid && text.split('-').all(|part| part.parse::<u64>().is_ok()) {
        Ok(text.to_string())
    } else {
        let shown: String = text.chars().filter(|c| !c.is_control()).take(60).collect();
        Err(invalid_event_id(place, &shown))
    }
}

/// Follows one job through the queue's event stream.
struct Follow {
    queue: Arc<dyn Queue>,
    job_id: String,
    /// The last stream id read (of any job).
    after: Option<String>,
    /// Events of the job read but not sent yet, with their stream ids.
    pending: VecDeque<(Option<String>, JobEvent)>,
    /// The job's final state is in `pending`: end after it.
    done: bool,
    last_check: Instant,
}

impl Follow {
    fn new(queue: Arc<dyn Queue>, job_id: String, after: Option<String>) -> Self {
        Self { queue, job_id, after, pending: VecDeque::new(), done: false, last_check: Instant::now() }
    }

    /// Takes this job's events from a batch; true when the batch was full (more may follow at once).
    fn absorb(&mut self, events: Vec<Event>) -> bool {
        let full = events.len() >= BATCH;
        for event in events {
            self.after = Some(event.id.clone());
            if event.job_id != self.job_id || self.done {
                continue;
            }
            if matches!(event.kind, EventKind::State { state, .. } if state.is_final()) {
                self.done = true;
            }
            self.pending.push_back((Some(event.id.clone()), JobEvent::from_queue(&event)));
        }
        full
    }

    /// Reads without waiting up to the stream's end (bounded), keeping this job's events.
    async fn catch_up(&mut self) -> Result<(), QueueError> {
        for _ in 0..MAX_CATCH_UP {
            let events = self.queue.events(self.after.as_deref(), BATCH, Duration::ZERO).await?;
            if !self.absorb(events) || self.done {
                break;
            }
        }
        Ok(())
    }

    /// One blocking read, then a look at the job when due. Errors end the stream (the client reconnects with
    /// the last id it saw).
    async fn advance(&mut self) -> Result<(), QueueError> {
        let events = self.queue.events(self.after.as_deref(), BATCH, READ_WAIT).await?;
        let mine = self.pending.len();
        let full = self.absorb(events);
        let quiet = self.pending.len() == mine && !full;
        if self.done || !(quiet || self.last_check.elapsed() >= RECHECK) {
            return Ok(());
        }
        self.last_check = Instant::now();
        match self.queue.get(&self.job_id).await? {
            // Cleaned while followed: nothing more will come.
            None => self.done = true,
            Some(job) if job.state.is_final() => {
                // Its final event was written with the state change, so it is in the stream now, unless trimmed.
                self.catch_up().await?;
                if !self.done {
                    self.pending.push_back((None, JobEvent::final_state(&job)));
                    self.done = true;
                }
            }
            Some(_) => {}
        }
        Ok(())
    }

    fn into_stream(self) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send {
        futures_util::stream::unfold(self, |mut follow| async move {
            loop {
                if let Some((id, event)) = follow.pending.pop_front() {
                    return Some((Ok(event.sse(id.as_deref())), follow));
                }
                if follow.done {
                    return None;
                }
                if let Err(error) = follow.advance().await {
                    tracing::warn!(job = %follow.job_id, %error, "reading the event stream failed; ending the SSE stream");
                    return None;
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_are_stream_ids_and_anything_else_is_named() {
        assert_eq!(event_id("1700000000000-0", "h").unwrap(), "1700000000000-0");
        assert_eq!(event_id("1700000000000", "h").unwrap(), "1700000000000");
        for bad in ["", "-", "abc", "1-2-3", "1700000000000-", "-5", "99999999999999999999999"] {
            let error = event_id(bad, "the Last-Event-ID header").unwrap_err();
            assert_eq!((error.status, error.code), (StatusCode::BAD_REQUEST, "invalid_event_id"), "{bad}");
        }
    }

    #[test]
    fn a_progress_event_carries_the_job_and_its_percent() {
        let event = Event {
            id: "5-1".into(),
            job_id: "j".into(),
            at: 0,
            kind: EventKind::Progress(crate::queue::Progress {
                percent: 40,
                stage: Some("whisper".into()),
                message: "chunk 2/5".into(),
            }),
        };
        let data = serde_json::to_value(JobEvent::from_queue(&event)).unwrap();
        assert_eq!(data["type"], "progress");
        assert_eq!(data["jobId"], "j");
        assert_eq!(data["progress"]["percent"], 40);
        assert!(data.get("state").is_none());
    }
}
