//! Plugins: new stage kinds declared in `plugins/NAME.toml` with no Rust code (ARCHITECTURE.md). A plugin is a
//! `prompt` (chat completion with a JSON output schema), a `command` (external program) or an `http` call,
//! with typed `[params]` that pipelines fill through `with`.
//!
//! Loading checks everything a plugin file can get wrong on its own (shape, kind and section, templates,
//! declared params and env names, the `[output]` JSON Schema) and reports every problem with its position,
//! like pipelines. `raw` holds the file as written, `load` checks it into a [`Plugin`], `render` fills its
//! templates when a stage runs, and `command`, `http` and `prompt` run the three kinds.

pub mod command;
pub mod http;
pub mod load;
pub mod prompt;
pub mod raw;
pub mod render;

use std::collections::BTreeSet;
use std::path::PathBuf;

use indexmap::IndexMap;

use crate::ai::jsonschema::OutputSchema;
use crate::document::Diagnostic;
use crate::retry::RawRetry;
use crate::units::HumanDuration;

pub use command::CommandSection;
pub use http::HttpSection;
pub use prompt::PromptSection;
pub use raw::{ParamSpec, ParamType, PluginKind, RawPlugin};

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
