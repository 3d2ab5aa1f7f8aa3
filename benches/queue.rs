//! What the queue costs, against BullMQ on the same Redis in the same run (issue 9's benchmark; README, "What
//! the queue costs"). Run with `cargo bench --bench queue`; `ECHO_BENCH_JOBS` (default 20,000) shrinks the
//! job counts for a quick run (the backlog is five times it), `ECHO_BENCH_IDLE_SECS` (default 60) the idle
//! window, `ECHO_BENCH_LATENCY_RATE` (default 1,000 jobs/s) the steady rate of scenario 4, `ECHO_BENCH_SCENARIOS` (default `1,2,3,4,5,6`) picks scenarios, `ECHO_BENCH_REDIS_URL` (default
//! `redis://127.0.0.1:6379`) the Redis.
//!
//! Our side runs the real worker path: a worker process (this bench binary started again as a child) with
//! `Worker` from `src/worker/` at concurrency N, taking jobs from the Redis queue, compiling the definition each
//! job carries, running it through the engine with queue checkpoints, progress sink and job log, and completing
//! it. Its single stage does no I/O. BullMQ's side is `benches/bullmq/bench.mjs` (BullMQ and ioredis from npm,
//! `npm ci --prefix benches/bullmq`), run as a child that starts its own worker process. Each scenario runs for
//! both systems back to back, each on a key prefix of its own that is deleted afterwards. The table at the end
//! holds both.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use echo_worker::definition::sha256_hex;
use echo_worker::engine::{Engine, EngineSettings, Kinds, StageRegistry};
use echo_worker::job::checkpoint::MemoryCheckpoints;
use echo_worker::job::{StageError, StageOutput};
use echo_worker::net::{AddressPolicy, HttpClient};
use echo_worker::queue::redis::{RedisOptions, RedisQueue};
use echo_worker::queue::{Definition, DefinitionFile, EventKind, JobState, NewJob, Queue, QueueSettings, WorkerInfo};
use echo_worker::secret::SecretUrl;
use echo_worker::stage::{Stage, StageContext};
use echo_worker::store::SqlStore;
use echo_worker::units::ByteSize;
use echo_worker::worker::{Worker, WorkerOptions};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// Set (to the worker's settings as JSON) in the child that runs our worker.
const WORKER_ENV: &str = "ECHO_BENCH_QUEUE_WORKER";
/// Jobs per bulk enqueue call, on both sides.
const BATCH: usize = 1000;
/// How often the driver asks how many jobs are left.
const POLL: Duration = Duration::from_millis(10);
/// Worker concurrency of the latency, backlog and idle scenarios.
const WIDE: usize = 50;

// ---------------------------------------------------------------------------------------------------------------
// The job: one stage that does no I/O.

/// Does nothing but report progress `reports` times.
struct Noop;

#[async_trait::async_trait]
impl Stage for Noop {
    async fn run(&self, ctx: StageContext) -> Result<StageOutput, StageError> {
        let reports = ctx.params.get("reports").and_then(Value::as_u64).unwrap_or(0);
        for step in 1..=reports {
            ctx.progress.report(step as f64 / reports as f64, "working");
        }
        Ok(StageOutput::from(json!({ "ok": true })))
    }
}

fn file(name: &str, text: String) -> DefinitionFile {
    DefinitionFile { file: name.to_string(), sha256: sha256_hex(&text), text }
}

/// The definition every bench job carries: pipeline `bench`, one stage of kind `noop`.
///
/// A worker compiles a job's definition knowing only the builtin kinds and the plugins the job carries, so the
/// definition carries a `noop` plugin of kind `prompt` to make `uses = "noop"` compile. With no AI provider
/// configured a worker does not register prompt plugins, and the worker's kinds here map `noop` to [`Noop`]
/// (registered in code), so that is what runs: no AI, no I/O.
fn definition(reports: u32) -> Definition {
    let pipeline = format!("name = \"bench\"\n\n[stages.work]\nuses = \"noop\"\nwith = {{ reports = {reports} }}\n");
    let plugin = "name = \"noop\"\nkind = \"prompt\"\ndescription = \"Runs the bench's in-code no-op stage\"\n\n\
                  [params]\nreports = { type = \"integer\", default = 0, description = \"Progress reports\" }\n\n\
                  [prompt]\nsystem = \"unused\"\nuser = \"unused\"\n"
        .to_string();
    Definition {
        pipeline: file("bench.toml", pipeline),
        plugins: BTreeMap::from([("noop".into(), file("noop.toml", plugin))]),
    }
}

fn new_job(definition: &Definition, index: usize) -> NewJob {
    let mut params = serde_json::Map::new();
    params.insert("index".into(), json!(index));
    NewJob {
        pipeline: "bench".into(),
        definition: definition.clone(),
        recording_id: None,
        source: None,
        trusted_source: false,
        params,
        priority: 0,
        max_attempts: 1,
        delay: None,
        idempotency_key: None,
        callback_url: None,
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Our worker process

/// What the child worker is told.
#[derive(Debug, Serialize, Deserialize)]
struct WorkerSpec {
    redis: String,
    prefix: String,
    queue: String,
    concurrency: usize,
}

/// CPU time (user + system) the process has used, in ms.
fn cpu_ms() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    let ticks = |index: usize| fields.get(index).and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime, in clock ticks of 1/100 s on Linux.
    (ticks(11) + ticks(12)) * 10
}

fn peak_rss_kib(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmHWM:").map(|v| v.trim().trim_end_matches(" kB").parse().ok()))
        })
        .flatten()
        .unwrap_or(0)
}

/// The child: a worker at the given concurrency. Says `ready`, starts on `go`, and on `stop` (or when stdin
/// closes) prints its peak RSS and shuts down.
fn worker_role(spec: &str) {
    let spec: WorkerSpec = serde_json::from_str(spec).expect("worker spec");
    let _ = tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter("warn").try_init();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async move {
        let options = RedisOptions::new(&SecretUrl::new(&spec.redis), false, &spec.prefix, &spec.queue);
        let settings = QueueSettings::default();
        let lease = settings.lease;
        let queue = RedisQueue::connect(&options, settings).await.expect("worker connects to Redis");
        let store = SqlStore::connect("sqlite::memory:", "recordings").await.expect("store");
        let mut builtins = StageRegistry::new();
        builtins.register("noop", Arc::new(Noop));
        let http = HttpClient::new(AddressPolicy::default(), 5).expect("http client");
        let kinds = Kinds::new(builtins, http, None, ByteSize(8 << 20));
        let work = tempfile::tempdir().expect("work root");
        let engine = Engine::new(
            StageRegistry::new(),
            Arc::new(MemoryCheckpoints::default()),
            EngineSettings { work_root: work.path().to_path_buf(), ..EngineSettings::default() },
        );
        let options = WorkerOptions {
            concurrency: spec.concurrency,
            lease,
            shutdown_grace: Duration::from_secs(10),
            pipelines_dir: work.path().to_path_buf(),
            plugins_dir: work.path().to_path_buf(),
        };
        let worker = Worker::new(Arc::new(queue), Arc::new(store), engine, kinds, options);
        let (shutdown, hurry) = (CancellationToken::new(), CancellationToken::new());
        println!("ready");
        // stdin lines, read on a thread of their own (`go`, then `stop`; the end of stdin counts as `stop`).
        let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
        std::thread::spawn(move || {
            for line in std::io::stdin().lines() {
                let Ok(line) = line else { break };
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        if lines.recv().await.as_deref() != Some("go") {
            return;
        }
        let running = tokio::spawn(worker.run(shutdown.clone(), hurry.clone()));
        while let Some(line) = lines.recv().await {
            if line == "stop" {
                break;
            }
        }
        println!("{}", json!({ "rss_kib": peak_rss_kib("self"), "cpu_ms": cpu_ms() }));
        shutdown.cancel();
        if tokio::time::timeout(Duration::from_secs(15), running).await.is_err() {
            hurry.cancel();
        }
        drop(work);
    });
}

/// A worker process of ours, started from the driver.
struct Child {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Child {
    async fn start(redis: &str, prefix: &str, queue: &str, concurrency: usize) -> Self {
        let spec = WorkerSpec { redis: redis.into(), prefix: prefix.into(), queue: queue.into(), concurrency };
        let mut child = tokio::process::Command::new(std::env::current_exe().expect("bench binary"))
            .env(WORKER_ENV, serde_json::to_string(&spec).unwrap())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start our worker process");
        let stdin = child.stdin.take().unwrap();
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = lines.next_line().await.ok().flatten();
        assert_eq!(ready.as_deref(), Some("ready"), "our worker process did not start");
        Self { child, stdin, lines }
    }

    fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    async fn go(&mut self) {
        self.stdin.write_all(b"go\n").await.unwrap();
        self.stdin.flush().await.unwrap();
    }

    /// Stops it; its peak RSS in KiB and the CPU time it used in ms.
    async fn stop(mut self) -> (u64, u64) {
        let _ = self.stdin.write_all(b"stop\n").await;
        let _ = self.stdin.flush().await;
        let line = tokio::time::timeout(Duration::from_secs(20), self.lines.next_line()).await;
        let said = match line {
            Ok(Ok(Some(line))) => serde_json::from_str::<Value>(&line).unwrap_or_default(),
            _ => Value::Null,
        };
        drop(self.stdin);
        if tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
        (said["rss_kib"].as_u64().unwrap_or(0), said["cpu_ms"].as_u64().unwrap_or(0))
    }
}

// ---------------------------------------------------------------------------------------------------------------
// BullMQ's side

fn bullmq_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/bullmq")
}

/// Why BullMQ's side cannot run, if it cannot.
fn bullmq_missing() -> Option<String> {
    if !bullmq_dir().join("node_modules/bullmq/package.json").is_file() {
        return Some(
            "benches/bullmq/node_modules is missing: install BullMQ's side with `npm ci --prefix benches/bullmq`"
                .into(),
        );
    }
    match std::process::Command::new("node").arg("--version").output() {
        Ok(output) if output.status.success() => None,
        _ => Some("`node` is not on PATH: BullMQ's side needs Node.js (v20 or later)".into()),
    }
}

/// The node script for one scenario, stdin piped for the interactive ones.
fn node(scenario: &str, options: &Value) -> tokio::process::Child {
    tokio::process::Command::new("node")
        .arg(bullmq_dir().join("bench.mjs"))
        .arg(scenario)
        .arg(options.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start node")
}

/// Runs one BullMQ scenario to its end; its JSON result.
async fn bullmq(scenario: &str, options: Value) -> Value {
    let child = node(scenario, &options);
    let output = child.wait_with_output().await.expect("node ran");
    let text = String::from_utf8_lossy(&output.stdout);
    let last = text.lines().rev().find(|line| line.starts_with('{')).unwrap_or("{}");
    let value: Value = serde_json::from_str(last).unwrap_or(Value::Null);
    assert!(output.status.success() && value.is_object(), "BullMQ's {scenario} failed: {text}");
    value
}

// ---------------------------------------------------------------------------------------------------------------
// Our side of each scenario

/// One queue of ours on a fresh prefix.
async fn fresh(redis: &str, prefix: &str, queue: &str) -> RedisQueue {
    let options = RedisOptions::new(&SecretUrl::new(redis), false, prefix, queue);
    RedisQueue::connect(&options, QueueSettings::default()).await.expect("connect to Redis")
}

async fn fill(queue: &RedisQueue, definition: &Definition, jobs: usize) {
    let mut index = 0;
    while index < jobs {
        let batch: Vec<NewJob> = (index..jobs.min(index + BATCH)).map(|i| new_job(definition, i)).collect();
        index += batch.len();
        for outcome in queue.enqueue_many(batch).await.expect("bulk enqueue") {
            outcome.expect("job enqueued");
        }
    }
}

async fn left(queue: &RedisQueue) -> (u64, u64) {
    let stats = queue.stats().await.expect("stats");
    let count = |state| stats.counts.get(&state).copied().unwrap_or(0);
    (count(JobState::Waiting) + count(JobState::Delayed) + count(JobState::Active), count(JobState::Failed))
}

#[derive(Debug, Default, Clone)]
struct Throughput {
    rate: f64,
    /// (jobs finished, seconds) at each mark.
    marks: Vec<(u64, f64)>,
    rss_kib: u64,
    fill_seconds: f64,
    /// CPU time of the worker process (start to stop), ms.
    worker_cpu_ms: u64,
    /// CPU time of the Redis server while the jobs ran (`INFO cpu`, everything it did), ms.
    redis_cpu_ms: u64,
}

async fn ours_throughput(
    redis: &str,
    prefix: &str,
    jobs: usize,
    concurrency: usize,
    reports: u32,
    marks: &[u64],
) -> Throughput {
    let queue = fresh(redis, prefix, "noop").await;
    let filling = Instant::now();
    fill(&queue, &definition(reports), jobs).await;
    let fill_seconds = filling.elapsed().as_secs_f64();
    let mut worker = Child::start(redis, prefix, "noop", concurrency).await;
    let redis_cpu = redis_cpu_ms(redis);
    let start = Instant::now();
    worker.go().await;
    let mut pending: Vec<u64> = marks.to_vec();
    pending.sort_unstable();
    pending.reverse();
    let mut marked = Vec::new();
    loop {
        let (left, failed) = left(&queue).await;
        assert_eq!(failed, 0, "bench jobs failed: {:?}", first_failure(&queue).await);
        let finished = jobs as u64 - left;
        while pending.last().is_some_and(|mark| finished >= *mark) {
            marked.push((pending.pop().unwrap(), start.elapsed().as_secs_f64()));
        }
        if left == 0 {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    let seconds = start.elapsed().as_secs_f64();
    let redis_cpu_ms = redis_cpu_ms(redis).saturating_sub(redis_cpu);
    let (rss_kib, worker_cpu_ms) = worker.stop().await;
    Throughput { rate: jobs as f64 / seconds, marks: marked, rss_kib, fill_seconds, worker_cpu_ms, redis_cpu_ms }
}

/// The queue alone, without the worker: `tasks` tasks in this process each taking a job and completing it,
/// through the [`Queue`] trait (two script calls a job). A diagnostic: it shows what the queue itself costs
/// beside what the worker adds.
async fn ours_queue_only(redis: &str, prefix: &str, jobs: usize, tasks: usize) -> f64 {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let queue = Arc::new(fresh(redis, prefix, "noop").await);
    fill(&queue, &definition(0), jobs).await;
    let done = Arc::new(AtomicUsize::new(0));
    let worker = WorkerInfo {
        id: format!("bench-queue-only-{}", std::process::id()),
        host: "bench".into(),
        pid: std::process::id(),
        version: "bench".into(),
        concurrency: u32::try_from(tasks).unwrap_or(u32::MAX),
        running: 0,
        last_heartbeat: 0,
    };
    let start = Instant::now();
    let deadline = start + Duration::from_secs(600);
    let mut running = tokio::task::JoinSet::new();
    for _ in 0..tasks {
        let (queue, done, worker) = (queue.clone(), done.clone(), worker.clone());
        running.spawn(async move {
            while done.load(Ordering::Acquire) < jobs && Instant::now() < deadline {
                let Some(lease) = queue.take(&worker, Duration::from_millis(100)).await.expect("take") else {
                    continue;
                };
                queue.complete(&lease.job.id, &lease.token, json!({ "ok": true })).await.expect("complete");
                done.fetch_add(1, Ordering::AcqRel);
            }
        });
    }
    while running.join_next().await.is_some() {}
    assert_eq!(done.load(Ordering::Acquire), jobs, "the queue-only loop did not finish in time");
    jobs as f64 / start.elapsed().as_secs_f64()
}

async fn first_failure(queue: &RedisQueue) -> Option<String> {
    let page = queue.list(JobState::Failed, None, 1).await.ok()?;
    page.jobs.first().and_then(|job| job.error.clone())
}

fn throughput_of(value: &Value) -> Throughput {
    Throughput {
        rate: value["rate"].as_f64().unwrap_or(0.0),
        marks: value["marks"]
            .as_array()
            .map(|marks| {
                marks.iter().map(|m| (m["jobs"].as_u64().unwrap_or(0), m["seconds"].as_f64().unwrap_or(0.0))).collect()
            })
            .unwrap_or_default(),
        rss_kib: value["rss_kib"].as_u64().unwrap_or(0),
        fill_seconds: value["fill_seconds"].as_f64().unwrap_or(0.0),
        worker_cpu_ms: value["cpu_ms"].as_u64().unwrap_or(0),
        redis_cpu_ms: value["redis_cpu_ms"].as_u64().unwrap_or(0),
    }
}

/// Jobs per second adding one job after another (each awaited), and in bulk (1,000 per call).
async fn ours_add(redis: &str, prefix: &str, jobs: usize) -> (f64, f64) {
    let definition = definition(0);
    let queue = fresh(redis, prefix, "noop").await;
    let start = Instant::now();
    for index in 0..jobs {
        queue.enqueue(new_job(&definition, index)).await.expect("enqueue");
    }
    let one = jobs as f64 / start.elapsed().as_secs_f64();
    let queue = fresh(redis, prefix, "noop-bulk").await;
    let start = Instant::now();
    fill(&queue, &definition, jobs).await;
    (one, jobs as f64 / start.elapsed().as_secs_f64())
}

#[derive(Debug, Default, Clone)]
struct Latency {
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    completed: usize,
    offered_rate: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((p / 100.0 * sorted.len() as f64) as usize).min(sorted.len() - 1)]
}

/// Enqueue-to-completion latency at a steady rate, as a client sees it: from just before `enqueue` to the
/// `completed` event on the queue's event stream (a blocking `XREAD`).
async fn ours_latency(redis: &str, prefix: &str, jobs: usize, per_second: u64) -> Latency {
    let definition = definition(0);
    let queue = Arc::new(fresh(redis, prefix, "noop").await);
    let done: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let stop = CancellationToken::new();
    let reader = {
        let (queue, done, stop) = (queue.clone(), done.clone(), stop.clone());
        tokio::spawn(async move {
            let mut after: Option<String> = None;
            while !stop.is_cancelled() && done.lock().unwrap().len() < jobs {
                let Ok(events) = queue.events(after.as_deref(), 1000, Duration::from_millis(500)).await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let at = Instant::now();
                let mut done = done.lock().unwrap();
                for event in events {
                    if matches!(event.kind, EventKind::State { state: JobState::Completed, .. }) {
                        done.insert(event.job_id.clone(), at);
                    }
                    after = Some(event.id);
                }
            }
        })
    };
    let mut worker = Child::start(redis, prefix, "noop", WIDE).await;
    worker.go().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let start = Instant::now();
    let mut adds = tokio::task::JoinSet::new();
    let mut next = 0usize;
    while next < jobs {
        let due = (((start.elapsed().as_secs_f64() * per_second as f64) as usize) + 1).min(jobs);
        while next < due {
            let (queue, sent, job) = (queue.clone(), sent.clone(), new_job(&definition, next));
            adds.spawn(async move {
                let at = Instant::now();
                let id = queue.enqueue(job).await.expect("enqueue").id().to_string();
                sent.lock().unwrap().insert(id, at);
            });
            next += 1;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let offered_rate = jobs as f64 / start.elapsed().as_secs_f64();
    while adds.join_next().await.is_some() {}
    let _ = tokio::time::timeout(Duration::from_secs(60), async {
        while done.lock().unwrap().len() < jobs {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    stop.cancel();
    let _ = reader.await;
    worker.stop().await;
    let (sent, done) = (sent.lock().unwrap(), done.lock().unwrap());
    let mut latencies: Vec<f64> = sent
        .iter()
        .filter_map(|(id, at)| done.get(id).map(|end| end.saturating_duration_since(*at).as_secs_f64() * 1000.0))
        .collect();
    latencies.sort_by(f64::total_cmp);
    Latency {
        p50_ms: percentile(&latencies, 50.0),
        p99_ms: percentile(&latencies, 99.0),
        max_ms: latencies.last().copied().unwrap_or(f64::NAN),
        completed: latencies.len(),
        offered_rate,
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Counting an idle worker's commands

/// Local ports of `pid`'s TCP connections to `redis_port`.
fn redis_ports(pid: u32, redis_port: u16) -> BTreeSet<u16> {
    let mut inodes = BTreeSet::new();
    if let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for entry in entries.flatten() {
            if let Ok(target) = std::fs::read_link(entry.path()) {
                let target = target.to_string_lossy().into_owned();
                if let Some(inode) = target.strip_prefix("socket:[").and_then(|rest| rest.strip_suffix(']')) {
                    inodes.insert(inode.to_string());
                }
            }
        }
    }
    let mut ports = BTreeSet::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else { continue };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 10 || !inodes.contains(fields[9]) {
                continue;
            }
            let port = |address: &str| address.rsplit(':').next().and_then(|hex| u16::from_str_radix(hex, 16).ok());
            if port(fields[2]) == Some(redis_port)
                && let Some(local) = port(fields[1])
            {
                ports.insert(local);
            }
        }
    }
    ports
}

/// The Redis server's CPU time so far (`INFO cpu`: used_cpu_user + used_cpu_sys), ms.
fn redis_cpu_ms(redis_url: &str) -> u64 {
    let Ok(mut connection) = redis::Client::open(redis_url).and_then(|client| client.get_connection()) else {
        return 0;
    };
    let info: String = redis::cmd("INFO").arg("cpu").query(&mut connection).unwrap_or_default();
    let seconds: f64 = info
        .lines()
        .filter_map(|line| line.strip_prefix("used_cpu_user:").or_else(|| line.strip_prefix("used_cpu_sys:")))
        .filter_map(|n| n.trim().parse::<f64>().ok())
        .sum();
    (seconds * 1000.0) as u64
}

fn commandstats_calls(redis: &mut redis::Connection) -> u64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query(redis).unwrap_or_default();
    info.lines()
        .filter_map(|line| line.split("calls=").nth(1))
        .filter_map(|rest| rest.split(',').next().and_then(|n| n.parse::<u64>().ok()))
        .sum()
}

#[derive(Debug, Default, Clone)]
struct Idle {
    per_second: f64,
    by_command: BTreeMap<String, u64>,
    server_per_second: f64,
    clients: u64,
}

/// Counts, for `seconds`, the commands that reach Redis from `pid`'s connections: `MONITOR` lines whose client
/// address is one of its sockets (found in `/proc/PID/fd` and `/proc/PID/net/tcp`). Also the server-wide
/// `INFO commandstats` delta over the same window (every client, and commands run inside scripts).
fn count_idle(redis_url: &str, pid: u32, seconds: u64) -> Idle {
    let client = redis::Client::open(redis_url).expect("redis url");
    let info = client.get_connection_info().clone();
    let (host, port) = match &info.addr {
        redis::ConnectionAddr::Tcp(host, port) => (host.clone(), *port),
        other => panic!("the idle count needs a TCP Redis, not {other:?}"),
    };
    let mut stats = client.get_connection().expect("redis connection");
    let mut ports = redis_ports(pid, port);
    assert!(!ports.is_empty(), "no Redis connection found for process {pid}");
    let mut monitor = std::net::TcpStream::connect((host.as_str(), port)).expect("monitor connection");
    monitor.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    monitor.write_all(b"MONITOR\r\n").unwrap();
    let mut reader = BufReader::new(monitor);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("+OK"), "MONITOR refused: {line}");
    let calls_before = commandstats_calls(&mut stats);
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let mut by_port: HashMap<u16, BTreeMap<String, u64>> = HashMap::new();
    while Instant::now() < end {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(error) if matches!(error.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                continue;
            }
            Err(error) => panic!("MONITOR: {error}"),
        }
        // +1700000000.123456 [0 127.0.0.1:45902] "EVALSHA" "…" …
        let Some(open) = line.find('[') else { continue };
        let Some(close) = line[open..].find(']').map(|at| open + at) else { continue };
        let Some(client_port) = line[open + 1..close].rsplit(':').next().and_then(|p| p.parse::<u16>().ok()) else {
            continue;
        };
        let command = line[close + 1..].trim().split('"').nth(1).unwrap_or("?").to_ascii_uppercase();
        *by_port.entry(client_port).or_default().entry(command).or_default() += 1;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let calls_after = commandstats_calls(&mut stats);
    ports.extend(redis_ports(pid, port));
    let clients: String = redis::cmd("INFO").arg("clients").query(&mut stats).unwrap_or_default();
    let clients = clients
        .lines()
        .find_map(|line| line.strip_prefix("connected_clients:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    let mut by_command = BTreeMap::new();
    for port in &ports {
        for (command, n) in by_port.get(port).cloned().unwrap_or_default() {
            *by_command.entry(command).or_insert(0) += n;
        }
    }
    let sent: u64 = by_command.values().sum();
    Idle {
        per_second: sent as f64 / elapsed,
        by_command,
        // INFO itself and MONITOR's own connection are a few of these.
        server_per_second: calls_after.saturating_sub(calls_before) as f64 / elapsed,
        clients,
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The run

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| text.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|value| value.replace('_', "").parse().ok()).unwrap_or(default)
}

/// Deletes every key starting with `pattern`'s prefix.
fn clean(redis_url: &str, prefix: &str) -> u64 {
    let client = redis::Client::open(redis_url).expect("redis url");
    let mut connection = client.get_connection().expect("redis connection");
    let mut removed = 0;
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query(&mut connection)
            .expect("SCAN");
        if !keys.is_empty() {
            removed += redis::cmd("UNLINK").arg(&keys).query::<u64>(&mut connection).unwrap_or(0);
        }
        if next == 0 {
            return removed;
        }
        cursor = next;
    }
}

/// One row of the table.
struct Row {
    scenario: String,
    ours: String,
    bullmq: String,
    ratio: String,
    target: String,
    load: String,
}

fn row(scenario: &str, ours: String, bullmq: String, ratio: String, target: &str, load: &str) -> Row {
    Row { scenario: scenario.into(), ours, bullmq, ratio, target: target.into(), load: load.into() }
}

fn rate(value: f64) -> String {
    if value.is_finite() && value > 0.0 { format!("{:.0}", value) } else { "—".into() }
}

fn times(ours: f64, theirs: f64) -> String {
    if ours.is_finite() && theirs.is_finite() && theirs > 0.0 {
        format!("{:.2}×", ours / theirs)
    } else {
        "—".into()
    }
}

fn verdict(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "—",
    }
}

struct Run {
    redis: String,
    run_id: String,
    counter: usize,
    bullmq: bool,
    rows: Vec<Row>,
    notes: Vec<String>,
}

impl Run {
    /// A fresh key prefix (ours) and the matching one for BullMQ.
    fn prefixes(&mut self) -> (String, String) {
        self.counter += 1;
        (
            format!("echo-bench-{}-{}:", self.run_id, self.counter),
            format!("echo-bench-{}-{}-bullmq", self.run_id, self.counter),
        )
    }

    fn options(&self, prefix: &str, extra: Value) -> Value {
        let mut options = json!({ "redis": self.redis, "prefix": prefix, "queue": "noop" });
        if let (Some(options), Value::Object(extra)) = (options.as_object_mut(), extra) {
            options.extend(extra);
        }
        options
    }

    /// Our worker process draining `jobs` jobs.
    async fn ours(&mut self, jobs: usize, concurrency: usize, reports: u32, marks: &[u64]) -> Throughput {
        let (prefix, _) = self.prefixes();
        eprintln!("… {jobs} jobs, concurrency {concurrency}, {reports} progress updates each: echo-worker");
        let ours = ours_throughput(&self.redis, &prefix, jobs, concurrency, reports, marks).await;
        clean(&self.redis, &prefix);
        ours
    }

    /// BullMQ's worker process draining `jobs` jobs, unless BullMQ's side cannot run.
    async fn theirs(&mut self, jobs: usize, concurrency: usize, reports: u32, marks: &[u64]) -> Option<Throughput> {
        let (_, prefix) = self.prefixes();
        if !self.bullmq {
            return None;
        }
        eprintln!("… {jobs} jobs, concurrency {concurrency}, {reports} progress updates each: BullMQ");
        let options = self
            .options(&prefix, json!({ "jobs": jobs, "concurrency": concurrency, "progress": reports, "marks": marks }));
        Some(throughput_of(&bullmq("throughput", options).await))
    }

    async fn throughput_pair(
        &mut self,
        jobs: usize,
        concurrency: usize,
        reports: u32,
    ) -> (Throughput, Option<Throughput>, String) {
        let load = load_average();
        let ours = self.ours(jobs, concurrency, reports, &[]).await;
        let theirs = self.theirs(jobs, concurrency, reports, &[]).await;
        (ours, theirs, load)
    }
}

fn main() {
    if let Ok(spec) = std::env::var(WORKER_ENV) {
        worker_role(&spec);
        return;
    }
    let jobs = env_number("ECHO_BENCH_JOBS", 20_000).max(100) as usize;
    let backlog = jobs * 5;
    let idle_seconds = env_number("ECHO_BENCH_IDLE_SECS", 60).max(5);
    let latency_rate = env_number("ECHO_BENCH_LATENCY_RATE", 1000).clamp(1, 100_000);
    let scenarios: BTreeSet<u32> = std::env::var("ECHO_BENCH_SCENARIOS")
        .unwrap_or_else(|_| "1,2,3,4,5,6".into())
        .split(',')
        .filter_map(|part| part.trim().parse().ok())
        .collect();
    let redis = std::env::var("ECHO_BENCH_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let missing = bullmq_missing();
    if let Some(why) = &missing {
        eprintln!("BullMQ's side will not run: {why}");
    }
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let mut run = Run {
        redis: redis.clone(),
        run_id: run_id.clone(),
        counter: 0,
        bullmq: missing.is_none(),
        rows: Vec::new(),
        notes: Vec::new(),
    };
    let started_load = load_average();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut bullmq_wide: Option<f64> = None;
        let mut rss: (Option<u64>, Option<u64>) = (None, None);
        for (scenario, reports, target_times) in [(1u32, 0u32, 2.5f64), (2, 10, 5.0)] {
            if !scenarios.contains(&scenario) {
                continue;
            }
            for concurrency in [1usize, 10, 50] {
                let (ours, theirs, load) = run.throughput_pair(jobs, concurrency, reports).await;
                let theirs_rate = theirs.as_ref().map_or(f64::NAN, |t| t.rate);
                let (target, met) = if concurrency == 50 {
                    (format!("≥ {target_times}× BullMQ"), theirs.as_ref().map(|t| ours.rate >= target_times * t.rate))
                } else {
                    (String::new(), None)
                };
                let label = if reports == 0 {
                    format!("1. no-op jobs, concurrency {concurrency} (jobs/s)")
                } else {
                    format!("2. {reports} progress updates per job, concurrency {concurrency} (jobs/s)")
                };
                let target = if target.is_empty() { String::new() } else { format!("{target}: {}", verdict(met)) };
                run.rows.push(row(&label, rate(ours.rate), rate(theirs_rate), times(ours.rate, theirs_rate), &target, &load));
                if concurrency == WIDE && reports == 0 {
                    bullmq_wide = theirs.as_ref().map(|t| t.rate);
                    rss = (Some(ours.rss_kib), theirs.as_ref().map(|t| t.rss_kib));
                }
                let per_job = |t: &Throughput| {
                    format!(
                        "worker {:.0} µs + Redis {:.0} µs",
                        t.worker_cpu_ms as f64 * 1000.0 / jobs as f64,
                        t.redis_cpu_ms as f64 * 1000.0 / jobs as f64
                    )
                };
                run.notes.push(format!(
                    "CPU per job, concurrency {concurrency}, {reports} progress updates: echo-worker {}; BullMQ {}",
                    per_job(&ours),
                    theirs.as_ref().map_or("—".into(), per_job)
                ));
            }
            if scenario == 1 {
                let load = load_average();
                let (prefix, _) = run.prefixes();
                eprintln!("… {jobs} jobs through the Queue trait alone (take → complete), {WIDE} tasks: echo-worker");
                let alone = ours_queue_only(&redis, &prefix, jobs, WIDE).await;
                clean(&redis, &prefix);
                let theirs = bullmq_wide.unwrap_or(f64::NAN);
                run.rows.push(row(
                    &format!(
                        "1. diagnostic: our queue alone, no worker (take → complete, {WIDE} tasks), vs BullMQ's worker at concurrency {WIDE} (jobs/s)"
                    ),
                    rate(alone), rate(theirs), times(alone, theirs), "", &load,
                ));
            }
        }
        if scenarios.contains(&3) {
            let load = load_average();
            let (ours_prefix, theirs_prefix) = run.prefixes();
            eprintln!("… adding {jobs} jobs one by one, then in bulk: echo-worker");
            let (one, bulk) = ours_add(&redis, &ours_prefix, jobs).await;
            clean(&redis, &ours_prefix);
            let theirs = if run.bullmq {
                eprintln!("… the same on BullMQ");
                Some(bullmq("add", run.options(&theirs_prefix, json!({ "jobs": jobs }))).await)
            } else {
                None
            };
            let their = |key: &str| theirs.as_ref().and_then(|t| t[key].as_f64()).unwrap_or(f64::NAN);
            run.rows.push(row("3. add one by one, each awaited (jobs/s)", rate(one), rate(their("one_by_one_rate")), times(one, their("one_by_one_rate")), "", &load));
            run.rows.push(row(&format!("3. add in bulk, {BATCH} per call (jobs/s)"), rate(bulk), rate(their("bulk_rate")), times(bulk, their("bulk_rate")), "", &load));
        }
        if scenarios.contains(&4) {
            let load = load_average();
            let (ours_prefix, theirs_prefix) = run.prefixes();
            eprintln!("… latency at {latency_rate} jobs/s, {jobs} jobs: echo-worker");
            let ours = ours_latency(&redis, &ours_prefix, jobs, latency_rate).await;
            clean(&redis, &ours_prefix);
            let theirs = if run.bullmq {
                eprintln!("… the same on BullMQ");
                let options = json!({ "jobs": jobs, "rate": latency_rate, "concurrency": WIDE });
                Some(bullmq("latency", run.options(&theirs_prefix, options)).await)
            } else {
                None
            };
            let their = |key: &str| theirs.as_ref().and_then(|t| t[key].as_f64()).unwrap_or(f64::NAN);
            let ms = |v: f64| if v.is_finite() { format!("{v:.1} ms") } else { "—".into() };
            let no_worse = |ours: f64, theirs: f64| theirs.is_finite().then_some(ours <= theirs);
            run.rows.push(row(
                &format!("4. latency enqueue → completed at {latency_rate} jobs/s, p50"),
                ms(ours.p50_ms), ms(their("p50_ms")), times(ours.p50_ms, their("p50_ms")),
                &format!("≤ BullMQ: {}", verdict(no_worse(ours.p50_ms, their("p50_ms")))), &load,
            ));
            run.rows.push(row(
                &format!("4. latency enqueue → completed at {latency_rate} jobs/s, p99"),
                ms(ours.p99_ms), ms(their("p99_ms")), times(ours.p99_ms, their("p99_ms")),
                &format!("≤ BullMQ: {}", verdict(no_worse(ours.p99_ms, their("p99_ms")))), &load,
            ));
            run.notes.push(format!(
                "latency: echo-worker {}/{jobs} completions seen, offered {:.0} jobs/s, max {}; BullMQ {}/{jobs}, offered {:.0} jobs/s, max {}",
                ours.completed, ours.offered_rate, ms(ours.max_ms),
                their("completed"), their("offered_rate"), ms(their("max_ms")),
            ));
        }
        if scenarios.contains(&5) {
            // Each system drains `jobs` jobs alone, then a backlog five times as large, back to back, so that
            // the machine's load is about the same for both figures of one system.
            let load = load_average();
            let mark = jobs as u64;
            let ours_alone = run.ours(jobs, WIDE, 0, &[]).await;
            let ours = run.ours(backlog, WIDE, 0, &[mark]).await;
            let theirs_alone = run.theirs(jobs, WIDE, 0, &[]).await;
            let theirs = run.theirs(backlog, WIDE, 0, &[mark]).await;
            let first = |t: &Throughput| t.marks.first().map_or(f64::NAN, |(n, s)| *n as f64 / s);
            let theirs_rate = |t: &Option<Throughput>, f: &dyn Fn(&Throughput) -> f64| t.as_ref().map_or(f64::NAN, f);
            let (alone, theirs_alone) = (ours_alone.rate, theirs_rate(&theirs_alone, &|t| t.rate));
            let (backlog_first, theirs_first) = (first(&ours), theirs_rate(&theirs, &first));
            let (backlog_all, theirs_all) = (ours.rate, theirs_rate(&theirs, &|t| t.rate));
            run.rows.push(row(
                &format!("5. {jobs} jobs alone, concurrency {WIDE}, just before the backlog (jobs/s)"),
                rate(alone), rate(theirs_alone), times(alone, theirs_alone), "", &load,
            ));
            run.rows.push(row(
                &format!("5. draining {backlog} due jobs, concurrency {WIDE}: the first {jobs} (jobs/s)"),
                rate(backlog_first), rate(theirs_first), times(backlog_first, theirs_first), "", &load,
            ));
            run.rows.push(row(
                &format!("5. draining {backlog} due jobs, concurrency {WIDE}: all of them (jobs/s)"),
                rate(backlog_all), rate(theirs_all), times(backlog_all, theirs_all), "", &load,
            ));
            let (ours_ratio, theirs_ratio) = (backlog_first / alone, theirs_first / theirs_alone);
            let pct = |v: f64| if v.is_finite() { format!("{:.0} %", v * 100.0) } else { "—".into() };
            run.rows.push(row(
                &format!("5. the first {jobs} of the backlog ÷ {jobs} jobs alone"),
                pct(ours_ratio), pct(theirs_ratio), String::new(),
                &format!("> 80 %: {}", verdict(ours_ratio.is_finite().then_some(ours_ratio > 0.8))), &load,
            ));
            run.notes.push(format!(
                "backlog of {backlog}: filled in {:.1} s (echo-worker, {BATCH} per call) and {:.1} s (BullMQ)",
                ours.fill_seconds, theirs.as_ref().map_or(f64::NAN, |t| t.fill_seconds)
            ));
        }
        if scenarios.contains(&6) {
            let load = load_average();
            let (ours_prefix, theirs_prefix) = run.prefixes();
            eprintln!("… one idle worker (concurrency {WIDE}) for {idle_seconds} s: echo-worker");
            let _queue = fresh(&redis, &ours_prefix, "noop").await;
            let mut worker = Child::start(&redis, &ours_prefix, "noop", WIDE).await;
            worker.go().await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            let (url, pid) = (redis.clone(), worker.pid());
            let ours = tokio::task::spawn_blocking(move || count_idle(&url, pid, idle_seconds)).await.unwrap();
            worker.stop().await;
            clean(&redis, &ours_prefix);
            let theirs = if run.bullmq {
                eprintln!("… the same on BullMQ");
                let mut child = node("idle", &run.options(&theirs_prefix, json!({ "concurrency": WIDE })));
                let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
                let first: Value = serde_json::from_str(&lines.next_line().await.unwrap().unwrap_or_default()).unwrap_or_default();
                let pid = u32::try_from(first["worker_pid"].as_u64().expect("BullMQ worker pid")).unwrap();
                tokio::time::sleep(Duration::from_secs(2)).await;
                let url = redis.clone();
                let counted = tokio::task::spawn_blocking(move || count_idle(&url, pid, idle_seconds)).await.unwrap();
                let mut stdin = child.stdin.take().unwrap();
                stdin.write_all(b"stop\n").await.unwrap();
                drop(stdin);
                while lines.next_line().await.ok().flatten().is_some() {}
                let _ = child.wait().await;
                Some(counted)
            } else {
                None
            };
            let theirs_rate = theirs.as_ref().map_or(f64::NAN, |t| t.per_second);
            let per_s = |v: f64| if v.is_finite() { format!("{v:.2}") } else { "—".into() };
            run.rows.push(row(
                &format!("6. idle worker (concurrency {WIDE}): commands/s it sends, over {idle_seconds} s"),
                per_s(ours.per_second), per_s(theirs_rate), String::new(),
                &format!("≤ 2/s: {}", verdict(Some(ours.per_second <= 2.0))), &load,
            ));
            let describe = |idle: &Idle| {
                let list: Vec<String> = idle.by_command.iter().map(|(c, n)| format!("{c} {n}")).collect();
                format!("{} (server-wide during the window: {:.1} calls/s from {} clients)", list.join(", "), idle.server_per_second, idle.clients)
            };
            run.notes.push(format!("idle, echo-worker: {}", describe(&ours)));
            if let Some(theirs) = &theirs {
                run.notes.push(format!("idle, BullMQ: {}", describe(theirs)));
            }
        }
        if let (Some(ours), theirs) = rss {
            let mib = |kib: u64| format!("{:.1} MiB", kib as f64 / 1024.0);
            run.rows.push(row(
                &format!("peak RSS of the worker process, concurrency {WIDE} (scenario 1)"),
                mib(ours), theirs.map_or("—".into(), mib), theirs.map_or(String::new(), |t| times(ours as f64, t as f64)), "", "",
            ));
        }
    });
    let removed = clean(&redis, &format!("echo-bench-{run_id}-"));
    if removed > 0 {
        eprintln!("removed {removed} keys left under echo-bench-{run_id}-");
    }
    print_table(&run, jobs, &started_load);
}

fn print_table(run: &Run, jobs: usize, started_load: &str) {
    println!();
    println!(
        "queue bench: {jobs} jobs per scenario, Redis {}, BullMQ {}, load average at start {started_load}, at end {}",
        run.redis,
        if run.bullmq { bullmq_version() } else { "not run".into() },
        load_average()
    );
    println!();
    println!("| scenario | echo-worker | BullMQ | echo-worker ÷ BullMQ | target | load (1, 5, 15 min) |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for row in &run.rows {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            row.scenario, row.ours, row.bullmq, row.ratio, row.target, row.load
        );
    }
    println!();
    for note in &run.notes {
        println!("- {note}");
    }
}

fn bullmq_version() -> String {
    std::fs::read_to_string(bullmq_dir().join("node_modules/bullmq/package.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<Value>(&text).ok())
        .and_then(|value| value["version"].as_str().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}
