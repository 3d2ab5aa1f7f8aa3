//! The `prompt` plugin kind: a chat completion with system and user templates whose reply must fit the
//! plugin's `[output]` JSON Schema. A `transcript` parameter longer than the model's context is analysed in
//! parts and merged (map-reduce) rather than cut off.

use std::sync::Arc;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{Plugin, PluginAction};
use crate::ai::structured::{Ask, analyze};
use crate::ai::{AiError, Providers};
use crate::error::ErrorCode;
use crate::job::{StageError, StageOutput};
use crate::stage::{Stage, StageContext};
use crate::template::Renderer;

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

/// Runs a `prompt` plugin.
#[derive(Debug)]
pub struct PromptStage {
    plugin: Arc<Plugin>,
    providers: Arc<Providers>,
    renderer: Renderer,
}

impl PromptStage {
    /// The plugin, asking through `providers`.
    pub fn new(plugin: Arc<Plugin>, providers: Arc<Providers>) -> Self {
        Self { plugin, providers, renderer: Renderer::default() }
    }
}

#[async_trait::async_trait]
impl Stage for PromptStage {
    async fn run(&self, ctx: StageContext) -> Result<StageOutput, StageError> {
        let PluginAction::Prompt(section) = &self.plugin.action else {
            return Err(StageError::permanent(
                ErrorCode::Plugin,
                format!("plugin `{}` is not a prompt", self.plugin.name),
            ));
        };
        let provider = self.providers.get(section.provider.as_deref())?;
        let params = self.plugin.params(&ctx.params)?;
        let context = self.plugin.template_context(&ctx, &params);
        let system = self
            .plugin
            .render_text_async(&self.renderer, &section.system, &context, "prompt.system", &ctx.cancel)
            .await?;
        // The user template is rendered once here, off the async threads and within the stage's timeout, so one
        // that runs out of fuel or grows too large fails before anything is sent; the renders for the parts of a
        // long transcript below are synchronous, of smaller inputs, under the same fuel.
        self.plugin.render_text_async(&self.renderer, &section.user, &context, "prompt.user", &ctx.cancel).await?;
        let schema_name: String = self
            .plugin
            .name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' })
            .take(64)
            .collect();
        let spec = Ask {
            system,
            schema: self.plugin.output.clone(),
            schema_name,
            max_tokens: section.max_tokens,
            temperature: section.temperature,
            model: section.model.clone(),
        };
        // The `transcript` parameter, when there is one, is what gets split if it is too long.
        let long_text = params.get("transcript").and_then(Value::as_str).unwrap_or_default().to_string();
        let render_user =
            |text: &str| {
                let mut params = params.clone();
                if params.contains_key("transcript") {
                    params.insert("transcript".into(), Value::String(text.to_string()));
                }
                let context = self.plugin.template_context(&ctx, &params);
                // A template that fails stops the stage before any request: an empty prompt would still be billed.
                self.plugin.render_text(&self.renderer, &section.user, &context, "prompt.user").map_err(|error| {
                    AiError { message: error.message, retryable: error.retryable, code: error.code, retry_after: None }
                })
            };
        ctx.progress.report(0.1, format!("asking {}", self.plugin.name));
        let (mut value, usage, parts) = analyze(&provider, &spec, &long_text, render_user, &ctx.cancel).await?;
        if let Value::Object(map) = &mut value {
            map.insert(
                "usage".into(),
                json!({ "requests": usage.requests, "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens, "parts": parts }),
            );
        }
        Ok(StageOutput::from(value))
    }
}
