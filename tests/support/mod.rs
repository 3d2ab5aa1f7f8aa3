//! Shared test helpers: test-only stage kinds that record what happened to them, pipelines compiled from
//! inline TOML, and a progress sink that keeps every update.
#![allow(dead_code)] // Each test binary uses a different part of this module.

pub mod app;
pub mod browser;
pub mod fake_ai;
pub mod hook;
pub mod jwt;
pub mod legacy;
pub mod media;
pub mod raw_http;
pub mod storage;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use echo_worker::document::Document;
use echo_worker::engine::{Engine, EngineSettings, JobReport, StageRegistry};
use echo_worker::error::ErrorCode;
use echo_worker::job::JobSpec;
use echo_worker::job::checkpoint::{Checkpoints, MemoryCheckpoints};
use echo_worker::job::progress::{ProgressSink, ProgressUpdate};
use echo_worker::job::{StageError, StageOutput};
use echo_worker::net::{AddressPolicy, HttpClient};
use echo_worker::pipeline::Pipeline;
use echo_worker::pipeline::compile::compile;
use echo_worker::plugin::PluginSet;
use echo_worker::stage::{Stage, StageContext};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// The PostgreSQL the tests use: `ECHO_TEST_POSTGRES_URL`, else database `test` at 127.0.0.1:5432.
pub fn postgres_url() -> String {
    std::env::var("ECHO_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// The Redis the tests use: `ECHO_TEST_REDIS_URL`, else 127.0.0.1:6379.
pub fn redis_url() -> String {
    std::env::var("ECHO_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The address as a failure message may show it (no password).
pub fn printable(url: &str) -> String {
    echo_worker::config::SecretUrl::new(url).redacted()
}

/// Checks that Redis answers a PING at `url` within 5 s; the error names the address tried.
pub async fn redis_answers(url: &str) -> Result<(), String> {
    let failed = |error: &dyn std::fmt::Display| {
        format!("Redis at {} (set ECHO_TEST_REDIS_URL to use another) does not answer: {error}", printable(url))
    };
    let client = redis::Client::open(url).map_err(|error| failed(&error))?;
    let ping = async {
        let mut connection = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut connection).await
    };
    match tokio::time::timeout(Duration::from_secs(5), ping).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(failed(&error)),
        Err(_) => Err(failed(&"no answer within 5 s")),
    }
}

/// The test-only stage kinds.
pub const KINDS: [&str; 7] = ["record", "flaky", "broken", "boom", "chatty", "write_file", "count"];

/// One attempt of a test stage, as it recorded itself.
#[derive(Debug, Clone)]
pub struct Event {
    pub stage: String,
    pub item: Option<usize>,
    pub start: Instant,
    pub end: Instant,
}

/// What the test stages saw: attempt timestamps and run counts, shared with the test.
#[derive(Debug, Default)]
pub struct Lab {
    pub events: Mutex<Vec<Event>>,
    pub runs: Mutex<HashMap<String, u32>>,
}

impl Lab {
    fn count(&self, stage: &str) -> u32 {
        let mut runs = self.runs.lock().unwrap();
        let count = runs.entry(stage.to_string()).or_default();
        *count += 1;
        *count
    }

    pub fn runs_of(&self, stage: &str) -> u32 {
        self.runs.lock().unwrap().get(stage).copied().unwrap_or(0)
    }

    pub fn events_of(&self, stage: &str) -> Vec<Event> {
        self.events.lock().unwrap().iter().filter(|event| event.stage == stage).cloned().collect()
    }
}

struct TestStage {
    kind: &'static str,
    lab: Arc<Lab>,
}

fn param_u64(ctx: &StageContext, name: &str) -> u64 {
    ctx.params.get(name).and_then(Value::as_u64).unwrap_or(0)
}

/// Sleeps, but stops at once when cancelled.
async fn nap(ctx: &StageContext, millis: u64) -> Result<(), StageError> {
    tokio::select! {
        () = tokio::time::sleep(Duration::from_millis(millis)) => Ok(()),
        () = ctx.cancel.cancelled() => Err(StageError::cancelled()),
    }
}

#[async_trait::async_trait]
impl Stage for TestStage {
    async fn run(&self, ctx: StageContext) -> Result<StageOutput, StageError> {
        let start = Instant::now();
        let runs = self.lab.count(&ctx.stage_id);
        let item = ctx.item.as_ref().map(|(index, _)| *index);
        let result = match self.kind {
            // Sleeps `ms`, then outputs what it saw.
            "record" => nap(&ctx, param_u64(&ctx, "ms")).await.map(
                |()| json!({ "stage": ctx.stage_id, "params": ctx.params, "item": ctx.item.as_ref().map(|(_, v)| v) }),
            ),
            // Fails with a retryable error `fail_times` times, then succeeds.
            "flaky" => {
                if u64::from(runs) <= param_u64(&ctx, "fail_times") {
                    Err(StageError::transient(ErrorCode::Custom, format!("flaky failure {runs}")))
                } else {
                    Ok(json!({ "succeeded_on": runs }))
                }
            }
            "broken" => Err(StageError::permanent(ErrorCode::Custom, "the input is unusable")),
            "boom" => panic!("boom stage exploded"),
            // Reports progress `steps` times, `ms` apart.
            "chatty" => {
                let steps = param_u64(&ctx, "steps").max(1);
                for step in 1..=steps {
                    ctx.progress.report(step as f64 / steps as f64, format!("step {step}"));
                    nap(&ctx, param_u64(&ctx, "ms")).await?;
                }
                Ok(json!({ "steps": steps }))
            }
            // Writes `path` (or a file in the work directory) and declares it as an output file.
            "write_file" => {
                let path = match ctx.params.get("path").and_then(Value::as_str) {
                    Some(path) => Path::new(path).to_path_buf(),
                    None => ctx
                        .work_dir
                        .ensure()
                        .map_err(|e| StageError::transient(ErrorCode::Io, e.to_string()))?
                        .join(format!("{}.txt", ctx.stage_id)),
                };
                std::fs::write(&path, "data").map_err(|e| StageError::permanent(ErrorCode::Io, e.to_string()))?;
                self.lab.events.lock().unwrap().push(Event {
                    stage: ctx.stage_id.clone(),
                    item,
                    start,
                    end: Instant::now(),
                });
                return Ok(StageOutput { value: json!({ "path": path }), files: vec![path] });
            }
            // Counts runs; fails permanently when `fail` is true, with `message` when given.
            "count" => {
                if ctx.params.get("fail").and_then(Value::as_bool).unwrap_or(false) {
                    let message = ctx.params.get("message").and_then(Value::as_str).map(str::to_string);
                    let message = message.unwrap_or_else(|| format!("stage {} was told to fail", ctx.stage_id));
                    Err(StageError::permanent(ErrorCode::Custom, message))
                } else {
                    Ok(json!({ "run": runs }))
                }
            }
            other => Err(StageError::permanent(ErrorCode::Custom, format!("unknown test kind {other}"))),
        };
        self.lab.events.lock().unwrap().push(Event { stage: ctx.stage_id.clone(), item, start, end: Instant::now() });
        result.map(StageOutput::from)
    }
}

/// The plugins under `tests/fixtures/plugins/valid`.
pub fn fixture_plugins() -> PluginSet {
    let set = PluginSet::load_dir(Path::new("tests/fixtures/plugins/valid")).unwrap();
    assert!(set.diagnostics.is_empty(), "{:?}", set.diagnostics);
    set
}

/// Compiles a pipeline written inline; `name = "test"` is added.
pub fn pipeline(body: &str) -> Pipeline {
    let document = Document::new("test.toml", format!("name = \"test\"\n{body}"));
    let custom: Vec<String> = KINDS.iter().map(|kind| kind.to_string()).collect();
    compile(&document, &fixture_plugins(), &custom).unwrap_or_else(|diagnostics| {
        panic!("test pipeline does not compile:\n{}", diagnostics.iter().map(|d| format!("{d}\n")).collect::<String>())
    })
}

/// An engine with the test kinds and the fixture plugins, working under `work_root`.
pub struct Bench {
    pub lab: Arc<Lab>,
    pub engine: Engine,
    pub checkpoints: Arc<MemoryCheckpoints>,
    pub work_root: tempfile::TempDir,
}

impl Bench {
    pub fn new() -> Self {
        Self::with_settings(|_| {})
    }

    pub fn with_settings(adjust: impl FnOnce(&mut EngineSettings)) -> Self {
        let lab = Arc::new(Lab::default());
        let plugins = fixture_plugins();
        // The http plugin tests talk to servers on loopback, which the checked client refuses by default.
        let http = HttpClient::new(AddressPolicy::allowing(["127.0.0.1"]).unwrap(), 5).unwrap();
        let mut registry = StageRegistry::with_plugins(
            plugins.plugins.values(),
            http,
            None,
            echo_worker::config::DEFAULT_MAX_RESPONSE_SIZE,
        );
        for kind in KINDS {
            registry.register(kind, Arc::new(TestStage { kind, lab: lab.clone() }));
        }
        let work_root = tempfile::tempdir().unwrap();
        let mut settings = EngineSettings { work_root: work_root.path().to_path_buf(), ..EngineSettings::default() };
        adjust(&mut settings);
        let checkpoints = Arc::new(MemoryCheckpoints::default());
        let engine = Engine::new(registry, checkpoints.clone() as Arc<dyn Checkpoints>, settings);
        Self { lab, engine, checkpoints, work_root }
    }

    /// Runs a job to its end.
    pub async fn run(&self, pipeline: &Pipeline, job: JobSpec) -> JobReport {
        self.run_with(pipeline, job, Arc::new(Updates::default()), CancellationToken::new()).await
    }

    pub async fn run_with(
        &self,
        pipeline: &Pipeline,
        job: JobSpec,
        sink: Arc<dyn ProgressSink>,
        cancel: CancellationToken,
    ) -> JobReport {
        // Every test job is bounded: nothing here should take more than a minute.
        tokio::time::timeout(Duration::from_secs(60), self.engine.run(pipeline, job, sink, cancel))
            .await
            .expect("the job ends within a minute")
            .expect("the job starts")
    }

    /// Work directories still present under the root.
    pub fn leftover_work_dirs(&self) -> Vec<std::path::PathBuf> {
        std::fs::read_dir(self.work_root.path()).unwrap().map(|entry| entry.unwrap().path()).collect()
    }
}

/// A job with the given id and params.
pub fn job(id: &str, params: Value) -> JobSpec {
    JobSpec {
        id: id.to_string(),
        recording_id: Some(format!("rec-{id}")),
        pipeline: "test".into(),
        params: params.as_object().cloned().unwrap_or_default(),
        source: None,
        trusted_source: false,
    }
}

/// A sink that keeps every update and when it arrived.
#[derive(Debug, Default)]
pub struct Updates {
    pub seen: Mutex<Vec<(Instant, ProgressUpdate)>>,
}

#[async_trait::async_trait]
impl ProgressSink for Updates {
    async fn update(&self, update: ProgressUpdate) {
        self.seen.lock().unwrap().push((Instant::now(), update));
    }
}
