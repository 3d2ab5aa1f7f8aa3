//! `GET /health`: whether this server and what it depends on answer, for load balancers and the old deploy's
//! checks (status, uptime, environment, version). 503 when the queue or the database does not answer within
//! [`PROBE_WAIT`], with the same body plus the error fields, so a probe and a person both see which one.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse as _, Response};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiState, time};
use crate::queue::QueueError;

/// How long each dependency has to answer: a probe that waits longer than a load balancer's own timeout helps
/// nobody.
const PROBE_WAIT: Duration = Duration::from_secs(2);

/// One dependency's answer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Check {
    /// Whether it answered.
    pub ok: bool,
    /// What it is (`redis`, `memory`, `sqlite`, `postgres`).
    pub kind: String,
    /// Why it did not answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The dependencies.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Checks {
    /// The job queue.
    pub queue: Check,
    /// The recordings database.
    pub database: Check,
}

/// `GET /health`.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    /// `healthy` or `unhealthy`.
    pub status: String,
    /// Now (RFC 3339).
    pub timestamp: String,
    /// Seconds since the server started.
    pub uptime: f64,
    /// The echo-worker version.
    pub version: String,
    /// `NODE_ENV`.
    pub environment: String,
    /// Each dependency.
    pub checks: Checks,
    /// When unhealthy: which dependency does not answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When unhealthy: `service_unavailable`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new().routes(routes!(health))
}

async fn probe<T, E: std::fmt::Display>(kind: &str, call: impl Future<Output = Result<T, E>>) -> Check {
    // The reply says only that it failed; the cause (which may name hosts) goes to the log.
    let error = match tokio::time::timeout(PROBE_WAIT, call).await {
        Ok(Ok(_)) => None,
        Ok(Err(error)) => {
            tracing::warn!(dependency = kind, %error, "health probe failed");
            Some("it answered with an error".to_string())
        }
        Err(_) => {
            tracing::warn!(dependency = kind, "health probe got no answer within {PROBE_WAIT:?}");
            Some(format!("no answer within {} s", PROBE_WAIT.as_secs()))
        }
    };
    Check { ok: error.is_none(), kind: kind.to_string(), error }
}

/// Whether the server, its queue and its database answer.
#[utoipa::path(
    get,
    path = "/health",
    tag = "health",
    responses(
        (status = 200, description = "Everything answers", body = Health),
        (status = 503, description = "The queue or the database does not answer", body = Health),
    )
)]
async fn health(State(state): State<ApiState>) -> Response {
    let queue_kind = if state.settings.redis.url.is_some() { "redis" } else { "memory" };
    let database_kind =
        if state.settings.database.url.expose().starts_with("postgres") { "postgres" } else { "sqlite" };
    // A lookup of an id that cannot exist: one cheap round trip to each.
    let (queue, database) = tokio::join!(
        probe(queue_kind, async { state.queue.get("health-probe").await.map_err(|e: QueueError| e) }),
        probe(database_kind, state.store.get("health-probe")),
    );
    let down: Vec<&str> = [("queue", &queue), ("database", &database)]
        .into_iter()
        .filter(|(_, check)| !check.ok)
        .map(|(name, _)| name)
        .collect();
    let healthy = down.is_empty();
    let body = Health {
        status: if healthy { "healthy" } else { "unhealthy" }.into(),
        timestamp: time::rfc3339(time::now_ms()),
        uptime: (state.started_at.elapsed().as_millis() as f64) / 1000.0,
        version: env!("CARGO_PKG_VERSION").into(),
        environment: state.settings.environment.clone(),
        checks: Checks { queue, database },
        error: (!healthy).then(|| format!("the {} does not answer", down.join(" and the "))),
        code: (!healthy).then(|| "service_unavailable".to_string()),
    };
    let status = if healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let mut value = serde_json::to_value(body).unwrap_or_default();
    if let Some(object) = value.as_object_mut() {
        object.shift_insert(0, "success".into(), serde_json::Value::Bool(healthy));
    }
    let mut response = (status, axum::Json(value)).into_response();
    if !healthy {
        response.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static("5"));
    }
    response
}
