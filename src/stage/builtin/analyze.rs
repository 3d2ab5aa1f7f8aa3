//! `analyze`: the built-in analysis (summary, key points, action items, sentiment, topics) as one structured
//! chat call. Parameters only for now; the behaviour arrives with the AI stages.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `with` parameters of `analyze`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AnalyzeParams {
    /// The transcript to analyse, usually `"{{ stages.<whisper stage>.text }}"`.
    pub transcript: String,
    /// Named AI provider from the settings (default: the default provider).
    pub provider: Option<String>,
    /// Deployment (Azure) or model (OpenAI-style) to use instead of the provider's chat default.
    pub model: Option<String>,
    /// Language of the answer (default: the transcript's language).
    pub language: Option<String>,
    /// Extra instructions appended to the built-in prompt.
    pub instructions: Option<String>,
    /// Sampling temperature between 0 and 2.
    #[schemars(range(min = 0.0, max = 2.0))]
    pub temperature: Option<f64>,
    /// Upper bound on the reply's tokens.
    pub max_tokens: Option<u32>,
}
