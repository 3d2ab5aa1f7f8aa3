//! `GET /openapi.json`: the OpenAPI 3.1 document of every route, generated from the handlers' `utoipa`
//! annotations when asked (it is small, and building it on demand keeps it true to the running code).

use axum::Json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::ApiState;

pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new().routes(routes!(openapi_json))
}

/// The OpenAPI document of this API.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "meta",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json", body = Object))
)]
async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(super::openapi())
}
