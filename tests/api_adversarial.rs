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
use support::jwt::{self, JwksServer, SigningKey};

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

#[tokio::test]
async fn a_cursor_that_is_not_a_number_is_a_400_on_redis_not_a_503() {
    let app = TestApp::builder().redis().start().await;
    // `nan` parses as a float in Rust but Redis refuses it as a score bound: the listing answered 503.
    for cursor in ["waiting:nan:abc", "completed:NaN:x-1", "failed:-nan:a", "waiting:garbage", "nope", "waiting:1:../x"]
    {
        let reply = app.jobs(&format!("cursor={cursor}")).await;
        assert_error(&reply, 400, "invalid_query", cursor);
        assert_eq!(reply.body["details"]["field"], "cursor", "{cursor}");
    }
    let reply = app.jobs("cursor=completed:inf:abc").await;
    assert_eq!(reply.status, 200, "an infinite score is a number: {}", reply.text);
    app.stop().await;
}

#[tokio::test]
async fn an_unknown_field_is_named_by_its_path_once() {
    let app = TestApp::spawn().await;
    let reply = app.process_recording(&json!({ "recordingId": "x", "fileURL": "a.mp3" })).await;
    assert_error(&reply, 400, "unknown_field", "fileURL");
    assert_eq!(reply.body["details"]["field"], "fileURL", "{}", reply.text);
    let reply =
        app.batch_process(&json!({ "items": [{ "recordingId": "a" }, { "recordingId": "b", "fileurl": "x" }] })).await;
    assert_error(&reply, 400, "unknown_field", "items[1].fileurl");
    assert_eq!(reply.body["details"]["field"], "items[1].fileurl", "{}", reply.text);
    let reply = app.batch_process(&json!({ "items": [{ "fileUrl": "x" }] })).await;
    assert_error(&reply, 400, "missing_field", "items[0].recordingId");
    assert_eq!(reply.body["details"]["field"], "items[0].recordingId", "{}", reply.text);
    app.stop().await;
}

#[tokio::test]
async fn a_recording_id_of_dots_alone_is_refused_since_no_route_could_reach_it() {
    let app = TestApp::spawn().await;
    let file = app.storage().join("d.mp3");
    std::fs::write(&file, b"x").unwrap();
    // `/api/recording/../status` is `/api/status` once a client or proxy normalizes the path.
    for id in [".", ".."] {
        let reply = app.process_recording(&json!({ "recordingId": id, "fileUrl": file })).await;
        assert_error(&reply, 400, "invalid_id", id);
        let reply = app.batch_process(&json!({ "items": [{ "recordingId": id, "fileUrl": file }] })).await;
        assert_eq!(reply.body["items"][0]["code"], "invalid_id", "{id}: {}", reply.text);
    }
    for id in ["a..b", "v1.2", "...x", "rec:1"] {
        let reply = app.process_recording(&json!({ "recordingId": id, "fileUrl": file })).await;
        assert_eq!(reply.status, 202, "{id}: {}", reply.text);
        assert_eq!(app.recording_status(id).await.status, 200, "{id} can be read back");
    }
    app.stop().await;
}

#[tokio::test]
async fn a_negative_file_size_is_refused_naming_the_field() {
    let app = TestApp::spawn().await;
    let file = app.storage().join("n.mp3");
    std::fs::write(&file, b"x").unwrap();
    let reply = app.process_recording(&json!({ "recordingId": "neg", "fileUrl": file, "fileSize": -1 })).await;
    assert_error(&reply, 400, "invalid_field", "fileSize -1");
    assert_eq!(reply.body["details"]["field"], "fileSize");
    let reply = app.process_recording(&json!({ "recordingId": "neg", "fileUrl": file, "file_size": -5_000_000 })).await;
    assert_error(&reply, 400, "invalid_field", "file_size -5000000");
    let reply =
        app.batch_process(&json!({ "items": [{ "recordingId": "neg-b", "fileUrl": file, "fileSize": -1 }] })).await;
    assert_eq!(reply.body["items"][0]["code"], "invalid_field", "{}", reply.text);
    assert!(app.store.get("neg").await.unwrap().is_none() && app.store.get("neg-b").await.unwrap().is_none());
    let reply = app.process_recording(&json!({ "recordingId": "neg", "fileUrl": file, "fileSize": 0 })).await;
    assert_eq!(reply.status, 202, "{}", reply.text);
    app.stop().await;
}

#[tokio::test]
async fn whole_numbers_written_with_a_zero_fraction_are_taken_and_fractions_refused() {
    // JSON has one kind of number and the document says `integer`, which `3.0` is (Python's json writes it).
    let app = TestApp::spawn().await;
    let file = app.storage().join("w.mp3");
    std::fs::write(&file, b"x").unwrap();
    let reply = app
        .process_recording(&json!({ "recordingId": "whole", "fileUrl": file, "priority": 3.0, "fileSize": 1024.0 }))
        .await;
    assert_eq!(reply.status, 202, "{}", reply.text);
    assert_eq!(app.store.get("whole").await.unwrap().unwrap().size_bytes, Some(1024));
    let reply = app.process_recording(&json!({ "recordingId": "half", "fileUrl": file, "priority": 1.5 })).await;
    assert_error(&reply, 400, "invalid_field", "priority 1.5");
    assert_eq!(reply.body["details"]["field"], "priority");
    let reply = app.process_recording(&json!({ "recordingId": "neg", "fileUrl": file, "fileSize": -1.0 })).await;
    assert_error(&reply, 400, "invalid_field", "fileSize -1.0");
    let reply = app
        .batch_process(
            &json!({ "items": [{ "recordingId": "whole-b", "fileUrl": file, "priority": 2.0 }], "concurrency": 4.0 }),
        )
        .await;
    assert_eq!((reply.status, reply.body["accepted"].as_u64()), (202, Some(1)), "{}", reply.text);
    let reply = app.post_json("/api/queue/clean", &json!({ "state": "completed", "limit": 10.0 })).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let reply = app.post_json("/api/queue/clean", &json!({ "limit": 10.5 })).await;
    assert_error(&reply, 400, "invalid_field", "limit 10.5");
    app.stop().await;
}

#[tokio::test]
async fn retry_failed_for_a_pipeline_that_does_not_exist_is_404_not_a_silent_zero() {
    let app = TestApp::spawn().await;
    let reply = app.retry_failed(&json!({ "pipeline": "meetng" })).await;
    assert_error(&reply, 404, "pipeline_not_found", "a misspelt pipeline");
    assert_eq!(reply.body["details"]["suggestion"], "meeting", "{}", reply.text);
    let reply = app.retry_failed(&json!({ "pipeline": "meeting" })).await;
    assert_eq!((reply.status, reply.body["count"].as_u64()), (200, Some(0)), "{}", reply.text);
    app.stop().await;
}

#[tokio::test]
async fn a_json_array_is_not_read_as_an_object_by_position() {
    let app = TestApp::spawn().await;
    let file = app.storage().join("arr.mp3");
    std::fs::write(&file, b"x").unwrap();
    let post =
        |path: &str, body: String| app.client.post(app.url(path)).header("content-type", "application/json").body(body);
    // serde reads a struct from a sequence by field order: `["rec", "<file>"]` queued a job.
    let body = json!(["arr-1", file]).to_string();
    let reply = app.send(post("/api/process-recording", body)).await;
    assert_error(&reply, 400, "invalid_field", "an array body");
    assert!(app.store.get("arr-1").await.unwrap().is_none());
    let reply = app.send(post("/api/queue/clean", json!(["completed", "0s", 10]).to_string())).await;
    assert_error(&reply, 400, "invalid_field", "an array body on clean");
    app.stop().await;
}

#[tokio::test]
async fn sloppy_but_harmless_bodies_are_read_null_for_an_optional_body_and_a_leading_bom() {
    let app = TestApp::spawn().await;
    let file = app.storage().join("bom.mp3");
    std::fs::write(&file, b"x").unwrap();
    let post =
        |path: &str, body: String| app.client.post(app.url(path)).header("content-type", "application/json").body(body);
    let reply = app.send(post("/api/queue/clean", "null".into())).await;
    assert_eq!(reply.status, 200, "null is no body: {}", reply.text);
    let reply = app.send(post("/api/queue/retry-failed", " null ".into())).await;
    assert_eq!(reply.status, 200, "null is no body: {}", reply.text);
    let body = format!("\u{feff}{}", json!({ "recordingId": "bom", "fileUrl": file }));
    let reply = app.send(post("/api/process-recording", body)).await;
    assert_eq!(reply.status, 202, "a UTF-8 byte order mark (Windows tools add one) is skipped: {}", reply.text);
    let reply = app.send(post("/api/process-recording", "\u{feff}".into())).await;
    assert_error(&reply, 400, "missing_body", "a BOM alone");
    let reply = app.send(post("/api/process-recording", "null".into())).await;
    assert_error(&reply, 400, "invalid_field", "null for a required body");
    app.stop().await;
}

/// An app with one full service token and the HS256 project secret.
async fn token_app() -> TestApp {
    TestApp::builder()
        .settings(|settings, _| {
            settings.auth.tokens = vec![Secret::new(FULL)];
            settings.supabase.jwt_secret = Some(Secret::new(SECRET));
        })
        .start()
        .await
}

#[tokio::test]
async fn two_authorization_headers_are_refused_whatever_their_order() {
    let app = token_app().await;
    let stats = app.url("/api/queue/stats");
    // With two headers, which one counts depends on who reads them (a proxy may check the last, the API read
    // the first): the request is ambiguous and refused.
    for (first, second) in
        [(format!("Bearer {FULL}"), "Bearer wrong".to_string()), ("Bearer wrong".into(), format!("Bearer {FULL}"))]
    {
        let request = app.client.get(&stats).header("authorization", &first).header("authorization", &second);
        let reply = app.send(request).await;
        assert_error(&reply, 401, "malformed_authorization", "two headers");
        assert!(!reply.text.contains(FULL), "{}", reply.text);
    }
    // Regression guards: the scheme in any case and extra spaces are fine; other schemes are not.
    for (header, status) in [
        (format!("bearer {FULL}"), 200),
        (format!("BEARER   {FULL}  "), 200),
        (format!("Basic {FULL}"), 401),
        (format!("Bearer{FULL}"), 401),
        (format!("Bearer {FULL} extra"), 401),
        (format!("Token {FULL}"), 401),
    ] {
        let reply = app.send(app.client.get(&stats).header("authorization", &header)).await;
        assert_eq!(reply.status, status, "{header}: {}", reply.text);
    }
    app.stop().await;
}

#[tokio::test]
async fn a_jwt_kid_with_path_tricks_and_control_characters_is_refused_and_not_echoed_raw() {
    let key = SigningKey::es256("k1");
    let jwks = JwksServer::start(&[&key]).await;
    let url = jwks.url();
    let app = TestApp::builder()
        .settings(move |settings, _| {
            settings.auth.tokens = vec![Secret::new(FULL)];
            settings.supabase.jwks_url = Some(url);
        })
        .start()
        .await;
    let long = format!("../../../../etc/passwd\u{1b}[2J\r\nX-Injected: 1{}", "k".repeat(4000));
    for kid in ["../k1", "k1/../k1", "%6b1", "k1\u{0}", long.as_str()] {
        let token = jwt::sign(key.alg, Some(kid), &key.key, &jwt::user_claims("user-alice"));
        let reply = app.send(app.client.get(app.url("/api/recording/r1/status")).bearer_auth(&token)).await;
        assert_error(&reply, 401, "unknown_signing_key", kid);
        let sentence = reply.body["error"].as_str().unwrap();
        assert!(!sentence.chars().any(char::is_control), "no control characters reach the reply: {sentence:?}");
        assert!(sentence.len() < 400, "an attacker's kid is not echoed whole: {} bytes", sentence.len());
    }
    let good = key.sign(&jwt::user_claims("user-alice"));
    let reply = app.send(app.client.get(app.url("/api/recording/r1/status")).bearer_auth(&good)).await;
    assert_eq!((reply.status, reply.code()), (404, "recording_not_found"), "{}", reply.text);
    app.stop().await;
}

#[tokio::test]
async fn an_open_api_refuses_a_browser_page_on_another_host_that_rebinds_to_loopback() {
    // With no auth the API listens on 127.0.0.1 and is open; a page on `evil.example` whose name is made to
    // resolve to 127.0.0.1 (DNS rebinding) is same-origin in the browser and would queue paid work and read
    // every transcript. Its requests carry `Host: evil.example:PORT`.
    let app = TestApp::spawn().await;
    let port = app.address.rsplit(':').next().unwrap().to_string();
    for host in [format!("evil.example:{port}"), "evil.example".into(), format!("127.0.0.1.nip.io:{port}")] {
        let reply = app.send(app.client.get(app.url("/api/jobs")).header("host", &host)).await;
        assert_error(&reply, 403, "host_not_allowed", &host);
        let request = app
            .client
            .post(app.url("/api/queue/pause"))
            .header("host", &host)
            .header("origin", format!("http://{host}"));
        assert_error(&app.send(request).await, 403, "host_not_allowed", &host);
    }
    for host in [format!("127.0.0.1:{port}"), format!("localhost:{port}"), "localhost".into(), format!("[::1]:{port}")]
    {
        let reply = app.send(app.client.get(app.url("/api/jobs")).header("host", &host)).await;
        assert_eq!(reply.status, 200, "{host}: {}", reply.text);
    }
    assert!(!app.queue.stats().await.unwrap().paused, "nothing was paused");
    app.stop().await;

    // With auth configured a reverse proxy may use any host name: the token decides.
    let app = token_app().await;
    let reply =
        app.send(app.client.get(app.url("/api/jobs")).header("host", "api.example.com").bearer_auth(FULL)).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    app.stop().await;
}
#[tokio::test]
async fn the_same_recording_posted_20_times_at_once_makes_one_job() {
    for redis in [false, true] {
        let app = if redis { TestApp::builder().redis().start().await } else { TestApp::spawn().await };
        let file = app.storage().join("same.mp3");
        std::fs::write(&file, b"x").unwrap();
        let body = json!({ "recordingId": "same-1", "fileUrl": file });
        let replies = futures_util::future::join_all((0..20).map(|_| app.process_recording(&body))).await;
        let statuses: Vec<u16> = replies.iter().map(|reply| reply.status).collect();
        assert_eq!(statuses.iter().filter(|&&status| status == 202).count(), 1, "redis {redis}: {statuses:?}");
        assert!(statuses.iter().all(|status| [200, 202].contains(status)), "redis {redis}: {statuses:?}");
        let job = replies[0].body["jobId"].as_str().unwrap().to_string();
        assert!(replies.iter().all(|reply| reply.body["jobId"] == job.as_str()), "one job id for all");
        let listed = app.jobs("recordingId=same-1").await;
        assert_eq!(listed.body["jobs"].as_array().unwrap().len(), 1, "redis {redis}: {}", listed.text);
        let row = app.store.get("same-1").await.unwrap().unwrap();
        assert_eq!(row.job_id.as_deref(), Some(job.as_str()), "the row names the one job");
        app.stop().await;
    }
}

#[tokio::test]
async fn cancel_racing_retry_leaves_the_recording_row_agreeing_with_the_job() {
    let app = TestApp::spawn().await;
    let file = app.storage().join("race.mp3");
    std::fs::write(&file, b"x").unwrap();
    let queued = app.process_recording(&json!({ "recordingId": "race-1", "fileUrl": file })).await;
    let job = queued.body["jobId"].as_str().unwrap().to_string();
    assert_eq!(app.cancel_job(&job).await.status, 200);
    let mut disagreements = Vec::new();
    for round in 0..40 {
        let (cancel, retry) = tokio::join!(app.cancel_job(&job), app.retry_job(&job));
        assert!([200, 409].contains(&cancel.status), "round {round}: cancel {}", cancel.text);
        assert!([202, 409].contains(&retry.status), "round {round}: retry {}", retry.text);
        let state = app.job_status(&job).await.body["job"]["state"].as_str().unwrap().to_string();
        let row = app.recording_status("race-1").await.body["status"]["state"].as_str().unwrap().to_string();
        let expected = if state == "waiting" { "queued" } else { state.as_str() };
        if row != expected {
            disagreements.push(format!("round {round}: job {state}, row {row}"));
        }
    }
    assert!(disagreements.is_empty(), "{disagreements:?}");
    app.stop().await;
}

#[tokio::test]
async fn every_refusal_is_json_with_a_request_id_and_counted_replies_carry_rate_limit_headers() {
    let app = TestApp::builder()
        .settings(|settings, _| {
            settings.server.rate_limit_per_minute = 6;
            settings.server.max_body_size = echo_worker::units::ByteSize(1024);
            settings.server.allowed_origins = vec!["https://app.example.com".into()];
        })
        .start()
        .await;
    let big = json!({ "recordingId": "x", "params": { "pad": "a".repeat(4096) } });
    let requests = vec![
        ("404", app.client.get(app.url("/api/nothing")), 404),
        ("405", app.client.delete(app.url("/api/jobs")), 405),
        ("413", app.client.post(app.url("/api/process-recording")).json(&big), 413),
        ("415", app.client.post(app.url("/api/process-recording")).body("{}"), 415),
        ("400", app.client.get(app.url("/api/jobs?limit=0")), 400),
        ("200", app.client.get(app.url("/api/jobs")), 200),
        ("429", app.client.get(app.url("/api/jobs")), 429),
    ];
    for (remaining, (what, request, status)) in [5, 4, 3, 2, 1, 0, 0].into_iter().zip(requests) {
        let reply = app.send(request).await;
        assert_eq!(reply.status, status, "{what}: {}", reply.text);
        assert!(reply.header("x-request-id").is_some_and(|id| !id.is_empty()), "{what}");
        if status >= 400 {
            assert!(reply.header("content-type").is_some_and(|t| t.starts_with("application/json")), "{what}");
            assert_eq!(reply.body["success"], false, "{what}: {}", reply.text);
            assert!(reply.code().chars().all(|c| c.is_ascii_lowercase() || c == '_') && !reply.code().is_empty());
        }
        assert_eq!(reply.header("ratelimit-limit"), Some("6"), "{what}");
        assert_eq!(reply.header("ratelimit-remaining"), Some(remaining.to_string().as_str()), "{what}");
    }
    app.stop().await;

    // A preflight on every documented route: 204 for the allowed origin, a JSON 403 for another.
    let app = TestApp::builder()
        .settings(|settings, _| settings.server.allowed_origins = vec!["https://app.example.com".into()])
        .start()
        .await;
    let document = app.get("/openapi.json").await.body;
    let paths: Vec<String> =
        document["paths"].as_object().unwrap().keys().map(|path| path.replace("{id}", "r-1")).collect();
    assert!(paths.len() >= 15, "{paths:?}");
    for path in paths {
        let preflight = |origin: &str| {
            app.client
                .request(reqwest::Method::OPTIONS, app.url(&path))
                .header("origin", origin)
                .header("access-control-request-method", "POST")
        };
        let reply = app.send(preflight("https://app.example.com")).await;
        assert_eq!(reply.status, 204, "{path}");
        assert_eq!(reply.header("access-control-allow-origin"), Some("https://app.example.com"), "{path}");
        assert!(reply.header("x-request-id").is_some(), "{path}");
        let reply = app.send(preflight("https://evil.example")).await;
        assert_error(&reply, 403, "origin_not_allowed", &path);
    }
    app.stop().await;
}
