//! The pipeline file exactly as written (`pipelines/NAME.toml`, DESIGN §3): serde types that refuse unknown
//! keys and keep the spans that later checks point at. Nothing here is validated beyond its shape;
//! `compile` turns these into a [`Pipeline`](super::Pipeline).
//!
//! Required keys (`name`, `uses`) are `Option` so that a missing one is reported by `compile` next to every
//! other problem instead of stopping serde; the schema still marks them required.

use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::units::HumanDuration;

/// A whole pipeline file.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "echo-worker pipeline", extend("required" = ["name", "stages"]))]
pub struct RawPipeline {
    /// The pipeline's name; it must equal the file name without `.toml`.
    #[schemars(with = "String")]
    pub name: Option<Spanned<String>>,
    /// One line for people choosing a pipeline.
    pub description: Option<String>,
    /// Settings every stage inherits unless it sets its own.
    #[serde(default)]
    pub defaults: RawDefaults,
    /// The stages, keyed by stage id (`[a-z][a-z0-9_]*`).
    #[serde(default)]
    #[schemars(with = "IndexMap<String, RawStage>")]
    pub stages: IndexMap<Spanned<String>, RawStage>,
}

/// Defaults for every stage of the pipeline.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawDefaults {
    /// Time allowed for one attempt of one stage (default `"30m"`).
    pub timeout: Option<HumanDuration>,
    /// Retry policy for failed attempts.
    pub retry: Option<RawRetry>,
    /// How many items of a `for_each` stage run at once (default 4).
    pub max_parallel: Option<u32>,
}

/// A retry policy; every field falls back to the pipeline default, then to the built-in default.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    /// Attempts in all, including the first (default 3; 1 means no retry; at most 100).
    #[schemars(range(min = 1, max = 100))]
    pub max_attempts: Option<u32>,
    /// Wait before the first retry (default `"2s"`).
    pub initial_interval: Option<HumanDuration>,
    /// Each wait is the previous one times this (default 2.0, at least 1.0).
    #[schemars(range(min = 1.0))]
    pub backoff_coefficient: Option<f64>,
    /// Longest wait between attempts (default `"1m"`).
    pub max_interval: Option<HumanDuration>,
}

/// Most attempts a retry policy may ask for: a stage that fails quickly with `initial_interval = "0s"` would
/// otherwise spin through billions of attempts.
pub const MAX_ATTEMPTS: u32 = 100;

impl RawRetry {
    /// What is wrong with the values, as `(field, message)` pairs; `dotted` is the policy's path in the file.
    pub fn problems(&self, dotted: &str) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        match self.max_attempts {
            Some(0) => problems.push(("max_attempts", format!("`{dotted}.max_attempts` must be at least 1"))),
            Some(attempts) if attempts > MAX_ATTEMPTS => problems.push((
                "max_attempts",
                format!("`{dotted}.max_attempts` is {attempts}; at most {MAX_ATTEMPTS} attempts are allowed"),
            )),
            _ => {}
        }
        if self.backoff_coefficient.is_some_and(|c| !(c >= 1.0 && c.is_finite())) {
            problems.push(("backoff_coefficient", format!("`{dotted}.backoff_coefficient` must be at least 1.0")));
        }
        problems
    }
}

/// One stage of a pipeline.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("required" = ["uses"]))]
pub struct RawStage {
    /// The stage kind: a builtin (`validate`, `download`, `transcode`, `whisper`, `analyze`, `persist`) or the
    /// name of a plugin in `plugins/`.
    #[schemars(with = "String")]
    pub uses: Option<Spanned<String>>,
    /// Stages that must finish before this one starts; their outputs are readable as `stages.<id>`.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub needs: Vec<Spanned<String>>,
    /// Parameters of the kind. Strings are minijinja templates over `job`, `stages`, and `item`/`index`
    /// inside `for_each`; a value that is exactly one `{{ expr }}` keeps the expression's type.
    #[serde(default)]
    #[schemars(with = "serde_json::Map<String, serde_json::Value>")]
    pub with: toml::Table,
    /// An expression (no `{{ }}`); when it is false the stage is skipped.
    #[serde(rename = "if")]
    #[schemars(with = "Option<String>")]
    pub condition: Option<Spanned<String>>,
    /// When the stage may run, given how its needs ended (default `all_success`).
    pub trigger: Option<Trigger>,
    /// An expression yielding a list; the stage runs once per item and its outputs are collected in order.
    #[schemars(with = "Option<String>")]
    pub for_each: Option<Spanned<String>>,
    /// How many `for_each` items run at once.
    #[schemars(range(min = 1))]
    pub max_parallel: Option<u32>,
    /// Time allowed for one attempt.
    pub timeout: Option<HumanDuration>,
    /// Retry policy, merged over the pipeline defaults.
    pub retry: Option<RawRetry>,
    /// Share of the job's progress bar (default depends on the kind).
    pub weight: Option<u32>,
    /// `fail` (default) fails the job; `continue` records the failure and goes on.
    pub on_failure: Option<OnFailure>,
    /// A note for people reading the pipeline.
    pub description: Option<String>,
}

/// When a stage runs, given the outcomes of the stages it needs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// Every need succeeded (skipped needs skip this stage too).
    #[default]
    AllSuccess,
    /// Every need ended, whatever the outcome.
    AllDone,
    /// No need failed; skipped needs are fine.
    NoneFailed,
}

/// What a failure of the stage does to the job.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// The job fails.
    #[default]
    Fail,
    /// The stage is recorded as failed and the job goes on.
    Continue,
}
