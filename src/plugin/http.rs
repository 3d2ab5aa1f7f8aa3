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
use crate::net::{HttpClient, NetError, Outgoing};
use crate::pipeline::template::Renderer;
use crate::stage::{Stage, StageContext, StageError, StageOutput};

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
}

/// How much of an error response's body a message keeps.
const BODY_TAIL: usize = 500;

impl HttpStage {
    /// Wraps the plugin with the shared checked HTTP client.
    pub fn new(plugin: Arc<Plugin>, client: HttpClient) -> Self {
        Self { plugin, client, renderer: Renderer::default() }
    }
}

#[async_trait::async_trait]
impl Stage for HttpStage {
    async fn run(&self, ctx: StageContext) -> Result<StageOutput, StageError> {
        let PluginAction::Http(section) = &self.plugin.action else {
            return Err(StageError::permanent("plugin", format!("plugin `{}` is not http", self.plugin.name)));
        };
        let name = &self.plugin.name;
        let params = self.plugin.params(&ctx.params)?;
        let context = self.plugin.template_context(&ctx, &params);
        let url = self.plugin.render_text(&self.renderer, &section.url, &context, "http.url")?;
        let mut headers = HeaderMap::new();
        for (key, template) in &section.headers {
            let value = self.plugin.render_text(&self.renderer, template, &context, &format!("http.headers.{key}"))?;
            let header = HeaderName::from_bytes(key.as_bytes()).ok().zip(HeaderValue::from_str(&value).ok());
            let Some((header, mut value)) = header else {
                return Err(StageError::permanent(
                    "invalid_request",
                    format!("plugin `{name}`: invalid header `{key}`"),
                ));
            };
            value.set_sensitive(true);
            headers.insert(header, value);
        }
        // The URL may carry a token in its query, so messages name the plugin, not the URL.
        let url = reqwest::Url::parse(&url).map_err(|error| {
            StageError::permanent(
                "invalid_request",
                format!("plugin `{name}`: the URL template gave no valid URL: {error}"),
            )
        })?;
        let mut body = None;
        if let Some(json) = &section.json {
            let json = self
                .renderer
                .render(json, &context, "http.json")
                .map_err(|error| StageError::permanent("template", error.to_string()))?;
            let bytes = serde_json::to_vec(&json)
                .map_err(|error| StageError::permanent("template", format!("plugin `{name}`: {error}")))?;
            if !headers.contains_key(CONTENT_TYPE) {
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            }
            body = Some(bytes);
        }
        let request = Outgoing { method: section.method.as_reqwest(), url, headers, body };
        // Dropping the request future on cancel aborts the connection.
        let (response, _) = self.client.send(request, &ctx.cancel).await.map_err(|error| match error {
            NetError::Refused { reason, .. } => {
                StageError::permanent("address_refused", format!("plugin `{name}`: request refused: {reason}"))
            }
            NetError::Network { message, .. } => {
                StageError::transient("http_connect", format!("plugin `{name}`: request failed: {message}"))
            }
            NetError::Cancelled => StageError::cancelled(),
        })?;
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let text = tokio::select! {
            text = response.text() => text.map_err(|error| {
                StageError::transient("http_body", format!("plugin `{name}`: reading the response: {}", error.without_url()))
            })?,
            () = ctx.cancel.cancelled() => return Err(StageError::cancelled()),
        };
        if status.is_success() {
            let body = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
            return Ok(StageOutput::from(serde_json::json!({ "status": status.as_u16(), "body": body })));
        }
        let cut = (0..=text.len().min(BODY_TAIL)).rev().find(|index| text.is_char_boundary(*index)).unwrap_or(0);
        let message = format!("plugin `{name}`: the server answered {status}: {}", &text[..cut]);
        if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
            Err(StageError::transient("http_status", message).with_retry_after(retry_after))
        } else {
            Err(StageError::permanent("http_status", message))
        }
    }
}

/// `Retry-After` in seconds (HTTP dates are rare from APIs and are ignored, falling back to the backoff).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let seconds: f64 = headers.get(RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()?;
    (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds.min(3600.0)))
}
