//! The REST API (ARCHITECTURE.md, "The API"): axum on `PORT` (3001), with the routes the existing frontend
//! and its old worker know, on the real queue and store.
//!
//! Layout: [`Application`] binds and serves; [`ApiState`] is what handlers share; each route file holds one area
//! and exposes `routes()`, merged by [`routes`] (add a file and one `.merge` line); [`error`] is the one error
//! type and its JSON form; [`extract`] the extractors that answer bad input in that form; [`caller`] who is
//! calling; [`layers`] request ids, CORS, the rate limit; [`time`] the timestamps replies carry. Handlers and
//! body types carry `utoipa` annotations, so `GET /openapi.json` is generated from the code.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{Method, StatusCode, Uri};
use axum::response::IntoResponse as _;
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;

use crate::callback::Callbacks;
use crate::config::Settings;
use crate::ending::Endings;
use crate::intake::Intake;
use crate::queue::Queue;
use crate::store::Store;
use crate::time;
use crate::watcher::LiveCatalog;

pub mod caller;
pub mod error;
pub mod extract;
pub mod layers;

mod dashboard;
mod direct;
mod events;
mod health;
mod jobs;
mod legacy;
mod metrics;
mod openapi;
mod pipelines;
mod process;
mod queue;
mod recordings;
mod session;
mod transcript;
mod usage;

use caller::Callers;
use error::ApiError;

/// What every handler can reach. Cheap to clone (everything is shared).
#[derive(Clone)]
pub struct ApiState {
    /// The settings the server started with.
    pub settings: Arc<Settings>,
    /// The job queue.
    pub queue: Arc<dyn Queue>,
    /// The recordings store.
    pub store: Arc<dyn Store>,
    /// The pipelines and plugins, reloaded when their files change.
    pub catalog: Arc<LiveCatalog>,
    /// Queues jobs under the download rules.
    pub intake: Intake,
    /// Who is calling.
    pub callers: Arc<Callers>,
    /// When the server started (for `uptime`).
    pub started_at: Instant,
    /// What `process-direct` runs with, made by its first request.
    pub direct: Arc<tokio::sync::OnceCell<direct::Direct>>,
    /// Reports jobs this API ended without a worker (cancelled while waiting): their rows and callbacks.
    pub endings: Endings,
    /// The per-client rate limit (`server.rate_limit_per_minute`, `server.trusted_proxies`).
    pub limiter: Arc<layers::RateLimiter>,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState").field("catalog", &self.catalog).finish_non_exhaustive()
    }
}

/// The parts the API runs on, made by the wiring (`service`) or a test.
#[derive(Clone)]
pub struct ApiParts {
    /// The job queue.
    pub queue: Arc<dyn Queue>,
    /// The recordings store.
    pub store: Arc<dyn Store>,
    /// The pipelines and plugins.
    pub catalog: Arc<LiveCatalog>,
    /// Sends the callback of a job cancelled before it ran (none: no callbacks from this process).
    pub callbacks: Option<Callbacks>,
}

/// Why the API could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A setting is unusable.
    #[error("{0}")]
    Settings(String),
    /// The address could not be bound.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The address.
        address: String,
        /// Why.
        source: std::io::Error,
    },
    /// The server stopped with an I/O error.
    #[error("the API server failed: {0}")]
    Serve(std::io::Error),
}

/// The API, bound and ready to serve.
pub struct Application {
    listener: tokio::net::TcpListener,
    router: Router,
    address: SocketAddr,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application").field("address", &self.address).finish_non_exhaustive()
    }
}

impl Application {
    /// Builds the state and binds `server.host:server.port` (port 0 picks a free port, as tests do). With no
    /// auth configured, the host is 127.0.0.1 whatever the settings say, and a warning says so.
    ///
    /// # Errors
    /// [`StartError`] for unusable settings or an address that cannot be bound.
    pub async fn build(settings: &Settings, parts: ApiParts) -> Result<Self, StartError> {
        let state = state(settings, parts)?;
        let mut host = settings.server.host.clone();
        if !state.callers.is_configured() {
            let loopback = host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback()) || host == "localhost";
            if !loopback {
                tracing::warn!(
                    configured = %host,
                    "no API auth is configured: listening on 127.0.0.1 only, so that nobody else can queue paid \
                     work or read results (configure auth to listen on {host})"
                );
            }
            host = Ipv4Addr::LOCALHOST.to_string();
        }
        let address = format!("{host}:{}", settings.server.port);
        let listener = tokio::net::TcpListener::bind(&address)
            .await
            .map_err(|source| StartError::Bind { address: address.clone(), source })?;
        let address = listener.local_addr().map_err(|source| StartError::Bind { address, source })?;
        Ok(Self { listener, router: router(state), address })
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.address.port()
    }

    /// The address it listens on.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Serves until `shutdown` fires, then finishes the requests in flight.
    ///
    /// # Errors
    /// [`StartError::Serve`] when the listener fails.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), StartError> {
        tracing::info!(address = %self.address, "API listening");
        axum::serve(self.listener, self.router.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
            .map_err(StartError::Serve)
    }
}

/// The handlers' state from the settings and parts.
///
/// # Errors
/// [`StartError::Settings`] for an unusable download allow-list or auth setting.
pub fn state(settings: &Settings, parts: ApiParts) -> Result<ApiState, StartError> {
    let policy = settings.source_policy().map_err(|e| StartError::Settings(format!("download.allow_private: {e}")))?;
    let callers = Callers::from_settings(settings).map_err(|e| StartError::Settings(e.to_string()))?;
    let proxies = settings
        .server
        .trusted_proxy_ranges()
        .map_err(|e| StartError::Settings(format!("server.trusted_proxies: {e}")))?;
    let limiter = layers::RateLimiter::new(settings.server.rate_limit_per_minute).trusting(proxies);
    let intake = Intake::new(parts.queue.clone(), parts.store.clone(), policy, settings.queue.max_attempts)
        .with_callbacks(settings.callback.secret.is_some());
    Ok(ApiState {
        settings: Arc::new(settings.clone()),
        endings: Endings::new(parts.queue.clone(), parts.store.clone(), parts.callbacks),
        limiter: Arc::new(limiter),
        queue: parts.queue,
        store: parts.store,
        catalog: parts.catalog,
        intake,
        callers: Arc::new(callers),
        started_at: Instant::now(),
        direct: Arc::default(),
    })
}

/// The document's frame; every route adds its own path.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "echo-worker",
        description = "Recordings to transcripts and AI analysis: jobs, recordings, the queue. Errors are \
                       `{ success: false, error, code, details? }`."
    ),
    components(schemas(error::ErrorBody))
)]
struct ApiDoc;

/// Every route with its documentation. Each route file adds one `.merge` line.
fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(health::routes())
        .merge(process::routes())
        .merge(recordings::routes())
        .merge(jobs::routes())
        .merge(queue::routes())
        .merge(transcript::routes())
        .merge(direct::routes())
        .merge(events::routes())
        .merge(pipelines::routes())
        .merge(metrics::routes())
        .merge(openapi::routes())
        .merge(legacy::routes())
        .merge(dashboard::routes())
        .merge(session::routes())
        .merge(usage::routes())
}

/// The OpenAPI document of every route, as `GET /openapi.json` serves it.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let (_, mut document) = routes().split_for_parts();
    document.info.version = env!("CARGO_PKG_VERSION").to_string();
    document
}

/// Where the OpenAPI document is checked in (relative to the repository), beside the file-format schemas.
pub const OPENAPI_FILE: &str = "openapi.json";

/// The OpenAPI document as checked in as `schema/openapi.json`: pretty JSON and a final newline.
pub fn openapi_text() -> String {
    let value = serde_json::to_value(openapi()).unwrap_or_default();
    let mut text = serde_json::to_string_pretty(&value).unwrap_or_default();
    text.push('\n');
    text
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    let path: String = uri.path().chars().filter(|c| !c.is_control()).take(200).collect();
    ApiError::not_found("route_not_found", format!("no route {method} {path}"))
}

async fn wrong_method(method: Method, uri: Uri) -> ApiError {
    let path: String = uri.path().chars().filter(|c| !c.is_control()).take(200).collect();
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", format!("{path} does not take {method}"))
}

/// The whole router with its layers, for [`Application`] (or a test's `oneshot`).
pub fn router(state: ApiState) -> Router {
    let server = &state.settings.server;
    let max_body = usize::try_from(server.max_body_size.0).unwrap_or(usize::MAX);
    let cors = Arc::new(layers::Cors::new(&server.allowed_origins));
    let limiter = state.limiter.clone();
    let open = !state.callers.is_configured();
    let (router, _) = routes().split_for_parts();
    let router = router
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .with_state(state)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(limiter, layers::rate_limit))
        .layer(axum::middleware::from_fn_with_state(cors, layers::cors));
    // An open API answers loopback host names only (DNS rebinding; see `layers`).
    let router = if open { router.layer(axum::middleware::from_fn(layers::loopback_host)) } else { router };
    router.layer(axum::middleware::from_fn(layers::request_id))
}

/// `{ "success": true, … }`: a reply body with `success` first, as the old worker's clients expect.
pub(crate) fn ok(status: StatusCode, body: impl serde::Serialize) -> axum::response::Response {
    let mut value = serde_json::to_value(body).unwrap_or_default();
    if let Some(object) = value.as_object_mut() {
        object.shift_insert(0, "success".into(), serde_json::Value::Bool(true));
    }
    (status, axum::Json(value)).into_response()
}

/// A job id as given: a UUID (the queue makes them), lowercased.
///
/// # Errors
/// 400 `invalid_id` naming the text.
pub(crate) fn job_id(text: &str) -> Result<String, ApiError> {
    uuid::Uuid::try_parse(text).map(|id| id.to_string()).map_err(|_| {
        let shown: String = text.chars().filter(|c| !c.is_control()).take(80).collect();
        ApiError::bad_request("invalid_id", format!("`{shown}` is not a job id: job ids are UUIDs"))
            .with_details(serde_json::json!({ "field": "id" }))
    })
}

/// A recording id as given: 1 to 128 characters of letters, digits and `-_.:`, not dots alone (Supabase row ids
/// are UUIDs).
///
/// # Errors
/// 400 `invalid_id` naming the field.
pub(crate) fn recording_id(text: &str, field: &str) -> Result<String, ApiError> {
    // `.` and `..` alone are path segments a client or proxy removes (`/api/recording/../status`), so no
    // route could reach such a recording.
    let sane = (1..=128).contains(&text.len())
        && text.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        && !text.bytes().all(|b| b == b'.');
    if sane {
        return Ok(text.to_string());
    }
    let shown: String = text.chars().filter(|c| !c.is_control()).take(80).collect();
    Err(ApiError::bad_request(
        "invalid_id",
        format!(
            "`{field}` `{shown}` is not a recording id: use 1 to 128 letters, digits, `-`, `_`, `.` or `:` (not \
             dots alone)"
        ),
    )
    .with_details(serde_json::json!({ "field": field })))
}
