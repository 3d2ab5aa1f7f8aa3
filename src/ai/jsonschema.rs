//! Output schemas: the JSON Schema a structured reply must fit (a `prompt` plugin's `[output]`, the `analyze`
//! stage's built-in one). Each is checked once, when it is loaded, against the JSON Schema meta-schema and for
//! misspelled keywords, and compiled once with the `jsonschema` crate; every model reply is then verified
//! against it, not trusted.
//!
//! Compiling is offline (a `$ref` can only point inside the schema) and `pattern` uses the linear-time `regex`
//! engine, so a schema cannot make the worker fetch anything or match for ever.

use std::fmt;
use std::sync::Arc;

use ::jsonschema::error::ValidationErrorKind;
use ::jsonschema::{PatternOptions, Validator};
use serde_json::Value;

use crate::document::suggest;

/// Every keyword of JSON Schema 2020-12, plus those of drafts 4–2019-09 that the validator still understands.
/// An object key outside this list, at the top level of a (sub)schema, is almost always a typo (`requierd`)
/// that would otherwise switch a check off without a word. Keys starting with `x-` are extensions and allowed.
const KEYWORDS: &[&str] = &[
    "$schema",
    "$id",
    "$anchor",
    "$dynamicAnchor",
    "$dynamicRef",
    "$ref",
    "$defs",
    "$vocabulary",
    "$comment",
    "$recursiveRef",
    "$recursiveAnchor",
    "definitions",
    "allOf",
    "anyOf",
    "oneOf",
    "not",
    "if",
    "then",
    "else",
    "dependentSchemas",
    "dependencies",
    "prefixItems",
    "items",
    "additionalItems",
    "contains",
    "properties",
    "patternProperties",
    "additionalProperties",
    "propertyNames",
    "unevaluatedItems",
    "unevaluatedProperties",
    "type",
    "enum",
    "const",
    "multipleOf",
    "maximum",
    "exclusiveMaximum",
    "minimum",
    "exclusiveMinimum",
    "maxLength",
    "minLength",
    "pattern",
    "maxItems",
    "minItems",
    "uniqueItems",
    "maxContains",
    "minContains",
    "maxProperties",
    "minProperties",
    "required",
    "dependentRequired",
    "format",
    "contentEncoding",
    "contentMediaType",
    "contentSchema",
    "title",
    "description",
    "default",
    "deprecated",
    "readOnly",
    "writeOnly",
    "examples",
];

/// The names `type` accepts.
const TYPES: &[&str] = &["array", "boolean", "integer", "null", "number", "object", "string"];

/// Longest description of one mismatch in an error; a model's reply can be long.
const MAX_PROBLEM_CHARS: usize = 400;

/// One step from a schema's root: an object key or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A key of an object.
    Key(String),
    /// An index into an array.
    Index(usize),
}

/// One thing wrong with a schema, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaProblem {
    /// The path from the schema's root to the offending value, or to the unknown keyword.
    pub path: Vec<Step>,
    /// The last step is a keyword JSON Schema does not know; `detail` is then a "did you mean" hint or empty.
    pub unknown_keyword: bool,
    /// What is wrong.
    pub detail: String,
}

impl SchemaProblem {
    /// A sentence naming the place, with `base` naming the schema's root (`output`).
    pub fn describe(&self, base: &str) -> String {
        let at = dotted(base, &self.path);
        if self.unknown_keyword {
            format!("unknown JSON Schema keyword `{at}`{}", self.detail)
        } else {
            format!("`{at}`: {}", self.detail)
        }
    }
}

/// `base.key[3].other`.
fn dotted(base: &str, path: &[Step]) -> String {
    let mut text = base.to_string();
    for step in path {
        match step {
            Step::Key(key) if text.is_empty() => text.push_str(key),
            Step::Key(key) => {
                text.push('.');
                text.push_str(key);
            }
            Step::Index(index) => text.push_str(&format!("[{index}]")),
        }
    }
    text
}

/// The schema is not a usable JSON Schema; every problem found is listed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid JSON Schema: {}", .problems.iter().map(|p| p.describe("schema")).collect::<Vec<_>>().join("; "))]
pub struct SchemaError {
    /// What is wrong, and where.
    pub problems: Vec<SchemaProblem>,
}

/// A checked and compiled JSON Schema, cheap to clone, with its source kept to send to providers.
#[derive(Clone)]
pub struct OutputSchema {
    schema: Arc<Value>,
    validator: Arc<Validator>,
}

impl fmt::Debug for OutputSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("OutputSchema").field(&self.schema).finish()
    }
}

impl OutputSchema {
    /// Checks `schema` against the meta-schema and for unknown keywords, then compiles it.
    ///
    /// # Errors
    /// [`SchemaError`] listing every problem: meta-schema violations, unknown keywords, and what compiling
    /// refuses (a `$ref` that leads nowhere, a `pattern` that is not a valid regular expression).
    pub fn compile(schema: Value) -> Result<Self, SchemaError> {
        let mut problems = Vec::new();
        match ::jsonschema::meta::validator_for(&schema) {
            Ok(meta) => {
                for error in meta.iter_errors(&schema) {
                    let path = steps(error.instance_path());
                    let detail =
                        unknown_type(&schema, &path).unwrap_or_else(|| format!("not valid JSON Schema: {error}"));
                    problems.push(SchemaProblem { path, unknown_keyword: false, detail });
                }
            }
            Err(error) => problems.push(SchemaProblem {
                path: steps(error.instance_path()),
                unknown_keyword: false,
                detail: format!("cannot check the schema: {error}"),
            }),
        }
        unknown_keywords(&schema, &mut Vec::new(), &mut problems);
        if !problems.is_empty() {
            return Err(SchemaError { problems });
        }
        let validator =
            ::jsonschema::options().offline().with_pattern_options(PatternOptions::regex()).build(&schema).map_err(
                |error| {
                    let mut path = steps(error.instance_path());
                    let detail = match error.kind() {
                        ValidationErrorKind::Format { format } if format == "regex" => format!(
                            "{} is not a valid regular expression (patterns use Rust's `regex` syntax: no look-around \
                         or back-references)",
                            error.instance()
                        ),
                        ValidationErrorKind::Referencing(reference) => {
                            path = unresolvable_ref(&schema, &schema, &mut Vec::new()).unwrap_or(path);
                            format!("`$ref` leads nowhere: {reference} (references can only point inside the schema)")
                        }
                        _ => format!("cannot compile the schema: {error}"),
                    };
                    SchemaError { problems: vec![SchemaProblem { path, unknown_keyword: false, detail }] }
                },
            )?;
        Ok(Self { schema: Arc::new(schema), validator: Arc::new(validator) })
    }

    /// The schema as written.
    pub fn schema(&self) -> &Value {
        &self.schema
    }

    /// `Ok` when `value` fits the schema; otherwise where and why it does not (the first mismatch, and how
    /// many more there are).
    ///
    /// # Errors
    /// A message starting with the JSON path of the first mismatch (`$.items[0].task`).
    pub fn check(&self, value: &Value) -> Result<(), String> {
        let mut errors = self.validator.iter_errors(value);
        let Some(first) = errors.next() else { return Ok(()) };
        let more = errors.count();
        let mut problem: String = first.to_string();
        if problem.chars().count() > MAX_PROBLEM_CHARS {
            problem = problem.chars().take(MAX_PROBLEM_CHARS).chain("…".chars()).collect();
        }
        let path = dotted("$", &steps(first.instance_path()));
        let more = match more {
            0 => String::new(),
            1 => " (and 1 more mismatch)".to_string(),
            n => format!(" (and {n} more mismatches)"),
        };
        Err(format!("{path}: {problem}{more}"))
    }
}

fn steps(location: &::jsonschema::paths::Location) -> Vec<Step> {
    location
        .iter()
        .map(|segment| match segment {
            ::jsonschema::paths::LocationSegment::Property(key) => Step::Key(key.into_owned()),
            ::jsonschema::paths::LocationSegment::Index(index) => Step::Index(index),
        })
        .collect()
}

/// A clearer sentence than the meta-schema's when the problem is a misspelled `type` name.
fn unknown_type(schema: &Value, path: &[Step]) -> Option<String> {
    if path.last() != Some(&Step::Key("type".into())) {
        return None;
    }
    let value = path.iter().try_fold(schema, |value, step| match step {
        Step::Key(key) => value.get(key),
        Step::Index(index) => value.get(index),
    })?;
    let names: Vec<&str> = match value {
        Value::String(name) => vec![name.as_str()],
        Value::Array(names) => names.iter().filter_map(Value::as_str).collect(),
        _ => return None,
    };
    let unknown = names.into_iter().find(|name| !TYPES.contains(name))?;
    let hint = suggest::closest(unknown, TYPES).map(|name| format!("; did you mean `{name}`?")).unwrap_or_default();
    Some(format!("unknown type `{unknown}`; expected one of: {}{hint}", TYPES.join(", ")))
}

/// The place of the first `$ref` that cannot resolve inside the schema: compile errors about references do
/// not say where the reference was. A `#/...` pointer must exist in the schema; a reference to another
/// document never resolves, since nothing is fetched; anchors (`#name`) are left to the compiler.
fn unresolvable_ref(root: &Value, value: &Value, path: &mut Vec<Step>) -> Option<Vec<Step>> {
    let children: Vec<(Step, &Value)> = match value {
        Value::Object(object) => {
            if let Some(Value::String(target)) = object.get("$ref") {
                let resolves = match target.strip_prefix('#') {
                    Some(pointer) if pointer.is_empty() || pointer.starts_with('/') => root.pointer(pointer).is_some(),
                    Some(_) => true,
                    None => false,
                };
                if !resolves {
                    let mut found = path.clone();
                    found.push(Step::Key("$ref".into()));
                    return Some(found);
                }
            }
            object.iter().map(|(key, item)| (Step::Key(key.clone()), item)).collect()
        }
        Value::Array(items) => items.iter().enumerate().map(|(index, item)| (Step::Index(index), item)).collect(),
        _ => return None,
    };
    for (step, item) in children {
        path.push(step);
        let found = unresolvable_ref(root, item, path);
        path.pop();
        if found.is_some() {
            return found;
        }
    }
    None
}

/// Reports every object key, at the top level of the schema and of each subschema, that is not a keyword.
fn unknown_keywords(schema: &Value, path: &mut Vec<Step>, problems: &mut Vec<SchemaProblem>) {
    let Value::Object(object) = schema else { return };
    for (key, value) in object {
        path.push(Step::Key(key.clone()));
        if !KEYWORDS.contains(&key.as_str()) && !key.starts_with("x-") {
            let detail = suggest::closest(key, KEYWORDS).map(|k| format!("; did you mean `{k}`?")).unwrap_or_default();
            problems.push(SchemaProblem { path: path.clone(), unknown_keyword: true, detail });
        } else {
            match (key.as_str(), value) {
                (
                    "additionalProperties"
                    | "additionalItems"
                    | "items"
                    | "contains"
                    | "propertyNames"
                    | "not"
                    | "if"
                    | "then"
                    | "else"
                    | "unevaluatedItems"
                    | "unevaluatedProperties"
                    | "contentSchema",
                    Value::Object(_),
                ) => unknown_keywords(value, path, problems),
                ("allOf" | "anyOf" | "oneOf" | "prefixItems" | "items", Value::Array(items)) => {
                    for (index, item) in items.iter().enumerate() {
                        path.push(Step::Index(index));
                        unknown_keywords(item, path, problems);
                        path.pop();
                    }
                }
                (
                    "properties" | "patternProperties" | "$defs" | "definitions" | "dependentSchemas" | "dependencies",
                    Value::Object(map),
                ) => {
                    for (name, item) in map {
                        path.push(Step::Key(name.clone()));
                        unknown_keywords(item, path, problems);
                        path.pop();
                    }
                }
                _ => {}
            }
        }
        path.pop();
    }
}

/// Whether OpenAI's strict mode accepts the schema: every object lists all its properties as required and
/// forbids others. Schemas that do not qualify are sent with `strict: false` and still checked here.
pub fn strict_compatible(schema: &Value) -> bool {
    match schema {
        Value::Object(object) => {
            let is_object = object.get("type").and_then(Value::as_str) == Some("object");
            if is_object {
                let properties = object.get("properties").and_then(Value::as_object);
                let required: Vec<&str> = object
                    .get("required")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                let all_required = properties.is_none_or(|p| p.keys().all(|key| required.contains(&key.as_str())));
                if !all_required || object.get("additionalProperties") != Some(&Value::Bool(false)) {
                    return false;
                }
            }
            object.values().all(strict_compatible)
        }
        Value::Array(items) => items.iter().all(strict_compatible),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn compile(schema: Value) -> OutputSchema {
        OutputSchema::compile(schema).unwrap()
    }

    #[test]
    fn checks_objects_arrays_and_enums_with_a_path_to_the_mismatch() {
        let schema = compile(json!({
            "type": "object", "additionalProperties": false, "required": ["items", "label"],
            "properties": {
                "items": { "type": "array", "items": { "type": "object", "required": ["task"], "properties": { "task": { "type": "string" } } } },
                "label": { "type": "string", "enum": ["a", "b"] }
            }
        }));
        assert!(schema.check(&json!({ "items": [{ "task": "x" }], "label": "a" })).is_ok());
        assert_eq!(schema.check(&json!({ "items": [] })).unwrap_err(), "$: \"label\" is a required property");
        assert_eq!(
            schema.check(&json!({ "items": [{ "task": 3 }], "label": "a" })).unwrap_err(),
            "$.items[0].task: 3 is not of type \"string\""
        );
        assert!(schema.check(&json!({ "items": [], "label": "c" })).unwrap_err().starts_with("$.label: "));
        let extra = schema.check(&json!({ "items": [], "label": "a", "x": 1 })).unwrap_err();
        assert!(extra.contains("'x' was unexpected"), "{extra}");
        assert!(!strict_compatible(schema.schema()), "the item object does not forbid extra properties");
    }

    #[test]
    fn ref_const_pattern_and_minimum_are_enforced() {
        let schema = compile(json!({
            "$defs": { "score": { "type": "number", "minimum": 0, "maximum": 1 } },
            "type": "object",
            "properties": {
                "version": { "const": 2 },
                "id": { "type": "string", "pattern": "^[A-Z]{3}-[0-9]+$" },
                "score": { "$ref": "#/$defs/score" }
            }
        }));
        assert!(schema.check(&json!({ "version": 2, "id": "ABC-12", "score": 0.5 })).is_ok());
        assert!(schema.check(&json!({ "version": 3 })).unwrap_err().starts_with("$.version: "), "const");
        assert!(schema.check(&json!({ "id": "abc-12" })).unwrap_err().starts_with("$.id: "), "pattern");
        let below = schema.check(&json!({ "score": -0.1 })).unwrap_err();
        assert!(below.starts_with("$.score: ") && below.contains("minimum"), "minimum through $ref: {below}");
        assert!(schema.check(&json!({ "score": 1.5 })).is_err(), "maximum through $ref");
    }

    #[test]
    fn a_float_with_no_fraction_is_an_integer() {
        let schema = compile(json!({ "type": "integer" }));
        assert!(schema.check(&json!(3.0)).is_ok(), "3.0 is an integer in JSON Schema");
        assert!(schema.check(&json!(3)).is_ok());
        assert!(schema.check(&json!(3.5)).is_err());
    }

    #[test]
    fn misspelled_keywords_and_invalid_schemas_are_refused_with_their_place() {
        let error = OutputSchema::compile(json!({
            "type": "object",
            "requierd": ["a"],
            "properties": { "a": { "type": "strin" }, "requierd": { "type": "string", "x-note": "a property name" } }
        }))
        .unwrap_err();
        let described: Vec<String> = error.problems.iter().map(|p| p.describe("output")).collect();
        assert_eq!(
            described,
            [
                "`output.properties.a.type`: unknown type `strin`; expected one of: array, boolean, integer, null, \
                 number, object, string; did you mean `string`?",
                "unknown JSON Schema keyword `output.requierd`; did you mean `required`?",
            ],
            "a property named `requierd` and an `x-` extension are fine"
        );

        let error = OutputSchema::compile(json!({ "properties": { "a": { "$ref": "#/$defs/missing" } } })).unwrap_err();
        let problem = &error.problems[0];
        assert_eq!(problem.path, [Step::Key("properties".into()), Step::Key("a".into()), Step::Key("$ref".into())]);
        assert!(problem.detail.starts_with("`$ref` leads nowhere"), "{error}");
        let error = OutputSchema::compile(json!({ "$ref": "https://example.com/schema.json" })).unwrap_err();
        assert!(error.to_string().contains("`$ref` leads nowhere"), "nothing is fetched: {error}");
        let error = OutputSchema::compile(json!({ "type": "string", "pattern": "(a" })).unwrap_err();
        assert!(error.problems[0].describe("output").starts_with("`output.pattern`: \"(a\" is not a valid regular"));
        let error = OutputSchema::compile(json!({ "type": "string", "pattern": "(?=a)" })).unwrap_err();
        assert!(error.to_string().contains("look-around"), "the linear-time engine is used: {error}");
    }
}
