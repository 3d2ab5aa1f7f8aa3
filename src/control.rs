//! The queue commands: `enqueue` (with `--wait`), `jobs`, `job`, `cancel`, `retry`, `pause`, `resume`, `stats`
//! and `clean`, on the Redis queue that workers read (`REDIS_URL`). This is wiring (arguments to queue calls,
//! results to the terminal), so it speaks `anyhow`. Every command prints text for people, or one JSON document
//! with `--format json`.
//!
//! `enqueue` goes through `crate::intake`, as the API does: a recording row per source (status `queued`) is
//! registered before the job exists, so that a worker never finds a row missing or sees it flip back to
//! queued, and URLs are checked against the download rules. Local paths are trusted sources (as with
//! `process`), which works only where the workers can read the same path: with workers on other machines the
//! source must be a URL or a path on shared storage.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Value, json};

use crate::app;
use crate::catalog::Catalog;
use crate::config::Settings;
use crate::ending::Endings;
use crate::intake::{Intake, Submission};
use crate::queue::{CancelOutcome, EventKind, Job, JobState, Queue};
use crate::store::{RecordingStatus, Store};
use crate::terminal::{self, escape};
use crate::units::HumanDuration;

/// File extensions `enqueue DIR` picks up (the worker's `validate` still checks the bytes).
const MEDIA_EXTENSIONS: [&str; 22] = [
    "aac", "aif", "aiff", "amr", "avi", "flac", "m4a", "m4v", "mkv", "mov", "mp3", "mp4", "mpeg", "mpg", "oga", "ogg",
    "opus", "wav", "webm", "wma", "3gp", "mka",
];
/// How long `--wait` blocks on the event stream per read.
const EVENT_WAIT: Duration = Duration::from_secs(2);
/// How often `--wait` also reads the jobs themselves, in case the capped stream dropped an event it needed.
const RECHECK: Duration = Duration::from_secs(5);
/// How long `cancel` waits for the callback of a job it cancelled before it ran (its retries included) before
/// exiting; the job's log says when one was abandoned.
const CALLBACK_WAIT: Duration = Duration::from_secs(30);

/// What `echo-worker enqueue` was asked to do.
#[derive(Debug, Clone)]
pub struct EnqueueRequest {
    /// Files, folders (their media files) and URLs.
    pub inputs: Vec<String>,
    /// The pipeline's name.
    pub pipeline: String,
    /// Lower runs sooner.
    pub priority: i32,
    /// `job.params`.
    pub params: serde_json::Map<String, Value>,
    /// Follow every job to its end.
    pub wait: bool,
    /// One JSON document on stdout.
    pub json: bool,
    /// Folder of pipeline files.
    pub pipelines: PathBuf,
    /// Folder of plugin files.
    pub plugins: PathBuf,
}

/// One source to enqueue.
#[derive(Debug, Clone)]
struct Source {
    /// As the user named it (for messages).
    shown: String,
    /// What the job carries.
    source: String,
    /// A local path typed here.
    trusted: bool,
    file_name: Option<String>,
    size: Option<i64>,
}

fn is_url(input: &str) -> bool {
    input
        .split_once("://")
        .is_some_and(|(scheme, _)| !scheme.is_empty() && scheme.chars().all(|c| c.is_ascii_alphanumeric() || c == '+'))
}

fn local(path: &Path, shown: String) -> anyhow::Result<Source> {
    let absolute = std::path::absolute(path).with_context(|| format!("cannot resolve {}", path.display()))?;
    let Some(text) = absolute.to_str() else {
        bail!("{}: the path is not valid UTF-8; rename the file to enqueue it", path.display());
    };
    let metadata = std::fs::metadata(&absolute).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(Source {
        shown,
        source: text.to_string(),
        trusted: true,
        file_name: absolute.file_name().map(|name| name.to_string_lossy().into_owned()),
        size: i64::try_from(metadata.len()).ok(),
    })
}

/// Files, folders and URLs to sources; a folder gives its media files (by extension, not recursing), sorted.
fn sources(inputs: &[String]) -> anyhow::Result<Vec<Source>> {
    let mut found = Vec::new();
    for input in inputs {
        if is_url(input) {
            let name =
                input.split(['?', '#']).next().and_then(|path| path.rsplit('/').next()).filter(|n| !n.is_empty());
            found.push(Source {
                shown: input.clone(),
                source: input.clone(),
                trusted: false,
                file_name: name.map(str::to_string),
                size: None,
            });
            continue;
        }
        let path = Path::new(input);
        let metadata = std::fs::metadata(path).with_context(|| format!("cannot read {input}"))?;
        if metadata.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("cannot list {input}"))?
                .filter_map(Result::ok)
                .map(|entry| entry.path())
                .filter(|file| file.is_file())
                .filter(|file| {
                    file.extension()
                        .and_then(|e| e.to_str())
                        .is_some_and(|e| MEDIA_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
                })
                .collect();
            files.sort();
            if files.is_empty() {
                bail!("{input} holds no media files (looked for: {})", MEDIA_EXTENSIONS.join(", "));
            }
            for file in files {
                found.push(local(&file, file.display().to_string())?);
            }
        } else if metadata.is_file() {
            found.push(local(path, input.clone())?);
        } else {
            bail!("{input} is neither a file nor a folder");
        }
    }
    Ok(found)
}

/// `echo-worker enqueue`: registers a recording and enqueues a job per source; with `--wait`, follows them.
///
/// # Errors
/// Before anything is enqueued: no `REDIS_URL`, invalid or unknown pipeline, unreadable inputs, an unreachable
/// store or queue.
pub async fn enqueue(settings: &Settings, request: EnqueueRequest) -> anyhow::Result<ExitCode> {
    let queue = app::queue(settings).await?;
    let catalog = Catalog::load(&request.pipelines, &request.plugins)?;
    // An unknown pipeline stops everything before any row is written.
    catalog.pipeline(&request.pipeline)?;
    let sources = sources(&request.inputs)?;
    let store = app::store(settings).await?;
    let policy = settings.source_policy().map_err(anyhow::Error::msg).context("reading download.allow_private")?;
    let intake = Intake::new(queue.clone(), store, policy, settings.queue.max_attempts);
    let submissions = sources
        .iter()
        .map(|source| Submission {
            recording_id: None,
            pipeline: request.pipeline.clone(),
            source: Some(source.source.clone()),
            trusted_source: source.trusted,
            priority: i64::from(request.priority),
            params: request.params.clone(),
            file_name: source.file_name.clone(),
            size_bytes: source.size,
            ..Submission::default()
        })
        .collect();
    let results = intake.submit_many(&catalog, submissions).await?;
    let mut listed = Vec::new();
    let mut followed = Vec::new();
    let mut code = ExitCode::SUCCESS;
    for (source, result) in sources.iter().zip(results) {
        match result {
            Ok(submitted) => {
                let (job_id, recording) = (submitted.job_id, submitted.recording_id);
                listed.push(json!({ "file": source.shown, "job_id": job_id, "recording_id": recording, "existing": !submitted.created }));
                if !request.json {
                    terminal::println(escape(&format!("{}: job {job_id} (recording {recording})", source.shown)))?;
                }
                followed.push((source.shown.clone(), job_id));
            }
            Err(error) => {
                let reason = error.to_string();
                listed.push(json!({ "file": source.shown, "error": reason }));
                terminal::eprintln(escape(&format!("{}: not enqueued: {reason}", source.shown)));
                code = ExitCode::FAILURE;
            }
        }
    }
    if !request.wait {
        if request.json {
            terminal::println(serde_json::to_string_pretty(&listed)?)?;
        }
        return Ok(code);
    }
    let waited = follow(queue, &followed, request.json).await?;
    Ok(if code == ExitCode::SUCCESS { waited } else { code })
}

/// Follows jobs from the event stream with a progress bar each until every one has ended (or Ctrl-C, which
/// leaves them running). Exit code 0 when all completed, 1 when any failed or was cancelled, 130 on Ctrl-C.
async fn follow(queue: Arc<dyn Queue>, jobs: &[(String, String)], json: bool) -> anyhow::Result<ExitCode> {
    let bars = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template("{prefix:20!} [{bar:20}] {pos:>3}% {elapsed:>4} {wide_msg}")
        .expect("the template is valid")
        .progress_chars("=> ");
    let mut open: BTreeMap<String, (String, ProgressBar)> = BTreeMap::new();
    let mut earliest = u64::MAX;
    for (shown, id) in jobs {
        let bar = bars.add(ProgressBar::new(100));
        bar.set_style(style.clone());
        bar.set_prefix(escape(shown).into_owned());
        bar.set_message("queued");
        if let Some(job) = queue.get(id).await? {
            earliest = earliest.min(job.created_at);
        }
        open.insert(id.clone(), (shown.clone(), bar));
    }
    // Every event of these jobs comes after the first was created.
    let mut after = (earliest != u64::MAX).then(|| earliest.saturating_sub(1).to_string());
    let mut ended: Vec<(String, Job)> = Vec::new();
    let mut last_check = tokio::time::Instant::now();
    let interrupted = loop {
        if open.is_empty() {
            break false;
        }
        let read = tokio::select! {
            read = queue.events(after.as_deref(), 500, EVENT_WAIT) => read,
            _ = tokio::signal::ctrl_c() => break true,
        };
        let mut finals = Vec::new();
        match read {
            Ok(events) => {
                for event in events {
                    after = Some(event.id.clone());
                    let Some((_, bar)) = open.get(&event.job_id) else { continue };
                    match event.kind {
                        EventKind::Progress(progress) => {
                            bar.set_position(u64::from(progress.percent));
                            let stage = progress.stage.map(|s| format!("{s}: ")).unwrap_or_default();
                            bar.set_message(escape(&format!("{stage}{}", progress.message)).into_owned());
                        }
                        EventKind::Stage { stage, status } => bar.set_message(format!("{stage} {status}")),
                        EventKind::State { state, reason } => {
                            let why = reason.map(|r| format!(": {r}")).unwrap_or_default();
                            bar.set_message(escape(&format!("{state}{why}")).into_owned());
                            if state.is_final() {
                                finals.push(event.job_id.clone());
                            }
                        }
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, "reading the event stream failed; trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        if last_check.elapsed() >= RECHECK {
            last_check = tokio::time::Instant::now();
            finals.extend(open.keys().cloned());
        }
        for id in finals {
            if let Ok(Some(job)) = queue.get(&id).await
                && job.state.is_final()
                && let Some((shown, bar)) = open.remove(&id)
            {
                if job.state == JobState::Completed {
                    bar.set_position(100);
                }
                bar.finish_with_message(job.state.to_string());
                ended.push((shown, job));
            }
        }
    };
    if interrupted {
        for (_, bar) in open.values() {
            bar.abandon();
        }
        terminal::eprintln("stopped following; the jobs go on (see `echo-worker jobs`)");
        return Ok(ExitCode::from(130));
    }
    let mut code = ExitCode::SUCCESS;
    for (shown, job) in &ended {
        match job.state {
            JobState::Completed => {}
            JobState::Cancelled => {
                terminal::eprintln(escape(&format!("{shown}: cancelled")));
                code = ExitCode::FAILURE;
            }
            _ => {
                let reason = job.error.as_deref().unwrap_or("no reason recorded");
                terminal::eprintln(escape(&format!("{shown}: failed: {reason}")));
                code = ExitCode::FAILURE;
            }
        }
    }
    if json {
        let documents: Vec<Value> = ended
            .iter()
            .map(|(shown, job)| json!({ "file": shown, "job_id": job.id, "state": job.state, "error": job.error, "result": job.result }))
            .collect();
        terminal::println(serde_json::to_string_pretty(&documents)?)?;
    }
    Ok(code)
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `12 s ago`, `3m ago`: a queue time relative to this machine's clock.
fn ago(at: u64) -> String {
    let seconds = now_ms().saturating_sub(at) / 1000;
    format!("{} ago", HumanDuration(Duration::from_secs(seconds)))
}

/// `echo-worker jobs [--state STATE]`: the jobs in one state, or in every state.
///
/// # Errors
/// No `REDIS_URL`; the queue cannot be reached.
pub async fn jobs(settings: &Settings, state: Option<JobState>, limit: usize, json: bool) -> anyhow::Result<ExitCode> {
    let queue = app::queue(settings).await?;
    let states: Vec<JobState> = state.map_or_else(|| JobState::ALL.to_vec(), |state| vec![state]);
    let mut found = Vec::new();
    for state in states {
        found.extend(queue.list(state, None, limit.max(1)).await?.jobs);
    }
    if json {
        terminal::println(serde_json::to_string_pretty(&found)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    if found.is_empty() {
        terminal::println("no jobs")?;
    }
    for job in &found {
        let progress = job.progress.as_ref().map(|p| format!(" {}%", p.percent)).unwrap_or_default();
        let source = job.spec.source.as_deref().unwrap_or("-");
        let line = format!(
            "{}  {:<9}{progress}  {}  attempt {}/{}  {}  created {}",
            job.id,
            job.state,
            job.spec.pipeline,
            job.attempts,
            job.spec.max_attempts,
            source,
            ago(job.created_at)
        );
        terminal::println(escape(&line))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `echo-worker job ID`: the job, its stages (state, attempts, duration) and its log.
///
/// # Errors
/// No `REDIS_URL`; no such job; the queue cannot be reached.
pub async fn job(settings: &Settings, id: &str, json: bool) -> anyhow::Result<ExitCode> {
    let queue = app::queue(settings).await?;
    let Some(job) = queue.get(id).await? else { bail!("no job with id {id}") };
    let report = match &job.result {
        Some(result) => Some(result.clone()),
        None => queue.checkpoints(id).await?.remove(crate::worker::REPORT_KEY).map(|output| output.value),
    };
    let logs = queue.logs(id).await?;
    if json {
        let stages = report.as_ref().map(|report| report["stages"].clone());
        let document = json!({ "job": job, "stages": stages, "failure": report.as_ref().map(|r| r["failure"].clone()), "logs": logs });
        terminal::println(serde_json::to_string_pretty(&document)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut text = format!(
        "job {}: {} (pipeline {}, attempt {} of {}, stalls {})",
        job.id, job.state, job.spec.pipeline, job.attempts, job.spec.max_attempts, job.stalls
    );
    if let Some(source) = &job.spec.source {
        text.push_str(&format!("\n  source: {source}"));
    }
    if let Some(recording) = &job.spec.recording_id {
        text.push_str(&format!("\n  recording: {recording}"));
    }
    text.push_str(&format!("\n  created {}", ago(job.created_at)));
    if let Some(at) = job.started_at {
        text.push_str(&format!(", started {}", ago(at)));
    }
    if let Some(at) = job.finished_at {
        text.push_str(&format!(", ended {}", ago(at)));
    }
    if let Some(worker) = &job.worker {
        text.push_str(&format!("\n  worker: {worker}"));
    }
    if let Some(progress) = &job.progress
        && !job.state.is_final()
    {
        let stage = progress.stage.as_deref().map(|s| format!(" {s}:")).unwrap_or_default();
        text.push_str(&format!("\n  progress: {}%{stage} {}", progress.percent, progress.message));
    }
    if let Some(error) = &job.error {
        text.push_str(&format!("\n  error: {error}"));
    }
    if job.cancel_requested {
        text.push_str("\n  a cancel was asked; its worker is stopping it");
    }
    if let Some(stages) = report.as_ref().and_then(|report| report["stages"].as_object()) {
        text.push_str("\nstages (last attempt):");
        for (stage, outcome) in stages {
            let status = outcome["status"].as_str().unwrap_or("?");
            let attempts = outcome["attempts"].as_u64().unwrap_or(0);
            let took =
                outcome["duration_ms"].as_u64().map(|ms| format!("  {:.1} s", ms as f64 / 1000.0)).unwrap_or_default();
            let reason = outcome["reason"].as_str().map(|r| format!("  {r}")).unwrap_or_default();
            text.push_str(&format!("\n  {stage:<16} {status:<10} {attempts} attempt(s){took}{reason}"));
        }
    }
    if !logs.is_empty() {
        text.push_str("\nlog:");
        for line in &logs {
            text.push_str(&format!("\n  {}  {}", ago(line.at), line.line));
        }
    }
    terminal::println(escape(&text))?;
    Ok(ExitCode::SUCCESS)
}

/// Marks a recording row; a failure is only logged (the queue is what counts here).
async fn mark(store: &dyn Store, recording: Option<&str>, status: RecordingStatus, message: &str) {
    if let Some(recording) = recording
        && let Err(error) = store.set_status(recording, status, Some(message), None).await
    {
        tracing::warn!(recording, %error, "could not update the recording row");
    }
}

/// `echo-worker cancel ID`.
///
/// # Errors
/// No `REDIS_URL`; no such job; the queue cannot be reached.
pub async fn cancel(settings: &Settings, id: &str, json: bool) -> anyhow::Result<ExitCode> {
    let queue = app::queue(settings).await?;
    let outcome = queue.cancel(id).await?;
    let (name, text) = match outcome {
        CancelOutcome::Cancelled => ("cancelled", format!("job {id} cancelled")),
        CancelOutcome::Requested => {
            ("requested", format!("job {id} is running: its worker was asked to stop it (within 2 s)"))
        }
        CancelOutcome::AlreadyFinal(state) => ("already_final", format!("job {id} had already ended: {state}")),
    };
    if outcome == CancelOutcome::Cancelled {
        // No worker will report this job's end: its row and callback are this command's to send.
        let endings = Endings::new(queue.clone(), app::store(settings).await?, Some(app::callbacks(settings)?));
        endings.ended(id).await;
        endings.finish(CALLBACK_WAIT).await;
    }
    if json {
        terminal::println(json!({ "job_id": id, "outcome": name }))?;
    } else {
        terminal::println(escape(&text))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `echo-worker retry ID`, or every failed job (of one pipeline) with `--failed`.
///
/// # Errors
/// No `REDIS_URL`; the job cannot be retried (not failed or cancelled); the queue cannot be reached.
pub async fn retry(
    settings: &Settings,
    id: Option<&str>,
    failed: bool,
    pipeline: Option<&str>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let queue = app::queue(settings).await?;
    let ids = match (id, failed) {
        (Some(id), false) => {
            queue.retry(id).await?;
            vec![id.to_string()]
        }
        (None, true) => queue.retry_failed(pipeline).await?,
        _ => bail!("give a job id, or --failed (with --pipeline NAME to retry one pipeline's failed jobs)"),
    };
    let store = app::store(settings).await?;
    for id in &ids {
        let recording = queue.get(id).await?.and_then(|job| job.spec.recording_id);
        mark(store.as_ref(), recording.as_deref(), RecordingStatus::Queued, "queued again").await;
    }
    if json {
        terminal::println(json!({ "retried": ids }))?;
    } else if ids.is_empty() {
        terminal::println("no failed jobs to retry")?;
    } else {
        for id in &ids {
            terminal::println(format_args!("job {id} queued again"))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `echo-worker pause` and `resume`.
///
/// # Errors
/// No `REDIS_URL`; the queue cannot be reached.
pub async fn pause(settings: &Settings, paused: bool, json: bool) -> anyhow::Result<ExitCode> {
    let queue = app::queue(settings).await?;
    queue.set_paused(paused).await?;
    if json {
        terminal::println(json!({ "paused": paused }))?;
    } else if paused {
        terminal::println("paused: workers take no new jobs (running ones go on) until `echo-worker resume`")?;
    } else {
        terminal::println("resumed: workers take jobs again")?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `echo-worker stats`.
///
/// # Errors
/// No `REDIS_URL`; the queue cannot be reached.
pub async fn stats(settings: &Settings, json: bool) -> anyhow::Result<ExitCode> {
    let queue = app::queue(settings).await?;
    let stats = queue.stats().await?;
    if json {
        terminal::println(serde_json::to_string_pretty(&stats)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let counts: Vec<String> = stats.counts.iter().map(|(state, count)| format!("{state} {count}")).collect();
    let mut text = format!("{}{}", counts.join(", "), if stats.paused { " (paused)" } else { "" });
    text.push_str(&format!("\nworkers: {}", stats.workers.len()));
    for worker in &stats.workers {
        text.push_str(&format!(
            "\n  {} (host {}, pid {}, version {}): {} of {} running, last heartbeat {}",
            worker.id,
            worker.host,
            worker.pid,
            worker.version,
            worker.running,
            worker.concurrency,
            ago(worker.last_heartbeat)
        ));
    }
    let (completed, failed) =
        stats.per_minute.iter().fold((0, 0), |(c, f), minute| (c + minute.completed, f + minute.failed));
    text.push_str(&format!("\nlast hour: {completed} completed, {failed} failed"));
    terminal::println(escape(&text))?;
    Ok(ExitCode::SUCCESS)
}

/// `echo-worker clean --state STATE --older-than AGE`: removes ended jobs, in batches.
///
/// # Errors
/// No `REDIS_URL`; a state that is not final; the queue cannot be reached.
pub async fn clean(settings: &Settings, state: JobState, older_than: Duration, json: bool) -> anyhow::Result<ExitCode> {
    if !state.is_final() {
        bail!("--state must be completed, failed or cancelled (jobs that have ended), not {state}");
    }
    let queue = app::queue(settings).await?;
    const BATCH: usize = 1000;
    let mut removed = 0;
    // Bounded: a million jobs at most per call; run it again for more.
    for _ in 0..1000 {
        let batch = queue.clean(state, older_than, BATCH).await?;
        removed += batch;
        if batch < BATCH as u64 {
            break;
        }
    }
    if json {
        terminal::println(
            json!({ "state": state, "older_than": HumanDuration(older_than).to_string(), "removed": removed }),
        )?;
    } else {
        terminal::println(format_args!("removed {removed} {state} jobs older than {}", HumanDuration(older_than)))?;
    }
    Ok(ExitCode::SUCCESS)
}
