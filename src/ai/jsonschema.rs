//! Checks a JSON value against the subset of JSON Schema that structured outputs use (`type`, `enum`,
//! `properties`, `required`, `additionalProperties`, `items`, `minItems`, `maxItems`, `anyOf`), so that a
//! model's reply is verified, not trusted.

use serde_json::Value;

/// `Ok` when `value` fits `schema`; otherwise where and why it does not.
///
/// # Errors
/// A message with the JSON path of the first mismatch.
pub fn check(schema: &Value, value: &Value) -> Result<(), String> {
    check_at(schema, value, "$")
}

fn type_matches(kind: &str, value: &Value) -> bool {
    match kind {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "number" => value.is_number(),
        "integer" => value.as_i64().is_some() || value.as_u64().is_some(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        _ => true,
    }
}

fn check_at(schema: &Value, value: &Value, path: &str) -> Result<(), String> {
    let Some(schema) = schema.as_object() else { return Ok(()) };
    if let Some(kind) = schema.get("type") {
        let kinds: Vec<&str> = match kind {
            Value::String(kind) => vec![kind.as_str()],
            Value::Array(kinds) => kinds.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        if !kinds.is_empty() && !kinds.iter().any(|kind| type_matches(kind, value)) {
            return Err(format!("{path}: expected {}, got {}", kinds.join(" or "), describe(value)));
        }
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array)
        && !options.contains(value)
    {
        return Err(format!("{path}: {value} is not one of {}", Value::Array(options.clone())));
    }
    if let Some(choices) = schema.get("anyOf").and_then(Value::as_array)
        && !choices.iter().any(|choice| check_at(choice, value, path).is_ok())
    {
        return Err(format!("{path}: fits none of the allowed shapes"));
    }
    if let Value::Object(object) = value {
        for key in schema.get("required").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str) {
            if !object.contains_key(key) {
                return Err(format!("{path}: missing required property `{key}`"));
            }
        }
        let properties = schema.get("properties").and_then(Value::as_object);
        for (key, item) in object {
            let item_path = format!("{path}.{key}");
            match properties.and_then(|properties| properties.get(key)) {
                Some(property) => check_at(property, item, &item_path)?,
                None => match schema.get("additionalProperties") {
                    Some(Value::Bool(false)) => return Err(format!("{path}: unexpected property `{key}`")),
                    Some(extra @ Value::Object(_)) => check_at(extra, item, &item_path)?,
                    _ => {}
                },
            }
        }
    }
    if let Value::Array(items) = value {
        let count = items.len() as u64;
        if schema.get("minItems").and_then(Value::as_u64).is_some_and(|min| count < min) {
            return Err(format!("{path}: too few items ({count})"));
        }
        if schema.get("maxItems").and_then(Value::as_u64).is_some_and(|max| count > max) {
            return Err(format!("{path}: too many items ({count})"));
        }
        if let Some(item_schema) = schema.get("items") {
            for (index, item) in items.iter().enumerate() {
                check_at(item_schema, item, &format!("{path}[{index}]"))?;
            }
        }
    }
    Ok(())
}

fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
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

    #[test]
    fn checks_the_structured_output_subset() {
        let schema = json!({
            "type": "object", "additionalProperties": false, "required": ["items", "label"],
            "properties": {
                "items": { "type": "array", "items": { "type": "object", "required": ["task"], "properties": { "task": { "type": "string" } } } },
                "label": { "type": "string", "enum": ["a", "b"] }
            }
        });
        assert!(check(&schema, &json!({ "items": [{ "task": "x" }], "label": "a" })).is_ok());
        assert_eq!(check(&schema, &json!({ "items": [] })).unwrap_err(), "$: missing required property `label`");
        assert_eq!(
            check(&schema, &json!({ "items": [{ "task": 3 }], "label": "a" })).unwrap_err(),
            "$.items[0].task: expected string, got a number"
        );
        assert!(check(&schema, &json!({ "items": [], "label": "c" })).unwrap_err().contains("is not one of"));
        assert!(
            check(&schema, &json!({ "items": [], "label": "a", "x": 1 }))
                .unwrap_err()
                .contains("unexpected property `x`")
        );
        assert!(!strict_compatible(&schema), "the item object does not forbid extra properties");
    }
}
