//! The `command` plugin kind: an external program run in the job's work directory with the params as JSON on
//! stdin and JSON expected on stdout. The section is declared here; running it arrives with the engine.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The `[command]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandSection {
    /// The program: a path relative to the plugin's folder, or a name looked up on `PATH`. Never a template.
    pub program: String,
    /// Argument templates.
    #[serde(default)]
    pub args: Vec<String>,
}
