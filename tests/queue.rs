//! The queue contract, written once (`contract`) and run against every backend by `contract_tests!`: the memory
//! queue, the Redis at `ECHO_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`), and the Redis Cluster whose
//! nodes `ECHO_TEST_REDIS_CLUSTER` names (comma-separated URLs; those tests say they are skipped when it is not
//! set). Each Redis test has a hash tag of its own. Leases are 300 ms so the suite stays fast, and every wait is
//! bounded. Tests that need the memory queue's movable clock (delays of hours, retention of days) are in
//! `memory_clock`.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use echo_worker::job::StageOutput;
use echo_worker::queue::memory::MemoryQueue;
use echo_worker::queue::redis::{RedisOptions, RedisQueue};
use echo_worker::queue::{
    CancelOutcome, Definition, DefinitionFile, Enqueued, Event, EventKind, FailOutcome, Failure, Job, JobId, JobState,
    LeaseToken, MAX_PRIORITY, MIN_PRIORITY, NewJob, Notes, Progress, Queue, QueueError, QueueSettings, Recovered,
    Renewal, WorkerInfo,
};
use echo_worker::secret::SecretUrl;
use serde_json::json;

/// What `recover_stalled` says of job `id` that went to `state`.
fn went(id: &str, state: JobState) -> Recovered {
    Recovered { id: id.to_string(), state }
}

/// The lease every contract test runs with.
const LEASE: Duration = Duration::from_millis(300);
/// Long enough for a lease to have expired for sure.
const PAST_LEASE: Duration = Duration::from_millis(450);
/// How long a test lets `take` wait for a job it expects.
const TAKE_WAIT: Duration = Duration::from_secs(3);

/// Opens the queue of one test.
#[async_trait::async_trait]
trait Backend: Send + Sync {
    /// A handle to this test's own queue, made with `settings` on first use. Every call opens the same queue
    /// again (for Redis, a new client on the test's key prefix, as a second process would).
    async fn open(&self, settings: QueueSettings) -> Arc<dyn Queue>;

    /// Removes what a passing test left behind (a failing one leaves it to be looked at).
    async fn finish(&self) {}
}

/// One memory queue per test; every `open` shares it.
#[derive(Default)]
struct Memory {
    queue: Mutex<Option<Arc<MemoryQueue>>>,
}

#[async_trait::async_trait]
impl Backend for Memory {
    async fn open(&self, settings: QueueSettings) -> Arc<dyn Queue> {
        let mut queue = self.queue.lock().unwrap();
        queue.get_or_insert_with(|| Arc::new(MemoryQueue::new(settings))).clone()
    }
}

fn memory_backend(_test: &str) -> Option<Box<dyn Backend>> {
    Some(Box::<Memory>::default())
}

/// One Redis queue per test, under a hash tag of its own (`echo-test:{<test>-<uuid>}:`), so parallel tests and
/// reruns never share a key; every `open` is a new client of it.
struct Redis {
    urls: String,
    cluster: bool,
    queue: String,
}

#[async_trait::async_trait]
impl Backend for Redis {
    async fn open(&self, settings: QueueSettings) -> Arc<dyn Queue> {
        let options = RedisOptions::new(&SecretUrl::new(&self.urls), self.cluster, "echo-test:", &self.queue);
        let queue = RedisQueue::connect(&options, settings)
            .await
            .unwrap_or_else(|error| panic!("connecting to the test Redis ({}): {error}", self.urls));
        Arc::new(queue)
    }

    async fn finish(&self) {
        // Every key of the queue is on one node; SCAN each node, so a cluster is covered too.
        let pattern = format!("echo-test:{{{}}}:*", self.queue);
        for url in self.urls.split(',').map(str::trim).filter(|url| !url.is_empty()) {
            let client = ::redis::Client::open(url).expect("the test Redis URL");
            let mut connection = client.get_multiplexed_async_connection().await.expect("connect to the test Redis");
            let mut cursor = 0u64;
            for _ in 0..10_000 {
                let (next, keys): (u64, Vec<String>) = ::redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut connection)
                    .await
                    .expect("SCAN");
                if !keys.is_empty() {
                    let () = ::redis::cmd("DEL").arg(&keys).query_async(&mut connection).await.expect("DEL");
                }
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
        }
    }
}

/// The Redis at `ECHO_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`).
fn redis_backend(test: &str) -> Option<Box<dyn Backend>> {
    let urls = std::env::var("ECHO_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    Some(Box::new(Redis { urls, cluster: false, queue: format!("{test}-{}", uuid::Uuid::new_v4().simple()) }))
}

/// The Redis Cluster whose nodes `ECHO_TEST_REDIS_CLUSTER` names (comma-separated URLs), when it is set.
fn redis_cluster_backend(test: &str) -> Option<Box<dyn Backend>> {
    let Ok(urls) = std::env::var("ECHO_TEST_REDIS_CLUSTER") else {
        eprintln!("{test} skipped on Redis Cluster: ECHO_TEST_REDIS_CLUSTER is not set (.ci/run sets it)");
        return None;
    };
    Some(Box::new(Redis { urls, cluster: true, queue: format!("{test}-{}", uuid::Uuid::new_v4().simple()) }))
}

/// Instantiates every contract test for one backend: `contract_tests!(module, factory)`, where `factory(test
/// name)` returns the test's [`Backend`], or `None` (having said why) when the backend is not configured here.
macro_rules! contract_tests {
    ($backend:ident, $factory:ident) => {
        mod $backend {
            contract_tests!(@each $factory;
                enqueue_refuses_an_invalid_job,
                lower_priority_runs_first,
                one_priority_runs_in_enqueue_order,
                delayed_job_becomes_ready_on_time,
                failed_attempt_retries_after_a_doubling_capped_backoff,
                retry_after_of_a_failure_wins_over_the_backoff,
                permanent_failure_ends_the_job_with_attempts_left,
                idempotency_key_allows_one_live_job,
                worker_with_a_stale_lease_is_refused,
                renewed_lease_does_not_stall,
                expired_lease_counts_a_stall_and_max_stalls_fails_the_job,
                recover_stalled_from_two_callers_recovers_each_job_once,
                cancel_works_in_every_state,
                cancelled_job_whose_worker_died_or_left_ends_cancelled,
                release_hands_a_job_back_to_the_front_without_an_attempt,
                retry_revives_failed_and_cancelled_jobs_only,
                retry_failed_retries_the_failed_jobs_of_a_pipeline,
                paused_queue_hands_out_nothing_until_resumed,
                promote_makes_a_delayed_job_ready_now,
                job_log_keeps_the_newest_lines,
                clean_removes_final_jobs_by_age_and_count,
                retention_keeps_final_jobs_by_count_and_age,
                stats_count_states_workers_and_minutes,
                enqueue_many_keeps_good_items_when_one_is_bad,
                events_read_from_an_id_miss_nothing,
                events_wait_for_the_next_event,
                checkpoints_are_fenced_kept_for_retry_and_dropped_when_done,
                take_wakes_when_a_job_arrives,
                take_returns_none_when_its_wait_ends,
                list_pages_jobs_in_run_order,
                progress_and_stage_events_are_stored_and_streamed,
                take_many_takes_ready_jobs_in_run_order_up_to_its_max,
                complete_and_take_writes_the_notes_completes_and_takes_the_next,
                complete_and_take_refuses_a_stale_lease_and_state_events,
                notes_are_fenced_and_resume_says_whether_checkpoints_exist,
                checkpoints_held_back_in_notes_are_saved_by_note_and_dropped_by_completion,
                many_takers_at_once_all_get_jobs,
            );
        }
    };
    (@each $factory:ident; $($test:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                let Some(backend) = super::$factory(stringify!($test)) else { return };
                super::contract::$test(&*backend).await;
                backend.finish().await;
            }
        )*
    };
}

contract_tests!(memory, memory_backend);
contract_tests!(redis, redis_backend);
contract_tests!(redis_cluster, redis_cluster_backend);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The settings of the contract tests: short lease and backoff.
fn settings() -> QueueSettings {
    QueueSettings { lease: LEASE, max_stalls: 2, backoff: ms(200), max_backoff: ms(400), ..QueueSettings::default() }
}

fn definition(pipeline: &str) -> Definition {
    let text = "[stages.noop]\nkind = \"noop\"\n".to_string();
    let sha256 = "a738ebe7345b793d0b73fbd3b001a8ec95f14cd42ebab103372999183ae01743".to_string();
    Definition { pipeline: DefinitionFile { file: format!("{pipeline}.toml"), text, sha256 }, plugins: BTreeMap::new() }
}

/// A job of `pipeline` with no recording, priority 0, 3 attempts.
fn new_job(pipeline: &str) -> NewJob {
    NewJob {
        pipeline: pipeline.to_string(),
        definition: definition(pipeline),
        recording_id: None,
        source: Some("/media/meeting.wav".into()),
        trusted_source: false,
        params: serde_json::Map::new(),
        priority: 0,
        max_attempts: 3,
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
        running: 1,
        last_heartbeat: 0,
    }
}

fn failure(message: &str, retryable: bool) -> Failure {
    Failure { message: message.into(), retryable, retry_after: None }
}

/// `fut`, or a panic naming `what` when it takes longer than `limit`.
async fn within<T>(what: &str, limit: Duration, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, fut).await.unwrap_or_else(|_| panic!("{what} took more than {limit:?}"))
}

async fn enqueue(queue: &dyn Queue, job: NewJob) -> JobId {
    match queue.enqueue(job).await.expect("enqueue") {
        Enqueued::Created(id) => id,
        other => panic!("expected a new job, got {other:?}"),
    }
}

/// The next job, waiting up to [`TAKE_WAIT`] for it.
async fn take(queue: &dyn Queue, worker: &WorkerInfo) -> echo_worker::queue::Lease {
    within("take", TAKE_WAIT + ms(2000), queue.take(worker, TAKE_WAIT))
        .await
        .expect("take")
        .expect("no job became ready within the wait")
}

/// The next job if one is ready now.
async fn take_now(queue: &dyn Queue, worker: &WorkerInfo) -> Option<echo_worker::queue::Lease> {
    within("take without waiting", ms(2000), queue.take(worker, Duration::ZERO)).await.expect("take")
}

async fn get(queue: &dyn Queue, id: &str) -> Job {
    queue.get(id).await.expect("get").unwrap_or_else(|| panic!("job {id} is gone"))
}

async fn state(queue: &dyn Queue, id: &str) -> JobState {
    get(queue, id).await.state
}

/// Enqueues `spec` and runs it to completion; it must be the only ready job.
async fn completed_job(queue: &dyn Queue, worker: &WorkerInfo, spec: NewJob) -> JobId {
    let id = enqueue(queue, spec).await;
    let lease = take(queue, worker).await;
    assert_eq!(lease.job.id, id);
    queue.complete(&id, &lease.token, json!({"ok": true})).await.expect("complete");
    id
}

/// Enqueues `spec` and fails it for good; it must be the only ready job.
async fn failed_job(queue: &dyn Queue, worker: &WorkerInfo, spec: NewJob) -> JobId {
    let id = enqueue(queue, spec).await;
    let lease = take(queue, worker).await;
    assert_eq!(lease.job.id, id);
    let outcome = queue.fail(&id, &lease.token, failure("transcribe: provider said no", false)).await.expect("fail");
    assert_eq!(outcome, FailOutcome::Failed);
    id
}

/// Every event of the stream from the start, read a page at a time.
async fn all_events(queue: &dyn Queue) -> Vec<Event> {
    let mut events = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..1000 {
        let page = within("events", ms(2000), queue.events(after.as_deref(), 50, Duration::ZERO)).await.unwrap();
        let Some(last) = page.last() else { return events };
        after = Some(last.id.clone());
        events.extend(page);
    }
    panic!("the event stream did not end after 1000 pages")
}

/// The state events of one job, in stream order.
fn states_of(events: &[Event], id: &str) -> Vec<(JobState, Option<String>)> {
    events
        .iter()
        .filter(|event| event.job_id == id)
        .filter_map(|event| match &event.kind {
            EventKind::State { state, reason } => Some((*state, reason.clone())),
            _ => None,
        })
        .collect()
}

/// A stream id as (ms, seq), for order checks.
fn id_order(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap(), seq.parse().unwrap())
}

fn checkpoint(value: serde_json::Value) -> StageOutput {
    StageOutput { value, files: vec![PathBuf::from("work/audio.wav")] }
}

mod contract {
    use super::*;

    pub async fn enqueue_refuses_an_invalid_job(backend: &dyn Backend) {
        let queue = backend.open(settings()).await;
        for priority in [MIN_PRIORITY - 1, MAX_PRIORITY + 1] {
            let error = queue.enqueue(NewJob { priority, ..new_job("meeting") }).await.unwrap_err();
            assert!(
                matches!(&error, QueueError::Invalid(message) if message.contains(&priority.to_string())),
                "priority {priority}: {error}"
            );
        }
        let error = queue.enqueue(NewJob { max_attempts: 0, ..new_job("meeting") }).await.unwrap_err();
        assert!(matches!(&error, QueueError::Invalid(message) if message.contains("attempt")), "{error}");
        let stats = queue.stats().await.unwrap();
        assert!(stats.counts.values().all(|&n| n == 0), "a refused job was stored: {stats:?}");
        // The ends of the range are valid.
        for priority in [MIN_PRIORITY, MAX_PRIORITY] {
            let id = enqueue(&*queue, NewJob { priority, ..new_job("meeting") }).await;
            assert_eq!(get(&*queue, &id).await.spec.priority, priority);
        }
    }

    pub async fn lower_priority_runs_first(backend: &dyn Backend) {
        let queue = backend.open(settings()).await;
        let worker = worker("w");
        let mut ids = Vec::new();
        for priority in [5, -3, 0, MAX_PRIORITY, MIN_PRIORITY, 7] {
            ids.push((priority, enqueue(&*queue, NewJob { priority, ..new_job("meeting") }).await));
        }
        ids.sort_by_key(|(priority, _)| *priority);
        for (priority, id) in ids {
            let lease = take(&*queue, &worker).await;
            assert_eq!((lease.job.spec.priority, lease.job.id), (priority, id));
        }
        assert!(take_now(&*queue, &worker).await.is_none());
    }

    pub async fn one_priority_runs_in_enqueue_order(backend: &dyn Backend) {
        let queue = backend.open(settings()).await;
        let worker = worker("w");
        let mut ones = Vec::new();
        let mut twos = Vec::new();
        for n in 0..8 {
            let priority = if n % 2 == 0 { 1 } else { 2 };
            let id = enqueue(&*queue, NewJob { priority, ..new_job("meeting") }).await;
            if priority == 1 { ones.push(id) } else { twos.push(id) }
        }
        let mut taken = Vec::new();
        for _ in 0..8 {
            taken.push(take(&*queue, &worker).await.job.id);
        }
        assert_eq!(taken, [ones, twos].concat(), "taken out of enqueue order");
    }

    pub async fn delayed_job_becomes_ready_on_time(backend: &dyn Backend) {
        let queue = backend.open(settings()).await;
        let worker = worker("w");
        let started = Instant::now();
        let delayed =
            enqueue(&*queue, NewJob { delay: Some(ms(400)), priority: MIN_PRIORITY, ..new_job("meeting") }).await;
        let job = get(&*queue, &delayed).await;
        assert_eq!(job.state, JobState::Delayed);
        assert_eq!(job.ready_at, Some(job.created_at + 400));
        // A delayed job does not jump the queue before its time, however urgent.
        let ready = enqueue(&*queue, NewJob { priority: 5, ..new_job("meeting") }).await;
        assert_eq!(take_now(&*queue, &worker).await.map(|lease| lease.job.id), Some(ready));
        assert!(take_now(&*queue, &worker).await.is_none(), "a delayed job was handed out early");
        let lease = take(&*queue, &worker).await;
        let waited = started.elapsed();
        assert_eq!(lease.job.id, delayed);
        assert!(waited >= ms(350), "ready after {waited:?}, before its 400 ms delay");
        assert!(waited < ms(1500), "ready only after {waited:?} for a 400 ms delay");
        assert_eq!(lease.job.state, JobState::Active);
    }

    pub async fn failed_attempt_retries_after_a_doubling_capped_backoff(backend: &dyn Backend) {
        // backoff 200 ms, doubled per attempt, capped at 400 ms.
        let queue = backend.open(settings()).await;
        let worker = worker("w");
        let id = enqueue(&*queue, NewJob { max_attempts: 4, ..new_job("meeting") }).await;
        for (attempt, wait) in [(1, 200), (2, 400), (3, 400)] {
            let lease = take(&*queue, &worker).await;
            assert_eq!((lease.job.id.as_str(), lease.job.attempts), (id.as_str(), attempt));
            let message = format!("transcribe: attempt {attempt} timed out");
            let outcome = queue.fail(&id, &lease.token, failure(&message, true)).await.unwrap();
            let FailOutcome::Retrying { at } = outcome else { panic!("attempt {attempt}: {outcome:?}") };
            let backoff = at - lease.job.started_at.unwrap();
            assert!((wait..wait + 250).contains(&backoff), "attempt {attempt}: retry after {backoff} ms, not {wait}");
            let job = get(&*queue, &id).await;
            assert_eq!((job.state, job.ready_at), (JobState::Delayed, Some(at)));
            assert_eq!(job.error.as_deref(), Some(message.as_str()));
            assert!(take_now(&*queue, &worker).await.is_none(), "retried before the backoff");
        }
        let lease = take(&*queue, &worker).await;
        assert_eq!(lease.job.attempts, 4);
        let outcome = queue.fail(&id, &lease.token, failure("transcribe: timed out again", true)).await.unwrap();
        assert_eq!(outcome, FailOutcome::Failed, "attempts were used up");
        let job = get(&*queue, &id).await;
        assert_eq!(job.state, JobState::Failed);
        assert_eq!(job.error.as_deref(), Some("transcribe: timed out again"));
        assert!(job.finished_at.is_some());
    }

    pub async fn retry_after_of_a_failure_wins_over_the_backoff(backend: &dyn Backend) {
        let queue = backend.open(settings()).await;
        let worker = worker("w");
        let id = enqueue(&*queue, new_job("meeting")).await;
        let lease = take(&*queue, &worker).await;
        let asked = Failure { retry_after: Some(ms(300)), ..failure("transcribe: 429, retry after 300 ms", true) };
        let FailOutcome::Retrying { at } = queue.fail(&id, &lease.token, asked).await.unwrap() else { panic!() };
        let waited = at - lease.job.started_at.unwrap();
        assert!((300..550).contains(&waited), "retry after {waited} ms, not the 300 ms asked");
        // Without a wait of its own the second failure backs off 2 × 200 ms.
        let lease = take(&*queue, &worker).await;
        let outcome = queue.fail(&id, &lease.token, failure("transcribe: 500", true)).await.unwrap();
        let FailOutcome::Retrying { at } = outcome else { panic!("{outcome:?}") };
        let waited = at - lease.job.started_at.unwrap();
        assert!((400..650).contains(&waited), "retry after {waited} ms, not the 400 ms backoff");
    }

    pub async fn permanent_failure_ends_the_job_with_attempts_left(backend: &dyn Backend) {
        let queue = backend.open(settings()).await;
        let worker = worker("w");
        let id = enqueue(&*queue, NewJob { max_attempts: 5, ..new_job("meeting") }).await;
        let lease = take(&*queue, &worker).await;
        let outcome = queue.fail(&id, &lease.token, failure("validate: not a media file", false)).await.unwrap();
        assert_eq!(outcome, FailOutcome::Failed);
        let job = get(&*queue, &id).await;
        assert_eq!((job.state, job.attempts), (JobState::Failed, 1));
        assert_eq!(job.error.as_deref(), Some("validate: not a media file"));
        assert!(take_now(&*queue, &worker).await.is_none());
    }

    pub async fn idempotency_key_allows_one_live_job(backend: &dyn Backend) {
        let queue = backend.open(settings()).await;
        let worker = worker("w");
        let for_recording = |recording: &str| NewJob { recording_id: Some(recording.into()), ..new_job("meeting") };
        // The key defaults to the recording id.
        let first = enqueue(&*queue, for_recording("rec-1")).await;
        assert_eq!(queue.enqueue(for_recording("rec-1")).await.unwrap(), Enqueued::Existing(first.clone()));
        assert_eq!(queue.live_job_for("rec-1").await.unwrap(), Some(first.clone()));
        // An explicit key wins over the recording id.
        let keyed = NewJob { idempotency_key: Some("rec-1:podcast".into()), ..for_recording("rec-1") };
        let second = enqueue(&*queue, keyed.clone()).await;
        assert_ne!(second, first);
        assert_eq!(queue.enqueue(keyed).await.unwrap(), Enqueued::Existing(second.clone()));
        // No recording and no key: no deduplication.
        let (a, b) = (enqueue(&*queue, new_job("meeting")).await, enqueue(&*queue, new_job("meeting")).await);
        assert_ne!(a, b);
        // Still one job per key while it runs…
        let lease = take(&*queue, &worker).await;
        assert_eq!(lease.job.id, first);
        assert_eq!(queue.enqueue(for_recording("rec-1")).await.unwrap(), Enqueued::Existing(first.clone()));
        // …and a new one once it has ended.
        queue.complete(&first, &lease.token, json!({})).await.unwrap();
        assert_eq!(queue.live_job_for("rec-1").await.unwrap(), None);
        let third = enqueue(&*queue, for_recording("rec-1")).await;
        assert_ne!(third, first);
        // A delayed job holds its key; a cancelled one frees it.
        let delayed = NewJob { delay: Some(Duration::from_secs(3600)), ..for_recording("rec-2") };
        let later = enqueue(&*queue, delayed.clone()).await;
        assert_eq!(queue.enqueue(delayed).await.unwrap(), Enqueued::Existing(later.clone()));
        assert_eq!(queue.cancel(&later).await.unwrap(), CancelOutcome::Cancelled);
        assert_eq!(queue.live_job_for("rec-2").await.unwrap(), None);
        assert_ne!(enqueue(&*queue, for_recording("rec-2")).await, later);
        assert_eq!(queue.live_job_for("no-such-key").await.unwrap(), None);
    }

    pub async fn worker_with_a_stale_lease_is_refused(backend: &dyn Backend) {
        let queue = backend.open(settings()).await;
        let (old_worker, new_worker) = (worker("old"), worker("new"));
        let id = enqueue(&*queue, new_job("meeting")).await;
        let stale = take(&*queue, &old_worker).await;
        tokio::time::sleep(PAST_LEASE).await;
        assert_eq!(queue.recover_stalled().await.unwrap(), vec![went(&id, JobState::Waiting)]);
        let lost = |result: Result<(), QueueError>, what: &str| match result {
            Err(QueueError::LeaseLost(lost)) => assert_eq!(lost, id, "{what}"),
            other => panic!("{what} with a stale lease: {other:?}"),
        };
        assert_eq!(queue.renew(&[(id.clone(), stale.token.clone())]).await.unwrap(), vec![Renewal::Lost]);
        lost(queue.complete(&id, &stale.token, json!({"by": "old"})).await, "complete before the retake");
        let fresh = take(&*queue, &new_worker).await;
        assert_eq!(fresh.job.id, id);
        assert_ne!(fresh.token, stale.token);
        let mine = checkpoint(json!({"by": "new"}));
        queue.save_checkpoint(&id, &fresh.token, "download", &mine).await.unwrap();
        let progress = Progress { percent: 10, stage: Some("download".into()), message: "old".into() };
        lost(queue.complete(&id, &stale.token, json!({"by": "old"})).await, "complete");
        lost(queue.fail(&id, &stale.token, failure("old", true)).await.map(|_| ()), "fail");
        lost(queue.progress(&id, &stale.token, progress).await, "progress");
        lost(
            queue.save_checkpoint(&id, &stale.token, "download", &checkpoint(json!({"by": "old"}))).await,
            "checkpoint",
        );
        lost(queue.stage_event(&id, &stale.token, "download", "succeeded").await, "stage event");
        lost(queue.cancelled(&id, &stale.token).await, "cancelled");
        lost(queue.release(&id, &stale.token).await, "release");
        lost(queue.complete(&id, &LeaseToken("made-up".into()), json!({})).await, "complete with a made-up token");
        assert_eq!(queue.renew(&[(id.clone(), stale.token.clone())]).await.unwrap(), vec![Renewal::Lost]);
        // Nothing of the stale worker got through.
        let job = get(&*queue, &id).await;
        assert_eq!((job.state, job.error, job.progress), (JobState::Active, None, None));
        assert_eq!(job.worker.as_deref(), Some(new_worker.id.as_str()));
        assert_eq!(queue.checkpoints(&id).await.unwrap().get("download"), Some(&mine));
        queue.complete(&id, &fresh.token, json!({"by": "new"})).await.unwrap();
        let job = get(&*queue, &id).await;
        assert_eq!((job.state, job.result), (JobState::Completed, Some(json!({"by": "new"}))));
        // Once the job has ended, even its last holder can write nothing more.
        lost(queue.complete(&id, &fresh.token, json!({})).await, "complete twice");
        assert_eq!(queue.renew(&[(id.clone(), fresh.token.clone())]).await.unwrap(), vec![Renewal::Lost]);
        let missing = queue.complete("no-such-job", &fresh.token, json!({})).await;
        assert!(matches!(missing, Err(QueueError::LeaseLost(_))), "{missing:?}");
    }

    pub async fn renewed_lease_does_not_stall(backend: &dyn Backend) {
        let queue = backend.open(settings()).await;
        let worker = worker("w");
        let id = enqueue(&*queue, new_job("meeting")).await;
        let lease = take(&*queue, &worker).await;
        // Renewed every 120 ms for two lease lengths, together with a lease that is not ours.
        for _ in 0..5 {
            tokio::time::sleep(ms(120)).await;
            let renewals = queue
                .renew(&[(id.clone(), lease.token.clone()), ("no-such-job".into(), lease.token.clone())])
                .await
                .unwrap();
            assert_eq!(renewals, vec![Renewal::Held, Renewal::Lost]);
            assert!(queue.recover_stalled().await.unwrap().is_empty(), "a renewed lease was recovered");
        }
        queue.complete(&id, &lease.token, json!({})).await.unwrap();
        assert_eq!(get(&*queue, &id).await.stalls, 0);
        assert!(queue.renew(&[]).await.unwrap().is_empty());
    }

    pub async fn expired_lease_counts_a_stall_and_max_stalls_fails_the_job(backend: &dyn Backend) {
        let queue = backend.open(QueueSettings { max_stalls: 1, ..settings() }).await;
        let worker = worker("w");
        // One attempt only: a stall must not use it up.
        let stalling = enqueue(&*queue, NewJob { max_attempts: 1, ..new_job("meeting") }).await;
        let behind = enqueue(&*queue, new_job("meeting")).await;
        assert_eq!(take(&*queue, &worker).await.job.id, stalling);
        tokio::time::sleep(PAST_LEASE).await;
        assert_eq!(queue.recover_stalled().await.unwrap(), vec![went(&stalling, JobState::Waiting)]);
        let job = get(&*queue, &stalling).await;
        assert_eq!((job.state, job.stalls, job.attempts), (JobState::Waiting, 1, 0));
        // Back at the front, ahead of the job enqueued after it.
        let lease = take(&*queue, &worker).await;
        assert_eq!(lease.job.id, stalling);
        assert_eq!((lease.job.attempts, lease.job.stalls), (1, 1));
        tokio::time::sleep(PAST_LEASE).await;
        assert_eq!(queue.recover_stalled().await.unwrap(), vec![went(&stalling, JobState::Failed)]);
        let job = get(&*queue, &stalling).await;
        assert_eq!((job.state, job.stalls), (JobState::Failed, 2));
        let error = job.error.unwrap_or_default();
        assert!(error.contains("stalled more than 1"), "the job does not say it stalled: {error:?}");
        let events = all_events(&*queue).await;
        let last = states_of(&events, &stalling).pop().unwrap();
        assert_eq!(last.0, JobState::Failed);
        assert!(last.1.is_some_and(|reason| reason.contains("stalled")), "no reason in the event");
        assert_eq!(state(&*queue, &behind).await, JobState::Waiting);
        assert_eq!(queue.stats().await.unwrap().counts[&JobState::Failed], 1);
        assert!(queue.recover_stalled().await.unwrap().is_empty());
    }

    pub async fn recover_stalled_from_two_callers_recovers_each_job_once(backend: &dyn Backend) {
        let (one, two) = (backend.open(settings()).await, backend.open(settings()).await);
        let worker = worker("w");
        let mut ids = Vec::new();
        for _ in 0..6 {
            ids.push(enqueue(&*one, new_job("meeting")).await);
        }
        ids.sort();
        for round in 1..=2 {
            for _ in 0..6 {
                take(&*one, &worker).await;
            }
            tokio::time::sleep(PAST_LEASE).await;
            let (a, b) = (one.clone(), two.clone());
            let first = tokio::spawn(async move { a.recover_stalled().await.unwrap() });
            let second = tokio::spawn(async move { b.recover_stalled().await.unwrap() });
            let recovered = [first.await.unwrap(), second.await.unwrap()].concat();
            assert!(recovered.iter().all(|job| job.state == JobState::Waiting), "round {round}: {recovered:?}");
            let mut recovered: Vec<String> = recovered.into_iter().map(|job| job.id).collect();
            recovered.sort();
            assert_eq!(recovered, ids, "round {round}: each job must be recovered by exactly one caller");
            for id in &ids {
                let job = get(&*one, id).await;
                assert_eq!((job.state, job.stalls), (JobState::Waiting, round), "job {id}");
            }
        }
    }

    pub async fn cancel_works_in_every_state(backend: &dyn Backend) {
        let queue = backend.open(settings()).await;
        let worker = worker("w");
        let completed = completed_job(&*queue, &worker, new_job("meeting")).await;
        let failed = failed_job(&*queue, &worker, new_job("meeting")).await;
        let active = enqueue(&*queue, new_job("meeting")).await;
        let lease = take(&*queue, &worker).await;
        let waiting = enqueue(&*queue, new_job("meeting")).await;
        let delayed = enqueue(&*queue, NewJob { delay: Some(Duration::from_secs(3600)), ..new_job("meeting") }).await;

        for id in [&waiting, &delayed] {
            assert_eq!(queue.cancel(id).await.unwrap(), CancelOutcome::Cancelled);
            let job = get(&*queue, id).await;
            assert_eq!(job.state, JobState::Cancelled);
            assert!(job.finished_at.is_some());
        }
        assert!(take_now(&*queue, &worker).await.is_none(), "a cancelled job was handed out");

        assert_eq!(queue.cancel(&active).await.unwrap(), CancelOutcome::Requested);
        let job = get(&*queue, &active).await;
        assert_eq!((job.state, job.cancel_requested), (JobState::Active, true));
        assert_eq!(queue.cancel(&active).await.unwrap(), CancelOutcome::Requested, "asking twice");
        let renewals = queue.renew(&[(active.clone(), lease.token.clone())]).await.unwrap();
        assert_eq!(renewals, vec![Renewal::CancelRequested]);
        queue.cancelled(&active, &lease.token).await.unwrap();
        assert_eq!(state(&*queue, &active).await, JobState::Cancelled);

        assert_eq!(queue.cancel(&active).await.unwrap(), CancelOutcome::AlreadyFinal(JobState::Cancelled));
        assert_eq!(queue.cancel(&completed).await.unwrap(), CancelOutcome::AlreadyFinal(JobState::Completed));
        assert_eq!(queue.cancel(&failed).await.unwrap(), CancelOutcome::AlreadyFinal(JobState::Failed));
        assert_eq!(state(&*queue, &completed).await, JobState::Completed);
        let missing = queue.cancel("no-such-job").await;
        assert!(matches!(&missing, Err(QueueError::NotFound(id)) if id == "no-such-job"), "{missing:?}");
        let counts = queue.stats().await.unwrap().counts;
        assert_eq!(counts[&JobState::Cancelled], 3);
    }

    pub async fn cancelled_job_whose_worker_died_or_left_ends_cancelled(backend: &dyn Backend) {
        let queue = backend.open(settings()).await;
        let worker = worker("w");
        let died = enqueue(&*queue, new_job("meeting")).await;
        take(&*queue, &worker).await;
        assert_eq!(queue.cancel(&died).await.unwrap(), CancelOutcome::Requested);
        tokio::time::sleep(PAST_LEASE).await;
        assert_eq!(queue.recover_stalled().await.unwrap(), vec![went(&died, JobState::Cancelled)]);
        assert_eq!(state(&*queue, &died).await, JobState::Cancelled, "a cancelled job ran again after a stall");

        let left = enqueue(&*queue, new_job("meeting")).await;
        let lease = take(&*queue, &worker).await;
        assert_eq!(queue.cancel(&left).await.unwrap(), CancelOutcome::Requested);
        queue.release(&left, &lease.token).await.unwrap();
        assert_eq!(state(&*queue, &left).await, JobState::Cancelled, "a cancelled job was handed back");
        assert!(take_now(&*queue, &worker).await.is_none());
    }

    pub async fn release_hands_a_job_back_to_the_front_without_an_attempt(backend: &dyn Backend) {
        let queue = backend.open(settings()).await;
        let worker = worker("w");
        let first = enqueue(&*queue, new_job("meeting")).await;
        let second = enqueue(&*queue, new_job("meeting")).await;
        let lease = take(&*queue, &worker).await;
        assert_eq!(lease.job.id, first);
        queue.release(&first, &lease.token).await.unwrap();
        let job = get(&*queue, &first).await;
        assert_eq!((job.state, job.attempts, job.stalls), (JobState::Waiting, 0, 0));
        let again = take(&*queue, &worker).await;
        assert_eq!((again.job.id.as_str(), again.job.attempts), (first.as_str(), 1));
        let lost = queue.release(&first, &lease.token).await;
        assert!(matches!(lost, Err(QueueError::LeaseLost(_))), "{lost:?}");
        assert_eq!(take(&*queue, &worker).await.job.id, second);
    }

    pub async fn retry_revives_failed_and_cancelled_jobs_only(backend: &dyn Backend) {
        let queue = backend.open(settings()).await;
        let worker = worker("w");
        let id = enqueue(&*queue, NewJob { max_attempts: 1, ..new_job("meeting") }).await;
        let lease = take(&*queue, &worker).await;
        let saved = checkpoint(json!({"path": "audio.wav"}));
        queue.save_checkpoint(&id, &lease.token, "download", &saved).await.unwrap();
        assert_eq!(queue.fail(&id, &lease.token, failure("whisper: 500", true)).await.unwrap(), FailOutcome::Failed);

        queue.retry(&id).await.unwrap();
        let job = get(&*queue, &id).await;
        assert_eq!((job.state, job.attempts, job.finished_at), (JobState::Waiting, 0, None));
        let lease = take(&*queue, &worker).await;
        assert_eq!((lease.job.id.as_str(), lease.job.attempts), (id.as_str(), 1), "fresh attempts");
        assert_eq!(queue.checkpoints(&id).await.unwrap().get("download"), Some(&saved), "checkpoints kept");
        let wrong = queue.retry(&id).await;
        assert!(
            matches!(&wrong, Err(QueueError::WrongState { state: JobState::Active, action: "retry", .. })),
            "{wrong:?}"
        );
        queue.complete(&id, &lease.token, json!({})).await.unwrap();
        let wrong = queue.retry(&id).await;
        assert!(matches!(&wrong, Err(QueueError::WrongState { state: JobState::Completed, .. })), "{wrong:?}");

        let cancelled = enqueue(&*queue, new_job("meeting")).await;
        queue.cancel(&cancelled).await.unwrap();
        queue.retry(&cancelled).await.unwrap();
        assert_eq!(state(&*queue, &cancelled).await, JobState::Waiting);
        let wrong = queue.retry(&cancelled).await;
        assert!(matches!(&wrong, Err(QueueError::WrongState { state: JobState::Waiting, .. })), "{wrong:?}");
        let delayed = enqueue(&*queue, NewJob { delay: Some(Duration::from_secs(3600)), ..new_job("meeting") }).await;
        let wrong = queue.retry(&delayed).await;
        assert!(matches!(&wrong, Err(QueueError::WrongState { state: JobState::Delayed, .. })), "{wrong:?}");
        let missing = queue.retry("no-such-job").await;
        assert!(matches!(missing, Err(QueueError::NotFound(_))), "{missing:?}");
        assert_eq!(take(&*queue, &worker).await.job.id, cancelled);

        // A retry may not make a second live job for one recording.
        let recording = NewJob { recording_id: Some("rec-9".into()), ..new_job("meeting") };
        let old = failed_job(&*queue, &worker, recording.clone()).await;
        let new = enqueue(&*queue, recording).await;
        let conflict = queue.retry(&old).await;
        assert!(matches!(&conflict, Err(QueueError::Invalid(message)) if message.contains(&new)), "{conflict:?}");
        assert_eq!(state(&*queue, &old).await, JobState::Failed);
        assert_eq!(queue.live_job_for("rec-9").await.unwrap(), Some(new));
    }

    pub async fn retry_failed_retries_the_failed_jobs_of_a_pipeline(backend: &dyn Backend) {
        let queue = backend.open(settings()).await;
        let worker = worker("w");
        let mut meetings = vec![
            failed_job(&*queue, &worker, new_job("meeting")).await,
            failed_job(&*queue, &worker, new_job("meeting")).await,
        ];
        meetings.sort();
        let podcast = failed_job(&*queue, &worker, new_job("podcast")).await;
        let cancelled = enqueue(&*queue, new_job("meeting")).await;
        queue.cancel(&cancelled).await.unwrap();

        let mut retried = queue.retry_failed(Some("meeting")).await.unwrap();
        retried.sort();
        assert_eq!(retried, meetings);
        for id in &meetings {
            assert_eq!(state(&*queue, id).await, JobState::Waiting);
        }
        assert_eq!(state(&*queue, &podcast).await, JobState::Failed);
        assert_eq!(state(&*queue, &cancelled).await, JobState::Cancelled, "only failed jobs are retried");
        assert!(queue.retry_failed(Some("meeting")).await.unwrap().is_empty());
        assert!(queue.retry_failed(Some("no-such-pipeline")).await.unwrap().is_empty());
        assert_eq!(queue.retry_failed(None).await.unwrap(), vec![podcast.clone()]);
        assert_eq!(state(&*queue, &podcast).await, JobState::Waiting);
    }

    pub async fn paused_queue_hands_out_nothing_until_resumed(backend: &dyn Backend) {
        let queue = backend.open(settings()).await;
        let worker = worker("w");
        let running = enqueue(&*queue, new_job("meeting")).await;
        let lease = take(&*queue, &worker).await;
        queue.set_paused(true).await.unwrap();
        assert!(queue.stats().await.unwrap().paused);
        let id = enqueue(&*queue, new_job("meeting")).await;
        // Running jobs go on.
        assert_eq!(queue.renew(&[(running.clone(), lease.token.clone())]).await.unwrap(), vec![Renewal::Held]);
        queue.complete(&running, &lease.token, json!({})).await.unwrap();
        let started = Instant::now();
        let taken = within("take while paused", ms(3000), queue.take(&worker, ms(300))).await.unwrap();
        assert!(taken.is_none(), "a paused queue handed out a job");
        assert!(started.elapsed() >= ms(250), "a paused take returned at once instead of waiting");

        let taker = {
            let (queue, worker) = (queue.clone(), worker.clone());
            tokio::spawn(async move { queue.take(&worker, Duration::from_secs(5)).await })
        };
        tokio::time::sleep(ms(200)).await;
        let resumed = Instant::now();
        queue.set_paused(false).await.unwrap();
        let lease = within("take after resume", ms(3000), taker).await.unwrap().unwrap();
        assert_eq!(lease.map(|lease| lease.job.id), Some(id));
        assert!(resumed.elapsed() < ms(1000), "the waiting taker woke {:?} after resume", resumed.elapsed());
        assert!(!queue.stats().await.unwrap().paused);
    }

    pub async fn promote_makes_a_delayed_job_ready_now(backend: &dyn Backend) {
        let queue = backend.open(settings()).await;
        let worker = worker("w");
        let id = enqueue(&*queue, NewJob { delay: Some(Duration::from_secs(3600)), ..new_job("meeting") }).await;
        assert!(take_now(&*queue, &worker).await.is_none());
        queue.promote(&id).await.unwrap();
        let job = get(&*queue, &id).await;
        assert_eq!(job.state, JobState::Waiting);
        let wrong = queue.promote(&id).await;
        assert!(
            matches!(&wrong, Err(QueueError::WrongState { state: JobState::Waiting, action: "promote", .. })),
            "{wrong:?}"
        );
        assert_eq!(take_now(&*queue, &worker).await.map(|lease| lease.job.id), Some(id));
        let missing = queue.promote("no-such-job").await;
        assert!(matches!(missing, Err(QueueError::NotFound(_))), "{missing:?}");
    }

    pub async fn job_log_keeps_the_newest_lines(backend: &dyn Backend) {
        let queue = backend.open(QueueSettings { max_log_lines: 3, ..settings() }).await;
        let id = enqueue(&*queue, new_job("meeting")).await;
        for n in 1..=5 {
            queue.log(&id, &format!("line {n}")).await.unwrap();
        }
        let logs = queue.logs(&id).await.unwrap();
        let lines: Vec<&str> = logs.iter().map(|log| log.line.as_str()).collect();
        assert_eq!(lines, ["line 3", "line 4", "line 5"]);
        assert!(logs.windows(2).all(|pair| pair[0].at <= pair[1].at));
        assert!(logs[0].at >= get(&*queue, &id).await.created_at);
        let other = enqueue(&*queue, new_job("meeting")).await;
        assert!(queue.logs(&other).await.unwrap().is_empty());
        // A line for a job that does not exist is dropped; it makes no job.
        queue.log("no-such-job", "lost line").await.unwrap();
        assert!(queue.logs("no-such-job").await.unwrap().is_empty());
        assert!(queue.get("no-such-job").await.unwrap().is_none());
    }

    pub async fn clean_removes_final_jobs_by_age_and_count(backend: &dyn Backend) {
        let queue = backend.open(settings()).await;
        let worker = worker("w");
        let old = completed_job(&*queue, &worker, new_job("meeting")).await;
        tokio::time::sleep(ms(400)).await;
        let recent = [
            completed_job(&*queue, &worker, new_job("meeting")).await,
            completed_job(&*queue, &worker, new_job("meeting")).await,
        ];
        assert_eq!(queue.clean(JobState::Completed, Duration::from_secs(3600), 100).await.unwrap(), 0);
        assert_eq!(queue.clean(JobState::Completed, ms(300), 100).await.unwrap(), 1, "by age");
        assert!(queue.get(&old).await.unwrap().is_none());
        for id in &recent {
            assert_eq!(state(&*queue, id).await, JobState::Completed);
        }
        assert_eq!(queue.clean(JobState::Completed, Duration::ZERO, 1).await.unwrap(), 1, "by count");
        assert_eq!(queue.stats().await.unwrap().counts[&JobState::Completed], 1);

        // A failed job goes with its checkpoints and logs.
        let failed = enqueue(&*queue, NewJob { max_attempts: 1, ..new_job("meeting") }).await;
        let lease = take(&*queue, &worker).await;
        queue.save_checkpoint(&failed, &lease.token, "download", &checkpoint(json!(1))).await.unwrap();
        queue.log(&failed, "download: done").await.unwrap();
        queue.fail(&failed, &lease.token, failure("whisper: 500", true)).await.unwrap();
        let cancelled = enqueue(&*queue, new_job("meeting")).await;
        queue.cancel(&cancelled).await.unwrap();
        assert_eq!(queue.clean(JobState::Failed, Duration::ZERO, 100).await.unwrap(), 1);
        assert!(queue.get(&failed).await.unwrap().is_none());
        assert!(queue.checkpoints(&failed).await.unwrap().is_empty());
        assert!(queue.logs(&failed).await.unwrap().is_empty());
        assert_eq!(queue.clean(JobState::Cancelled, Duration::ZERO, 100).await.unwrap(), 1);
        assert!(queue.get(&cancelled).await.unwrap().is_none());

        for live in [JobState::Waiting, JobState::Delayed, JobState::Active] {
            let refused = queue.clean(live, Duration::ZERO, 100).await;
            assert!(matches!(refused, Err(QueueError::Invalid(_))), "clean {live}: {refused:?}");
        }
    }

    pub async fn retention_keeps_final_jobs_by_count_and_age(backend: &dyn Backend) {
        let queue = backend.open(QueueSettings { keep_completed: 2, keep_failed_for: ms(300), ..settings() }).await;
        let worker = worker("w");
        let mut completed = Vec::new();
        for _ in 0..3 {
            completed.push(completed_job(&*queue, &worker, new_job("meeting")).await);
            tokio::time::sleep(ms(20)).await;
        }
        assert!(queue.get(&completed[0]).await.unwrap().is_none(), "the oldest completed job was kept");
        assert_eq!(state(&*queue, &completed[1]).await, JobState::Completed);
        assert_eq!(state(&*queue, &completed[2]).await, JobState::Completed);
        assert_eq!(queue.stats().await.unwrap().counts[&JobState::Completed], 2);

        let old = failed_job(&*queue, &worker, new_job("meeting")).await;
        tokio::time::sleep(ms(400)).await;
        let new = failed_job(&*queue, &worker, new_job("meeting")).await;
        assert!(queue.get(&old).await.unwrap().is_none(), "a failed job outlived keep_failed_for");
        assert_eq!(state(&*queue, &new).await, JobState::Failed);
    }

    pub async fn stats_count_states_workers_and_minutes(backend: &dyn Backend) {
        // A long backoff keeps the retrying job delayed.
        let queue = backend.open(QueueSettings { backoff: Duration::from_secs(3600), ..settings() }).await;
        let (busy, quiet) = (worker("busy"), worker("quiet"));
        completed_job(&*queue, &busy, new_job("meeting")).await;
        completed_job(&*queue, &busy, new_job("meeting")).await;
        failed_job(&*queue, &busy, new_job("meeting")).await;
        let retrying = enqueue(&*queue, new_job("meeting")).await;
        let lease = take(&*queue, &busy).await;
        let outcome = queue.fail(&retrying, &lease.token, failure("whisper: 503", true)).await.unwrap();
        assert!(matches!(outcome, FailOutcome::Retrying { .. }));
        enqueue(&*queue, new_job("meeting")).await;
        take(&*queue, &busy).await;
        let cancelled = enqueue(&*queue, new_job("meeting")).await;
        queue.cancel(&cancelled).await.unwrap();
        enqueue(&*queue, new_job("meeting")).await;

        queue.heartbeat(&busy).await.unwrap();
        queue.heartbeat(&quiet).await.unwrap();
        let stats = queue.stats().await.unwrap();
        let expected = [
            (JobState::Waiting, 1),
            (JobState::Delayed, 1),
            (JobState::Active, 1),
            (JobState::Completed, 2),
            (JobState::Failed, 1),
            (JobState::Cancelled, 1),
        ];
        assert_eq!(stats.counts, expected.into_iter().collect::<BTreeMap<_, _>>());
        assert!(!stats.paused);
        let ids: Vec<&str> = stats.workers.iter().map(|w| w.id.as_str()).collect();
        assert_eq!(ids.len(), 2, "{ids:?}");
        let seen = stats.workers.iter().find(|w| w.id == busy.id).expect("the busy worker is missing");
        assert_eq!(
            (&seen.host, seen.pid, &seen.version, seen.concurrency, seen.running),
            (&busy.host, busy.pid, &busy.version, busy.concurrency, busy.running)
        );
        let created = get(&*queue, &cancelled).await.created_at;
        assert!(seen.last_heartbeat >= created, "the heartbeat is not on the queue's clock");
        // Only jobs that failed for good count as failed; the retrying one does not.
        assert_eq!(stats.per_minute.iter().map(|m| m.completed).sum::<u64>(), 2);
        assert_eq!(stats.per_minute.iter().map(|m| m.failed).sum::<u64>(), 1);
        assert!(stats.per_minute.iter().all(|m| m.minute % 60_000 == 0), "{:?}", stats.per_minute);
        assert!(stats.per_minute.windows(2).all(|pair| pair[0].minute < pair[1].minute));
        assert!(stats.per_minute.iter().all(|m| m.minute <= seen.last_heartbeat));

        // A worker silent for three lease lengths drops out.
        tokio::time::sleep(LEASE * 3 + ms(200)).await;
        queue.heartbeat(&busy).await.unwrap();
        let workers: Vec<String> = queue.stats().await.unwrap().workers.into_iter().map(|w| w.id).collect();
        assert_eq!(workers, vec![busy.id.clone()]);
    }

    pub async fn enqueue_many_keeps_good_items_when_one_is_bad(backend: &dyn Backend) {
        let queue = backend.open(settings()).await;
        let recording = NewJob { recording_id: Some("rec-5".into()), ..new_job("meeting") };
        let results = queue
            .enqueue_many(vec![
                recording.clone(),
                NewJob { priority: MAX_PRIORITY + 1, ..new_job("meeting") },
                NewJob { priority: -1, ..new_job("podcast") },
                recording,
                NewJob { delay: Some(Duration::from_secs(3600)), ..new_job("meeting") },
            ])
            .await
            .unwrap();
        assert_eq!(results.len(), 5);
        let Ok(Enqueued::Created(first)) = &results[0] else { panic!("{:?}", results[0]) };
        assert!(matches!(&results[1], Err(QueueError::Invalid(_))), "{:?}", results[1]);
        let Ok(Enqueued::Created(urgent)) = &results[2] else { panic!("{:?}", results[2]) };
        assert_eq!(results[3].as_ref().ok(), Some(&Enqueued::Existing(first.clone())), "same recording twice");
        let Ok(Enqueued::Created(later)) = &results[4] else { panic!("{:?}", results[4]) };
        assert_eq!(state(&*queue, later).await, JobState::Delayed);
        let counts = queue.stats().await.unwrap().counts;
        assert_eq!((counts[&JobState::Waiting], counts[&JobState::Delayed]), (2, 1));
        let worker = worker("w");
        assert_eq!(take(&*queue, &worker).await.job.id, *urgent);
        assert_eq!(take(&*queue, &worker).await.job.id, *first);
        assert!(queue.enqueue_many(Vec::new()).await.unwrap().is_empty());
    }

    pub async fn events_read_from_an_id_miss_nothing(backend: &dyn Backend) {
        let queue = backend.open(settings()).await;
        let mut enqueued = Vec::new();
        for _ in 0..5 {
            enqueued.push(enqueue(&*queue, new_job("meeting")).await);
        }
        // A client reading two at a time, reconnecting from its last id each time.
        let mut seen: Vec<Event> = Vec::new();
        let mut after: Option<String> = None;
        for _ in 0..10 {
            let page = within("events", ms(2000), queue.events(after.as_deref(), 2, Duration::ZERO)).await.unwrap();
            assert!(page.len() <= 2);
            let Some(last) = page.last() else { break };
            after = Some(last.id.clone());
            seen.extend(page);
        }
        let waiting: Vec<&str> = seen
            .iter()
            .filter(|e| matches!(e.kind, EventKind::State { state: JobState::Waiting, .. }))
            .map(|e| e.job_id.as_str())
            .collect();
        assert_eq!(waiting, enqueued.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(seen.windows(2).all(|pair| id_order(&pair[0].id) < id_order(&pair[1].id)), "ids not increasing");
        let mut more = Vec::new();
        for _ in 0..3 {
            more.push(enqueue(&*queue, new_job("meeting")).await);
        }
        let next = within("events", ms(2000), queue.events(after.as_deref(), 100, Duration::ZERO)).await.unwrap();
        let next_jobs: Vec<&str> = next.iter().map(|e| e.job_id.as_str()).collect();
        assert_eq!(next_jobs, more.iter().map(String::as_str).collect::<Vec<_>>(), "missed or repeated events");
        for bad in ["not-an-id", "12-x"] {
            let refused = queue.events(Some(bad), 10, Duration::ZERO).await;
            assert!(matches!(refused, Err(QueueError::Invalid(_))), "{bad}: {refused:?}");
        }
    }

    pub async fn events_wait_for_the_next_event(backend: &dyn Backend) {
        let queue = backend.open(settings()).await;
        let started = Instant::now();
        let none = within("events", ms(3000), queue.events(None, 10, ms(300))).await.unwrap();
        assert!(none.is_empty());
        assert!(started.elapsed() >= ms(250), "an empty read returned after {:?}", started.elapsed());
        let reader = {
            let queue = queue.clone();
            tokio::spawn(async move { queue.events(None, 10, Duration::from_secs(5)).await })
        };
        tokio::time::sleep(ms(200)).await;
        let sent = Instant::now();
        let id = enqueue(&*queue, new_job("meeting")).await;
        let events = within("a waiting reader", ms(3000), reader).await.unwrap().unwrap();
        assert!(sent.elapsed() < ms(1000), "the reader woke {:?} after the event", sent.elapsed());
        assert_eq!(events.first().map(|e| e.job_id.as_str()), Some(id.as_str()));
        assert!(events[0].at >= get(&*queue, &id).await.created_at);
    }

    pub async fn checkpoints_are_fenced_kept_for_retry_and_dropped_when_done(backend: &dyn Backend) {
        let queue = backend.open(QueueSettings { backoff: ms(50), ..settings() }).await;
        let worker = worker("w");
        let id = enqueue(&*queue, NewJob { max_attempts: 2, ..new_job("meeting") }).await;
        assert!(queue.checkpoints(&id).await.unwrap().is_empty());
        let first = take(&*queue, &worker).await;
        let download = checkpoint(json!({"path": "audio.wav", "bytes": 1234}));
        queue.save_checkpoint(&id, &first.token, "download", &download).await.unwrap();
        let refused = queue.save_checkpoint(&id, &LeaseToken("other".into()), "download", &checkpoint(json!(0))).await;
        assert!(matches!(refused, Err(QueueError::LeaseLost(_))), "{refused:?}");
        assert_eq!(queue.checkpoints(&id).await.unwrap(), BTreeMap::from([("download".to_string(), download.clone())]));

        // Kept through a retry after a backoff…
        queue.fail(&id, &first.token, failure("whisper: 503", true)).await.unwrap();
        let second = take(&*queue, &worker).await;
        assert_eq!(queue.checkpoints(&id).await.unwrap().len(), 1);
        let chunk = StageOutput::from(json!({"text": "hello"}));
        queue.save_checkpoint(&id, &second.token, "whisper/chunk-0", &chunk).await.unwrap();
        let stale = queue.save_checkpoint(&id, &first.token, "whisper/chunk-1", &chunk).await;
        assert!(matches!(stale, Err(QueueError::LeaseLost(_))), "{stale:?}");
        // …through a cancel and a retry by hand…
        queue.cancel(&id).await.unwrap();
        queue.cancelled(&id, &second.token).await.unwrap();
        let kept = queue.checkpoints(&id).await.unwrap();
        assert_eq!(kept.keys().collect::<Vec<_>>(), ["download", "whisper/chunk-0"]);
        queue.retry(&id).await.unwrap();
        let third = take(&*queue, &worker).await;
        assert_eq!(queue.checkpoints(&id).await.unwrap(), kept);
        // …and dropped when the job completes.
        queue.complete(&id, &third.token, json!({})).await.unwrap();
        assert!(queue.checkpoints(&id).await.unwrap().is_empty(), "checkpoints outlived the completed job");
        assert!(queue.checkpoints("no-such-job").await.unwrap().is_empty());
    }

    pub async fn take_wakes_when_a_job_arrives(backend: &dyn Backend) {
        let (taking, adding) = (backend.open(settings()).await, backend.open(settings()).await);
        let worker = worker("w");
        let taker = tokio::spawn(async move { taking.take(&worker, Duration::from_secs(5)).await });
        tokio::time::sleep(ms(300)).await;
        let sent = Instant::now();
        let id = enqueue(&*adding, new_job("meeting")).await;
        let lease = within("a waiting take", ms(3000), taker).await.unwrap().unwrap();
        let woke = sent.elapsed();
        assert_eq!(lease.map(|lease| lease.job.id), Some(id));
        assert!(woke < ms(750), "the waiting taker woke {woke:?} after the job arrived");
    }

    pub async fn take_returns_none_when_its_wait_ends(backend: &dyn Backend) {
        let queue = backend.open(settings()).await;
        let worker = worker("w");
        let started = Instant::now();
        let taken = within("take", ms(3000), queue.take(&worker, ms(400))).await.unwrap();
        let waited = started.elapsed();
        assert!(taken.is_none());
        assert!(waited >= ms(350), "take gave up after {waited:?} of a 400 ms wait");
        assert!(waited < ms(2000), "take waited {waited:?} for a 400 ms wait");
        assert!(take_now(&*queue, &worker).await.is_none());
    }

    pub async fn list_pages_jobs_in_run_order(backend: &dyn Backend) {
        let queue = backend.open(settings()).await;
        let worker = worker("w");
        let mut done = Vec::new();
        for _ in 0..3 {
            done.push(completed_job(&*queue, &worker, new_job("meeting")).await);
            tokio::time::sleep(ms(20)).await;
        }
        let mut expected = Vec::new();
        for priority in [3, 1, 2, 1, 3] {
            expected.push((priority, enqueue(&*queue, NewJob { priority, ..new_job("meeting") }).await));
        }
        expected.sort_by_key(|(priority, _)| *priority); // stable: enqueue order within a priority
        let expected: Vec<JobId> = expected.into_iter().map(|(_, id)| id).collect();

        let mut listed = Vec::new();
        let mut cursor: Option<String> = None;
        for page_number in 0.. {
            assert!(page_number < 10, "paging did not end");
            let page = queue.list(JobState::Waiting, cursor.as_deref(), 2).await.unwrap();
            assert!(page.jobs.len() <= 2);
            assert!(page.jobs.iter().all(|job| job.state == JobState::Waiting));
            listed.extend(page.jobs.into_iter().map(|job| job.id));
            cursor = page.next_cursor;
            if cursor.is_none() {
                break;
            }
        }
        assert_eq!(listed, expected);

        let later = enqueue(&*queue, NewJob { delay: Some(Duration::from_secs(7200)), ..new_job("meeting") }).await;
        let sooner = enqueue(&*queue, NewJob { delay: Some(Duration::from_secs(3600)), ..new_job("meeting") }).await;
        let delayed = queue.list(JobState::Delayed, None, 10).await.unwrap();
        assert_eq!(delayed.jobs.iter().map(|job| job.id.clone()).collect::<Vec<_>>(), [sooner, later]);
        assert_eq!(delayed.next_cursor, None);

        let completed = queue.list(JobState::Completed, None, 10).await.unwrap();
        let newest_first: Vec<JobId> = done.iter().rev().cloned().collect();
        assert_eq!(completed.jobs.iter().map(|job| job.id.clone()).collect::<Vec<_>>(), newest_first);
        assert!(queue.list(JobState::Failed, None, 10).await.unwrap().jobs.is_empty());
        let refused = queue.list(JobState::Waiting, Some("not-a-cursor"), 2).await;
        assert!(matches!(refused, Err(QueueError::Invalid(_))), "{refused:?}");
        assert!(queue.get("no-such-job").await.unwrap().is_none());
    }

    pub async fn progress_and_stage_events_are_stored_and_streamed(backend: &dyn Backend) {
        let queue = backend.open(settings()).await;
        let worker = worker("w");
        let id = enqueue(&*queue, new_job("meeting")).await;
        let lease = take(&*queue, &worker).await;
        let progress = Progress { percent: 40, stage: Some("whisper".into()), message: "chunk 2 of 5".into() };
        queue.stage_event(&id, &lease.token, "whisper", "running").await.unwrap();
        queue.progress(&id, &lease.token, progress.clone()).await.unwrap();
        assert_eq!(get(&*queue, &id).await.progress, Some(progress.clone()));
        let events = all_events(&*queue).await;
        let kinds: Vec<&EventKind> = events.iter().filter(|e| e.job_id == id).map(|e| &e.kind).collect();
        assert_eq!(
            kinds,
            [
                &EventKind::State { state: JobState::Waiting, reason: None },
                &EventKind::State { state: JobState::Active, reason: None },
                &EventKind::Stage { stage: "whisper".into(), status: "running".into() },
                &EventKind::Progress(progress.clone()),
            ]
        );
        let missing = queue.progress("no-such-job", &lease.token, progress).await;
        assert!(matches!(missing, Err(QueueError::LeaseLost(_))), "{missing:?}");
    }

    pub async fn take_many_takes_ready_jobs_in_run_order_up_to_its_max(backend: &dyn Backend) {
        let queue = backend.open(settings()).await;
        let worker = worker("w");
        assert!(queue.take_many(&worker, Duration::ZERO, 5).await.unwrap().is_empty(), "nothing to take yet");
        let late = enqueue(&*queue, NewJob { priority: 5, ..new_job("meeting") }).await;
        let mut ids = Vec::new();
        for _ in 0..4 {
            ids.push(enqueue(&*queue, new_job("meeting")).await);
        }
        assert!(queue.take_many(&worker, Duration::ZERO, 0).await.unwrap().is_empty(), "max 0 takes nothing");
        let first = within("take_many", ms(3000), queue.take_many(&worker, TAKE_WAIT, 3)).await.unwrap();
        let taken: Vec<&str> = first.iter().map(|lease| lease.job.id.as_str()).collect();
        assert_eq!(taken, ids[..3].iter().map(String::as_str).collect::<Vec<_>>(), "run order, at most max");
        let tokens: std::collections::BTreeSet<&str> = first.iter().map(|lease| lease.token.0.as_str()).collect();
        assert_eq!(tokens.len(), 3, "one lease token per job");
        for lease in &first {
            assert_eq!(lease.job.state, JobState::Active);
            assert_eq!(lease.job.attempts, 1);
            assert!(!lease.resume, "a new job has no checkpoints");
            assert_eq!(state(&*queue, &lease.job.id).await, JobState::Active);
        }
        let pairs: Vec<(JobId, LeaseToken)> = first.iter().map(|l| (l.job.id.clone(), l.token.clone())).collect();
        assert_eq!(queue.renew(&pairs).await.unwrap(), vec![Renewal::Held; 3]);
        // Tokens are not interchangeable between the jobs of one take.
        let swapped = queue.complete(&first[0].job.id, &first[1].token, json!({})).await;
        assert!(matches!(swapped, Err(QueueError::LeaseLost(_))), "{swapped:?}");
        for lease in &first {
            queue.complete(&lease.job.id, &lease.token, json!({ "ok": true })).await.unwrap();
        }
        let rest = queue.take_many(&worker, Duration::ZERO, 10).await.unwrap();
        let rest: Vec<&str> = rest.iter().map(|lease| lease.job.id.as_str()).collect();
        assert_eq!(rest, [ids[3].as_str(), late.as_str()], "what is left, fewer than max");
        // Paused: nothing, even with jobs waiting; a wait ends empty.
        enqueue(&*queue, new_job("meeting")).await;
        queue.set_paused(true).await.unwrap();
        let started = Instant::now();
        assert!(queue.take_many(&worker, ms(300), 5).await.unwrap().is_empty());
        assert!(started.elapsed() >= ms(250), "it waited out its wait");
        queue.set_paused(false).await.unwrap();
        assert_eq!(within("take_many", ms(3000), queue.take_many(&worker, TAKE_WAIT, 5)).await.unwrap().len(), 1);
    }

    pub async fn complete_and_take_writes_the_notes_completes_and_takes_the_next(backend: &dyn Backend) {
        let queue = backend.open(settings()).await;
        let worker = worker("w");
        let first = enqueue(&*queue, new_job("meeting")).await;
        let second = enqueue(&*queue, new_job("meeting")).await;
        let lease = take(&*queue, &worker).await;
        assert_eq!(lease.job.id, first);
        let progress = Progress { percent: 100, stage: Some("work".into()), message: "completed".into() };
        let notes = Notes {
            events: vec![
                EventKind::Stage { stage: "work".into(), status: "running".into() },
                EventKind::Progress(progress.clone()),
                EventKind::Stage { stage: "work".into(), status: "succeeded".into() },
            ],
            log: vec!["attempt 1 started".into(), "completed in 0.0 s".into()],
            ..Notes::default()
        };
        let next = queue
            .complete_and_take(&first, &lease.token, json!({ "ok": 1 }), &notes, Some(&worker))
            .await
            .unwrap()
            .expect("the next job comes with the completion");
        assert_eq!(next.job.id, second);
        assert_eq!(next.job.state, JobState::Active);
        assert_eq!(next.job.worker.as_deref(), Some(worker.id.as_str()));
        assert!(!next.resume);
        let done = get(&*queue, &first).await;
        assert_eq!(done.state, JobState::Completed);
        assert_eq!(done.result, Some(json!({ "ok": 1 })));
        assert_eq!(done.progress, Some(progress.clone()), "the last progress noted is stored");
        let lines: Vec<String> = queue.logs(&first).await.unwrap().into_iter().map(|log| log.line).collect();
        assert_eq!(lines, ["attempt 1 started", "completed in 0.0 s"]);
        let events = all_events(&*queue).await;
        let kinds: Vec<&EventKind> = events.iter().filter(|e| e.job_id == first).map(|e| &e.kind).collect();
        assert_eq!(
            kinds,
            [
                &EventKind::State { state: JobState::Waiting, reason: None },
                &EventKind::State { state: JobState::Active, reason: None },
                &notes.events[0],
                &notes.events[2],
                &EventKind::State { state: JobState::Completed, reason: None },
            ],
            "the notes come before the final state; a completion streams no progress (it is stored)"
        );
        assert_eq!(states_of(&events, &second), [(JobState::Waiting, None), (JobState::Active, None)]);
        // Nothing left: the job completes and nothing is taken; without a worker nothing is taken either.
        let none = queue.complete_and_take(&second, &next.token, json!({}), &Notes::default(), Some(&worker)).await;
        assert!(matches!(none, Ok(None)), "{none:?}");
        assert_eq!(state(&*queue, &second).await, JobState::Completed);
        let third = enqueue(&*queue, new_job("meeting")).await;
        let fourth = enqueue(&*queue, new_job("meeting")).await;
        let lease = take(&*queue, &worker).await;
        assert_eq!(lease.job.id, third);
        let taken = queue.complete_and_take(&third, &lease.token, json!({}), &Notes::default(), None).await.unwrap();
        assert!(taken.is_none(), "no worker named, nothing taken");
        assert_eq!(state(&*queue, &fourth).await, JobState::Waiting);
        // Paused: the completion happens, nothing is taken.
        let lease = take(&*queue, &worker).await;
        let fifth = enqueue(&*queue, new_job("meeting")).await;
        queue.set_paused(true).await.unwrap();
        let taken =
            queue.complete_and_take(&fourth, &lease.token, json!({}), &Notes::default(), Some(&worker)).await.unwrap();
        assert!(taken.is_none(), "paused: nothing taken");
        assert_eq!(state(&*queue, &fourth).await, JobState::Completed);
        assert_eq!(state(&*queue, &fifth).await, JobState::Waiting);
    }

    pub async fn complete_and_take_refuses_a_stale_lease_and_state_events(backend: &dyn Backend) {
        let queue = backend.open(settings()).await;
        let (one, two) = (worker("one"), worker("two"));
        let id = enqueue(&*queue, new_job("meeting")).await;
        let waiting = enqueue(&*queue, new_job("meeting")).await;
        let stale = take(&*queue, &one).await;
        assert_eq!(stale.job.id, id);
        let noted = Notes {
            events: vec![EventKind::Stage { stage: "work".into(), status: "running".into() }],
            ..Notes::default()
        };
        // A state event is the queue's to write: refused, nothing written, the job still held.
        let bad = Notes {
            events: vec![EventKind::State { state: JobState::Completed, reason: None }],
            log: vec!["never written".into()],
            ..Notes::default()
        };
        let refused = queue.complete_and_take(&id, &stale.token, json!({}), &bad, Some(&one)).await;
        assert!(matches!(&refused, Err(QueueError::Invalid(message)) if message.contains(&id)), "{refused:?}");
        assert_eq!(state(&*queue, &id).await, JobState::Active);
        assert!(queue.logs(&id).await.unwrap().is_empty());
        // The lease passes to another worker: the stale holder completes nothing, writes nothing, takes nothing.
        tokio::time::sleep(PAST_LEASE).await;
        assert_eq!(queue.recover_stalled().await.unwrap(), vec![went(&id, JobState::Waiting)]);
        let current = take(&*queue, &two).await;
        assert_eq!(current.job.id, id);
        let lost = queue.complete_and_take(&id, &stale.token, json!({ "stale": true }), &noted, Some(&one)).await;
        assert!(matches!(lost, Err(QueueError::LeaseLost(_))), "{lost:?}");
        assert_eq!(state(&*queue, &waiting).await, JobState::Waiting, "a refused call takes nothing");
        let job = get(&*queue, &id).await;
        assert_eq!((job.state, job.result), (JobState::Active, None));
        let events = all_events(&*queue).await;
        assert!(!events.iter().any(|e| e.job_id == id && e.kind == noted.events[0]), "no note of the stale holder");
        let gone = queue.complete_and_take("no-such-job", &stale.token, json!({}), &noted, Some(&one)).await;
        assert!(matches!(gone, Err(QueueError::LeaseLost(_))), "{gone:?}");
        assert!(queue.complete_and_take(&id, &current.token, json!({}), &noted, None).await.unwrap().is_none());
        assert_eq!(state(&*queue, &id).await, JobState::Completed);
    }

    pub async fn many_takers_at_once_all_get_jobs(backend: &dyn Backend) {
        let queue = backend.open(settings()).await;
        let jobs = 300;
        let outcomes = queue.enqueue_many((0..jobs).map(|_| new_job("meeting")).collect()).await.unwrap();
        assert!(outcomes.iter().all(Result::is_ok));
        let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut takers = tokio::task::JoinSet::new();
        for n in 0..50 {
            let (queue, done) = (queue.clone(), done.clone());
            takers.spawn(async move {
                let me = worker(&format!("taker-{n}"));
                // Bounded: far more rounds than jobs, each one waiting at most 100 ms.
                for _ in 0..(4 * jobs) {
                    if done.load(std::sync::atomic::Ordering::Acquire) >= jobs {
                        break;
                    }
                    if let Some(lease) = queue.take(&me, ms(100)).await.unwrap() {
                        queue.complete(&lease.job.id, &lease.token, json!({})).await.unwrap();
                        done.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                    }
                }
            });
        }
        within("50 takers draining 300 jobs", Duration::from_secs(60), async {
            while takers.join_next().await.is_some() {}
        })
        .await;
        assert_eq!(done.load(std::sync::atomic::Ordering::Acquire), jobs, "every job taken and completed once");
        let stats = queue.stats().await.unwrap();
        assert_eq!(stats.counts[&JobState::Completed], jobs as u64);
        assert_eq!(stats.counts[&JobState::Waiting], 0);
    }

    pub async fn notes_are_fenced_and_resume_says_whether_checkpoints_exist(backend: &dyn Backend) {
        let queue = backend.open(settings()).await;
        let worker = worker("w");
        let id = enqueue(&*queue, new_job("meeting")).await;
        let lease = take(&*queue, &worker).await;
        assert!(!lease.resume, "nothing saved yet");
        let progress = Progress { percent: 30, stage: Some("work".into()), message: "a third".into() };
        let notes = Notes {
            events: vec![
                EventKind::Stage { stage: "work".into(), status: "running".into() },
                EventKind::Progress(progress.clone()),
            ],
            log: vec!["attempt 1 started".into()],
            ..Notes::default()
        };
        queue.note(&id, &lease.token, &notes).await.unwrap();
        assert_eq!(get(&*queue, &id).await.progress, Some(progress.clone()));
        let lines: Vec<String> = queue.logs(&id).await.unwrap().into_iter().map(|log| log.line).collect();
        assert_eq!(lines, ["attempt 1 started"]);
        let events = all_events(&*queue).await;
        let kinds: Vec<&EventKind> = events.iter().filter(|e| e.job_id == id).map(|e| &e.kind).skip(2).collect();
        assert_eq!(kinds, [&notes.events[0], &notes.events[1]]);
        let bad =
            Notes { events: vec![EventKind::State { state: JobState::Failed, reason: None }], ..Notes::default() };
        assert!(matches!(queue.note(&id, &lease.token, &bad).await, Err(QueueError::Invalid(_))));
        let stale = queue.note(&id, &LeaseToken("not-the-token".into()), &notes).await;
        assert!(matches!(stale, Err(QueueError::LeaseLost(_))), "{stale:?}");
        // A failed attempt that saved a checkpoint: the retry is told to read them.
        queue.save_checkpoint(&id, &lease.token, "download", &checkpoint(json!({ "bytes": 1 }))).await.unwrap();
        let retry = Failure { retry_after: Some(ms(1)), ..failure("network down", true) };
        assert!(matches!(queue.fail(&id, &lease.token, retry).await.unwrap(), FailOutcome::Retrying { .. }));
        let again = take(&*queue, &worker).await;
        assert_eq!(again.job.id, id);
        assert!(again.resume, "checkpoints were saved: read them");
        assert!(!queue.checkpoints(&id).await.unwrap().is_empty());
        // A job released without checkpoints comes back with nothing to read.
        let other = enqueue(&*queue, new_job("meeting")).await;
        queue.complete(&id, &again.token, json!({})).await.unwrap();
        let lease = take(&*queue, &worker).await;
        assert_eq!(lease.job.id, other);
        queue.release(&other, &lease.token).await.unwrap();
        assert!(!take(&*queue, &worker).await.resume);
    }

    pub async fn checkpoints_held_back_in_notes_are_saved_by_note_and_dropped_by_completion(backend: &dyn Backend) {
        let queue = backend.open(settings()).await;
        let worker = worker("w");
        let id = enqueue(&*queue, new_job("meeting")).await;
        let lease = take(&*queue, &worker).await;
        let held = Notes {
            checkpoints: vec![
                ("probe".into(), checkpoint(json!({ "seconds": 3 }))),
                ("download".into(), checkpoint(json!({ "bytes": 7 }))),
            ],
            ..Notes::default()
        };
        // A stale holder's checkpoints are refused and nothing is saved.
        let stale = queue.note(&id, &LeaseToken("not-the-token".into()), &held).await;
        assert!(matches!(stale, Err(QueueError::LeaseLost(_))), "{stale:?}");
        assert!(queue.checkpoints(&id).await.unwrap().is_empty());
        queue.note(&id, &lease.token, &held).await.unwrap();
        let saved = queue.checkpoints(&id).await.unwrap();
        assert_eq!(saved.len(), 2);
        assert_eq!(saved["probe"], checkpoint(json!({ "seconds": 3 })));
        assert_eq!(saved["download"], checkpoint(json!({ "bytes": 7 })));
        // The retry of a job whose checkpoints came with its notes is told to read them.
        let retry = Failure { retry_after: Some(ms(1)), ..failure("network down", true) };
        assert!(matches!(queue.fail(&id, &lease.token, retry).await.unwrap(), FailOutcome::Retrying { .. }));
        let again = take(&*queue, &worker).await;
        assert_eq!(again.job.id, id);
        assert!(again.resume, "checkpoints came with the notes: read them");
        // Checkpoints held back until the completion are dropped with the job's others.
        let last = Notes { checkpoints: vec![("summary".into(), checkpoint(json!("short")))], ..Notes::default() };
        queue.complete_and_take(&id, &again.token, json!({}), &last, None).await.unwrap();
        assert_eq!(state(&*queue, &id).await, JobState::Completed);
        assert!(queue.checkpoints(&id).await.unwrap().is_empty(), "a completed job keeps no checkpoints");
    }
}

/// The memory queue's own clock: what would take hours or days to see on a real clock.
mod memory_clock {
    use super::*;

    fn queue() -> Arc<MemoryQueue> {
        Arc::new(MemoryQueue::new(QueueSettings::default()))
    }

    #[tokio::test]
    async fn a_lease_is_over_at_its_deadline_not_a_millisecond_later() {
        // The clock runs in milliseconds, so a call made in the very millisecond of the deadline is known to
        // have been judged at it; tries that straddle a millisecond are not counted.
        let queue = queue();
        let lease = QueueSettings::default().lease;
        let lease_ms = u64::try_from(lease.as_millis()).unwrap();
        let mut judged = 0;
        for _ in 0..200 {
            let id = enqueue(&*queue, new_job("meeting")).await;
            let before = queue.now();
            let held = take_now(&*queue, &worker("w")).await.unwrap();
            let taken = queue.now();
            queue.advance_clock(lease);
            let at = queue.now();
            let completed = queue.complete(&id, &held.token, json!({})).await;
            let after = queue.now();
            let at_deadline = before == taken && at == after && at == taken + lease_ms;
            if at_deadline {
                assert!(
                    matches!(completed, Err(QueueError::LeaseLost(_))),
                    "a lease that ends now is not held: {completed:?}"
                );
            }
            // Past its deadline in every try: recovered, then cancelled, so that each try starts alone.
            let recovered = queue.recover_stalled().await.unwrap();
            assert_eq!(recovered, vec![went(&id, JobState::Waiting)], "a lease that ended can be recovered");
            assert_eq!(queue.cancel(&id).await.unwrap(), CancelOutcome::Cancelled);
            judged += usize::from(at_deadline);
            if judged == 5 {
                break;
            }
        }
        assert!(judged > 0, "no try was judged in the deadline's millisecond");
    }

    #[tokio::test]
    async fn backoff_doubles_up_to_max_backoff() {
        // Defaults: 5 s doubled per attempt, capped at 10 min.
        let queue = queue();
        let worker = worker("w");
        let id = enqueue(&*queue, NewJob { max_attempts: 10, ..new_job("meeting") }).await;
        let mut waits = Vec::new();
        for _ in 0..9 {
            let lease = take_now(&*queue, &worker).await.expect("the retry was not due after its backoff");
            let FailOutcome::Retrying { at } = queue.fail(&id, &lease.token, failure("x", true)).await.unwrap() else {
                panic!("gave up early")
            };
            let now = queue.now();
            waits.push((at - now + 500) / 1000); // whole seconds
            assert!(take_now(&*queue, &worker).await.is_none());
            queue.advance_clock(Duration::from_millis(at - now));
        }
        assert_eq!(waits, [5, 10, 20, 40, 80, 160, 320, 600, 600]);
    }

    #[tokio::test]
    async fn moving_the_clock_wakes_a_taker_waiting_for_a_delayed_job() {
        let queue = queue();
        let id = enqueue(&*queue, NewJob { delay: Some(Duration::from_secs(3600)), ..new_job("meeting") }).await;
        let taker = {
            let queue = queue.clone();
            tokio::spawn(async move { queue.take(&worker("w"), Duration::from_secs(5)).await })
        };
        tokio::time::sleep(ms(100)).await;
        assert!(!taker.is_finished(), "a job delayed by an hour was handed out");
        let moved = Instant::now();
        queue.advance_clock(Duration::from_secs(3600));
        let lease = within("take", ms(3000), taker).await.unwrap().unwrap();
        assert_eq!(lease.map(|lease| lease.job.id), Some(id));
        assert!(moved.elapsed() < ms(500));
    }

    #[tokio::test]
    async fn a_lease_expires_when_the_clock_passes_it() {
        let queue = queue();
        let id = enqueue(&*queue, new_job("meeting")).await;
        let lease = take_now(&*queue, &worker("w")).await.unwrap();
        queue.advance_clock(Duration::from_secs(29));
        assert!(queue.recover_stalled().await.unwrap().is_empty());
        assert_eq!(queue.renew(&[(id.clone(), lease.token.clone())]).await.unwrap(), vec![Renewal::Held]);
        queue.advance_clock(Duration::from_secs(29));
        assert!(queue.recover_stalled().await.unwrap().is_empty(), "the renewal did not extend the lease");
        queue.advance_clock(Duration::from_secs(2));
        // Expired and not yet recovered: the lease is already lost.
        assert_eq!(queue.renew(&[(id.clone(), lease.token.clone())]).await.unwrap(), vec![Renewal::Lost]);
        let lost = queue.complete(&id, &lease.token, json!({})).await;
        assert!(matches!(lost, Err(QueueError::LeaseLost(_))), "{lost:?}");
        assert_eq!(queue.recover_stalled().await.unwrap(), vec![went(&id, JobState::Waiting)]);
    }

    #[tokio::test]
    async fn retention_drops_jobs_older_than_keep_for() {
        // Defaults: completed jobs kept 7 days, failed ones 30.
        let queue = queue();
        let worker = worker("w");
        let old = completed_job(&*queue, &worker, new_job("meeting")).await;
        let failed = failed_job(&*queue, &worker, new_job("meeting")).await;
        queue.advance_clock(Duration::from_secs(7 * 24 * 3600 - 60));
        completed_job(&*queue, &worker, new_job("meeting")).await;
        assert!(queue.get(&old).await.unwrap().is_some(), "dropped before 7 days");
        queue.advance_clock(Duration::from_secs(120));
        let new = completed_job(&*queue, &worker, new_job("meeting")).await;
        assert!(queue.get(&old).await.unwrap().is_none(), "kept after 7 days");
        assert!(queue.get(&new).await.unwrap().is_some());
        assert!(queue.get(&failed).await.unwrap().is_some(), "a failed job is kept 30 days");
        queue.advance_clock(Duration::from_secs(23 * 24 * 3600));
        failed_job(&*queue, &worker, new_job("meeting")).await;
        assert!(queue.get(&failed).await.unwrap().is_none(), "a failed job kept after 30 days");
    }

    #[tokio::test]
    async fn workers_and_minutes_age_out() {
        let queue = queue();
        let worker = worker("w");
        queue.heartbeat(&worker).await.unwrap();
        completed_job(&*queue, &worker, new_job("meeting")).await;
        queue.advance_clock(Duration::from_secs(89)); // 3 leases of 30 s, less one
        assert_eq!(queue.stats().await.unwrap().workers.len(), 1);
        queue.advance_clock(Duration::from_secs(2));
        assert!(queue.stats().await.unwrap().workers.is_empty(), "a silent worker is still listed");

        queue.advance_clock(Duration::from_secs(60));
        failed_job(&*queue, &worker, new_job("meeting")).await;
        let minutes = queue.stats().await.unwrap().per_minute;
        assert_eq!(minutes.len(), 2, "{minutes:?}");
        assert_eq!((minutes[0].completed, minutes[0].failed, minutes[1].completed, minutes[1].failed), (1, 0, 0, 1));
        queue.advance_clock(Duration::from_secs(59 * 60));
        let minutes = queue.stats().await.unwrap().per_minute;
        assert!(minutes.iter().all(|m| m.completed == 0), "a minute older than an hour: {minutes:?}");
    }

    #[tokio::test]
    async fn per_minute_counts_cover_the_last_sixty_minutes_exactly() {
        let queue = queue();
        let worker = worker("w");
        // Moves the clock a second into the minute that starts at `minute`.
        let into = |minute: u64| {
            let now = queue.now();
            queue.advance_clock(Duration::from_millis(minute + 1000 - now));
        };
        let first = queue.now() - queue.now() % 60_000 + 60_000;
        into(first);
        completed_job(&*queue, &worker, new_job("meeting")).await;
        into(first + 60_000);
        completed_job(&*queue, &worker, new_job("meeting")).await;
        let shown = |minutes: Vec<echo_worker::queue::MinuteCounts>| -> Vec<u64> {
            minutes.iter().filter(|m| m.completed > 0).map(|m| (m.minute - first) / 60_000).collect()
        };
        into(first + 59 * 60_000);
        assert_eq!(shown(queue.stats().await.unwrap().per_minute), [0, 1], "60 minutes, the current one included");
        into(first + 60 * 60_000);
        assert_eq!(shown(queue.stats().await.unwrap().per_minute), [1], "the 61st minute back is gone");
    }

    #[tokio::test]
    async fn the_event_stream_keeps_max_events() {
        let queue = Arc::new(MemoryQueue::new(QueueSettings { max_events: 3, ..QueueSettings::default() }));
        let mut ids = Vec::new();
        for _ in 0..5 {
            ids.push(enqueue(&*queue, new_job("meeting")).await);
        }
        let events = all_events(&*queue).await;
        assert_eq!(events.iter().map(|e| e.job_id.clone()).collect::<Vec<_>>(), ids[2..]);
        // A reader behind the oldest kept event goes on from it.
        let behind = queue.events(Some("0-0"), 10, Duration::ZERO).await.unwrap();
        assert_eq!(behind.len(), 3);
    }

    #[tokio::test]
    async fn zero_limits_and_empty_keys_are_refused() {
        let queue = queue();
        let list = queue.list(JobState::Waiting, None, 0).await;
        assert!(matches!(list, Err(QueueError::Invalid(_))), "{list:?}");
        let events = queue.events(None, 0, Duration::ZERO).await;
        assert!(matches!(events, Err(QueueError::Invalid(_))), "{events:?}");
        let keyless = queue.enqueue(NewJob { idempotency_key: Some(" ".into()), ..new_job("meeting") }).await;
        assert!(matches!(&keyless, Err(QueueError::Invalid(m)) if m.contains("idempotency key")), "{keyless:?}");
        let unnamed = queue.enqueue(new_job("")).await;
        assert!(matches!(&unnamed, Err(QueueError::Invalid(m)) if m.contains("pipeline")), "{unnamed:?}");
    }
}
