//! Loading a plugin file: every problem it can have on its own (shape, kind and section, templates, declared
//! params and env names, the `[output]` JSON Schema), each at its position, into a checked [`Plugin`].

use std::ops::Range;
use std::path::Path;

use toml::Spanned;
use toml::de::DeValue;

use crate::ai::jsonschema::{OutputSchema, SchemaProblem, Step};
use crate::document::{self, Diagnostic, Document, SpannedValue, suggest};
use crate::stage::BuiltinKind;
use crate::template::{self};

use super::raw::{PluginKind, RawPlugin};
use super::{Plugin, PluginAction, PluginSet};

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
