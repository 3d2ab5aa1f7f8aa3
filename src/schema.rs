//! JSON Schemas (draft-07, which Taplo / Even Better TOML understand) for pipeline and plugin files, generated
//! from the same Rust types that load them, so that editors complete and check exactly what the loader accepts.
//!
//! The pipeline schema also ties each builtin kind to its `with` parameters (`if uses = "transcode" then with
//! is TranscodeParams`), so `stages.*.with` completes in an editor. `schema/*.schema.json` are checked in and a
//! test fails when they drift from this code; `echo-worker schema` regenerates them.

use std::path::{Path, PathBuf};

use schemars::generate::SchemaSettings;
use serde_json::{Value, json};

use crate::pipeline::raw::RawPipeline;
use crate::plugin::RawPlugin;
use crate::stage::BuiltinKind;

/// File name of the pipeline schema inside the schema folder.
pub const PIPELINE_SCHEMA_FILE: &str = "pipeline.schema.json";
/// File name of the plugin schema inside the schema folder.
pub const PLUGIN_SCHEMA_FILE: &str = "plugin.schema.json";

/// The schema of `pipelines/*.toml`.
pub fn pipeline_schema() -> Value {
    let mut generator = SchemaSettings::draft07().into_generator();
    let conditions: Vec<Value> = BuiltinKind::ALL
        .iter()
        .map(|kind| {
            let params = kind.params_schema(&mut generator);
            json!({
                "if": { "properties": { "uses": { "const": kind.name() } }, "required": ["uses"] },
                "then": { "properties": { "with": params } }
            })
        })
        .collect();
    let mut schema = generator.into_root_schema_for::<RawPipeline>().to_value();
    if let Some(stage) = schema.pointer_mut("/definitions/RawStage").and_then(Value::as_object_mut) {
        stage.insert("allOf".into(), Value::Array(conditions));
        let builtins: Vec<&str> = BuiltinKind::ALL.iter().map(|kind| kind.name()).collect();
        if let Some(uses) = stage.get_mut("properties").and_then(|p| p.get_mut("uses")).and_then(Value::as_object_mut) {
            uses.insert("examples".into(), json!(builtins));
        }
    }
    schema
}

/// The schema of `plugins/*.toml`.
pub fn plugin_schema() -> Value {
    SchemaSettings::draft07().into_generator().into_root_schema_for::<RawPlugin>().to_value()
}

/// Both schemas as `(file name, pretty JSON with a final newline)`.
pub fn rendered() -> [(&'static str, String); 2] {
    let render = |value: Value| {
        let mut text = serde_json::to_string_pretty(&value).expect("a JSON value always serializes");
        text.push('\n');
        text
    };
    [(PIPELINE_SCHEMA_FILE, render(pipeline_schema())), (PLUGIN_SCHEMA_FILE, render(plugin_schema()))]
}

/// Writes both schemas into `dir`, creating it, and returns the paths written.
///
/// # Errors
/// The I/O error and the path it happened on.
pub fn write(dir: &Path) -> Result<Vec<PathBuf>, (PathBuf, std::io::Error)> {
    std::fs::create_dir_all(dir).map_err(|error| (dir.to_path_buf(), error))?;
    rendered()
        .into_iter()
        .map(|(name, text)| {
            let path = dir.join(name);
            std::fs::write(&path, text).map(|()| path.clone()).map_err(|error| (path, error))
        })
        .collect()
}
