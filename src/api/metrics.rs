//! `GET /metrics`: Prometheus metrics in the OpenMetrics text format: this process's counters
//! ([`crate::metrics`]: stage durations, AI requests, retries, 429s, audio seconds and tokens) and the queue's
//! figures read at scrape time (jobs by state, depth, workers, paused). A queue that does not answer gives
//! `echo_queue_up 0` and the process's counters, not an error, so a scrape still shows what it can.

use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse as _, Response};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::ApiState;
use super::caller::Caller;
use crate::metrics::{self, QueueFigures};

/// How long the queue has to answer a scrape (Prometheus' default scrape timeout is 10 s).
const STATS_WAIT: Duration = Duration::from_secs(3);

pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new().routes(routes!(scrape))
}

/// Prometheus metrics.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "meta",
    responses(
        (status = 200, description = "The OpenMetrics text exposition (`echo_*` families)",
            content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8", body = String),
        (status = 401, description = "No valid credentials", body = super::error::ErrorBody),
    )
)]
async fn scrape(State(state): State<ApiState>, _caller: Caller) -> Response {
    let figures = match tokio::time::timeout(STATS_WAIT, state.queue.stats()).await {
        Ok(Ok(stats)) => Some(QueueFigures {
            counts: stats.counts.iter().map(|(state, count)| (state.name(), *count)).collect(),
            paused: stats.paused,
            workers: stats.workers.len() as u64,
        }),
        Ok(Err(error)) => {
            tracing::warn!(%error, "metrics: the queue's stats could not be read");
            None
        }
        Err(_) => {
            tracing::warn!("metrics: the queue's stats did not come within {STATS_WAIT:?}");
            None
        }
    };
    let mut response = metrics::global().render(figures.as_ref()).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(metrics::CONTENT_TYPE));
    response
}
