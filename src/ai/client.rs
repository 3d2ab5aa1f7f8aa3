//! The HTTP side of a provider: URLs and auth per style, streamed multipart uploads, the SDK retry policy and
//! the classification of provider errors.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use indexmap::IndexMap;
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use reqwest::{RequestBuilder, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::limit::{Limiter, SharedWindow};
use super::{AiError, ProviderSettings, ProviderStyle, Usage};
use crate::bounded::{self, BodyError};
use crate::error::ErrorCode;
use crate::metrics::{self, AiKind};
use crate::retry;
use crate::retry::RetryPolicy;

/// One transcribed piece of audio, times relative to the uploaded file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Segment {
    /// Start, seconds.
    pub start: f64,
    /// End, seconds.
    pub end: f64,
    /// What was said.
    pub text: String,
    /// Whisper's mean log probability (quality hint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avg_logprob: Option<f64>,
    /// Whisper's compression ratio (repetition hint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression_ratio: Option<f64>,
}

/// A transcription answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transcription {
    /// The whole text.
    pub text: String,
    /// The language the model detected (a name such as `english`, or a code).
    pub language: Option<String>,
    /// The audio's duration, when the format reports it.
    pub duration: Option<f64>,
    /// Segments with times (empty for `json` answers).
    pub segments: Vec<Segment>,
}

/// What to transcribe.
#[derive(Debug, Clone, Default)]
pub struct TranscriptionRequest {
    /// The audio file; its extension must be the real format.
    pub file: std::path::PathBuf,
    /// Text the audio continues (the previous chunk's tail).
    pub prompt: Option<String>,
    /// ISO-639-1 language, or none to detect.
    pub language: Option<String>,
    /// Sampling temperature.
    pub temperature: Option<f64>,
    /// Deployment or model instead of the provider's default.
    pub model: Option<String>,
}

/// A configured provider, with its limits.
#[derive(Debug)]
pub struct Provider {
    /// The provider's name in the settings.
    pub name: String,
    settings: ProviderSettings,
    http: reqwest::Client,
    transcription: Limiter,
    chat: Limiter,
}

/// The configured providers, by name.
#[derive(Debug, Clone, Default)]
pub struct Providers {
    providers: IndexMap<String, Arc<Provider>>,
    default: Option<String>,
}

impl Providers {
    /// Builds every provider.
    ///
    /// # Errors
    /// When an HTTP client cannot be built.
    ///
    /// With `redis` (a connection and a key prefix), each provider's request windows are shared by every process
    /// using the same Redis and prefix.
    pub fn new(
        settings: IndexMap<String, ProviderSettings>,
        default: Option<String>,
        redis: Option<(redis::aio::ConnectionManager, String)>,
    ) -> Result<Self, AiError> {
        let providers = settings
            .into_iter()
            .map(|(name, settings)| Ok((name.clone(), Arc::new(Provider::new(&name, settings, redis.clone())?))))
            .collect::<Result<IndexMap<_, _>, AiError>>()?;
        let default = default.or_else(|| providers.keys().next().cloned());
        Ok(Self { providers, default })
    }

    /// Whether any provider is configured.
    pub fn is_empty(&self) -> bool {
        self.providers.is_empty()
    }

    /// The provider called `name`, or the default one.
    ///
    /// # Errors
    /// A permanent error naming what to configure.
    pub fn get(&self, name: Option<&str>) -> Result<Arc<Provider>, AiError> {
        let wanted = name.or(self.default.as_deref());
        wanted.and_then(|name| self.providers.get(name).cloned()).ok_or_else(|| AiError {
            message: match wanted {
                Some(name) => format!("no AI provider named `{name}` is configured"),
                None => "no AI provider is configured: set AZURE_OPENAI_ENDPOINT and AZURE_OPENAI_API_KEY, or ECHO_AI__PROVIDERS__<NAME>__*".into(),
            },
            retryable: false,
            code: ErrorCode::NoProvider,
            retry_after: None,
        })
    }
}

fn cancelled() -> AiError {
    AiError { message: "cancelled".into(), retryable: false, code: ErrorCode::Cancelled, retry_after: None }
}

/// Bytes of an error answer read; the rest is dropped unread.
const ERROR_BODY_LIMIT: usize = 64 << 10;
/// Characters of a provider's error text kept in a message.
const ERROR_DETAIL_CHARS: usize = 300;

/// The longest backoff between retries of one request.
const MAX_BACKOFF: Duration = Duration::from_secs(8);
/// The longest `retry-after` obeyed; beyond it the provider is effectively down and the stage's own retry (or
/// the queue) takes over.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(120);

impl Provider {
    /// A provider from its settings.
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(
        name: &str,
        settings: ProviderSettings,
        redis: Option<(redis::aio::ConnectionManager, String)>,
    ) -> Result<Self, AiError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(settings.timeout_secs))
            .connect_timeout(Duration::from_secs(15))
            .build()
            .map_err(|error| AiError {
                message: format!("provider `{name}`: cannot build the HTTP client: {error}"),
                retryable: false,
                code: ErrorCode::Client,
                retry_after: None,
            })?;
        let window = Duration::from_millis(settings.rate_window_ms);
        // One key per provider and kind; the hash tag keeps each key on one Redis Cluster slot.
        let shared = |kind: &str| {
            redis.clone().map(|(connection, prefix)| {
                SharedWindow::new(connection, format!("{prefix}{{ratelimit}}:{name}:{kind}"))
            })
        };
        Ok(Self {
            name: name.to_string(),
            transcription: Limiter::new(settings.transcription_rpm, window, settings.max_concurrent)
                .shared(shared("transcription")),
            chat: Limiter::new(settings.chat_rpm, window, settings.max_concurrent).shared(shared("chat")),
            settings,
            http,
        })
    }

    /// The provider's settings.
    pub fn settings(&self) -> &ProviderSettings {
        &self.settings
    }

    /// Whether transcriptions should ask for `verbose_json` (gpt-4o transcription models only answer `json`).
    pub fn wants_verbose(&self, model: &str) -> bool {
        self.settings.verbose_json.unwrap_or_else(|| !model.contains("gpt-4o"))
    }

    fn auth(&self, key: Option<&crate::secret::Secret>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let Some(key) = key else { return headers };
        let (name, value) = match self.settings.style {
            ProviderStyle::Azure => ("api-key", key.expose().to_string()),
            ProviderStyle::Openai => (AUTHORIZATION.as_str(), format!("Bearer {}", key.expose())),
        };
        if let (Ok(name), Ok(mut value)) = (name.parse::<reqwest::header::HeaderName>(), HeaderValue::from_str(&value))
        {
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        headers
    }

    fn url(&self, endpoint: &str, model: &str, path: &str) -> String {
        let endpoint = endpoint.trim_end_matches('/');
        match self.settings.style {
            ProviderStyle::Azure => {
                format!("{endpoint}/openai/deployments/{model}/{path}?api-version={}", self.settings.api_version)
            }
            ProviderStyle::Openai => format!("{endpoint}/{path}"),
        }
    }

    /// Transcribes one audio file, streaming it from disk.
    ///
    /// # Errors
    /// [`AiError`] after the retries the policy allows, or at once for permanent errors.
    pub async fn transcribe(
        &self,
        request: &TranscriptionRequest,
        cancel: &CancellationToken,
    ) -> Result<(Transcription, Usage), AiError> {
        let model = request.model.clone().unwrap_or_else(|| self.settings.transcription_model.clone());
        let endpoint = self.settings.transcription_endpoint.as_deref().unwrap_or(&self.settings.endpoint);
        let key = self.settings.transcription_api_key.as_ref().or(self.settings.api_key.as_ref());
        let url = self.url(endpoint, &model, "audio/transcriptions");
        let verbose = self.wants_verbose(&model);
        let file_name =
            request.file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "audio.mp3".into());
        let length = tokio::fs::metadata(&request.file).await.map_err(|error| AiError {
            message: format!("cannot read {}: {error}", request.file.display()),
            retryable: false,
            code: ErrorCode::Io,
            retry_after: None,
        })?;
        let build = || async {
            let file = tokio::fs::File::open(&request.file).await.ok()?;
            let part = reqwest::multipart::Part::stream_with_length(reqwest::Body::from(file), length.len())
                .file_name(file_name.clone())
                .mime_str(mime_of(&request.file))
                .ok()?;
            let mut form = reqwest::multipart::Form::new()
                .part("file", part)
                .text("response_format", if verbose { "verbose_json" } else { "json" });
            if self.settings.style == ProviderStyle::Openai {
                form = form.text("model", model.clone());
            }
            if let Some(language) = request.language.as_ref().filter(|l| !l.is_empty()) {
                form = form.text("language", language.clone());
            }
            if let Some(prompt) = request.prompt.as_ref().filter(|p| !p.is_empty()) {
                form = form.text("prompt", prompt.clone());
            }
            if let Some(temperature) = request.temperature {
                form = form.text("temperature", temperature.to_string());
            }
            Some(self.http.post(&url).headers(self.auth(key)).multipart(form))
        };
        let (response, mut usage) = self.send(&self.transcription, AiKind::Transcription, build, cancel).await?;
        let body = self.read_reply(response, "the transcription", cancel).await?;
        let transcription = parse_transcription(&body);
        usage.audio_seconds = transcription.duration.unwrap_or(0.0);
        metrics::global().ai_audio_seconds(&self.name, usage.audio_seconds);
        Ok((transcription, usage))
    }

    /// Sends a chat completion request body (`model` is filled in for OpenAI-style providers).
    ///
    /// # Errors
    /// [`AiError`] after the retries the policy allows, or at once for permanent errors.
    pub async fn chat(
        &self,
        mut body: Value,
        model: Option<&str>,
        cancel: &CancellationToken,
    ) -> Result<(Value, Usage), AiError> {
        let model = model.map_or_else(|| self.settings.chat_model.clone(), str::to_string);
        if self.settings.style == ProviderStyle::Openai {
            body["model"] = Value::String(model.clone());
        }
        let url = self.url(&self.settings.endpoint, &model, "chat/completions");
        let build =
            || async { Some(self.http.post(&url).headers(self.auth(self.settings.api_key.as_ref())).json(&body)) };
        let (response, mut usage) = self.send(&self.chat, AiKind::Chat, build, cancel).await?;
        let reply = self.read_reply(response, "the chat answer", cancel).await?;
        usage.prompt_tokens = reply["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
        usage.completion_tokens = reply["usage"]["completion_tokens"].as_u64().unwrap_or(0);
        metrics::global().ai_tokens(&self.name, usage.prompt_tokens, usage.completion_tokens);
        Ok((reply, usage))
    }

    /// Reads a successful reply as JSON, at most `max_response_size` bytes of it.
    async fn read_reply(&self, response: Response, what: &str, cancel: &CancellationToken) -> Result<Value, AiError> {
        let cap = self.settings.max_response_size;
        let body = tokio::select! {
            body = bounded::read_body(response, cap, "limits.max_response_size") => body,
            () = cancel.cancelled() => return Err(cancelled()),
        };
        let body = body.map_err(|error| match error {
            BodyError::TooLarge { .. } => AiError {
                message: format!("provider `{}`: {what}: {error}", self.name),
                retryable: false,
                code: ErrorCode::ResponseTooLarge,
                retry_after: None,
            },
            BodyError::Read(_) => self.transient(ErrorCode::Body, format!("reading {what}: {error}")),
        })?;
        serde_json::from_slice(&body)
            .map_err(|error| self.transient(ErrorCode::Body, format!("reading {what}: not JSON: {error}")))
    }

    /// The provider's keys, which an error body must never repeat.
    fn secrets(&self) -> impl Iterator<Item = &str> {
        [&self.settings.api_key, &self.settings.transcription_api_key].into_iter().flatten().map(|key| key.expose())
    }

    fn transient(&self, code: ErrorCode, message: String) -> AiError {
        AiError { message: format!("provider `{}`: {message}", self.name), retryable: true, code, retry_after: None }
    }

    /// Sends with the limiter and the SDK retry policy; returns the successful response and the requests made.
    /// Every answer (and every request that got none) is counted in the process's metrics.
    async fn send<F, Fut>(
        &self,
        limiter: &Limiter,
        kind: AiKind,
        build: F,
        cancel: &CancellationToken,
    ) -> Result<(Response, Usage), AiError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Option<RequestBuilder>>,
    {
        let mut usage = Usage::default();
        let mut attempt = 0;
        loop {
            let permit = limiter.acquire(cancel).await.ok_or_else(cancelled)?;
            let request =
                build().await.ok_or_else(|| self.transient(ErrorCode::Io, "cannot prepare the request".into()))?;
            usage.requests += 1;
            tracing::debug!(provider = %self.name, attempt, "sending a request");
            let sent = tokio::select! {
                sent = request.send() => sent,
                () = cancel.cancelled() => return Err(cancelled()),
            };
            drop(permit);
            let status = sent.as_ref().ok().map(|response| response.status().as_u16());
            let error = match sent {
                Ok(response) if response.status().is_success() => {
                    metrics::global().ai_request(&self.name, kind, status, false);
                    return Ok((response, usage));
                }
                Ok(response) => self.classify(response).await,
                Err(error) => self.transient(ErrorCode::Network, format!("request failed: {}", error.without_url())),
            };
            let retrying = error.retryable && attempt < self.settings.max_retries;
            metrics::global().ai_request(&self.name, kind, status, retrying);
            if !retrying {
                return Err(error);
            }
            let wait = error.retry_after.unwrap_or_else(|| backoff(attempt));
            tracing::info!(provider = %self.name, attempt, ?wait, %error, "provider request failed; retrying");
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = cancel.cancelled() => return Err(cancelled()),
            }
            attempt += 1;
        }
    }

    async fn classify(&self, response: Response) -> AiError {
        let status = response.status();
        let headers = response.headers().clone();
        // Only the start of an error body is ever shown; a server that answers errors with gigabytes is not read.
        let text = String::from_utf8_lossy(&bounded::read_prefix(response, ERROR_BODY_LIMIT).await).into_owned();
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let error = &body["error"];
        let code = error["code"].as_str().or_else(|| error["type"].as_str()).unwrap_or_default().to_string();
        let inner = error["innererror"]["code"].as_str().unwrap_or_default();
        // A provider (or a proxy in front of it) may echo the request's headers, key included.
        let detail = bounded::scrub(error["message"].as_str().unwrap_or(&text), self.secrets(), ERROR_DETAIL_CHARS);
        let retry_after = retry_after(&headers).map(|wait| wait.min(MAX_RETRY_AFTER));
        let name = &self.name;
        let (code, retryable, message): (ErrorCode, bool, String) = if code == "insufficient_quota" {
            (
                ErrorCode::InsufficientQuota,
                false,
                format!("provider `{name}`: the account's quota is used up (insufficient_quota): {detail}"),
            )
        } else if code == "content_filter" || inner == "ResponsibleAIPolicyViolation" {
            (
                ErrorCode::ContentFilter,
                false,
                format!("provider `{name}`: the content filter refused the request (content_filter): {detail}"),
            )
        } else if code == "context_length_exceeded" {
            (
                ErrorCode::ContextLengthExceeded,
                false,
                format!(
                    "provider `{name}`: the input is longer than the model's context (context_length_exceeded): {detail}"
                ),
            )
        } else {
            let should = headers.get("x-should-retry").and_then(|v| v.to_str().ok());
            let retryable = match should {
                Some("true") => true,
                Some("false") => false,
                _ => matches!(status.as_u16(), 408 | 409 | 429) || status.is_server_error(),
            };
            (ErrorCode::HttpStatus, retryable, format!("provider `{name}` answered {status}: {detail}"))
        };
        AiError { message, retryable, code, retry_after: if retryable { retry_after } else { None } }
    }
}

/// `retry-after-ms`, else `retry-after` in seconds.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let number = |name: &str| {
        headers.get(name)?.to_str().ok()?.trim().parse::<f64>().ok().filter(|v| v.is_finite() && *v >= 0.0)
    };
    // A huge value (`1e20`) does not fit a Duration; it means "much later", so it is capped like any long wait.
    let seconds = |value: f64| Duration::try_from_secs_f64(value).unwrap_or(Duration::MAX).min(MAX_RETRY_AFTER);
    number("retry-after-ms").map(|ms| seconds(ms / 1000.0)).or_else(|| number("retry-after").map(seconds))
}

/// 0.5 s, 1 s, 2 s… capped at 8 s, minus up to 20% jitter: the engine's backoff with the SDKs' numbers.
fn backoff(attempt: u32) -> Duration {
    let policy = RetryPolicy {
        max_attempts: u32::MAX,
        initial_interval: Duration::from_millis(500),
        backoff_coefficient: 2.0,
        max_interval: MAX_BACKOFF,
    };
    retry::backoff(&policy, attempt + 1, retry::random_unit())
}

fn mime_of(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).unwrap_or_default() {
        "mp3" | "mpga" | "mpeg" => "audio/mpeg",
        "ogg" | "oga" => "audio/ogg",
        "flac" => "audio/flac",
        "wav" => "audio/wav",
        "m4a" | "mp4" => "audio/mp4",
        "webm" => "audio/webm",
        _ => "application/octet-stream",
    }
}

fn parse_transcription(body: &Value) -> Transcription {
    let segments = body["segments"]
        .as_array()
        .map(|segments| {
            segments
                .iter()
                .filter_map(|segment| {
                    Some(Segment {
                        start: segment["start"].as_f64()?,
                        end: segment["end"].as_f64()?,
                        text: segment["text"].as_str().unwrap_or_default().trim().to_string(),
                        avg_logprob: segment["avg_logprob"].as_f64(),
                        compression_ratio: segment["compression_ratio"].as_f64(),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    Transcription {
        text: body["text"].as_str().unwrap_or_default().trim().to_string(),
        language: body["language"].as_str().map(str::to_string),
        duration: body["duration"].as_f64(),
        segments,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_prefers_milliseconds() {
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", "2".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(2)));
        headers.insert("retry-after-ms", "1500".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_millis(1500)));
        assert!(backoff(0) <= Duration::from_millis(500) && backoff(10) <= MAX_BACKOFF);
    }

    #[test]
    fn retry_after_of_1e20_is_capped_not_a_panic() {
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", "1e20".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(MAX_RETRY_AFTER));
        headers.insert("retry-after-ms", "1e300".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(MAX_RETRY_AFTER));
    }
}
