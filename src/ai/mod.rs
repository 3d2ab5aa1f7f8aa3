//! One OpenAI-compatible client with two provider styles (ARCHITECTURE.md):
//!
//! - **Azure:** `{endpoint}/openai/deployments/{deployment}/audio/transcriptions?api-version=…` and
//!   `…/chat/completions`, with the `api-key` header;
//! - **OpenAI-style:** `{base_url}/audio/transcriptions` and `{base_url}/chat/completions`, with a Bearer token;
//!   this covers OpenAI and local servers (speaches, vLLM, LocalAI, Ollama for chat).
//!
//! Several named providers can be configured and a stage picks one. Every request goes through the provider's
//! client-side limits (requests per window, requests in flight) so jobs do not cause 429s in the first place,
//! and is retried the way the official SDKs do: `x-should-retry` wins; otherwise 408, 409, 429 and 5xx are
//! retried after `retry-after-ms`, then `retry-after`, then exponential backoff with jitter. Quota, content
//! filter and context-length errors are permanent and say so.
//!
//! With `REDIS_URL` set, the request windows are shared by every worker process through Redis (see [`limit`]).

pub mod client;
pub mod jsonschema;
pub mod limit;
pub mod structured;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use client::{Provider, Providers};

use crate::error::ErrorCode;
use crate::job::StageError;
use crate::secret::Secret;

/// The URL and auth shape of a provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderStyle {
    /// Azure OpenAI deployments.
    Azure,
    /// OpenAI and OpenAI-compatible servers.
    Openai,
}

/// One configured provider.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProviderSettings {
    /// `azure` or `openai`.
    pub style: ProviderStyle,
    /// Azure: the resource origin (`https://name.openai.azure.com`); OpenAI-style: the base URL with `/v1`.
    #[serde(serialize_with = "crate::secret::redacted_url_text")]
    pub endpoint: String,
    /// The key (`api-key` for Azure, Bearer otherwise); local servers may need none.
    pub api_key: Option<Secret>,
    /// Azure `api-version`.
    #[serde(default = "default_api_version")]
    pub api_version: String,
    /// A separate endpoint for transcription (Azure resources often differ).
    #[serde(serialize_with = "crate::secret::redacted_url")]
    pub transcription_endpoint: Option<String>,
    /// The key for `transcription_endpoint`.
    pub transcription_api_key: Option<Secret>,
    /// The transcription deployment (Azure) or model (OpenAI-style).
    #[serde(default = "default_transcription_model")]
    pub transcription_model: String,
    /// The chat deployment (Azure) or model (OpenAI-style).
    #[serde(default = "default_chat_model")]
    pub chat_model: String,
    /// The chat model's context, in tokens; longer transcripts are analysed in parts, then merged.
    #[serde(default = "default_context_tokens")]
    pub context_tokens: u32,
    /// Transcription requests allowed per `rate_window_ms` (Azure's default Whisper quota is 3 a minute).
    pub transcription_rpm: Option<u32>,
    /// Chat requests allowed per `rate_window_ms`.
    pub chat_rpm: Option<u32>,
    /// Requests in flight at once, per kind.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: usize,
    /// The window the request limits count in, in milliseconds (one minute).
    #[serde(default = "default_rate_window_ms")]
    pub rate_window_ms: u64,
    /// Time allowed for one request, upload and processing included, in seconds.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
    /// Retries of one request after the first attempt.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// Ask for `verbose_json` (segments and timestamps); by default true unless the model name says gpt-4o.
    pub verbose_json: Option<bool>,
    /// Largest reply read; set from `limits.max_response_size`, not per provider.
    #[serde(skip, default = "default_max_response_size")]
    pub max_response_size: crate::units::ByteSize,
}

fn default_max_response_size() -> crate::units::ByteSize {
    crate::bounded::DEFAULT_MAX_RESPONSE_SIZE
}

fn default_api_version() -> String {
    "2024-10-21".into()
}
fn default_transcription_model() -> String {
    "whisper-1".into()
}
fn default_chat_model() -> String {
    "gpt-4o-mini".into()
}
fn default_context_tokens() -> u32 {
    128_000
}
fn default_max_concurrent() -> usize {
    4
}
fn default_rate_window_ms() -> u64 {
    60_000
}
fn default_timeout_secs() -> u64 {
    // Uploading 24 MiB and transcribing 20 minutes of audio can take minutes.
    600
}
fn default_max_retries() -> u32 {
    4
}

impl ProviderSettings {
    /// A provider of `style` at `endpoint` with every other setting at its default.
    pub fn new(style: ProviderStyle, endpoint: impl Into<String>, api_key: Option<Secret>) -> Self {
        Self {
            style,
            endpoint: endpoint.into(),
            api_key,
            api_version: default_api_version(),
            transcription_endpoint: None,
            transcription_api_key: None,
            transcription_model: default_transcription_model(),
            chat_model: default_chat_model(),
            context_tokens: default_context_tokens(),
            transcription_rpm: None,
            chat_rpm: None,
            max_concurrent: default_max_concurrent(),
            rate_window_ms: default_rate_window_ms(),
            timeout_secs: default_timeout_secs(),
            max_retries: default_max_retries(),
            verbose_json: None,
            max_response_size: default_max_response_size(),
        }
    }
}

/// Tokens and audio a stage paid for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// Requests sent (retries included).
    pub requests: u64,
    /// Seconds of audio transcribed.
    pub audio_seconds: f64,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
}

impl std::ops::AddAssign for Usage {
    fn add_assign(&mut self, other: Self) {
        self.requests += other.requests;
        self.audio_seconds += other.audio_seconds;
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
    }
}

/// Why a provider request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct AiError {
    /// A sentence naming the provider and the cause.
    pub message: String,
    /// Whether the stage may try again later.
    pub retryable: bool,
    /// A stable class: `insufficient_quota`, `content_filter`, `context_length_exceeded`, `http_status`...
    pub code: ErrorCode,
    /// The wait the provider asked for.
    pub retry_after: Option<Duration>,
}

impl AiError {
    /// Whether the request stopped because of cancellation.
    pub const fn is_cancelled(&self) -> bool {
        self.code.is_cancelled()
    }
}

impl From<AiError> for StageError {
    fn from(error: AiError) -> Self {
        let AiError { message, retryable, code, retry_after } = error;
        StageError { message, retryable, retry_after, code }
    }
}

/// A rough token count (four characters a token), used to size map-reduce parts.
pub fn estimate_tokens(text: &str) -> usize {
    text.chars().count().div_ceil(4)
}
