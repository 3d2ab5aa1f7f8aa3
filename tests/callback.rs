//! Callbacks against a receiver on loopback: a job that ends calls back once with a signature the receiver can
//! check, a 5xx or a timeout is retried, a 4xx or a redirect is not, an internal address is refused unless
//! allow-listed, nothing is sent without a secret, and the secret never reaches a log. Workers run on the
//! memory queue with command-plugin pipelines (no AI needed). Every wait is bounded.

mod support;

use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use echo_worker::callback::{CallbackError, CallbackSettings, Callbacks};
use echo_worker::catalog::Catalog;
use echo_worker::config::{SecretUrl, Settings};
use echo_worker::ending::Endings;
use echo_worker::engine::{Engine, StageRegistry};
use echo_worker::job::checkpoint::MemoryCheckpoints;
use echo_worker::net::AddressPolicy;
use echo_worker::queue::memory::MemoryQueue;
use echo_worker::queue::{CancelOutcome, Job, NewJob, Queue, WorkerInfo};
use echo_worker::secret::Secret;
use echo_worker::store::{NewRecording, RecordingStatus, Store};
use echo_worker::units::HumanDuration;
use echo_worker::worker::{Worker, WorkerOptions};
use serde_json::Value;
use support::hook::{Answer, Receiver, answer, verify};
use tokio_util::sync::CancellationToken;

const SECRET: &str = "whsec_marker_7f3a9c";

/// Settings for one test: SQLite and work directories in `dir`, a fast retry schedule, a secret.
fn settings(dir: &std::path::Path, secret: Option<&str>, allow: &[String]) -> Settings {
    let mut settings = Settings::default();
    settings.database.url = SecretUrl::new(format!("sqlite://{}", dir.join("echo.db").display()));
    settings.paths.temp_dir = dir.join("work");
    std::fs::create_dir_all(&settings.paths.temp_dir).unwrap();
    settings.download.allow_private = allow.to_vec();
    settings.callback = CallbackSettings {
        secret: secret.map(Secret::new),
        attempts: 3,
        timeout: HumanDuration(Duration::from_secs(2)),
        backoff: HumanDuration(Duration::from_millis(100)),
        max_backoff: HumanDuration(Duration::from_millis(400)),
    };
    settings
}

/// Pipelines `ok` (a command that prints JSON) and `bad` (a command that fails for good).
fn catalog(dir: &std::path::Path) -> (Catalog, PathBuf, PathBuf) {
    let (pipelines, plugins) = (dir.join("pipelines"), dir.join("plugins"));
    std::fs::create_dir_all(&pipelines).unwrap();
    std::fs::create_dir_all(&plugins).unwrap();
    for (name, script) in [("ok", "echo '{\"ok\": true}'\n"), ("bad", "echo 'the input is unusable' >&2\nexit 2\n")] {
        let path = plugins.join(format!("{name}.sh"));
        std::fs::write(&path, format!("#!/bin/sh\n{script}")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(
            plugins.join(format!("{name}.toml")),
            format!("name = \"{name}\"\nkind = \"command\"\n[command]\nprogram = \"{name}.sh\"\nargs = []\n"),
        )
        .unwrap();
        std::fs::write(
            pipelines.join(format!("{name}.toml")),
            format!("name = \"{name}\"\n[stages.run]\nuses = \"{name}\"\nretry = {{ max_attempts = 1 }}\n"),
        )
        .unwrap();
    }
    (Catalog::load(&pipelines, &plugins).unwrap(), pipelines, plugins)
}

/// A one-attempt job of `pipeline` for `recording` that calls back `url`.
fn job_calling_back(catalog: &Catalog, pipeline: &str, recording: &str, url: &str) -> NewJob {
    NewJob {
        pipeline: pipeline.into(),
        definition: echo_worker::definition::of(catalog, pipeline).unwrap(),
        recording_id: Some(recording.to_string()),
        source: None,
        trusted_source: false,
        params: serde_json::Map::new(),
        priority: 0,
        max_attempts: 1,
        delay: None,
        idempotency_key: None,
        callback_url: Some(url.into()),
    }
}

/// A worker with callbacks on a fresh memory queue, the job it was given, and the job once it ended.
async fn run_one(
    settings: &Settings,
    dir: &std::path::Path,
    pipeline: &str,
    callback_url: &str,
) -> (Arc<MemoryQueue>, Job) {
    let (catalog, pipelines, plugins) = catalog(dir);
    let queue = Arc::new(MemoryQueue::new(settings.queue.settings()));
    let store = echo_worker::app::store(settings).await.unwrap();
    let kinds = echo_worker::app::kinds(settings, store.clone()).await.unwrap();
    let engine = Engine::new(StageRegistry::new(), Arc::new(MemoryCheckpoints::default()), settings.engine());
    let options = WorkerOptions {
        concurrency: 1,
        lease: settings.queue.settings().lease,
        shutdown_grace: Duration::from_secs(1),
        pipelines_dir: pipelines,
        plugins_dir: plugins,
    };
    let callbacks = echo_worker::app::callbacks(settings).unwrap();
    let worker = Worker::new(queue.clone(), store, engine, kinds, options).with_callbacks(callbacks.clone());
    let stop = CancellationToken::new();
    let task = tokio::spawn(worker.run(stop.clone(), CancellationToken::new()));
    let recording = format!("rec-{}", uuid::Uuid::new_v4().simple());
    let job = job_calling_back(&catalog, pipeline, &recording, callback_url);
    let id = queue.enqueue(job).await.unwrap().id().to_string();
    let mut ended = None;
    for _ in 0..300 {
        let job = queue.get(&id).await.unwrap().unwrap();
        if job.state.is_final() {
            ended = Some(job);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ended = ended.expect("the job ends within 15 s");
    // Let the callback task finish (bounded by its attempts), then stop the worker.
    stop.cancel();
    task.await.unwrap();
    callbacks.finish(Duration::from_secs(10)).await;
    (queue, ended)
}

async fn log_lines(queue: &MemoryQueue, id: &str) -> Vec<String> {
    queue.logs(id).await.unwrap().into_iter().map(|line| line.line).collect()
}

fn allow(receiver: &Receiver) -> Vec<String> {
    vec![format!("127.0.0.1:{}", receiver.port)]
}

#[tokio::test]
async fn a_completed_job_calls_back_once_with_a_valid_signature() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(&[]).await;
    let settings = settings(dir.path(), Some(SECRET), &allow(&receiver));
    let (queue, job) = run_one(&settings, dir.path(), "ok", &receiver.url()).await;
    assert_eq!(job.state.name(), "completed");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let calls = receiver.calls();
    assert_eq!(calls.len(), 1, "exactly one call");
    verify(&calls[0], SECRET);
    let body: Value = serde_json::from_slice(&calls[0].body).unwrap();
    assert_eq!(body["event"], "job.completed");
    assert_eq!(body["jobId"], job.id.as_str());
    assert_eq!(body["recordingId"], job.spec.recording_id.clone().unwrap().as_str());
    assert_eq!(body["pipeline"], "ok");
    assert_eq!(body["state"], "completed");
    assert_eq!(body["attempts"], 1);
    assert_eq!(body["error"], Value::Null);
    assert_eq!(body["stages"]["run"], "succeeded");
    assert!(body["finishedAt"].as_str().unwrap().ends_with('Z'), "{body}");
    assert_eq!(calls[0].headers["x-echo-event"], "job.completed");
    assert!(calls[0].headers["x-echo-delivery"].to_str().unwrap().starts_with(&job.id));
    let lines = log_lines(&queue, &job.id).await;
    let delivered = lines.iter().find(|line| line.starts_with("callback delivered")).expect("the log says so");
    assert!(delivered.contains("answered 200 after 1 attempt(s)"), "{delivered}");
    assert!(!delivered.contains("receiver-query-token"), "the URL's query is not logged: {delivered}");
}

#[tokio::test]
async fn a_failed_job_calls_back_with_its_error() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(&[]).await;
    let settings = settings(dir.path(), Some(SECRET), &allow(&receiver));
    let (_, job) = run_one(&settings, dir.path(), "bad", &receiver.url()).await;
    assert_eq!(job.state.name(), "failed");
    let calls = receiver.until_calls(1).await;
    assert_eq!(calls.len(), 1);
    verify(&calls[0], SECRET);
    let body: Value = serde_json::from_slice(&calls[0].body).unwrap();
    assert_eq!(body["event"], "job.failed");
    assert_eq!(body["state"], "failed");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("the input is unusable"), "the error says why: {error}");
}

#[tokio::test]
async fn a_callback_answered_500_is_retried_with_the_same_delivery_id() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(&[answer(500), answer(503)]).await;
    let settings = settings(dir.path(), Some(SECRET), &allow(&receiver));
    let (queue, job) = run_one(&settings, dir.path(), "ok", &receiver.url()).await;
    let calls = receiver.until_calls(3).await;
    assert_eq!(calls.len(), 3, "two failures, then delivered");
    for call in &calls {
        verify(call, SECRET);
    }
    let ids: Vec<&str> = calls.iter().map(|call| call.headers["x-echo-delivery"].to_str().unwrap()).collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "one delivery id for every attempt: {ids:?}");
    assert_eq!(calls[0].body, calls[2].body, "the same body every time");
    let lines = log_lines(&queue, &job.id).await;
    assert!(
        lines.iter().any(|l| l.contains("attempt 1 of 3 answered 500 Internal Server Error; next in")),
        "{lines:?}"
    );
    assert!(lines.iter().any(|l| l.contains("answered 200 after 3 attempt(s)")), "{lines:?}");
}

#[tokio::test]
async fn a_callback_is_refused_for_a_private_address_unless_allow_listed() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(&[]).await;
    let settings = settings(dir.path(), Some(SECRET), &[]);
    let (queue, job) = run_one(&settings, dir.path(), "ok", &receiver.url()).await;
    assert_eq!(job.state.name(), "completed", "a refused callback does not fail the job");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(receiver.calls().is_empty(), "nothing reached the receiver");
    let lines = log_lines(&queue, &job.id).await;
    let refused = lines.iter().find(|line| line.starts_with("callback not delivered")).expect("the log says why");
    assert!(refused.contains("is an internal address (127.0.0.1) and is not allow-listed"), "{refused}");

    // Allow-listed on another port only: still refused.
    let other = vec![format!("127.0.0.1:{}", receiver.port.wrapping_add(1).max(1))];
    let dir = tempfile::tempdir().unwrap();
    let (queue, job) = run_one(&settings_with(dir.path(), &other), dir.path(), "ok", &receiver.url()).await;
    assert!(receiver.calls().is_empty());
    let lines = log_lines(&queue, &job.id).await;
    assert!(lines.iter().any(|l| l.contains(&format!("not allow-listed on port {}", receiver.port))), "{lines:?}");
}

fn settings_with(dir: &std::path::Path, allow: &[String]) -> Settings {
    settings(dir, Some(SECRET), allow)
}

#[tokio::test]
async fn without_a_secret_no_callback_is_sent_and_the_log_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(&[]).await;
    let settings = settings(dir.path(), None, &allow(&receiver));
    let (queue, job) = run_one(&settings, dir.path(), "ok", &receiver.url()).await;
    assert_eq!(job.state.name(), "completed");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(receiver.calls().is_empty());
    let lines = log_lines(&queue, &job.id).await;
    assert!(lines.iter().any(|l| l.starts_with("callback not sent: callback.secret")), "{lines:?}");
}

/// A sender straight to the receiver, for the retry rules.
fn sender(receiver: &Receiver, attempts: u32, timeout: Duration) -> Callbacks {
    let settings = CallbackSettings {
        secret: Some(Secret::new(SECRET)),
        attempts,
        timeout: HumanDuration(timeout),
        backoff: HumanDuration(Duration::from_millis(50)),
        max_backoff: HumanDuration(Duration::from_millis(200)),
    };
    Callbacks::new(settings, AddressPolicy::allowing([allow(receiver)[0].as_str()]).unwrap()).unwrap()
}

#[tokio::test]
async fn a_4xx_answer_is_not_retried_but_408_and_429_are() {
    let receiver = Receiver::start(&[answer(404)]).await;
    let error = sender(&receiver, 5, Duration::from_secs(2))
        .deliver(&receiver.url(), "job.completed", "d-1", b"{}", None)
        .await
        .unwrap_err();
    assert_eq!(error, CallbackError::Rejected { url: format!("http://127.0.0.1:{}/hook", receiver.port), status: 404 });
    assert_eq!(receiver.calls().len(), 1);

    let receiver = Receiver::start(&[
        answer(408),
        Answer { status: 429, header: Some(("retry-after", "0")), delay: Duration::ZERO },
    ])
    .await;
    let done = sender(&receiver, 5, Duration::from_secs(2))
        .deliver(&receiver.url(), "job.completed", "d-2", b"{}", None)
        .await;
    assert_eq!(done.unwrap().attempts, 3);
}

#[tokio::test]
async fn a_receiver_that_does_not_answer_in_time_is_retried_until_attempts_run_out() {
    let slow = Answer { status: 200, header: None, delay: Duration::from_secs(3) };
    let receiver = Receiver::start(&[slow, slow]).await;
    let error = sender(&receiver, 2, Duration::from_millis(300))
        .deliver(&receiver.url(), "job.completed", "d-3", b"{}", None)
        .await
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "the callback to http://127.0.0.1:{}/hook failed after 2 attempt(s); the last: no answer within 300ms",
            receiver.port
        )
    );
    assert_eq!(receiver.calls().len(), 2);
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let to = Answer { status: 307, header: Some(("location", "/elsewhere")), delay: Duration::ZERO };
    let receiver = Receiver::start(&[to]).await;
    let error = sender(&receiver, 3, Duration::from_secs(2))
        .deliver(&receiver.url(), "job.completed", "d-4", b"{}", None)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("callbacks do not follow redirects"), "{error}");
    assert_eq!(receiver.calls().len(), 1, "the body went nowhere else");
}

/// Collects what tracing prints while a test runs (on this thread: the test runtime is single-threaded).
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn the_secret_never_reaches_a_log() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(&[answer(500), answer(500), answer(500)]).await;
    let settings = settings(dir.path(), Some(SECRET), &allow(&receiver));
    tracing::info!(settings = ?settings, callback = ?settings.callback, "settings in use");
    let (queue, job) = run_one(&settings, dir.path(), "ok", &receiver.url()).await;
    assert_eq!(receiver.until_calls(3).await.len(), 3, "every attempt failed");
    let lines = log_lines(&queue, &job.id).await;
    assert!(lines.iter().any(|l| l.starts_with("callback not delivered")), "{lines:?}");

    let printed = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(printed.contains("callback not delivered"), "the failure was logged: {printed}");
    assert!(printed.contains("settings in use"));
    assert!(!printed.contains(SECRET), "the secret is in the process log:\n{printed}");
    assert!(!lines.join("\n").contains(SECRET), "the secret is in the job log: {lines:?}");
    assert!(!settings.to_toml().contains(SECRET), "`echo-worker config` would print the secret");
}

/// A job with `callback_url` on pipeline `ok`, for a recording registered in `store`.
async fn queued_with_row(queue: &MemoryQueue, store: &dyn Store, dir: &std::path::Path, url: &str) -> (String, String) {
    let (catalog, _, _) = catalog(dir);
    let recording = format!("rec-{}", uuid::Uuid::new_v4().simple());
    store.register(&NewRecording { id: recording.clone(), ..NewRecording::default() }).await.unwrap();
    let job = job_calling_back(&catalog, "ok", &recording, url);
    (queue.enqueue(job).await.unwrap().id().to_string(), recording)
}

#[tokio::test]
async fn a_job_cancelled_before_it_ran_calls_back_once_and_its_row_says_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(&[]).await;
    let settings = settings(dir.path(), Some(SECRET), &allow(&receiver));
    let queue = Arc::new(MemoryQueue::new(settings.queue.settings()));
    let store = echo_worker::app::store(&settings).await.unwrap();
    let callbacks = echo_worker::app::callbacks(&settings).unwrap();
    let endings = Endings::new(queue.clone(), store.clone(), Some(callbacks));
    let (id, recording) = queued_with_row(&queue, store.as_ref(), dir.path(), &receiver.url()).await;

    // Not ended yet: nothing is said.
    endings.ended(&id).await;
    assert_eq!(store.get(&recording).await.unwrap().unwrap().status, RecordingStatus::Pending);

    assert_eq!(queue.cancel(&id).await.unwrap(), CancelOutcome::Cancelled);
    endings.ended(&id).await;
    endings.finish(Duration::from_secs(10)).await;
    let calls = receiver.calls();
    assert_eq!(calls.len(), 1, "exactly one call");
    verify(&calls[0], SECRET);
    let body: Value = serde_json::from_slice(&calls[0].body).unwrap();
    assert_eq!((body["event"].as_str(), body["state"].as_str()), (Some("job.cancelled"), Some("cancelled")));
    assert_eq!(body["jobId"], id.as_str());
    assert_eq!(body["attempts"], 0, "it never ran");
    assert_eq!(store.get(&recording).await.unwrap().unwrap().status, RecordingStatus::Cancelled);
    assert!(log_lines(&queue, &id).await.iter().any(|line| line.starts_with("callback delivered")));
}

#[tokio::test]
async fn a_job_failed_by_stall_recovery_is_called_back_once_by_the_worker_that_recovered_it() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(&[]).await;
    let mut settings = settings(dir.path(), Some(SECRET), &allow(&receiver));
    settings.queue.lease = HumanDuration(Duration::from_millis(300));
    settings.queue.max_stalls = 0;
    let (_, pipelines, plugins) = catalog(dir.path());
    let queue = Arc::new(MemoryQueue::new(settings.queue.settings()));
    let store = echo_worker::app::store(&settings).await.unwrap();
    let (id, recording) = queued_with_row(&queue, store.as_ref(), dir.path(), &receiver.url()).await;
    // A worker takes the job and dies: it never renews, completes or reports.
    let dead = WorkerInfo {
        id: "dead-worker".into(),
        host: "gone".into(),
        pid: 1,
        version: "0".into(),
        concurrency: 1,
        running: 1,
        last_heartbeat: 0,
    };
    assert_eq!(queue.take(&dead, Duration::from_secs(1)).await.unwrap().unwrap().job.id, id);

    // Two live workers recover stalled jobs side by side; the one whose recovery failed the job reports it.
    let mut running = Vec::new();
    let stop = CancellationToken::new();
    let mut all_callbacks = Vec::new();
    for _ in 0..2 {
        let kinds = echo_worker::app::kinds(&settings, store.clone()).await.unwrap();
        let engine = Engine::new(StageRegistry::new(), Arc::new(MemoryCheckpoints::default()), settings.engine());
        let options = WorkerOptions {
            concurrency: 1,
            lease: settings.queue.settings().lease,
            shutdown_grace: Duration::from_secs(1),
            pipelines_dir: pipelines.clone(),
            plugins_dir: plugins.clone(),
        };
        let callbacks = echo_worker::app::callbacks(&settings).unwrap();
        all_callbacks.push(callbacks.clone());
        let worker = Worker::new(queue.clone(), store.clone(), engine, kinds, options).with_callbacks(callbacks);
        running.push(tokio::spawn(worker.run(stop.clone(), CancellationToken::new())));
    }
    let calls = receiver.until_calls(1).await;
    // Room for a second, wrong call to arrive before counting.
    tokio::time::sleep(Duration::from_millis(600)).await;
    stop.cancel();
    for task in running {
        task.await.unwrap();
    }
    for callbacks in all_callbacks {
        callbacks.finish(Duration::from_secs(5)).await;
    }
    assert_eq!(receiver.calls().len(), 1, "exactly one call: {:?}", receiver.calls().len());
    verify(&calls[0], SECRET);
    let body: Value = serde_json::from_slice(&calls[0].body).unwrap();
    assert_eq!((body["event"].as_str(), body["state"].as_str()), (Some("job.failed"), Some("failed")));
    let error = body["error"].as_str().unwrap_or_default();
    assert!(error.contains("stalled"), "the callback says why: {error}");
    let row = store.get(&recording).await.unwrap().unwrap();
    assert_eq!(row.status, RecordingStatus::Failed);
    assert!(row.error.as_deref().unwrap_or_default().contains("stalled"), "the row says why: {:?}", row.error);
}
