//! The dashboard (issue 12), tested in headless Chromium (Debian's `chromium` and `chromium-driver`) driven over
//! WebDriver (`support::browser`) against the whole app on port 0 (`support::app::TestApp`) with a worker, the
//! real Redis and ffmpeg, and the fake AI server: a job queued through the API shows up and its progress bar rises
//! to completed without a reload; a long job is cancelled with its button; a failed job is retried with its button
//! and completes; the pipeline view draws every stage of `default`; an unauthenticated visitor sees only the
//! sign-in prompt; a Supabase user sees only their own jobs; a read-only token sees no buttons. Screenshots go to
//! `target/dashboard-screenshots/` (CI keeps them). The page's files, `GET /api/session` and
//! `GET /api/job/{id}/usage` are also tested over plain HTTP.

mod support;

use std::time::Duration;

use serde_json::json;
use support::app::{Reply, TestApp};
use support::browser::Browser;
use support::fake_ai::{Fake, Fault, KEY, Kind};

const FULL: &str = "svc-token-dash-full-5e8a1c";
const LOOK: &str = "svc-token-dash-look-9b2d47";
const SECRET: &str = "jwt-secret-for-dashboard-tests-1f6c0a8e3d";

/// A long wait for a page change that follows a job through ffmpeg and the fake AI.
const JOB_WAIT: Duration = Duration::from_secs(90);
/// A wait for a page change that needs one poll or one event.
const PAGE_WAIT: Duration = Duration::from_secs(20);

/// The stage ids of the shipped `default` pipeline, read from its file.
fn default_stages() -> Vec<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/default.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let value: toml::Table = toml::from_str(&text).unwrap();
    value["stages"].as_table().unwrap().keys().cloned().collect()
}

/// An app on Redis with a worker whose AI provider is the fake, every job allowed one attempt (so that a failure
/// stays failed until the Retry button).
async fn app_with_worker(fake: &Fake) -> TestApp {
    let endpoint = format!("{}/v1", fake.base);
    TestApp::builder()
        .redis()
        .with_worker()
        .settings(move |settings, _| {
            let provider = serde_json::from_value(json!({ "style": "openai", "endpoint": endpoint, "api_key": KEY }))
                .expect("provider settings");
            settings.ai.providers.insert("fake".into(), provider);
            settings.queue.max_attempts = 1;
        })
        .start()
        .await
}

/// An app with one full and one read-only service token and the HS256 project secret (no worker).
async fn app_with_auth() -> TestApp {
    TestApp::builder()
        .settings(|settings, _| {
            settings.auth.tokens = vec![echo_worker::config::Secret::new(FULL)];
            settings.auth.read_only_tokens = vec![echo_worker::config::Secret::new(LOOK)];
            settings.supabase.jwt_secret = Some(echo_worker::config::Secret::new(SECRET));
        })
        .start()
        .await
}

async fn get_as(app: &TestApp, token: &str, path: &str) -> Reply {
    app.send(app.client.get(app.url(path)).bearer_auth(token)).await
}

/// Queues recording `id` (a tone of `seconds` made with ffmpeg in the app's storage) through the API.
async fn queue_tone(app: &TestApp, token: Option<&str>, id: &str, seconds: u32) -> String {
    let file = support::media::tone(&app.storage(), &format!("{id}.wav"), seconds);
    let mut request = app.client.post(app.url("/api/process-recording"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let body = json!({ "recordingId": id, "fileUrl": file.to_str().unwrap(), "pipeline": "default" });
    let reply = app.send(request.json(&body)).await;
    assert!(matches!(reply.status, 200 | 202), "queued {id}: {}", reply.text);
    reply.body["jobId"].as_str().unwrap_or_else(|| panic!("a job id for {id}: {}", reply.text)).to_string()
}

/// The state and progress the queue list shows for a job: `[state, progress]`, or null when it is not listed.
const ROW: &str = "const row = document.querySelector(`tr[data-job=\"${arguments[0]}\"]`);
    if (!row) return null;
    return [row.dataset.state, Number(row.querySelector('progress').value)];";

#[tokio::test]
async fn the_dashboard_follows_jobs_live_cancels_and_retries_them_and_draws_the_pipelines() {
    let fake = Fake::start().await;
    // Each transcription takes 4 s, so the job is seen running before it completes.
    *fake.delay.lock().unwrap() = Duration::from_secs(4);
    let app = app_with_worker(&fake).await;
    let browser = Browser::start().await;

    // The page loads and shows the queue (no auth configured: local access, every button).
    browser.goto(&app.url("/")).await;
    browser.until("the queue view", PAGE_WAIT, "return document.querySelector('#counts dd') !== null", json!([])).await;
    browser.run("window.notReloaded = true", json!([])).await;
    assert_eq!(browser.run("return document.getElementById('login').hidden", json!([])).await, true);
    browser.screenshot("01-queue-empty").await;

    // A job queued through the API appears, is seen below 100 %, and rises to completed without a reload.
    let job = queue_tone(&app, None, "rec-dash-live", 3).await;
    let mut seen: Vec<(String, f64)> = Vec::new();
    let start = std::time::Instant::now();
    loop {
        let row = browser.run(ROW, json!([job])).await;
        if let Some([state, progress]) = row.as_array().map(Vec::as_slice) {
            let sample = (state.as_str().unwrap_or("").to_string(), progress.as_f64().unwrap_or(-1.0));
            if seen.last() != Some(&sample) {
                seen.push(sample.clone());
            }
            if sample.0 == "completed" {
                break;
            }
        }
        if start.elapsed() > JOB_WAIT {
            browser.screenshot("timeout-live-job").await;
            panic!("the job did not show completed within {JOB_WAIT:?}; the list showed {seen:?}");
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let last = seen.last().unwrap().clone();
    assert_eq!(last, ("completed".to_string(), 100.0), "{seen:?}");
    assert!(seen.iter().any(|(state, progress)| state != "completed" && *progress < 100.0), "seen running: {seen:?}");
    assert!(seen.windows(2).all(|pair| pair[1].1 >= pair[0].1), "the progress bar only rises: {seen:?}");
    assert_eq!(browser.run("return window.notReloaded === true", json!([])).await, true, "no reload happened");
    // The counts and the list are fetched side by side, so the job may complete between the two reads; the
    // next poll (2 s) must then show it counted.
    browser
        .until(
            "the completed count of 1",
            PAGE_WAIT,
            "return document.querySelector('[data-count=completed] dd')?.textContent === '1'",
            json!([]),
        )
        .await;
    browser.screenshot("02-queue-job-completed").await;

    // Its page: every stage ended, the AI usage so far, and the results to download.
    browser.click(&format!("tr[data-job=\"{job}\"] a")).await;
    browser
        .until(
            "the completed job's page",
            PAGE_WAIT,
            "return document.querySelector('#job-state [data-state=completed]') !== null",
            json!([]),
        )
        .await;
    let stages = default_stages();
    let timeline: Vec<String> = serde_json::from_value(
        browser
            .until(
                "the stage timeline",
                PAGE_WAIT,
                "const items = [...document.querySelectorAll('#timeline li[data-stage]')];
                 return items.length >= arguments[0] ? items.map((li) => li.dataset.stage) : null;",
                json!([stages.len()]),
            )
            .await,
    )
    .unwrap();
    for stage in &stages {
        assert!(timeline.contains(stage), "the timeline shows stage {stage}: {timeline:?}");
    }
    browser
        .until(
            "the audio seconds",
            PAGE_WAIT,
            "return /\\d+\\.\\d s/.test(document.getElementById('usage').textContent)",
            json!([]),
        )
        .await;
    let results = browser.run("return document.getElementById('results').textContent", json!([])).await;
    assert!(results.as_str().unwrap().contains("Subtitles (SRT)"), "{results}");
    browser.screenshot("03-job-completed").await;

    // A long job (its transcription request hangs at the fake) is cancelled with its button and shows cancelled.
    *fake.delay.lock().unwrap() = Duration::from_millis(300);
    fake.fault(Kind::Transcription, Fault::Hang);
    let long = queue_tone(&app, None, "rec-dash-long", 3).await;
    browser.goto(&app.url(&format!("/#/job/{long}"))).await;
    browser
        .until(
            "the long job inside its transcription",
            JOB_WAIT,
            "const li = document.querySelector('#timeline li[data-stage=transcript] [data-state=running]');
             return li !== null && !document.getElementById('cancel').hidden;",
            json!([]),
        )
        .await;
    browser.screenshot("04-job-running").await;
    browser.click("#cancel").await;
    browser
        .until(
            "the cancelled state",
            PAGE_WAIT,
            "return document.querySelector('#job-state [data-state=cancelled]') !== null",
            json!([]),
        )
        .await;
    assert_eq!(browser.run("return document.getElementById('cancel').hidden", json!([])).await, true);
    assert_eq!(app.job_status(&long).await.body["job"]["state"], "cancelled");
    browser.screenshot("05-job-cancelled").await;

    // A job that fails (the provider's quota is used up: not retryable) is retried with its button and completes.
    while fake.in_flight() > 0 && start.elapsed() < JOB_WAIT * 2 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    fake.fault(Kind::Transcription, Fault::Quota);
    let failing = queue_tone(&app, None, "rec-dash-retry", 3).await;
    browser.goto(&app.url(&format!("/#/job/{failing}"))).await;
    browser
        .until(
            "the failed state",
            JOB_WAIT,
            "return document.querySelector('#job-state [data-state=failed]') !== null",
            json!([]),
        )
        .await;
    let error = browser.run("return document.getElementById('job-error').textContent", json!([])).await;
    assert!(error.as_str().unwrap().contains("transcript"), "the error names the failing stage: {error}");
    assert!(error.as_str().unwrap().contains("quota"), "and says why: {error}");
    browser.screenshot("06-job-failed").await;
    browser.click("#retry").await;
    browser
        .until(
            "the retried job completed",
            JOB_WAIT,
            "return document.querySelector('#job-state [data-state=completed]') !== null",
            json!([]),
        )
        .await;
    let history = browser.run("return document.getElementById('history').textContent", json!([])).await;
    assert!(history.as_str().unwrap().contains("failed"), "the state changes list the failure: {history}");
    browser.screenshot("07-job-retried-completed").await;

    // The pipeline view draws every stage of `default`, with its kind, in the graph and in the table.
    browser.goto(&app.url("/#/pipelines")).await;
    let drawn: Vec<String> = serde_json::from_value(
        browser
            .until(
                "the default pipeline's graph",
                PAGE_WAIT,
                "const nodes = [...document.querySelectorAll('[data-pipeline=default] svg g[data-stage]')];
                 return nodes.length ? nodes.map((g) => g.dataset.stage) : null;",
                json!([]),
            )
            .await,
    )
    .unwrap();
    let mut expected = stages.clone();
    expected.sort();
    let mut got = drawn.clone();
    got.sort();
    assert_eq!(got, expected, "every stage of default is drawn");
    let edges = browser
        .run("return document.querySelectorAll('[data-pipeline=default] svg path.edge').length", json!([]))
        .await;
    assert!(edges.as_u64().unwrap() >= (stages.len() - 1) as u64, "the stages are joined: {edges}");
    let kinds =
        browser.run("return document.querySelector('[data-pipeline=default] table').textContent", json!([])).await;
    for kind in ["validate", "download", "transcode", "whisper", "analyze", "persist"] {
        assert!(kinds.as_str().unwrap().contains(kind), "the table shows kind {kind}");
    }
    browser.screenshot("08-pipelines").await;

    // A narrow window: nothing wider than the window but the tables' own scrolling boxes.
    browser.resize(380, 900).await;
    browser.goto(&app.url("/#/queue")).await;
    browser.until("the queue view", PAGE_WAIT, "return document.querySelector('#counts dd') !== null", json!([])).await;
    let overflow = browser
        .run("return document.documentElement.scrollWidth - document.documentElement.clientWidth", json!([]))
        .await;
    assert!(overflow.as_i64().unwrap() <= 0, "the page fits a 380 px window (overflows by {overflow} px)");
    browser.screenshot("09-queue-narrow").await;

    // Every request the page made went to this server.
    let elsewhere = browser
        .run(
            "return performance.getEntriesByType('resource').map((e) => e.name).filter((n) => !n.startsWith(location.origin))",
            json!([]),
        )
        .await;
    assert_eq!(elsewhere, json!([]), "requests outside the service");
    drop(browser);
    app.stop().await;
}

#[tokio::test]
async fn a_visitor_without_a_token_sees_only_the_prompt_and_a_user_sees_only_their_own_jobs() {
    let app = app_with_auth().await;
    let alice = support::jwt::hs256(&support::jwt::user_claims("a1a1a1a1-0000-4000-8000-00000000000a"), SECRET);
    let bob = support::jwt::hs256(&support::jwt::user_claims("b2b2b2b2-0000-4000-8000-00000000000b"), SECRET);
    queue_tone(&app, Some(&alice), "rec-of-alice", 1).await;
    queue_tone(&app, Some(&bob), "rec-of-bob", 1).await;
    let browser = Browser::start().await;

    // No token: the prompt, no data, no buttons.
    browser.goto(&app.url("/dashboard")).await;
    browser.until("the sign-in prompt", PAGE_WAIT, "return !document.getElementById('login').hidden", json!([])).await;
    let text = browser.run("return document.body.innerText", json!([])).await;
    let text = text.as_str().unwrap();
    assert!(!text.contains("rec-of-"), "no recording is shown: {text}");
    assert_eq!(browser.run("return document.getElementById('view').childElementCount", json!([])).await, 0);
    assert_eq!(browser.run("return document.activeElement.id", json!([])).await, "token", "the token field has focus");
    browser.screenshot("10-sign-in").await;

    // A wrong token is refused with the server's sentence and the prompt stays.
    browser.type_into("#token", "not-a-token\n").await;
    browser
        .until("the refusal", PAGE_WAIT, "return document.getElementById('login-error').textContent", json!([]))
        .await;
    assert_eq!(browser.run("return document.getElementById('view').childElementCount", json!([])).await, 0);
    assert_eq!(browser.run("return sessionStorage.length", json!([])).await, 0, "a refused token is not kept");

    // Alice signs in: her job is listed, Bob's is not.
    browser.type_into("#token", &format!("{alice}\n")).await;
    browser
        .until("Alice's job", PAGE_WAIT, "return document.querySelector('#jobs tr[data-job]') !== null", json!([]))
        .await;
    let listed = browser.run("return document.getElementById('jobs').textContent", json!([])).await;
    assert!(listed.as_str().unwrap().contains("rec-of-alice"), "{listed}");
    assert!(!listed.as_str().unwrap().contains("rec-of-bob"), "Bob's job is not shown to Alice: {listed}");
    let who = browser.run("return document.getElementById('who').textContent", json!([])).await;
    assert!(who.as_str().unwrap().contains("a1a1a1a1"), "{who}");
    browser.screenshot("11-user-sees-own-jobs").await;

    // The token stays for the tab: a reload needs no new sign-in.
    browser.goto(&app.url("/dashboard")).await;
    browser
        .until(
            "Alice's job again",
            PAGE_WAIT,
            "return document.querySelector('#jobs tr[data-job]') !== null",
            json!([]),
        )
        .await;

    // Sign out; a read-only service token sees every job and no button.
    browser.click("#sign-out").await;
    browser.until("the prompt", PAGE_WAIT, "return !document.getElementById('login').hidden", json!([])).await;
    browser.type_into("#token", &format!("{LOOK}\n")).await;
    browser
        .until("both jobs", PAGE_WAIT, "return document.querySelectorAll('#jobs tr[data-job]').length === 2", json!([]))
        .await;
    let visible = browser
        .run(
            "return [...document.querySelectorAll('button')].filter((b) => b.offsetParent !== null).map((b) => b.textContent)",
            json!([]),
        )
        .await;
    for action in ["Pause", "Resume", "Retry all failed", "Cancel", "Retry"] {
        assert!(
            !visible.as_array().unwrap().iter().any(|b| b == action),
            "a read-only token sees no {action}: {visible}"
        );
    }
    let who = browser.run("return document.getElementById('who').textContent", json!([])).await;
    assert!(who.as_str().unwrap().contains("read-only"), "{who}");
    browser.screenshot("12-read-only").await;

    // When the server stops accepting the token (here: the tab's token replaced by one it refuses), the next call brings the prompt back.
    browser.run("sessionStorage.setItem('echo-worker.token', 'revoked')", json!([])).await;
    browser
        .until("the prompt after a refusal", PAGE_WAIT, "return !document.getElementById('login').hidden", json!([]))
        .await;
    assert_eq!(browser.run("return document.getElementById('view').childElementCount", json!([])).await, 0);
    drop(browser);
    app.stop().await;
}

#[tokio::test]
async fn the_page_and_its_files_are_served_with_a_same_origin_policy_and_weigh_under_200_kb() {
    let app = TestApp::spawn().await;
    let mut total = 0;
    for (path, kind) in [
        ("/", "text/html"),
        ("/dashboard", "text/html"),
        ("/dashboard/style.css", "text/css"),
        ("/dashboard/app.js", "text/javascript"),
        ("/dashboard/api.js", "text/javascript"),
        ("/dashboard/graph.js", "text/javascript"),
    ] {
        let reply = app.get(path).await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.text);
        assert!(reply.header("content-type").is_some_and(|t| t.starts_with(kind)), "{path}: {:?}", reply.headers);
        let policy = reply.header("content-security-policy").unwrap_or("");
        assert!(policy.contains("connect-src 'self'") && policy.contains("default-src 'none'"), "{path}: {policy}");
        if path != "/dashboard" {
            total += reply.text.len();
        }
    }
    assert!(total < 200 * 1024, "the page weighs {total} bytes");
    let reply = app.get("/dashboard/secrets.js").await;
    assert_eq!((reply.status, reply.code()), (404, "asset_not_found"), "{}", reply.text);
    assert!(reply.body["error"].as_str().unwrap().contains("secrets.js"), "{}", reply.text);
    let reply = app.get("/dashboard/..%2Fsrc%2Fmain.rs").await;
    assert_eq!(reply.status, 404, "no path outside the embedded files: {}", reply.text);
    let reply = app.post("/dashboard").await;
    assert_eq!(reply.status, 405, "{}", reply.text);
    app.stop().await;
}

#[tokio::test]
async fn the_session_route_says_what_the_caller_may_do() {
    let app = TestApp::spawn().await;
    let reply = app.get("/api/session").await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.body, json!({ "success": true, "canWrite": true, "authConfigured": false }));
    app.stop().await;

    let app = app_with_auth().await;
    let reply = app.get("/api/session").await;
    assert_eq!((reply.status, reply.code()), (401, "missing_token"), "{}", reply.text);
    let reply = get_as(&app, "wrong", "/api/session").await;
    assert_eq!((reply.status, reply.code()), (401, "invalid_token"), "{}", reply.text);
    let reply = get_as(&app, FULL, "/api/session").await;
    assert_eq!(reply.body, json!({ "success": true, "canWrite": true, "authConfigured": true }), "{}", reply.text);
    let reply = get_as(&app, LOOK, "/api/session").await;
    assert_eq!(reply.body, json!({ "success": true, "canWrite": false, "authConfigured": true }), "{}", reply.text);
    let user = support::jwt::hs256(&support::jwt::user_claims("c3c3c3c3-0000-4000-8000-00000000000c"), SECRET);
    let reply = get_as(&app, &user, "/api/session").await;
    let expected = json!({ "success": true, "canWrite": true, "owner": "c3c3c3c3-0000-4000-8000-00000000000c", "authConfigured": true });
    assert_eq!(reply.body, expected, "{}", reply.text);
    let expired = support::jwt::hs256(&support::jwt::expired_claims("c3c3c3c3-0000-4000-8000-00000000000c"), SECRET);
    let reply = get_as(&app, &expired, "/api/session").await;
    assert_eq!((reply.status, reply.code()), (401, "token_expired"), "{}", reply.text);
    app.stop().await;
}

#[tokio::test]
async fn the_usage_route_adds_up_what_the_fake_provider_billed_and_refuses_unknown_and_foreign_jobs() {
    let fake = Fake::start().await;
    *fake.delay.lock().unwrap() = Duration::from_millis(100);
    let app = app_with_worker(&fake).await;
    let job = queue_tone(&app, None, "rec-usage", 4).await;
    let status = app.until_final(&job, JOB_WAIT).await;
    assert_eq!(status.body["job"]["state"], "completed", "{}", status.text);
    let reply = app.get(&format!("/api/job/{job}/usage")).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let billed_audio: f64 = fake.seen(Kind::Transcription).iter().map(|seen| seen.audio_seconds).sum();
    let billed_prompt: u64 = fake.seen(Kind::Chat).iter().map(|seen| seen.prompt_tokens).sum();
    let billed_completion: u64 = fake.seen(Kind::Chat).iter().map(|seen| seen.completion_tokens).sum();
    let requests = (fake.seen(Kind::Transcription).len() + fake.seen(Kind::Chat).len()) as u64;
    let usage = &reply.body["usage"];
    assert!((usage["audioSeconds"].as_f64().unwrap() - billed_audio).abs() < 0.01, "{usage} vs {billed_audio}");
    assert!(billed_audio > 3.5, "the 4 s tone was transcribed: {billed_audio}");
    assert_eq!(usage["promptTokens"], billed_prompt, "{usage}");
    assert_eq!(usage["completionTokens"], billed_completion, "{usage}");
    assert_eq!(usage["requests"], requests, "{usage}");
    assert!(reply.body["stages"]["transcript"]["audioSeconds"].as_f64().unwrap() > 3.5, "{}", reply.text);
    assert!(reply.body["stages"]["analysis"]["promptTokens"].as_u64().unwrap() > 0, "{}", reply.text);

    let reply = app.get("/api/job/6f1c2b9e-0000-4000-8000-000000000000/usage").await;
    assert_eq!((reply.status, reply.code()), (404, "job_not_found"), "{}", reply.text);
    let reply = app.get("/api/job/not-a-uuid/usage").await;
    assert_eq!((reply.status, reply.code()), (400, "invalid_id"), "{}", reply.text);
    app.stop().await;

    // Another user's job answers 404, as if it did not exist; its owner and a service token see it.
    let app = app_with_auth().await;
    let alice = support::jwt::hs256(&support::jwt::user_claims("a1a1a1a1-0000-4000-8000-00000000000a"), SECRET);
    let bob = support::jwt::hs256(&support::jwt::user_claims("b2b2b2b2-0000-4000-8000-00000000000b"), SECRET);
    let job = queue_tone(&app, Some(&alice), "rec-usage-alice", 1).await;
    let path = format!("/api/job/{job}/usage");
    let reply = get_as(&app, &bob, &path).await;
    assert_eq!((reply.status, reply.code()), (404, "job_not_found"), "{}", reply.text);
    let reply = get_as(&app, &alice, &path).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(
        reply.body["usage"],
        json!({ "audioSeconds": 0.0, "promptTokens": 0, "completionTokens": 0, "requests": 0 })
    );
    assert_eq!(get_as(&app, LOOK, &path).await.status, 200);
    assert_eq!(app.get(&path).await.status, 401, "no token");
    app.stop().await;
}
