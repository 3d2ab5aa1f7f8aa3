//! Local runs: `echo-worker process FILE...` runs jobs in this process, with no server and no queue, and shows
//! a progress bar per file. This is wiring (it turns engine results into files, terminal output and an exit
//! code), so it uses `anyhow` like `main.rs`.
//!
//! Choices: paths typed on the command line belong to the user and are always allowed; every file is checked
//! before any job starts, and so is every stage kind of the pipeline; each file gets a recording row in the
//! store (`DATABASE_URL`, `sqlite://echo.db` by default) that follows the job's status and progress and ends
//! `completed` (with the pipeline's `persist` fields, or every stage output when it has no `persist`),
//! `failed` (with the reason) or `cancelled`; checkpoints live in memory, so a local run does not resume an
//! earlier one; SIGINT or SIGTERM cancels every running job (child processes are killed, work directories
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
use crate::engine::checkpoint::MemoryCheckpoints;
use crate::engine::progress::{ProgressSink, ProgressUpdate, Tee};
use crate::engine::{Engine, JobReport, JobSpec, JobStatus};
use crate::store::{NewRecording, RecordingStatus, Store, StoreError, StoreSink};
use crate::terminal::{self, escape};

/// What `echo-worker process` was asked to do.
#[derive(Debug, Clone)]
pub struct ProcessRequest {
    /// The media files.
    pub files: Vec<PathBuf>,
    /// The pipeline's name.
    pub pipeline: String,
    /// `job.params`, from `--param key=value`.
    pub params: serde_json::Map<String, Value>,
    /// Folder for one `<file stem>.json` report per file; stdout when absent.
    pub out: Option<PathBuf>,
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
    let catalog = Catalog::load(&request.pipelines, &request.plugins)?;
    let Some(pipeline) = catalog.pipelines.get(&request.pipeline).cloned() else {
        let known: Vec<&str> = catalog.pipelines.keys().map(String::as_str).collect();
        bail!("no pipeline named `{}`; known: {}", request.pipeline, known.join(", "));
    };
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
    let engine = Engine::new(registry, Arc::new(MemoryCheckpoints::default()), settings.engine());
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
            ProgressStyle::with_template("{prefix:24!} [{bar:30}] {pos:>3}% {wide_msg}")
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
        // A job that cannot start or run fails alone: its row says why, and the other jobs go on.
        jobs.spawn(async move {
            let report = async {
                store.register(&new).await?;
                store.set_status(&recording_id, RecordingStatus::Processing, Some("started"), None).await?;
                let _permit = limit.acquire_owned().await;
                let store_sink = Arc::new(StoreSink::new(store.clone(), recording_id.clone()));
                let sink: Arc<dyn ProgressSink> = Arc::new(Tee(vec![Arc::new(BarSink(bar.clone())), store_sink]));
                anyhow::Ok(engine.run(&pipeline, job, sink, cancel).await?)
            }
            .await;
            bar.finish();
            let recorded = match &report {
                Ok(report) => settle(store.as_ref(), &recording_id, report).await,
                Err(error) => fail_row(store.as_ref(), &recording_id, error).await,
            };
            if let Err(error) = recorded {
                tracing::warn!(recording = %recording_id, %error, "could not record how the job ended");
            }
            (index, report)
        });
    }
    // Every job is waited for, whatever happens to the others.
    let mut reports = Vec::new();
    let mut broken = Vec::new();
    while let Some(joined) = jobs.join_next().await {
        let Ok((index, report)) = joined else { continue };
        let Some((file, recording)) = started.remove(&index) else { continue };
        match report {
            Ok(report) => reports.push((index, file, recording, report)),
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
    write_reports(&reports, request.out.as_deref())?;

    let mut code = ExitCode::SUCCESS;
    for (file, error) in &broken {
        terminal::eprintln(escape(&format!("{}: failed: {error:#}", file.display())));
        code = ExitCode::FAILURE;
    }
    for (_, file, _, report) in &reports {
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

/// Records how the job ended in its recording row.
async fn settle(store: &dyn Store, id: &str, report: &JobReport) -> Result<(), StoreError> {
    match report.status {
        JobStatus::Succeeded => {
            let completed = store.get(id).await?.is_some_and(|r| r.status == RecordingStatus::Completed);
            if !completed {
                let outputs = serde_json::to_value(report.outputs()).unwrap_or_default();
                store.persist(id, None, &outputs).await?;
            }
        }
        JobStatus::Failed => {
            let failure = report.failure.as_ref();
            let reason = failure.map_or_else(
                || "failed".to_string(),
                |f| match &f.stage {
                    Some(stage) => format!("stage `{stage}`: {}", f.message),
                    None => f.message.clone(),
                },
            );
            store.set_status(id, RecordingStatus::Failed, Some("failed"), Some(&reason)).await?;
        }
        JobStatus::Cancelled => {
            store.set_status(id, RecordingStatus::Cancelled, Some("cancelled"), None).await?;
        }
    }
    Ok(())
}

/// One report per file: `<stem>.json` in `out`, or on stdout (an object for one file, an array for several).
fn write_reports(reports: &[(usize, PathBuf, String, JobReport)], out: Option<&Path>) -> anyhow::Result<()> {
    let documents: Vec<Value> = reports
        .iter()
        // A file name need not be UTF-8; the report shows it with U+FFFD where it is not.
        .map(|(_, file, recording, report)| {
            json!({ "file": file.to_string_lossy(), "recording_id": recording, "report": report })
        })
        .collect();
    let Some(out) = out else {
        let text = match documents.as_slice() {
            [one] => serde_json::to_string_pretty(one)?,
            many => serde_json::to_string_pretty(many)?,
        };
        terminal::println(text)?;
        return Ok(());
    };
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut used = std::collections::HashSet::new();
    for ((_, file, ..), document) in reports.iter().zip(documents) {
        let stem = file.file_stem().map_or_else(|| "report".into(), |stem| stem.to_string_lossy().into_owned());
        let name =
            (1..).map(|n| if n == 1 { stem.clone() } else { format!("{stem}-{n}") }).find(|n| used.insert(n.clone()));
        let path = out.join(format!("{}.json", name.unwrap_or(stem)));
        std::fs::write(&path, serde_json::to_string_pretty(&document)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
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
        let message = match update.stage {
            Some(stage) if !stage.is_empty() => format!("{stage}: {}", update.message),
            _ => update.message,
        };
        // Messages can quote a program's stderr; the bar shows them escaped.
        self.0.set_message(escape(&message).into_owned());
    }
}
