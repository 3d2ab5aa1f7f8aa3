//! Plugins: new stage kinds declared in `plugins/NAME.toml` with no Rust code (ARCHITECTURE.md). A plugin is a
//! `prompt` (chat completion with a JSON output schema), a `command` (external program) or an `http` call,
//! with typed `[params]` that pipelines fill through `with`.
//!
//! Loading checks everything a plugin file can get wrong on its own (shape, kind and section, templates,
//! declared params and env names, the `[output]` JSON Schema) and reports every problem with its position,
//! like pipelines.

pub mod command;
pub mod http;
pub mod prompt;

use std::collections::BTreeSet;
use std::ops::Range;
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use toml::Spanned;
use toml::de::DeValue;

use crate::ai::jsonschema::{OutputSchema, SchemaProblem, Step};
use crate::document::{self, Diagnostic, Document, SpannedValue, suggest};
use crate::error::ErrorCode;
use crate::job::StageError;
use crate::retry::RawRetry;
use crate::stage::BuiltinKind;
use crate::stage::StageContext;
use crate::template::{self, Renderer};
use crate::units::HumanDuration;

pub use command::CommandSection;
pub use http::HttpSection;
pub use prompt::PromptSection;

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
    const fn default_weight(self) -> u32 {
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

    fn accepts(self, value: &DeValue<'_>) -> bool {
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

/// What a plugin does, by kind.
#[derive(Debug, Clone, PartialEq)]
pub enum PluginAction {
    /// A chat completion.
    Prompt(PromptSection),
    /// An external program.
    Command(CommandSection),
    /// An HTTP request.
    Http(HttpSection),
}

/// A loaded, checked plugin.
#[derive(Debug, Clone)]
pub struct Plugin {
    /// The name pipelines use.
    pub name: String,
    /// The kind.
    pub kind: PluginKind,
    /// One line for people.
    pub description: Option<String>,
    /// The file it came from; command programs resolve relative to its folder.
    pub file: PathBuf,
    /// Declared parameters.
    pub params: IndexMap<String, ParamSpec>,
    /// Environment variable names templates may read.
    pub env: Vec<String>,
    /// Per-attempt timeout default.
    pub timeout: Option<HumanDuration>,
    /// Retry policy default.
    pub retry: Option<RawRetry>,
    /// Share of the progress bar.
    pub weight: u32,
    /// The kind's section.
    pub action: PluginAction,
    /// JSON Schema of the output, checked and compiled when the plugin was loaded.
    pub output: Option<OutputSchema>,
}

/// Plugins loaded from a folder, plus the names of plugin files that were refused (so pipelines that use
/// them are not also told the kind does not exist).
#[derive(Debug, Clone, Default)]
pub struct PluginSet {
    /// The valid plugins, by name, in file-name order.
    pub plugins: IndexMap<String, Plugin>,
    /// File stems of plugin files with errors.
    pub broken: BTreeSet<String>,
    /// Every problem found.
    pub diagnostics: Vec<Diagnostic>,
    /// The text of each valid plugin's file, by path, as it was read: a job carries these texts (see
    /// `crate::definition`), never a second reading that may differ.
    pub texts: std::collections::BTreeMap<PathBuf, String>,
}

impl PluginSet {
    /// Loads every `*.toml` in `dir`, in file-name order.
    ///
    /// # Errors
    /// The I/O error when the folder or a file cannot be read.
    pub fn load_dir(dir: &Path) -> std::io::Result<Self> {
        let mut set = Self::default();
        for file in crate::document::toml_files(dir)? {
            let document = match Document::open(&file)? {
                Ok(document) => document,
                Err(diagnostic) => {
                    // Pipelines that use it are not also told that the kind does not exist.
                    set.broken.insert(file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default());
                    set.diagnostics.push(diagnostic);
                    continue;
                }
            };
            match Plugin::load(&document) {
                Ok(plugin) => {
                    set.texts.insert(file.clone(), document.source.clone());
                    set.plugins.insert(plugin.name.clone(), plugin);
                }
                Err(diagnostics) => {
                    set.broken.insert(document.stem());
                    set.diagnostics.extend(diagnostics);
                }
            }
        }
        Ok(set)
    }
}

const ENV_NAME: &str = "[A-Z_][A-Z0-9_]*";

impl Plugin {
    /// Checks and builds a plugin from its file.
    ///
    /// # Errors
    /// Every problem found, each with its position.
    pub fn load(document: &Document) -> Result<Self, Vec<Diagnostic>> {
        let root = document.parse()?;
        let parsed = document.deserialize::<RawPlugin>(&root, "", &[]);
        let mut diagnostics = parsed.diagnostics;
        let Some(raw) = parsed.value else { return Err(diagnostics) };
        let start = 0..0;

        let name = match &raw.name {
            None => {
                diagnostics.push(document.diagnostic(&start, "missing_key", "missing required key `name`"));
                String::new()
            }
            Some(name) => {
                let text = name.get_ref();
                if text != &document.stem() {
                    diagnostics.push(document.diagnostic(
                        &name.span(),
                        "name_mismatch",
                        format!("plugin name `{text}` does not match its file name `{}.toml`", document.stem()),
                    ));
                } else if !valid_plugin_name(text) {
                    diagnostics.push(document.diagnostic(
                        &name.span(),
                        "invalid_name",
                        format!("invalid plugin name `{text}`: use lowercase letters, digits, `_` and `-`, starting with a letter"),
                    ));
                } else if BuiltinKind::from_name(text).is_some() {
                    diagnostics.push(document.diagnostic(
                        &name.span(),
                        "invalid_name",
                        format!("plugin name `{text}` is already a builtin stage kind; choose another name"),
                    ));
                }
                text.clone()
            }
        };

        let env: Vec<String> = raw.env.iter().map(|name| name.get_ref().clone()).collect();
        for name in &raw.env {
            if !valid_env_name(name.get_ref()) {
                diagnostics.push(document.diagnostic(
                    &name.span(),
                    "invalid_name",
                    format!("invalid environment variable name `{}`: expected {ENV_NAME}", name.get_ref()),
                ));
            }
        }
        for (param, spec) in &raw.params {
            if let Some(default) = &spec.default
                && !spec.kind.accepts_json(default)
            {
                let span = document::get_path(&root, &["params", param]).map_or(start.clone(), Spanned::span);
                diagnostics.push(document.diagnostic(
                    &span,
                    "param_type",
                    format!("`params.{param}.default` must be of type {}", spec.kind.name()),
                ));
            }
        }

        if raw.kind.is_none() && !parsed.removed.iter().any(|key| key == "kind") {
            diagnostics.push(document.diagnostic(
                &start,
                "missing_key",
                "missing required key `kind`; expected one of: prompt, command, http",
            ));
        }
        let action = check_sections(document, &root, &raw, &mut diagnostics);
        check_templates(document, &root, &raw, &env, &mut diagnostics);
        for (field, message) in raw.retry.as_ref().map(|retry| retry.problems("retry")).unwrap_or_default() {
            let span = document::get_path(&root, &["retry", field]).map_or(start.clone(), Spanned::span);
            diagnostics.push(document.diagnostic(&span, "invalid_value", message));
        }
        let output = check_output(document, &root, &raw, &mut diagnostics);
        if parsed.removed.iter().any(|key| key == "kind") || !diagnostics.is_empty() {
            diagnostics.sort_by_key(|diagnostic| (diagnostic.line, diagnostic.column));
            return Err(diagnostics);
        }
        let (Some(kind), Some(action)) = (raw.kind, action) else { return Err(diagnostics) };
        let kind = kind.into_inner();
        Ok(Self {
            name,
            kind,
            description: raw.description,
            file: document.file.clone(),
            params: raw.params,
            env,
            timeout: raw.timeout,
            retry: raw.retry,
            weight: raw.weight.unwrap_or(kind.default_weight()),
            action,
            output,
        })
    }

    /// Checks a stage's `with` table against the declared params: unknown names, missing required values and
    /// wrong types. Keys in `templated` are whole-value templates whose type is only known at run time.
    pub fn check_params(
        &self,
        document: &Document,
        with: Option<&SpannedValue<'_>>,
        base: &str,
        at: &Range<usize>,
        templated: &[String],
    ) -> Vec<Diagnostic> {
        let mut diagnostics = Vec::new();
        let names: Vec<&str> = self.params.keys().map(String::as_str).collect();
        let entries: Vec<(String, Range<usize>, &SpannedValue<'_>)> = match with.map(Spanned::get_ref) {
            Some(DeValue::Table(table)) => {
                table.iter().map(|(key, value)| (key.get_ref().to_string(), key.span(), value)).collect()
            }
            _ => Vec::new(),
        };
        for (key, key_span, value) in &entries {
            let Some(spec) = self.params.get(key) else {
                let hint = match suggest::closest(key, &names) {
                    Some(name) => format!("; did you mean `{name}`?"),
                    None if names.is_empty() => format!("; plugin `{}` takes no parameters", self.name),
                    None => format!("; plugin `{}` takes: {}", self.name, names.join(", ")),
                };
                diagnostics.push(document.diagnostic(
                    key_span,
                    "unknown_param",
                    format!("unknown parameter `{base}.{key}`{hint}"),
                ));
                continue;
            };
            if !templated.contains(key) && !spec.kind.accepts(value.get_ref()) {
                diagnostics.push(document.diagnostic(
                    &value.span(),
                    "param_type",
                    format!(
                        "`{base}.{key}`: invalid type: {}, expected {}",
                        document::type_name(value.get_ref()),
                        spec.kind.name()
                    ),
                ));
            }
        }
        for (param, spec) in &self.params {
            if spec.required && spec.default.is_none() && !entries.iter().any(|(key, _, _)| key == param) {
                let span = with.map_or(at.clone(), Spanned::span);
                diagnostics.push(document.diagnostic(
                    &span,
                    "missing_param",
                    format!("missing required parameter `{base}.{param}` of plugin `{}`", self.name),
                ));
            }
        }
        diagnostics
    }
}

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

/// Exactly the section named by `kind` must be present.
fn check_sections(
    document: &Document,
    root: &SpannedValue<'_>,
    raw: &RawPlugin,
    diagnostics: &mut Vec<Diagnostic>,
) -> Option<PluginAction> {
    let kind = raw.kind.as_ref()?;
    let present = [
        (PluginKind::Prompt, raw.prompt.is_some()),
        (PluginKind::Command, raw.command.is_some()),
        (PluginKind::Http, raw.http.is_some()),
    ];
    for (section, is_present) in present {
        if is_present && section != *kind.get_ref() {
            let span = document::key_span(root, section.name()).unwrap_or(0..0);
            diagnostics.push(document.diagnostic(
                &span,
                "section_mismatch",
                format!(
                    "section `[{}]` does not belong in a plugin of kind `{}`; use `[{}]` or change `kind`",
                    section.name(),
                    kind.get_ref().name(),
                    kind.get_ref().name()
                ),
            ));
        }
    }
    let action = match kind.get_ref() {
        PluginKind::Prompt => raw.prompt.clone().map(PluginAction::Prompt),
        PluginKind::Command => raw.command.clone().map(PluginAction::Command),
        PluginKind::Http => raw.http.clone().map(PluginAction::Http),
    };
    if action.is_none() {
        let name = kind.get_ref().name();
        diagnostics.push(document.diagnostic(
            &kind.span(),
            "section_mismatch",
            format!("a plugin of kind `{name}` needs a `[{name}]` section"),
        ));
    }
    action
}

/// Every template of the kind's section must parse and read only `params.<declared>`, `env.<declared>` and `job`.
fn check_templates(
    document: &Document,
    root: &SpannedValue<'_>,
    raw: &RawPlugin,
    env: &[String],
    diagnostics: &mut Vec<Diagnostic>,
) {
    let Some(kind) = &raw.kind else { return };
    let mut sites: Vec<(String, Range<usize>, String)> = Vec::new();
    let paths: &[&[&str]] = match kind.get_ref() {
        PluginKind::Prompt => &[&["prompt", "system"], &["prompt", "user"]],
        PluginKind::Command => &[&["command", "args"]],
        PluginKind::Http => &[&["http", "url"], &["http", "headers"], &["http", "json"]],
    };
    for path in paths {
        if let Some(value) = document::get_path(root, path) {
            document::visit_strings(value, &path.join("."), &mut |location, span, text| {
                if template::is_template(text) {
                    sites.push((location.to_string(), span, text.to_string()));
                }
            });
        }
    }
    let params: Vec<&str> = raw.params.keys().map(String::as_str).collect();
    for (location, span, text) in sites {
        let references = match template::check(document, &span, &text, &location, false) {
            Ok(references) => references,
            Err(diagnostic) => {
                diagnostics.push(diagnostic);
                continue;
            }
        };
        for reference in references {
            let at = reference.offset..reference.offset;
            let member = template::member(&reference.path);
            let problem = match (template::root(&reference.path), member) {
                ("job", _) | ("params" | "env", None) => None,
                ("params", Some(name)) if params.contains(&name) => None,
                ("params", Some(name)) => Some((
                    "unknown_param",
                    format!(
                        "`{location}` reads `params.{name}`, which is not declared in `[params]`{}",
                        hint(name, &params)
                    ),
                )),
                ("env", Some(name)) if env.iter().any(|declared| declared == name) => None,
                ("env", Some(name)) => Some((
                    "undeclared_env",
                    format!("`{location}` reads `env.{name}`, which is not listed in `env`; add it there"),
                )),
                (other, _) => Some((
                    "unknown_variable",
                    format!(
                        "`{location}` reads unknown variable `{other}`; plugin templates can read params, env and job"
                    ),
                )),
            };
            if let Some((code, message)) = problem {
                diagnostics.push(document.diagnostic(&at, code, message));
            }
        }
    }
}

/// The `[output]` JSON Schema must itself be valid (checked against the meta-schema and for misspelled
/// keywords such as `requierd`, which JSON Schema would silently ignore) and compile; it is compiled here, once.
fn check_output(
    document: &Document,
    root: &SpannedValue<'_>,
    raw: &RawPlugin,
    diagnostics: &mut Vec<Diagnostic>,
) -> Option<OutputSchema> {
    let output = raw.output.as_ref()?;
    match OutputSchema::compile(serde_json::Value::Object(output.clone())) {
        Ok(schema) => Some(schema),
        Err(error) => {
            for problem in &error.problems {
                let code = if problem.unknown_keyword { "unknown_key" } else { "invalid_schema" };
                diagnostics.push(document.diagnostic(&schema_span(root, problem), code, problem.describe("output")));
            }
            None
        }
    }
}

/// Where a schema problem is in the file: the unknown keyword itself, or the offending value; as deep as the
/// path can be followed, and `[output]` at worst.
fn schema_span(root: &SpannedValue<'_>, problem: &SchemaProblem) -> Range<usize> {
    let mut span = document::key_span(root, "output").unwrap_or(0..0);
    let Some(mut value) = document::get(root, "output") else { return span };
    for (index, step) in problem.path.iter().enumerate() {
        let next = match (value.get_ref(), step) {
            (DeValue::Table(table), Step::Key(key)) => {
                table.iter().find(|(name, _)| name.get_ref() == key).map(|(name, item)| (name.span(), item))
            }
            (DeValue::Array(items), Step::Index(position)) => items.get(*position).map(|item| (item.span(), item)),
            _ => None,
        };
        let Some((key, item)) = next else { break };
        span = if index + 1 == problem.path.len() && problem.unknown_keyword { key } else { item.span() };
        value = item;
    }
    span
}

fn hint(given: &str, candidates: &[&str]) -> String {
    suggest::closest(given, candidates).map(|name| format!("; did you mean `{name}`?")).unwrap_or_default()
}

fn valid_plugin_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

fn valid_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_uppercase() || c == '_')
        && chars.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}
