//! The queue kept in this process's memory: the [`Queue`] contract for `serve` with no `REDIS_URL` and for tests.
//! Jobs, leases, checkpoints and events last as long as the process. Its clock can be moved forward
//! ([`MemoryQueue::advance_clock`]) so that delays, backoffs, lease expiry and retention can be tested without
//! waiting for them.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{
    CancelOutcome, Enqueued, Event, EventKind, FailOutcome, Failure, Job, JobId, JobPage, JobState, Lease, LeaseToken,
    LogLine, MinuteCounts, NewJob, Notes, Progress, Queue, QueueError, QueueSettings, Recovered, Renewal, Stats,
    WorkerInfo,
};
use crate::job::StageOutput;

const MINUTE_MS: u64 = 60_000;
/// Per-minute counts are kept for this many minutes, the current one included.
const MINUTES_KEPT: u64 = 60;

/// The start of the oldest minute whose counts are kept at `now`.
fn first_kept_minute(now: u64) -> u64 {
    (now - now % MINUTE_MS).saturating_sub((MINUTES_KEPT - 1) * MINUTE_MS)
}

/// The in-process queue. Cheap to share behind an `Arc`; every operation takes one lock for a short,
/// non-blocking critical section, and waiting ([`Queue::take`], [`Queue::events`]) sleeps on a
/// [`Notify`] until something changes, never in a polling loop.
#[derive(Debug)]
pub struct MemoryQueue {
    clock: Clock,
    state: Mutex<State>,
    /// Woken when a job may have become ready: a job entered waiting or delayed, the queue was resumed, or the
    /// clock was moved.
    ready: Notify,
    /// Woken when an event is appended.
    appended: Notify,
}

/// Milliseconds since the epoch: the wall clock when the queue was made, then a monotonic clock, plus an offset
/// that tests move forward.
#[derive(Debug)]
struct Clock {
    epoch_ms: u64,
    start: Instant,
    offset_ms: AtomicU64,
}

impl Clock {
    fn new() -> Self {
        let epoch_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, millis);
        Self { epoch_ms, start: Instant::now(), offset_ms: AtomicU64::new(0) }
    }

    fn now(&self) -> u64 {
        self.epoch_ms.saturating_add(millis(self.start.elapsed())).saturating_add(self.offset_ms.load(Ordering::SeqCst))
    }
}

/// A duration in whole milliseconds, saturating.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// A queue-clock time as an index key component; times this large are centuries away.
fn key_time(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

/// The key that allows one live job: the explicit idempotency key, else the recording id.
fn live_key(spec: &NewJob) -> Option<&str> {
    spec.idempotency_key.as_deref().or(spec.recording_id.as_deref())
}

/// The wait before the attempt after `attempt` (1 for the first): the failure's own wait when it gave one,
/// else the backoff doubled per attempt and capped.
fn backoff(settings: &QueueSettings, attempt: u32, failure: &Failure) -> Duration {
    if let Some(wait) = failure.retry_after {
        return wait;
    }
    let factor = 1u32.checked_shl(attempt.saturating_sub(1)).unwrap_or(u32::MAX);
    settings.backoff.checked_mul(factor).unwrap_or(Duration::MAX).min(settings.max_backoff)
}

/// An event id as Redis streams write it, `ms-seq`; a bare `ms` means `ms-0`.
fn parse_event_id(id: &str) -> Result<(u64, u64), QueueError> {
    let bad = || QueueError::Invalid(format!("event id {id:?} is not of the form `<ms>-<seq>`"));
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    Ok((ms.parse().map_err(|_| bad())?, seq.parse().map_err(|_| bad())?))
}

/// A lease as the queue keeps it.
#[derive(Debug)]
struct Held {
    token: LeaseToken,
    /// The lease ends at this time (queue clock, ms) unless renewed.
    until: u64,
}

/// A job and everything kept beside it.
#[derive(Debug)]
struct Entry {
    job: Job,
    /// Order within its state: enqueue order for waiting jobs (negative for jobs handed back to the front).
    seq: i64,
    lease: Option<Held>,
    logs: VecDeque<LogLine>,
    checkpoints: BTreeMap<String, StageOutput>,
}

/// Where a job sits in its state's index: (priority or time, sequence, id).
type Slot = (i64, i64, JobId);

#[derive(Debug)]
struct State {
    settings: QueueSettings,
    jobs: HashMap<JobId, Entry>,
    /// Per state, the jobs in run order (waiting, delayed), start order (active) or finish order (final).
    index: BTreeMap<JobState, BTreeSet<Slot>>,
    /// Live (waiting, delayed, active) job per idempotency key.
    keys: HashMap<String, JobId>,
    next_seq: i64,
    next_front: i64,
    paused: bool,
    workers: HashMap<String, WorkerInfo>,
    /// Minute start → (completed, failed).
    minutes: BTreeMap<u64, (u64, u64)>,
    events: VecDeque<((u64, u64), Event)>,
    last_event: (u64, u64),
    /// Set when takers should look again; cleared by [`MemoryQueue::commit`].
    ready_changed: bool,
    /// Set when an event was appended; cleared by [`MemoryQueue::commit`].
    events_added: bool,
}

/// Where an entry belongs in the index.
fn slot(entry: &Entry) -> (JobState, Slot) {
    let job = &entry.job;
    let first = match job.state {
        JobState::Waiting => i64::from(job.spec.priority),
        JobState::Delayed => key_time(job.ready_at.unwrap_or(0)),
        JobState::Active => key_time(job.started_at.unwrap_or(0)),
        JobState::Completed | JobState::Failed | JobState::Cancelled => key_time(job.finished_at.unwrap_or(0)),
    };
    (job.state, (first, entry.seq, job.id.clone()))
}

impl State {
    fn new(settings: QueueSettings) -> Self {
        Self {
            settings,
            jobs: HashMap::new(),
            index: JobState::ALL.into_iter().map(|state| (state, BTreeSet::new())).collect(),
            keys: HashMap::new(),
            next_seq: 0,
            next_front: 0,
            paused: false,
            workers: HashMap::new(),
            minutes: BTreeMap::new(),
            events: VecDeque::new(),
            last_event: (0, 0),
            ready_changed: false,
            events_added: false,
        }
    }

    fn index(&mut self, state: JobState) -> &mut BTreeSet<Slot> {
        self.index.entry(state).or_default()
    }

    fn next_seq(&mut self) -> i64 {
        self.next_seq += 1;
        self.next_seq
    }

    /// A sequence number before every other job of the same priority.
    fn front_seq(&mut self) -> i64 {
        self.next_front -= 1;
        self.next_front
    }

    /// Takes a job out of its state's index (and frees its key when it was live).
    fn unlink(&mut self, id: &str) {
        let Some(entry) = self.jobs.get(id) else { return };
        let (state, slot) = slot(entry);
        let key = live_key(&entry.job.spec).map(str::to_owned);
        self.index(state).remove(&slot);
        if !state.is_final() {
            if let Some(key) = key {
                if self.keys.get(&key).is_some_and(|holder| holder == id) {
                    self.keys.remove(&key);
                }
            }
        }
    }

    /// Puts a job into its state's index (and claims its key when it is live).
    fn link(&mut self, id: &str) {
        let Some(entry) = self.jobs.get(id) else { return };
        let (state, slot) = slot(entry);
        let key = live_key(&entry.job.spec).map(str::to_owned);
        self.index(state).insert(slot);
        if !state.is_final() {
            if let Some(key) = key {
                self.keys.insert(key, id.to_owned());
            }
        }
        if matches!(state, JobState::Waiting | JobState::Delayed) {
            self.ready_changed = true;
        }
    }

    /// Changes a job's fields that decide its place, keeping the indexes right.
    fn update(&mut self, id: &str, change: impl FnOnce(&mut Entry)) {
        self.unlink(id);
        if let Some(entry) = self.jobs.get_mut(id) {
            change(entry);
        }
        self.link(id);
    }

    fn emit(&mut self, now: u64, job_id: &str, kind: EventKind) {
        let (last_ms, last_seq) = self.last_event;
        let id = if now > last_ms { (now, 0) } else { (last_ms, last_seq + 1) };
        self.last_event = id;
        let event = Event { id: format!("{}-{}", id.0, id.1), job_id: job_id.to_owned(), at: now, kind };
        self.events.push_back((id, event));
        while u64::try_from(self.events.len()).unwrap_or(u64::MAX) > self.settings.max_events {
            self.events.pop_front();
        }
        self.events_added = true;
    }

    fn emit_state(&mut self, now: u64, job_id: &str, state: JobState, reason: Option<String>) {
        self.emit(now, job_id, EventKind::State { state, reason });
    }

    fn enqueue(&mut self, spec: NewJob, now: u64) -> Result<Enqueued, QueueError> {
        spec.check()?;
        if let Some(holder) = live_key(&spec).and_then(|key| self.keys.get(key)) {
            return Ok(Enqueued::Existing(holder.clone()));
        }
        let id = uuid::Uuid::new_v4().to_string();
        let ready_at = spec.delay.map(millis).filter(|&delay| delay > 0).map(|delay| now.saturating_add(delay));
        let state = if ready_at.is_some() { JobState::Delayed } else { JobState::Waiting };
        let job = Job {
            id: id.clone(),
            state,
            spec,
            attempts: 0,
            stalls: 0,
            created_at: now,
            started_at: None,
            finished_at: None,
            ready_at,
            worker: None,
            progress: None,
            result: None,
            error: None,
            cancel_requested: false,
        };
        let seq = self.next_seq();
        let entry = Entry { job, seq, lease: None, logs: VecDeque::new(), checkpoints: BTreeMap::new() };
        self.jobs.insert(id.clone(), entry);
        self.link(&id);
        self.emit_state(now, &id, state, None);
        Ok(Enqueued::Created(id))
    }

    /// Moves every delayed job that is due to waiting, in due order.
    fn promote_due(&mut self, now: u64) {
        let due: Vec<JobId> = self
            .index(JobState::Delayed)
            .iter()
            .take_while(|(ready_at, _, _)| *ready_at <= key_time(now))
            .map(|(_, _, id)| id.clone())
            .collect();
        for id in due {
            self.make_waiting(&id, now, None);
        }
    }

    /// A delayed, failed or cancelled job joins the back of its priority.
    fn make_waiting(&mut self, id: &str, now: u64, reason: Option<String>) {
        let seq = self.next_seq();
        self.update(id, |entry| {
            entry.job.state = JobState::Waiting;
            entry.job.ready_at = None;
            entry.seq = seq;
        });
        self.emit_state(now, id, JobState::Waiting, reason);
    }

    /// When the next delayed job is due.
    fn next_due(&mut self) -> Option<u64> {
        self.index(JobState::Delayed).first().map(|(ready_at, _, _)| u64::try_from(*ready_at).unwrap_or(0))
    }

    fn take_next(&mut self, now: u64, worker: &WorkerInfo) -> Option<Lease> {
        let (_, _, id) = self.index(JobState::Waiting).first()?.clone();
        let token = LeaseToken(uuid::Uuid::new_v4().to_string());
        let until = now.saturating_add(millis(self.settings.lease));
        let held = Held { token: token.clone(), until };
        self.update(&id, |entry| {
            entry.job.state = JobState::Active;
            entry.job.attempts += 1;
            entry.job.started_at = Some(now);
            entry.job.worker = Some(worker.id.clone());
            entry.lease = Some(held);
        });
        self.emit_state(now, &id, JobState::Active, None);
        let entry = self.jobs.get(&id)?;
        Some(Lease { job: entry.job.clone(), token, resume: !entry.checkpoints.is_empty() })
    }

    /// Appends a line to a job's log, keeping the newest `max_log_lines`.
    fn log(&mut self, id: &str, now: u64, line: &str) {
        let cap = usize::try_from(self.settings.max_log_lines).unwrap_or(usize::MAX);
        if let Some(entry) = self.jobs.get_mut(id) {
            entry.logs.push_back(LogLine { at: now, line: line.to_owned() });
            while entry.logs.len() > cap {
                entry.logs.pop_front();
            }
        }
    }

    /// Writes a held job's notes: the last progress as its progress, its held-back checkpoints, its events in
    /// order ([`Notes::streamed`]), its log lines.
    fn note(
        &mut self,
        id: &str,
        token: &LeaseToken,
        now: u64,
        notes: &Notes,
        completing: bool,
    ) -> Result<(), QueueError> {
        notes.check(id)?;
        let entry = self.held(id, token, now)?;
        if let Some(progress) = notes.last_progress() {
            entry.job.progress = Some(progress.clone());
        }
        for (key, output) in &notes.checkpoints {
            entry.checkpoints.insert(key.clone(), output.clone());
        }
        for event in notes.streamed(completing) {
            self.emit(now, id, event.clone());
        }
        for line in &notes.log {
            self.log(id, now, line);
        }
        Ok(())
    }

    /// The entry of a job `token` still holds, or [`QueueError::LeaseLost`].
    fn held(&mut self, id: &str, token: &LeaseToken, now: u64) -> Result<&mut Entry, QueueError> {
        match self.jobs.get_mut(id) {
            Some(entry)
                if entry.job.state == JobState::Active
                    && entry.lease.as_ref().is_some_and(|held| held.token == *token && held.until > now) =>
            {
                Ok(entry)
            }
            _ => Err(QueueError::LeaseLost(id.to_owned())),
        }
    }

    /// Ends a job in a final state, counts it, and applies retention to that state.
    fn finish(&mut self, id: &str, state: JobState, now: u64, reason: Option<String>) {
        self.update(id, |entry| {
            entry.job.state = state;
            entry.job.finished_at = Some(now);
            entry.job.ready_at = None;
            entry.lease = None;
            if state == JobState::Completed {
                entry.checkpoints.clear();
            }
            if state == JobState::Failed {
                entry.job.error.clone_from(&reason);
            }
        });
        self.emit_state(now, id, state, reason);
        let minute = now - now % MINUTE_MS;
        let counts = self.minutes.entry(minute).or_default();
        match state {
            JobState::Completed => counts.0 += 1,
            JobState::Failed => counts.1 += 1,
            _ => {}
        }
        let oldest = first_kept_minute(now);
        self.minutes.retain(|&start, _| start >= oldest);
        self.retain(state, now);
    }

    /// Drops jobs of a final state past their age, then the oldest past the count.
    fn retain(&mut self, state: JobState, now: u64) {
        let (keep_for, keep) = match state {
            JobState::Completed => (self.settings.keep_completed_for, self.settings.keep_completed),
            _ => (self.settings.keep_failed_for, self.settings.keep_failed),
        };
        let cutoff = key_time(now.saturating_sub(millis(keep_for)));
        let index = self.index(state);
        let excess = u64::try_from(index.len()).unwrap_or(u64::MAX).saturating_sub(keep);
        let gone: Vec<JobId> = index
            .iter()
            .enumerate()
            .take_while(|(n, (finished_at, _, _))| *finished_at <= cutoff || u64::try_from(*n).unwrap_or(0) < excess)
            .map(|(_, (_, _, id))| id.clone())
            .collect();
        for id in gone {
            self.remove(&id);
        }
    }

    /// Forgets a job with its logs and checkpoints.
    fn remove(&mut self, id: &str) {
        self.unlink(id);
        self.jobs.remove(id);
    }

    /// Sends a job whose holder is gone or done with it back to waiting at the front of its priority; a job
    /// someone asked to cancel is cancelled instead.
    fn hand_back(&mut self, id: &str, now: u64, reason: String, stalled: bool) {
        let Some(entry) = self.jobs.get(id) else { return };
        let cancel = entry.job.cancel_requested;
        let stalls = entry.job.stalls + u32::from(stalled);
        let max_stalls = self.settings.max_stalls;
        if let Some(entry) = self.jobs.get_mut(id) {
            entry.job.attempts = entry.job.attempts.saturating_sub(1);
            entry.job.stalls = stalls;
        }
        if cancel {
            self.finish(id, JobState::Cancelled, now, Some(format!("cancel requested; {reason}")));
        } else if stalled && stalls > max_stalls {
            self.finish(
                id,
                JobState::Failed,
                now,
                Some(format!("job stalled more than {max_stalls} times ({reason})")),
            );
        } else {
            let seq = self.front_seq();
            self.update(id, |entry| {
                entry.job.state = JobState::Waiting;
                entry.lease = None;
                entry.seq = seq;
            });
            self.emit_state(now, id, JobState::Waiting, Some(reason));
        }
    }

    /// Makes a failed or cancelled job waiting again, with fresh attempts and its checkpoints.
    fn retry(&mut self, id: &str, now: u64) -> Result<(), QueueError> {
        let entry = self.jobs.get(id).ok_or_else(|| QueueError::NotFound(id.to_owned()))?;
        let state = entry.job.state;
        if !matches!(state, JobState::Failed | JobState::Cancelled) {
            return Err(QueueError::WrongState {
                id: id.to_owned(),
                state,
                action: "retry",
                needs: "failed or cancelled",
            });
        }
        if let Some(key) = live_key(&entry.job.spec) {
            if let Some(holder) = self.keys.get(key) {
                return Err(QueueError::Invalid(format!(
                    "job {id} cannot be retried: job {holder} is live with the same idempotency key {key:?}"
                )));
            }
        }
        self.update(id, |entry| {
            entry.job.attempts = 0;
            entry.job.stalls = 0;
            entry.job.finished_at = None;
            entry.job.result = None;
            entry.job.cancel_requested = false;
        });
        self.make_waiting(id, now, Some("retried".into()));
        Ok(())
    }
}

impl MemoryQueue {
    /// An empty queue with these settings.
    pub fn new(settings: QueueSettings) -> Self {
        Self {
            clock: Clock::new(),
            state: Mutex::new(State::new(settings)),
            ready: Notify::new(),
            appended: Notify::new(),
        }
    }

    /// The queue's clock: milliseconds since the Unix epoch, moved on by [`Self::advance_clock`].
    pub fn now(&self) -> u64 {
        self.clock.now()
    }

    /// Moves the queue's clock forward, as if `by` had passed: delays and backoffs come due, leases expire,
    /// retention ages. Waiting takers look again at once. For tests.
    pub fn advance_clock(&self, by: Duration) {
        self.clock.offset_ms.fetch_add(millis(by), Ordering::SeqCst);
        self.ready.notify_waiters();
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent before anything in it can panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Releases the lock and wakes whoever waits for what changed under it.
    fn commit(&self, mut state: MutexGuard<'_, State>) {
        let ready = std::mem::take(&mut state.ready_changed);
        let events = std::mem::take(&mut state.events_added);
        drop(state);
        if ready {
            self.ready.notify_waiters();
        }
        if events {
            self.appended.notify_waiters();
        }
    }

    /// Runs `change` on the state under the lock, then wakes waiters.
    fn with<T>(&self, change: impl FnOnce(&mut State, u64) -> T) -> T {
        let mut state = self.lock();
        let out = change(&mut state, self.clock.now());
        self.commit(state);
        out
    }
}

#[async_trait::async_trait]
impl Queue for MemoryQueue {
    async fn enqueue(&self, job: NewJob) -> Result<Enqueued, QueueError> {
        self.with(|state, now| state.enqueue(job, now))
    }

    async fn enqueue_many(&self, jobs: Vec<NewJob>) -> Result<Vec<Result<Enqueued, QueueError>>, QueueError> {
        Ok(self.with(|state, now| jobs.into_iter().map(|job| state.enqueue(job, now)).collect()))
    }

    async fn take(&self, worker: &WorkerInfo, wait: Duration) -> Result<Option<Lease>, QueueError> {
        Ok(self.take_many(worker, wait, 1).await?.pop())
    }

    async fn take_many(&self, worker: &WorkerInfo, wait: Duration, max: usize) -> Result<Vec<Lease>, QueueError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let deadline = Instant::now() + wait;
        loop {
            let notified = self.ready.notified();
            tokio::pin!(notified);
            // Registered before looking, so a change made after the look wakes this taker.
            notified.as_mut().enable();
            let (leases, due_in) = self.with(|state, now| {
                state.promote_due(now);
                if state.paused {
                    return (Vec::new(), None);
                }
                let leases: Vec<Lease> = std::iter::from_fn(|| state.take_next(now, worker)).take(max).collect();
                let due_in = state.next_due().map(|due| Duration::from_millis(due.saturating_sub(now)));
                (leases, due_in)
            });
            if !leases.is_empty() {
                return Ok(leases);
            }
            let started = Instant::now();
            if started >= deadline {
                return Ok(Vec::new());
            }
            let wake_at = due_in.map_or(deadline, |due_in| deadline.min(started + due_in));
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(wake_at) => {}
            }
        }
    }

    async fn renew(&self, leases: &[(JobId, LeaseToken)]) -> Result<Vec<Renewal>, QueueError> {
        Ok(self.with(|state, now| {
            let until = now.saturating_add(millis(state.settings.lease));
            leases
                .iter()
                .map(|(id, token)| match state.held(id, token, now) {
                    Ok(entry) => {
                        if let Some(held) = entry.lease.as_mut() {
                            held.until = until;
                        }
                        if entry.job.cancel_requested { Renewal::CancelRequested } else { Renewal::Held }
                    }
                    Err(_) => Renewal::Lost,
                })
                .collect()
        }))
    }

    async fn complete(&self, id: &str, token: &LeaseToken, result: Value) -> Result<(), QueueError> {
        self.with(|state, now| {
            state.held(id, token, now)?.job.result = Some(result);
            state.finish(id, JobState::Completed, now, None);
            Ok(())
        })
    }

    async fn complete_and_take(
        &self,
        id: &str,
        token: &LeaseToken,
        result: Value,
        notes: &Notes,
        next: Option<&WorkerInfo>,
    ) -> Result<Option<Lease>, QueueError> {
        self.with(|state, now| {
            state.note(id, token, now, notes, true)?;
            state.held(id, token, now)?.job.result = Some(result);
            state.finish(id, JobState::Completed, now, None);
            let Some(worker) = next else { return Ok(None) };
            state.promote_due(now);
            if state.paused {
                return Ok(None);
            }
            Ok(state.take_next(now, worker))
        })
    }

    async fn note(&self, id: &str, token: &LeaseToken, notes: &Notes) -> Result<(), QueueError> {
        self.with(|state, now| state.note(id, token, now, notes, false))
    }

    async fn fail(&self, id: &str, token: &LeaseToken, failure: Failure) -> Result<FailOutcome, QueueError> {
        self.with(|state, now| {
            let job = &state.held(id, token, now)?.job;
            let (attempt, max_attempts) = (job.attempts, job.spec.max_attempts);
            if !failure.retryable || attempt >= max_attempts {
                state.finish(id, JobState::Failed, now, Some(failure.message));
                return Ok(FailOutcome::Failed);
            }
            let at = now.saturating_add(millis(backoff(&state.settings, attempt, &failure)));
            let seq = state.next_seq();
            let message = failure.message;
            state.update(id, |entry| {
                entry.job.state = JobState::Delayed;
                entry.job.ready_at = Some(at);
                entry.job.error = Some(message.clone());
                entry.lease = None;
                entry.seq = seq;
            });
            state.emit_state(now, id, JobState::Delayed, Some(message));
            Ok(FailOutcome::Retrying { at })
        })
    }

    async fn cancelled(&self, id: &str, token: &LeaseToken) -> Result<(), QueueError> {
        self.with(|state, now| {
            state.held(id, token, now)?;
            state.finish(id, JobState::Cancelled, now, Some("stopped by its worker".into()));
            Ok(())
        })
    }

    async fn release(&self, id: &str, token: &LeaseToken) -> Result<(), QueueError> {
        self.with(|state, now| {
            let worker = state.held(id, token, now)?.job.worker.clone().unwrap_or_default();
            state.hand_back(id, now, format!("handed back by worker {worker}"), false);
            Ok(())
        })
    }

    async fn recover_stalled(&self) -> Result<Vec<Recovered>, QueueError> {
        Ok(self.with(|state, now| {
            let expired: Vec<(JobId, String)> = state.index[&JobState::Active]
                .iter()
                .map(|(_, _, id)| id)
                .filter_map(|id| state.jobs.get(id))
                .filter(|entry| entry.lease.as_ref().is_none_or(|held| held.until <= now))
                .map(|entry| (entry.job.id.clone(), entry.job.worker.clone().unwrap_or_default()))
                .collect();
            let mut recovered = Vec::with_capacity(expired.len());
            for (id, worker) in expired {
                state.hand_back(&id, now, format!("the lease of worker {worker} expired"), true);
                let went = state.jobs.get(&id).map_or(JobState::Waiting, |entry| entry.job.state);
                recovered.push(Recovered { id, state: went });
            }
            recovered
        }))
    }

    async fn cancel(&self, id: &str) -> Result<CancelOutcome, QueueError> {
        self.with(|state, now| {
            let current = state.jobs.get(id).ok_or_else(|| QueueError::NotFound(id.to_owned()))?.job.state;
            match current {
                JobState::Waiting | JobState::Delayed => {
                    state.finish(id, JobState::Cancelled, now, Some("cancelled before it ran".into()));
                    Ok(CancelOutcome::Cancelled)
                }
                JobState::Active => {
                    if let Some(entry) = state.jobs.get_mut(id) {
                        entry.job.cancel_requested = true;
                    }
                    Ok(CancelOutcome::Requested)
                }
                done @ (JobState::Completed | JobState::Failed | JobState::Cancelled) => {
                    Ok(CancelOutcome::AlreadyFinal(done))
                }
            }
        })
    }

    async fn retry(&self, id: &str) -> Result<(), QueueError> {
        self.with(|state, now| state.retry(id, now))
    }

    async fn retry_failed(&self, pipeline: Option<&str>) -> Result<Vec<JobId>, QueueError> {
        Ok(self.with(|state, now| {
            let failed: Vec<JobId> = state.index[&JobState::Failed]
                .iter()
                .map(|(_, _, id)| id)
                .filter(|id| {
                    pipeline.is_none_or(|name| state.jobs.get(*id).is_some_and(|e| e.job.spec.pipeline == name))
                })
                .cloned()
                .collect();
            // A job whose key another live job holds now stays failed.
            failed.into_iter().filter(|id| state.retry(id, now).is_ok()).collect()
        }))
    }

    async fn promote(&self, id: &str) -> Result<(), QueueError> {
        self.with(|state, now| {
            let current = state.jobs.get(id).ok_or_else(|| QueueError::NotFound(id.to_owned()))?.job.state;
            if current != JobState::Delayed {
                return Err(QueueError::WrongState {
                    id: id.to_owned(),
                    state: current,
                    action: "promote",
                    needs: "delayed",
                });
            }
            state.make_waiting(id, now, Some("promoted".into()));
            Ok(())
        })
    }

    async fn set_paused(&self, paused: bool) -> Result<(), QueueError> {
        self.with(|state, _| {
            state.paused = paused;
            state.ready_changed |= !paused;
        });
        Ok(())
    }

    async fn get(&self, id: &str) -> Result<Option<Job>, QueueError> {
        Ok(self.lock().jobs.get(id).map(|entry| entry.job.clone()))
    }

    async fn live_job_for(&self, key: &str) -> Result<Option<JobId>, QueueError> {
        Ok(self.lock().keys.get(key).cloned())
    }

    async fn list(&self, state: JobState, cursor: Option<&str>, limit: usize) -> Result<JobPage, QueueError> {
        if limit == 0 {
            return Err(QueueError::Invalid("a page of jobs needs a limit of at least 1".into()));
        }
        let offset = match cursor {
            None => 0,
            Some(cursor) => cursor.parse::<usize>().map_err(|_| {
                QueueError::Invalid(format!("cursor {cursor:?} was not made by this queue (memory backend)"))
            })?,
        };
        let queue = self.lock();
        let index = &queue.index[&state];
        let ids: Box<dyn Iterator<Item = &Slot>> =
            if state.is_final() { Box::new(index.iter().rev()) } else { Box::new(index.iter()) };
        let jobs: Vec<Job> = ids
            .skip(offset)
            .take(limit)
            .filter_map(|(_, _, id)| queue.jobs.get(id))
            .map(|entry| entry.job.clone())
            .collect();
        let next = offset.saturating_add(limit);
        let next_cursor = (next < index.len()).then(|| next.to_string());
        Ok(JobPage { jobs, next_cursor })
    }

    async fn stats(&self) -> Result<Stats, QueueError> {
        let now = self.clock.now();
        let queue = self.lock();
        let counts =
            queue.index.iter().map(|(state, jobs)| (*state, u64::try_from(jobs.len()).unwrap_or(u64::MAX))).collect();
        let silent_after = millis(queue.settings.lease).saturating_mul(3);
        let mut workers: Vec<WorkerInfo> = queue
            .workers
            .values()
            .filter(|worker| now.saturating_sub(worker.last_heartbeat) < silent_after)
            .cloned()
            .collect();
        workers.sort_by(|a, b| a.id.cmp(&b.id));
        let oldest = first_kept_minute(now);
        let per_minute = queue
            .minutes
            .range(oldest..)
            .map(|(&minute, &(completed, failed))| MinuteCounts { minute, completed, failed })
            .collect();
        Ok(Stats { counts, paused: queue.paused, workers, per_minute })
    }

    async fn clean(&self, state: JobState, older_than: Duration, limit: usize) -> Result<u64, QueueError> {
        if !state.is_final() {
            return Err(QueueError::Invalid(format!(
                "clean removes completed, failed or cancelled jobs, not {state} ones"
            )));
        }
        Ok(self.with(|queue, now| {
            let cutoff = key_time(now.saturating_sub(millis(older_than)));
            let gone: Vec<JobId> = queue
                .index(state)
                .iter()
                .take_while(|(finished_at, _, _)| *finished_at <= cutoff)
                .take(limit)
                .map(|(_, _, id)| id.clone())
                .collect();
            for id in &gone {
                queue.remove(id);
            }
            u64::try_from(gone.len()).unwrap_or(u64::MAX)
        }))
    }

    async fn heartbeat(&self, worker: &WorkerInfo) -> Result<(), QueueError> {
        self.with(|state, now| {
            let silent_after = millis(state.settings.lease).saturating_mul(3);
            state.workers.retain(|_, seen| now.saturating_sub(seen.last_heartbeat) < silent_after);
            state.workers.insert(worker.id.clone(), WorkerInfo { last_heartbeat: now, ..worker.clone() });
        });
        Ok(())
    }

    async fn progress(&self, id: &str, token: &LeaseToken, progress: Progress) -> Result<(), QueueError> {
        self.with(|state, now| {
            state.held(id, token, now)?.job.progress = Some(progress.clone());
            state.emit(now, id, EventKind::Progress(progress));
            Ok(())
        })
    }

    async fn stage_event(&self, id: &str, token: &LeaseToken, stage: &str, status: &str) -> Result<(), QueueError> {
        self.with(|state, now| {
            state.held(id, token, now)?;
            state.emit(now, id, EventKind::Stage { stage: stage.to_owned(), status: status.to_owned() });
            Ok(())
        })
    }

    async fn log(&self, id: &str, line: &str) -> Result<(), QueueError> {
        self.with(|state, now| state.log(id, now, line));
        Ok(())
    }

    async fn logs(&self, id: &str) -> Result<Vec<LogLine>, QueueError> {
        Ok(self.lock().jobs.get(id).map(|entry| entry.logs.iter().cloned().collect()).unwrap_or_default())
    }

    async fn events(&self, after: Option<&str>, limit: usize, wait: Duration) -> Result<Vec<Event>, QueueError> {
        if limit == 0 {
            return Err(QueueError::Invalid("reading events needs a limit of at least 1".into()));
        }
        let after = after.map(parse_event_id).transpose()?;
        let deadline = Instant::now() + wait;
        loop {
            let notified = self.appended.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let found: Vec<Event> = {
                let queue = self.lock();
                let start = after.map_or(0, |after| queue.events.partition_point(|(id, _)| *id <= after));
                queue.events.iter().skip(start).take(limit).map(|(_, event)| event.clone()).collect()
            };
            if !found.is_empty() || Instant::now() >= deadline {
                return Ok(found);
            }
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    async fn checkpoints(&self, id: &str) -> Result<BTreeMap<String, StageOutput>, QueueError> {
        Ok(self.lock().jobs.get(id).map(|entry| entry.checkpoints.clone()).unwrap_or_default())
    }

    async fn save_checkpoint(
        &self,
        id: &str,
        token: &LeaseToken,
        key: &str,
        output: &StageOutput,
    ) -> Result<(), QueueError> {
        self.with(|state, now| {
            state.held(id, token, now)?.checkpoints.insert(key.to_owned(), output.clone());
            Ok(())
        })
    }
}
