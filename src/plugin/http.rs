//! The `http` plugin kind: one HTTP request built from templates; 5xx, 429, 408 and connection failures are
//! retried (honouring `Retry-After`), other 4xx are not. The request goes through the checked client of
//! [`crate::net`]: internal addresses refused unless allow-listed, every redirect checked, the plugin's
//! headers kept from other origins, no `Referer`.

use std::sync::Arc;
use std::time::Duration;

use indexmap::IndexMap;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Plugin, PluginAction};
use crate::bounded::{self, BodyError};
use crate::error::ErrorCode;
use crate::job::{StageError, StageOutput};
use crate::net::{HttpClient, NetError, Outgoing};
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
    client: HttpClient,
    renderer: Renderer,
    max_response: ByteSize,
}

/// How much of an error response's body a message keeps.
const BODY_TAIL: usize = 500;
/// How much of an error response's body is read at all.
const ERROR_BODY_LIMIT: usize = 64 << 10;

impl HttpStage {
    /// Wraps the plugin with a shared checked HTTP client; response bodies over `limits.max_response_size`'s default
    /// fail the stage.
    pub fn new(plugin: Arc<Plugin>, client: HttpClient) -> Self {
        Self { plugin, client, renderer: Renderer::default(), max_response: crate::bounded::DEFAULT_MAX_RESPONSE_SIZE }
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
        // The URL may carry a token in its query, so messages name the plugin, not the URL.
        let url = reqwest::Url::parse(&url).map_err(|error| {
            StageError::permanent(
                ErrorCode::InvalidRequest,
                format!("plugin `{name}`: the URL template gave no valid URL: {error}"),
            )
        })?;
        let mut body = None;
        if let Some(json) = &section.json {
            let json = self
                .renderer
                .render_async(json, &context, "http.json", &ctx.cancel)
                .await
                .ok_or_else(StageError::cancelled)?
                .map_err(|error| StageError::permanent(ErrorCode::Template, error.to_string()))?;
            let bytes = serde_json::to_vec(&json)
                .map_err(|error| StageError::permanent(ErrorCode::Template, format!("plugin `{name}`: {error}")))?;
            if !headers.contains_key(CONTENT_TYPE) {
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            }
            body = Some(bytes);
        }
        let request = Outgoing { method: section.method.as_reqwest(), url, headers, body };
        // Dropping the request future on cancel aborts the connection.
        let (response, _) = self.client.send(request, &ctx.cancel).await.map_err(|error| match error {
            NetError::Refused { reason, .. } => {
                StageError::permanent(ErrorCode::AddressRefused, format!("plugin `{name}`: request refused: {reason}"))
            }
            NetError::Network { message, .. } => {
                StageError::transient(ErrorCode::HttpConnect, format!("plugin `{name}`: request failed: {message}"))
            }
            NetError::Cancelled => StageError::cancelled(),
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
