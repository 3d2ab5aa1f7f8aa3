//! `whisper`: transcribes every chunk within the provider's rate limit and stitches one timeline.
//! Parameters only for now; the behaviour arrives with the AI stages.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `with` parameters of `whisper`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WhisperParams {
    /// Named AI provider from the settings (default: the default provider).
    pub provider: Option<String>,
    /// Deployment (Azure) or model (OpenAI-style) to use instead of the provider's transcription default.
    pub model: Option<String>,
    /// ISO-639-1 language of the audio; empty or absent means detect it.
    pub language: Option<String>,
    /// Words the model should expect (names, jargon), sent as the first chunk's prompt.
    pub prompt: Option<String>,
    /// Sampling temperature between 0 and 1.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub temperature: Option<f64>,
    /// Subtitle formats to produce besides the text and segments.
    pub formats: Option<Vec<SubtitleFormat>>,
}

/// Subtitle formats generated from the stitched segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SubtitleFormat {
    /// SubRip.
    Srt,
    /// WebVTT.
    Vtt,
}
