//! A plugin's templates at run time: its params completed and checked, the context its templates see, and
//! text rendered under the stage's timeout and cancellation.

use crate::error::ErrorCode;
use crate::job::StageError;
use crate::stage::StageContext;
use crate::template::{self, Renderer};

use super::Plugin;

impl Plugin {
    /// The stage's rendered `with` values completed with the declared defaults and checked against the
    /// declared types, as templates see them under `params`.
    ///
    /// # Errors
    /// A permanent [`StageError`] naming a missing required parameter or a value of the wrong type (possible
    /// when a whole-value template produced it at run time).
    pub fn params(&self, given: &serde_json::Value) -> Result<serde_json::Map<String, serde_json::Value>, StageError> {
        let mut params = given.as_object().cloned().unwrap_or_default();
        for (name, spec) in &self.params {
            let value = params.get(name).filter(|value| !value.is_null()).cloned().or_else(|| spec.default.clone());
            match value {
                Some(value) if !spec.kind.accepts_json(&value) => {
                    return Err(StageError::permanent(
                        ErrorCode::InvalidParams,
                        format!("plugin `{}`: parameter `{name}` must be {}, got {value}", self.name, spec.kind.name()),
                    ));
                }
                Some(value) => {
                    params.insert(name.clone(), value);
                }
                None if spec.required => {
                    return Err(StageError::permanent(
                        ErrorCode::InvalidParams,
                        format!("plugin `{}`: parameter `{name}` is required but empty", self.name),
                    ));
                }
                None => {}
            }
        }
        Ok(params)
    }

    /// What the plugin's templates can read: `params`, `job`, and `env` holding only the declared names.
    pub fn template_context(
        &self,
        ctx: &StageContext,
        params: &serde_json::Map<String, serde_json::Value>,
    ) -> minijinja::Value {
        let env: serde_json::Map<String, serde_json::Value> = self
            .env
            .iter()
            .filter_map(|name| Some((name.clone(), serde_json::Value::String(std::env::var(name).ok()?))))
            .collect();
        minijinja::Value::from_serialize(serde_json::json!({ "params": params, "job": &*ctx.job, "env": env }))
    }

    /// Renders one template string of the plugin to text, synchronously (fuel and size limits still apply).
    ///
    /// # Errors
    /// A permanent [`StageError`] naming the template.
    pub fn render_text(
        &self,
        renderer: &Renderer,
        template: &str,
        context: &minijinja::Value,
        location: &str,
    ) -> Result<String, StageError> {
        let value = serde_json::Value::String(template.to_string());
        let location = format!("{}: {location}", self.file.display());
        text_of(renderer.render(&value, context, &location))
    }

    /// Renders one template string of the plugin to text off the async threads, giving up when `cancel` fires
    /// (the stage's timeout or the job's cancellation).
    ///
    /// # Errors
    /// A permanent [`StageError`] naming the template; [`StageError::cancelled`] when `cancel` fired.
    pub async fn render_text_async(
        &self,
        renderer: &Renderer,
        template: &str,
        context: &minijinja::Value,
        location: &str,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<String, StageError> {
        let value = serde_json::Value::String(template.to_string());
        let location = format!("{}: {location}", self.file.display());
        match renderer.render_async(&value, context, &location, cancel).await {
            Some(rendered) => text_of(rendered),
            None => Err(StageError::cancelled()),
        }
    }
}

fn text_of(rendered: Result<serde_json::Value, template::RenderError>) -> Result<String, StageError> {
    match rendered {
        Ok(serde_json::Value::String(text)) => Ok(text),
        Ok(serde_json::Value::Null) => Ok(String::new()),
        Ok(other) => Ok(other.to_string()),
        Err(error) => Err(StageError::permanent(ErrorCode::Template, error.to_string())),
    }
}
