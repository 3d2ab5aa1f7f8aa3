//! Pipelines: the stage DAGs declared in `pipelines/NAME.toml` (ARCHITECTURE.md).
//!
//! Loading is a compile step: `raw` holds the file as written, `compile` checks it against the known stage
//! kinds and reports every problem at once with `file:line:column`, and the result is an immutable
//! [`Pipeline`] whose stages form a [`StageGraph`]. Nothing runs from a pipeline that did not compile.

pub mod compile;
pub mod graph;
pub mod raw;

use std::path::PathBuf;
use std::time::Duration;

pub use graph::StageGraph;
pub use raw::{OnFailure, Trigger};

use crate::retry::RetryPolicy;
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

/// Default time allowed for one attempt of one stage: long enough to transcode or transcribe a long recording.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Default number of `for_each` items that run at once.
pub const DEFAULT_MAX_PARALLEL: u32 = 4;
