//! The AI stages end to end against the fake Azure/OpenAI server (tests/support/fake_ai.rs): a 65-minute
//! meeting through the shipped `meeting` pipeline, provider faults and retries, client-side pacing, no paid
//! work repeated on a retry, permanent provider errors, map-reduce of long transcripts, and keys kept out of
//! the logs.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use echo_worker::ai::{ProviderSettings, ProviderStyle};
use echo_worker::app;
use echo_worker::catalog::Catalog;
use echo_worker::config::{Secret, Settings};
use echo_worker::document::Document;
use echo_worker::engine::{Engine, JobReport, JobStatus};
use echo_worker::error::ErrorCode;
use echo_worker::job::JobSpec;
use echo_worker::job::checkpoint::{Checkpoints, MemoryCheckpoints};
use echo_worker::job::progress::NullSink;
use echo_worker::pipeline::Pipeline;
use echo_worker::pipeline::compile::compile;
use echo_worker::plugin::PluginSet;
use echo_worker::store::{NewRecording, RecordingStatus, Store};
use serde_json::Value;
use support::fake_ai::{Fake, Fault, KEY, Kind};
use tokio_util::sync::CancellationToken;

/// Speech-like audio: pink noise, 5 s on, 2 s off, as 16 kHz MP3.
fn speech(dir: &Path, minutes: u32) -> PathBuf {
    let path = dir.join(format!("speech-{minutes}.mp3"));
    let source = format!("anoisesrc=d={}:c=pink:r=16000:a=0.3", minutes * 60);
    support::media::ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        &source,
        "-af",
        "volume='lt(mod(t,7),5)':eval=frame",
        "-c:a",
        "libmp3lame",
        "-b:a",
        "32k",
        path.to_str().unwrap(),
    ]);
    path
}

struct World {
    fake: Arc<Fake>,
    engine: Engine,
    catalog: Catalog,
    store: Arc<dyn Store>,
    _temp: tempfile::TempDir,
}

async fn world(style: ProviderStyle, tweak: impl FnOnce(&mut ProviderSettings)) -> World {
    world_with_plugins(style, Path::new("plugins"), tweak).await
}

async fn world_with_plugins(style: ProviderStyle, plugins: &Path, tweak: impl FnOnce(&mut ProviderSettings)) -> World {
    let fake = Fake::start().await;
    let temp = tempfile::tempdir().unwrap();
    let mut settings = Settings::default();
    settings.paths.temp_dir = temp.path().to_path_buf();
    settings.database.url = echo_worker::config::SecretUrl::new("sqlite::memory:");
    let endpoint = match style {
        ProviderStyle::Openai => format!("{}/v1", fake.base),
        ProviderStyle::Azure => fake.base.clone(),
    };
    let mut provider = ProviderSettings::new(style, endpoint, Some(Secret::new(KEY)));
    provider.transcription_model = if style == ProviderStyle::Azure { "whisper".into() } else { "whisper-1".into() };
    tweak(&mut provider);
    settings.ai.providers.insert("fake".into(), provider);
    let catalog = Catalog::load(Path::new("pipelines"), plugins).unwrap();
    let store: Arc<dyn Store> = app::store(&settings).await.unwrap();
    let registry = app::registry(&settings, catalog.plugins.values(), store.clone()).await.unwrap();
    let engine =
        Engine::new(registry, Arc::new(MemoryCheckpoints::default()) as Arc<dyn Checkpoints>, settings.engine());
    World { fake, engine, catalog, store, _temp: temp }
}

impl World {
    fn inline(&self, body: &str) -> Pipeline {
        let plugins = PluginSet::load_dir(Path::new("plugins")).unwrap();
        compile(&Document::new("test.toml", format!("name = \"test\"\n{body}")), &plugins, &[]).unwrap()
    }

    async fn run(&self, pipeline: &Pipeline, file: &Path, job_id: &str) -> JobReport {
        self.store.register(&NewRecording { id: job_id.into(), ..NewRecording::default() }).await.unwrap();
        self.store.set_status(job_id, RecordingStatus::Processing, None, None).await.unwrap();
        let job = JobSpec {
            id: job_id.into(),
            recording_id: Some(job_id.into()),
            pipeline: pipeline.name.clone(),
            params: serde_json::Map::new(),
            source: Some(file.display().to_string()),
            trusted_source: true,
        };
        tokio::time::timeout(
            Duration::from_secs(300),
            self.engine.run(pipeline, job, Arc::new(NullSink), CancellationToken::new()),
        )
        .await
        .expect("the job ends within 5 minutes")
        .expect("the job starts")
    }
}

fn output<'a>(report: &'a JobReport, stage: &str) -> &'a Value {
    report.stages[stage].output.as_ref().unwrap_or_else(|| panic!("{stage} has an output: {report:#?}"))
}

fn plugin_schema(name: &str) -> echo_worker::ai::jsonschema::OutputSchema {
    let plugins = PluginSet::load_dir(Path::new("plugins")).unwrap();
    plugins.plugins[name].output.clone().unwrap()
}

/// SRT: numbered cues, `HH:MM:SS,mmm --> HH:MM:SS,mmm`, text, blank line.
fn assert_srt(srt: &str, cues: usize) {
    let blocks: Vec<&str> = srt.trim_end().split("\n\n").collect();
    assert_eq!(blocks.len(), cues);
    for (index, block) in blocks.iter().enumerate() {
        let lines: Vec<&str> = block.lines().collect();
        assert_eq!(lines[0], (index + 1).to_string());
        let (from, to) = lines[1].split_once(" --> ").expect("a time line");
        for stamp in [from, to] {
            let bytes = stamp.as_bytes();
            assert!(stamp.len() == 12 && bytes[2] == b':' && bytes[5] == b':' && bytes[8] == b',', "{stamp}");
        }
        assert!(lines.len() >= 3 && !lines[2].is_empty());
    }
}

/// WebVTT: the header, then `HH:MM:SS.mmm --> HH:MM:SS.mmm` cues.
fn assert_vtt(vtt: &str, cues: usize) {
    let body = vtt.strip_prefix("WEBVTT\n\n").expect("the WEBVTT header");
    let blocks: Vec<&str> = body.trim_end().split("\n\n").collect();
    assert_eq!(blocks.len(), cues);
    for block in blocks {
        let time = block.lines().next().unwrap();
        let (from, to) = time.split_once(" --> ").unwrap();
        assert!(from.len() == 12 && from.as_bytes()[8] == b'.' && to.as_bytes()[8] == b'.', "{time}");
    }
}

#[tokio::test]
async fn a_65_minute_meeting_runs_end_to_end() {
    let world = world(ProviderStyle::Openai, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let file = speech(dir.path(), 65);
    let meeting = world.catalog.pipelines["meeting"].clone();
    let report = world.run(&meeting, &file, "meeting-65").await;
    assert_eq!(report.status, JobStatus::Succeeded, "{report:#?}");

    let transcriptions = world.fake.seen(Kind::Transcription);
    let chunks = output(&report, "transcode")["chunks"].as_array().unwrap().len();
    assert!(chunks >= 4, "65 minutes in chunks of at most 20 give at least 4, got {chunks}");
    assert_eq!(transcriptions.len(), chunks);
    assert!(world.fake.max_in_flight.load(std::sync::atomic::Ordering::SeqCst) >= 2, "chunk requests overlapped");
    assert!(transcriptions.iter().all(|t| t.file_name.as_deref().is_some_and(|n| n.ends_with(".mp3"))));

    let transcript = output(&report, "transcript");
    let segments = transcript["segments"].as_array().unwrap();
    let times: Vec<(f64, f64)> =
        segments.iter().map(|s| (s["start"].as_f64().unwrap(), s["end"].as_f64().unwrap())).collect();
    assert!(times[0].0.abs() < 1.0, "starts at 0: {:?}", times[0]);
    assert!((times.last().unwrap().1 - 3900.0).abs() < 1.0, "ends at 65 minutes: {:?}", times.last());
    for pair in times.windows(2) {
        assert!(pair[0].0 <= pair[0].1 && pair[0].1 <= pair[1].0 + 1e-6, "monotonic: {pair:?}");
        assert!(pair[1].0 - pair[0].1 < 1.0, "no hole over a second: {pair:?}");
    }
    assert!(transcript["text"].as_str().unwrap().contains("chunk_003.mp3 part 0."), "the text is stitched in order");
    assert_srt(transcript["srt"].as_str().unwrap(), segments.len());
    assert_vtt(transcript["vtt"].as_str().unwrap(), segments.len());

    let summary = output(&report, "summary");
    plugin_schema("summary").check(&strip_usage(summary)).unwrap();
    let items = output(&report, "action_items");
    plugin_schema("action-items").check(&strip_usage(items)).unwrap();

    let usage = &transcript["usage"];
    assert_eq!(usage["requests"], transcriptions.len() as u64);
    let seconds: f64 = transcriptions.iter().map(|t| t.audio_seconds).sum();
    assert!((usage["audio_seconds"].as_f64().unwrap() - seconds).abs() < 1e-6, "audio seconds add up");
    let chats = world.fake.seen(Kind::Chat);
    let prompt: u64 = chats.iter().map(|c| c.prompt_tokens).sum();
    let completion: u64 = chats.iter().map(|c| c.completion_tokens).sum();
    let reported_prompt =
        summary["usage"]["prompt_tokens"].as_u64().unwrap() + items["usage"]["prompt_tokens"].as_u64().unwrap();
    let reported_completion =
        summary["usage"]["completion_tokens"].as_u64().unwrap() + items["usage"]["completion_tokens"].as_u64().unwrap();
    assert_eq!(
        (reported_prompt, reported_completion),
        (prompt, completion),
        "token totals equal the sum of the requests"
    );

    let row = world.store.get("meeting-65").await.unwrap().unwrap();
    assert_eq!(row.status, RecordingStatus::Completed);
    assert!(row.transcript.unwrap().starts_with("chunk_000.mp3 part 0."));
    assert_eq!(row.result.unwrap()["summary"], "example summary");
}

fn strip_usage(value: &Value) -> Value {
    let mut value = value.clone();
    value.as_object_mut().unwrap().remove("usage");
    value
}

const TRANSCRIBE: &str = r#"
[stages.transcode]
uses = "transcode"
with = { input = "{{ job.source }}", max_chunk_duration = "2m" }
[stages.transcript]
uses = "whisper"
needs = ["transcode"]
"#;

#[tokio::test]
async fn retry_after_from_429s_is_honoured_and_only_the_failed_requests_are_repeated() {
    let world = world(ProviderStyle::Azure, |p| p.max_concurrent = 1).await;
    world.fake.fault(Kind::Transcription, Fault::TooMany(2));
    world.fake.fault(Kind::Transcription, Fault::TooMany(2));
    let dir = tempfile::tempdir().unwrap();
    let file = speech(dir.path(), 5);
    let report = world.run(&world.inline(TRANSCRIBE), &file, "retry-429").await;
    assert_eq!(report.status, JobStatus::Succeeded, "{report:#?}");
    let chunks = output(&report, "transcode")["chunks"].as_array().unwrap().len();
    let seen = world.fake.seen(Kind::Transcription);
    assert_eq!(seen.len(), chunks + 2, "exactly two extra requests");
    assert_eq!((seen[0].status, seen[1].status, seen[2].status), (429, 429, 200));
    for pair in seen[..3].windows(2) {
        let wait = pair[1].at - pair[0].at;
        assert!(wait >= Duration::from_secs(2), "waited {wait:?} as retry-after asked");
    }
    assert_eq!(output(&report, "transcript")["usage"]["requests"], (chunks + 2) as u64);
}

#[tokio::test]
async fn requests_are_paced_so_the_provider_never_answers_429() {
    let window = Duration::from_secs(2);
    let world = world(ProviderStyle::Openai, |p| {
        // "3 requests per minute", with the window shrunk to 2 s so the test stays short.
        p.transcription_rpm = Some(3);
        p.rate_window_ms = 2000;
        p.max_concurrent = 6;
    })
    .await;
    *world.fake.limit.lock().unwrap() = Some((3, window));
    *world.fake.delay.lock().unwrap() = Duration::from_millis(50);
    let dir = tempfile::tempdir().unwrap();
    let file = speech(dir.path(), 11);
    let report = world.run(&world.inline(TRANSCRIBE), &file, "paced").await;
    assert_eq!(report.status, JobStatus::Succeeded, "{report:#?}");
    let seen = world.fake.seen(Kind::Transcription);
    assert_eq!(seen.len(), 6, "6 chunks, each sent once");
    assert!(seen.iter().all(|s| s.status == 200), "no 429 was ever produced");
    for index in 3..seen.len() {
        let gap = seen[index].at - seen[index - 3].at;
        assert!(gap >= window, "request {index} came {gap:?} after request {}", index - 3);
    }
}

#[tokio::test]
async fn a_retried_job_does_not_pay_for_transcription_twice() {
    let world = world(ProviderStyle::Openai, |_| {}).await;
    let pipeline = world.inline(&format!(
        "{TRANSCRIBE}\n[stages.analysis]\nuses = \"analyze\"\nneeds = [\"transcript\"]\nwith = {{ transcript = \"{{{{ stages.transcript.text }}}}\" }}\n"
    ));
    world.fake.fault(Kind::Chat, Fault::ContentFilter);
    let dir = tempfile::tempdir().unwrap();
    let file = speech(dir.path(), 5);
    let first = world.run(&pipeline, &file, "no-double-pay").await;
    assert_eq!(first.status, JobStatus::Failed);
    assert_eq!(first.failure.as_ref().unwrap().stage.as_deref(), Some("analysis"));
    let before = world.fake.seen(Kind::Transcription).len();
    assert!(before >= 3);

    let second = world.run(&pipeline, &file, "no-double-pay").await;
    assert_eq!(second.status, JobStatus::Succeeded, "{second:#?}");
    assert_eq!(world.fake.seen(Kind::Transcription).len(), before, "zero transcription requests on the retry");
    assert_eq!(output(&second, "transcript")["usage"]["cached_chunks"], before as u64);
}

#[tokio::test]
async fn quota_and_content_filter_errors_fail_at_once_and_say_why() {
    let world = world(ProviderStyle::Azure, |_| {}).await;
    let pipeline = world.inline(
        "[stages.analysis]\nuses = \"analyze\"\nretry = { max_attempts = 3, initial_interval = \"10ms\" }\nwith = { transcript = \"We agreed to ship on Friday.\" }\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("unused.mp3");
    world.fake.fault(Kind::Chat, Fault::Quota);
    let report = world.run(&pipeline, &file, "quota").await;
    assert_eq!(report.status, JobStatus::Failed);
    let failure = report.failure.unwrap();
    assert_eq!(failure.code, ErrorCode::InsufficientQuota);
    assert!(failure.message.contains("the account's quota is used up (insufficient_quota)"), "{}", failure.message);
    assert_eq!(world.fake.seen(Kind::Chat).len(), 1, "not retried");

    world.fake.fault(Kind::Chat, Fault::ContentFilter);
    let report = world.run(&pipeline, &file, "filtered").await;
    let failure = report.failure.unwrap();
    assert_eq!(failure.code, ErrorCode::ContentFilter);
    assert!(failure.message.contains("the content filter refused the request (content_filter)"), "{}", failure.message);
    assert_eq!(world.fake.seen(Kind::Chat).len(), 2, "not retried");
}

#[tokio::test]
async fn an_invalid_reply_is_asked_for_again_once() {
    let world = world(ProviderStyle::Openai, |_| {}).await;
    let pipeline = world.inline("[stages.analysis]\nuses = \"analyze\"\nwith = { transcript = \"Short meeting.\" }\n");
    world.fake.fault(Kind::Chat, Fault::BadJson);
    let dir = tempfile::tempdir().unwrap();
    let report = world.run(&pipeline, &dir.path().join("unused"), "bad-json-once").await;
    assert_eq!(report.status, JobStatus::Succeeded, "{report:#?}");
    assert_eq!(world.fake.seen(Kind::Chat).len(), 2);

    world.fake.fault(Kind::Chat, Fault::BadJson);
    world.fake.fault(Kind::Chat, Fault::BadJson);
    let report = world.run(&pipeline, &dir.path().join("unused"), "bad-json-twice").await;
    let failure = report.failure.unwrap();
    assert_eq!(failure.code, ErrorCode::InvalidOutput);
    assert!(failure.message.contains("does not fit the output schema: not JSON"), "{}", failure.message);
}

#[tokio::test]
async fn a_transcript_longer_than_the_context_is_mapped_and_reduced() {
    let world = world(ProviderStyle::Openai, |p| p.context_tokens = 2000).await;
    let sentence = "The team reviewed the roadmap and agreed on the next release. ";
    let transcript = sentence.repeat(6000 * 4 / sentence.len() + 1);
    assert!(echo_worker::ai::estimate_tokens(&transcript) >= 3 * 2000);
    let pipeline = world.inline(&format!(
        "[stages.analysis]\nuses = \"analyze\"\nwith = {{ max_tokens = 300, transcript = {} }}\n",
        toml::Value::String(transcript.clone())
    ));
    let dir = tempfile::tempdir().unwrap();
    let report = world.run(&pipeline, &dir.path().join("unused"), "map-reduce").await;
    assert_eq!(report.status, JobStatus::Succeeded, "{report:#?}");
    let chats = world.fake.seen(Kind::Chat);
    let (merges, parts): (Vec<_>, Vec<_>) = chats
        .iter()
        .partition(|c| c.body["messages"][0]["content"].as_str().unwrap().contains("Merge the partial results"));
    assert_eq!(merges.len(), 1, "one merge call");
    assert!(parts.len() >= 4, "at least four parts for a text three times the context, got {}", parts.len());
    for part in &parts {
        let user = part.body["messages"][1]["content"].as_str().unwrap();
        assert!(echo_worker::ai::estimate_tokens(user) < 2000, "each part fits the context");
    }
    let words: usize =
        parts.iter().map(|p| p.body["messages"][1]["content"].as_str().unwrap().split_whitespace().count() - 1).sum();
    assert_eq!(words, transcript.split_whitespace().count(), "the parts hold the whole transcript, nothing cut off");
    assert_eq!(output(&report, "analysis")["usage"]["parts"], parts.len() as u64);
}

#[tokio::test]
async fn default_and_podcast_run_end_to_end() {
    let world = world(ProviderStyle::Azure, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let file = speech(dir.path(), 3);
    for name in ["default", "podcast", "transcribe-only"] {
        let pipeline = world.catalog.pipelines[name].clone();
        let report = world.run(&pipeline, &file, &format!("e2e-{name}")).await;
        assert_eq!(report.status, JobStatus::Succeeded, "{name}: {report:#?}");
        let row = world.store.get(&format!("e2e-{name}")).await.unwrap().unwrap();
        assert_eq!(row.status, RecordingStatus::Completed, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn neither_api_key_appears_in_any_log_line() {
    let fake = Fake::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = speech(dir.path(), 3);
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_echo-worker"))
        .args(["process", file.to_str().unwrap(), "--pipeline", "default", "--format", "json"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RUST_LOG", "trace")
        .env("DATABASE_URL", "sqlite::memory:")
        .env("TEMP_DIR", dir.path())
        .env(
            "AZURE_OPENAI_ENDPOINT",
            format!("{}/openai/deployments/whisper/audio/transcriptions?api-version=2024-06-01", fake.base),
        )
        .env("AZURE_OPENAI_API_KEY", KEY)
        .env("AZURE_OPENAI_WHISPER_API_KEY", support::fake_ai::WHISPER_KEY)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains(" DEBUG ") && stderr.contains("sending a request"),
        "the most verbose logging is on: {stderr}"
    );
    assert!(stderr.contains("using its origin"), "the whole-URL endpoint was reduced to its origin");
    for key in [KEY, support::fake_ai::WHISPER_KEY] {
        assert!(!stderr.contains(key), "a log line holds {key}");
        assert!(!stdout.contains(key), "the report holds {key}");
    }
    assert!(fake.seen(Kind::Transcription).iter().all(|s| s.status == 200));
    assert!(!fake.seen(Kind::Chat).is_empty());
}

#[tokio::test]
async fn hangs_and_server_errors_are_retried_per_request() {
    let world = world(ProviderStyle::Openai, |p| {
        p.timeout_secs = 1;
        p.max_concurrent = 1;
    })
    .await;
    world.fake.fault(Kind::Transcription, Fault::Hang);
    world.fake.fault(Kind::Transcription, Fault::ServerError);
    let dir = tempfile::tempdir().unwrap();
    let file = speech(dir.path(), 3);
    let report = world.run(&world.inline(TRANSCRIBE), &file, "hang").await;
    assert_eq!(report.status, JobStatus::Succeeded, "{report:#?}");
    let statuses: Vec<u16> = world.fake.seen(Kind::Transcription).iter().map(|s| s.status).collect();
    assert_eq!(&statuses[..3], [504, 500, 200], "the hung request timed out, the 500 was retried");
    assert_eq!(report.stages["transcript"].attempts, 1, "retries happen per request, inside one stage attempt");
}

#[tokio::test]
async fn the_provider_refuses_oversized_uploads_and_unknown_extensions() {
    let world = world(ProviderStyle::Openai, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let file = speech(dir.path(), 1);
    let opus = dir.path().join("voice.opus");
    std::fs::copy(&file, &opus).unwrap();
    let big = dir.path().join("big.mp3");
    support::media::ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "anoisesrc=d=150:r=48000:a=0.5",
        "-ac",
        "2",
        "-c:a",
        "pcm_s16le",
        "-f",
        "wav",
        dir.path().join("big.wav").to_str().unwrap(),
    ]);
    std::fs::copy(dir.path().join("big.wav"), &big).unwrap();
    for (path, expected) in
        [(&opus, "Unsupported file format opus"), (&big, "Maximum content size limit (26214400) exceeded")]
    {
        let pipeline = world.inline(&format!(
            "[stages.transcript]\nuses = \"whisper\"\nretry = {{ max_attempts = 2, initial_interval = \"10ms\" }}\nwith = {{ chunks = [{{ path = \"{}\", start = 0.0, end = 60.0 }}] }}\n",
            path.display()
        ));
        let before = world.fake.seen(Kind::Transcription).len();
        let report = world.run(&pipeline, &file, &format!("refused-{}", before)).await;
        let failure =
            report.failure.clone().unwrap_or_else(|| panic!("{report:#?} {:?}", world.fake.seen(Kind::Transcription)));
        assert!(failure.message.contains(expected), "{}", failure.message);
        assert!(!failure.retryable);
        assert_eq!(world.fake.seen(Kind::Transcription).len(), before + 1, "not retried");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_worker_processes_share_the_request_window_through_redis() {
    let window = Duration::from_secs(2);
    let fake = Fake::start().await;
    *fake.limit.lock().unwrap() = Some((3, window));
    *fake.delay.lock().unwrap() = Duration::from_millis(50);
    let dir = tempfile::tempdir().unwrap();
    let file = speech(dir.path(), 3);
    let redis = support::redis_url();
    support::redis_answers(&redis).await.unwrap_or_else(|message| panic!("{message}"));
    let prefix = format!("echo-test-{}:", uuid::Uuid::new_v4().simple());
    let worker = |name: &str| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_echo-worker"))
            .args(["process", file.to_str().unwrap(), "--pipeline", "short-chunks"])
            .args(["--pipelines", "tests/fixtures/pipelines/ai"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("DATABASE_URL", "sqlite::memory:")
            .env("TEMP_DIR", dir.path().join(name))
            .env("REDIS_URL", &redis)
            .env("ECHO_REDIS__PREFIX", &prefix)
            .env("ECHO_AI__PROVIDERS__FAKE__STYLE", "openai")
            .env("ECHO_AI__PROVIDERS__FAKE__ENDPOINT", format!("{}/v1", fake.base))
            .env("ECHO_AI__PROVIDERS__FAKE__API_KEY", KEY)
            // "3 requests per minute", with the window shrunk to 2 s so the test stays short.
            .env("ECHO_AI__PROVIDERS__FAKE__TRANSCRIPTION_RPM", "3")
            .env("ECHO_AI__PROVIDERS__FAKE__RATE_WINDOW_MS", "2000")
            .output()
    };
    std::fs::create_dir_all(dir.path().join("a")).unwrap();
    std::fs::create_dir_all(dir.path().join("b")).unwrap();
    let (first, second) = tokio::join!(worker("a"), worker("b"));
    for output in [first.unwrap(), second.unwrap()] {
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    }
    let seen = fake.seen(Kind::Transcription);
    // Three minutes in chunks of under a minute (the limit keeps a one-second margin) is 4 chunks per worker.
    assert_eq!(seen.len(), 8, "each chunk sent once: {:?}", seen.iter().map(|s| s.status).collect::<Vec<_>>());
    assert!(seen.iter().all(|s| s.status == 200), "the two processes together never exceeded the window");
    for index in 3..seen.len() {
        assert!(seen[index].at - seen[index - 3].at >= window, "request {index} respects the shared window");
    }
}

#[tokio::test]
async fn a_prompt_template_that_fails_fails_the_stage_before_any_request() {
    let plugins = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir("plugins").unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), plugins.path().join(entry.file_name())).unwrap();
    }
    // Valid at load time; dividing by the `zero` parameter fails only when the prompt is rendered.
    std::fs::write(
        plugins.path().join("divide.toml"),
        "name = \"divide\"\nkind = \"prompt\"\n[params]\ntranscript = { type = \"string\", required = true }\n\
         zero = { type = \"integer\", default = 0 }\n[prompt]\nsystem = \"Answer.\"\n\
         user = \"{{ params.transcript }} {{ 10 // params.zero }}\"\n",
    )
    .unwrap();
    let world = world_with_plugins(ProviderStyle::Openai, plugins.path(), |_| {}).await;
    let set = PluginSet::load_dir(plugins.path()).unwrap();
    let document = Document::new(
        "test.toml",
        "name = \"test\"\n[stages.ask]\nuses = \"divide\"\nwith = { transcript = \"Hi.\" }\n",
    );
    let pipeline = compile(&document, &set, &[]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let report = world.run(&pipeline, &dir.path().join("unused"), "bad-template").await;
    assert_eq!(report.status, JobStatus::Failed, "{report:#?}");
    let failure = report.failure.unwrap();
    assert_eq!(failure.code, ErrorCode::Template, "{}", failure.message);
    assert!(failure.message.contains("prompt.user"), "the message names the template: {}", failure.message);
    assert_eq!(world.fake.seen(Kind::Chat).len(), 0, "no request was sent, so none was billed");
}

/// A provider on a scripted loopback server, with no retries.
fn scripted_provider(base: &str) -> echo_worker::ai::Provider {
    let mut settings = ProviderSettings::new(ProviderStyle::Openai, format!("{base}/v1"), Some(Secret::new(KEY)));
    settings.max_retries = 0;
    echo_worker::ai::Provider::new("scripted", settings, None).unwrap()
}

fn chat_body() -> Value {
    serde_json::json!({ "messages": [{ "role": "user", "content": "hello" }] })
}

#[tokio::test]
async fn a_provider_error_that_echoes_the_key_never_reaches_a_message() {
    use support::raw_http::{Body, serve};
    let echoed = serde_json::json!({ "error": {
        "message": format!("Incorrect API key provided. Request headers: {{\"authorization\": \"Bearer {KEY}\"}} {}", "padding ".repeat(5000)),
        "code": "invalid_api_key"
    }});
    let server = serve(401, "application/json", Body::Text(echoed.to_string())).await;
    let error = scripted_provider(&server.base).chat(chat_body(), None, &CancellationToken::new()).await.unwrap_err();
    assert!(!error.message.contains(KEY), "{}", error.message);
    assert!(error.message.contains("\"authorization\": \"Bearer [redacted]\""), "{}", error.message);
    assert!(error.message.len() < 600, "a provider's error text is cut short: {} bytes", error.message.len());

    // Not JSON (a proxy's error page), and a 5xx: the same.
    let page = format!("<html>upstream failed; api-key: {KEY}</html>");
    let server = serve(502, "text/html", Body::Text(page)).await;
    let error = scripted_provider(&server.base).chat(chat_body(), None, &CancellationToken::new()).await.unwrap_err();
    assert!(!error.message.contains(KEY), "{}", error.message);
    assert!(error.message.ends_with("upstream failed; api-key: [redacted]</html>"), "{}", error.message);
    let stage_error = echo_worker::job::StageError::from(error);
    assert!(!stage_error.to_string().contains(KEY), "the stage's error (report, stderr, `error` column) is clean");
}

#[tokio::test]
async fn an_ai_reply_larger_than_the_cap_fails_with_memory_bounded() {
    use support::raw_http::{Body, serve};
    let server = serve(200, "application/json", Body::Huge { total: 256 << 20, declare: false }).await;
    let error = scripted_provider(&server.base).chat(chat_body(), None, &CancellationToken::new()).await.unwrap_err();
    assert_eq!((error.code, error.retryable), (ErrorCode::ResponseTooLarge, false));
    assert_eq!(
        error.message,
        "provider `scripted`: the chat answer: the response is larger than 8MiB, the `limits.max_response_size` limit"
    );
    let written = server.written.load(std::sync::atomic::Ordering::SeqCst);
    assert!(written < 64 << 20, "the client stopped reading near the cap; the server wrote {written} bytes");
}
