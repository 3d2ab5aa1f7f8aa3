//! Local runs: `echo-worker process FILE...` runs jobs in this process, with no server and no queue, and shows
//! a progress bar per file. This is wiring (it turns engine results into files, terminal output and an exit
//! code), so it uses `anyhow` like `main.rs`.
//!
//! Choices: paths typed on the command line belong to the user and are always allowed; every file is checked
//! before any job starts, and so is every stage kind of the pipeline; each file gets a recording row in the
//! store (`DATABASE_URL`, `sqlite://echo.db` by default) that follows the job's status and progress and ends
//! `completed` (with the pipeline's `persist` fields, or every stage output when it has no `persist`),
//! `failed` (with the reason) or `cancelled`; checkpoints live in memory, so a local run does not resume an
//! earlier one, and each job's checkpoints are cleared when it ends, since its id is never used again; SIGINT or SIGTERM cancels every running job (child processes are killed, work directories
//! removed) and the exit code is then 130.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::app;
use crate::catalog::Catalog;
use crate::config::Settings;
use crate::engine::{Engine, JobReport, JobStatus};
use crate::job::JobSpec;
use crate::job::checkpoint::{Checkpoints, MemoryCheckpoints};
use crate::job::progress::{ProgressSink, ProgressUpdate, Tee};
use crate::store::{NewRecording, RecordingStatus, Store, StoreError, StoreSink};
use crate::terminal::{self, escape};
use crate::worker::settle;

/// What `echo-worker process` was asked to do.
#[derive(Debug, Clone)]
pub struct ProcessRequest {
    /// The media files.
    pub files: Vec<PathBuf>,
    /// The pipeline's name.
    pub pipeline: String,
    /// `job.params`, from `--param key=value`.
    pub params: serde_json::Map<String, Value>,
    /// Folder for one `<file stem>.json` report per file.
    pub out: Option<PathBuf>,
    /// Print the JSON reports on stdout instead of a summary per file.
    pub json: bool,
    /// Folder of pipeline files.
    pub pipelines: PathBuf,
    /// Folder of plugin files.
    pub plugins: PathBuf,
}

/// Parses `key=value`; the value is JSON when it parses as JSON (`false`, `3`, `"x"`), text otherwise.
///
/// # Errors
/// When there is no `=` or the key is empty.
pub fn parse_param(text: &str) -> anyhow::Result<(String, Value)> {
    let Some((key, value)) = text.split_once('=').filter(|(key, _)| !key.is_empty()) else {
        bail!("`{text}` is not key=value");
    };
    let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_string()));
    Ok((key.to_string(), value))
}

/// Runs every file through the pipeline and reports; the exit code is 0 when every job succeeded, 1 when
/// any failed, 130 when cancelled by a signal.
///
/// # Errors
/// Anything that stops the run before it starts: invalid pipelines, an unknown pipeline, a stage kind that
/// cannot run here, an unreadable file.
pub async fn process(settings: &Settings, request: ProcessRequest) -> anyhow::Result<ExitCode> {
    process_with(settings, request, Arc::new(MemoryCheckpoints::default())).await
}

/// [`process`] with the checkpoint store given, so that tests can look into it.
async fn process_with(
    settings: &Settings,
    request: ProcessRequest,
    checkpoints: Arc<dyn Checkpoints>,
) -> anyhow::Result<ExitCode> {
    let catalog = Catalog::load(&request.pipelines, &request.plugins)?;
    let pipeline = catalog.pipeline(&request.pipeline)?.clone();
    let mut sources = Vec::with_capacity(request.files.len());
    for file in &request.files {
        let metadata = std::fs::metadata(file).with_context(|| format!("cannot read {}", file.display()))?;
        if !metadata.is_file() {
            bail!("{} is not a file", file.display());
        }
        let source = std::path::absolute(file).with_context(|| format!("cannot resolve {}", file.display()))?;
        // A job carries its source as text, and templates hand it to programs as text: a path that is not
        // UTF-8 would reach them changed, so it is refused here rather than misread later.
        if source.to_str().is_none() {
            bail!("{}: the path is not valid UTF-8; rename the file to process it", file.display());
        }
        sources.push(source);
    }
    app::check_requirements(settings, &pipeline, &catalog.plugins)?;
    let store = app::store(settings).await?;
    let registry = app::registry(settings, catalog.plugins.values(), store.clone()).await?;
    let engine = Engine::new(registry, checkpoints.clone(), settings.engine());
    engine.check(&pipeline)?;

    let cancel = CancellationToken::new();
    tokio::spawn(cancel_on_signal(cancel.clone()));
    let bars = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
    let limit = Arc::new(Semaphore::new(settings.worker.concurrency.max(1) as usize));
    let pipeline = Arc::new(pipeline);
    let mut jobs = tokio::task::JoinSet::new();
    let mut started = std::collections::BTreeMap::new();
    for (index, (file, source)) in request.files.iter().zip(sources).enumerate() {
        let bar = bars.add(ProgressBar::new(100));
        bar.set_style(
            ProgressStyle::with_template("{prefix:20!} [{bar:20}] {pos:>3}% {elapsed:>4} {wide_msg}")
                .expect("the template is valid")
                .progress_chars("=> "),
        );
        bar.set_prefix(escape(&file.display().to_string()).into_owned());
        let recording_id = uuid::Uuid::new_v4().to_string();
        let job_id = format!("local-{recording_id}");
        let new = NewRecording {
            id: recording_id.clone(),
            file_url: Some(source.display().to_string()),
            file_name: file.file_name().map(|name| name.to_string_lossy().into_owned()),
            size_bytes: std::fs::metadata(&source).ok().and_then(|m| i64::try_from(m.len()).ok()),
            pipeline: Some(pipeline.name.clone()),
            job_id: Some(job_id.clone()),
            ..NewRecording::default()
        };
        let job = JobSpec {
            id: job_id,
            recording_id: Some(recording_id.clone()),
            pipeline: pipeline.name.clone(),
            params: request.params.clone(),
            source: Some(source.display().to_string()),
            trusted_source: true,
        };
        started.insert(index, (file.clone(), recording_id.clone()));
        let (engine, pipeline, cancel, limit, store) =
            (engine.clone(), pipeline.clone(), cancel.clone(), limit.clone(), store.clone());
        let checkpoints = checkpoints.clone();
        // A job that cannot start or run fails alone: its row says why, and the other jobs go on.
        jobs.spawn(async move {
            let began = std::time::Instant::now();
            let job_id = job.id.clone();
            let report = async {
                store.register(&new).await?;
                store.set_status(&recording_id, RecordingStatus::Processing, Some("started"), None).await?;
                let _permit = limit.acquire_owned().await;
                let store_sink = Arc::new(StoreSink::new(store.clone(), recording_id.clone()));
                let sink: Arc<dyn ProgressSink> = Arc::new(Tee(vec![Arc::new(BarSink(bar.clone())), store_sink]));
                anyhow::Ok(engine.run(&pipeline, job, sink, cancel).await?)
            }
            .await;
            // The job has ended for good whatever its status: `process` never runs the same job id again.
            if let Err(error) = checkpoints.clear(&job_id).await {
                tracing::warn!(job = %job_id, %error, "could not clear the job's checkpoints");
            }
            bar.finish();
            let report = match report {
                // A result the store cannot take (too large, refused) fails the file: its row must not stay
                // `processing` while the command says all went well.
                Ok(report) => match settle(store.as_ref(), &recording_id, &report).await {
                    Ok(()) => Ok(report),
                    Err(error) => Err(anyhow::anyhow!("could not record the result: {error}")),
                },
                Err(error) => Err(error),
            };
            if let Err(error) = &report
                && let Err(store_error) = fail_row(store.as_ref(), &recording_id, error).await
            {
                tracing::warn!(recording = %recording_id, error = %store_error, "could not record how the job ended");
            }
            (index, report.map(|report| (report, began.elapsed())))
        });
    }
    // Every job is waited for, whatever happens to the others.
    let mut reports = Vec::new();
    let mut took = std::collections::HashMap::new();
    let mut broken = Vec::new();
    while let Some(joined) = jobs.join_next().await {
        let Ok((index, report)) = joined else { continue };
        let Some((file, recording)) = started.remove(&index) else { continue };
        match report {
            Ok((report, elapsed)) => {
                took.insert(index, elapsed);
                reports.push((index, file, recording, report));
            }
            Err(error) => broken.push((file, error)),
        }
    }
    // A job task that panicked recorded nothing; its row is marked failed here.
    for (file, recording) in started.into_values() {
        let error = anyhow::anyhow!("the job ended unexpectedly");
        if let Err(error) = fail_row(store.as_ref(), &recording, &error).await {
            tracing::warn!(recording = %recording, %error, "could not record how the job ended");
        }
        broken.push((file, error));
    }
    reports.sort_by_key(|(index, ..)| *index);
    let written = write_reports(&reports, request.out.as_deref(), request.json)?;

    let mut code = ExitCode::SUCCESS;
    for (file, error) in &broken {
        terminal::eprintln(escape(&format!("{}: failed: {error:#}", file.display())));
        code = ExitCode::FAILURE;
    }
    for ((index, file, recording, report), written) in reports.iter().zip(&written) {
        if !request.json {
            let elapsed = took.get(index).copied().unwrap_or_default();
            let stored = format!("recording {recording} in {}", settings.database.url.redacted());
            terminal::println(summary(file, &pipeline, report, elapsed, written.as_deref(), &stored))?;
        }
        match report.status {
            JobStatus::Succeeded => {}
            JobStatus::Cancelled => {
                terminal::eprintln(escape(&format!("{}: cancelled", file.display())));
                code = ExitCode::from(130);
            }
            JobStatus::Failed => {
                let failure = report.failure.as_ref();
                let stage = failure.and_then(|f| f.stage.as_deref()).map(|s| format!(" in stage `{s}`"));
                let reason = failure.map_or("unknown reason", |f| f.message.as_str());
                let line = format!("{}: failed{}: {reason}", file.display(), stage.unwrap_or_default());
                terminal::eprintln(escape(&line));
                if code == ExitCode::SUCCESS {
                    code = ExitCode::FAILURE;
                }
            }
        }
    }
    Ok(code)
}

/// Marks the row of a job that could not start or run as failed, with the reason.
async fn fail_row(store: &dyn Store, id: &str, error: &anyhow::Error) -> Result<(), StoreError> {
    store.set_status(id, RecordingStatus::Failed, Some("failed"), Some(&format!("{error:#}"))).await.map(drop)
}

/// One report per file: `<stem>.json` in `out` when given, and on stdout when `stdout` (an object for one file,
/// an array for several). Returns, per report, the file it was written to.
fn write_reports(
    reports: &[(usize, PathBuf, String, JobReport)],
    out: Option<&Path>,
    stdout: bool,
) -> anyhow::Result<Vec<Option<PathBuf>>> {
    let documents: Vec<Value> = reports
        .iter()
        // A file name need not be UTF-8; the report shows it with U+FFFD where it is not.
        .map(|(_, file, recording, report)| {
            json!({ "file": file.to_string_lossy(), "recording_id": recording, "report": report })
        })
        .collect();
    if stdout {
        let text = match documents.as_slice() {
            [one] => serde_json::to_string_pretty(one)?,
            many => serde_json::to_string_pretty(many)?,
        };
        terminal::println(text)?;
    }
    let Some(out) = out else {
        return Ok(vec![None; reports.len()]);
    };
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut used = std::collections::HashSet::new();
    let mut written = Vec::with_capacity(reports.len());
    for ((_, file, ..), document) in reports.iter().zip(documents) {
        let stem = file.file_stem().map_or_else(|| "report".into(), |stem| stem.to_string_lossy().into_owned());
        let name =
            (1..).map(|n| if n == 1 { stem.clone() } else { format!("{stem}-{n}") }).find(|n| used.insert(n.clone()));
        let path = out.join(format!("{}.json", name.unwrap_or(stem)));
        std::fs::write(&path, serde_json::to_string_pretty(&document)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        written.push(Some(path));
    }
    Ok(written)
}

async fn cancel_on_signal(cancel: CancellationToken) {
    let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(signal) => signal,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            cancel.cancel();
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    terminal::eprintln("cancelling: stopping every running job");
    cancel.cancel();
}

/// Shows a job's progress on its bar.
struct BarSink(ProgressBar);

#[async_trait::async_trait]
impl ProgressSink for BarSink {
    async fn update(&self, update: ProgressUpdate) {
        self.0.set_position(u64::from(update.percent));
        // Messages can quote a program's stderr; the bar shows them escaped.
        self.0.set_message(escape(&bar_message(&update)).into_owned());
    }
}

/// `[2/5] transcode: 40% encoded · also running loudness`: stages done out of all, what the running stage that
/// spoke last said, and the other stages running now. Never a stage that has ended; once nothing runs, just the
/// message (`completed`, `failed: …`).
fn bar_message(update: &ProgressUpdate) -> String {
    if update.running.is_empty() {
        return update.message.clone();
    }
    let count = format!("[{}/{}]", update.stages_done, update.stages_total);
    let speaker = update.stage.as_ref().filter(|stage| {
        update.running.contains(stage) && !update.message.is_empty() && update.message != format!("running {stage}")
    });
    let Some(speaker) = speaker else {
        return format!("{count} running {}", update.running.join(", "));
    };
    let others: Vec<&str> = update.running.iter().map(String::as_str).filter(|id| id != speaker).collect();
    if others.is_empty() {
        format!("{count} {speaker}: {}", update.message)
    } else {
        format!("{count} {speaker}: {} · also running {}", update.message, others.join(", "))
    }
}

/// The lines printed for one file when the jobs are done: status, time taken, what the recording is, the
/// headline figures of the pipeline's last stages, and where the report and the result went.
fn summary(
    file: &Path,
    pipeline: &crate::pipeline::Pipeline,
    report: &JobReport,
    took: std::time::Duration,
    written: Option<&Path>,
    stored: &str,
) -> String {
    let status = match (report.status, report.failure.as_ref().and_then(|f| f.stage.as_deref())) {
        (JobStatus::Succeeded, _) => "completed".to_string(),
        (JobStatus::Failed, Some(stage)) => format!("failed in stage `{stage}`"),
        (JobStatus::Failed, None) => "failed".to_string(),
        (JobStatus::Cancelled, _) => "cancelled".to_string(),
    };
    let when = if report.status == JobStatus::Succeeded { "in" } else { "after" };
    let mut text = format!("{}: {status} {when} {:.1} s ({})", file.display(), took.as_secs_f64(), pipeline.name);
    // The media facts `validate` found, when the pipeline has such a stage and it ran.
    let facts =
        report.stages.values().filter_map(|stage| stage.output.as_ref()).find(|output| output["mime"].is_string());
    if let Some(facts) = facts {
        let mut parts = Vec::new();
        if let Some(seconds) = facts["duration"].as_f64() {
            parts.push(format!("{seconds:.1} s"));
        }
        parts.push(facts["mime"].as_str().unwrap_or_default().to_string());
        if let Some(size) = facts["size"].as_u64() {
            parts.push(crate::units::ByteSize(size).human().to_string());
        }
        text.push_str(&format!("\n  recording: {}", parts.join(", ")));
    }
    for id in last_stages(pipeline) {
        let Some(output) = report.stages.get(&id).and_then(|stage| stage.output.as_ref()) else { continue };
        let figures = headline(output);
        if !figures.is_empty() {
            text.push_str(&format!("\n  {id}: {}", figures.join(", ")));
        }
    }
    if let Some(path) = written {
        text.push_str(&format!("\n  report: {}", path.display()));
    }
    text.push_str(&format!("\n  stored: {stored}"));
    text
}

/// The stages whose outputs sum a run up: those nothing else needs, with a `persist` stage replaced by what it
/// stores.
fn last_stages(pipeline: &crate::pipeline::Pipeline) -> Vec<String> {
    let needed: std::collections::HashSet<&str> =
        pipeline.stages.iter().flat_map(|stage| stage.needs.iter().map(String::as_str)).collect();
    let mut last = Vec::new();
    for stage in pipeline.stages.iter().filter(|stage| !needed.contains(stage.id.as_str())) {
        if stage.uses.name() == "persist" {
            last.extend(stage.needs.iter().cloned());
        } else {
            last.push(stage.id.clone());
        }
    }
    let mut seen = std::collections::HashSet::new();
    last.retain(|id| seen.insert(id.clone()));
    last
}

/// At most eight `name value` figures of a stage's output: numbers (sizes in human units, seconds with one
/// decimal), short text and flags as they are, lists by their length, long text by its length; paths and
/// nested objects are left out.
fn headline(output: &Value) -> Vec<String> {
    let Some(fields) = output.as_object() else { return Vec::new() };
    let mut figures = Vec::new();
    for (key, value) in fields {
        let figure = match value {
            Value::Number(number) if key == "bytes" || key == "size" || key.ends_with("_bytes") => {
                number.as_u64().map(|bytes| crate::units::ByteSize(bytes).human().to_string())
            }
            Value::Number(number) if key == "duration" || key.ends_with("_s") => {
                number.as_f64().map(|seconds| format!("{seconds:.1} s"))
            }
            Value::Number(number) => Some(match number.as_f64() {
                Some(float) if number.is_f64() => format!("{}", (float * 100.0).round() / 100.0),
                _ => number.to_string(),
            }),
            Value::Bool(flag) => Some(flag.to_string()),
            Value::String(text) if key == "path" || key.ends_with("_path") || text.starts_with('/') => None,
            Value::String(text) if text.chars().count() <= 40 && !text.contains('\n') => Some(text.clone()),
            Value::String(text) => Some(format!("{} characters", text.chars().count())),
            Value::Array(items) => Some(items.len().to_string()),
            Value::Object(_) | Value::Null => None,
        };
        if let Some(figure) = figure {
            figures.push(format!("{key} {figure}"));
        }
        if figures.len() == 8 {
            break;
        }
    }
    figures
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::config::SecretUrl;
    use crate::job::StageOutput;
    use crate::job::checkpoint::CheckpointError;

    fn update(stage: &str, message: &str, running: &[&str], done: usize) -> ProgressUpdate {
        ProgressUpdate {
            job_id: "j".into(),
            percent: 40,
            stage: Some(stage.into()),
            message: message.into(),
            running: running.iter().map(|id| id.to_string()).collect(),
            stages_done: done,
            stages_total: 5,
            ended: Vec::new(),
        }
    }

    #[test]
    fn the_bar_shows_running_stages_and_never_a_finished_one() {
        let both = update("transcode", "40% encoded", &["transcode", "loudness"], 2);
        assert_eq!(bar_message(&both), "[2/5] transcode: 40% encoded · also running loudness");
        // transcode has ended, loudness says nothing: the bar names loudness, not transcode's last words.
        let after = update("transcode", "1 chunks", &["loudness"], 3);
        assert_eq!(bar_message(&after), "[3/5] running loudness");
        let silent = update("loudness", "running loudness", &["loudness"], 3);
        assert_eq!(bar_message(&silent), "[3/5] running loudness");
        let done = update("", "completed", &[], 5);
        assert_eq!(bar_message(&done), "completed");
    }

    /// Memory checkpoints that also count the saves, so the test knows there was something to clear.
    #[derive(Default)]
    struct Counted {
        memory: MemoryCheckpoints,
        saves: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl Checkpoints for Counted {
        async fn load(&self, job_id: &str) -> Result<HashMap<String, StageOutput>, CheckpointError> {
            self.memory.load(job_id).await
        }

        async fn save(&self, job_id: &str, key: &str, output: &StageOutput) -> Result<(), CheckpointError> {
            self.saves.fetch_add(1, Ordering::SeqCst);
            self.memory.save(job_id, key, output).await
        }

        async fn clear(&self, job_id: &str) -> Result<(), CheckpointError> {
            self.memory.clear(job_id).await
        }
    }

    #[tokio::test]
    async fn checkpoints_of_finished_local_jobs_are_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("recording.txt");
        std::fs::write(&file, "the pipelines below do not read it").unwrap();
        let mut settings = Settings::default();
        settings.database.url = SecretUrl::new("sqlite::memory:");
        settings.paths.temp_dir = dir.path().to_path_buf();
        let checkpoints = Arc::new(Counted::default());
        let mut params = serde_json::Map::new();
        params.insert("count_file".into(), json!(dir.path().join("runs").display().to_string()));
        for (pipeline, code) in [("echo-once", ExitCode::SUCCESS), ("echo-then-fail", ExitCode::FAILURE)] {
            let saves = checkpoints.saves.load(Ordering::SeqCst);
            let request = ProcessRequest {
                files: vec![file.clone()],
                pipeline: pipeline.into(),
                params: params.clone(),
                out: Some(dir.path().join("reports")),
                json: false,
                pipelines: "tests/fixtures/pipelines/checkpoints".into(),
                plugins: "tests/fixtures/plugins/valid".into(),
            };
            assert_eq!(process_with(&settings, request, checkpoints.clone()).await.unwrap(), code, "{pipeline}");
            assert!(checkpoints.saves.load(Ordering::SeqCst) > saves, "{pipeline}: the `echo` stage was checkpointed");
            assert_eq!(checkpoints.memory.job_count(), 0, "{pipeline}: no job keeps checkpoints after it ended");
        }
    }
}
