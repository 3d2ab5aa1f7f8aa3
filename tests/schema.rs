//! The checked-in JSON Schemas must be exactly what the code generates; run `echo-worker schema` after
//! changing a pipeline, plugin or builtin parameter type.

use echo_worker::schema;

#[test]
fn checked_in_schemas_match_the_code() {
    for (name, generated) in schema::rendered() {
        let path = std::path::Path::new("schema").join(name);
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            checked_in == generated,
            "{} is stale; regenerate it with `cargo run -- schema` and commit the result",
            path.display()
        );
    }
}

#[test]
fn pipeline_schema_ties_builtin_kinds_to_their_parameters() {
    let schema = schema::pipeline_schema();
    assert_eq!(schema["$schema"], "http://json-schema.org/draft-07/schema#");
    let conditions = schema.pointer("/definitions/RawStage/allOf").and_then(|v| v.as_array()).unwrap();
    assert_eq!(conditions.len(), 6);
    let transcode = conditions.iter().find(|c| c["if"]["properties"]["uses"]["const"] == "transcode").unwrap();
    assert_eq!(transcode["then"]["properties"]["with"]["$ref"], "#/definitions/TranscodeParams");
    let params = &schema["definitions"]["TranscodeParams"];
    assert_eq!(params["additionalProperties"], false);
    assert!(params["properties"].get("max_chunk_bytes").is_some());
    assert_eq!(schema["definitions"]["RawStage"]["required"], serde_json::json!(["uses"]));
}
