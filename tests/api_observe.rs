//! The API's windows onto running work, started whole on port 0 (`support::app::TestApp`): server-sent events
//! of a job (resumed with `Last-Event-ID` without losing an event, closing after the final state), the
//! pipelines routes and the validate route (compared with what `echo-worker validate` prints), and the
//! Prometheus exposition (parsed, and its counters moving after a job). Every wait is bounded.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use echo_worker::queue::EventKind;
use serde_json::{Value, json};
use support::app::TestApp;
use support::fake_ai::{Fake, Fault, KEY, Kind};

/// One server-sent event as a client sees it.
#[derive(Debug, Clone, Default, PartialEq)]
struct Sse {
    id: Option<String>,
    event: Option<String>,
    data: String,
    retry: Option<u64>,
    /// A comment line (`: keep-alive`).
    comment: Option<String>,
}

impl Sse {
    fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or(Value::Null)
    }

    fn is_final(&self) -> bool {
        self.event.as_deref() == Some("state")
            && matches!(self.json()["state"].as_str(), Some("completed" | "failed" | "cancelled"))
    }
}

/// A streaming SSE client: reads the body chunk by chunk and splits it into events (and comments).
struct Client {
    response: reqwest::Response,
    buffer: String,
}

impl Client {
    async fn open(app: &TestApp, job: &str, last_event_id: Option<&str>) -> (u16, Self) {
        let mut request = app.client.get(app.url(&format!("/api/job/{job}/events"))).timeout(Duration::from_secs(120));
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request.send().await.expect("the API answers");
        let status = response.status().as_u16();
        (status, Self { response, buffer: String::new() })
    }

    /// The next event or comment, or `None` when the server ended the stream; panics after `limit` without one.
    async fn next(&mut self, limit: Duration) -> Option<Sse> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = Sse::default();
                for line in block.lines().filter(|line| !line.is_empty()) {
                    if let Some(comment) = line.strip_prefix(':') {
                        event.comment = Some(comment.trim().to_string());
                        continue;
                    }
                    let (field, value) = line.split_once(':').map_or((line, ""), |(f, v)| (f, v.trim_start()));
                    match field {
                        "id" => event.id = Some(value.to_string()),
                        "event" => event.event = Some(value.to_string()),
                        "data" => {
                            if !event.data.is_empty() {
                                event.data.push('\n');
                            }
                            event.data.push_str(value);
                        }
                        "retry" => event.retry = value.parse().ok(),
                        other => panic!("unknown SSE field {other:?} in {block:?}"),
                    }
                }
                return Some(event);
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            assert!(!left.is_zero(), "no event within {limit:?}; buffered: {:?}", self.buffer);
            match tokio::time::timeout(left, self.response.chunk()).await {
                Ok(Ok(Some(bytes))) => self.buffer.push_str(std::str::from_utf8(&bytes).unwrap()),
                Ok(Ok(None)) => return None,
                Ok(Err(error)) => panic!("the stream broke: {error}"),
                Err(_) => panic!("no event within {limit:?}; buffered: {:?}", self.buffer),
            }
        }
    }

    /// Every event with data until the server ends the stream.
    async fn rest(&mut self, limit: Duration) -> Vec<Sse> {
        let mut events = Vec::new();
        // Bounded: `next` panics past `limit`, and a job has a bounded number of events.
        for _ in 0..10_000 {
            match self.next(limit).await {
                Some(event) if event.data.is_empty() => {}
                Some(event) => events.push(event),
                None => return events,
            }
        }
        panic!("the stream did not end");
    }
}

/// An app with a worker in the same process, against the fake AI server.
async fn app_with_worker(fake: &Fake, redis: bool) -> TestApp {
    let endpoint = format!("{}/v1", fake.base);
    let mut builder = TestApp::builder().with_worker().settings(move |settings, _| {
        let provider = echo_worker::ai::ProviderSettings::new(
            echo_worker::ai::ProviderStyle::Openai,
            endpoint,
            Some(echo_worker::config::Secret::new(KEY)),
        );
        settings.ai.providers.insert("fake".into(), provider);
        settings.ai.default_provider = Some("fake".into());
    });
    if redis {
        builder = builder.redis();
    }
    builder.start().await
}

async fn post_recording(app: &TestApp, recording: &str) -> String {
    let media = support::media::tone(&app.storage(), &format!("{recording}.wav"), 4);
    let reply =
        app.process_recording(&json!({ "recordingId": recording, "fileUrl": media.display().to_string() })).await;
    assert_eq!(reply.status, 202, "{}", reply.text);
    reply.body["jobId"].as_str().unwrap().to_string()
}

/// The queue's own events of one job, ids and payloads, read straight from the stream.
async fn queue_events(app: &TestApp, job: &str) -> Vec<(String, EventKind)> {
    let mut found = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..1_000 {
        let events = app.queue.events(after.as_deref(), 500, Duration::ZERO).await.unwrap();
        if events.is_empty() {
            return found;
        }
        for event in events {
            after = Some(event.id.clone());
            if event.job_id == job {
                found.push((event.id, event.kind));
            }
        }
    }
    panic!("the event stream did not end");
}

/// A client that drops its connection mid-job and comes back with `Last-Event-ID` gets every event after the
/// one it saw last, nothing twice; together the two connections carry exactly the queue's events of the job, and
/// the stream ends after `completed`. Resuming after the final event is a 204 (EventSource stops reconnecting).
#[tokio::test]
async fn an_sse_client_that_reconnects_with_last_event_id_misses_no_event_and_the_stream_ends_after_completed() {
    let fake = Fake::start().await;
    let app = app_with_worker(&fake, true).await;
    // The first transcription request is answered 429 with Retry-After: 2, which holds the job mid-way.
    fake.fault(Kind::Transcription, Fault::TooMany(2));
    let job = post_recording(&app, "sse-resume").await;

    let (status, mut first) = Client::open(&app, &job, None).await;
    assert_eq!(status, 200);
    assert!(
        first.response.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"),
        "{:?}",
        first.response.headers()
    );
    let hint = first.next(Duration::from_secs(10)).await.unwrap();
    assert_eq!(hint.retry, Some(2000), "the first event tells the client when to reconnect: {hint:?}");
    let mut before = Vec::new();
    for _ in 0..200 {
        let event = first.next(Duration::from_secs(60)).await.expect("the stream goes on mid-job");
        assert!(event.id.is_some(), "every event carries its stream id: {event:?}");
        assert_eq!(event.json()["jobId"], job.as_str());
        let transcript_running = event.event.as_deref() == Some("stage")
            && event.json()["stage"] == "transcript"
            && event.json()["status"] == "running";
        before.push(event);
        if transcript_running {
            break;
        }
    }
    drop(first);
    let state = app.queue.get(&job).await.unwrap().unwrap().state;
    assert!(!state.is_final(), "the client left mid-job, while the job was {state}");
    let last_seen = before.last().unwrap().id.clone().unwrap();

    let (status, mut second) = Client::open(&app, &job, Some(&last_seen)).await;
    assert_eq!(status, 200);
    let after = second.rest(Duration::from_secs(120)).await;
    assert!(after.last().is_some_and(Sse::is_final), "the stream ends with the final state: {after:?}");
    assert_eq!(after.last().unwrap().json()["state"], "completed", "{after:?}");
    assert!(after.iter().filter(|e| e.is_final()).count() == 1);

    let seen: Vec<String> = before.iter().chain(&after).map(|e| e.id.clone().unwrap()).collect();
    let stream = queue_events(&app, &job).await;
    let ids: Vec<String> = stream.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(seen, ids, "the two connections together carry exactly the job's events, in order, none twice");
    assert!(after.iter().any(|e| e.event.as_deref() == Some("progress")), "{after:?}");
    // Payloads match the queue's events too.
    for (event, (_, kind)) in before.iter().chain(&after).zip(&stream) {
        match kind {
            EventKind::State { state, .. } => assert_eq!(event.json()["state"], state.name()),
            EventKind::Stage { stage, status } => {
                assert_eq!(
                    (event.json()["stage"].as_str(), event.json()["status"].as_str()),
                    (Some(stage.as_str()), Some(status.as_str()))
                );
            }
            EventKind::Progress(progress) => assert_eq!(event.json()["progress"]["percent"], progress.percent),
        }
    }

    // A client connecting after the end gets the whole history and the stream ends.
    let (_, mut late) = Client::open(&app, &job, None).await;
    let all: Vec<String> = late.rest(Duration::from_secs(30)).await.into_iter().map(|e| e.id.unwrap()).collect();
    assert_eq!(all, ids);
    // Resuming after the final event: nothing more will come.
    let (status, _) = Client::open(&app, &job, Some(ids.last().unwrap())).await;
    assert_eq!(status, 204);
    // `?lastEventId=` works where headers cannot be set.
    let middle = &ids[ids.len() / 2];
    let reply = app.send(app.client.get(app.url(&format!("/api/job/{job}/events?lastEventId={middle}")))).await;
    assert_eq!(reply.status, 200);
    let resumed = reply.text.lines().filter(|line| line.starts_with("id: ")).count();
    assert_eq!(resumed, ids.len() - ids.len() / 2 - 1, "{}", reply.text);
    app.stop().await;
}

#[tokio::test]
async fn the_events_route_refuses_unknown_jobs_and_malformed_ids() {
    let app = TestApp::spawn().await;
    let reply = app.get("/api/job/2b1c3d4e-0000-4000-8000-000000000000/events").await;
    assert_eq!((reply.status, reply.code()), (404, "job_not_found"), "{}", reply.text);
    let reply = app.get("/api/job/not-a-uuid/events").await;
    assert_eq!((reply.status, reply.code()), (400, "invalid_id"), "{}", reply.text);

    let file = app.storage().join("events-bad.mp3");
    std::fs::write(&file, b"ID3").unwrap();
    let reply =
        app.process_recording(&json!({ "recordingId": "events-bad", "fileUrl": file.display().to_string() })).await;
    let job = reply.body["jobId"].as_str().unwrap().to_string();
    let bad =
        app.send(app.client.get(app.url(&format!("/api/job/{job}/events"))).header("Last-Event-ID", "yesterday")).await;
    assert_eq!((bad.status, bad.code()), (400, "invalid_event_id"), "{}", bad.text);
    assert!(bad.body["error"].as_str().unwrap().contains("Last-Event-ID"), "{}", bad.text);
    let bad = app.get(&format!("/api/job/{job}/events?lastEventId=1-2-3")).await;
    assert_eq!((bad.status, bad.code()), (400, "invalid_event_id"), "{}", bad.text);
    assert_eq!(bad.body["details"]["field"], "lastEventId");
    app.stop().await;
}

/// An idle stream (a job nobody runs) gets a comment line before proxies would give up on it, and carries the
/// job's `waiting` event first.
#[tokio::test]
async fn an_idle_event_stream_carries_keep_alive_comments() {
    let app = TestApp::spawn().await;
    let file = app.storage().join("idle.mp3");
    std::fs::write(&file, b"ID3").unwrap();
    let reply = app.process_recording(&json!({ "recordingId": "idle", "fileUrl": file.display().to_string() })).await;
    let job = reply.body["jobId"].as_str().unwrap().to_string();
    let (status, mut client) = Client::open(&app, &job, None).await;
    assert_eq!(status, 200);
    let mut events = Vec::new();
    // Bounded: each read waits at most 20 s, and the keep-alive comes within 15 s of the last event.
    let comment = loop {
        let event = client.next(Duration::from_secs(20)).await.expect("the stream stays open");
        if let Some(comment) = event.comment {
            break comment;
        }
        events.push(event);
        assert!(events.len() < 10, "{events:?}");
    };
    assert_eq!(comment, "keep-alive", "{events:?}");
    let states: Vec<Value> =
        events.iter().filter(|e| e.event.as_deref() == Some("state")).map(|e| e.json()["state"].clone()).collect();
    assert_eq!(states, [json!("waiting")]);
    app.stop().await;
}

#[tokio::test]
async fn pipelines_are_listed_and_shown_with_stage_kinds_parameters_and_mermaid() {
    let app = TestApp::spawn().await;
    let reply = app.get("/api/pipelines").await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.body["success"], true);
    let default = reply.body["pipelines"].as_array().unwrap().iter().find(|p| p["name"] == "default").unwrap();
    assert_eq!(default["file"], "default.toml");
    assert_eq!(default["stages"], json!(["validate", "download", "transcode", "transcript", "analysis", "persist"]));
    assert!(
        reply.body["plugins"].as_array().unwrap().iter().any(|p| p["name"] == "summary" && p["kind"] == "prompt"),
        "{}",
        reply.text
    );

    let reply = app.get("/api/pipelines/default").await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let pipeline = &reply.body["pipeline"];
    let transcode = pipeline["stages"].as_array().unwrap().iter().find(|s| s["id"] == "transcode").unwrap();
    assert_eq!(transcode["uses"], "transcode");
    assert_eq!(transcode["kind"], "builtin");
    assert_eq!(transcode["needs"], json!(["download"]));
    assert_eq!(transcode["with"]["sample_rate"], 16000);
    assert_eq!(transcode["retry"]["maxAttempts"], 3);
    assert_eq!(transcode["timeout"], "30m");
    let mermaid = pipeline["mermaid"].as_str().unwrap();
    assert!(mermaid.starts_with("flowchart LR\n"), "{mermaid}");
    assert!(mermaid.contains("s_transcode --> s_transcript"), "{mermaid}");
    assert!(!reply.text.contains(env!("CARGO_MANIFEST_DIR")), "no server path is shown: {}", reply.text);

    let reply = app.get("/api/pipelines/meeting-notes").await;
    assert_eq!((reply.status, reply.code()), (404, "pipeline_not_found"), "{}", reply.text);
    assert!(reply.body["details"]["available"].as_array().unwrap().contains(&json!("default")));
    assert!(reply.body["error"].as_str().unwrap().contains("default"), "{}", reply.text);
    app.stop().await;
}

/// What `echo-worker validate` prints for a folder holding one pipeline file (and the shipped plugins).
fn cli_validate(dir: &Path, file: &str, text: &str) -> Vec<String> {
    let folder = dir.join("pipelines");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join(file), text).unwrap();
    let plugins = Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_echo-worker"))
        .current_dir(dir)
        .args(["validate", "--pipelines", "pipelines", "--plugins"])
        .arg(&plugins)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    stderr.lines().filter(|line| line.starts_with("pipelines/")).map(str::to_string).collect()
}

#[tokio::test]
async fn validate_answers_every_problem_at_line_and_column_as_the_cli_prints_it() {
    let app = TestApp::spawn().await;
    let good = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/default.toml")).unwrap();
    let reply = app.post_raw("/api/pipelines/validate", "application/toml", good).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(
        (reply.body["valid"].clone(), reply.body["kind"].clone(), reply.body["name"].clone()),
        (json!(true), json!("pipeline"), json!("default"))
    );
    assert!(reply.body["mermaid"].as_str().unwrap().contains("s_validate --> s_download"));

    let bad = "name = \"broken\"\n\n[stages.a]\nuses = \"whisperr\"\nneeds = [\"b\"]\ncolour = 1\n\n[stages.b]\nuses = \"validate\"\nneeds = [\"a\"]\n";
    let reply = app.post_raw("/api/pipelines/validate", "text/plain", bad).await;
    assert_eq!((reply.status, reply.code()), (422, "invalid_definition"), "{}", reply.text);
    assert_eq!(reply.body["success"], false);
    let errors = reply.body["details"]["errors"].as_array().unwrap();
    let texts: Vec<String> = errors.iter().map(|e| e["text"].as_str().unwrap().to_string()).collect();
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(texts, cli_validate(dir.path(), "broken.toml", bad), "the API and the CLI list the same problems");
    assert!(texts.len() >= 3, "{texts:?}");
    assert!(texts.iter().any(|t| t.contains("did you mean `whisper`")), "{texts:?}");
    assert!(texts.iter().any(|t| t.contains("a -> b -> a") || t.contains("b -> a -> b")), "{texts:?}");
    assert!(errors.iter().all(|e| e["line"].as_u64().unwrap() > 0 && e["column"].as_u64().unwrap() > 0));
    assert!(
        reply.body["error"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{} problems in pipelines/broken.toml", texts.len()))
    );

    // A name that differs from the one the file will be saved under.
    let reply = app.post_raw("/api/pipelines/validate?name=other", "application/toml", good_named("default")).await;
    assert_eq!(reply.status, 422, "{}", reply.text);
    assert_eq!(reply.body["details"]["errors"][0]["code"], "name_mismatch", "{}", reply.text);

    // A plugin is recognised by its `kind`.
    let plugin = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins/summary.toml")).unwrap();
    let reply = app.post_raw("/api/pipelines/validate", "application/toml", plugin.clone()).await;
    assert_eq!((reply.status, reply.body["kind"].clone()), (200, json!("plugin")), "{}", reply.text);
    let broken = plugin.replace("kind = \"prompt\"", "kind = \"telepathy\"");
    let reply = app.post_raw("/api/pipelines/validate", "application/toml", broken).await;
    assert_eq!(reply.status, 422, "{}", reply.text);
    assert!(
        reply.body["details"]["errors"][0]["text"].as_str().unwrap().starts_with("plugins/summary.toml:"),
        "{}",
        reply.text
    );

    // What is not a TOML text is refused before it is read.
    let reply = app.post_raw("/api/pipelines/validate", "application/json", "{}").await;
    assert_eq!((reply.status, reply.code()), (415, "unsupported_media_type"));
    let reply = app.post_raw("/api/pipelines/validate", "text/plain", vec![0xff_u8, 0xfe, 0x00]).await;
    assert_eq!((reply.status, reply.code()), (400, "invalid_encoding"), "{}", reply.text);
    let reply = app.post_raw("/api/pipelines/validate?name=../etc/passwd", "text/plain", "name = \"x\"").await;
    assert_eq!((reply.status, reply.code()), (400, "invalid_query"), "{}", reply.text);
    let reply = app.post_raw("/api/pipelines/validate?kind=script", "text/plain", "name = \"x\"").await;
    assert_eq!((reply.status, reply.code()), (400, "invalid_query"), "{}", reply.text);
    let reply = app.post_raw("/api/pipelines/validate", "text/plain", "name = [unclosed").await;
    assert_eq!(reply.status, 422, "{}", reply.text);
    assert_eq!(reply.body["details"]["errors"][0]["line"], 1, "{}", reply.text);
    app.stop().await;
}

fn good_named(name: &str) -> String {
    format!("name = \"{name}\"\n\n[stages.check]\nuses = \"validate\"\n")
}

/// A Prometheus text exposition, checked line by line: families declared once with a type before their
/// samples, sample names that belong to their family, label sets well formed, numbers that parse, histogram
/// buckets that only grow and end with `+Inf` equal to `_count`, and `# EOF` last.
fn parse_exposition(text: &str) -> BTreeMap<String, f64> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = BTreeMap::new();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "the exposition ends with # EOF");
    for line in &lines[..lines.len() - 1] {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (keyword, name) = (parts.next().unwrap(), parts.next().unwrap());
            assert!(name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'), "bad name in {line}");
            match keyword {
                "TYPE" => {
                    let kind = parts.next().unwrap();
                    assert!(["counter", "gauge", "histogram", "info", "unknown"].contains(&kind), "{line}");
                    assert!(types.insert(name.to_string(), kind.to_string()).is_none(), "{name} declared twice");
                }
                "HELP" | "UNIT" => {}
                other => panic!("unknown comment {other} in {line}"),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value in {line}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line}"));
        let name = series.split('{').next().unwrap();
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            let inner = labels.strip_prefix('{').and_then(|l| l.strip_suffix('}')).unwrap_or_else(|| panic!("{line}"));
            for pair in inner.split("\",").map(|p| p.trim_end_matches('"')) {
                let (key, quoted) = pair.split_once("=\"").unwrap_or_else(|| panic!("bad label {pair} in {line}"));
                assert!(key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'), "{line}");
                assert!(!quoted.contains('\n'));
            }
        }
        let family = types
            .iter()
            .filter(|(family, kind)| {
                let suffixes: &[&str] = match kind.as_str() {
                    "counter" => &["_total", "_created"],
                    "histogram" => &["_bucket", "_count", "_sum", "_created"],
                    _ => &[""],
                };
                suffixes.iter().any(|suffix| name == format!("{family}{suffix}"))
            })
            .count();
        assert_eq!(family, 1, "sample {name} belongs to no declared family (or several)");
        assert!(samples.insert(series.to_string(), value).is_none(), "{series} twice");
    }
    // Histograms: cumulative buckets ending in +Inf == _count.
    let mut buckets: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for (series, value) in &samples {
        if let Some((head, rest)) = series.split_once("_bucket{") {
            let le = rest.split("le=\"").nth(1).unwrap().split('"').next().unwrap();
            let others: String = rest.split(',').filter(|p| !p.starts_with("le=")).collect::<Vec<_>>().join(",");
            let bound = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap() };
            buckets.entry(format!("{head}|{others}")).or_default().push((bound, *value));
        }
    }
    for (key, mut list) in buckets {
        list.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert!(list.windows(2).all(|w| w[0].1 <= w[1].1), "{key}: buckets must not shrink: {list:?}");
        assert_eq!(list.last().unwrap().0, f64::INFINITY, "{key} has a +Inf bucket");
    }
    samples
}

fn sum(samples: &BTreeMap<String, f64>, prefix: &str, containing: &str) -> f64 {
    samples.iter().filter(|(s, _)| s.starts_with(prefix) && s.contains(containing)).map(|(_, v)| v).sum()
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_and_move_after_a_job() {
    let fake = Fake::start().await;
    let app = app_with_worker(&fake, false).await;
    let reply = app.get("/metrics").await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert!(reply.header("content-type").unwrap().starts_with("application/openmetrics-text"));
    let before = parse_exposition(&reply.text);
    assert_eq!(before.get("echo_queue_up"), Some(&1.0));
    assert_eq!(before.get("echo_jobs{state=\"completed\"}"), Some(&0.0));

    fake.fault(Kind::Transcription, Fault::TooMany(1));
    let job = post_recording(&app, "metrics-1").await;
    let last = app.until_final(&job, Duration::from_secs(120)).await;
    assert_eq!(last.body["job"]["state"], "completed", "{}", last.text);

    let after = parse_exposition(&app.get("/metrics").await.text);
    assert_eq!(after.get("echo_jobs{state=\"completed\"}"), Some(&1.0), "jobs by state come from the queue");
    assert_eq!(after.get("echo_queue_depth"), Some(&0.0));
    // The registry is per process and other tests in this binary run jobs too: counters only grow.
    let grew = |prefix: &str, containing: &str| sum(&after, prefix, containing) > sum(&before, prefix, containing);
    assert!(grew("echo_stage_duration_seconds_count", "pipeline=\"default\",stage=\"transcript\""), "{after:?}");
    assert!(grew("echo_ai_requests_total", "kind=\"transcription\",status=\"200\""));
    assert!(grew("echo_ai_requests_total", "kind=\"chat\",status=\"200\""));
    assert!(grew("echo_ai_rate_limited_total", "provider=\"fake\""));
    assert!(grew("echo_ai_retries_total", "provider=\"fake\",kind=\"transcription\""));
    assert!(grew("echo_ai_audio_seconds_total", "provider=\"fake\""));
    assert!(grew("echo_ai_tokens_total", "kind=\"prompt\"") && grew("echo_ai_tokens_total", "kind=\"completion\""));
    assert!(after.keys().all(|series| !series.contains(&job)), "no job id in a label");
    app.stop().await;
}

/// Issue 10's end-to-end flow in one run: a generated recording posted to `process-recording` with a
/// `callbackUrl`; its events followed over SSE until it completes, progress rising; the recording's status
/// `completed` at 100 with transcript and analysis; the SRT downloads and parses; the callback arrives once with a
/// valid signature. Then five recordings through `batch-process`, one of them bad: that one alone is rejected,
/// and the other four complete.
#[tokio::test]
async fn a_recording_is_followed_over_sse_to_completed_and_a_batch_rejects_only_its_bad_item() {
    use support::hook::{Receiver, verify};
    const SECRET: &str = "whsec_observe_flow_7d1e";
    let fake = Fake::start().await;
    let receiver = Receiver::start(&[]).await;
    let (endpoint, port) = (format!("{}/v1", fake.base), receiver.port);
    let app = TestApp::builder()
        .with_worker()
        .redis()
        .settings(move |settings, _| {
            let provider = echo_worker::ai::ProviderSettings::new(
                echo_worker::ai::ProviderStyle::Openai,
                endpoint,
                Some(echo_worker::config::Secret::new(KEY)),
            );
            settings.ai.providers.insert("fake".into(), provider);
            settings.ai.default_provider = Some("fake".into());
            settings.callback.secret = Some(echo_worker::config::Secret::new(SECRET));
            settings.download.allow_private = vec![format!("127.0.0.1:{port}")];
        })
        .start()
        .await;
    let media = support::media::tone(&app.storage(), "flow.wav", 6);
    let reply = app
        .process_recording(&json!({ "recordingId": "flow-1", "fileUrl": media, "callbackUrl": receiver.url() }))
        .await;
    assert_eq!(reply.status, 202, "{}", reply.text);
    let job = reply.body["jobId"].as_str().unwrap().to_string();

    let (status, mut client) = Client::open(&app, &job, None).await;
    assert_eq!(status, 200);
    let events = client.rest(Duration::from_secs(120)).await;
    let final_event = events.last().expect("events");
    assert!(final_event.is_final() && final_event.json()["state"] == "completed", "{events:?}");
    let progress: Vec<u64> = events
        .iter()
        .filter(|e| e.event.as_deref() == Some("progress"))
        .filter_map(|e| e.json()["progress"]["percent"].as_u64())
        .collect();
    assert!(progress.len() >= 2, "progress events: {events:?}");
    assert!(progress.windows(2).all(|pair| pair[0] <= pair[1]), "progress only rises: {progress:?}");

    let recording = app.recording_status("flow-1").await;
    assert_eq!(recording.status, 200, "{}", recording.text);
    assert_eq!(recording.body["status"]["state"], "completed", "{}", recording.text);
    assert_eq!(recording.body["status"]["progress"], 100, "{}", recording.text);
    assert!(!recording.body["transcript"].as_str().unwrap_or_default().is_empty(), "{}", recording.text);
    let insights = &recording.body["result"]["ai_insights"];
    assert!(!insights["summary"].as_str().unwrap_or_default().is_empty(), "the analysis is kept: {}", recording.text);
    assert!(insights["key_points"].as_array().is_some_and(|points| !points.is_empty()), "{}", recording.text);

    let srt = app.get("/api/recording/flow-1/subtitles.srt").await;
    assert_eq!(srt.status, 200, "{}", srt.text);
    let first_cue: Vec<&str> = srt.text.split("\n\n").next().unwrap().lines().collect();
    assert_eq!(first_cue[0], "1", "{}", srt.text);
    let (start, end) = first_cue[1].split_once(" --> ").expect("an SRT timing line");
    assert!(start.len() == 12 && end.len() == 12 && start.as_bytes()[8] == b',', "{}", first_cue[1]);
    assert!(start < end, "{}", first_cue[1]);

    let calls = receiver.until_calls(1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.calls().len(), 1, "the callback arrives once");
    verify(&calls[0], SECRET);

    // Five recordings in one batch, one with a source the download rules refuse.
    let mut items = Vec::new();
    for index in 0..4 {
        let file = support::media::tone(&app.storage(), &format!("batch-{index}.wav"), 3);
        items.push(json!({ "recordingId": format!("batch-{index}"), "fileUrl": file }));
    }
    items.insert(2, json!({ "recordingId": "batch-bad", "fileUrl": "gopher://example.com/a.mp3" }));
    let batch = app.batch_process(&json!({ "items": items })).await;
    assert!(batch.status < 300, "{}", batch.text);
    let results = batch.body["items"].as_array().or_else(|| batch.body["results"].as_array()).expect("per item");
    assert_eq!(results.len(), 5, "{}", batch.text);
    let rejected: Vec<&Value> = results.iter().filter(|item| item["accepted"] == false).collect();
    assert_eq!(rejected.len(), 1, "{}", batch.text);
    assert_eq!(rejected[0]["recordingId"], "batch-bad", "{}", batch.text);
    assert!(rejected[0].to_string().contains("gopher"), "the reason names the scheme: {}", batch.text);
    for item in results.iter().filter(|item| item["accepted"] == true) {
        let job = item["jobId"].as_str().expect("an accepted item has its job");
        let last = app.until_final(job, Duration::from_secs(120)).await;
        assert_eq!(last.body["job"]["state"], "completed", "{}", last.text);
    }
    app.stop().await;
}
