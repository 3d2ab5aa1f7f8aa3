//! `GET /api/session`: who the caller is, as far as a client needs to know: whether it may change things
//! (a read-only token may not) and whose recordings it sees. The dashboard asks it first, so that a missing or
//! wrong token shows the login prompt (401) and a read-only one shows no buttons.

use axum::extract::State;
use axum::response::{IntoResponse as _, Response};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::ApiState;
use super::caller::Caller;
use super::error::ErrorBody;

/// `GET /api/session`.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionReply {
    /// Always `true`.
    pub success: bool,
    /// Whether the caller may enqueue, cancel, retry, pause, resume and clean.
    pub can_write: bool,
    /// The user whose recordings alone the caller sees; absent for callers that see every recording.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Whether the server checks credentials at all (without, it listens on loopback only).
    pub auth_configured: bool,
}

pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new().routes(routes!(session))
}

/// What the caller may do and see.
#[utoipa::path(
    get,
    path = "/api/session",
    tag = "session",
    responses(
        (status = 200, description = "The caller's rights", body = SessionReply),
        (status = 401, description = "No valid credentials", body = ErrorBody),
    )
)]
async fn session(State(state): State<ApiState>, caller: Caller) -> Response {
    axum::Json(SessionReply {
        success: true,
        can_write: caller.can_write().is_ok(),
        owner: caller.owner().map(str::to_string),
        auth_configured: state.callers.is_configured(),
    })
    .into_response()
}
