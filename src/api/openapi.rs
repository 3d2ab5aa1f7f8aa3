//! `GET /openapi.json`: the OpenAPI 3.1 document of every route, generated from the handlers' `utoipa`
//! annotations when asked (it is small, and building it on demand keeps it true to the running code).

use axum::Json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::ApiState;

pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new().routes(routes!(openapi_json))
}

/// The OpenAPI document of this API.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "meta",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json", body = Object))
)]
async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(super::openapi())
}

#[cfg(test)]
mod tests {
    //! The document's rules for request fields must be the handlers' rules: a value the document allows is
    //! accepted, and one it refuses is refused (what Schemathesis checks against the live API, `.ci/schemathesis`,
    //! here for the patterns and bounds on their own).

    use serde_json::{Value, json};

    use crate::queue::{JobState, MAX_PRIORITY, MIN_PRIORITY};
    use crate::units::HumanDuration;

    fn document() -> Value {
        serde_json::to_value(super::super::openapi()).unwrap()
    }

    fn component<'a>(document: &'a Value, name: &str) -> &'a Value {
        &document["components"]["schemas"][name]
    }

    fn property<'a>(document: &'a Value, schema: &str, name: &str) -> &'a Value {
        let found = &component(document, schema)["properties"][name];
        assert!(found.is_object(), "{schema}.{name} is documented");
        found
    }

    fn parameter<'a>(document: &'a Value, path: &str, method: &str, name: &str) -> &'a Value {
        let parameters = document["paths"][path][method]["parameters"].as_array().unwrap();
        let found = parameters.iter().find(|parameter| parameter["name"] == name);
        &found.unwrap_or_else(|| panic!("{method} {path} documents `{name}`"))["schema"]
    }

    /// Whether `text` matches `pattern` as JSON Schema (ECMA 262) reads it.
    fn matches(pattern: &str, text: &str) -> bool {
        jsonschema::validator_for(&json!({ "type": "string", "pattern": pattern })).unwrap().is_valid(&json!(text))
    }

    /// The one pattern all of `schemas` carry.
    fn one_pattern<'a>(schemas: &[&'a Value], what: &str) -> &'a str {
        let first = schemas[0]["pattern"].as_str().unwrap_or_else(|| panic!("{what}: a pattern"));
        for schema in schemas {
            assert_eq!(schema["pattern"].as_str(), Some(first), "{what}: one pattern everywhere");
        }
        first
    }

    #[test]
    fn recording_ids_are_documented_as_the_handlers_check_them() {
        let document = document();
        let mut schemas = vec![
            property(&document, "ProcessRecording", "recordingId"),
            property(&document, "DirectRequest", "recordingId"),
            property(&document, "ProcessAudio", "recording_id"),
        ];
        for path in ["/api/recording/{id}/status", "/api/recording/{id}/transcript"] {
            schemas.push(parameter(&document, path, "get", "id"));
        }
        let pattern = one_pattern(&schemas, "recording ids");
        let long = "a".repeat(128);
        let too_long = "a".repeat(129);
        for text in [
            "rec-1",
            "a",
            "A.b_c:d-e",
            ".a",
            "a.",
            ".a.",
            "7d0f2c1e-1b2a-4c3d-9e8f-0a1b2c3d4e5f",
            &long,
            &too_long,
            "",
            ".",
            "..",
            "...",
            "a b",
            "a/b",
            "é",
            "a\n",
            "\na",
            "a?",
            "%2e",
        ] {
            assert_eq!(
                matches(pattern, text),
                super::super::recording_id(text, "id").is_ok(),
                "{text:?}: the document and the handler agree"
            );
        }
    }

    #[test]
    fn not_blank_fields_are_documented_as_the_handlers_check_them() {
        let document = document();
        let schemas = [
            property(&document, "ProcessRecording", "fileUrl"),
            property(&document, "ProcessRecording", "pipeline"),
            property(&document, "ProcessRecording", "callbackUrl"),
            property(&document, "BatchProcess", "pipeline"),
            property(&document, "BatchProcess", "callbackUrl"),
            property(&document, "DirectRequest", "fileUrl"),
            property(&document, "ProcessAudio", "file_url"),
        ];
        let pattern = one_pattern(&schemas, "not blank");
        // Rust's white space (`str::trim`) is neither ECMA's `\s` (U+FEFF) nor Python's (U+001C to U+001F).
        for text in [
            "",
            " ",
            "\t\n\u{b}\u{c}\r",
            "\u{85}",
            "\u{a0}",
            "\u{1680}",
            "\u{2000}\u{200a}",
            "\u{2028}\u{2029}",
            "\u{202f}\u{205f}\u{3000}",
            "a",
            " a ",
            "\u{feff}",
            "\u{1c}",
            "\u{200b}",
            "x\u{3000}",
        ] {
            assert_eq!(
                matches(pattern, text),
                super::super::process::non_empty(Some(text.to_string()), "f").is_ok(),
                "{text:?}: the document and the handler agree"
            );
        }
    }

    #[test]
    fn clean_ages_the_document_allows_are_accepted() {
        let document = document();
        let pattern = property(&document, "CleanRequest", "olderThan")["pattern"].as_str().unwrap();
        let largest = "9999999999d".repeat(8);
        for text in ["30m", "12h", "7d", "1h30m", "500ms", "0s", "1d1d", &largest, "1ms2s3m4h5d6ms7s8m"] {
            assert!(matches(pattern, text), "{text:?} is documented");
            assert!(HumanDuration::parse(text).is_ok(), "{text:?} is accepted");
        }
        for text in ["", "h", "10", "1x", "1.5h", "-1h", "1 h", "1hm", "1h 30m", "1H"] {
            assert!(!matches(pattern, text), "{text:?} is not documented");
            assert!(HumanDuration::parse(text).is_err(), "{text:?} is refused");
        }
        // Narrower than the parser, which also takes longer numbers and more parts until they overflow: every
        // documented age stays far from that.
        assert!(!matches(pattern, "99999999999d") && !matches(pattern, &"1d".repeat(9)));
    }

    #[test]
    fn states_limits_and_sizes_are_the_handlers() {
        let document = document();
        let names = |schema: &Value| -> Vec<String> {
            let values = schema["enum"].as_array().unwrap();
            values.iter().map(|value| value.as_str().unwrap().to_string()).collect()
        };
        let all: Vec<String> = JobState::ALL.iter().map(|state| state.name().to_string()).collect();
        let ended: Vec<String> =
            JobState::ALL.iter().filter(|state| state.is_final()).map(|state| state.name().to_string()).collect();
        assert_eq!(names(parameter(&document, "/api/jobs", "get", "state")), all);
        assert_eq!(names(component(&document, "EndedState")), ended);
        let cursor = parameter(&document, "/api/jobs", "get", "cursor")["pattern"].as_str().unwrap();
        for state in &all {
            assert!(matches(cursor, state) && matches(cursor, &format!("{state}:1700000000000:abc")), "{state}");
        }
        assert!(!matches(cursor, "") && !matches(cursor, "nope:1"));

        let bounds = |schema: &Value| (schema["minimum"].as_i64(), schema["maximum"].as_i64());
        assert_eq!(bounds(parameter(&document, "/api/jobs", "get", "limit")), (Some(1), Some(200)));
        let clean_limit = property(&document, "CleanRequest", "limit");
        assert_eq!(bounds(clean_limit), (Some(1), Some(i64::try_from(super::super::queue::MAX_CLEAN_LIMIT).unwrap())));
        let priority = property(&document, "ProcessRecording", "priority");
        assert_eq!(bounds(priority), (Some(i64::from(MIN_PRIORITY)), Some(i64::from(MAX_PRIORITY))));
        assert_eq!(property(&document, "ProcessRecording", "fileSize")["minimum"], json!(0));
        let max = json!(super::super::process::MAX_BATCH);
        for field in ["recordingIds", "items"] {
            let schema = property(&document, "BatchProcess", field);
            assert_eq!((&schema["minItems"], &schema["maxItems"]), (&json!(1), &max), "{field}");
        }
    }

    #[test]
    fn a_batch_names_exactly_one_of_its_two_lists() {
        let document = document();
        let body = component(&document, "BatchProcessBody");
        let rule = jsonschema::validator_for(&json!({ "oneOf": body["allOf"][1]["oneOf"] })).unwrap();
        assert!(rule.is_valid(&json!({ "recordingIds": ["a"] })));
        assert!(rule.is_valid(&json!({ "items": [{ "recordingId": "a" }], "recordingIds": null })));
        for refused in [json!({}), json!({ "recordingIds": ["a"], "items": [] }), json!({ "recordingIds": null })] {
            assert!(!rule.is_valid(&refused), "{refused}");
        }
    }
}
