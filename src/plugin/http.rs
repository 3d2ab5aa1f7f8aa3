//! The `http` plugin kind: one HTTP request built from templates; 5xx and 429 are retried, other 4xx are not.
//! The section is declared here; sending it arrives with the engine.

use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The `[http]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpSection {
    /// The request method (default `POST`).
    #[serde(default)]
    pub method: HttpMethod,
    /// URL template.
    pub url: String,
    /// Header templates; secrets come from declared `env` names, e.g. `"Bearer {{ env.HOOK_TOKEN }}"`.
    #[serde(default)]
    pub headers: IndexMap<String, String>,
    /// JSON body; every string in it is a template.
    pub json: Option<serde_json::Value>,
}

/// Methods an `http` plugin may use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    /// GET.
    Get,
    /// POST.
    #[default]
    Post,
    /// PUT.
    Put,
    /// PATCH.
    Patch,
    /// DELETE.
    Delete,
}
