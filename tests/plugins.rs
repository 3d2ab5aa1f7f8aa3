//! The `command` and `http` plugin kinds against real processes and a real HTTP server on loopback:
//! what they send and receive, how failures are classified, and how cancellation stops them.

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use echo_worker::engine::{JobStatus, StageStatus};
use echo_worker::job::progress::NullSink;
use serde_json::{Value, json};
use support::{Bench, job, pipeline};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn a_command_gets_params_on_stdin_and_only_declared_environment() {
    // ECHO_TEST_DECLARED and ECHO_TEST_UNDECLARED come from .cargo/config.toml.
    let bench = Bench::new();
    let pipeline =
        pipeline("[stages.echo]\nuses = \"echo-json\"\nwith = { greeting = \"hello {{ job.params.who }}\" }\n");
    let report = bench.run(&pipeline, job("cmd", json!({ "who": "ada" }))).await;
    assert_eq!(report.status, JobStatus::Succeeded, "{report:?}");
    let output = report.stages["echo"].output.clone().unwrap();
    assert_eq!(output["stdin"], json!({ "greeting": "hello ada", "count": 2 }), "defaults are filled in");
    assert_eq!(output["args"], json!(["HELLO ADA", "2", "declared-value"]));
    assert_eq!(output["declared"], "declared-value");
    assert_eq!(output["undeclared"], Value::Null, "undeclared variables do not reach the program");
    assert_eq!(output["job_id"], "cmd");
    let cwd = output["cwd"].as_str().unwrap();
    assert!(cwd.starts_with(bench.work_root.path().canonicalize().unwrap().to_str().unwrap()), "{cwd}");
}

/// Runs the `exit-with` plugin (3 attempts allowed) with `status`; returns the report and how often it ran.
async fn exit_with(status: u8) -> (echo_worker::engine::JobReport, usize) {
    let bench = Bench::new();
    let dir = tempfile::tempdir().unwrap();
    let count = dir.path().join("runs");
    let pipeline = pipeline(&format!(
        "[stages.exit]\nuses = \"exit-with\"\nretry = {{ max_attempts = 3, initial_interval = \"10ms\" }}\nwith = {{ status = {status}, count_file = \"{}\" }}\n",
        count.display()
    ));
    let report = bench.run(&pipeline, job(&format!("exit{status}"), json!({}))).await;
    (report, std::fs::read_to_string(&count).unwrap().lines().count())
}

#[tokio::test]
async fn a_failing_command_reports_the_tail_of_stderr_and_is_not_retried() {
    let (report, runs) = exit_with(3).await;
    assert_eq!(report.status, JobStatus::Failed);
    let failure = report.failure.unwrap();
    assert_eq!(failure.stage.as_deref(), Some("exit"));
    assert!(
        failure.message.starts_with("plugin `exit-with` exited with status 3: noise that scrolls away"),
        "{}",
        failure.message
    );
    assert!(failure.message.ends_with("the real reason: exit 3 was asked for"), "{}", failure.message);
    assert_eq!(runs, 1);
}

#[tokio::test]
async fn exit_status_75_asks_for_a_retry() {
    let (report, runs) = exit_with(75).await;
    assert_eq!(report.status, JobStatus::Failed);
    assert_eq!(runs, 3, "EX_TEMPFAIL is retried");
    assert!(report.failure.unwrap().retryable);
}

fn process_is_gone(pid: u32) -> bool {
    // A zombie (state Z) has exited and holds no resources but its table entry.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

async fn wait_for_file(path: &std::path::Path) -> String {
    for _ in 0..200 {
        if let Ok(text) = std::fs::read_to_string(path) {
            return text.trim().to_string();
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{} never appeared", path.display());
}

#[tokio::test]
async fn cancelling_kills_the_command_and_its_children_and_removes_the_work_directory() {
    cancel_sleeper(false).await;
}

#[tokio::test]
async fn cancelling_kills_a_command_that_ignores_sigterm() {
    cancel_sleeper(true).await;
}

async fn cancel_sleeper(stubborn: bool) {
    let bench = Bench::new();
    let pids = tempfile::tempdir().unwrap();
    let pipeline = pipeline(&format!(
        "[stages.sleep]\nuses = \"sleeper\"\nwith = {{ pid_dir = \"{}\", stubborn = {stubborn} }}\n",
        pids.path().display()
    ));
    let cancel = CancellationToken::new();
    let running = {
        let (engine, cancel) = (bench.engine.clone(), cancel.clone());
        tokio::spawn(
            async move { engine.run(&pipeline, job("cancel-cmd", json!({})), Arc::new(NullSink), cancel).await },
        )
    };
    let leader: u32 = wait_for_file(&pids.path().join("leader")).await.parse().unwrap();
    let child: u32 = wait_for_file(&pids.path().join("child")).await.parse().unwrap();
    let work_dir = wait_for_file(&pids.path().join("workdir")).await;
    assert!(!process_is_gone(leader) && !process_is_gone(child), "both are running before the cancel");

    let cancelled_at = Instant::now();
    cancel.cancel();
    let report = tokio::time::timeout(Duration::from_secs(10), running).await.unwrap().unwrap().unwrap();
    let took = cancelled_at.elapsed();
    assert_eq!(report.status, JobStatus::Cancelled);
    assert_eq!(report.stages["sleep"].status, StageStatus::Cancelled);
    assert!(took < Duration::from_secs(3), "the job ended {took:?} after the cancel (about a second expected)");
    for _ in 0..40 {
        if process_is_gone(leader) && process_is_gone(child) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(process_is_gone(leader), "the plugin process {leader} is gone");
    assert!(process_is_gone(child), "its `sleep 60` child {child} is gone");
    assert!(!std::path::Path::new(&work_dir).exists(), "{work_dir} was removed");
    println!("cancel (stubborn: {stubborn}) took {took:?}");
}

/// Runs the `escapee` plugin, whose `setsid` daemon keeps stdout open after the plugin exited; returns the
/// report and how long the job took, and kills the daemon.
async fn run_escapee(print: &str) -> (echo_worker::engine::JobReport, Duration) {
    let bench = Bench::new();
    let pids = tempfile::tempdir().unwrap();
    let pipeline = pipeline(&format!(
        "[stages.escape]\nuses = \"escapee\"\nretry = {{ max_attempts = 1 }}\nwith = {{ pid_dir = \"{}\", print = {} }}\n",
        pids.path().display(),
        toml::Value::String(print.to_string())
    ));
    let started = Instant::now();
    let report = bench.run(&pipeline, job("escapee", json!({}))).await;
    let took = started.elapsed();
    let daemon: i32 = wait_for_file(&pids.path().join("daemon")).await.parse().unwrap();
    assert!(!process_is_gone(daemon as u32), "the daemon escaped the process group and still runs");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon), nix::sys::signal::Signal::SIGKILL).unwrap();
    (report, took)
}

#[tokio::test]
async fn a_setsid_daemon_holding_stdout_fails_a_plugin_with_empty_json_output_instead_of_hanging() {
    let (report, took) = run_escapee("").await;
    assert_eq!(report.status, JobStatus::Failed, "{report:?}");
    let failure = report.failure.unwrap();
    assert_eq!(failure.code, echo_worker::error::ErrorCode::EmptyOutput);
    assert_eq!(
        failure.message,
        "plugin `escapee` declares a JSON output but exited with nothing on stdout (a process it started left its \
         process group and kept stdout open)"
    );
    assert!(took < Duration::from_secs(15), "the stage did not wait for the 30 s daemon: {took:?}");
}

#[tokio::test]
async fn a_setsid_daemon_holding_stdout_does_not_erase_the_plugin_output() {
    let (report, took) = run_escapee(r#"{"ok": true}"#).await;
    assert_eq!(report.status, JobStatus::Succeeded, "{report:?}");
    assert_eq!(report.stages["escape"].output, Some(json!({ "ok": true })));
    assert!(took < Duration::from_secs(15), "the stage did not wait for the 30 s daemon: {took:?}");
}

#[tokio::test]
async fn dropping_a_job_run_kills_its_child_process_and_ends_its_tasks() {
    let bench = Bench::new();
    let pids = tempfile::tempdir().unwrap();
    let pipeline = pipeline(&format!(
        "[stages.sleep]\nuses = \"sleeper\"\nwith = {{ pid_dir = \"{}\" }}\n",
        pids.path().display()
    ));
    let sink = Arc::new(support::Updates::default());
    let running = {
        let (engine, sink) = (bench.engine.clone(), sink.clone());
        tokio::spawn(async move {
            let sink: Arc<dyn echo_worker::job::progress::ProgressSink> = sink;
            engine.run(&pipeline, job("dropped", json!({})), sink, CancellationToken::new()).await
        })
    };
    let leader: u32 = wait_for_file(&pids.path().join("leader")).await.parse().unwrap();
    let child: u32 = wait_for_file(&pids.path().join("child")).await.parse().unwrap();
    assert!(Arc::strong_count(&sink) > 1, "the run holds the sink while it runs");

    // Aborting the task drops the run future without any cancellation: the caller just went away.
    running.abort();
    assert!(running.await.unwrap_err().is_cancelled());
    for _ in 0..200 {
        if process_is_gone(leader) && process_is_gone(child) && Arc::strong_count(&sink) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(process_is_gone(leader), "the plugin process {leader} is gone");
    assert!(process_is_gone(child), "its `sleep 60` child {child} is gone");
    assert_eq!(Arc::strong_count(&sink), 1, "no task of the run (the progress emitter) still holds the sink");
    assert!(bench.leftover_work_dirs().is_empty(), "{:?}", bench.leftover_work_dirs());
}

/// A loopback HTTP server whose answers the test scripts; it records every request.
#[derive(Default)]
struct Hook {
    answers: Mutex<Vec<(u16, Option<&'static str>)>>,
    requests: Mutex<Vec<(Instant, HeaderMap, Value)>>,
    hits: AtomicU32,
}

async fn hook(State(hook): State<Arc<Hook>>, headers: HeaderMap, body: axum::Json<Value>) -> impl IntoResponse {
    hook.hits.fetch_add(1, Ordering::SeqCst);
    hook.requests.lock().unwrap().push((Instant::now(), headers, body.0));
    let (status, retry_after) = {
        let mut answers = hook.answers.lock().unwrap();
        if answers.is_empty() { (200, None) } else { answers.remove(0) }
    };
    if status == 0 {
        // Hang: the client must give up (cancel) rather than us.
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
    let mut response_headers = HeaderMap::new();
    if let Some(wait) = retry_after {
        response_headers.insert("retry-after", wait.parse().unwrap());
    }
    (StatusCode::from_u16(status.max(200)).unwrap(), response_headers, axum::Json(json!({ "ok": status == 200 })))
}

async fn serve(answers: Vec<(u16, Option<&'static str>)>) -> (Arc<Hook>, String) {
    let state = Arc::new(Hook { answers: Mutex::new(answers), ..Hook::default() });
    let app = axum::Router::new().route("/hook", post(hook)).with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (state, url)
}

fn hook_pipeline(url: &str) -> echo_worker::pipeline::Pipeline {
    pipeline(&format!(
        "[stages.notify]\nuses = \"hook\"\nretry = {{ max_attempts = 3, initial_interval = \"20ms\" }}\nwith = {{ url = \"{url}\", payload = {{ n = 1 }} }}\n"
    ))
}

#[tokio::test]
async fn an_http_plugin_sends_its_templates_and_returns_the_answer() {
    let bench = Bench::new();
    let (hook, url) = serve(vec![]).await;
    let report = bench.run(&hook_pipeline(&url), job("http-ok", json!({}))).await;
    assert_eq!(report.status, JobStatus::Succeeded, "{report:?}");
    assert_eq!(report.stages["notify"].output, Some(json!({ "status": 200, "body": { "ok": true } })));
    let requests = hook.requests.lock().unwrap();
    let (_, headers, body) = &requests[0];
    assert_eq!(headers["authorization"], "Bearer token-123");
    assert_eq!(body, &json!({ "job": "http-ok", "data": { "n": 1 } }));
}

#[tokio::test]
async fn http_5xx_is_retried_and_4xx_is_not() {
    let bench = Bench::new();
    let (hook, url) = serve(vec![(503, None), (200, None)]).await;
    let report = bench.run(&hook_pipeline(&url), job("http-503", json!({}))).await;
    assert_eq!(report.status, JobStatus::Succeeded);
    assert_eq!(report.stages["notify"].attempts, 2);
    assert_eq!(hook.hits.load(Ordering::SeqCst), 2);

    let (hook, url) = serve(vec![(404, None), (200, None)]).await;
    let report = bench.run(&hook_pipeline(&url), job("http-404", json!({}))).await;
    assert_eq!(report.status, JobStatus::Failed);
    assert_eq!(hook.hits.load(Ordering::SeqCst), 1, "a 404 is not retried");
    let message = report.failure.unwrap().message;
    assert!(message.starts_with("plugin `hook`: the server answered 404 Not Found"), "{message}");
    assert!(!message.contains("127.0.0.1"), "the URL (which may hold tokens) is not in the message");
}

#[tokio::test]
async fn retry_after_from_a_429_wins_over_the_backoff() {
    let bench = Bench::new();
    let (hook, url) = serve(vec![(429, Some("1")), (200, None)]).await;
    let report = bench.run(&hook_pipeline(&url), job("http-429", json!({}))).await;
    assert_eq!(report.status, JobStatus::Succeeded);
    let requests = hook.requests.lock().unwrap();
    let wait = requests[1].0 - requests[0].0;
    assert!(wait >= Duration::from_millis(950), "waited {wait:?}, as Retry-After: 1 asked, not the 20 ms backoff");
}

#[tokio::test]
async fn cancelling_drops_an_http_request_in_flight() {
    let bench = Bench::new();
    let (hook, url) = serve(vec![(0, None)]).await;
    let pipeline = hook_pipeline(&url);
    let cancel = CancellationToken::new();
    let running = {
        let (engine, cancel) = (bench.engine.clone(), cancel.clone());
        tokio::spawn(
            async move { engine.run(&pipeline, job("http-hang", json!({})), Arc::new(NullSink), cancel).await },
        )
    };
    for _ in 0..200 {
        if hook.hits.load(Ordering::SeqCst) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(hook.hits.load(Ordering::SeqCst), 1, "the request reached the server");
    let cancelled_at = Instant::now();
    cancel.cancel();
    let report = tokio::time::timeout(Duration::from_secs(10), running).await.unwrap().unwrap().unwrap();
    assert_eq!(report.status, JobStatus::Cancelled);
    assert!(cancelled_at.elapsed() < Duration::from_secs(3), "took {:?}", cancelled_at.elapsed());
}

#[tokio::test]
async fn an_http_answer_larger_than_the_cap_fails_the_stage_with_memory_bounded() {
    // 256 MiB, streamed without a declared length: the client must stop at the 8 MiB default cap.
    let server =
        support::raw_http::serve(200, "text/plain", support::raw_http::Body::Huge { total: 256 << 20, declare: false })
            .await;
    let bench = Bench::new();
    let report = bench.run(&hook_pipeline(&format!("{}/hook", server.base)), job("http-huge", json!({}))).await;
    assert_eq!(report.status, JobStatus::Failed);
    assert_eq!(report.stages["notify"].attempts, 1, "a body over the cap is not retried");
    let failure = report.failure.unwrap();
    assert_eq!(failure.code, echo_worker::error::ErrorCode::ResponseTooLarge);
    assert_eq!(
        failure.message,
        "plugin `hook`: the response is larger than 8MiB, the `limits.max_response_size` limit"
    );
    let written = server.written.load(Ordering::SeqCst);
    println!("the server wrote {written} bytes of 256 MiB before the client gave up");
    assert!(written < 64 << 20, "the client stopped reading near the cap; the server wrote {written} bytes");

    // A declared length over the cap fails before the body is read.
    let server =
        support::raw_http::serve(200, "text/plain", support::raw_http::Body::Huge { total: 1 << 30, declare: true })
            .await;
    let report = bench.run(&hook_pipeline(&format!("{}/hook", server.base)), job("http-declared", json!({}))).await;
    let failure = report.failure.unwrap();
    assert_eq!(
        failure.message,
        "plugin `hook`: the response is larger than 8MiB, the `limits.max_response_size` limit (it announced 1GiB)"
    );
}

#[tokio::test]
async fn an_http_error_answer_that_echoes_the_token_does_not_leak_it() {
    // The hook plugin sends `Authorization: Bearer token-123` (ECHO_TEST_TOKEN from .cargo/config.toml).
    let echo = "bad request; you sent authorization: Bearer token-123".to_string();
    let server = support::raw_http::serve(400, "text/plain", support::raw_http::Body::Text(echo)).await;
    let bench = Bench::new();
    let report = bench.run(&hook_pipeline(&format!("{}/hook", server.base)), job("http-echo", json!({}))).await;
    let message = report.failure.unwrap().message;
    assert!(!message.contains("token-123"), "{message}");
    assert!(message.ends_with("you sent authorization: [redacted]"), "{message}");
}

#[tokio::test]
async fn a_plugin_template_looping_a_billion_times_runs_out_of_fuel() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("spin.toml"),
        "name = \"spin\"\nkind = \"command\"\n[command]\nprogram = \"true\"\nargs = [\"{% for i in range(100000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}\"]\n",
    )
    .unwrap();
    let plugins = echo_worker::plugin::PluginSet::load_dir(dir.path()).unwrap();
    assert!(plugins.diagnostics.is_empty(), "{:?}", plugins.diagnostics);
    let registry = echo_worker::engine::StageRegistry::with_plugins(
        plugins.plugins.values(),
        echo_worker::net::HttpClient::new(echo_worker::net::AddressPolicy::allowing(["127.0.0.1"]).unwrap(), 5)
            .unwrap(),
        None,
        echo_worker::config::DEFAULT_MAX_RESPONSE_SIZE,
    );
    let document =
        echo_worker::document::Document::new("test.toml", "name = \"test\"\n[stages.spin]\nuses = \"spin\"\n");
    let pipeline = echo_worker::pipeline::compile::compile(&document, &plugins, &[]).unwrap();
    let settings = echo_worker::engine::EngineSettings {
        work_root: dir.path().to_path_buf(),
        ..echo_worker::engine::EngineSettings::default()
    };
    let engine = echo_worker::engine::Engine::new(
        registry,
        Arc::new(echo_worker::job::checkpoint::MemoryCheckpoints::default()),
        settings,
    );
    let run = engine.run(&pipeline, job("plugin-fuel", json!({})), Arc::new(NullSink), CancellationToken::new());
    let report = tokio::time::timeout(Duration::from_secs(60), run).await.expect("ends within a minute").unwrap();
    let failure = report.failure.unwrap();
    assert_eq!(failure.code, echo_worker::error::ErrorCode::Template);
    assert!(failure.message.contains("spin.toml: command.args[0]`: the template ran too long"), "{}", failure.message);
}
