//! `analyze`: the built-in analysis (summary, key points, action items, sentiment, topics) as one structured
//! chat call. It is a `prompt` plugin with a built-in prompt and schema: the same structured call, the same
//! schema check, and the same map-reduce for transcripts longer than the model's context.

use std::sync::{Arc, LazyLock};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::ai::Providers;
use crate::ai::jsonschema::OutputSchema;
use crate::ai::structured::{Ask, analyze};
use crate::job::{StageError, StageOutput};
use crate::stage::{Stage, StageContext};

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

/// The built-in prompt.
const SYSTEM: &str = "You analyse transcripts of recorded conversations. Be faithful to what was said; do not invent \
facts, names or dates. Write in the transcript's language unless told otherwise. Use an empty string when an owner \
or due date is not said.";

/// The built-in output schema (strict-mode compatible).
pub fn schema() -> Value {
    json!({
        "type": "object",
        "additionalProperties": false,
        "required": ["summary", "key_points", "action_items", "sentiment", "topics"],
        "properties": {
            "summary": { "type": "string" },
            "key_points": { "type": "array", "items": { "type": "string" } },
            "action_items": { "type": "array", "items": {
                "type": "object", "additionalProperties": false, "required": ["task", "owner", "due"],
                "properties": { "task": { "type": "string" }, "owner": { "type": "string" }, "due": { "type": "string" } }
            } },
            "sentiment": {
                "type": "object", "additionalProperties": false, "required": ["label", "score"],
                "properties": {
                    "label": { "type": "string", "enum": ["negative", "neutral", "positive", "mixed"] },
                    "score": { "type": "number" }
                }
            },
            "topics": { "type": "array", "items": { "type": "string" } }
        }
    })
}

/// The built-in output schema, checked and compiled once per process.
static COMPILED: LazyLock<OutputSchema> =
    LazyLock::new(|| OutputSchema::compile(schema()).expect("the built-in analysis schema is valid JSON Schema"));

/// The `analyze` stage.
#[derive(Debug, Clone)]
pub struct AnalyzeStage {
    providers: Arc<Providers>,
}

impl AnalyzeStage {
    /// Analyses through `providers`.
    pub fn new(providers: Arc<Providers>) -> Self {
        Self { providers }
    }
}

#[async_trait::async_trait]
impl Stage for AnalyzeStage {
    async fn run(&self, ctx: StageContext) -> Result<StageOutput, StageError> {
        let params: AnalyzeParams = super::params(&ctx)?;
        let provider = self.providers.get(params.provider.as_deref())?;
        let mut system = SYSTEM.to_string();
        if let Some(language) = params.language.as_ref().filter(|l| !l.is_empty()) {
            system.push_str(&format!(" Answer in the language with code `{language}`."));
        }
        if let Some(extra) = &params.instructions {
            system.push_str("\n\n");
            system.push_str(extra);
        }
        let spec = Ask {
            system,
            schema: Some(COMPILED.clone()),
            schema_name: "analysis".into(),
            max_tokens: params.max_tokens,
            temperature: params.temperature,
            model: params.model.clone(),
        };
        ctx.progress.report(0.1, "analysing the transcript");
        let (mut value, usage, parts) =
            analyze(&provider, &spec, &params.transcript, |text| Ok(format!("Transcript:\n{text}")), &ctx.cancel)
                .await?;
        value["usage"] = json!({ "requests": usage.requests, "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens, "parts": parts });
        Ok(StageOutput::from(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_schema_compiles_and_is_strict_compatible() {
        assert!(crate::ai::jsonschema::strict_compatible(COMPILED.schema()));
        let reply = json!({
            "summary": "s", "key_points": [], "topics": [],
            "action_items": [{ "task": "t", "owner": "", "due": "" }],
            "sentiment": { "label": "mixed", "score": 0.5 }
        });
        assert_eq!(COMPILED.check(&reply), Ok(()));
    }
}
