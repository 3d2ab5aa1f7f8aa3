//! The `http` plugin kind: one HTTP request built from templates; 5xx, 429, 408 and connection failures are
//! retried (honouring `Retry-After`), other 4xx are not.

use std::sync::Arc;
use std::time::Duration;

use indexmap::IndexMap;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Plugin, PluginAction};
use crate::bounded::{self, BodyError};
use crate::error::ErrorCode;
use crate::job::{StageError, StageOutput};
use crate::stage::{Stage, StageContext};
use crate::template::Renderer;
use crate::units::ByteSize;

/// The `[http]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpSection {
    /// The request method (default `POST`).
    #[serde(default)]
    pub method: HttpMethod,
    /// URL template.
    pub url: String,
    /// Header templates; secrets come from declared `env` names, e.g. `"Bearer {{ env.HOOK_TOKEN }}"`.
    #[serde(default)]
    pub headers: IndexMap<String, String>,
    /// JSON body; every string in it is a template.
    pub json: Option<serde_json::Value>,
}

/// Methods an `http` plugin may use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    /// GET.
    Get,
    /// POST.
    #[default]
    Post,
    /// PUT.
    Put,
    /// PATCH.
    Patch,
    /// DELETE.
    Delete,
}

impl HttpMethod {
    fn as_reqwest(self) -> reqwest::Method {
        match self {
            Self::Get => reqwest::Method::GET,
            Self::Post => reqwest::Method::POST,
            Self::Put => reqwest::Method::PUT,
            Self::Patch => reqwest::Method::PATCH,
            Self::Delete => reqwest::Method::DELETE,
        }
    }
}

/// Sends an `http` plugin's request. The output is `{ "status": code, "body": JSON or text }`.
#[derive(Debug)]
pub struct HttpStage {
    plugin: Arc<Plugin>,
    client: reqwest::Client,
    renderer: Renderer,
    max_response: ByteSize,
}

/// How much of an error response's body a message keeps.
const BODY_TAIL: usize = 500;
/// How much of an error response's body is read at all.
const ERROR_BODY_LIMIT: usize = 64 << 10;

impl HttpStage {
    /// Wraps the plugin with a shared HTTP client; response bodies over `limits.max_response_size`'s default
    /// fail the stage.
    pub fn new(plugin: Arc<Plugin>, client: reqwest::Client) -> Self {
        Self { plugin, client, renderer: Renderer::default(), max_response: crate::config::DEFAULT_MAX_RESPONSE_SIZE }
    }

    /// Sets the largest response body read (`limits.max_response_size`).
    #[must_use]
    pub fn with_max_response(mut self, cap: ByteSize) -> Self {
        self.max_response = cap;
        self
    }
}

#[async_trait::async_trait]
impl Stage for HttpStage {
    async fn run(&self, ctx: StageContext) -> Result<StageOutput, StageError> {
        let PluginAction::Http(section) = &self.plugin.action else {
            return Err(StageError::permanent(ErrorCode::Plugin, format!("plugin `{}` is not http", self.plugin.name)));
        };
        let name = &self.plugin.name;
        let params = self.plugin.params(&ctx.params)?;
        let context = self.plugin.template_context(&ctx, &params);
        let url =
            self.plugin.render_text_async(&self.renderer, &section.url, &context, "http.url", &ctx.cancel).await?;
        let mut headers = HeaderMap::new();
        let mut secrets = Vec::new();
        for (key, template) in &section.headers {
            let location = format!("http.headers.{key}");
            let value =
                self.plugin.render_text_async(&self.renderer, template, &context, &location, &ctx.cancel).await?;
            // Header values built from `env` carry secrets; so may their parts (`Bearer <token>`).
            if template.contains("env.") {
                secrets.push(value.clone());
                secrets.extend(value.split_whitespace().filter(|part| part.len() >= 8).map(str::to_string));
            }
            let header = HeaderName::from_bytes(key.as_bytes()).ok().zip(HeaderValue::from_str(&value).ok());
            let Some((header, mut value)) = header else {
                return Err(StageError::permanent(
                    ErrorCode::InvalidRequest,
                    format!("plugin `{name}`: invalid header `{key}`"),
                ));
            };
            value.set_sensitive(true);
            headers.insert(header, value);
        }
        let mut request = self.client.request(section.method.as_reqwest(), &url).headers(headers);
        if let Some(body) = &section.json {
            let body = self
                .renderer
                .render_async(body, &context, "http.json", &ctx.cancel)
                .await
                .ok_or_else(StageError::cancelled)?
                .map_err(|error| StageError::permanent(ErrorCode::Template, error.to_string()))?;
            request = request.json(&body);
        }
        // Dropping the request future on cancel aborts the connection.
        let response = tokio::select! {
            response = request.send() => response,
            () = ctx.cancel.cancelled() => return Err(StageError::cancelled()),
        };
        // The URL may carry a token in its query, so messages name the plugin, not the URL.
        let response = response.map_err(|error| {
            StageError::transient(
                ErrorCode::HttpConnect,
                format!("plugin `{name}`: request failed: {}", error.without_url()),
            )
        })?;
        let status = response.status();
        let retry_after = retry_after(response.headers());
        if status.is_success() {
            let body = tokio::select! {
                body = bounded::read_body(response, self.max_response, "limits.max_response_size") => body,
                () = ctx.cancel.cancelled() => return Err(StageError::cancelled()),
            };
            let body = body.map_err(|error| match error {
                BodyError::TooLarge { .. } => {
                    StageError::permanent(ErrorCode::ResponseTooLarge, format!("plugin `{name}`: {error}"))
                }
                BodyError::Read(_) => StageError::transient(ErrorCode::HttpBody, format!("plugin `{name}`: {error}")),
            })?;
            let body = serde_json::from_slice(&body)
                .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&body).into_owned()));
            return Ok(StageOutput::from(serde_json::json!({ "status": status.as_u16(), "body": body })));
        }
        let text = tokio::select! {
            text = bounded::read_prefix(response, ERROR_BODY_LIMIT) => String::from_utf8_lossy(&text).into_owned(),
            () = ctx.cancel.cancelled() => return Err(StageError::cancelled()),
        };
        // A server that echoes the request must not put the plugin's secret headers into the report.
        let text = bounded::scrub(&text, secrets.iter().map(String::as_str), BODY_TAIL);
        let message = format!("plugin `{name}`: the server answered {status}: {text}");
        if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
            Err(StageError::transient(ErrorCode::HttpStatus, message).with_retry_after(retry_after))
        } else {
            Err(StageError::permanent(ErrorCode::HttpStatus, message))
        }
    }
}

/// `Retry-After` in seconds (HTTP dates are rare from APIs and are ignored, falling back to the backoff).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let seconds: f64 = headers.get(RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()?;
    (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds.min(3600.0)))
}
