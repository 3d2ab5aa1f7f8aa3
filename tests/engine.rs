//! The engine end to end with test-only stage kinds (see `support`) and real command plugins: concurrency,
//! retries, failures, panics, conditions and triggers, fan-out, timeouts, deadlines, checkpoints, progress and
//! work directories.

mod support;

use std::sync::Arc;
use std::time::Duration;

use echo_worker::engine::{EngineError, JobStatus, StageStatus};
use echo_worker::error::ErrorCode;
use echo_worker::job::progress::NullSink;
use serde_json::json;
use support::{Bench, Updates, job, pipeline};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn independent_stages_run_concurrently_and_dependents_wait() {
    let bench = Bench::new();
    let pipeline = pipeline(
        r#"
[stages.a]
uses = "record"
with = { ms = 300 }
[stages.b]
uses = "record"
with = { ms = 300 }
[stages.c]
uses = "record"
needs = ["a", "b"]
"#,
    );
    let report = bench.run(&pipeline, job("concurrent", json!({}))).await;
    assert_eq!(report.status, JobStatus::Succeeded);
    let (a, b, c) = (&bench.lab.events_of("a")[0], &bench.lab.events_of("b")[0], &bench.lab.events_of("c")[0]);
    assert!(a.start < b.end && b.start < a.end, "a and b overlap in time: {a:?} {b:?}");
    assert!(c.start >= a.end && c.start >= b.end, "c starts after both needs ended");
}

#[tokio::test]
async fn the_per_job_stage_limit_holds() {
    let bench = Bench::with_settings(|settings| settings.max_parallel_stages = 1);
    let pipeline = pipeline(
        r#"
[stages.a]
uses = "record"
with = { ms = 100 }
[stages.b]
uses = "record"
with = { ms = 100 }
"#,
    );
    assert_eq!(bench.run(&pipeline, job("limited", json!({}))).await.status, JobStatus::Succeeded);
    let (a, b) = (&bench.lab.events_of("a")[0], &bench.lab.events_of("b")[0]);
    assert!(a.end <= b.start || b.end <= a.start, "with a limit of 1 the stages do not overlap");
}

#[tokio::test]
async fn a_flaky_stage_is_retried_with_growing_delays() {
    let bench = Bench::new();
    let pipeline = pipeline(
        r#"
[stages.flaky]
uses = "flaky"
retry = { max_attempts = 4, initial_interval = "100ms", backoff_coefficient = 3.0, max_interval = "5s" }
with = { fail_times = 2 }
"#,
    );
    let report = bench.run(&pipeline, job("flaky", json!({}))).await;
    assert_eq!(report.status, JobStatus::Succeeded, "{report:?}");
    assert_eq!(report.stages["flaky"].attempts, 3);
    assert_eq!(report.stages["flaky"].output, Some(json!({ "succeeded_on": 3 })));
    let attempts = bench.lab.events_of("flaky");
    assert_eq!(attempts.len(), 3);
    let first_wait = attempts[1].start - attempts[0].end;
    let second_wait = attempts[2].start - attempts[1].end;
    assert!(first_wait >= Duration::from_millis(80), "first wait {first_wait:?} is about 100 ms minus jitter");
    assert!(second_wait > first_wait, "waits grow: {first_wait:?} then {second_wait:?}");
}

#[tokio::test]
async fn a_permanent_error_is_not_retried() {
    let bench = Bench::new();
    let pipeline = pipeline(
        r#"
[stages.bad]
uses = "broken"
retry = { max_attempts = 5, initial_interval = "10ms" }
[stages.after]
uses = "record"
needs = ["bad"]
"#,
    );
    let report = bench.run(&pipeline, job("permanent", json!({}))).await;
    assert_eq!(report.status, JobStatus::Failed);
    assert_eq!(bench.lab.runs_of("bad"), 1);
    let failure = report.failure.unwrap();
    assert_eq!(failure.stage.as_deref(), Some("bad"));
    assert_eq!(failure.message, "the input is unusable");
    assert!(!failure.retryable);
    assert_eq!(report.stages["after"].status, StageStatus::NotRun);
    assert_eq!(bench.lab.runs_of("after"), 0);
}

#[tokio::test]
async fn a_panicking_stage_fails_the_job_and_the_process_goes_on() {
    let bench = Bench::new();
    let exploding =
        pipeline("[stages.boom]\nuses = \"boom\"\nretry = { max_attempts = 3, initial_interval = \"10ms\" }\n");
    let report = bench.run(&exploding, job("panics", json!({}))).await;
    assert_eq!(report.status, JobStatus::Failed);
    let failure = report.failure.unwrap();
    assert_eq!(failure.message, "stage `boom` panicked: boom stage exploded");
    assert_eq!(bench.lab.runs_of("boom"), 1, "a panic is permanent");
    let healthy = pipeline("[stages.ok]\nuses = \"record\"\n");
    assert_eq!(bench.run(&healthy, job("after-panic", json!({}))).await.status, JobStatus::Succeeded);
}

#[tokio::test]
async fn conditions_triggers_and_continue_on_failure() {
    let bench = Bench::new();
    let pipeline = pipeline(
        r#"
[stages.first]
uses = "record"

[stages.optional]
uses = "record"
needs = ["first"]
if = "job.params.optional == true"

[stages.after_optional]
uses = "record"
needs = ["optional"]

[stages.after_optional_none_failed]
uses = "record"
needs = ["optional"]
trigger = "none_failed"

[stages.bad]
uses = "broken"
needs = ["first"]
on_failure = "continue"

[stages.after_bad]
uses = "record"
needs = ["bad"]

[stages.after_bad_none_failed]
uses = "record"
needs = ["bad"]
trigger = "none_failed"

[stages.after_bad_all_done]
uses = "record"
needs = ["bad"]
trigger = "all_done"
"#,
    );
    let report = bench.run(&pipeline, job("triggers", json!({ "optional": false }))).await;
    assert_eq!(report.status, JobStatus::Succeeded, "on_failure = continue keeps the job going");
    let status = |id: &str| report.stages[id].status;
    assert_eq!(status("first"), StageStatus::Succeeded);
    assert_eq!(status("optional"), StageStatus::Skipped);
    assert_eq!(report.stages["optional"].reason.as_deref(), Some("`if = \"job.params.optional == true\"` was false"));
    assert_eq!(status("after_optional"), StageStatus::Skipped, "all_success skips after a skip");
    assert_eq!(status("after_optional_none_failed"), StageStatus::Succeeded, "none_failed runs after a skip");
    assert_eq!(status("bad"), StageStatus::Failed);
    assert_eq!(status("after_bad"), StageStatus::Skipped);
    assert_eq!(status("after_bad_none_failed"), StageStatus::Skipped);
    assert_eq!(status("after_bad_all_done"), StageStatus::Succeeded);
    assert_eq!(bench.lab.runs_of("optional"), 0);

    let report = bench.run(&pipeline, job("triggers-on", json!({ "optional": true }))).await;
    assert_eq!(report.stages["optional"].status, StageStatus::Succeeded);
    assert_eq!(report.stages["after_optional"].status, StageStatus::Succeeded);
}

#[tokio::test]
async fn for_each_collects_outputs_in_item_order_within_max_parallel() {
    let bench = Bench::new();
    let pipeline = pipeline(
        r#"
[stages.list]
uses = "record"
with = { chunks = [{ ms = 400, name = "a" }, { ms = 20, name = "b" }, { ms = 250, name = "c" }, { ms = 60, name = "d" }] }

[stages.fan]
uses = "record"
needs = ["list"]
for_each = "stages.list.params.chunks"
max_parallel = 2
with = { ms = "{{ item.ms }}", name = "{{ item.name }}", position = "{{ index }}" }
"#,
    );
    let report = bench.run(&pipeline, job("fan", json!({}))).await;
    assert_eq!(report.status, JobStatus::Succeeded, "{report:?}");
    let output = report.stages["fan"].output.as_ref().unwrap().as_array().unwrap();
    let names: Vec<&str> = output.iter().map(|item| item["params"]["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["a", "b", "c", "d"], "outputs follow the items");
    assert_eq!(output[2]["params"]["position"], json!(2), "index keeps its type");
    assert_eq!(output[2]["params"]["ms"], json!(250));
    let mut events = bench.lab.events_of("fan");
    events.sort_by_key(|event| event.end);
    let finish_order: Vec<usize> = events.iter().map(|event| event.item.unwrap()).collect();
    assert_ne!(finish_order, [0, 1, 2, 3], "items finished out of order: {finish_order:?}");
    for event in &events {
        let active = events.iter().filter(|other| other.start <= event.start && event.start < other.end).count();
        assert!(active <= 2, "at most max_parallel = 2 items run at once, {active} did");
    }
}

#[tokio::test]
async fn an_item_failing_with_the_word_cancelled_is_a_failure_not_a_cancellation() {
    let bench = Bench::new();
    let pipeline = pipeline(
        r#"
[stages.fan]
uses = "count"
for_each = "[1, 2, 3]"
with = { fail = "{{ item == 2 }}", message = "cancelled" }
"#,
    );
    let report = bench.run(&pipeline, job("worded", json!({}))).await;
    assert_eq!(report.status, JobStatus::Failed, "{report:?}");
    assert_eq!(report.stages["fan"].status, StageStatus::Failed);
    let failure = report.failure.unwrap();
    assert_eq!((failure.code, failure.message.as_str()), (ErrorCode::Custom, "item 1 of 3: cancelled"));
    assert!(!failure.code.is_cancelled());
}

#[tokio::test]
async fn an_attempt_that_outlives_its_timeout_is_stopped_and_retried() {
    let bench = Bench::new();
    let pipeline = pipeline(
        r#"
[stages.slow]
uses = "record"
timeout = "100ms"
retry = { max_attempts = 2, initial_interval = "10ms" }
with = { ms = 10000 }
"#,
    );
    let report = bench.run(&pipeline, job("timeout", json!({}))).await;
    assert_eq!(report.status, JobStatus::Failed);
    assert_eq!(report.stages["slow"].attempts, 2, "a timeout is worth a retry");
    let failure = report.failure.unwrap();
    assert_eq!(failure.message, "stage `slow` timed out after 100ms");
    assert_eq!(failure.code, ErrorCode::Timeout);
}

#[tokio::test]
async fn the_job_deadline_stops_everything() {
    let bench = Bench::with_settings(|settings| settings.job_timeout = Duration::from_millis(200));
    let pipeline = pipeline("[stages.slow]\nuses = \"record\"\nwith = { ms = 10000 }\n");
    let report = bench.run(&pipeline, job("deadline", json!({}))).await;
    assert_eq!(report.status, JobStatus::Failed);
    assert_eq!(report.failure.as_ref().unwrap().code, ErrorCode::Deadline);
    assert_eq!(report.failure.unwrap().message, "job exceeded its deadline of 200ms");
    assert_eq!(report.stages["slow"].status, StageStatus::Cancelled);
}

#[tokio::test]
async fn a_rerun_restores_finished_stages_and_runs_the_failed_one_once() {
    let bench = Bench::new();
    let pipeline = pipeline(
        r#"
[stages.one]
uses = "count"
[stages.two]
uses = "count"
needs = ["one"]
[stages.three]
uses = "count"
needs = ["two"]
[stages.four]
uses = "count"
needs = ["three"]
with = { fail = "{{ job.params.fail_four }}" }
"#,
    );
    let first = bench.run(&pipeline, job("resume", json!({ "fail_four": true }))).await;
    assert_eq!(first.status, JobStatus::Failed);
    assert_eq!(first.failure.unwrap().stage.as_deref(), Some("four"));
    let before: Vec<u32> = ["one", "two", "three", "four"].iter().map(|s| bench.lab.runs_of(s)).collect();
    assert_eq!(before, [1, 1, 1, 1]);

    let second = bench.run(&pipeline, job("resume", json!({ "fail_four": false }))).await;
    assert_eq!(second.status, JobStatus::Succeeded);
    let runs: Vec<u32> = ["one", "two", "three", "four"].iter().map(|s| bench.lab.runs_of(s) - 1).collect();
    assert_eq!(runs, [0, 0, 0, 1], "stages 1-3 ran zero more times, stage 4 once");
    assert_eq!(second.stages["two"].status, StageStatus::Restored);
    assert_eq!(second.stages["two"].output, Some(json!({ "run": 1 })), "restored outputs feed dependents");
    assert_eq!(second.stages["four"].status, StageStatus::Succeeded);
}

#[tokio::test]
async fn a_stage_whose_output_files_are_gone_reruns_with_everything_downstream() {
    let bench = Bench::new();
    let kept = tempfile::tempdir().unwrap();
    let file = kept.path().join("fetched.bin");
    let pipeline = pipeline(&format!(
        r#"
[stages.first]
uses = "count"
[stages.fetch]
uses = "write_file"
needs = ["first"]
with = {{ path = "{}" }}
[stages.after]
uses = "count"
needs = ["fetch"]
"#,
        file.display()
    ));
    assert_eq!(bench.run(&pipeline, job("files", json!({}))).await.status, JobStatus::Succeeded);
    let again = bench.run(&pipeline, job("files", json!({}))).await;
    assert_eq!(again.stages["fetch"].status, StageStatus::Restored, "the file is still there");
    assert_eq!(again.stages["after"].status, StageStatus::Restored);

    std::fs::remove_file(&file).unwrap();
    let third = bench.run(&pipeline, job("files", json!({}))).await;
    assert_eq!(third.status, JobStatus::Succeeded);
    assert_eq!(third.stages["first"].status, StageStatus::Restored);
    assert_eq!(third.stages["fetch"].status, StageStatus::Succeeded, "the missing file is fetched again");
    assert_eq!(third.stages["after"].status, StageStatus::Succeeded, "and what depends on it runs again");
    assert_eq!((bench.lab.runs_of("first"), bench.lab.runs_of("after")), (1, 2));
    assert!(file.exists());
}

#[tokio::test]
async fn progress_rises_to_100_and_is_throttled() {
    let bench = Bench::new();
    let pipeline = pipeline(
        r#"
[stages.talk]
uses = "chatty"
weight = 3
with = { steps = 200, ms = 5 }
[stages.quiet]
uses = "record"
needs = ["talk"]
weight = 1
with = { ms = 50 }
"#,
    );
    let updates = Arc::new(Updates::default());
    let report = bench.run_with(&pipeline, job("progress", json!({})), updates.clone(), CancellationToken::new()).await;
    assert_eq!(report.status, JobStatus::Succeeded);
    let seen = updates.seen.lock().unwrap().clone();
    let percents: Vec<u8> = seen.iter().map(|(_, update)| update.percent).collect();
    assert!(percents.windows(2).all(|pair| pair[0] <= pair[1]), "never backwards: {percents:?}");
    assert_eq!(percents.last(), Some(&100));
    assert!(percents.iter().any(|p| (1..75).contains(p)), "intermediate values are reported: {percents:?}");
    assert!(seen.len() < 40, "200 reports over ~1 s are coalesced, got {} updates", seen.len());
    let gaps: Vec<Duration> = seen.windows(2).map(|pair| pair[1].0 - pair[0].0).collect();
    let quick = gaps.iter().filter(|gap| **gap < Duration::from_millis(150)).count();
    assert!(quick <= 1, "updates are at least ~200 ms apart (only the final one may come sooner): {gaps:?}");
    assert_eq!(seen.last().unwrap().1.message, "completed");
}

#[tokio::test]
async fn progress_never_freezes_on_a_finished_stage_while_another_runs() {
    let bench = Bench::new();
    let pipeline = pipeline(
        r#"
[stages.fast]
uses = "chatty"
with = { steps = 4, ms = 20 }
[stages.slow]
uses = "record"
with = { ms = 900 }
[stages.last]
uses = "record"
needs = ["fast", "slow"]
"#,
    );
    let updates = Arc::new(Updates::default());
    let report = bench.run_with(&pipeline, job("freeze", json!({})), updates.clone(), CancellationToken::new()).await;
    assert_eq!(report.status, JobStatus::Succeeded);
    let fast_end = bench.lab.events_of("fast")[0].end;
    let slow_end = bench.lab.events_of("slow")[0].end;
    assert!(slow_end > fast_end + Duration::from_millis(500), "`slow` runs on alone for a while");
    // The last update before `slow` ended shows the state long after `fast` finished (updates are ~200 ms apart).
    let seen = updates.seen.lock().unwrap().clone();
    let (at, update) = seen.iter().rfind(|(at, _)| *at < slow_end).expect("updates while `slow` runs");
    assert!(*at > fast_end, "an update came after `fast` finished: {seen:?}");
    assert_eq!(update.stage.as_deref(), Some("slow"), "the finished `fast` is not shown: {update:?}");
    assert_eq!(update.message, "running slow", "{update:?}");
    assert_eq!(update.running, ["slow"], "{update:?}");
    assert_eq!((update.stages_done, update.stages_total), (1, 3), "{update:?}");
}

#[tokio::test]
async fn work_directories_are_removed_after_success_and_failure() {
    let bench = Bench::new();
    let ok = pipeline("[stages.write]\nuses = \"write_file\"\n");
    let report = bench.run(&ok, job("wd-ok", json!({}))).await;
    let written = report.stages["write"].output.as_ref().unwrap()["path"].as_str().unwrap().to_string();
    assert!(written.starts_with(bench.work_root.path().to_str().unwrap()), "{written}");
    assert!(!std::path::Path::new(&written).exists());
    let failing =
        pipeline("[stages.write]\nuses = \"write_file\"\n[stages.bad]\nuses = \"broken\"\nneeds = [\"write\"]\n");
    assert_eq!(bench.run(&failing, job("wd-bad", json!({}))).await.status, JobStatus::Failed);
    assert!(bench.leftover_work_dirs().is_empty(), "{:?}", bench.leftover_work_dirs());
}

#[tokio::test]
async fn a_pipeline_with_unavailable_kinds_is_refused_before_any_work() {
    let bench = Bench::new();
    let document = echo_worker::document::Document::new(
        "test.toml",
        "name = \"test\"\n[stages.a]\nuses = \"record\"\n[stages.t]\nuses = \"transcode\"\nneeds = [\"a\"]\n",
    );
    let custom = vec!["record".to_string()];
    let pipeline = echo_worker::pipeline::compile::compile(&document, &support::fixture_plugins(), &custom).unwrap();
    let error =
        bench.engine.run(&pipeline, job("missing", json!({})), Arc::new(NullSink), CancellationToken::new()).await;
    let Err(error @ EngineError::MissingKinds { .. }) = error else { panic!("refused: {error:?}") };
    assert_eq!(
        error.to_string(),
        "pipeline `test` cannot run here: stage `t` uses `transcode`, which is not available yet"
    );
    assert_eq!(bench.lab.runs_of("a"), 0);
}

/// A `with` template that would render for far longer than any timeout: each of its 100,000 iterations
/// upper-cases a megabyte (well within the fuel) and prints its length.
const SLOW_TEMPLATE: &str = "{% for i in range(100000) %}{{ ('x' * 1000000) | upper | length }}{% endfor %}";

#[tokio::test]
async fn a_template_looping_a_billion_times_runs_out_of_fuel() {
    let bench = Bench::new();
    let pipeline = pipeline(
        "[stages.spin]\nuses = \"record\"\nwith = { x = \"{% for i in range(100000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}\" }\n",
    );
    let report = bench.run(&pipeline, job("fuel", json!({}))).await;
    assert_eq!(report.status, JobStatus::Failed);
    let failure = report.failure.unwrap();
    assert_eq!((failure.code, failure.retryable), (ErrorCode::Template, false), "{failure:?}");
    assert!(failure.message.starts_with("`stages.spin.with.x`: the template ran too long"), "{}", failure.message);
    assert_eq!(bench.lab.runs_of("spin"), 0, "the stage never ran");
}

#[tokio::test]
async fn a_template_still_rendering_is_stopped_by_a_1s_stage_timeout() {
    let bench = Bench::new();
    let pipeline = pipeline(&format!(
        "[stages.slow]\nuses = \"record\"\ntimeout = \"1s\"\nretry = {{ max_attempts = 1 }}\nwith = {{ x = \"{SLOW_TEMPLATE}\" }}\n"
    ));
    let started = std::time::Instant::now();
    let report = bench.run(&pipeline, job("render-timeout", json!({}))).await;
    let took = started.elapsed();
    assert_eq!(report.status, JobStatus::Failed);
    let failure = report.failure.unwrap();
    assert_eq!(failure.message, "stage `slow` timed out after 1s");
    assert!(took < Duration::from_secs(8), "the timeout won over the render: the job took {took:?}");
    assert_eq!(bench.lab.runs_of("slow"), 0);
}

#[tokio::test]
async fn cancelling_stops_a_job_whose_template_is_still_rendering() {
    let bench = Bench::new();
    let pipeline = pipeline(&format!("[stages.slow]\nuses = \"record\"\nwith = {{ x = \"{SLOW_TEMPLATE}\" }}\n"));
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        trigger.cancel();
    });
    let started = std::time::Instant::now();
    let report = bench.run_with(&pipeline, job("render-cancel", json!({})), Arc::new(NullSink), cancel).await;
    let took = started.elapsed();
    assert_eq!(report.status, JobStatus::Cancelled);
    assert!(took < Duration::from_secs(6), "the cancel won over the render: the job took {took:?}");
}

#[tokio::test]
async fn a_template_that_expands_hugely_fails_at_the_size_cap() {
    let bench = Bench::new();
    // 200 MB of text from a template of a few dozen bytes.
    let pipeline = pipeline(
        "[stages.big]\nuses = \"record\"\nwith = { x = \"{% for i in range(2000) %}{{ 'x' * 100000 }}{% endfor %}\" }\n",
    );
    let report = bench.run(&pipeline, job("expand", json!({}))).await;
    assert_eq!(report.status, JobStatus::Failed);
    let failure = report.failure.unwrap();
    assert_eq!(failure.code, ErrorCode::Template);
    assert_eq!(
        failure.message,
        "`stages.big.with.x`: the template's result is larger than 16MiB, the limit for one template"
    );
}
