//! The Redis backend of [`Queue`]: any number of worker processes on any number of machines share one Redis,
//! or one slot of a Redis Cluster, and a job survives the death of the worker running it.
//!
//! Layout: every key of a queue starts with `<prefix>{<queue>}:`, so all of them hash to one cluster slot. A job
//! is a hash (`job:<id>`) beside its checkpoints (`job:<id>:cp`, a hash) and its log (`job:<id>:log`, a capped
//! list); its state is also membership of one sorted set: `wait` (score: priority then order), `delayed`
//! (ready time), `active` (lease deadline), `completed`, `failed`, `cancelled` (finish time). Every state change
//! is one Lua script from `src/queue/lua/`, called by SHA (loaded again when Redis answers NOSCRIPT, e.g. after
//! a restart), and every key a script touches is passed to it in `KEYS`. Where a script must act on jobs found
//! at run time (the head of `wait`, expired leases, retention), the ids are read first and a script re-checks
//! each of them atomically. Every time that orders or expires something is the Redis server's `TIME`.
//!
//! Idle workers wait inside Redis: one task per process blocks on `BZPOPMIN` of the `marker` set, on a
//! connection of its own, and wakes the process's waiting [`Queue::take`] calls; the scripts that make work
//! ready add to `marker`.
//!
//! Redis Cluster: since a queue lives in one slot, the queue asks the configured nodes which master holds that
//! slot (`CLUSTER KEYSLOT`, `CLUSTER SLOTS`) and talks to that master alone, asking again after a `MOVED` reply
//! or a lost connection.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex as StdMutex};
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use ::redis::{AsyncConnectionConfig, Client, ConnectionAddr, ConnectionInfo, ErrorKind, RedisError, Script, Value};
use serde_json::Value as Json;
use tokio::sync::{Notify, RwLock};
use tokio::time::Instant;

use super::{
    CancelOutcome, Enqueued, Event, EventKind, FailOutcome, Failure, Job, JobId, JobPage, JobState, Lease, LeaseToken,
    LogLine, MinuteCounts, NewJob, Notes, Progress, Queue, QueueError, QueueSettings, Recovered, Renewal, Stats,
    WorkerInfo,
};
use crate::job::StageOutput;
use crate::secret::SecretUrl;

/// Time allowed to open a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed for a reply on the shared connection before the call counts as failed.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest single `BZPOPMIN`: an idle process sends one, plus one take script, per this long.
const IDLE_BLOCK: Duration = Duration::from_secs(5);
/// Pause after the blocking connection failed, so that a Redis outage is not a busy loop.
const BLOCKER_BACKOFF: Duration = Duration::from_secs(1);
/// Most ids of the head of `wait` a take reply brings for the next take to offer (see take_jobs in common.lua);
/// a reply brings as many as this process's last take and the takes in flight before it could use, and [`SPARE`]
/// more.
const HEAD: usize = 64;
/// Head ids a take offers beyond those that the takes ahead of it and its own want may use.
const SPARE: usize = 4;
/// Jobs per enqueue script call.
const ENQUEUE_BATCH: usize = 200;
/// Jobs per recovery, retry or purge script call.
const JOB_BATCH: usize = 100;
/// Count-retention evictions that may pile up before a finishing call purges them.
const PURGE_AT: i64 = 64;
/// Blocking event readers kept open between calls.
const EVENT_CONNECTIONS_KEPT: usize = 4;

macro_rules! lua {
    ($name:literal) => {
        LazyLock::new(|| {
            Script::new(concat!(include_str!("lua/common.lua"), include_str!(concat!("lua/", $name, ".lua"))))
        })
    };
}

static ENQUEUE: LazyLock<Script> = lua!("enqueue");
static TAKE: LazyLock<Script> = lua!("take");
static RENEW: LazyLock<Script> = lua!("renew");
static COMPLETE: LazyLock<Script> = lua!("complete");
static FAIL: LazyLock<Script> = lua!("fail");
static CANCELLED: LazyLock<Script> = lua!("cancelled");
static RELEASE: LazyLock<Script> = lua!("release");
static STALLED: LazyLock<Script> = lua!("stalled");
static RECOVER: LazyLock<Script> = lua!("recover");
static CANCEL: LazyLock<Script> = lua!("cancel");
static RETRY: LazyLock<Script> = lua!("retry");
static PROMOTE: LazyLock<Script> = lua!("promote");
static PAUSE: LazyLock<Script> = lua!("pause");
static WAKE: LazyLock<Script> = lua!("wake");
static HEARTBEAT: LazyLock<Script> = lua!("heartbeat");
static NOTE: LazyLock<Script> = lua!("note");
static CHECKPOINT: LazyLock<Script> = lua!("checkpoint");
static LOG: LazyLock<Script> = lua!("log");
static LOGS: LazyLock<Script> = lua!("logs");
static PURGE: LazyLock<Script> = lua!("purge");
static ENDED: LazyLock<Script> = lua!("ended");
static GET: LazyLock<Script> = lua!("get");
static PAGE: LazyLock<Script> = lua!("page");
static STATS: LazyLock<Script> = lua!("stats");

/// Where the queue lives.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// One URL for a single Redis; for a cluster, any of its nodes (more than one, so that one may be down).
    pub urls: Vec<SecretUrl>,
    /// Talk to a Redis Cluster: `redis.cluster`, or implied by naming several URLs.
    pub cluster: bool,
    /// Prefix of every key (`redis.prefix`).
    pub prefix: String,
    /// The queue's name, which is the keys' hash tag: keys are `<prefix>{<queue>}:…`.
    pub queue: String,
}

impl RedisOptions {
    /// The queue named `queue` on the Redis (or the cluster nodes) that `url` names: one URL, or several
    /// separated by commas, which means a cluster.
    pub fn new(url: &SecretUrl, cluster: bool, prefix: &str, queue: &str) -> Self {
        let urls: Vec<SecretUrl> =
            url.expose().split(',').map(str::trim).filter(|part| !part.is_empty()).map(SecretUrl::new).collect();
        let cluster = cluster || urls.len() > 1;
        Self { urls, cluster, prefix: prefix.to_string(), queue: queue.to_string() }
    }

    /// The nodes for messages, passwords hidden.
    fn redacted(&self) -> String {
        self.urls.iter().map(SecretUrl::redacted).collect::<Vec<_>>().join(",")
    }
}

/// What `CONFIG GET maxmemory-policy` said at start. Anything but `noeviction` lets Redis delete queue keys
/// under memory pressure, losing jobs, so the queue warns about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryPolicy {
    /// `noeviction`: the only safe policy.
    NoEviction,
    /// Another policy, by name.
    Evicts(String),
    /// The policy could not be read (managed Redis often refuses `CONFIG`); the reason.
    Unknown(String),
}

/// The names of one queue's keys.
#[derive(Debug, Clone)]
struct Keys {
    base: String,
    meta: String,
    wait: String,
    delayed: String,
    active: String,
    completed: String,
    failed: String,
    cancelled: String,
    marker: String,
    events: String,
    ikeys: String,
    prio: String,
    seq: String,
    fseq: String,
    trash: String,
    workers: String,
    winfo: String,
    per_minute_completed: String,
    per_minute_failed: String,
}

impl Keys {
    fn new(prefix: &str, queue: &str) -> Self {
        let base = format!("{prefix}{{{queue}}}:");
        let key = |name: &str| format!("{base}{name}");
        Self {
            meta: key("meta"),
            wait: key("wait"),
            delayed: key("delayed"),
            active: key("active"),
            completed: key("completed"),
            failed: key("failed"),
            cancelled: key("cancelled"),
            marker: key("marker"),
            events: key("events"),
            ikeys: key("ikeys"),
            prio: key("prio"),
            seq: key("seq"),
            fseq: key("fseq"),
            trash: key("trash"),
            workers: key("workers"),
            winfo: key("workers:info"),
            per_minute_completed: key("metrics:completed"),
            per_minute_failed: key("metrics:failed"),
            base,
        }
    }

    fn job(&self, id: &str) -> String {
        format!("{}job:{id}", self.base)
    }

    fn checkpoints(&self, id: &str) -> String {
        format!("{}job:{id}:cp", self.base)
    }

    fn log(&self, id: &str) -> String {
        format!("{}job:{id}:log", self.base)
    }

    /// The job, its checkpoints and its log.
    fn job_keys(&self, id: &str) -> [String; 3] {
        [self.job(id), self.checkpoints(id), self.log(id)]
    }

    /// The sorted set holding jobs of a state.
    fn state_set(&self, state: JobState) -> &str {
        match state {
            JobState::Waiting => &self.wait,
            JobState::Delayed => &self.delayed,
            JobState::Active => &self.active,
            JobState::Completed => &self.completed,
            JobState::Failed => &self.failed,
            JobState::Cancelled => &self.cancelled,
        }
    }
}

/// Ids are UUIDs; anything else cannot name a job, and must not be spliced into key names.
fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn unavailable(error: &RedisError) -> QueueError {
    QueueError::Unavailable(error.to_string())
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------------------------------------------------------
// Connections

/// How to reach the Redis that holds the queue's slot.
enum Mode {
    Single(Client),
    Cluster { seeds: Vec<ConnectionInfo>, slot_key: String },
}

/// The Redis node in use now.
#[derive(Clone)]
struct Node {
    /// Changes whenever the node is looked up again, so that dedicated connections know to reconnect.
    generation: u64,
    client: Client,
    shared: ConnectionManager,
}

/// The shared (multiplexed, reconnecting) connection, and where to open dedicated ones.
struct Link {
    mode: Mode,
    node: RwLock<Option<Node>>,
    /// Set after a `MOVED` reply or a lost connection on a cluster: look the slot's master up again.
    stale: AtomicBool,
    generation: AtomicU64,
}

impl Link {
    /// Where `options` point, for the keys in `slot_key`'s slot. Connects on first use.
    fn new(options: &RedisOptions, slot_key: &str) -> Result<Self, QueueError> {
        let mut infos = Vec::new();
        for url in &options.urls {
            let client = Client::open(url.expose())
                .map_err(|error| QueueError::Invalid(format!("Redis URL {}: {error}", url.redacted())))?;
            infos.push(client.get_connection_info().clone());
        }
        let mode = if options.cluster {
            Mode::Cluster { seeds: infos, slot_key: slot_key.to_string() }
        } else {
            let info = infos.into_iter().next().ok_or_else(|| QueueError::Invalid("no Redis URL given".into()))?;
            Mode::Single(Client::open(info).map_err(|error| QueueError::Invalid(error.to_string()))?)
        };
        Ok(Self { mode, node: RwLock::new(None), stale: AtomicBool::new(false), generation: AtomicU64::new(0) })
    }

    async fn node(&self) -> Result<Node, QueueError> {
        if !self.stale.load(Ordering::Acquire)
            && let Some(node) = self.node.read().await.clone()
        {
            return Ok(node);
        }
        let mut current = self.node.write().await;
        if !self.stale.load(Ordering::Acquire)
            && let Some(node) = current.clone()
        {
            return Ok(node);
        }
        let client = match &self.mode {
            Mode::Single(client) => client.clone(),
            Mode::Cluster { seeds, slot_key } => discover(seeds, slot_key).await?,
        };
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(CONNECT_TIMEOUT)
            .set_response_timeout(RESPONSE_TIMEOUT)
            .set_number_of_retries(2)
            .set_factor(100)
            .set_max_delay(1000);
        let shared = tokio::time::timeout(CONNECT_TIMEOUT * 2, client.get_connection_manager_with_config(config))
            .await
            .map_err(|_| QueueError::Unavailable("Redis did not answer in time".into()))?
            .map_err(|error| unavailable(&error))?;
        let node = Node { generation: self.generation.fetch_add(1, Ordering::AcqRel) + 1, client, shared };
        *current = Some(node.clone());
        self.stale.store(false, Ordering::Release);
        Ok(node)
    }

    /// Notes a failed call: on a cluster, a moved slot or a lost node means asking the cluster again.
    fn failed(&self, error: &RedisError) {
        if matches!(self.mode, Mode::Cluster { .. })
            && (error.is_cluster_error()
                || error.is_io_error()
                || error.is_connection_dropped()
                || error.is_connection_refusal()
                || error.is_timeout()
                || matches!(error.kind(), ErrorKind::ReadOnly | ErrorKind::MasterDown))
        {
            self.stale.store(true, Ordering::Release);
        }
    }

    /// A connection of its own, for a blocking command.
    async fn dedicated(&self, response_timeout: Duration) -> Result<(u64, MultiplexedConnection), QueueError> {
        let node = self.node().await?;
        let config =
            AsyncConnectionConfig::new().set_connection_timeout(CONNECT_TIMEOUT).set_response_timeout(response_timeout);
        let connection = node.client.get_multiplexed_async_connection_with_config(&config).await.map_err(|error| {
            self.failed(&error);
            unavailable(&error)
        })?;
        Ok((node.generation, connection))
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

/// Finds the master that holds `slot_key`'s slot, asking each seed in turn.
async fn discover(seeds: &[ConnectionInfo], slot_key: &str) -> Result<Client, QueueError> {
    let mut errors = Vec::new();
    for seed in seeds {
        match discover_from(seed, slot_key).await {
            Ok(client) => return Ok(client),
            Err(error) => errors.push(format!("{}: {error}", seed.addr)),
        }
    }
    Err(QueueError::Unavailable(format!("no Redis Cluster node told where the queue lives ({})", errors.join("; "))))
}

async fn discover_from(seed: &ConnectionInfo, slot_key: &str) -> Result<Client, String> {
    let client = Client::open(seed.clone()).map_err(|error| error.to_string())?;
    let config =
        AsyncConnectionConfig::new().set_connection_timeout(CONNECT_TIMEOUT).set_response_timeout(RESPONSE_TIMEOUT);
    let mut connection =
        client.get_multiplexed_async_connection_with_config(&config).await.map_err(|error| error.to_string())?;
    let slot: i64 = ::redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(slot_key)
        .query_async(&mut connection)
        .await
        .map_err(|error| error.to_string())?;
    let ranges: Value =
        ::redis::cmd("CLUSTER").arg("SLOTS").query_async(&mut connection).await.map_err(|error| error.to_string())?;
    for range in array(ranges) {
        let range = array(range);
        let (Some(start), Some(end)) = (range.first().and_then(int), range.get(1).and_then(int)) else { continue };
        if !(start..=end).contains(&slot) {
            continue;
        }
        let master = range.get(2).cloned().map(array).unwrap_or_default();
        let host = master.first().and_then(text).unwrap_or_default();
        let port = master.get(1).and_then(int).and_then(|port| u16::try_from(port).ok()).ok_or("no master port")?;
        let mut info = seed.clone();
        info.addr = match &seed.addr {
            ConnectionAddr::Tcp(seed_host, _) => {
                ConnectionAddr::Tcp(if host.is_empty() || host == "?" { seed_host.clone() } else { host }, port)
            }
            ConnectionAddr::TcpTls { host: seed_host, insecure, tls_params, .. } => ConnectionAddr::TcpTls {
                host: if host.is_empty() || host == "?" { seed_host.clone() } else { host },
                port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            ConnectionAddr::Unix(_) => return Err("a cluster node cannot be a Unix socket".into()),
        };
        return Client::open(info).map_err(|error| error.to_string());
    }
    Err(format!("no master serves slot {slot}"))
}

// ---------------------------------------------------------------------------------------------------------------
// Reply decoding

fn array(value: Value) -> Vec<Value> {
    match value {
        Value::Array(items) | Value::Set(items) => items,
        Value::Map(pairs) => pairs.into_iter().flat_map(|(key, value)| [key, value]).collect(),
        _ => Vec::new(),
    }
}

fn int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(n) => Some(*n),
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok()?.parse().ok(),
        Value::SimpleString(text) => text.parse().ok(),
        Value::Double(n) => Some(*n as i64),
        _ => None,
    }
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        Value::SimpleString(text) => Some(text.clone()),
        Value::Int(n) => Some(n.to_string()),
        Value::Double(n) => Some(n.to_string()),
        _ => None,
    }
}

/// [`text`] of an owned value, without copying its bytes when they are UTF-8.
fn into_text(value: Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => Some(
            String::from_utf8(bytes).unwrap_or_else(|error| String::from_utf8_lossy(error.as_bytes()).into_owned()),
        ),
        Value::SimpleString(text) => Some(text),
        other => text(&other),
    }
}

fn texts(value: Value) -> Vec<String> {
    array(value).into_iter().filter_map(into_text).collect()
}

/// A flat `[field, value, ...]` reply as a map.
fn fields(value: Value) -> HashMap<String, String> {
    let mut items = texts(value).into_iter();
    let mut map = HashMap::with_capacity(items.len() / 2);
    while let (Some(field), Some(value)) = (items.next(), items.next()) {
        map.insert(field, value);
    }
    map
}

fn first_code(reply: &[Value]) -> i64 {
    reply.first().and_then(int).unwrap_or(0)
}

/// Reads a stored job.
fn decode_job(id: &str, state: &str, fields: &HashMap<String, String>) -> Result<Job, QueueError> {
    let corrupt = |message: String| QueueError::Corrupt { id: id.to_string(), message };
    let state = JobState::from_name(state).ok_or_else(|| corrupt(format!("unknown state {state:?}")))?;
    let spec: NewJob = serde_json::from_str(fields.get("spec").ok_or_else(|| corrupt("no spec".into()))?)
        .map_err(|error| corrupt(format!("spec: {error}")))?;
    let number = |name: &str| fields.get(name).and_then(|value| value.parse::<u64>().ok());
    let count = |name: &str| {
        fields.get(name).and_then(|value| value.parse::<i64>().ok()).map_or(0, |n| u32::try_from(n.max(0)).unwrap_or(0))
    };
    let progress = match fields.get("progress") {
        Some(json) => Some(serde_json::from_str(json).map_err(|error| corrupt(format!("progress: {error}")))?),
        None => None,
    };
    let result = match fields.get("result") {
        Some(json) => Some(serde_json::from_str(json).map_err(|error| corrupt(format!("result: {error}")))?),
        None => None,
    };
    Ok(Job {
        id: id.to_string(),
        state,
        spec,
        attempts: count("attempts"),
        stalls: count("stalls"),
        created_at: number("created").unwrap_or(0),
        started_at: number("started"),
        finished_at: if state.is_final() { number("finished") } else { None },
        ready_at: number("ready"),
        worker: fields.get("worker").cloned(),
        progress,
        result,
        error: fields.get("error").cloned(),
        cancel_requested: fields.get("cancel").is_some_and(|flag| flag == "1"),
    })
}

/// A job the take script handed out: its fields (HGETALL) as a lease.
fn leased(value: Value) -> Result<Lease, QueueError> {
    let fields = fields(value);
    let id = fields.get("id").cloned().unwrap_or_default();
    let token = fields
        .get("token")
        .cloned()
        .ok_or_else(|| QueueError::Corrupt { id: id.clone(), message: "taken without a lease token".into() })?;
    let resume = fields.get("fresh").is_none_or(|fresh| fresh != "1");
    let job = decode_job(&id, "active", &fields)?;
    Ok(Lease { job, token: LeaseToken(token), resume })
}

/// The notes as ARGV for write_notes (common.lua): the events, the progress to store, the log lines. Held-back
/// checkpoints are not among them: only [`Queue::note`] writes those (a completion drops them). A completion
/// streams no progress events either (see [`Queue::complete_and_take`]).
fn note_args(id: &str, notes: &Notes, completing: bool) -> Result<Vec<String>, QueueError> {
    notes.check(id)?;
    let invalid = |error: serde_json::Error| QueueError::Invalid(format!("notes about job {id}: {error}"));
    let events: Vec<&EventKind> = notes.streamed(completing).collect();
    let mut args = vec![events.len().to_string()];
    for event in events {
        args.push(serde_json::to_string(event).map_err(invalid)?);
    }
    args.push(match notes.last_progress() {
        Some(progress) => serde_json::to_string(progress).map_err(invalid)?,
        None => String::new(),
    });
    args.push(notes.log.len().to_string());
    args.extend(notes.log.iter().cloned());
    Ok(args)
}

/// One stream entry, `[id, [field, value, ...]]`.
fn decode_event(entry: Value) -> Option<Event> {
    let mut entry = array(entry).into_iter();
    let id = text(&entry.next()?)?;
    let fields = fields(entry.next()?);
    let kind: EventKind = match serde_json::from_str(fields.get("e")?) {
        Ok(kind) => kind,
        Err(error) => {
            tracing::warn!(event = %id, %error, "skipping an event this version cannot read");
            return None;
        }
    };
    Some(Event {
        id,
        job_id: fields.get("j")?.clone(),
        at: fields.get("t").and_then(|at| at.parse().ok()).unwrap_or(0),
        kind,
    })
}

/// A stream id as Redis accepts it: `ms` or `ms-seq`.
fn valid_stream_id(id: &str) -> bool {
    let mut parts = id.splitn(2, '-');
    let digits = |part: &str| !part.is_empty() && part.len() <= 20 && part.bytes().all(|b| b.is_ascii_digit());
    parts.next().is_some_and(digits) && parts.next().is_none_or(digits)
}

// ---------------------------------------------------------------------------------------------------------------
// Waking idle takers

/// The process's idle [`Queue::take`] calls and the one task that blocks in Redis for them.
#[derive(Default)]
struct Wake {
    notify: Notify,
    waiters: AtomicUsize,
    running: AtomicBool,
    /// The last take found nothing ready and no wake-up has come since: new takes wait for one instead of
    /// asking Redis, so that an idle process sends the same few commands whatever its concurrency.
    empty: AtomicBool,
    /// When the next delayed job is due, as the last take script said.
    due: StdMutex<Option<Instant>>,
}

impl Wake {
    fn set_due(&self, due: Option<Duration>) {
        *self.due.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = due.map(|after| Instant::now() + after);
    }

    fn due(&self) -> Option<Instant> {
        *self.due.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn clear_due_before(&self, now: Instant) {
        let mut due = self.due.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if due.is_some_and(|at| at <= now) {
            *due = None;
        }
    }
}

/// A counter for guards that count nothing.
static DONE: AtomicUsize = AtomicUsize::new(0);

/// Counts a take script call in flight while it lives.
struct Taking<'a>(&'a AtomicUsize);

impl Drop for Taking<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Lowers a flag when dropped, however the work it guards ends.
struct Lowered<'a>(&'a AtomicBool);

impl Drop for Lowered<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Counts a waiting take while it lives.
struct Waiter<'a>(&'a Wake);

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.0.waiters.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Blocks on `marker` while takes are waiting and wakes one of them per marker, per due delayed job, and once
/// per [`IDLE_BLOCK`] in any case (so that a wake-up lost elsewhere delays a job by that much at most).
async fn run_blocker(inner: Arc<Inner>) {
    let wake = &inner.wake;
    let mut connection = inner.blocking.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
    loop {
        if wake.waiters.load(Ordering::Acquire) == 0 {
            // Kept for the next task, which then needs no new connection.
            *inner.blocking.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = connection.take();
            wake.running.store(false, Ordering::Release);
            if wake.waiters.load(Ordering::Acquire) == 0 || wake.running.swap(true, Ordering::AcqRel) {
                return;
            }
            connection = inner.blocking.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        }
        let block = wake
            .due()
            .map_or(IDLE_BLOCK, |due| due.saturating_duration_since(Instant::now()).min(IDLE_BLOCK))
            .max(Duration::from_millis(10));
        if connection.as_ref().is_none_or(|(generation, _)| *generation != inner.link.generation()) {
            match inner.link.dedicated(IDLE_BLOCK + RESPONSE_TIMEOUT).await {
                Ok(opened) => connection = Some(opened),
                Err(error) => {
                    tracing::debug!(%error, "queue wake-up connection unavailable");
                    wake.notify.notify_one();
                    tokio::time::sleep(BLOCKER_BACKOFF).await;
                    continue;
                }
            }
        }
        let Some((_, blocking)) = connection.as_mut() else { continue };
        let reply: Result<Value, RedisError> = ::redis::cmd("BZPOPMIN")
            .arg(&inner.keys.marker)
            .arg(format!("{:.3}", block.as_secs_f64()))
            .query_async(blocking)
            .await;
        let now = Instant::now();
        if wake.due().is_some_and(|due| due <= now) {
            wake.empty.store(false, Ordering::Release);
        }
        wake.clear_due_before(now);
        match reply {
            Ok(Value::Nil) => wake.notify.notify_one(),
            Ok(_) if wake.waiters.load(Ordering::Acquire) == 0 => {
                // Nobody here wants it any more: put the wake-up back for another process.
                let _ = inner.script::<Value>(&WAKE, &[&inner.keys.marker, &inner.keys.meta], &[]).await;
            }
            Ok(reply) => {
                // [marker, member, score]: a member other than '0' names a job that just became ready.
                if let Some(id) = array(reply).get(1).and_then(text).filter(|id| id != "0" && valid_id(id)) {
                    inner.hint(id);
                }
                wake.empty.store(false, Ordering::Release);
                wake.notify.notify_one();
            }
            Err(error) => {
                tracing::debug!(%error, "queue wake-up wait failed");
                inner.link.failed(&error);
                connection = None;
                wake.notify.notify_one();
                tokio::time::sleep(BLOCKER_BACKOFF).await;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The queue

/// A [`Queue`] in Redis. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct RedisQueue {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisQueue").field("keys", &self.inner.keys.base).finish_non_exhaustive()
    }
}

struct Inner {
    keys: Keys,
    settings: QueueSettings,
    link: Link,
    wake: Wake,
    /// The head of `wait` as the last take saw it; the next take offers these ids (see take.lua).
    head: StdMutex<Vec<String>>,
    /// Dedicated connections for blocking event reads, kept between calls.
    readers: StdMutex<Vec<(u64, MultiplexedConnection)>>,
    /// The blocking task's connection while no task runs, so that a task started again does not connect again.
    blocking: StdMutex<Option<(u64, MultiplexedConnection)>>,
    /// Take script calls in flight (takes, and completions that take the next job); each offers this many head
    /// ids and a few more, since those before it may take the first ones.
    taking: AtomicUsize,
    /// The `want` of this process's last take, plus the takes in flight before it: replies bring that many head
    /// ids and a few more.
    head_want: AtomicUsize,
    /// A purge of the trash is under way in this process (see `after_finish`).
    purging: AtomicBool,
    memory_policy: MemoryPolicy,
}

/// What one take script call found.
enum Took {
    /// Jobs, and how many are still waiting.
    Jobs(Vec<Lease>, u64),
    /// Nothing ready (or paused); the next delayed job is due after this long.
    Idle(Option<Duration>),
    /// Other takers kept getting the head first: jobs are there, ask again.
    Busy,
}

impl Inner {
    /// Runs a script by SHA (loading it on NOSCRIPT), once more after a cluster `MOVED` reply.
    async fn script<T: ::redis::FromRedisValue>(
        &self,
        script: &Script,
        keys: &[&str],
        args: &[&str],
    ) -> Result<T, QueueError> {
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(*key);
        }
        for arg in args {
            invocation.arg(*arg);
        }
        let invocation = &invocation;
        self.on_node(|mut connection| async move { invocation.invoke_async(&mut connection).await }).await
    }

    /// A plain read command, once more after a cluster `MOVED` reply.
    async fn read<T: ::redis::FromRedisValue>(&self, command: &::redis::Cmd) -> Result<T, QueueError> {
        self.on_node(|mut connection| async move { command.query_async(&mut connection).await }).await
    }

    /// Makes `call` on the queue's node; once more when a cluster answers that the slot moved (`MOVED`, `ASK`,
    /// `TRYAGAIN`). Every failure is reported to the link, which reconnects or finds the slot's new node.
    async fn on_node<T, F, Fut>(&self, mut call: F) -> Result<T, QueueError>
    where
        F: FnMut(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = Result<T, RedisError>>,
    {
        let mut last = None;
        for _ in 0..2 {
            match call(self.link.node().await?.shared).await {
                Ok(value) => return Ok(value),
                Err(error) => {
                    self.link.failed(&error);
                    let again = matches!(error.kind(), ErrorKind::Moved | ErrorKind::Ask | ErrorKind::TryAgain);
                    last = Some(error);
                    if !again {
                        break;
                    }
                }
            }
        }
        Err(last.map_or_else(|| QueueError::Unavailable("no reply".into()), |error| unavailable(&error)))
    }

    fn max_events(&self) -> String {
        self.settings.max_events.max(1).to_string()
    }

    /// The head ids a take of `want` jobs offers, counting itself in flight until the guard drops: the takes sent
    /// before it and not answered yet may take up to that many head ids first, so it offers the head up to there
    /// and a few more (a miss costs a retry, never a wrong job: the script checks). The offer always starts at
    /// the head, since takes ahead of it may also miss and take nothing.
    fn candidates(&self, want: usize) -> (Vec<String>, Taking<'_>) {
        let before = self.taking.fetch_add(1, Ordering::AcqRel);
        self.head_want.store(before + want, Ordering::Relaxed);
        let head = self.head.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let end = (before + want + SPARE).min(head.len());
        (head[..end].to_vec(), Taking(&self.taking))
    }

    /// The head ids for a completion's take of one job, only while no other take of this process is in flight:
    /// concurrent takes would each have to offer the head ids all of them may take (dozens of keys per call at
    /// concurrency 50). A completion that finds another take in flight takes nothing; its slot is filled by the
    /// worker's next batched take.
    fn candidates_alone(&self) -> Option<(Vec<String>, Taking<'_>)> {
        self.taking.compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire).ok()?;
        let head = self.head.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let end = (1 + SPARE).min(head.len());
        Some((head[..end].to_vec(), Taking(&self.taking)))
    }

    /// Puts an id a wake-up named (see `wake` in common.lua) at the front of the head the next take offers.
    fn hint(&self, id: String) {
        let mut head = self.head.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        head.retain(|known| *known != id);
        head.insert(0, id);
        head.truncate(HEAD);
    }

    /// How many head ids a take reply brings: enough for the next batched take, at most [`HEAD`].
    fn head_size(&self) -> String {
        (self.head_want.load(Ordering::Relaxed) + SPARE).min(HEAD).to_string()
    }

    fn set_head(&self, head: Vec<String>) {
        *self.head.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = head;
    }

    /// Take script calls until jobs are taken, nothing is ready, or the head kept moving.
    async fn take_once(&self, worker: &WorkerInfo, want: usize) -> Result<Took, QueueError> {
        let token = uuid::Uuid::new_v4().to_string();
        let lease_ms = millis(self.settings.lease).max(1).to_string();
        let max_events = self.max_events();
        let want_n = want.max(1);
        let want = want_n.to_string();
        let k = &self.keys;
        for _ in 0..4 {
            let (candidates, _taking) = self.candidates(want_n);
            let head_size = self.head_size();
            let job_keys: Vec<String> = candidates.iter().map(|id| k.job(id)).collect();
            let mut keys =
                vec![k.meta.as_str(), &k.wait, &k.delayed, &k.active, &k.marker, &k.events, &k.prio, &k.seq, &k.fseq];
            keys.extend(job_keys.iter().map(String::as_str));
            let count = candidates.len().to_string();
            let mut args = vec![lease_ms.as_str(), &worker.id, &token, &max_events, &head_size, &want, &count];
            args.extend(candidates.iter().map(String::as_str));
            let reply = array(self.script::<Value>(&TAKE, &keys, &args).await?);
            match first_code(&reply) {
                1 => {
                    let remaining = reply.get(1).and_then(int).unwrap_or(0);
                    let mut reply = reply.into_iter().skip(2);
                    self.set_head(texts(reply.next().unwrap_or(Value::Nil)));
                    let leases = reply.map(leased).collect::<Result<Vec<_>, _>>()?;
                    return Ok(Took::Jobs(leases, u64::try_from(remaining).unwrap_or(0)));
                }
                3 => self.set_head(texts(reply.into_iter().nth(1).unwrap_or(Value::Nil))),
                _ => {
                    let due = reply.get(1).and_then(int).unwrap_or(-1);
                    let now = reply.get(2).and_then(int).unwrap_or(0);
                    let due = (due >= 0).then(|| Duration::from_millis(u64::try_from(due - now).unwrap_or(0)));
                    return Ok(Took::Idle(due));
                }
            }
        }
        Ok(Took::Busy)
    }

    /// Deletes the keys of jobs that count retention dropped.
    async fn purge_trash(&self) -> Result<u64, QueueError> {
        let mut total = 0;
        for _ in 0..10 {
            let ids: Vec<String> = self.read(::redis::cmd("SRANDMEMBER").arg(&self.keys.trash).arg(JOB_BATCH)).await?;
            if ids.is_empty() {
                break;
            }
            total += self.purge(&self.keys.trash, -1, &ids).await?;
            if ids.len() < JOB_BATCH {
                break;
            }
        }
        Ok(total)
    }

    async fn purge(&self, set: &str, cutoff: i64, ids: &[String]) -> Result<u64, QueueError> {
        let job_keys: Vec<String> = ids.iter().flat_map(|id| self.keys.job_keys(id)).collect();
        let mut keys = vec![self.keys.trash.as_str(), set];
        keys.extend(job_keys.iter().map(String::as_str));
        let cutoff = cutoff.to_string();
        let count = ids.len().to_string();
        let mut args = vec![cutoff.as_str(), &count];
        args.extend(ids.iter().map(String::as_str));
        let removed: i64 = self.script(&PURGE, &keys, &args).await?;
        Ok(u64::try_from(removed).unwrap_or(0))
    }

    /// After a finishing script: purges evicted jobs once enough have piled up.
    /// Deletes jobs past the retention count once enough wait for it. One purge at a time per process: the
    /// completions finishing meanwhile leave the trash to it (concurrent purges would read the same ids and
    /// each declare hundreds of keys to delete them once).
    async fn after_finish(&self, trash: i64) {
        if trash < PURGE_AT || self.purging.swap(true, Ordering::AcqRel) {
            return;
        }
        let _purging = Lowered(&self.purging);
        if let Err(error) = self.purge_trash().await {
            tracing::warn!(%error, "could not delete jobs past the retention count; will try again");
        }
    }

    async fn get_many(&self, ids: &[String]) -> Result<Vec<Option<Job>>, QueueError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let job_keys: Vec<String> = ids.iter().map(|id| self.keys.job(id)).collect();
        let mut keys = vec![self.keys.delayed.as_str(), &self.keys.trash];
        keys.extend(job_keys.iter().map(String::as_str));
        let args: Vec<&str> = ids.iter().map(String::as_str).collect();
        let reply = array(self.script::<Value>(&GET, &keys, &args).await?);
        ids.iter()
            .zip(reply.into_iter().chain(std::iter::repeat(Value::Nil)))
            .map(|(id, found)| {
                let mut found = array(found).into_iter();
                let Some(state) = found.next().as_ref().and_then(text) else { return Ok(None) };
                decode_job(id, &state, &fields(found.next().unwrap_or(Value::Nil))).map(Some)
            })
            .collect()
    }

    /// Maps a fencing code of a worker's write.
    fn fenced(id: &str, code: i64) -> Result<(), QueueError> {
        match code {
            1 => Ok(()),
            -1 => {
                tracing::debug!(job = id, "fenced write refused: the job is gone");
                Err(QueueError::LeaseLost(id.to_string()))
            }
            -2 => {
                tracing::debug!(job = id, "fenced write refused: the job is no longer active");
                Err(QueueError::LeaseLost(id.to_string()))
            }
            -3 => {
                tracing::debug!(job = id, "fenced write refused: another lease holds the job");
                Err(QueueError::LeaseLost(id.to_string()))
            }
            -4 => {
                tracing::debug!(job = id, "fenced write refused: the lease expired");
                Err(QueueError::LeaseLost(id.to_string()))
            }
            other => Err(QueueError::Unavailable(format!("unexpected reply {other} about job {id}"))),
        }
    }

    async fn blocking_events(&self, after: &str, limit: usize, wait: Duration) -> Result<Vec<Event>, QueueError> {
        let reader = {
            let mut readers = self.readers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let generation = self.link.generation();
            readers.retain(|(at, _)| *at == generation);
            readers.pop()
        };
        let (generation, mut connection) = match reader {
            Some(reader) => reader,
            None => self.link.dedicated(RESPONSE_TIMEOUT).await?,
        };
        let block = millis(wait).max(1);
        let reply = tokio::time::timeout(
            wait + RESPONSE_TIMEOUT,
            ::redis::cmd("XREAD")
                .arg("COUNT")
                .arg(limit)
                .arg("BLOCK")
                .arg(block)
                .arg("STREAMS")
                .arg(&self.keys.events)
                .arg(after)
                .query_async::<Value>(&mut connection),
        )
        .await;
        let reply = match reply {
            Ok(Ok(reply)) => reply,
            Ok(Err(error)) => {
                self.link.failed(&error);
                return Err(unavailable(&error));
            }
            Err(_) => return Err(QueueError::Unavailable("Redis did not answer a blocking read in time".into())),
        };
        {
            let mut readers = self.readers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if readers.len() < EVENT_CONNECTIONS_KEPT {
                readers.push((generation, connection));
            }
        }
        Ok(stream_entries(reply))
    }
}

/// The entries of an `XREAD` reply for one stream (RESP2 array or RESP3 map).
fn stream_entries(reply: Value) -> Vec<Event> {
    let mut streams = array(reply).into_iter();
    let mut events = Vec::new();
    while let Some(stream) = streams.next() {
        // RESP3: key, entries, key, entries... RESP2: [key, entries], ...
        let entries = match stream {
            Value::Array(pair) if pair.len() == 2 && matches!(pair[1], Value::Array(_)) && text(&pair[0]).is_some() => {
                pair.into_iter().nth(1).unwrap_or(Value::Nil)
            }
            _ => streams.next().unwrap_or(Value::Nil),
        };
        events.extend(array(entries).into_iter().filter_map(decode_event));
    }
    events
}

impl RedisQueue {
    /// Connects to the queue's Redis (on a cluster: to the master holding its slot) and checks
    /// `maxmemory-policy`, warning unless it is `noeviction`.
    ///
    /// # Errors
    /// [`QueueError::Invalid`] for an unusable URL; [`QueueError::Unavailable`] when Redis cannot be reached.
    pub async fn connect(options: &RedisOptions, settings: QueueSettings) -> Result<Self, QueueError> {
        if options.urls.is_empty() {
            return Err(QueueError::Invalid("no Redis URL given".into()));
        }
        if options.queue.contains(['{', '}']) || options.prefix.contains('}') && !options.prefix.contains('{') {
            return Err(QueueError::Invalid(format!(
                "queue name {:?} and prefix {:?} must not break the key hash tag",
                options.queue, options.prefix
            )));
        }
        let keys = Keys::new(&options.prefix, &options.queue);
        let link = Link::new(options, &keys.meta)?;
        let node = link.node().await.map_err(|error| match error {
            QueueError::Unavailable(message) => {
                QueueError::Unavailable(format!("Redis at {}: {message}", options.redacted()))
            }
            other => other,
        })?;
        let memory_policy = memory_policy(node.shared.clone()).await;
        match &memory_policy {
            MemoryPolicy::NoEviction => {}
            MemoryPolicy::Evicts(policy) => tracing::warn!(
                policy = %policy,
                "Redis maxmemory-policy is {policy}, not noeviction: under memory pressure Redis may delete queue \
                 keys and lose jobs; set `maxmemory-policy noeviction`"
            ),
            MemoryPolicy::Unknown(reason) => tracing::warn!(
                reason = %reason,
                "could not read Redis maxmemory-policy (CONFIG GET refused?); make sure it is noeviction, or jobs \
                 may be lost under memory pressure"
            ),
        }
        Ok(Self {
            inner: Arc::new(Inner {
                keys,
                settings,
                link,
                wake: Wake::default(),
                head: StdMutex::new(Vec::new()),
                blocking: StdMutex::new(None),
                taking: AtomicUsize::new(0),
                head_want: AtomicUsize::new(1),
                purging: AtomicBool::new(false),
                readers: StdMutex::new(Vec::new()),
                memory_policy,
            }),
        })
    }

    /// `maxmemory-policy` as read at start.
    pub fn memory_policy(&self) -> &MemoryPolicy {
        &self.inner.memory_policy
    }

    /// The prefix every key of this queue starts with (`<prefix>{<queue>}:`).
    pub fn key_prefix(&self) -> &str {
        &self.inner.keys.base
    }

    /// Enqueues valid jobs, one script call per batch.
    async fn enqueue_batch(&self, jobs: &[(String, NewJob)]) -> Result<Vec<Enqueued>, QueueError> {
        let k = &self.inner.keys;
        let job_keys: Vec<String> = jobs.iter().map(|(id, _)| k.job(id)).collect();
        let mut keys =
            vec![k.meta.as_str(), &k.wait, &k.delayed, &k.marker, &k.events, &k.ikeys, &k.prio, &k.seq, &k.fseq];
        keys.extend(job_keys.iter().map(String::as_str));
        let mut owned = vec![self.inner.max_events(), jobs.len().to_string()];
        for (id, job) in jobs {
            let ikey = job.idempotency_key.clone().or_else(|| job.recording_id.clone()).unwrap_or_default();
            let spec = serde_json::to_string(job).map_err(|error| QueueError::Invalid(error.to_string()))?;
            owned.extend([
                id.clone(),
                ikey,
                job.priority.to_string(),
                job.delay.map_or(0, millis).to_string(),
                job.max_attempts.to_string(),
                job.pipeline.clone(),
                spec,
            ]);
        }
        let args: Vec<&str> = owned.iter().map(String::as_str).collect();
        let reply = texts(self.inner.script::<Value>(&ENQUEUE, &keys, &args).await?);
        Ok(reply
            .chunks_exact(2)
            .map(
                |pair| {
                    if pair[0] == "1" {
                        Enqueued::Created(pair[1].clone())
                    } else {
                        Enqueued::Existing(pair[1].clone())
                    }
                },
            )
            .collect())
    }

    fn new_id() -> String {
        uuid::Uuid::new_v4().to_string()
    }
}

/// A reconnecting connection for keys sharing `key`'s hash slot: the Redis itself, or on a cluster the master
/// that holds the slot at start (for callers outside the queue, such as the shared AI request windows, whose
/// keys carry one hash tag).
///
/// # Errors
/// [`QueueError::Invalid`] for an unusable URL; [`QueueError::Unavailable`] when Redis cannot be reached.
pub async fn connection_for_key(options: &RedisOptions, key: &str) -> Result<ConnectionManager, QueueError> {
    let link = Link::new(options, key)?;
    link.node().await.map(|node| node.shared).map_err(|error| match error {
        QueueError::Unavailable(message) => {
            QueueError::Unavailable(format!("Redis at {}: {message}", options.redacted()))
        }
        other => other,
    })
}

/// Reads `maxmemory-policy`.
async fn memory_policy(mut connection: ConnectionManager) -> MemoryPolicy {
    let reply: Result<Value, RedisError> =
        ::redis::cmd("CONFIG").arg("GET").arg("maxmemory-policy").query_async(&mut connection).await;
    match reply {
        Ok(value) => match texts(value).get(1) {
            Some(policy) if policy == "noeviction" => MemoryPolicy::NoEviction,
            Some(policy) => MemoryPolicy::Evicts(policy.clone()),
            None => MemoryPolicy::Unknown("CONFIG GET maxmemory-policy returned nothing".into()),
        },
        Err(error) => MemoryPolicy::Unknown(error.to_string()),
    }
}

#[async_trait::async_trait]
impl Queue for RedisQueue {
    async fn enqueue(&self, job: NewJob) -> Result<Enqueued, QueueError> {
        job.check()?;
        let mut done = self.enqueue_batch(&[(Self::new_id(), job)]).await?;
        done.pop().ok_or_else(|| QueueError::Unavailable("enqueue returned nothing".into()))
    }

    async fn enqueue_many(&self, jobs: Vec<NewJob>) -> Result<Vec<Result<Enqueued, QueueError>>, QueueError> {
        let mut results: Vec<Option<Result<Enqueued, QueueError>>> = Vec::with_capacity(jobs.len());
        let mut valid = Vec::new();
        for (index, job) in jobs.into_iter().enumerate() {
            match job.check() {
                Ok(()) => {
                    valid.push((index, (Self::new_id(), job)));
                    results.push(None);
                }
                Err(error) => results.push(Some(Err(error))),
            }
        }
        let mut added_any = false;
        let mut first_error = None;
        for batch in valid.chunks(ENQUEUE_BATCH) {
            let jobs: Vec<(String, NewJob)> = batch.iter().map(|(_, job)| job.clone()).collect();
            match self.enqueue_batch(&jobs).await {
                Ok(done) => {
                    added_any = true;
                    for ((index, _), outcome) in batch.iter().zip(done) {
                        results[*index] = Some(Ok(outcome));
                    }
                }
                Err(error) => {
                    for (index, _) in batch {
                        results[*index] = Some(Err(QueueError::Unavailable(error.to_string())));
                    }
                    first_error.get_or_insert(error);
                }
            }
        }
        if !added_any && let Some(error) = first_error {
            return Err(error);
        }
        Ok(results
            .into_iter()
            .map(|result| result.unwrap_or_else(|| Err(QueueError::Unavailable("not sent".into()))))
            .collect())
    }

    async fn take(&self, worker: &WorkerInfo, wait: Duration) -> Result<Option<Lease>, QueueError> {
        Ok(self.take_many(worker, wait, 1).await?.pop())
    }

    async fn take_many(&self, worker: &WorkerInfo, wait: Duration, max: usize) -> Result<Vec<Lease>, QueueError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let inner = &self.inner;
        let wake = &inner.wake;
        let deadline = Instant::now() + wait;
        // Ask Redis at once unless the last look found nothing and the blocking task is watching for news.
        if !wake.empty.load(Ordering::Acquire) || !wake.running.load(Ordering::Acquire) || wait.is_zero() {
            match inner.take_once(worker, max).await? {
                Took::Jobs(leases, _) => {
                    wake.empty.store(false, Ordering::Release);
                    return Ok(leases);
                }
                Took::Idle(due) => {
                    wake.empty.store(true, Ordering::Release);
                    wake.set_due(due);
                }
                // Let the loop below ask again at once.
                Took::Busy => wake.notify.notify_one(),
            }
            if wait.is_zero() {
                return Ok(Vec::new());
            }
        }
        wake.waiters.fetch_add(1, Ordering::AcqRel);
        let _waiter = Waiter(wake);
        if !wake.running.swap(true, Ordering::AcqRel) {
            tokio::spawn(run_blocker(inner.clone()));
        }
        loop {
            tokio::select! {
                () = wake.notify.notified() => {}
                () = tokio::time::sleep_until(deadline) => return Ok(Vec::new()),
            }
            match inner.take_once(worker, max).await? {
                Took::Jobs(leases, remaining) => {
                    wake.empty.store(false, Ordering::Release);
                    let others = wake.waiters.load(Ordering::Acquire).saturating_sub(1);
                    for _ in 0..remaining.min(others as u64) {
                        wake.notify.notify_one();
                    }
                    return Ok(leases);
                }
                Took::Idle(due) => {
                    wake.empty.store(true, Ordering::Release);
                    wake.set_due(due);
                }
                Took::Busy => wake.notify.notify_one(),
            }
        }
    }

    async fn renew(&self, leases: &[(JobId, LeaseToken)]) -> Result<Vec<Renewal>, QueueError> {
        let lease_ms = millis(self.inner.settings.lease).max(1).to_string();
        let mut out = Vec::with_capacity(leases.len());
        for batch in leases.chunks(500) {
            let job_keys: Vec<String> = batch.iter().map(|(id, _)| self.inner.keys.job(id)).collect();
            let mut keys = vec![self.inner.keys.active.as_str()];
            keys.extend(job_keys.iter().map(String::as_str));
            let count = batch.len().to_string();
            let mut args = vec![lease_ms.as_str(), &count];
            for (id, token) in batch {
                args.push(id);
                args.push(&token.0);
            }
            let reply = array(self.inner.script::<Value>(&RENEW, &keys, &args).await?);
            out.extend(batch.iter().enumerate().map(|(index, (id, _))| match reply.get(index).and_then(int) {
                Some(1) => Renewal::Held,
                Some(2) => Renewal::CancelRequested,
                code => {
                    tracing::debug!(job = %id, ?code, "lease not renewed");
                    Renewal::Lost
                }
            }));
        }
        Ok(out)
    }

    async fn complete(&self, id: &str, token: &LeaseToken, result: Json) -> Result<(), QueueError> {
        self.complete_and_take(id, token, result, &Notes::default(), None).await.map(drop)
    }

    async fn complete_and_take(
        &self,
        id: &str,
        token: &LeaseToken,
        result: Json,
        notes: &Notes,
        next: Option<&WorkerInfo>,
    ) -> Result<Option<Lease>, QueueError> {
        if !valid_id(id) {
            return Err(QueueError::LeaseLost(id.to_string()));
        }
        let inner = &self.inner;
        let s = &inner.settings;
        let k = &inner.keys;
        let [job, cp, log] = k.job_keys(id);
        let result = serde_json::to_string(&result).map_err(|error| QueueError::Invalid(error.to_string()))?;
        let notes = note_args(id, notes, true)?;
        let alone = next.and_then(|worker| inner.candidates_alone().map(|taking| (worker, taking)));
        let (next, (candidates, _taking)) = match alone {
            Some((worker, taking)) => (Some(worker), taking),
            None => (None, (Vec::new(), Taking(&DONE))),
        };
        let job_keys: Vec<String> = candidates.iter().map(|id| k.job(id)).collect();
        let mut keys = vec![
            job.as_str(),
            &cp,
            &log,
            &k.active,
            &k.completed,
            &k.events,
            &k.ikeys,
            &k.trash,
            &k.per_minute_completed,
        ];
        if next.is_some() {
            keys.extend([k.meta.as_str(), &k.wait, &k.delayed, &k.marker, &k.prio, &k.seq, &k.fseq]);
            keys.extend(job_keys.iter().map(String::as_str));
        }
        let keep_ms = millis(s.keep_completed_for).to_string();
        let keep = s.keep_completed.to_string();
        let max_events = inner.max_events();
        let max_lines = s.max_log_lines.max(1).to_string();
        let lease_ms = millis(s.lease).max(1).to_string();
        let next_token = uuid::Uuid::new_v4().to_string();
        let head_size = inner.head_size();
        let worker = next.map_or("", |worker| worker.id.as_str());
        let mut args = vec![
            id,
            &token.0,
            &result,
            &keep_ms,
            &keep,
            &max_events,
            &max_lines,
            &lease_ms,
            worker,
            &next_token,
            &head_size,
        ];
        args.extend(notes.iter().map(String::as_str));
        let count = candidates.len().to_string();
        args.push(&count);
        args.extend(candidates.iter().map(String::as_str));
        let reply = array(inner.script::<Value>(&COMPLETE, &keys, &args).await?);
        Inner::fenced(id, first_code(&reply))?;
        let mut reply = reply.into_iter().skip(1);
        let trash = reply.next().as_ref().and_then(int).unwrap_or(0);
        let took = reply.next().as_ref().and_then(int).unwrap_or(0);
        let lease = match took {
            1 => {
                let remaining = reply.next().as_ref().and_then(int).unwrap_or(0);
                inner.set_head(texts(reply.next().unwrap_or(Value::Nil)));
                if remaining > 0 {
                    inner.wake.empty.store(false, Ordering::Release);
                }
                Some(leased(reply.next().unwrap_or(Value::Nil))?)
            }
            3 => {
                // The head moved under us: remember where it is now; the worker takes with take_many.
                let _ = reply.next();
                inner.set_head(texts(reply.next().unwrap_or(Value::Nil)));
                None
            }
            _ => None,
        };
        inner.after_finish(trash).await;
        Ok(lease)
    }

    async fn note(&self, id: &str, token: &LeaseToken, notes: &Notes) -> Result<(), QueueError> {
        if !valid_id(id) {
            return Err(QueueError::LeaseLost(id.to_string()));
        }
        let k = &self.inner.keys;
        let [job, cp, log] = k.job_keys(id);
        let mut note = note_args(id, notes, false)?;
        note.push(notes.checkpoints.len().to_string());
        for (key, output) in &notes.checkpoints {
            let json = serde_json::to_string(output).map_err(|error| QueueError::Invalid(error.to_string()))?;
            note.extend([key.clone(), json]);
        }
        let max_events = self.inner.max_events();
        let max_lines = self.inner.settings.max_log_lines.max(1).to_string();
        let mut args = vec![id, &token.0, &max_events, &max_lines];
        args.extend(note.iter().map(String::as_str));
        let reply = array(self.inner.script::<Value>(&NOTE, &[&job, &k.events, &k.active, &log, &cp], &args).await?);
        Inner::fenced(id, first_code(&reply))
    }

    async fn fail(&self, id: &str, token: &LeaseToken, failure: Failure) -> Result<FailOutcome, QueueError> {
        let s = &self.inner.settings;
        let k = &self.inner.keys;
        let [job, cp, log] = k.job_keys(id);
        let keys = [
            job.as_str(),
            &cp,
            &log,
            &k.active,
            &k.delayed,
            &k.failed,
            &k.events,
            &k.ikeys,
            &k.prio,
            &k.trash,
            &k.per_minute_failed,
            &k.marker,
            &k.meta,
        ];
        let retryable = if failure.retryable { "1" } else { "0" };
        let retry_after = failure.retry_after.map_or(-1, |after| i64::try_from(millis(after)).unwrap_or(i64::MAX));
        let retry_after = retry_after.to_string();
        let backoff = millis(s.backoff).to_string();
        let max_backoff = millis(s.max_backoff).to_string();
        let keep_ms = millis(s.keep_failed_for).to_string();
        let keep = s.keep_failed.to_string();
        let max_events = self.inner.max_events();
        let args = [
            id,
            &token.0,
            &failure.message,
            retryable,
            &retry_after,
            &backoff,
            &max_backoff,
            &keep_ms,
            &keep,
            &max_events,
        ];
        let reply = array(self.inner.script::<Value>(&FAIL, &keys, &args).await?);
        Inner::fenced(id, first_code(&reply))?;
        let value = reply.get(2).and_then(int).unwrap_or(0);
        if reply.get(1).and_then(int) == Some(1) {
            return Ok(FailOutcome::Retrying { at: u64::try_from(value).unwrap_or(0) });
        }
        self.inner.after_finish(value).await;
        Ok(FailOutcome::Failed)
    }

    async fn cancelled(&self, id: &str, token: &LeaseToken) -> Result<(), QueueError> {
        let s = &self.inner.settings;
        let k = &self.inner.keys;
        let [job, cp, log] = k.job_keys(id);
        let keys = [job.as_str(), &cp, &log, &k.active, &k.cancelled, &k.events, &k.ikeys, &k.trash];
        let keep_ms = millis(s.keep_failed_for).to_string();
        let keep = s.keep_failed.to_string();
        let max_events = self.inner.max_events();
        let args = [id, &token.0, &keep_ms, &keep, &max_events];
        let reply = array(self.inner.script::<Value>(&CANCELLED, &keys, &args).await?);
        Inner::fenced(id, first_code(&reply))?;
        self.inner.after_finish(reply.get(1).and_then(int).unwrap_or(0)).await;
        Ok(())
    }

    async fn release(&self, id: &str, token: &LeaseToken) -> Result<(), QueueError> {
        let s = &self.inner.settings;
        let k = &self.inner.keys;
        let [job, cp, log] = k.job_keys(id);
        let keys = [
            job.as_str(),
            &cp,
            &log,
            &k.active,
            &k.wait,
            &k.marker,
            &k.events,
            &k.seq,
            &k.fseq,
            &k.meta,
            &k.cancelled,
            &k.ikeys,
            &k.trash,
        ];
        let max_events = self.inner.max_events();
        let keep_ms = millis(s.keep_failed_for).to_string();
        let keep = s.keep_failed.to_string();
        let args = [id, &token.0, &max_events, &keep_ms, &keep];
        let reply = array(self.inner.script::<Value>(&RELEASE, &keys, &args).await?);
        match first_code(&reply) {
            2 => {
                self.inner.after_finish(reply.get(1).and_then(int).unwrap_or(0)).await;
                Ok(())
            }
            code => Inner::fenced(id, code),
        }
    }

    async fn recover_stalled(&self) -> Result<Vec<Recovered>, QueueError> {
        let s = &self.inner.settings;
        let k = &self.inner.keys;
        let max_stalls = s.max_stalls.to_string();
        let keep_ms = millis(s.keep_failed_for).to_string();
        let keep = s.keep_failed.to_string();
        let max_events = self.inner.max_events();
        let limit = JOB_BATCH.to_string();
        let mut recovered = Vec::new();
        let mut trash = 0;
        for _ in 0..10 {
            let ids: Vec<String> = self.inner.script(&STALLED, &[&k.active], &[&limit]).await?;
            if ids.is_empty() {
                break;
            }
            let job_keys: Vec<String> = ids.iter().flat_map(|id| k.job_keys(id)).collect();
            let mut keys = vec![
                k.active.as_str(),
                &k.wait,
                &k.failed,
                &k.cancelled,
                &k.events,
                &k.ikeys,
                &k.trash,
                &k.per_minute_failed,
                &k.marker,
                &k.seq,
                &k.fseq,
                &k.meta,
            ];
            keys.extend(job_keys.iter().map(String::as_str));
            let count = ids.len().to_string();
            let mut args = vec![max_stalls.as_str(), &keep_ms, &keep, &max_events, &count];
            args.extend(ids.iter().map(String::as_str));
            let done: Vec<String> = self.inner.script(&RECOVER, &keys, &args).await?;
            for pair in done.chunks_exact(2) {
                let state = JobState::from_name(&pair[1]).unwrap_or(JobState::Waiting);
                trash += i64::from(state.is_final());
                recovered.push(Recovered { id: pair[0].clone(), state });
            }
            if ids.len() < JOB_BATCH {
                break;
            }
        }
        if trash > 0 {
            let size: i64 = self.inner.read(::redis::cmd("SCARD").arg(&k.trash)).await?;
            self.inner.after_finish(size).await;
        }
        Ok(recovered)
    }

    async fn cancel(&self, id: &str) -> Result<CancelOutcome, QueueError> {
        if !valid_id(id) {
            return Err(QueueError::NotFound(id.to_string()));
        }
        let s = &self.inner.settings;
        let k = &self.inner.keys;
        let [job, cp, log] = k.job_keys(id);
        let keys = [
            job.as_str(),
            &cp,
            &log,
            &k.wait,
            &k.delayed,
            &k.cancelled,
            &k.events,
            &k.ikeys,
            &k.prio,
            &k.trash,
            &k.active,
        ];
        let keep_ms = millis(s.keep_failed_for).to_string();
        let keep = s.keep_failed.to_string();
        let max_events = self.inner.max_events();
        let reply = array(self.inner.script::<Value>(&CANCEL, &keys, &[id, &keep_ms, &keep, &max_events]).await?);
        match first_code(&reply) {
            1 => {
                self.inner.after_finish(reply.get(1).and_then(int).unwrap_or(0)).await;
                Ok(CancelOutcome::Cancelled)
            }
            2 => Ok(CancelOutcome::Requested),
            3 => {
                let state = reply.get(1).and_then(text).unwrap_or_default();
                JobState::from_name(&state)
                    .map(CancelOutcome::AlreadyFinal)
                    .ok_or_else(|| QueueError::Corrupt { id: id.to_string(), message: format!("state {state:?}") })
            }
            _ => Err(QueueError::NotFound(id.to_string())),
        }
    }

    async fn retry(&self, id: &str) -> Result<(), QueueError> {
        if !valid_id(id) {
            return Err(QueueError::NotFound(id.to_string()));
        }
        let outcome = self.retry_ids(&[id.to_string()], false, None).await?;
        match outcome.into_iter().next() {
            Some((_, Ok(()))) => Ok(()),
            Some((_, Err(error))) => Err(error),
            None => Err(QueueError::Unavailable("retry returned nothing".into())),
        }
    }

    async fn retry_failed(&self, pipeline: Option<&str>) -> Result<Vec<JobId>, QueueError> {
        let ids: Vec<String> =
            self.inner.read(::redis::cmd("ZRANGE").arg(&self.inner.keys.failed).arg(0).arg(-1)).await?;
        let mut retried = Vec::new();
        for batch in ids.chunks(JOB_BATCH) {
            for (id, outcome) in self.retry_ids(batch, true, pipeline).await? {
                if outcome.is_ok() {
                    retried.push(id);
                }
            }
        }
        Ok(retried)
    }

    async fn promote(&self, id: &str) -> Result<(), QueueError> {
        if !valid_id(id) {
            return Err(QueueError::NotFound(id.to_string()));
        }
        let k = &self.inner.keys;
        let job = k.job(id);
        let keys =
            [job.as_str(), &k.wait, &k.delayed, &k.events, &k.marker, &k.prio, &k.seq, &k.fseq, &k.meta, &k.trash];
        let max_events = self.inner.max_events();
        let reply = array(self.inner.script::<Value>(&PROMOTE, &keys, &[id, &max_events]).await?);
        match first_code(&reply) {
            1 => Ok(()),
            -4 => Err(wrong_state(id, reply.get(1), "promote", "delayed")),
            _ => Err(QueueError::NotFound(id.to_string())),
        }
    }

    async fn set_paused(&self, paused: bool) -> Result<(), QueueError> {
        let k = &self.inner.keys;
        let flag = if paused { "1" } else { "0" };
        let _: i64 = self.inner.script(&PAUSE, &[&k.meta, &k.marker], &[flag]).await?;
        Ok(())
    }

    async fn get(&self, id: &str) -> Result<Option<Job>, QueueError> {
        if !valid_id(id) {
            return Ok(None);
        }
        Ok(self.inner.get_many(&[id.to_string()]).await?.pop().flatten())
    }

    async fn live_job_for(&self, key: &str) -> Result<Option<JobId>, QueueError> {
        self.inner.read(::redis::cmd("HGET").arg(&self.inner.keys.ikeys).arg(key)).await
    }

    async fn list(&self, state: JobState, cursor: Option<&str>, limit: usize) -> Result<JobPage, QueueError> {
        if limit == 0 {
            return Err(QueueError::Invalid("a page needs a limit of at least 1".into()));
        }
        let limit = limit.min(1000);
        let (score, after) = match cursor {
            None => (String::new(), String::new()),
            Some(cursor) => match cursor.split_once(':') {
                Some((score, id)) if score.parse::<f64>().is_ok_and(|score| !score.is_nan()) && valid_id(id) => {
                    (score.to_string(), id.to_string())
                }
                _ => return Err(QueueError::Invalid(format!("cursor {cursor:?} was not made by this queue"))),
            },
        };
        let reverse = if state.is_final() { "1" } else { "0" };
        let set = self.inner.keys.state_set(state);
        let limit_text = limit.to_string();
        let entries = texts(self.inner.script::<Value>(&PAGE, &[set], &[reverse, &score, &after, &limit_text]).await?);
        let mut pairs: Vec<(String, String)> =
            entries.chunks_exact(2).map(|pair| (pair[0].clone(), pair[1].clone())).collect();
        let more = pairs.len() > limit;
        pairs.truncate(limit);
        let next_cursor = more.then(|| pairs.last().map(|(id, score)| format!("{score}:{id}"))).flatten();
        let ids: Vec<String> = pairs.into_iter().map(|(id, _)| id).collect();
        let jobs = self.inner.get_many(&ids).await?.into_iter().flatten().collect();
        Ok(JobPage { jobs, next_cursor })
    }

    async fn stats(&self) -> Result<Stats, QueueError> {
        let s = &self.inner.settings;
        let k = &self.inner.keys;
        let keys = [
            k.wait.as_str(),
            &k.delayed,
            &k.active,
            &k.completed,
            &k.failed,
            &k.cancelled,
            &k.meta,
            &k.workers,
            &k.winfo,
            &k.per_minute_completed,
            &k.per_minute_failed,
        ];
        let keep_completed = millis(s.keep_completed_for).to_string();
        let keep_failed = millis(s.keep_failed_for).to_string();
        let stale = millis(s.lease.saturating_mul(3)).to_string();
        let mut reply =
            array(self.inner.script::<Value>(&STATS, &keys, &[&keep_completed, &keep_failed, &stale]).await?)
                .into_iter();
        let now = reply.next().as_ref().and_then(int).unwrap_or(0);
        let counts: Vec<i64> = array(reply.next().unwrap_or(Value::Nil)).iter().filter_map(int).collect();
        let counts = JobState::ALL
            .iter()
            .enumerate()
            .map(|(index, state)| (*state, u64::try_from(counts.get(index).copied().unwrap_or(0)).unwrap_or(0)))
            .collect();
        let paused = reply.next().as_ref().and_then(int) == Some(1);
        let workers = texts(reply.next().unwrap_or(Value::Nil))
            .chunks_exact(2)
            .filter_map(|pair| {
                let mut info: WorkerInfo = serde_json::from_str(&pair[0]).ok()?;
                info.last_heartbeat = pair[1].parse::<f64>().ok()? as u64;
                Some(info)
            })
            .collect();
        let first_minute = now / 60_000 - 59;
        let mut minutes: BTreeMap<i64, (u64, u64)> = BTreeMap::new();
        for (slot, value) in [0, 1].into_iter().zip([reply.next(), reply.next()]) {
            for pair in texts(value.unwrap_or(Value::Nil)).chunks_exact(2) {
                let (Ok(minute), Ok(n)) = (pair[0].parse::<i64>(), pair[1].parse::<f64>()) else { continue };
                if minute < first_minute {
                    continue;
                }
                let entry = minutes.entry(minute).or_default();
                if slot == 0 {
                    entry.0 += n as u64;
                } else {
                    entry.1 += n as u64;
                }
            }
        }
        let per_minute = minutes
            .into_iter()
            .map(|(minute, (completed, failed))| MinuteCounts {
                minute: u64::try_from(minute).unwrap_or(0) * 60_000,
                completed,
                failed,
            })
            .collect();
        Ok(Stats { counts, paused, workers, per_minute })
    }

    async fn clean(&self, state: JobState, older_than: Duration, limit: usize) -> Result<u64, QueueError> {
        if !state.is_final() {
            return Err(QueueError::Invalid(format!("clean takes completed, failed or cancelled jobs, not {state}")));
        }
        self.inner.purge_trash().await?;
        let set = self.inner.keys.state_set(state).to_string();
        let older = millis(older_than).to_string();
        let mut left = limit;
        let mut removed = 0;
        while left > 0 {
            let batch = left.min(JOB_BATCH);
            let mut reply =
                array(self.inner.script::<Value>(&ENDED, &[&set], &[&older, &batch.to_string()]).await?).into_iter();
            let cutoff = reply.next().as_ref().and_then(int).unwrap_or(-1);
            let ids = texts(reply.next().unwrap_or(Value::Nil));
            if ids.is_empty() || cutoff < 0 {
                break;
            }
            removed += self.inner.purge(&set, cutoff, &ids).await?;
            left -= ids.len();
            if ids.len() < batch {
                break;
            }
        }
        Ok(removed)
    }

    async fn heartbeat(&self, worker: &WorkerInfo) -> Result<(), QueueError> {
        let k = &self.inner.keys;
        let info = serde_json::to_string(worker).map_err(|error| QueueError::Invalid(error.to_string()))?;
        let stale = millis(self.inner.settings.lease.saturating_mul(3)).to_string();
        let _: i64 = self.inner.script(&HEARTBEAT, &[&k.workers, &k.winfo], &[&worker.id, &info, &stale]).await?;
        Ok(())
    }

    async fn progress(&self, id: &str, token: &LeaseToken, progress: Progress) -> Result<(), QueueError> {
        self.note(id, token, &Notes { events: vec![EventKind::Progress(progress)], ..Notes::default() }).await
    }

    async fn stage_event(&self, id: &str, token: &LeaseToken, stage: &str, status: &str) -> Result<(), QueueError> {
        let event = EventKind::Stage { stage: stage.to_string(), status: status.to_string() };
        self.note(id, token, &Notes { events: vec![event], ..Notes::default() }).await
    }

    async fn log(&self, id: &str, line: &str) -> Result<(), QueueError> {
        if !valid_id(id) {
            return Ok(());
        }
        let k = &self.inner.keys;
        let (job, log) = (k.job(id), k.log(id));
        let max = self.inner.settings.max_log_lines.max(1).to_string();
        let written: i64 = self.inner.script(&LOG, &[&job, &log, &k.trash], &[id, line, &max]).await?;
        if written == 0 {
            tracing::debug!(job = id, "log line for a job that does not exist, dropped");
        }
        Ok(())
    }

    async fn logs(&self, id: &str) -> Result<Vec<LogLine>, QueueError> {
        if !valid_id(id) {
            return Ok(Vec::new());
        }
        let k = &self.inner.keys;
        let (job, log) = (k.job(id), k.log(id));
        let reply = array(self.inner.script::<Value>(&LOGS, &[&job, &log, &k.trash], &[id]).await?);
        let Some(lines) = reply.into_iter().next() else { return Ok(Vec::new()) };
        Ok(texts(lines)
            .into_iter()
            .map(|entry| match entry.split_once(' ') {
                Some((at, line)) if at.parse::<u64>().is_ok() => {
                    LogLine { at: at.parse().unwrap_or(0), line: line.to_string() }
                }
                _ => LogLine { at: 0, line: entry },
            })
            .collect())
    }

    async fn events(&self, after: Option<&str>, limit: usize, wait: Duration) -> Result<Vec<Event>, QueueError> {
        if let Some(id) = after
            && !valid_stream_id(id)
        {
            return Err(QueueError::Invalid(format!("event id {id:?} is not a stream id like 1700000000000-0")));
        }
        if limit == 0 {
            return Err(QueueError::Invalid("reading events needs a limit of at least 1".into()));
        }
        let from = after.unwrap_or("0-0");
        let reply: Value = self
            .inner
            .read(::redis::cmd("XREAD").arg("COUNT").arg(limit).arg("STREAMS").arg(&self.inner.keys.events).arg(from))
            .await?;
        let events = stream_entries(reply);
        if !events.is_empty() || wait.is_zero() {
            return Ok(events);
        }
        self.inner.blocking_events(from, limit, wait).await
    }

    async fn checkpoints(&self, id: &str) -> Result<BTreeMap<String, StageOutput>, QueueError> {
        if !valid_id(id) {
            return Ok(BTreeMap::new());
        }
        let stored: HashMap<String, String> =
            self.inner.read(::redis::cmd("HGETALL").arg(self.inner.keys.checkpoints(id))).await?;
        stored
            .into_iter()
            .map(|(key, json)| {
                serde_json::from_str(&json).map(|output| (key.clone(), output)).map_err(|error| QueueError::Corrupt {
                    id: id.to_string(),
                    message: format!("checkpoint {key}: {error}"),
                })
            })
            .collect()
    }

    async fn save_checkpoint(
        &self,
        id: &str,
        token: &LeaseToken,
        key: &str,
        output: &StageOutput,
    ) -> Result<(), QueueError> {
        if !valid_id(id) {
            return Err(QueueError::NotFound(id.to_string()));
        }
        let k = &self.inner.keys;
        let (job, cp) = (k.job(id), k.checkpoints(id));
        let json = serde_json::to_string(output).map_err(|error| QueueError::Invalid(error.to_string()))?;
        let reply =
            array(self.inner.script::<Value>(&CHECKPOINT, &[&job, &cp, &k.active], &[id, &token.0, key, &json]).await?);
        Inner::fenced(id, first_code(&reply))
    }
}

impl RedisQueue {
    /// Retries jobs by id; each outcome on its own.
    async fn retry_ids(
        &self,
        ids: &[String],
        only_failed: bool,
        pipeline: Option<&str>,
    ) -> Result<Vec<(String, Result<(), QueueError>)>, QueueError> {
        let k = &self.inner.keys;
        let job_keys: Vec<String> = ids.iter().flat_map(|id| k.job_keys(id)).collect();
        let mut keys = vec![
            k.wait.as_str(),
            &k.failed,
            &k.cancelled,
            &k.events,
            &k.ikeys,
            &k.marker,
            &k.seq,
            &k.fseq,
            &k.meta,
            &k.trash,
            &k.delayed,
        ];
        keys.extend(job_keys.iter().map(String::as_str));
        let max_events = self.inner.max_events();
        let count = ids.len().to_string();
        let mut args = vec![max_events.as_str(), if only_failed { "1" } else { "0" }, pipeline.unwrap_or(""), &count];
        args.extend(ids.iter().map(String::as_str));
        let reply = array(self.inner.script::<Value>(&RETRY, &keys, &args).await?);
        Ok(ids
            .iter()
            .zip(reply.into_iter().chain(std::iter::repeat(Value::Nil)))
            .map(|(id, outcome)| {
                let outcome = array(outcome);
                let result = match first_code(&outcome) {
                    1 => Ok(()),
                    -4 => Err(wrong_state(id, outcome.get(1), "retry", "failed or cancelled")),
                    -5 => Err(QueueError::Invalid(format!(
                        "job {id} cannot be retried: its idempotency key belongs to live job {}",
                        outcome.get(1).and_then(text).unwrap_or_default()
                    ))),
                    _ => Err(QueueError::NotFound(id.clone())),
                };
                (id.clone(), result)
            })
            .collect())
    }
}

fn wrong_state(id: &str, state: Option<&Value>, action: &'static str, needs: &'static str) -> QueueError {
    let name = state.and_then(text).unwrap_or_default();
    match JobState::from_name(&name) {
        Some(state) => QueueError::WrongState { id: id.to_string(), state, action, needs },
        None => QueueError::Corrupt { id: id.to_string(), message: format!("state {name:?}") },
    }
}
