//! `persist`: writes the mapped fields and the final status to the recording in the store.
//! Parameters only for now; the behaviour arrives with the store.

use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `with` parameters of `persist`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PersistParams {
    /// Result fields to write, each usually one `{{ stages.<id>... }}` template; stored in `result`, and in
    /// a column of the same name where the table has one.
    #[serde(default)]
    pub fields: IndexMap<String, serde_json::Value>,
    /// The transcript text to store in the `transcript` column.
    pub transcript: Option<String>,
}
