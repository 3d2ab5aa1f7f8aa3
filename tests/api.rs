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
    for (path, method) in [
        ("/health", "get"),
        ("/openapi.json", "get"),
        ("/api/process-recording", "post"),
        ("/api/batch-process", "post"),
        ("/api/recording/{id}/status", "get"),
        ("/api/job/{id}/status", "get"),
        ("/api/job/{id}/cancel", "post"),
        ("/api/job/{id}/retry", "post"),
        ("/api/job/{id}/logs", "get"),
        ("/api/jobs", "get"),
        ("/api/queue/stats", "get"),
        ("/api/queue/clean", "post"),
        ("/api/queue/pause", "post"),
        ("/api/queue/resume", "post"),
        ("/api/queue/retry-failed", "post"),
    ] {
        assert!(reply.body["paths"][path][method].is_object(), "{method} {path} is documented");
    }
    for schema in ["ErrorBody", "ProcessRecording", "ProcessReply", "BatchProcess", "JobStatusReply", "Health"] {
        assert!(reply.body["components"]["schemas"][schema].is_object(), "{schema} is documented");
    }
    assert_eq!(reply.body["info"]["version"], env!("CARGO_PKG_VERSION"));
    app.stop().await;
}

use std::time::Duration;

use echo_worker::queue::{Failure, JobState, WorkerInfo};
use echo_worker::store::{NewRecording, Store as _};
use serde_json::{Value, json};

/// A media file under the app's storage root (the bytes do not matter until a worker runs).
fn stored(app: &TestApp, name: &str) -> String {
    let path = app.storage().join(name);
    std::fs::write(&path, b"ID3 not really audio").unwrap();
    path.display().to_string()
}

fn test_worker() -> WorkerInfo {
    WorkerInfo {
        id: "api-test-worker".into(),
        host: "test".into(),
        pid: std::process::id(),
        version: "test".into(),
        concurrency: 1,
        running: 0,
        last_heartbeat: 0,
    }
}

/// Queues a recording through the API and returns its job id.
async fn queued(app: &TestApp, recording: &str) -> String {
    let file = stored(app, &format!("{recording}.mp3"));
    let reply = app.process_recording(&json!({ "recordingId": recording, "fileUrl": file })).await;
    assert_eq!(reply.status, 202, "{}", reply.text);
    reply.body["jobId"].as_str().unwrap().to_string()
}

/// Takes the next job as a worker would, then completes it (or fails it for good).
async fn finish_next(app: &TestApp, complete: bool) -> String {
    let lease = app.queue.take(&test_worker(), Duration::from_secs(2)).await.unwrap().expect("a job is waiting");
    if complete {
        app.queue.complete(&lease.job.id, &lease.token, json!({ "stages": {} })).await.unwrap();
    } else {
        let failure = Failure { message: "the input is unusable".into(), retryable: false, retry_after: None };
        app.queue.fail(&lease.job.id, &lease.token, failure).await.unwrap();
    }
    lease.job.id
}

#[tokio::test]
async fn health_is_503_naming_the_database_when_it_does_not_answer() {
    let app = TestApp::spawn().await;
    app.store.pool().close().await;
    let reply = app.health().await;
    assert_eq!(reply.status, 503, "{}", reply.text);
    assert_eq!(reply.body["success"], false);
    assert_eq!(reply.body["status"], "unhealthy");
    assert_eq!(reply.code(), "service_unavailable");
    assert_eq!(reply.body["checks"]["database"]["ok"], false);
    assert_eq!(reply.body["checks"]["queue"]["ok"], true);
    assert!(reply.body["error"].as_str().unwrap().contains("database"), "{}", reply.text);
    assert_eq!(reply.header("retry-after"), Some("5"));
}

#[tokio::test]
async fn process_recording_queues_a_job_creates_the_row_and_returns_the_live_job_when_posted_again() {
    let app = TestApp::spawn().await;
    let file = stored(&app, "talk.mp3");
    let reply = app
        .process_recording(&json!({ "recordingId": "rec-1", "fileUrl": file, "pipeline": "transcribe-only", "priority": 5, "params": { "language": "en" } }))
        .await;
    assert_eq!(reply.status, 202, "{}", reply.text);
    assert_eq!(reply.body["success"], true);
    assert_eq!(reply.body["recordingId"], "rec-1");
    assert_eq!(reply.body["pipeline"], "transcribe-only");
    assert_eq!(reply.body["status"], "queued");
    assert_eq!(reply.body["existing"], false);
    assert!(reply.body.get("error").is_none(), "a success carries no `error` key");
    let job = reply.body["jobId"].as_str().unwrap().to_string();
    let stored_job = app.queue.get(&job).await.unwrap().expect("the job is in the queue");
    assert_eq!(stored_job.state, JobState::Waiting);
    assert_eq!(stored_job.spec.priority, 5);
    assert_eq!(stored_job.spec.params["language"], "en");
    assert!(!stored_job.spec.trusted_source, "API sources are never trusted");

    let row = app.store.get("rec-1").await.unwrap().expect("the row was created");
    assert_eq!(row.job_id.as_deref(), Some(job.as_str()));
    assert_eq!(row.status.as_str(), "queued");

    // The old snake_case names, for the same recording: its live job, 200.
    let again = app.process_recording(&json!({ "recording_id": "rec-1", "file_url": file })).await;
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(again.body["jobId"], job.as_str());
    assert_eq!(again.body["existing"], true);
    assert_eq!(again.body["status"], "waiting");

    // A recording whose row names its file needs no fileUrl; the default pipeline runs.
    let row = NewRecording { id: "rec-2".into(), file_url: Some(stored(&app, "b.mp3")), ..NewRecording::default() };
    app.store.register(&row).await.unwrap();
    let reply = app.process_recording(&json!({ "recordingId": "rec-2" })).await;
    assert_eq!(reply.status, 202, "{}", reply.text);
    assert_eq!(reply.body["pipeline"], "default");
    app.stop().await;
}

#[tokio::test]
async fn process_recording_refuses_what_it_cannot_queue_saying_why() {
    let app = TestApp::spawn().await;
    let reply = app.process_recording(&json!({ "recordingId": "nobody" })).await;
    assert_eq!((reply.status, reply.code()), (404, "recording_not_found"), "{}", reply.text);
    app.store.register(&NewRecording { id: "empty".into(), ..NewRecording::default() }).await.unwrap();
    let reply = app.process_recording(&json!({ "recordingId": "empty" })).await;
    assert_eq!((reply.status, reply.code()), (400, "missing_field"), "{}", reply.text);
    assert_eq!(reply.body["details"]["field"], "fileUrl");
    let file = stored(&app, "a.mp3");
    let reply = app.process_recording(&json!({ "recordingId": "r", "fileUrl": file, "pipeline": "meetng" })).await;
    assert_eq!((reply.status, reply.code()), (404, "pipeline_not_found"), "{}", reply.text);
    assert_eq!(reply.body["details"]["suggestion"], "meeting");
    let available: Vec<&str> =
        reply.body["details"]["available"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(available.contains(&"default") && available.contains(&"meeting"), "{available:?}");
    assert!(reply.body["error"].as_str().unwrap().contains("default"), "the sentence lists them too");
    assert!(app.store.get("r").await.unwrap().is_none(), "nothing was registered");
    app.stop().await;
}

#[tokio::test]
async fn recording_status_shows_the_row_and_refuses_unknown_and_malformed_ids() {
    let app = TestApp::spawn().await;
    let job = queued(&app, "rec-s").await;
    let reply = app.recording_status("rec-s").await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.body["recordingId"], "rec-s");
    assert_eq!(reply.body["jobId"], job.as_str());
    assert_eq!(reply.body["status"]["state"], "queued");
    assert_eq!(reply.body["status"]["progress"], 0);
    assert!(reply.body["status"]["updatedAt"].as_str().is_some_and(|at| at.ends_with('Z')));
    assert_eq!(reply.body["status"]["hasTranscript"], false);
    let reply = app.recording_status("no-such-recording").await;
    assert_eq!((reply.status, reply.code()), (404, "recording_not_found"));
    let reply = app.recording_status("bad%20id").await;
    assert_eq!((reply.status, reply.code()), (400, "invalid_id"), "{}", reply.text);
    app.stop().await;
}

#[tokio::test]
async fn job_status_cancel_and_retry_follow_the_job_through_its_states() {
    let app = TestApp::spawn().await;
    let job = queued(&app, "rec-j").await;
    let reply = app.job_status(&job).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.body["job"]["jobId"], job.as_str());
    assert_eq!(reply.body["job"]["state"], "waiting");
    assert_eq!(reply.body["job"]["recordingId"], "rec-j");
    assert_eq!(reply.body["job"]["attempts"], 0);
    assert_eq!(reply.body["job"]["maxAttempts"], 3);
    assert!(reply.body["job"]["createdAt"].as_str().is_some_and(|at| at.ends_with('Z')));

    let reply = app.retry_job(&job).await;
    assert_eq!((reply.status, reply.code()), (409, "job_not_retryable"), "{}", reply.text);
    assert_eq!(reply.body["details"]["state"], "waiting");

    let reply = app.cancel_job(&job).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.body["state"], "cancelled");
    assert_eq!(app.store.get("rec-j").await.unwrap().unwrap().status.as_str(), "cancelled");
    let reply = app.cancel_job(&job).await;
    assert_eq!((reply.status, reply.code()), (409, "job_ended"), "{}", reply.text);

    let reply = app.retry_job(&job).await;
    assert_eq!(reply.status, 202, "{}", reply.text);
    assert_eq!(reply.body["state"], "waiting");
    assert_eq!(app.queue.get(&job).await.unwrap().unwrap().state, JobState::Waiting);
    assert_eq!(app.store.get("rec-j").await.unwrap().unwrap().status.as_str(), "queued");

    // Running: a cancel is asked of its worker (202).
    let lease = app.queue.take(&test_worker(), Duration::from_secs(2)).await.unwrap().unwrap();
    assert_eq!(lease.job.id, job);
    let reply = app.cancel_job(&job).await;
    assert_eq!(reply.status, 202, "{}", reply.text);
    assert_eq!(app.job_status(&job).await.body["job"]["cancelRequested"], true);

    let unknown = uuid::Uuid::new_v4().to_string();
    for reply in [app.job_status(&unknown).await, app.cancel_job(&unknown).await, app.retry_job(&unknown).await] {
        assert_eq!((reply.status, reply.code()), (404, "job_not_found"), "{}", reply.text);
    }
    for reply in [app.job_status("42").await, app.cancel_job("x").await, app.retry_job("not-a-uuid").await] {
        assert_eq!((reply.status, reply.code()), (400, "invalid_id"), "{}", reply.text);
    }
    app.stop().await;
}

#[tokio::test]
async fn a_completed_job_shows_its_stages_and_result_and_a_failed_one_its_error() {
    let app = TestApp::spawn().await;
    let job = queued(&app, "rec-done").await;
    let lease = app.queue.take(&test_worker(), Duration::from_secs(2)).await.unwrap().unwrap();
    let report = json!({ "status": "succeeded", "stages": {
        "transcript": { "status": "succeeded", "attempts": 1, "duration_ms": 1200, "output": { "text": "hello" } },
        "persist": { "status": "succeeded", "attempts": 2, "duration_ms": 30, "output": {} } } });
    app.queue.complete(&lease.job.id, &lease.token, report).await.unwrap();
    let reply = app.job_status(&job).await;
    assert_eq!(reply.body["job"]["state"], "completed");
    assert_eq!(reply.body["job"]["progress"], 100);
    assert_eq!(reply.body["stages"][0]["id"], "transcript");
    assert_eq!(reply.body["stages"][0]["durationMs"], 1200);
    assert_eq!(reply.body["stages"][1]["attempts"], 2);
    assert_eq!(reply.body["result"]["transcript"]["text"], "hello");
    assert!(reply.body["job"]["finishedAt"].is_string());

    let failed = queued(&app, "rec-fail").await;
    assert_eq!(finish_next(&app, false).await, failed);
    let reply = app.job_status(&failed).await;
    assert_eq!(reply.body["job"]["state"], "failed");
    assert_eq!(reply.body["job"]["error"], "the input is unusable");
    assert!(reply.body["result"].is_null());
    app.stop().await;
}

#[tokio::test]
async fn jobs_are_listed_by_state_pipeline_and_recording_a_page_at_a_time() {
    let app = TestApp::spawn().await;
    let a = queued(&app, "rec-a").await;
    let b = queued(&app, "rec-b").await;
    let file = stored(&app, "c.mp3");
    let reply = app.process_recording(&json!({ "recordingId": "rec-c", "fileUrl": file, "pipeline": "meeting" })).await;
    let c = reply.body["jobId"].as_str().unwrap().to_string();
    let cancelled = app.cancel_job(&b).await;
    assert_eq!(cancelled.status, 200);

    let ids = |reply: &support::app::Reply| -> Vec<String> {
        reply.body["jobs"].as_array().unwrap().iter().map(|job| job["jobId"].as_str().unwrap().to_string()).collect()
    };
    let all = app.jobs("").await;
    assert_eq!(all.status, 200, "{}", all.text);
    assert_eq!(ids(&all), [a.clone(), c.clone(), b.clone()], "waiting in run order, then cancelled");
    assert_eq!(ids(&app.jobs("state=cancelled").await), [b.as_str()]);
    assert_eq!(ids(&app.jobs("pipeline=meeting").await), [c.as_str()]);
    assert_eq!(ids(&app.jobs("recordingId=rec-a").await), [a.as_str()]);

    // One at a time, following the cursor, every job once.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10 {
        let query = match &cursor {
            Some(cursor) => format!("limit=1&cursor={}", cursor.replace(':', "%3A")),
            None => "limit=1".into(),
        };
        let page = app.jobs(&query).await;
        assert_eq!(page.status, 200, "{}", page.text);
        seen.extend(ids(&page));
        cursor = page.body["nextCursor"].as_str().map(str::to_string);
        if cursor.is_none() {
            break;
        }
    }
    assert_eq!(seen, [a, c, b]);

    for (query, field) in
        [("state=sleeping", "state"), ("limit=0", "limit"), ("cursor=bogus", "cursor"), ("limit=x", "limit")]
    {
        let reply = app.jobs(query).await;
        assert_eq!((reply.status, reply.code()), (400, "invalid_query"), "{query}: {}", reply.text);
        assert_eq!(reply.body["details"]["field"], field, "{query}: {}", reply.text);
    }
    let reply = app.jobs("color=blue").await;
    assert_eq!((reply.status, reply.code()), (400, "invalid_query"), "{}", reply.text);
    app.stop().await;
}

#[tokio::test]
async fn job_logs_come_oldest_first_and_an_unknown_job_has_none() {
    let app = TestApp::spawn().await;
    let job = queued(&app, "rec-log").await;
    app.queue.log(&job, "first line").await.unwrap();
    app.queue.log(&job, "second line").await.unwrap();
    let reply = app.job_logs(&job).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.body["logs"][0]["line"], "first line");
    assert_eq!(reply.body["logs"][1]["line"], "second line");
    assert!(reply.body["logs"][0]["at"].as_str().is_some_and(|at| at.ends_with('Z')));
    let reply = app.job_logs(&uuid::Uuid::new_v4().to_string()).await;
    assert_eq!((reply.status, reply.code()), (404, "job_not_found"));
    app.stop().await;
}

#[tokio::test]
async fn queue_stats_pause_resume_clean_and_retry_failed() {
    let app = TestApp::spawn().await;
    let done = queued(&app, "rec-q1").await;
    let failed = queued(&app, "rec-q2").await;
    let _waiting = queued(&app, "rec-q3").await;
    assert_eq!(finish_next(&app, true).await, done);
    assert_eq!(finish_next(&app, false).await, failed);

    let stats = app.queue_stats().await;
    assert_eq!(stats.status, 200, "{}", stats.text);
    let figures = &stats.body["stats"];
    assert_eq!(
        (figures["waiting"].as_u64(), figures["completed"].as_u64(), figures["failed"].as_u64()),
        (Some(1), Some(1), Some(1))
    );
    assert_eq!(figures["total"], 3);
    assert_eq!(figures["paused"], false);
    assert_eq!(figures["mode"], "memory");

    let reply = app.queue_pause().await;
    assert_eq!((reply.status, &reply.body["paused"]), (200, &json!(true)), "{}", reply.text);
    assert_eq!(app.queue_stats().await.body["stats"]["paused"], true);
    assert!(app.queue.take(&test_worker(), Duration::from_millis(200)).await.unwrap().is_none(), "paused");
    let reply = app.queue_resume().await;
    assert_eq!(reply.body["paused"], false);
    assert_eq!(app.queue_stats().await.body["stats"]["paused"], false);

    // Nothing has ended a day ago; with no body the old clients' call removes nothing yet.
    let reply = app.post("/api/queue/clean").await;
    assert_eq!((reply.status, &reply.body["removed"]), (200, &json!(0)), "{}", reply.text);
    let reply = app.queue_clean(&json!({ "state": "completed", "olderThan": "0s", "limit": 10 })).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.body["removed"], 1);
    assert!(app.queue.get(&done).await.unwrap().is_none());
    for (body, field) in [
        (json!({ "state": "active" }), "state"),
        (json!({ "olderThan": "soon" }), "olderThan"),
        (json!({ "limit": 0 }), "limit"),
    ] {
        let reply = app.queue_clean(&body).await;
        assert_eq!((reply.status, reply.code()), (400, "invalid_field"), "{body}: {}", reply.text);
        assert_eq!(reply.body["details"]["field"], field);
    }

    let reply = app.retry_failed(&json!({ "pipeline": "meeting" })).await;
    assert_eq!((reply.status, &reply.body["count"]), (200, &json!(0)), "another pipeline's jobs stay failed");
    let reply = app.post("/api/queue/retry-failed").await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.body["retried"], json!([failed]));
    assert_eq!(app.queue.get(&failed).await.unwrap().unwrap().state, JobState::Waiting);
    assert_eq!(app.store.get("rec-q2").await.unwrap().unwrap().status.as_str(), "queued");
    let reply = app.retry_failed(&json!({ "pipelines": "x" })).await;
    assert_eq!((reply.status, reply.code()), (400, "unknown_field"), "{}", reply.text);
    app.stop().await;
}

#[tokio::test]
async fn a_batch_accepts_each_good_item_and_rejects_each_bad_one_alone() {
    let app = TestApp::spawn().await;
    let (one, two) = (stored(&app, "one.mp3"), stored(&app, "two.mp3"));
    let reply = app
        .batch_process(&json!({ "pipeline": "transcribe-only", "priority": 3, "items": [
            { "recordingId": "b-1", "fileUrl": one },
            { "recordingId": "b-2", "fileUrl": "gopher://example.com/x.mp3" },
            { "recording_id": "b-3", "file_url": two, "priority": -1 },
            { "recordingId": "bad id", "fileUrl": one },
        ] }))
        .await;
    assert_eq!(reply.status, 202, "{}", reply.text);
    assert_eq!(
        (reply.body["total"].as_u64(), reply.body["accepted"].as_u64(), reply.body["rejected"].as_u64()),
        (Some(4), Some(2), Some(2))
    );
    let items = reply.body["items"].as_array().unwrap();
    assert_eq!(items[0]["accepted"], true);
    assert_eq!((items[1]["accepted"].as_bool(), items[1]["code"].as_str()), (Some(false), Some("source_refused")));
    assert!(items[1]["reason"].as_str().unwrap().contains("gopher"), "{}", reply.text);
    assert_eq!(items[3]["code"], "invalid_id");
    let job = app.queue.get(items[2]["jobId"].as_str().unwrap()).await.unwrap().unwrap();
    assert_eq!((job.spec.priority, job.spec.pipeline.as_str()), (-1, "transcribe-only"));
    assert!(app.store.get("b-2").await.unwrap().is_none(), "the refused item registered nothing");

    // By id: rows that name their files; one unknown; b-1 already has its live job.
    let row = NewRecording { id: "b-4".into(), file_url: Some(stored(&app, "four.mp3")), ..NewRecording::default() };
    app.store.register(&row).await.unwrap();
    let reply = app
        .batch_process(&json!({ "recording_ids": ["b-4", "b-missing", "b-1"], "pipeline": "transcribe-only" }))
        .await;
    assert_eq!(reply.status, 202, "{}", reply.text);
    let items = reply.body["items"].as_array().unwrap();
    assert_eq!((items[0]["accepted"].as_bool(), items[0]["existing"].as_bool()), (Some(true), Some(false)));
    assert_eq!(items[1]["code"], "recording_not_found");
    assert_eq!(
        (items[2]["existing"].as_bool(), items[2]["jobId"].as_str()),
        (Some(true), reply_job(&app, "b-1").await.as_deref())
    );

    let reply = app.batch_process(&json!({ "recordingIds": ["b-4"], "pipeline": "nope" })).await;
    assert_eq!((reply.status, reply.code()), (404, "pipeline_not_found"));
    let reply = app.batch_process(&json!({ "pipeline": "default" })).await;
    assert_eq!((reply.status, reply.code()), (400, "missing_field"));
    let reply = app.batch_process(&json!({ "recordingIds": [] })).await;
    assert_eq!((reply.status, reply.code()), (400, "invalid_field"));
    app.stop().await;
}

async fn reply_job(app: &TestApp, recording: &str) -> Option<String> {
    app.store.get(recording).await.unwrap().and_then(|row| row.job_id)
}

/// The issue's table of bad requests: each gets its status and error code, a JSON error body with a sentence,
/// and never a 5xx.
#[tokio::test]
async fn bad_requests_get_a_4xx_with_a_code_and_a_sentence_never_a_5xx() {
    let app = TestApp::builder()
        .settings(|settings, _| settings.server.allowed_origins = vec!["https://app.example.com".into()])
        .start()
        .await;
    let done = queued(&app, "t-done").await;
    assert_eq!(finish_next(&app, true).await, done);
    let running = queued(&app, "t-running").await;
    let lease = app.queue.take(&test_worker(), Duration::from_secs(2)).await.unwrap().unwrap();
    assert_eq!(lease.job.id, running);
    let file = stored(&app, "t.mp3");
    let huge = json!({ "recordingId": "big", "params": { "pad": "a".repeat(2_000_000) } }).to_string();
    let url = |path: &str| app.url(path);
    let json_post = |path: &str, body: Value| app.client.post(url(path)).json(&body);
    let raw_post = |path: &str, body: &str| {
        app.client.post(url(path)).header("content-type", "application/json").body(body.to_string())
    };
    let process = "/api/process-recording";
    let with = |extra: Value| {
        let mut body = json!({ "recordingId": "t-new", "fileUrl": file.clone() });
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        ("malformed JSON", raw_post(process, "{\"recordingId\": "), 400, "malformed_json"),
        ("trailing garbage", raw_post(process, "{\"recordingId\": \"x\"} x"), 400, "malformed_json"),
        ("not an object", raw_post(process, "[1, 2]"), 400, "invalid_field"),
        ("empty body", raw_post(process, ""), 400, "missing_body"),
        (
            "no content type",
            app.client.post(url(process)).body("{\"recordingId\":\"x\"}"),
            415,
            "unsupported_media_type",
        ),
        (
            "text/plain",
            app.client.post(url(process)).header("content-type", "text/plain").body("{}"),
            415,
            "unsupported_media_type",
        ),
        ("missing recordingId", json_post(process, json!({ "fileUrl": file })), 400, "missing_field"),
        ("recordingId a number", json_post(process, json!({ "recordingId": 5 })), 400, "invalid_field"),
        ("priority a string", json_post(process, with(json!({ "priority": "high" }))), 400, "invalid_field"),
        ("params an array", json_post(process, with(json!({ "params": [1] }))), 400, "invalid_field"),
        ("fileUrl an object", json_post(process, with(json!({ "fileUrl": { "url": "x" } }))), 400, "invalid_field"),
        ("unknown field", json_post(process, with(json!({ "colour": "red" }))), 400, "unknown_field"),
        ("both spellings", json_post(process, with(json!({ "recording_id": "t-new" }))), 400, "invalid_field"),
        ("2 MB body", raw_post(process, &huge), 413, "payload_too_large"),
        ("priority out of range", json_post(process, with(json!({ "priority": 1_000_000_000 }))), 400, "invalid_field"),
        ("empty fileUrl", json_post(process, json!({ "recordingId": "t-new", "fileUrl": "" })), 400, "invalid_field"),
        (
            "recordingId with a space",
            json_post(process, json!({ "recordingId": "a b", "fileUrl": file })),
            400,
            "invalid_id",
        ),
        (
            "recordingId too long",
            json_post(process, json!({ "recordingId": "r".repeat(200), "fileUrl": file })),
            400,
            "invalid_id",
        ),
        ("unknown pipeline", json_post(process, with(json!({ "pipeline": "nope" }))), 404, "pipeline_not_found"),
        ("unknown recording", json_post(process, json!({ "recordingId": "t-unknown" })), 404, "recording_not_found"),
        (
            "file: outside the root",
            json_post(process, with(json!({ "fileUrl": "file:///etc/passwd" }))),
            400,
            "source_refused",
        ),
        (
            "path climbing out",
            json_post(process, with(json!({ "fileUrl": "../../etc/passwd" }))),
            400,
            "source_refused",
        ),
        ("private IP", json_post(process, with(json!({ "fileUrl": "http://10.0.0.5/a.mp3" }))), 400, "source_refused"),
        (
            "loopback Redis",
            json_post(process, with(json!({ "fileUrl": "http://127.0.0.1:6379/" }))),
            400,
            "source_refused",
        ),
        (
            "cloud metadata",
            json_post(process, with(json!({ "fileUrl": "http://169.254.169.254/latest" }))),
            400,
            "source_refused",
        ),
        ("gopher:", json_post(process, with(json!({ "fileUrl": "gopher://example.com/1" }))), 400, "source_refused"),
        ("ftp:", json_post(process, with(json!({ "fileUrl": "ftp://example.com/a.mp3" }))), 400, "source_refused"),
        (
            "unknown job",
            app.client.get(url(&format!("/api/job/{}/status", uuid::Uuid::new_v4()))),
            404,
            "job_not_found",
        ),
        ("bad job id", app.client.get(url("/api/job/12345/status")), 400, "invalid_id"),
        ("bad job id on cancel", app.client.post(url("/api/job/..%2F..%2Fetc/cancel")), 400, "invalid_id"),
        ("unknown recording status", app.client.get(url("/api/recording/t-nobody/status")), 404, "recording_not_found"),
        ("cancel a completed job", app.client.post(url(&format!("/api/job/{done}/cancel"))), 409, "job_ended"),
        ("retry a running job", app.client.post(url(&format!("/api/job/{running}/retry"))), 409, "job_not_retryable"),
        ("GET a POST route", app.client.get(url(process)), 405, "method_not_allowed"),
        ("unknown route", app.client.get(url("/api/nothing")), 404, "route_not_found"),
        (
            "batch with both lists",
            json_post("/api/batch-process", json!({ "recordingIds": ["a"], "items": [] })),
            400,
            "invalid_field",
        ),
        ("batch id a number", json_post("/api/batch-process", json!({ "recordingIds": [7] })), 400, "invalid_field"),
        (
            "batch item unknown field",
            json_post("/api/batch-process", json!({ "items": [{ "recordingId": "a", "x": 1 }] })),
            400,
            "unknown_field",
        ),
        ("clean a live state", json_post("/api/queue/clean", json!({ "state": "waiting" })), 400, "invalid_field"),
        ("jobs of an unknown state", app.client.get(url("/api/jobs?state=done")), 400, "invalid_query"),
        (
            "preflight from a disallowed origin",
            app.client
                .request(reqwest::Method::OPTIONS, url(process))
                .header("origin", "https://evil.example")
                .header("access-control-request-method", "POST"),
            403,
            "origin_not_allowed",
        ),
        (
            "POST from a disallowed origin",
            json_post(process, with(json!({}))).header("origin", "https://evil.example"),
            403,
            "origin_not_allowed",
        ),
    ];
    assert!(cases.len() > 30, "the issue asks for more than 30 cases; {} here", cases.len());
    let mut failures = Vec::new();
    for (name, request, status, code) in cases {
        let reply = app.send(request).await;
        let sentence = reply.body["error"].as_str().unwrap_or("");
        if reply.status != status
            || reply.code() != code
            || reply.body["success"] != false
            || sentence.len() < 10
            || reply.header("x-request-id").is_none()
        {
            failures.push(format!(
                "{name}: expected {status} {code}, got {} {}",
                reply.status,
                reply.text.chars().take(300).collect::<String>()
            ));
        }
        assert!(reply.status < 500, "{name} gave a 5xx: {}", reply.text);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(app.store.get("t-new").await.unwrap().is_none(), "no refused request registered a recording");
    app.stop().await;

    // A burst over the rate limit: 429 with Retry-After, and /health is not counted.
    let app = TestApp::builder().settings(|settings, _| settings.server.rate_limit_per_minute = 5).start().await;
    for _ in 0..5 {
        assert_eq!(app.queue_stats().await.status, 200);
    }
    let reply = app.queue_stats().await;
    assert_eq!((reply.status, reply.code()), (429, "rate_limited"), "{}", reply.text);
    let wait: u64 = reply.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=12).contains(&wait), "one request refills in 12 s: {wait}");
    assert_eq!(app.health().await.status, 200, "health checks are not limited");
    app.stop().await;

    // Behind a trusted proxy (here: loopback) each forwarded client has its own bucket; a client cannot escape
    // its bucket by writing a false first entry.
    let app = TestApp::builder()
        .settings(|settings, _| {
            settings.server.rate_limit_per_minute = 2;
            settings.server.trusted_proxies = vec!["127.0.0.0/8".into()];
        })
        .start()
        .await;
    let from =
        |forwarded: &'static str| app.client.get(app.url("/api/queue/stats")).header("x-forwarded-for", forwarded);
    for forwarded in ["203.0.113.7", "198.51.100.1, 203.0.113.7"] {
        assert_eq!(app.send(from(forwarded)).await.status, 200);
    }
    let over = app.send(from("192.0.2.99, 203.0.113.7")).await;
    assert_eq!((over.status, over.code()), (429, "rate_limited"), "{}", over.text);
    assert!(over.text.contains("203.0.113.7"), "the message names the client: {}", over.text);
    assert_eq!(app.send(from("203.0.113.8")).await.status, 200, "another client has its own bucket");
    app.stop().await;
}

#[tokio::test]
async fn cors_allows_the_configured_origins_and_the_request_id_is_echoed() {
    let app = TestApp::builder()
        .settings(|settings, _| settings.server.allowed_origins = vec!["https://app.example.com/".into()])
        .start()
        .await;
    let preflight = app
        .send(
            app.client
                .request(reqwest::Method::OPTIONS, app.url("/api/process-recording"))
                .header("origin", "https://app.example.com")
                .header("access-control-request-method", "POST")
                .header("access-control-request-headers", "content-type, x-priority"),
        )
        .await;
    assert_eq!(preflight.status, 204, "{}", preflight.text);
    assert_eq!(preflight.header("access-control-allow-origin"), Some("https://app.example.com"));
    let allowed = preflight.header("access-control-allow-headers").unwrap();
    assert!(allowed.contains("content-type") && allowed.contains("x-priority") && allowed.contains("authorization"));
    let reply = app.send(app.client.get(app.url("/api/queue/stats")).header("origin", "https://app.example.com")).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("access-control-allow-origin"), Some("https://app.example.com"));
    assert!(reply.header("access-control-expose-headers").unwrap().contains("x-request-id"));
    // The API's own origin (a page it serves) counts as allowed.
    let own = app.address.clone();
    assert_eq!(app.send(app.client.get(app.url("/api/queue/stats")).header("origin", own)).await.status, 200);

    let reply = app.send(app.client.get(app.url("/health")).header("x-request-id", "trace-42.a")).await;
    assert_eq!(reply.header("x-request-id"), Some("trace-42.a"));
    let reply = app.send(app.client.get(app.url("/health")).header("x-request-id", "has spaces and \"quotes\"")).await;
    let id = reply.header("x-request-id").unwrap();
    assert!(uuid::Uuid::try_parse(id).is_ok(), "an unsafe id is replaced: {id}");
    app.stop().await;
}

#[tokio::test]
async fn the_routes_work_on_redis_and_postgresql() {
    let app = TestApp::builder().redis().postgres().start().await;
    assert_eq!(app.health().await.body["checks"]["queue"]["kind"], "redis");
    let job = queued(&app, "pg-1").await;
    let again = app.process_recording(&json!({ "recordingId": "pg-1" })).await;
    assert_eq!((again.status, again.body["jobId"].as_str()), (200, Some(job.as_str())), "{}", again.text);
    assert_eq!(app.recording_status("pg-1").await.body["status"]["state"], "queued");
    assert_eq!(app.jobs("state=waiting").await.body["jobs"][0]["jobId"], job.as_str());
    assert_eq!(app.cancel_job(&job).await.status, 200);
    assert_eq!(app.recording_status("pg-1").await.body["status"]["state"], "cancelled");
    assert_eq!(app.cancel_job(&job).await.code(), "job_ended");
    assert_eq!(app.retry_job(&job).await.status, 202);
    let stats = app.queue_stats().await;
    assert_eq!(
        (stats.body["stats"]["waiting"].as_u64(), stats.body["stats"]["mode"].as_str()),
        (Some(1), Some("redis"))
    );
    let batch = app.batch_process(&json!({ "items": [{ "recordingId": "pg-2", "fileUrl": stored(&app, "pg2.mp3") }, { "recordingId": "pg-3", "fileUrl": "http://192.168.1.1/a" }] })).await;
    assert_eq!(
        (batch.body["accepted"].as_u64(), batch.body["rejected"].as_u64()),
        (Some(1), Some(1)),
        "{}",
        batch.text
    );
    app.stop().await;
}

/// End to end: a generated recording posted to `process-recording` runs through the shipped `default` pipeline
/// on a worker in the same process against the fake AI server, and the recording ends completed with its
/// transcript and analysis, progress only ever rising.
#[tokio::test]
async fn a_recording_posted_to_the_api_is_transcribed_and_analysed_to_completed() {
    use support::fake_ai::{Fake, KEY, Kind};
    let fake = Fake::start().await;
    let endpoint = format!("{}/v1", fake.base);
    let app = TestApp::builder()
        .with_worker()
        .settings(move |settings, _| {
            let provider = echo_worker::ai::ProviderSettings::new(
                echo_worker::ai::ProviderStyle::Openai,
                endpoint,
                Some(echo_worker::config::Secret::new(KEY)),
            );
            settings.ai.providers.insert("fake".into(), provider);
            settings.ai.default_provider = Some("fake".into());
        })
        .start()
        .await;
    let media = support::media::tone(&app.storage(), "e2e-tone.wav", 6);
    let reply = app
        .process_recording(
            &json!({ "recording_id": "e2e-1", "file_url": media.display().to_string(), "fileType": "audio/wav" }),
        )
        .await;
    assert_eq!(reply.status, 202, "{}", reply.text);
    let job = reply.body["jobId"].as_str().unwrap().to_string();

    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let last = loop {
        let reply = app.job_status(&job).await;
        let state = reply.body["job"]["state"].as_str().unwrap_or("").to_string();
        seen.push(reply.body["job"]["progress"].as_u64().unwrap_or(0));
        if matches!(state.as_str(), "completed" | "failed" | "cancelled") || tokio::time::Instant::now() > deadline {
            break reply;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(last.body["job"]["state"], "completed", "{}", last.text);
    assert!(seen.windows(2).all(|pair| pair[0] <= pair[1]), "progress only rises: {seen:?}");
    let stages: Vec<&str> = last.body["stages"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(stages, ["validate", "download", "transcode", "transcript", "analysis", "persist"]);
    assert!(last.body["stages"].as_array().unwrap().iter().all(|s| s["status"] == "succeeded"), "{}", last.text);

    let recording = app.recording_status("e2e-1").await;
    assert_eq!(recording.status, 200);
    assert_eq!(recording.body["status"]["state"], "completed", "{}", recording.text);
    assert_eq!(recording.body["status"]["progress"], 100);
    assert_eq!(recording.body["status"]["hasTranscript"], true);
    let transcript = recording.body["transcript"].as_str().unwrap();
    assert!(!transcript.is_empty());
    assert!(recording.body["result"]["summary"].as_str().is_some_and(|s| !s.is_empty()), "{}", recording.text);
    assert!(recording.body["result"]["ai_insights"].is_object(), "{}", recording.text);
    assert!(!fake.seen(Kind::Transcription).is_empty() && !fake.seen(Kind::Chat).is_empty());
    app.stop().await;
}

/// The binary: `echo-worker api` refuses to start without `REDIS_URL` (jobs it queued would reach no worker);
/// `echo-worker serve` answers HTTP on `PORT` with no configuration beyond a database file, and stops cleanly on
/// SIGTERM.
#[tokio::test]
async fn echo_worker_api_needs_redis_and_serve_answers_http_until_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let binary = env!("CARGO_BIN_EXE_echo-worker");
    let base = |command: &mut std::process::Command| {
        command
            .current_dir(dir.path())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", format!("sqlite://{}", dir.path().join("echo.db").display()))
            .env("TEMP_DIR", dir.path())
            .env("LOG_LEVEL", "info");
    };
    let mut api = std::process::Command::new(binary);
    base(&mut api);
    let output = tokio::task::spawn_blocking(move || api.arg("api").output().unwrap()).await.unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no REDIS_URL") && stderr.contains("echo-worker serve"), "{stderr}");

    let mut bad = std::process::Command::new(binary);
    base(&mut bad);
    bad.env("ECHO_SERVER__TRUSTED_PROXIES", "10.0.0.0/8,proxy.internal").env("PORT", "0");
    let output = tokio::task::spawn_blocking(move || bad.arg("serve").output().unwrap()).await.unwrap();
    assert_eq!(output.status.code(), Some(1), "a bad trusted proxy is refused at start");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("server.trusted_proxies: `proxy.internal` is not an IP address"), "{stderr}");

    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut serve = std::process::Command::new(binary);
    base(&mut serve);
    let log = std::fs::File::create(dir.path().join("serve.log")).unwrap();
    let mut child = serve
        .arg("serve")
        .env("PORT", port.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    let mut healthy = None;
    for _ in 0..300 {
        if let Ok(response) = client.get(format!("http://127.0.0.1:{port}/health")).send().await {
            healthy = Some(response.status().as_u16());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let mut status = None;
    for _ in 0..300 {
        status = child.try_wait().unwrap();
        if status.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if status.is_none() {
        let _ = child.kill();
    }
    let log = std::fs::read_to_string(dir.path().join("serve.log")).unwrap();
    assert_eq!(healthy, Some(200), "serve did not answer on port {port}: {log}");
    assert!(status.is_some_and(|status| status.success()), "serve exits 0 within 30 s of SIGTERM: {status:?}\n{log}");
    assert!(log.contains("in-process queue"), "serve says the queue is in-process: {log}");
    assert!(log.contains("127.0.0.1 only"), "serve says it listens on loopback only without auth: {log}");
}
