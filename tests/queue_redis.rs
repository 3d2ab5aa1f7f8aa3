//! Facts of the Redis queue that the backend-neutral contract suite (`tests/queue.rs`) cannot see: scripts
//! reloaded after `SCRIPT FLUSH` or a restart, every key of a queue in one cluster slot, times from the Redis
//! server's clock, an idle `take` that waits inside Redis instead of polling, blocking waits that never hold up
//! other commands, the `maxmemory-policy` warning, and the same queue on a Redis Cluster.
//!
//! Tests that need a Redis of their own (to restart it, flush it, count its commands or change its settings)
//! start `redis-server` on a free loopback port in a temporary folder. The others use `ECHO_TEST_REDIS_URL`
//! (default `redis://127.0.0.1:6379`) with a fresh key prefix each. Cluster tests use `ECHO_TEST_REDIS_CLUSTER`
//! (comma-separated node URLs, set by `.ci/run`).

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use echo_worker::queue::redis::{MemoryPolicy, RedisOptions, RedisQueue};
use echo_worker::queue::{
    Definition, DefinitionFile, Enqueued, FailOutcome, Failure, JobState, NewJob, Progress, Queue, QueueError,
    QueueSettings, WorkerInfo,
};
use echo_worker::secret::SecretUrl;
use serde_json::json;

fn redis_url() -> String {
    std::env::var("ECHO_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn fresh_prefix(test: &str) -> String {
    format!("echo-test:{test}:{}:", uuid::Uuid::new_v4().simple())
}

fn settings() -> QueueSettings {
    QueueSettings { lease: Duration::from_millis(800), backoff: Duration::from_millis(100), ..QueueSettings::default() }
}

async fn open(url: &str, prefix: &str, settings: QueueSettings) -> RedisQueue {
    let options = RedisOptions::new(&SecretUrl::new(url), false, prefix, "queue");
    RedisQueue::connect(&options, settings).await.expect("connect to Redis")
}

fn new_job(pipeline: &str) -> NewJob {
    NewJob {
        pipeline: pipeline.into(),
        definition: Definition {
            pipeline: DefinitionFile {
                file: format!("{pipeline}.toml"),
                text: "[stages.noop]\nkind = \"noop\"\n".into(),
                sha256: "a738ebe7345b793d0b73fbd3b001a8ec95f14cd42ebab103372999183ae01743".into(),
            },
            plugins: BTreeMap::new(),
        },
        recording_id: None,
        source: Some("/media/meeting.wav".into()),
        trusted_source: false,
        params: serde_json::Map::new(),
        priority: 0,
        max_attempts: 2,
        delay: None,
        idempotency_key: None,
        callback_url: None,
    }
}

fn worker(name: &str) -> WorkerInfo {
    WorkerInfo {
        id: format!("{name}-{}", uuid::Uuid::new_v4()),
        host: "test-host".into(),
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").into(),
        concurrency: 4,
        running: 0,
        last_heartbeat: 0,
    }
}

async fn created(queue: &RedisQueue, job: NewJob) -> String {
    match queue.enqueue(job).await.expect("enqueue") {
        Enqueued::Created(id) => id,
        other => panic!("expected a new job, got {other:?}"),
    }
}

async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.expect("raw connection")
}

/// Redis `TIME` in ms.
async fn server_ms(connection: &mut redis::aio::MultiplexedConnection) -> u64 {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(connection).await.unwrap();
    secs * 1000 + micros / 1000
}

/// The cluster hash slot of a key (CRC16/XMODEM of its hash tag, mod 16384), as Redis Cluster computes it.
fn key_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = match bytes.iter().position(|b| *b == b'{') {
        Some(open) => match bytes[open + 1..].iter().position(|b| *b == b'}') {
            Some(len) if len > 0 => &bytes[open + 1..open + 1 + len],
            _ => bytes,
        },
        None => bytes,
    };
    let mut crc: u16 = 0;
    for byte in tagged {
        crc ^= u16::from(*byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc % 16384
}

/// Every key under `prefix`, by SCAN (bounded).
async fn keys_under(connection: &mut redis::aio::MultiplexedConnection, prefix: &str) -> Vec<String> {
    let mut cursor: u64 = 0;
    let mut keys = Vec::new();
    for _ in 0..10_000 {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(connection)
            .await
            .unwrap();
        keys.extend(batch);
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    keys
}

/// Deletes a passing test's keys from the shared Redis.
async fn forget(url: &str, prefix: &str) {
    let mut connection = raw(url).await;
    for key in keys_under(&mut connection, prefix).await {
        let _: () = redis::cmd("DEL").arg(&key).query_async(&mut connection).await.unwrap();
    }
}

/// Exercises every kind of key a queue writes: jobs in every state, checkpoints, logs, events, workers,
/// per-minute counters, the idempotency index, the pause flag.
async fn touch_every_key(queue: &RedisQueue) {
    let me = worker("slots");
    queue.heartbeat(&me).await.unwrap();
    let mut keyed = new_job("slots");
    keyed.recording_id = Some("recording-1".into());
    created(queue, keyed).await;
    let done = queue.take(&me, Duration::ZERO).await.unwrap().expect("a ready job");
    queue.save_checkpoint(&done.job.id, &done.token, "stage", &json!({"ok": true}).into()).await.unwrap();
    queue.log(&done.job.id, "line").await.unwrap();
    let progress = Progress { percent: 50, stage: Some("stage".into()), message: "half".into() };
    queue.progress(&done.job.id, &done.token, progress).await.unwrap();
    queue.complete(&done.job.id, &done.token, json!({})).await.unwrap();
    created(queue, new_job("slots")).await;
    let failing = queue.take(&me, Duration::ZERO).await.unwrap().expect("a ready job");
    queue.save_checkpoint(&failing.job.id, &failing.token, "stage", &json!({"ok": true}).into()).await.unwrap();
    let final_failure = Failure { message: "no".into(), retryable: false, retry_after: None };
    queue.fail(&failing.job.id, &failing.token, final_failure).await.unwrap();
    let mut later = new_job("slots");
    later.delay = Some(Duration::from_secs(60));
    let delayed = created(queue, later).await;
    queue.cancel(&delayed).await.unwrap();
    let mut later = new_job("slots");
    later.delay = Some(Duration::from_secs(60));
    created(queue, later).await;
    let mut waiting = new_job("slots");
    waiting.recording_id = Some("recording-2".into());
    created(queue, waiting).await;
    queue.set_paused(true).await.unwrap();
    queue.set_paused(false).await.unwrap();
    queue.stats().await.unwrap();
}

#[tokio::test]
async fn every_key_of_a_queue_is_in_one_hash_slot() {
    let url = redis_url();
    let prefix = fresh_prefix("slots");
    let queue = open(&url, &prefix, settings()).await;
    touch_every_key(&queue).await;
    let mut connection = raw(&url).await;
    let keys = keys_under(&mut connection, &prefix).await;
    assert!(keys.len() >= 15, "expected the queue's keys under {prefix}, found {keys:?}");
    for needle in [":cp", ":log", "events", "metrics:completed", "workers", "ikeys", "delayed", "cancelled"] {
        assert!(keys.iter().any(|key| key.ends_with(needle)), "no key ending in {needle} among {keys:?}");
    }
    let slots: HashMap<u16, Vec<&String>> = keys.iter().fold(HashMap::new(), |mut slots, key| {
        slots.entry(key_slot(key)).or_default().push(key);
        slots
    });
    assert_eq!(slots.len(), 1, "keys of one queue in several slots: {slots:?}");
    assert!(keys.iter().all(|key| key.starts_with(queue.key_prefix())), "{keys:?}");
    forget(&url, &prefix).await;
}

#[test]
fn key_slot_matches_redis_cluster() {
    // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
    assert_eq!(key_slot("123456789"), 0x31C3);
    assert_eq!(key_slot("foo"), 12182);
    assert_eq!(key_slot("a{foo}b"), 12182);
}

#[tokio::test]
async fn job_times_come_from_the_redis_server_clock() {
    let url = redis_url();
    let prefix = fresh_prefix("clock");
    let queue = open(&url, &prefix, settings()).await;
    let mut connection = raw(&url).await;
    let before = server_ms(&mut connection).await;
    let mut delayed = new_job("clock");
    delayed.delay = Some(Duration::from_millis(700));
    let id = created(&queue, delayed).await;
    let after = server_ms(&mut connection).await;
    let job = queue.get(&id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Delayed);
    assert!(
        (before..=after).contains(&job.created_at),
        "created {} not within server time {before}..{after}",
        job.created_at
    );
    assert_eq!(job.ready_at, Some(job.created_at + 700), "ready time is the server's enqueue time plus the delay");
    let me = worker("clock");
    assert!(queue.take(&me, Duration::ZERO).await.unwrap().is_none(), "a delayed job was handed out early");
    let lease = tokio::time::timeout(Duration::from_secs(5), queue.take(&me, Duration::from_secs(3)))
        .await
        .expect("take returned within its wait")
        .unwrap()
        .expect("the delayed job became ready");
    let started = lease.job.started_at.expect("started");
    assert!(started >= job.created_at + 700, "taken at {started}, before its ready time");
    let deadline: f64 = redis::cmd("ZSCORE")
        .arg(format!("{}active", queue.key_prefix()))
        .arg(&id)
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(deadline as u64, started + 800, "the lease deadline is the server's take time plus the lease");
    forget(&url, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_take_does_not_hold_up_other_calls() {
    let url = redis_url();
    let prefix = fresh_prefix("blocking");
    let queue = open(&url, &prefix, settings()).await;
    let me = worker("blocking");
    let waiting = {
        let queue = queue.clone();
        let me = me.clone();
        tokio::spawn(async move { queue.take(&me, Duration::from_secs(3)).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..5 {
        let began = Instant::now();
        queue.stats().await.unwrap();
        queue.renew(&[("no-such-job".into(), echo_worker::queue::LeaseToken("t".into()))]).await.unwrap();
        assert!(
            began.elapsed() < Duration::from_millis(500),
            "calls waited {:?} behind a blocked take",
            began.elapsed()
        );
    }
    let id = created(&queue, new_job("blocking")).await;
    let lease = tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("take ended").unwrap().unwrap();
    assert_eq!(lease.expect("the waiting take got the new job").job.id, id);
    forget(&url, &prefix).await;
}

/// A `redis-server` of the test's own on a free loopback port, stopped on drop.
struct Server {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    args: Vec<String>,
}

impl Server {
    fn start(args: &[&str]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut server = Self {
            child: None,
            port,
            dir: tempfile::tempdir().unwrap(),
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        server.launch();
        server
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn launch(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(&self.args)
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (.ci/run installs it)");
        self.child = Some(child);
        let began = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(began.elapsed() < Duration::from_secs(10), "redis-server did not start on {}", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

#[tokio::test]
async fn scripts_are_loaded_again_after_script_flush() {
    let server = Server::start(&[]);
    let queue = open(&server.url(), &fresh_prefix("flush"), settings()).await;
    let me = worker("flush");
    created(&queue, new_job("flush")).await;
    let mut connection = raw(&server.url()).await;
    let _: () = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut connection).await.unwrap();
    let second = created(&queue, new_job("flush")).await;
    let _: () = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut connection).await.unwrap();
    let lease = queue.take(&me, Duration::ZERO).await.expect("take after SCRIPT FLUSH").expect("a job");
    let _: () = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut connection).await.unwrap();
    queue.complete(&lease.job.id, &lease.token, json!({})).await.expect("complete after SCRIPT FLUSH");
    assert_eq!(queue.get(&lease.job.id).await.unwrap().unwrap().state, JobState::Completed);
    assert_eq!(queue.get(&second).await.unwrap().unwrap().state, JobState::Waiting);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_gives_unavailable_then_the_queue_works_again() {
    let mut server = Server::start(&[]);
    let queue = open(&server.url(), &fresh_prefix("restart"), settings()).await;
    let me = worker("restart");
    created(&queue, new_job("restart")).await;
    let idle = {
        let queue = queue.clone();
        let me = me.clone();
        tokio::spawn(async move {
            let _ = queue.take(&me, Duration::ZERO).await;
            queue.take(&me, Duration::from_secs(2)).await
        })
    };
    server.stop();
    let down = tokio::time::timeout(Duration::from_secs(20), queue.enqueue(new_job("restart")))
        .await
        .expect("enqueue returned while Redis was down");
    assert!(matches!(down, Err(QueueError::Unavailable(_))), "{down:?}");
    let down = tokio::time::timeout(Duration::from_secs(20), queue.stats()).await.expect("stats returned");
    assert!(matches!(down, Err(QueueError::Unavailable(_))), "{down:?}");
    let waited = tokio::time::timeout(Duration::from_secs(30), idle).await.expect("the waiting take ended").unwrap();
    assert!(matches!(waited, Ok(None) | Ok(Some(_)) | Err(QueueError::Unavailable(_))), "{waited:?}");

    server.launch(); // a new, empty Redis: no data, no scripts
    let began = Instant::now();
    let id = loop {
        match queue.enqueue(new_job("restart")).await {
            Ok(enqueued) => break enqueued.id().to_string(),
            Err(QueueError::Unavailable(_)) if began.elapsed() < Duration::from_secs(20) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => panic!("the queue did not come back: {error}"),
        }
    };
    let waiting = {
        let queue = queue.clone();
        tokio::spawn(async move { queue.take(&me, Duration::from_secs(5)).await })
    };
    let lease = tokio::time::timeout(Duration::from_secs(10), waiting).await.expect("take ended").unwrap();
    assert_eq!(lease.expect("take after the restart").expect("the job enqueued after the restart").job.id, id);
}

/// Calls per command from `INFO commandstats`.
async fn command_calls(connection: &mut redis::aio::MultiplexedConnection) -> HashMap<String, u64> {
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(connection).await.unwrap();
    info.lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.split(',').find_map(|field| field.strip_prefix("calls="))?.parse().ok()?;
            Some((name.to_string(), calls))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_waits_in_redis_and_sends_few_commands() {
    let server = Server::start(&[]);
    let queue = open(&server.url(), &fresh_prefix("idle"), settings()).await;
    // A worker with 8 free slots, each asking for a job in a loop, as `echo-worker worker` does.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut slots = Vec::new();
    for slot in 0..8 {
        let queue = queue.clone();
        let stop = stop.clone();
        let me = worker(&format!("idle-{slot}"));
        slots.push(tokio::spawn(async move {
            let mut calls = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && calls < 100 {
                calls += 1;
                assert!(queue.take(&me, Duration::from_secs(2)).await.unwrap().is_none());
            }
            calls
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut connection = raw(&server.url()).await;
    let before = command_calls(&mut connection).await;
    let measured = Duration::from_secs(8);
    tokio::time::sleep(measured).await;
    let after = command_calls(&mut connection).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut take_calls = 0;
    for slot in slots {
        take_calls += tokio::time::timeout(Duration::from_secs(10), slot).await.expect("slot ended").unwrap();
    }
    let deltas: BTreeMap<&String, u64> = after
        .iter()
        .filter(|(name, _)| name.as_str() != "info")
        .map(|(name, calls)| (name, calls - before.get(name).copied().unwrap_or(0)))
        .filter(|(_, delta)| *delta > 0)
        .collect();
    let sent: u64 = deltas.values().sum();
    let per_second = sent as f64 / measured.as_secs_f64();
    eprintln!(
        "idle worker, 8 slots: {sent} commands in {measured:?} ({per_second:.2}/s: {deltas:?}), {take_calls} take calls"
    );
    assert!(take_calls >= 8 * 4, "the takes did not return at the end of their waits ({take_calls} calls)");
    assert!(per_second <= 2.0, "an idle worker sent {per_second:.2} commands/s: {before:?} -> {after:?}");
    assert!(
        after.get("bzpopmin").copied().unwrap_or(0) > before.get("bzpopmin").copied().unwrap_or(0),
        "no blocking wait"
    );
}

/// Log lines written while `f` runs.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Self;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[tokio::test]
async fn an_evicting_maxmemory_policy_is_warned_about_at_start() {
    let logs = Captured::default();
    let subscriber = tracing_subscriber::fmt().with_writer(logs.clone()).with_ansi(false).finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let evicting = Server::start(&["--maxmemory-policy", "allkeys-lru"]);
    let queue = open(&evicting.url(), &fresh_prefix("policy"), settings()).await;
    assert_eq!(queue.memory_policy(), &MemoryPolicy::Evicts("allkeys-lru".into()));
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(text.contains("WARN") && text.contains("allkeys-lru") && text.contains("noeviction"), "{text}");

    logs.0.lock().unwrap().clear();
    let safe = Server::start(&["--maxmemory-policy", "noeviction"]);
    let queue = open(&safe.url(), &fresh_prefix("policy"), settings()).await;
    assert_eq!(queue.memory_policy(), &MemoryPolicy::NoEviction);
    assert!(!String::from_utf8(logs.0.lock().unwrap().clone()).unwrap().contains("WARN"));

    // Managed Redis often refuses CONFIG: warn, and work all the same.
    let managed = Server::start(&["--rename-command", "CONFIG", ""]);
    let queue = open(&managed.url(), &fresh_prefix("policy"), settings()).await;
    assert!(matches!(queue.memory_policy(), MemoryPolicy::Unknown(_)), "{:?}", queue.memory_policy());
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(text.contains("WARN") && text.contains("maxmemory-policy"), "{text}");
    let id = created(&queue, new_job("policy")).await;
    assert_eq!(queue.get(&id).await.unwrap().unwrap().state, JobState::Waiting);
}

#[tokio::test]
async fn connect_refuses_unusable_options_and_reports_an_unreachable_redis() {
    let empty = RedisOptions { urls: Vec::new(), cluster: false, prefix: "x:".into(), queue: "q".into() };
    assert!(matches!(RedisQueue::connect(&empty, settings()).await, Err(QueueError::Invalid(_))));
    let braces = RedisOptions::new(&SecretUrl::new(redis_url()), false, "x:", "q}{");
    assert!(matches!(RedisQueue::connect(&braces, settings()).await, Err(QueueError::Invalid(_))));
    let bad = RedisOptions::new(&SecretUrl::new("not a url"), false, "x:", "q");
    assert!(matches!(RedisQueue::connect(&bad, settings()).await, Err(QueueError::Invalid(_))));
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let nobody = RedisOptions::new(&SecretUrl::new(format!("redis://:hunter2@127.0.0.1:{port}")), false, "x:", "q");
    match tokio::time::timeout(Duration::from_secs(30), RedisQueue::connect(&nobody, settings())).await.unwrap() {
        Err(QueueError::Unavailable(message)) => assert!(!message.contains("hunter2"), "{message}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn count_retention_deletes_the_keys_of_dropped_jobs() {
    let url = redis_url();
    let prefix = fresh_prefix("trash");
    let queue = open(&url, &prefix, QueueSettings { keep_completed: 2, ..settings() }).await;
    let me = worker("trash");
    let mut ids = Vec::new();
    for _ in 0..70 {
        let id = created(&queue, new_job("trash")).await;
        let lease = queue.take(&me, Duration::ZERO).await.unwrap().expect("job");
        queue.log(&id, "ran").await.unwrap();
        queue.complete(&id, &lease.token, json!({})).await.unwrap();
        ids.push(id);
    }
    let stats = queue.stats().await.unwrap();
    assert_eq!(stats.counts[&JobState::Completed], 2);
    assert!(queue.get(&ids[0]).await.unwrap().is_none(), "a job over the count is still readable");
    assert!(queue.get(&ids[69]).await.unwrap().is_some());
    // 68 dropped: past PURGE_AT (64) their keys were deleted on the way; `clean` deletes the rest.
    queue.clean(JobState::Completed, Duration::from_secs(3600), 10).await.unwrap();
    let mut connection = raw(&url).await;
    let keys = keys_under(&mut connection, &prefix).await;
    let job_keys: Vec<&String> = keys.iter().filter(|key| key.contains(":job:")).collect();
    assert!(job_keys.len() <= 4, "keys of dropped jobs are left: {job_keys:?}");
    forget(&url, &prefix).await;
}

// ------------------------------------------------------------------------------------------------------------
// Redis Cluster (ECHO_TEST_REDIS_CLUSTER, set by .ci/run)

/// The cluster's node URLs, or `None` (a skip, said out loud) outside CI when none is configured.
fn cluster_urls() -> Option<String> {
    match std::env::var("ECHO_TEST_REDIS_CLUSTER") {
        Ok(urls) if !urls.trim().is_empty() => Some(urls),
        _ if std::env::var_os("CI").is_some() => {
            panic!("CI must set ECHO_TEST_REDIS_CLUSTER (.ci/run starts a cluster)")
        }
        _ => {
            eprintln!("skipped: ECHO_TEST_REDIS_CLUSTER is not set");
            None
        }
    }
}

#[tokio::test]
async fn the_queue_runs_on_a_redis_cluster_from_any_seed_node() {
    let Some(urls) = cluster_urls() else { return };
    let prefix = fresh_prefix("cluster");
    let nodes: Vec<&str> = urls.split(',').collect();
    assert!(nodes.len() >= 3, "a 3-master cluster: {urls}");
    // Each node alone as the seed: the queue must find the slot's master whichever it is given.
    let mut queues = Vec::new();
    for node in &nodes {
        let options = RedisOptions::new(&SecretUrl::new(*node), true, &prefix, "queue");
        queues.push(RedisQueue::connect(&options, settings()).await.expect("connect through a seed node"));
    }
    let options = RedisOptions::new(&SecretUrl::new(urls.clone()), false, &prefix, "queue");
    assert!(options.cluster, "several URLs mean a cluster");
    let all = RedisQueue::connect(&options, settings()).await.unwrap();
    let me = worker("cluster");
    let id = created(&queues[0], new_job("cluster")).await;
    let lease = queues[1].take(&me, Duration::from_secs(2)).await.unwrap().expect("job through another seed");
    assert_eq!(lease.job.id, id);
    let outcome = queues[2]
        .fail(&id, &lease.token, Failure { message: "retry me".into(), retryable: true, retry_after: None })
        .await
        .unwrap();
    assert!(matches!(outcome, FailOutcome::Retrying { .. }));
    assert_eq!(all.get(&id).await.unwrap().unwrap().state, JobState::Delayed);
    touch_every_key(&all).await;

    // Every key in one slot, checked by the cluster itself, on the master that holds it.
    let mut slot = None;
    let mut found = 0;
    for node in &nodes {
        let mut connection = raw(node).await;
        let keys = keys_under(&mut connection, &prefix).await;
        for key in &keys {
            let key_slot: i64 =
                redis::cmd("CLUSTER").arg("KEYSLOT").arg(key).query_async(&mut connection).await.unwrap();
            assert_eq!(*slot.get_or_insert(key_slot), key_slot, "{key} is in another slot");
        }
        found += keys.len();
    }
    assert!(found >= 15, "the queue's keys were not found on any master");
}

#[tokio::test]
async fn keys_of_one_hash_tag_get_a_connection_to_their_master_from_any_seed() {
    let Some(urls) = cluster_urls() else { return };
    let prefix = fresh_prefix("tag");
    let key = format!("{prefix}{{ratelimit}}:whisper:transcription");
    let mut refused_somewhere = false;
    for node in urls.split(',') {
        // A plain connection to a node that does not hold the slot is refused with MOVED…
        let plain: redis::RedisResult<()> = redis::cmd("SET").arg(&key).arg(1).query_async(&mut raw(node).await).await;
        refused_somewhere |= plain.is_err_and(|error| error.kind() == redis::ErrorKind::Moved);
        // …while the connection for the key's slot, found through that same node, reaches its master.
        let options = RedisOptions::new(&SecretUrl::new(node), true, &prefix, "ratelimit");
        let mut connection =
            echo_worker::queue::redis::connection_for_key(&options, &format!("{prefix}{{ratelimit}}:")).await.unwrap();
        let count: i64 = redis::cmd("INCR").arg(&key).query_async(&mut connection).await.expect("no MOVED");
        assert!(count >= 1);
    }
    assert!(refused_somewhere, "every node accepted the key: is this a cluster?");
}

#[tokio::test]
async fn an_expired_lease_refuses_writes_even_before_recovery() {
    let (url, prefix) = (redis_url(), fresh_prefix("expired"));
    let queue = open(&url, &prefix, QueueSettings { lease: Duration::from_millis(300), ..settings() }).await;
    let me = worker("expired");
    let id = created(&queue, new_job("expired")).await;
    let lease = queue.take(&me, Duration::ZERO).await.unwrap().expect("job");
    queue.save_checkpoint(&id, &lease.token, "early", &json!(1).into()).await.expect("held while the lease runs");
    tokio::time::sleep(Duration::from_millis(450)).await;
    // Nobody recovered the job yet, but its lease is over: its holder may write nothing more.
    assert_eq!(queue.get(&id).await.unwrap().unwrap().state, JobState::Active);
    let late = queue.save_checkpoint(&id, &lease.token, "late", &json!(2).into()).await;
    assert!(matches!(late, Err(QueueError::LeaseLost(_))), "{late:?}");
    let late = queue.complete(&id, &lease.token, json!({})).await;
    assert!(matches!(late, Err(QueueError::LeaseLost(_))), "{late:?}");
    let progress = Progress { percent: 1, stage: None, message: "late".into() };
    assert!(matches!(queue.progress(&id, &lease.token, progress).await, Err(QueueError::LeaseLost(_))));
    let renewed = queue.renew(&[(id.clone(), lease.token.clone())]).await.unwrap();
    assert_eq!(renewed, vec![echo_worker::queue::Renewal::Lost]);
    let recovered = queue.recover_stalled().await.unwrap();
    assert_eq!(recovered, vec![echo_worker::queue::Recovered { id: id.clone(), state: JobState::Waiting }]);
    let job = queue.get(&id).await.unwrap().unwrap();
    assert_eq!((job.state, job.stalls, job.attempts), (JobState::Waiting, 1, 0));
    assert_eq!(queue.checkpoints(&id).await.unwrap().keys().collect::<Vec<_>>(), ["early"]);
    forget(&url, &prefix).await;
}

/// `CLUSTER SLOTS` as (first slot, last slot, master port).
async fn slot_masters(connection: &mut redis::aio::MultiplexedConnection) -> Vec<(i64, i64, u16)> {
    let ranges: Vec<redis::Value> = redis::cmd("CLUSTER").arg("SLOTS").query_async(connection).await.unwrap();
    ranges
        .into_iter()
        .filter_map(|range| {
            let redis::Value::Array(range) = range else { return None };
            let number = |value: &redis::Value| match value {
                redis::Value::Int(n) => Some(*n),
                _ => None,
            };
            let redis::Value::Array(master) = range.get(2)? else { return None };
            Some((number(&range[0])?, number(&range[1])?, u16::try_from(number(master.get(1)?)?).ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_follows_its_slot_when_the_cluster_moves_it() {
    let Some(urls) = cluster_urls() else { return };
    let nodes: Vec<String> = urls.split(',').map(str::to_string).collect();
    let queue_name = format!("moving-{}", uuid::Uuid::new_v4().simple());
    let options = RedisOptions::new(&SecretUrl::new(urls.clone()), true, "echo-test:", &queue_name);
    let queue = RedisQueue::connect(&options, settings()).await.unwrap();
    let me = worker("moving");
    let first = created(&queue, new_job("moving")).await;
    let lease = queue.take(&me, Duration::ZERO).await.unwrap().expect("a job");
    queue.complete(&first, &lease.token, json!({"before": "the move"})).await.unwrap();
    // An idle taker, blocked on the old master when the slot moves.
    let waiting = {
        let queue = queue.clone();
        let me = me.clone();
        tokio::spawn(async move { queue.take(&me, Duration::from_secs(20)).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Move the queue's slot to another master, keys and all, as `redis-cli --cluster reshard` would.
    let mut any = raw(&nodes[0]).await;
    let slot: i64 = redis::cmd("CLUSTER").arg("KEYSLOT").arg(queue.key_prefix()).query_async(&mut any).await.unwrap();
    let owner_port = slot_masters(&mut any).await.into_iter().find(|(a, b, _)| (*a..=*b).contains(&slot)).unwrap().2;
    let port = |url: &String| url.rsplit(':').next().unwrap().parse::<u16>().unwrap();
    let owner = nodes.iter().find(|url| port(url) == owner_port).expect("the owner is one of the nodes").clone();
    let target = nodes.iter().find(|url| port(url) != owner_port).unwrap().clone();
    let (mut from, mut to) = (raw(&owner).await, raw(&target).await);
    let from_id: String = redis::cmd("CLUSTER").arg("MYID").query_async(&mut from).await.unwrap();
    let to_id: String = redis::cmd("CLUSTER").arg("MYID").query_async(&mut to).await.unwrap();
    let setslot = |state: &str, id: &str| {
        let mut command = redis::cmd("CLUSTER");
        command.arg("SETSLOT").arg(slot).arg(state).arg(id);
        command
    };
    let _: () = setslot("IMPORTING", &from_id).query_async(&mut to).await.unwrap();
    let _: () = setslot("MIGRATING", &to_id).query_async(&mut from).await.unwrap();
    let mut moved_keys = 0;
    for _ in 0..100 {
        let keys: Vec<String> =
            redis::cmd("CLUSTER").arg("GETKEYSINSLOT").arg(slot).arg(100).query_async(&mut from).await.unwrap();
        if keys.is_empty() {
            break;
        }
        moved_keys += keys.len();
        let _: () = redis::cmd("MIGRATE")
            .arg("127.0.0.1")
            .arg(port(&target))
            .arg("")
            .arg(0)
            .arg(5000)
            .arg("KEYS")
            .arg(&keys)
            .query_async(&mut from)
            .await
            .unwrap();
    }
    assert!(moved_keys >= 5, "the queue's keys were not on the old master ({moved_keys})");
    for node in &nodes {
        let _: () = setslot("NODE", &to_id).query_async(&mut raw(node).await).await.unwrap();
    }

    // The shared connection is answered MOVED: the queue asks the cluster again and carries on.
    let done = queue.get(&first).await.expect("get after the slot moved").expect("the job moved with its keys");
    assert_eq!((done.state, done.result), (JobState::Completed, Some(json!({"before": "the move"}))));
    let second = created(&queue, new_job("moving")).await;
    let mut new_master = raw(&target).await;
    let there: i64 = redis::cmd("EXISTS")
        .arg(format!("{}job:{second}", queue.key_prefix()))
        .query_async(&mut new_master)
        .await
        .unwrap();
    assert_eq!(there, 1, "the new job was written on the new master");
    // The idle taker's blocking connection follows too, and gets the new job.
    let took = tokio::time::timeout(Duration::from_secs(25), waiting).await.expect("the idle take ended").unwrap();
    assert_eq!(took.expect("take").expect("the job enqueued after the move").job.id, second);
}
