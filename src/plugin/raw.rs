//! A plugin file exactly as written (`plugins/NAME.toml`): serde types that refuse unknown keys, from which
//! the JSON Schema of plugin files is generated.

use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use toml::Spanned;
use toml::de::DeValue;

use crate::retry::RawRetry;
use crate::units::HumanDuration;

use super::{CommandSection, HttpSection, PromptSection};

/// A plugin file exactly as written.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "echo-worker plugin", extend("required" = ["name", "kind"]))]
pub struct RawPlugin {
    /// The kind's name as pipelines write it in `uses`; it must equal the file name without `.toml`.
    #[schemars(with = "String")]
    pub name: Option<Spanned<String>>,
    /// What the plugin does; the section of the same name holds the details.
    #[schemars(with = "PluginKind")]
    pub kind: Option<Spanned<PluginKind>>,
    /// One line for people choosing a plugin.
    pub description: Option<String>,
    /// Parameters a stage passes in `with`; templates read them as `params.<name>`.
    #[serde(default)]
    pub params: IndexMap<String, ParamSpec>,
    /// Environment variables templates may read as `env.<NAME>` (for secrets); no other variable is readable.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub env: Vec<Spanned<String>>,
    /// Time allowed for one attempt, unless the stage sets its own.
    pub timeout: Option<HumanDuration>,
    /// Retry policy, unless the stage sets its own.
    pub retry: Option<RawRetry>,
    /// Share of the job's progress bar, unless the stage sets its own.
    pub weight: Option<u32>,
    /// For `kind = "prompt"`.
    pub prompt: Option<PromptSection>,
    /// For `kind = "command"`.
    pub command: Option<CommandSection>,
    /// For `kind = "http"`.
    pub http: Option<HttpSection>,
    /// JSON Schema of the output; a prompt sends it as the structured output format and checks the reply.
    pub output: Option<serde_json::Map<String, serde_json::Value>>,
}

/// The three declarative plugin kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PluginKind {
    /// A chat completion; needs `[prompt]`.
    Prompt,
    /// An external program; needs `[command]`.
    Command,
    /// An HTTP request; needs `[http]`.
    Http,
}

impl PluginKind {
    /// The name used in files and in the section header.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Prompt => "prompt",
            Self::Command => "command",
            Self::Http => "http",
        }
    }

    /// Default share of the progress bar.
    pub(super) const fn default_weight(self) -> u32 {
        match self {
            Self::Prompt => 15,
            Self::Command => 5,
            Self::Http => 2,
        }
    }
}

/// One declared parameter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ParamSpec {
    /// The value's type (default `any`).
    #[serde(rename = "type", default)]
    pub kind: ParamType,
    /// A stage must pass it (unless a `default` is given).
    #[serde(default)]
    pub required: bool,
    /// Value used when a stage does not pass one.
    pub default: Option<serde_json::Value>,
    /// What it is for.
    pub description: Option<String>,
}

/// Types a plugin parameter can declare.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ParamType {
    /// Text.
    String,
    /// A whole number.
    Integer,
    /// Any number.
    Number,
    /// `true` or `false`.
    Boolean,
    /// A list.
    Array,
    /// A table.
    Object,
    /// Anything.
    #[default]
    Any,
}

impl ParamType {
    /// The name used in `[params]`.
    pub fn name(self) -> &'static str {
        match self {
            Self::String => "string",
            Self::Integer => "integer",
            Self::Number => "number",
            Self::Boolean => "boolean",
            Self::Array => "array",
            Self::Object => "object",
            Self::Any => "any",
        }
    }

    pub(super) fn accepts(self, value: &DeValue<'_>) -> bool {
        matches!(
            (self, value),
            (Self::Any, _)
                | (Self::String, DeValue::String(_))
                | (Self::Integer, DeValue::Integer(_))
                | (Self::Number, DeValue::Integer(_) | DeValue::Float(_))
                | (Self::Boolean, DeValue::Boolean(_))
                | (Self::Array, DeValue::Array(_))
                | (Self::Object, DeValue::Table(_))
        )
    }

    /// Whether a JSON value has this type.
    pub fn accepts_json(self, value: &serde_json::Value) -> bool {
        use serde_json::Value;
        matches!(
            (self, value),
            (Self::Any, _)
                | (Self::String, Value::String(_))
                | (Self::Number, Value::Number(_))
                | (Self::Boolean, Value::Bool(_))
                | (Self::Array, Value::Array(_))
                | (Self::Object, Value::Object(_))
        ) || (self == Self::Integer && value.as_i64().is_some())
    }
}
