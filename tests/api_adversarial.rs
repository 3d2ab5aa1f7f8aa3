//! An adversarial pass over the REST API, as an attacker and as a sloppy client would use it, through the whole
//! app on port 0 (`support::app::TestApp`). Each test is named after the bug it found (fixed with it) or the
//! behaviour it guards: Storage paths that climb out of their bucket or into another user's folder, cursors and
//! bodies that the parsers misread, ids that no route can reach, ambiguous credentials, a browser page on
//! another host reaching an open API, and races between requests for the same recording or job. Every loop is
//! bounded.

mod support;

use std::time::Duration;

use echo_worker::config::Secret;
use echo_worker::store::Store as _;
use serde_json::json;
use support::app::{Reply, TestApp};
use support::jwt;

const FULL: &str = "adv-token-full-5e1d9c3a";
const SECRET: &str = "adv-jwt-secret-of-enough-length-0b7c4d2e9f";

/// A client that sends `Authorization: Bearer <token>` on every request.
fn client_as(token: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("authorization", format!("Bearer {token}").parse().unwrap());
    reqwest::Client::builder().default_headers(headers).timeout(Duration::from_secs(30)).build().unwrap()
}

fn assert_error(reply: &Reply, status: u16, code: &str, what: &str) {
    assert_eq!((reply.status, reply.code()), (status, code), "{what}: {}", reply.text);
    assert_eq!(reply.body["success"], false, "{what}");
    assert!(reply.body["error"].as_str().is_some_and(|e| e.len() > 10), "{what}: a sentence says why");
    assert!(reply.header("x-request-id").is_some(), "{what}: a request id");
}

/// An app with a full service token, the HS256 project secret and a Supabase project URL (so `supabase://` and
/// the project's Storage URLs are sources), on the memory queue.
async fn supabase_app() -> TestApp {
    let mut app = TestApp::builder()
        .settings(|settings, _| {
            settings.auth.tokens = vec![Secret::new(FULL)];
            settings.supabase.jwt_secret = Some(Secret::new(SECRET));
            settings.supabase.url = Some("https://proj.supabase.co".into());
        })
        .start()
        .await;
    app.client = client_as(FULL);
    app
}

#[tokio::test]
async fn a_storage_source_cannot_climb_out_of_its_bucket_into_other_supabase_apis() {
    let app = supabase_app().await;
    // The worker fetches `supabase://` sources with the service role key from `{SUPABASE_URL}/storage/v1/object/`;
    // a `..` there would send that key to the project's database API (PostgREST) or its auth admin API.
    for source in [
        "supabase://recordings/../../../rest/v1/users?select=*",
        "supabase://recordings/u1/../../../../auth/v1/admin/users",
        "supabase://recordings/%2e%2e/%2E%2E/%2e%2e/rest/v1/profiles",
        "supabase://recordings/u1/a.webm?select=*",
        "supabase://recordings/u1/a.webm#frag",
        "supabase://recordings/u1\\..\\..\\x",
        "supabase://../rest/v1/users",
        "https://proj.supabase.co/storage/v1/object/public/recordings/u1%2F..%2F..%2F..%2Frest%2Fv1%2Fusers",
    ] {
        let reply = app.process_recording(&json!({ "recordingId": "sb-1", "fileUrl": source })).await;
        assert_error(&reply, 400, "source_refused", source);
    }
    assert!(app.store.get("sb-1").await.unwrap().is_none(), "nothing was registered");
    for good in [
        "supabase://recordings/u1/1700000000000_talk.webm",
        "https://proj.supabase.co/storage/v1/object/public/recordings/u1/1700000000000_a.b-c.webm",
    ] {
        let id = format!("sb-ok-{}", good.len());
        let reply = app.process_recording(&json!({ "recordingId": id, "fileUrl": good })).await;
        assert_eq!(reply.status, 202, "{good}: {}", reply.text);
    }
    app.stop().await;
}

#[tokio::test]
async fn a_user_cannot_have_another_users_storage_object_processed() {
    let app = supabase_app().await;
    let alice = client_as(&jwt::hs256(&jwt::user_claims("user-alice"), SECRET));
    // The frontend uploads to `recordings/<user id>/…`; the worker reads with the service role key, so without
    // this check Bob could have Alice's private recording transcribed and read the transcript.
    for source in [
        "supabase://recordings/user-bob/1700000000000_private.webm",
        "https://proj.supabase.co/storage/v1/object/public/recordings/user-bob/1700000000000_private.webm",
        "https://proj.supabase.co/storage/v1/object/sign/recordings/user-bob/a.webm?token=x",
        "supabase://recordings/a.webm",
    ] {
        let request =
            alice.post(app.url("/api/process-recording")).json(&json!({ "recordingId": "ua-1", "fileUrl": source }));
        let reply = app.send(request).await;
        assert_error(&reply, 400, "source_refused", source);
        assert!(reply.text.contains("user-alice/"), "the error names the folder a user may use: {}", reply.text);
    }
    let request = alice.post(app.url("/api/batch-process")).json(&json!({ "items": [
        { "recordingId": "ua-2", "fileUrl": "supabase://recordings/user-bob/b.webm" },
        { "recordingId": "ua-3", "fileUrl": "supabase://recordings/user-alice/c.webm" },
    ] }));
    let batch = app.send(request).await;
    assert_eq!(batch.status, 202, "{}", batch.text);
    assert_eq!(batch.body["items"][0]["code"], "source_refused", "{}", batch.text);
    assert_eq!(batch.body["items"][1]["accepted"], true, "{}", batch.text);
    let own = alice
        .post(app.url("/api/process-recording"))
        .json(&json!({ "recordingId": "ua-4", "fileUrl": "supabase://recordings/user-alice/1700000000000_mine.webm" }));
    assert_eq!(app.send(own).await.status, 202);
    // Services are not users: they may name any object.
    let service = app
        .process_recording(&json!({ "recordingId": "ua-5", "fileUrl": "supabase://recordings/user-bob/b.webm" }))
        .await;
    assert_eq!(service.status, 202, "{}", service.text);
    app.stop().await;
}
