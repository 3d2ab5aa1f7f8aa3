//! The API's callback, subtitle, transcript and process-direct routes, on the whole app (`TestApp`, memory
//! queue, SQLite) with the fake AI server and a callback receiver on loopback: a recording posted with a
//! `callbackUrl` runs to completed, calls back once with a valid signature, and its SRT, VTT and transcript
//! download and read back; `process-direct` answers with the results, refuses an oversized source with 413, and
//! every refusal has its status and code. Every wait is bounded.

mod support;

use std::time::Duration;

use echo_worker::store::{NewRecording, RecordingStatus, Store as _};
use serde_json::{Value, json};
use support::app::{Builder, TestApp};
use support::fake_ai::{Fake, KEY, Kind};
use support::hook::{Receiver, verify};

const SECRET: &str = "whsec_api_test_41c2";

/// An app whose AI provider is the fake, with a callback secret, allowing the receiver's port.
fn app_with(fake: &Fake, receiver_port: Option<u16>) -> Builder {
    let endpoint = format!("{}/v1", fake.base);
    TestApp::builder().settings(move |settings, _| {
        let provider = echo_worker::ai::ProviderSettings::new(
            echo_worker::ai::ProviderStyle::Openai,
            endpoint,
            Some(echo_worker::config::Secret::new(KEY)),
        );
        settings.ai.providers.insert("fake".into(), provider);
        settings.ai.default_provider = Some("fake".into());
        settings.callback.secret = Some(echo_worker::config::Secret::new(SECRET));
        settings.callback.backoff = echo_worker::units::HumanDuration(Duration::from_millis(100));
        if let Some(port) = receiver_port {
            settings.download.allow_private = vec![format!("127.0.0.1:{port}")];
        }
    })
}

/// Posts recording `id` (a tone of `seconds`) for `transcribe-only` with the receiver as its `callbackUrl`;
/// returns the job id.
async fn post_with_callback(app: &TestApp, id: &str, seconds: u32, receiver: &Receiver) -> String {
    let media = support::media::tone(&app.storage(), &format!("{id}.wav"), seconds);
    let reply = app
        .process_recording(&json!({
            "recordingId": id,
            "fileUrl": media.display().to_string(),
            "pipeline": "transcribe-only",
            "callbackUrl": receiver.url(),
        }))
        .await;
    assert_eq!(reply.status, 202, "{}", reply.text);
    reply.body["jobId"].as_str().unwrap().to_string()
}

/// SRT or VTT read back as (start, end, text), checking numbering (SRT), the header (VTT) and the timing lines.
fn parse_subtitles(text: &str, vtt: bool) -> Vec<(f64, f64, String)> {
    let body = if vtt { text.strip_prefix("WEBVTT\n\n").expect("a WEBVTT header") } else { text };
    let separator = if vtt { '.' } else { ',' };
    let seconds = |stamp: &str| -> f64 {
        let (clock, millis) = stamp.split_once(separator).unwrap_or_else(|| panic!("timestamp {stamp}"));
        let parts: Vec<f64> = clock.split(':').map(|p| p.parse().unwrap()).collect();
        assert_eq!((parts.len(), millis.len()), (3, 3), "{stamp}");
        parts[0] * 3600.0 + parts[1] * 60.0 + parts[2] + millis.parse::<f64>().unwrap() / 1000.0
    };
    body.split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .enumerate()
        .map(|(index, block)| {
            let mut lines = block.lines();
            if !vtt {
                assert_eq!(lines.next(), Some((index + 1).to_string().as_str()), "numbered from 1: {block:?}");
            }
            let (start, end) = lines.next().unwrap().split_once(" --> ").expect("a timing line");
            let text: Vec<&str> = lines.collect();
            assert!((1..=2).contains(&text.len()) && text.iter().all(|l| l.chars().count() <= 42), "{block:?}");
            (seconds(start), seconds(end), text.join(" "))
        })
        .collect()
}

fn words(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[tokio::test]
async fn a_recording_posted_with_a_callback_url_calls_back_once_signed_and_its_subtitles_download() {
    end_to_end(false).await;
}

/// The same on the real Redis queue and PostgreSQL store.
#[tokio::test]
async fn the_same_on_redis_and_postgresql() {
    end_to_end(true).await;
}

async fn end_to_end(redis_and_postgres: bool) {
    let fake = Fake::start().await;
    let receiver = Receiver::start(&[]).await;
    let mut builder = app_with(&fake, Some(receiver.port)).with_worker();
    if redis_and_postgres {
        builder = builder.redis().postgres();
    }
    let app = builder.start().await;
    let job = post_with_callback(&app, "cb-1", 6, &receiver).await;
    let last = app.until_final(&job, Duration::from_secs(120)).await;
    assert_eq!(last.body["job"]["state"], "completed", "{}", last.text);

    let calls = receiver.until_calls(1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.calls().len(), 1, "the callback arrives once");
    verify(&calls[0], SECRET);
    let body: Value = serde_json::from_slice(&calls[0].body).unwrap();
    assert_eq!((body["event"].as_str(), body["jobId"].as_str()), (Some("job.completed"), Some(job.as_str())));
    assert_eq!((body["recordingId"].as_str(), body["pipeline"].as_str()), (Some("cb-1"), Some("transcribe-only")));
    let logs = app.job_logs(&job).await;
    assert!(logs.text.contains("callback delivered"), "{}", logs.text);

    let recording = app.recording_status("cb-1").await;
    let transcript = recording.body["transcript"].as_str().unwrap().to_string();
    let segments = recording.body["result"]["whisper_segments"].as_array().unwrap().clone();
    assert!(!transcript.is_empty() && !segments.is_empty(), "{}", recording.text);

    let srt = app.get("/api/recording/cb-1/subtitles.srt").await;
    assert_eq!(srt.status, 200, "{}", srt.text);
    assert_eq!(srt.header("content-type"), Some("text/plain; charset=utf-8"));
    assert_eq!(srt.header("content-disposition"), Some("inline; filename=\"cb-1.srt\""));
    let cues = parse_subtitles(&srt.text, false);
    assert!(!cues.is_empty());
    assert_eq!(words(&cues.iter().map(|c| c.2.as_str()).collect::<Vec<_>>().join(" ")), words(&transcript));
    assert!(
        (cues[0].0 - segments[0]["start"].as_f64().unwrap()).abs() < 0.001,
        "first cue starts with the first segment"
    );
    assert!(cues.windows(2).all(|pair| pair[0].0 <= pair[1].0), "cues in time order");

    let vtt = app.get("/api/recording/cb-1/subtitles.vtt").await;
    assert_eq!(vtt.status, 200, "{}", vtt.text);
    assert_eq!(vtt.header("content-type"), Some("text/vtt; charset=utf-8"));
    let vtt_cues = parse_subtitles(&vtt.text, true);
    assert_eq!(vtt_cues.len(), cues.len());
    assert_eq!((vtt_cues[0].0, vtt_cues[0].1), (cues[0].0, cues[0].1));

    let text = app.get("/api/recording/cb-1/transcript").await;
    assert_eq!((text.status, text.header("content-type")), (200, Some("text/plain; charset=utf-8")));
    assert_eq!(text.text, transcript);
    let as_json =
        app.send(app.client.get(app.url("/api/recording/cb-1/transcript")).header("accept", "application/json")).await;
    assert_eq!(as_json.status, 200, "{}", as_json.text);
    assert_eq!(as_json.body["success"], true);
    assert_eq!(as_json.body["text"], transcript.as_str());
    let listed = as_json.body["segments"].as_array().unwrap();
    assert_eq!(listed.len(), segments.iter().filter(|s| !s["text"].as_str().unwrap_or("").trim().is_empty()).count());
    assert_eq!(listed[0]["start"], segments[0]["start"]);
    app.stop().await;
}

#[tokio::test]
async fn a_job_cancelled_through_the_api_before_it_ran_calls_back_and_marks_its_recording() {
    let fake = Fake::start().await;
    let receiver = Receiver::start(&[]).await;
    // No worker: the job stays waiting until it is cancelled.
    let app = app_with(&fake, Some(receiver.port)).start().await;
    let job = post_with_callback(&app, "cb-cancel", 2, &receiver).await;
    let cancelled = app.cancel_job(&job).await;
    assert_eq!(cancelled.status, 200, "{}", cancelled.text);
    let calls = receiver.until_calls(1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.calls().len(), 1, "the callback arrives once");
    verify(&calls[0], SECRET);
    let body: Value = serde_json::from_slice(&calls[0].body).unwrap();
    assert_eq!((body["event"].as_str(), body["jobId"].as_str()), (Some("job.cancelled"), Some(job.as_str())));
    assert_eq!(body["recordingId"], "cb-cancel");
    assert_eq!(app.recording_status("cb-cancel").await.body["status"]["state"], "cancelled");
    // Cancelling again changes nothing and sends nothing.
    assert_eq!(app.cancel_job(&job).await.status, 409);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.calls().len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn subtitles_and_transcript_answer_404_409_and_400_for_what_is_not_there() {
    let fake = Fake::start().await;
    let app = app_with(&fake, None).start().await;
    let register = |id: &str| NewRecording { id: id.into(), ..NewRecording::default() };
    app.store.register(&register("queued-1")).await.unwrap();
    app.store.set_status("queued-1", RecordingStatus::Queued, Some("queued"), None).await.unwrap();
    app.store.register(&register("bare-1")).await.unwrap();
    app.store.persist("bare-1", None, &json!({ "summary": "no segments kept" })).await.unwrap();
    app.store.register(&register("text-1")).await.unwrap();
    app.store.persist("text-1", Some("only the text was kept"), &json!({})).await.unwrap();
    for (path, status, code) in [
        ("/api/recording/nope/subtitles.srt", 404, "recording_not_found"),
        ("/api/recording/nope/subtitles.vtt", 404, "recording_not_found"),
        ("/api/recording/nope/transcript", 404, "recording_not_found"),
        ("/api/recording/bad%20id/subtitles.srt", 400, "invalid_id"),
        ("/api/recording/queued-1/subtitles.srt", 409, "not_completed"),
        ("/api/recording/queued-1/subtitles.vtt", 409, "not_completed"),
        ("/api/recording/queued-1/transcript", 409, "not_completed"),
        ("/api/recording/bare-1/subtitles.srt", 404, "no_transcript"),
        ("/api/recording/bare-1/subtitles.vtt", 404, "no_transcript"),
        ("/api/recording/bare-1/transcript", 404, "no_transcript"),
        ("/api/recording/text-1/subtitles.srt", 404, "no_transcript"),
    ] {
        let reply = app.get(path).await;
        assert_eq!((reply.status, reply.code()), (status, code), "{path}: {}", reply.text);
        assert_eq!(reply.body["success"], false, "{path}");
        assert!(reply.body["error"].as_str().is_some_and(|e| !e.is_empty()), "{path}");
    }
    let text = app.get("/api/recording/text-1/transcript").await;
    assert_eq!((text.status, text.text.as_str()), (200, "only the text was kept"), "the text without segments");
    let as_json = app
        .send(app.client.get(app.url("/api/recording/text-1/transcript")).header("accept", "application/json"))
        .await;
    assert_eq!(as_json.body["segments"], json!([]));
    app.stop().await;
}

#[tokio::test]
async fn a_callback_url_is_checked_at_the_api_with_the_download_rules() {
    let fake = Fake::start().await;
    let receiver = Receiver::start(&[]).await;
    let app = app_with(&fake, Some(receiver.port)).start().await;
    let media = support::media::tone(&app.storage(), "check-tone.wav", 1);
    let post = |id: &str, callback: &str| json!({ "recordingId": id, "fileUrl": media.display().to_string(), "callbackUrl": callback });
    for (id, callback, fragment) in [
        ("cb-private", "http://10.0.0.7/hook", "is an internal address (10.0.0.7)"),
        ("cb-loopback", "http://127.0.0.1:9/hook", "not allow-listed on port 9"),
        ("cb-localhost", "http://localhost:9/hook", "not allow-listed"),
        ("cb-gopher", "gopher://example.com/hook", "scheme `gopher` is not allowed"),
        ("cb-garbage", "not a url", "not an absolute URL"),
    ] {
        let reply = app.process_recording(&post(id, callback)).await;
        assert_eq!((reply.status, reply.code()), (400, "callback_refused"), "{callback}: {}", reply.text);
        assert!(reply.body["error"].as_str().unwrap().contains(fragment), "{callback}: {}", reply.text);
        assert_eq!(reply.body["details"]["field"], "callbackUrl");
        assert_eq!(app.recording_status(id).await.status, 404, "nothing was registered for {callback}");
    }
    let empty = app.process_recording(&post("cb-empty", " ")).await;
    assert_eq!((empty.status, empty.code()), (400, "invalid_field"), "{}", empty.text);
    let accepted = app.process_recording(&post("cb-ok", &receiver.url())).await;
    assert_eq!(accepted.status, 202, "{}", accepted.text);
    let job = app.queue.get(accepted.body["jobId"].as_str().unwrap()).await.unwrap().unwrap();
    assert_eq!(job.spec.callback_url.as_deref(), Some(receiver.url().as_str()), "the job carries it");
    let batch = app
        .batch_process(&json!({
            "items": [{ "recordingId": "cb-batch", "fileUrl": media.display().to_string() }],
            "callbackUrl": "http://169.254.169.254/latest",
        }))
        .await;
    assert_eq!(batch.body["items"][0]["code"], "callback_refused", "{}", batch.text);
    app.stop().await;

    let without_secret = TestApp::spawn().await;
    let media = support::media::tone(&without_secret.storage(), "tone.wav", 1);
    let reply = without_secret
        .process_recording(&json!({ "recordingId": "cb-x", "fileUrl": media.display().to_string(), "callbackUrl": "https://93.184.216.34/hook" }))
        .await;
    assert_eq!((reply.status, reply.code()), (400, "callbacks_disabled"), "{}", reply.text);
    assert!(reply.body["error"].as_str().unwrap().contains("ECHO_CALLBACK__SECRET"));
    without_secret.stop().await;
}

#[tokio::test]
async fn process_direct_answers_with_the_results_and_keeps_them_in_the_recording() {
    let fake = Fake::start().await;
    let app = app_with(&fake, None).start().await;
    let media = support::media::tone(&app.storage(), "direct-tone.wav", 4);
    let reply = app
        .post_json(
            "/api/process-direct",
            &json!({ "recording_id": "direct-1", "file_url": media.display().to_string(), "pipeline": "transcribe-only" }),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.body["success"], true);
    assert_eq!(
        (reply.body["recordingId"].as_str(), reply.body["status"].as_str()),
        (Some("direct-1"), Some("completed"))
    );
    let results = &reply.body["results"];
    let transcript = results["transcript"].as_str().unwrap();
    assert!(!transcript.is_empty(), "{}", reply.text);
    assert!(results["whisper_segments"].as_array().is_some_and(|s| !s.is_empty()), "{}", reply.text);
    assert!(results["duration"].as_f64().is_some_and(|d| (d - 4.0).abs() < 0.5), "{}", reply.text);
    let stages = reply.body["stages"].as_object().unwrap();
    let names: Vec<&str> = stages.keys().map(String::as_str).collect();
    assert_eq!(names, ["validate", "download", "transcode", "transcript", "persist"]);
    assert!(stages.values().all(|s| s["status"] == "succeeded"), "{}", reply.text);
    assert_eq!(fake.seen(Kind::Transcription).len(), 1);

    let row = app.recording_status("direct-1").await;
    assert_eq!(row.body["status"]["state"], "completed", "{}", row.text);
    assert_eq!(row.body["transcript"], transcript);
    let srt = app.get("/api/recording/direct-1/subtitles.srt").await;
    assert_eq!(srt.status, 200, "{}", srt.text);
    assert!(!parse_subtitles(&srt.text, false).is_empty());

    // A new recording id is made when none is given.
    let fresh = app
        .post_json(
            "/api/process-direct",
            &json!({ "fileUrl": media.display().to_string(), "pipeline": "transcribe-only" }),
        )
        .await;
    assert_eq!(fresh.status, 200, "{}", fresh.text);
    let id = fresh.body["recordingId"].as_str().unwrap();
    assert!(uuid::Uuid::try_parse(id).is_ok(), "{id}");
    app.stop().await;
}

#[tokio::test]
async fn process_direct_refuses_a_source_over_its_limit_with_413_naming_process_recording() {
    let fake = Fake::start().await;
    let app = app_with(&fake, None)
        .settings(|settings, _| settings.server.direct_max_size = echo_worker::units::ByteSize(50_000))
        .start()
        .await;
    let media = support::media::tone(&app.storage(), "big-tone.wav", 6);
    assert!(std::fs::metadata(&media).unwrap().len() > 50_000);
    let reply = app
        .post_json("/api/process-direct", &json!({ "recordingId": "big-1", "fileUrl": media.display().to_string() }))
        .await;
    assert_eq!((reply.status, reply.code()), (413, "too_large_for_direct"), "{}", reply.text);
    let error = reply.body["error"].as_str().unwrap();
    assert!(error.contains("POST /api/process-recording") && error.contains("server.direct_max_size"), "{error}");
    assert_eq!(reply.body["details"]["stage"], "validate");
    assert!(fake.seen(Kind::Transcription).is_empty(), "nothing was sent to be transcribed");
    assert_eq!(app.recording_status("big-1").await.body["status"]["state"], "failed");
    app.stop().await;
}

#[tokio::test]
async fn process_direct_refusals_have_their_status_and_code() {
    let fake = Fake::start().await;
    let app = app_with(&fake, None).start().await;
    let media = support::media::tone(&app.storage(), "tone.wav", 1);
    let media = media.display().to_string();
    let not_media = app.storage().join("notes.wav");
    std::fs::write(&not_media, "these are words, not sound\n".repeat(50)).unwrap();
    let queued = app.process_recording(&json!({ "recordingId": "busy-1", "fileUrl": media })).await;
    assert_eq!(queued.status, 202, "{}", queued.text);
    let cases: Vec<(Value, u16, &str)> = vec![
        (json!({ "fileUrl": media, "pipeline": "nope" }), 404, "pipeline_not_found"),
        (json!({ "recordingId": "ghost" }), 404, "recording_not_found"),
        (json!({ "recordingId": "bad id" }), 400, "invalid_id"),
        (json!({ "fileUrl": "/etc/hostname" }), 400, "source_refused"),
        (json!({ "fileUrl": "http://10.0.0.1/a.wav" }), 400, "source_refused"),
        (json!({ "fileUrl": media, "extra": 1 }), 400, "unknown_field"),
        (json!({ "fileUrl": 7 }), 400, "invalid_field"),
        // A blank fileUrl would name the storage root itself.
        (json!({ "fileUrl": "" }), 400, "invalid_field"),
        (json!({ "recordingId": "blank-1", "fileUrl": " \t" }), 400, "invalid_field"),
        (json!({ "recordingId": "busy-1", "fileUrl": media }), 409, "job_in_progress"),
        (json!({ "recordingId": "words-1", "fileUrl": not_media.display().to_string() }), 422, "processing_failed"),
    ];
    for (body, status, code) in cases {
        let reply = app.post_json("/api/process-direct", &body).await;
        assert_eq!((reply.status, reply.code()), (status, code), "{body}: {}", reply.text);
        assert_eq!(reply.body["success"], false);
    }
    let failed = app
        .post_json(
            "/api/process-direct",
            &json!({ "recordingId": "words-2", "fileUrl": not_media.display().to_string() }),
        )
        .await;
    assert_eq!(failed.body["details"]["stage"], "validate", "{}", failed.text);
    assert!(failed.body["error"].as_str().unwrap().starts_with("stage `validate`: "), "{}", failed.text);
    let raw = app.post_raw("/api/process-direct", "application/json", "{").await;
    assert_eq!((raw.status, raw.code()), (400, "malformed_json"));
    assert!(fake.seen(Kind::Transcription).is_empty());
    app.stop().await;

    // A run over its time is stopped and answered 422 naming process-recording.
    let slow = app_with(&fake, None)
        .settings(|settings, _| {
            settings.server.direct_timeout = echo_worker::units::HumanDuration(Duration::from_millis(200));
        })
        .start()
        .await;
    *fake.delay.lock().unwrap() = Duration::from_secs(3);
    let media = support::media::tone(&slow.storage(), "slow.wav", 2);
    let reply = slow
        .post_json(
            "/api/process-direct",
            &json!({ "recordingId": "slow-1", "fileUrl": media.display().to_string(), "pipeline": "transcribe-only" }),
        )
        .await;
    assert_eq!((reply.status, reply.code()), (422, "too_long_for_direct"), "{}", reply.text);
    assert!(reply.body["error"].as_str().unwrap().contains("POST /api/process-recording"));
    slow.stop().await;

    // Without an AI provider, a pipeline that transcribes cannot run here.
    let bare = TestApp::spawn().await;
    let media = support::media::tone(&bare.storage(), "tone.wav", 1);
    let reply = bare
        .post_json(
            "/api/process-direct",
            &json!({ "fileUrl": media.display().to_string(), "pipeline": "transcribe-only" }),
        )
        .await;
    assert_eq!((reply.status, reply.code()), (422, "pipeline_unavailable"), "{}", reply.text);
    assert!(reply.body["error"].as_str().unwrap().contains("transcript"), "{}", reply.text);
    bare.stop().await;
}

#[tokio::test]
async fn the_openapi_document_describes_these_routes_and_their_content_types() {
    let app = TestApp::spawn().await;
    let document = app.get("/openapi.json").await.body;
    let paths = &document["paths"];
    let ok = |path: &str, method: &str| paths[path][method]["responses"]["200"]["content"].clone();
    assert!(ok("/api/recording/{id}/subtitles.srt", "get")["text/plain"].is_object(), "{}", paths);
    assert!(ok("/api/recording/{id}/subtitles.vtt", "get")["text/vtt"].is_object());
    let transcript = ok("/api/recording/{id}/transcript", "get");
    assert!(transcript["text/plain"].is_object() && transcript["application/json"].is_object(), "{transcript}");
    assert!(ok("/api/process-direct", "post")["application/json"].is_object());
    for status in ["400", "404", "409", "413", "422", "429"] {
        assert!(paths["/api/process-direct"]["post"]["responses"][status].is_object(), "process-direct {status}");
    }
    for schema in ["DirectRequest", "DirectReply", "Transcript", "ProcessRecording"] {
        assert!(document["components"]["schemas"][schema].is_object(), "{schema} is documented");
    }
    let fields = &document["components"]["schemas"]["ProcessRecording"]["properties"];
    assert!(fields["callbackUrl"].is_object(), "process-recording documents callbackUrl: {fields}");
    app.stop().await;
}
