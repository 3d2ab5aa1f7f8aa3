//! `GET /api/pipelines`, `GET /api/pipelines/:name` and `POST /api/pipelines/validate`: the pipelines this
//! server runs (from the live catalog, so an edit on disk shows once it is loaded), each stage with its kind and
//! parameters and the DAG as Mermaid; and a check of a pipeline or plugin file before it is saved, answered with
//! every problem at `file:line:column` exactly as `echo-worker validate` prints them (ARCHITECTURE.md, "The
//! API").
//!
//! Paths on the server's disk are never shown: a pipeline's file is named by its file name alone.

use std::path::PathBuf;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::ApiState;
use super::caller::Caller;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiPath, ApiQuery};
use crate::catalog::Catalog;
use crate::document::{Diagnostic, Document};
use crate::pipeline::compile::compile;
use crate::pipeline::{Pipeline, StageSpec};
use crate::plugin::{Plugin, PluginSet};
use crate::stage::StageKind;
use crate::units::HumanDuration;

pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new().routes(routes!(list)).routes(routes!(validate)).routes(routes!(detail))
}

/// One pipeline in the list.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PipelineSummary {
    /// The name to pass as `pipeline`.
    pub name: String,
    /// One line for people.
    pub description: Option<String>,
    /// The file name (`meeting.toml`).
    pub file: String,
    /// The stage ids, in the order they can run.
    pub stages: Vec<String>,
}

/// A plugin (a stage kind declared in `plugins/`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PluginSummary {
    /// The name stages put in `uses`.
    pub name: String,
    /// `prompt`, `command` or `http`.
    pub kind: String,
    /// One line for people.
    pub description: Option<String>,
}

/// `GET /api/pipelines`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PipelineList {
    /// Always `true`.
    pub success: bool,
    /// Every pipeline, in file-name order.
    pub pipelines: Vec<PipelineSummary>,
    /// Every plugin, in file-name order.
    pub plugins: Vec<PluginSummary>,
}

/// A stage's retry policy, defaults filled in.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryView {
    /// Attempts in all, including the first.
    pub max_attempts: u32,
    /// Wait before the first retry (`2s`).
    pub initial_interval: String,
    /// Growth factor of the wait.
    pub backoff_coefficient: f64,
    /// Longest wait.
    pub max_interval: String,
}

/// One stage, every default filled in.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StageView {
    /// The stage id.
    pub id: String,
    /// What `uses` names.
    pub uses: String,
    /// `builtin`, `plugin` or `custom` (registered in code).
    pub kind: String,
    /// For a plugin: `prompt`, `command` or `http`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plugin_kind: Option<String>,
    /// The plugin's description.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Stages that must finish first.
    pub needs: Vec<String>,
    /// The parameters (`with`), templates unrendered.
    #[schema(value_type = Object)]
    pub with: Value,
    /// The `if` expression.
    #[serde(rename = "if")]
    pub condition: Option<String>,
    /// `all_success`, `all_done` or `none_failed`.
    pub trigger: String,
    /// The `for_each` expression.
    pub for_each: Option<String>,
    /// `for_each` items run at once.
    pub max_parallel: u32,
    /// Time allowed for one attempt (`30m`).
    pub timeout: String,
    /// How failed attempts are retried.
    pub retry: RetryView,
    /// Share of the job's progress bar.
    pub weight: u32,
    /// `fail` or `continue`.
    pub on_failure: String,
}

/// A pipeline in full.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PipelineView {
    /// The name.
    pub name: String,
    /// One line for people.
    pub description: Option<String>,
    /// The file name.
    pub file: String,
    /// The stages, in the order they can run.
    pub stages: Vec<StageView>,
    /// The DAG as a Mermaid flowchart.
    pub mermaid: String,
}

/// `GET /api/pipelines/{name}`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PipelineDetail {
    /// Always `true`.
    pub success: bool,
    /// The pipeline.
    pub pipeline: PipelineView,
}

/// One problem of a checked file.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Problem {
    /// The file as named in messages (`pipelines/NAME.toml`).
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
    /// A stable class (`unknown_key`, `cycle`, …).
    pub code: String,
    /// A sentence naming the key, stage or value.
    pub message: String,
    /// The whole line as `echo-worker validate` prints it (`file:line:column: message`).
    pub text: String,
}

impl Problem {
    fn from_diagnostic(diagnostic: &Diagnostic) -> Self {
        Self {
            file: diagnostic.file.display().to_string(),
            line: diagnostic.line,
            column: diagnostic.column,
            code: diagnostic.code.to_string(),
            message: diagnostic.message.clone(),
            text: diagnostic.to_string(),
        }
    }
}

/// `POST /api/pipelines/validate` for a valid file.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Validated {
    /// Always `true`.
    pub success: bool,
    /// Always `true`.
    pub valid: bool,
    /// `pipeline` or `plugin`.
    pub kind: String,
    /// The name it was checked under.
    pub name: String,
    /// For a pipeline: the stage ids in the order they can run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stages: Option<Vec<String>>,
    /// For a pipeline: the DAG as Mermaid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mermaid: Option<String>,
}

/// The `details` of a 422 from `POST /api/pipelines/validate`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct InvalidDetails {
    /// Always `false`.
    pub valid: bool,
    /// `pipeline` or `plugin`.
    pub kind: String,
    /// The name it was checked under.
    pub name: String,
    /// Every problem, in file order.
    pub errors: Vec<Problem>,
}

/// What the body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    /// A `pipelines/NAME.toml`.
    Pipeline,
    /// A `plugins/NAME.toml`.
    Plugin,
}

impl FileKind {
    const fn name(self) -> &'static str {
        match self {
            Self::Pipeline => "pipeline",
            Self::Plugin => "plugin",
        }
    }
}

/// How to check the body.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ValidateQuery {
    /// `pipeline` or `plugin`; by default a file with a top-level `kind` and no `stages` is a plugin.
    pub kind: Option<FileKind>,
    /// The file name without `.toml` (the `name` in the file must equal it); by default the file's own `name`.
    pub name: Option<String>,
}

/// A pipeline or plugin name: what a file stem may be.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

fn file_name(path: &std::path::Path) -> String {
    path.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default()
}

fn kind_of(kind: &StageKind) -> &'static str {
    match kind {
        StageKind::Builtin(_) => "builtin",
        StageKind::Plugin(_) => "plugin",
        StageKind::Custom(_) => "custom",
    }
}

fn stage_view(catalog: &Catalog, stage: &StageSpec) -> StageView {
    let plugin = match &stage.uses {
        StageKind::Plugin(name) => catalog.plugins.get(name),
        _ => None,
    };
    StageView {
        id: stage.id.clone(),
        uses: stage.uses.name().to_string(),
        kind: kind_of(&stage.uses).to_string(),
        plugin_kind: plugin.map(|plugin| plugin.kind.name().to_string()),
        description: plugin.and_then(|plugin| plugin.description.clone()),
        needs: stage.needs.clone(),
        with: serde_json::to_value(&stage.with).unwrap_or(Value::Null),
        condition: stage.condition.clone(),
        trigger: snake(&stage.trigger),
        for_each: stage.for_each.clone(),
        max_parallel: stage.max_parallel,
        timeout: HumanDuration(stage.timeout).to_string(),
        retry: RetryView {
            max_attempts: stage.retry.max_attempts,
            initial_interval: HumanDuration(stage.retry.initial_interval).to_string(),
            backoff_coefficient: stage.retry.backoff_coefficient,
            max_interval: HumanDuration(stage.retry.max_interval).to_string(),
        },
        weight: stage.weight,
        on_failure: snake(&stage.on_failure),
    }
}

/// The snake_case name serde gives a unit enum variant (`all_success`, `continue`).
fn snake<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

fn mermaid(pipeline: &Pipeline) -> String {
    let label = |id: &str| pipeline.stage(id).map(|stage| stage.uses.name().to_string()).unwrap_or_default();
    pipeline.graph.to_mermaid(label)
}

fn pipeline_view(catalog: &Catalog, pipeline: &Pipeline) -> PipelineView {
    PipelineView {
        name: pipeline.name.clone(),
        description: pipeline.description.clone(),
        file: file_name(&pipeline.file),
        stages: pipeline.stages.iter().map(|stage| stage_view(catalog, stage)).collect(),
        mermaid: mermaid(pipeline),
    }
}

fn ok<T: Serialize>(status: StatusCode, body: &T) -> Response {
    use axum::response::IntoResponse as _;
    (status, axum::Json(body)).into_response()
}

/// The pipelines and plugins this server runs.
#[utoipa::path(
    get,
    path = "/api/pipelines",
    tag = "pipelines",
    responses(
        (status = 200, description = "Every pipeline and plugin", body = PipelineList),
        (status = 401, description = "No valid credentials", body = ErrorBody),
    )
)]
async fn list(State(state): State<ApiState>, _caller: Caller) -> Response {
    let catalog = state.catalog.current();
    let pipelines = catalog
        .pipelines
        .values()
        .map(|pipeline| PipelineSummary {
            name: pipeline.name.clone(),
            description: pipeline.description.clone(),
            file: file_name(&pipeline.file),
            stages: pipeline.stages.iter().map(|stage| stage.id.clone()).collect(),
        })
        .collect();
    let plugins = catalog
        .plugins
        .values()
        .map(|plugin| PluginSummary {
            name: plugin.name.clone(),
            kind: plugin.kind.name().to_string(),
            description: plugin.description.clone(),
        })
        .collect();
    ok(StatusCode::OK, &PipelineList { success: true, pipelines, plugins })
}

/// One pipeline: its stages with their kinds and parameters, and its DAG as Mermaid.
#[utoipa::path(
    get,
    path = "/api/pipelines/{name}",
    tag = "pipelines",
    params(("name" = String, Path, description = "The pipeline's name")),
    responses(
        (status = 200, description = "The pipeline", body = PipelineDetail),
        (status = 401, description = "No valid credentials", body = ErrorBody),
        (status = 404, description = "No such pipeline; `details.available` lists the known ones", body = ErrorBody),
    )
)]
async fn detail(
    State(state): State<ApiState>,
    _caller: Caller,
    ApiPath(name): ApiPath<String>,
) -> Result<Response, ApiError> {
    let catalog = state.catalog.current();
    let pipeline = catalog.pipeline(&name).map_err(|unknown| {
        let shown: String = unknown.name.chars().filter(|c| !c.is_control()).take(80).collect();
        let unknown = crate::catalog::UnknownPipeline { name: shown, ..unknown };
        ApiError::not_found("pipeline_not_found", unknown.to_string()).with_details(json!({
            "pipeline": unknown.name,
            "available": unknown.known,
            "suggestion": unknown.suggestion,
        }))
    })?;
    Ok(ok(StatusCode::OK, &PipelineDetail { success: true, pipeline: pipeline_view(&catalog, pipeline) }))
}

/// The media types a TOML body may come as.
fn is_toml(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    matches!(essence.as_str(), "application/toml" | "text/x-toml" | "text/toml" | "text/plain")
}

/// Checks a pipeline or plugin file (the body, as TOML) against this server's plugins and builtins.
#[utoipa::path(
    post,
    path = "/api/pipelines/validate",
    tag = "pipelines",
    params(ValidateQuery),
    request_body(content = String, content_type = "application/toml",
        description = "The whole file, as it would be saved (`text/plain` is accepted too)"),
    responses(
        (status = 200, description = "The file is valid", body = Validated),
        (status = 400, description = "The body is not UTF-8 text, or a query parameter is bad", body = ErrorBody),
        (status = 401, description = "No valid credentials", body = ErrorBody),
        (status = 413, description = "The body is larger than server.max_body_size", body = ErrorBody),
        (status = 415, description = "The body is not sent as TOML or plain text", body = ErrorBody),
        (status = 422, description = "The file has problems: `details` is an InvalidDetails listing every one \
            at line:column", body = ErrorBody),
    )
)]
async fn validate(
    State(state): State<ApiState>,
    _caller: Caller,
    ApiQuery(query): ApiQuery<ValidateQuery>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|value| value.to_str().ok());
    if !content_type.is_some_and(is_toml) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the file as the body, with the header Content-Type: application/toml (or text/plain)",
        ));
    }
    let bytes = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "the body is larger than this server accepts (server.max_body_size)",
            )
        } else {
            ApiError::bad_request("unreadable_body", format!("the body could not be read: {}", rejection.body_text()))
        }
    })?;
    let text = String::from_utf8(bytes.to_vec()).map_err(|error| {
        ApiError::bad_request(
            "invalid_encoding",
            format!("the body is not UTF-8 text: invalid byte at offset {}", error.utf8_error().valid_up_to()),
        )
    })?;
    if let Some(name) = &query.name
        && !valid_name(name)
    {
        let shown: String = name.chars().filter(|c| !c.is_control()).take(80).collect();
        return Err(ApiError::bad_request(
            "invalid_query",
            format!(
                "query parameter `name` `{shown}` is not a file name: use 1 to 64 lowercase letters, digits, `_` and \
                 `-`, starting with a letter"
            ),
        )
        .with_details(json!({ "field": "name" })));
    }
    // The file's own keys, when it parses, decide the defaults; a file that does not parse is reported by the
    // checks below with its position.
    let table = text.parse::<toml::Table>().ok();
    let kind = query.kind.unwrap_or_else(|| match &table {
        Some(table) if table.contains_key("kind") && !table.contains_key("stages") => FileKind::Plugin,
        _ => FileKind::Pipeline,
    });
    let own_name = table
        .as_ref()
        .and_then(|table| table.get("name"))
        .and_then(toml::Value::as_str)
        .filter(|name| valid_name(name))
        .map(str::to_string);
    let name = query.name.clone().or(own_name).unwrap_or_else(|| "untitled".to_string());
    let folder = match kind {
        FileKind::Pipeline => "pipelines",
        FileKind::Plugin => "plugins",
    };
    let document = Document::new(PathBuf::from(format!("{folder}/{name}.toml")), text);
    let catalog = state.catalog.current();
    let checked = match kind {
        FileKind::Pipeline => {
            let plugins = PluginSet { plugins: catalog.plugins.clone(), ..PluginSet::default() };
            compile(&document, &plugins, &[]).map(|pipeline| {
                let stages = pipeline.stages.iter().map(|stage| stage.id.clone()).collect();
                (Some(stages), Some(mermaid(&pipeline)))
            })
        }
        FileKind::Plugin => Plugin::load(&document).map(|_| (None, None)),
    };
    match checked {
        Ok((stages, mermaid)) => Ok(ok(
            StatusCode::OK,
            &Validated { success: true, valid: true, kind: kind.name().into(), name, stages, mermaid },
        )),
        Err(diagnostics) => {
            let errors: Vec<Problem> = diagnostics.iter().map(Problem::from_diagnostic).collect();
            let count = errors.len();
            let message = format!(
                "{count} problem{} in {folder}/{name}.toml: {}",
                if count == 1 { "" } else { "s" },
                errors.first().map(|problem| problem.text.as_str()).unwrap_or_default()
            );
            let details = InvalidDetails { valid: false, kind: kind.name().into(), name, errors };
            Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_definition", message)
                .with_details(serde_json::to_value(details).unwrap_or(Value::Null)))
        }
    }
}
