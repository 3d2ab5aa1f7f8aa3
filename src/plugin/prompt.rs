//! The `prompt` plugin kind: a chat completion with system and user templates whose reply must fit the
//! plugin's `[output]` JSON Schema. The section is declared here; the call arrives with the AI stages.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The `[prompt]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PromptSection {
    /// System message template.
    pub system: String,
    /// User message template; `params.<name>` reads the stage's `with` values.
    pub user: String,
    /// Named AI provider from the settings (default: the default provider).
    pub provider: Option<String>,
    /// Deployment (Azure) or model (OpenAI-style) to use instead of the provider's chat default.
    pub model: Option<String>,
    /// Sampling temperature between 0 and 2.
    #[schemars(range(min = 0.0, max = 2.0))]
    pub temperature: Option<f64>,
    /// Upper bound on the reply's tokens.
    pub max_tokens: Option<u32>,
}
