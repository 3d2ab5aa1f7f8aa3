//! Pipelines: the stage DAGs declared in `pipelines/NAME.toml` (DESIGN §3).
//!
//! Loading is a compile step: `raw` holds the file as written, `compile` checks it against the known stage
//! kinds and reports every problem at once with `file:line:column`, and the result is an immutable
//! [`Pipeline`] whose stages form a [`StageGraph`]. Nothing runs from a pipeline that did not compile.

pub mod compile;
pub mod document;
pub mod error;
pub mod graph;
pub mod raw;
pub mod suggest;
pub mod template;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

pub use error::{Diagnostic, LoadError};
pub use graph::StageGraph;
pub use raw::{OnFailure, Trigger};

use crate::stage::StageKind;

/// A checked pipeline, ready to run.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// The name, equal to the file stem.
    pub name: String,
    /// One line for people.
    pub description: Option<String>,
    /// The file it came from.
    pub file: PathBuf,
    /// The stages in topological order (needs first, then declaration order).
    pub stages: Vec<StageSpec>,
    /// The dependency graph.
    pub graph: StageGraph,
}

impl Pipeline {
    /// The stage with id `id`.
    pub fn stage(&self, id: &str) -> Option<&StageSpec> {
        self.stages.iter().find(|stage| stage.id == id)
    }
}

/// One checked stage, with every default filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct StageSpec {
    /// The stage id.
    pub id: String,
    /// What `uses` names.
    pub uses: StageKind,
    /// Stages that must finish first.
    pub needs: Vec<String>,
    /// The `with` table, still holding its templates.
    pub with: toml::Table,
    /// The `if` expression.
    pub condition: Option<String>,
    /// When the stage may run.
    pub trigger: Trigger,
    /// The `for_each` expression.
    pub for_each: Option<String>,
    /// Items of `for_each` run at once.
    pub max_parallel: u32,
    /// Time allowed for one attempt.
    pub timeout: Duration,
    /// How failed attempts are retried.
    pub retry: RetryPolicy,
    /// Share of the job's progress bar.
    pub weight: u32,
    /// What a failure does to the job.
    pub on_failure: OnFailure,
}

/// How failed attempts of a stage are retried: exponential backoff, capped.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RetryPolicy {
    /// Attempts in all, including the first.
    pub max_attempts: u32,
    /// Wait before the first retry.
    pub initial_interval: Duration,
    /// Growth factor of the wait.
    pub backoff_coefficient: f64,
    /// Longest wait.
    pub max_interval: Duration,
}

impl Default for RetryPolicy {
    /// Three attempts, 2 s then 4 s apart: enough to ride out a provider hiccup without hiding a real outage.
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_interval: Duration::from_secs(2),
            backoff_coefficient: 2.0,
            max_interval: Duration::from_secs(60),
        }
    }
}

/// Default time allowed for one attempt of one stage: long enough to transcode or transcribe a long recording.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Default number of `for_each` items that run at once.
pub const DEFAULT_MAX_PARALLEL: u32 = 4;

/// The `*.toml` files of a folder, sorted by name.
///
/// # Errors
/// The I/O error when the folder cannot be listed.
pub fn toml_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "toml") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}
