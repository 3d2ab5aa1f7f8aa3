//! Engine overhead, measured: what the scheduler itself costs per stage, per `for_each` item and per progress
//! report, with stages that do no work. Run with `cargo bench --bench engine`; it prints one line per
//! scenario (median of several runs) and the process's peak resident memory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use echo_worker::document::Document;
use echo_worker::engine::{Engine, EngineSettings, JobStatus, StageRegistry};
use echo_worker::job::JobSpec;
use echo_worker::job::checkpoint::MemoryCheckpoints;
use echo_worker::job::progress::NullSink;
use echo_worker::job::{StageError, StageOutput};
use echo_worker::pipeline::Pipeline;
use echo_worker::pipeline::compile::compile;
use echo_worker::plugin::PluginSet;
use echo_worker::stage::{Stage, StageContext};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// Does nothing but report progress `reports` times.
struct Noop;

#[async_trait::async_trait]
impl Stage for Noop {
    async fn run(&self, ctx: StageContext) -> Result<StageOutput, StageError> {
        let reports = ctx.params.get("reports").and_then(Value::as_u64).unwrap_or(0);
        for step in 0..reports {
            ctx.progress.report(step as f64 / reports as f64, "working");
        }
        Ok(StageOutput::from(json!({ "ok": true })))
    }
}

fn pipeline(body: &str) -> Pipeline {
    let document = Document::new("bench.toml", format!("name = \"bench\"\n{body}"));
    compile(&document, &PluginSet::default(), &["noop".to_string()]).expect("bench pipeline compiles")
}

fn engine(work_root: &std::path::Path) -> Engine {
    let mut registry = StageRegistry::new();
    registry.register("noop", Arc::new(Noop));
    let settings = EngineSettings { work_root: work_root.to_path_buf(), ..EngineSettings::default() };
    Engine::new(registry, Arc::new(MemoryCheckpoints::default()), settings)
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

async fn time_runs(engine: &Engine, pipeline: &Pipeline, runs: usize) -> Duration {
    let mut samples = Vec::with_capacity(runs);
    for run in 0..runs {
        let job = JobSpec { id: format!("bench-{run}-{}", pipeline.stages.len()), ..JobSpec::default() };
        let started = Instant::now();
        let report = engine.run(pipeline, job, Arc::new(NullSink), CancellationToken::new()).await.unwrap();
        samples.push(started.elapsed());
        assert_eq!(report.status, JobStatus::Succeeded);
    }
    median(samples)
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmHWM:").map(|v| v.trim().trim_end_matches(" kB").parse().ok()))
        })
        .flatten()
        .unwrap_or(0)
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let work_root = tempfile::tempdir().unwrap();
    let engine = engine(work_root.path());
    runtime.block_on(async {
        let mut chain = String::new();
        for index in 0..100 {
            chain.push_str(&format!("[stages.s{index}]\nuses = \"noop\"\n"));
            if index > 0 {
                chain.push_str(&format!("needs = [\"s{}\"]\n", index - 1));
            }
        }
        let chain = pipeline(&chain);
        let took = time_runs(&engine, &chain, 21).await;
        println!("chain of 100 stages:     {:>10.3?} per job, {:>8.1?} per stage", took, took / 100);

        let wide: String = (0..100).map(|index| format!("[stages.w{index}]\nuses = \"noop\"\n")).collect();
        let took = time_runs(&engine, &pipeline(&wide), 21).await;
        println!("100 independent stages:  {:>10.3?} per job, {:>8.1?} per stage", took, took / 100);

        let fan = pipeline(
            "[stages.list]\nuses = \"noop\"\nwith = { items = \"{{ range(10000) | list }}\" }\n\
             [stages.fan]\nuses = \"noop\"\nneeds = [\"list\"]\nfor_each = \"range(10000)\"\nmax_parallel = 64\n\
             with = { n = \"{{ item }}\" }\n",
        );
        let took = time_runs(&engine, &fan, 5).await;
        println!("for_each of 10,000 items: {:>9.3?} per job, {:>8.1?} per item", took, took / 10_000);

        let chatty = pipeline("[stages.talk]\nuses = \"noop\"\nwith = { reports = 1000000 }\n");
        let took = time_runs(&engine, &chatty, 5).await;
        println!("1,000,000 progress reports: {:>7.3?} per job, {:>8.1?} per report", took, took / 1_000_000);
    });
    println!("peak resident memory:    {} KiB", peak_rss_kib());
}
