//! Compiles a pipeline file into a [`Pipeline`]: resolves every `uses`, builds the DAG, checks templates and
//! `with` parameters, and collects **every** problem with its position instead of stopping at the first.
//!
//! The checks, in order: TOML syntax; shape (unknown keys, wrong types, bad durations and sizes); the name
//! against the file stem; stage ids; `uses` (with a did-you-mean); `needs` (unknown or repeated); cycles (as
//! whole chains); retry values; templates (syntax, and `stages.X` only for ancestors X); and `with` against the
//! kind's parameters. A stage whose shape was already refused is not checked further, so one mistake never
//! shows up as several.

use std::collections::BTreeSet;
use std::ops::Range;

use toml::Spanned;

use super::raw::{RawPipeline, RawStage};
use super::{DEFAULT_MAX_PARALLEL, DEFAULT_TIMEOUT, Pipeline, StageGraph, StageSpec};
use crate::document::{self, Diagnostic, Document, SpannedValue, suggest};
use crate::plugin::PluginSet;
use crate::retry::{RawRetry, RetryPolicy};
use crate::stage::{BuiltinKind, StageKind};
use crate::template;

/// Progress weight of a kind registered in code.
const CUSTOM_WEIGHT: u32 = 5;

/// Fields of `job` that templates may read.
const JOB_FIELDS: [&str; 5] = ["id", "recording_id", "pipeline", "params", "source"];

/// Compiles one pipeline file against the builtin kinds, the loaded plugins and any kinds registered in code
/// (`custom_kinds`, whose `with` is not checked).
///
/// # Errors
/// Every problem found in the file, in file order.
pub fn compile(document: &Document, plugins: &PluginSet, custom_kinds: &[String]) -> Result<Pipeline, Vec<Diagnostic>> {
    let root = document.parse()?;
    let parsed = document.deserialize::<RawPipeline>(&root, "", &[]);
    let mut diagnostics = parsed.diagnostics;
    let Some(raw) = parsed.value else { return Err(diagnostics) };
    // Entries refused above were already reported; checks that depend on them are skipped so that one
    // mistake never shows up twice.
    let refused = |id: &str, field: &str| parsed.removed.iter().any(|path| *path == format!("stages.{id}.{field}"));
    let mut checker = Checker { document, root: &root, plugins, custom_kinds, diagnostics: &mut diagnostics };

    let name = checker.name(&raw);
    if raw.stages.is_empty() && !parsed.removed.iter().any(|path| path == "stages") {
        checker.report(0..0, "no_stages", "pipeline has no stages; add a `[stages.<id>]` table");
    }
    let ids: Vec<&str> = raw.stages.keys().map(|key| key.get_ref().as_str()).collect();
    let mut kinds = Vec::with_capacity(ids.len());
    let mut edges = Vec::new();
    for (key, stage) in &raw.stages {
        checker.stage_id(key);
        kinds.push(if refused(key.get_ref(), "uses") { None } else { checker.kind(key, stage) });
        edges.extend(checker.needs(key, stage, &ids).into_iter().map(|need| (need, key.get_ref().as_str())));
    }
    let graph = StageGraph::new(ids.iter().copied(), edges);
    for chain in graph.cycles() {
        checker.cycle(&raw, &chain);
    }
    checker.retry(raw.defaults.retry.as_ref(), &["defaults", "retry"]);
    for ((key, stage), kind) in raw.stages.iter().zip(&kinds) {
        let id = key.get_ref().as_str();
        checker.retry(stage.retry.as_ref(), &["stages", id, "retry"]);
        if !refused(id, "needs") {
            checker.templates(id, stage, &graph.ancestors(id), &ids);
        }
        if let Some(kind) = kind.as_ref().filter(|_| !refused(id, "with")) {
            checker.params(id, stage, kind);
        }
    }

    if !diagnostics.is_empty() {
        diagnostics.sort_by_key(|diagnostic| (diagnostic.line, diagnostic.column));
        return Err(diagnostics);
    }
    let order = graph.topological_order().unwrap_or_default();
    let stages = order
        .iter()
        .filter_map(|id| {
            let index = ids.iter().position(|candidate| candidate == id)?;
            let (_, stage) = raw.stages.get_index(index)?;
            Some(stage_spec(id, stage, kinds[index].clone()?, &raw, plugins))
        })
        .collect();
    Ok(Pipeline { name, description: raw.description, file: document.file.clone(), stages, graph })
}

/// Fills every default of one stage: stage value, then plugin value, then pipeline default, then built-in.
fn stage_spec(id: &str, stage: &RawStage, uses: StageKind, raw: &RawPipeline, plugins: &PluginSet) -> StageSpec {
    let plugin = match &uses {
        StageKind::Plugin(name) => plugins.plugins.get(name),
        StageKind::Builtin(_) | StageKind::Custom(_) => None,
    };
    let weight = match &uses {
        StageKind::Builtin(kind) => kind.default_weight(),
        StageKind::Plugin(_) | StageKind::Custom(_) => plugin.map_or(CUSTOM_WEIGHT, |plugin| plugin.weight),
    };
    let layers = [stage.retry.as_ref(), plugin.and_then(|p| p.retry.as_ref()), raw.defaults.retry.as_ref()];
    let base = RetryPolicy::default();
    let pick = |field: fn(&RawRetry) -> Option<_>| layers.iter().flatten().find_map(|layer| field(layer));
    let retry = RetryPolicy {
        max_attempts: layers.iter().flatten().find_map(|l| l.max_attempts).unwrap_or(base.max_attempts),
        initial_interval: pick(|l| l.initial_interval).map_or(base.initial_interval, |d| d.0),
        backoff_coefficient: layers
            .iter()
            .flatten()
            .find_map(|l| l.backoff_coefficient)
            .unwrap_or(base.backoff_coefficient),
        max_interval: pick(|l| l.max_interval).map_or(base.max_interval, |d| d.0),
    };
    StageSpec {
        id: id.to_string(),
        uses,
        needs: stage.needs.iter().map(|need| need.get_ref().clone()).collect(),
        with: stage.with.clone(),
        condition: stage.condition.as_ref().map(|c| c.get_ref().clone()),
        trigger: stage.trigger.unwrap_or_default(),
        for_each: stage.for_each.as_ref().map(|f| f.get_ref().clone()),
        max_parallel: stage.max_parallel.or(raw.defaults.max_parallel).unwrap_or(DEFAULT_MAX_PARALLEL),
        timeout: stage
            .timeout
            .or(plugin.and_then(|p| p.timeout))
            .or(raw.defaults.timeout)
            .map_or(DEFAULT_TIMEOUT, |d| d.0),
        retry,
        weight: stage.weight.unwrap_or(weight),
        on_failure: stage.on_failure.unwrap_or_default(),
    }
}

/// The checks, sharing the document and the list they report into.
struct Checker<'a, 'i> {
    document: &'a Document,
    root: &'a SpannedValue<'i>,
    plugins: &'a PluginSet,
    custom_kinds: &'a [String],
    diagnostics: &'a mut Vec<Diagnostic>,
}

impl Checker<'_, '_> {
    fn report(&mut self, span: Range<usize>, code: &'static str, message: impl Into<String>) {
        self.diagnostics.push(self.document.diagnostic(&span, code, message));
    }

    fn name(&mut self, raw: &RawPipeline) -> String {
        let stem = self.document.stem();
        match &raw.name {
            None => self.report(0..0, "missing_key", format!("missing required key `name`; add `name = \"{stem}\"`")),
            Some(name) if name.get_ref() != &stem => self.report(
                name.span(),
                "name_mismatch",
                format!("pipeline name `{}` does not match its file name `{stem}.toml`", name.get_ref()),
            ),
            Some(_) => {}
        }
        stem
    }

    fn stage_id(&mut self, key: &Spanned<String>) {
        let id = key.get_ref();
        let mut chars = id.chars();
        let valid = chars.next().is_some_and(|c| c.is_ascii_lowercase())
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid {
            self.report(
                key.span(),
                "invalid_stage_id",
                format!("invalid stage id `{id}`: use lowercase letters, digits and `_`, starting with a letter"),
            );
        }
    }

    fn kind(&mut self, key: &Spanned<String>, stage: &RawStage) -> Option<StageKind> {
        let Some(uses) = &stage.uses else {
            self.report(key.span(), "missing_key", format!("stage `{}` has no `uses`", key.get_ref()));
            return None;
        };
        let name = uses.get_ref();
        if let Some(kind) = BuiltinKind::from_name(name) {
            return Some(StageKind::Builtin(kind));
        }
        if self.plugins.plugins.contains_key(name) {
            return Some(StageKind::Plugin(name.clone()));
        }
        if self.custom_kinds.contains(name) {
            return Some(StageKind::Custom(name.clone()));
        }
        if self.plugins.broken.contains(name) {
            return None; // The plugin file's own errors are already listed.
        }
        let mut known: Vec<&str> = BuiltinKind::ALL.iter().map(|kind| kind.name()).collect();
        known.extend(self.plugins.plugins.keys().map(String::as_str));
        known.extend(self.custom_kinds.iter().map(String::as_str));
        let hint = match suggest::closest(name, &known) {
            Some(close) => format!("did you mean `{close}`?"),
            None => format!("known kinds: {}", known.join(", ")),
        };
        self.report(
            uses.span(),
            "unknown_kind",
            format!("stage `{}` uses unknown kind `{name}`: no builtin or plugin has that name; {hint}", key.get_ref()),
        );
        None
    }

    /// Checks `needs` and returns the valid ones.
    fn needs<'s>(&mut self, key: &Spanned<String>, stage: &'s RawStage, ids: &[&str]) -> Vec<&'s str> {
        let mut valid = Vec::new();
        for (index, need) in stage.needs.iter().enumerate() {
            let name = need.get_ref().as_str();
            if stage.needs[..index].iter().any(|earlier| earlier.get_ref() == name) {
                self.report(
                    need.span(),
                    "duplicate_need",
                    format!("stage `{}` lists `{name}` in `needs` twice", key.get_ref()),
                );
            } else if !ids.contains(&name) {
                let hint = suggest::closest(name, ids).map(|close| format!("; did you mean `{close}`?"));
                self.report(
                    need.span(),
                    "unknown_need",
                    format!(
                        "stage `{}` needs `{name}`, which is not a stage{}",
                        key.get_ref(),
                        hint.unwrap_or_default()
                    ),
                );
            } else {
                valid.push(name);
            }
        }
        valid
    }

    /// Reports a cycle at the `needs` entry that closes it.
    fn cycle(&mut self, raw: &RawPipeline, chain: &[String]) {
        let first = &chain[0];
        let closing = &chain[chain.len().saturating_sub(2)];
        let span = raw
            .stages
            .iter()
            .find(|(key, _)| key.get_ref() == first)
            .and_then(|(_, stage)| stage.needs.iter().find(|need| need.get_ref() == closing))
            .map_or(0..0, Spanned::span);
        self.report(
            span,
            "cycle",
            format!("dependency cycle: {} (each stage needs the one before it)", chain.join(" -> ")),
        );
    }

    fn retry(&mut self, retry: Option<&RawRetry>, path: &[&str]) {
        let Some(retry) = retry else { return };
        let at = |field: &str| {
            let mut full = path.to_vec();
            full.push(field);
            document::get_path(self.root, &full).map_or(0..0, Spanned::span)
        };
        for (field, message) in retry.problems(&path.join(".")) {
            let span = at(field);
            self.report(span, "invalid_value", message);
        }
    }

    /// Checks the templates in `with` and the `if` / `for_each` expressions of one stage.
    fn templates(&mut self, id: &str, stage: &RawStage, ancestors: &BTreeSet<String>, ids: &[&str]) {
        let mut sites: Vec<(String, Range<usize>, String, bool)> = Vec::new();
        if let Some(with) = document::get_path(self.root, &["stages", id, "with"]) {
            document::visit_strings(with, &format!("stages.{id}.with"), &mut |location, span, text| {
                if template::is_template(text) {
                    sites.push((location.to_string(), span, text.to_string(), false));
                }
            });
        }
        for (field, value) in [("if", &stage.condition), ("for_each", &stage.for_each)] {
            if let Some(value) = value {
                sites.push((format!("stages.{id}.{field}"), value.span(), value.get_ref().clone(), true));
            }
        }
        for (location, span, text, expression) in sites {
            let references = match template::check(self.document, &span, &text, &location, expression) {
                Ok(references) => references,
                Err(diagnostic) => {
                    self.diagnostics.push(diagnostic);
                    continue;
                }
            };
            let item_allowed = stage.for_each.is_some() && !expression;
            for reference in references {
                if let Some((code, message)) =
                    reference_problem(&reference.path, &location, id, ancestors, ids, item_allowed)
                {
                    self.report(reference.offset..reference.offset, code, message);
                }
            }
        }
    }

    /// Checks `with` against the kind's parameters.
    fn params(&mut self, id: &str, stage: &RawStage, kind: &StageKind) {
        let base = format!("stages.{id}.with");
        let with = document::get_path(self.root, &["stages", id, "with"]);
        let templated: Vec<String> = stage
            .with
            .iter()
            .filter(|(_, value)| value.as_str().and_then(template::whole_expression).is_some())
            .map(|(key, _)| key.clone())
            .collect();
        let found = match kind {
            StageKind::Builtin(builtin) => {
                let empty = Spanned::new(0..0, toml::de::DeValue::Table(Default::default()));
                let with_or_empty = with.unwrap_or(&empty);
                let mut found = builtin.check_params(self.document, with_or_empty, &base, &templated);
                for diagnostic in &mut found {
                    if with.is_none() {
                        let at = stage.uses.as_ref().map_or(0..0, Spanned::span);
                        let (line, column) = self.document.position(at.start);
                        (diagnostic.line, diagnostic.column) = (line, column);
                    }
                    as_param_diagnostic(diagnostic);
                }
                found
            }
            StageKind::Plugin(name) => {
                let Some(plugin) = self.plugins.plugins.get(name) else { return };
                let at = stage.uses.as_ref().map_or(0..0, Spanned::span);
                plugin.check_params(self.document, with, &base, &at, &templated)
            }
            StageKind::Custom(_) => return,
        };
        self.diagnostics.extend(found);
    }
}

/// Words `with` problems in terms of parameters rather than keys.
fn as_param_diagnostic(diagnostic: &mut Diagnostic) {
    let (code, from, to) = match diagnostic.code {
        "unknown_key" => ("unknown_param", "unknown key", "unknown parameter"),
        "missing_key" => ("missing_param", "missing required key", "missing required parameter"),
        "invalid_value" => ("param_type", "", ""),
        _ => return,
    };
    diagnostic.code = code;
    if !from.is_empty() {
        diagnostic.message = diagnostic.message.replacen(from, to, 1);
    }
}

/// What is wrong with a template reading `path` at `location` in stage `id`, if anything.
fn reference_problem(
    path: &str,
    location: &str,
    id: &str,
    ancestors: &BTreeSet<String>,
    ids: &[&str],
    item_allowed: bool,
) -> Option<(&'static str, String)> {
    let member = template::member(path);
    match (template::root(path), member) {
        ("job", None) => None,
        ("job", Some(field)) if JOB_FIELDS.contains(&field) => None,
        ("job", Some(field)) => Some((
            "unknown_variable",
            format!("`{location}` reads `job.{field}`; a job has: {}", JOB_FIELDS.join(", ")),
        )),
        ("stages", None) => None,
        ("stages", Some(other)) if other == id => {
            Some(("template_reference", format!("`{location}` reads `stages.{id}`, the stage's own output")))
        }
        ("stages", Some(other)) if !ids.contains(&other) => {
            let hint = suggest::closest(other, ids).map(|close| format!("; did you mean `{close}`?"));
            Some((
                "template_reference",
                format!("`{location}` reads `stages.{other}`, which is not a stage{}", hint.unwrap_or_default()),
            ))
        }
        ("stages", Some(other)) if !ancestors.contains(other) => Some((
            "template_reference",
            format!(
                "`{location}` reads `stages.{other}`, but `{other}` is not an ancestor of `{id}`; add it to `needs`"
            ),
        )),
        ("stages", Some(_)) => None,
        ("item" | "index", _) if item_allowed => None,
        (root @ ("item" | "index"), _) => Some((
            "unknown_variable",
            format!("`{location}` reads `{root}`, which only exists in the `with` of a stage with `for_each`"),
        )),
        ("env", _) => Some((
            "unknown_variable",
            format!(
                "`{location}` reads `env`; only plugins can read environment variables, and only those they declare"
            ),
        )),
        (other, _) => Some((
            "unknown_variable",
            format!("`{location}` reads unknown variable `{other}`; pipeline templates can read job and stages"),
        )),
    }
}
