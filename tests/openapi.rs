//! The OpenAPI document: the checked-in `schema/openapi.json` must be exactly what the code generates (run
//! `cargo run -- schema` after changing a route or a body type), and it must be a valid OpenAPI 3.1 document:
//! checked against the OpenAPI Initiative's JSON Schema for 3.1 (`tests/fixtures/openapi-3.1.schema.json`, the
//! `https://spec.openapis.org/oas/3.1/schema/2022-10-07` document as shipped by openapi-spec-validator 0.9.0),
//! with every `$ref` pointing at a component that exists and every route of the router documented.

use std::collections::BTreeSet;

use serde_json::Value;

fn document() -> Value {
    serde_json::to_value(echo_worker::api::openapi()).unwrap()
}

#[test]
fn the_checked_in_openapi_document_matches_the_code() {
    let path = std::path::Path::new("schema").join(echo_worker::api::OPENAPI_FILE);
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == echo_worker::api::openapi_text(),
        "{} is stale; regenerate it with `cargo run -- schema` and commit the result",
        path.display()
    );
}

#[test]
fn the_openapi_document_validates_as_openapi_3_1() {
    let meta: Value = serde_json::from_str(include_str!("fixtures/openapi-3.1.schema.json")).unwrap();
    let validator = jsonschema::validator_for(&meta).expect("the OpenAPI 3.1 schema compiles");
    let document = document();
    let errors: Vec<String> =
        validator.iter_errors(&document).map(|error| format!("{} at {}", error, error.instance_path())).collect();
    assert!(errors.is_empty(), "the document breaks the OpenAPI 3.1 schema:\n{}", errors.join("\n"));
    assert!(document["openapi"].as_str().unwrap().starts_with("3.1."));

    // The meta-schema does not follow references: every `$ref` must name an existing component.
    fn refs(value: &Value, found: &mut BTreeSet<String>) {
        match value {
            Value::Object(map) => {
                if let Some(Value::String(target)) = map.get("$ref") {
                    found.insert(target.clone());
                }
                map.values().for_each(|v| refs(v, found));
            }
            Value::Array(items) => items.iter().for_each(|v| refs(v, found)),
            _ => {}
        }
    }
    let mut found = BTreeSet::new();
    refs(&document, &mut found);
    for target in found {
        assert!(document.pointer(target.trim_start_matches('#')).is_some(), "{target} points nowhere");
    }

    // Every route is there, each with its responses.
    let paths = document["paths"].as_object().unwrap();
    for path in
        ["/api/job/{id}/events", "/api/pipelines", "/api/pipelines/{name}", "/api/pipelines/validate", "/metrics"]
    {
        assert!(paths.contains_key(path), "{path} is documented");
    }
    for (path, item) in paths {
        for (method, operation) in item.as_object().unwrap() {
            let responses = operation["responses"].as_object().unwrap();
            assert!(!responses.is_empty(), "{method} {path} documents its responses");
            assert!(operation["operationId"].is_string(), "{method} {path} has an operationId");
            // A JSON body goes through `api::extract`, which answers 413 over `server.max_body_size` and 415 for
            // a body that is not JSON.
            if operation["requestBody"]["content"]["application/json"].is_object() {
                for status in ["400", "413", "415"] {
                    assert!(responses.contains_key(status), "{method} {path} documents {status}");
                }
            }
        }
    }
}
