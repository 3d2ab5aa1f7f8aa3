//! A held job's notes to the queue: each coalesced progress update (at most 5 a second, from the engine's
//! emitter) becomes the job's stored progress and a `progress` event, each stage that starts running a `running`
//! stage event and each stage that ended an event saying how (so a live view sees a stage end while the job
//! still runs; a stage that started and ended between two updates gets its `running` event just before its
//! end), and the worker adds log lines. Writes carry the lease token; a refused or failed write is dropped
//! (the renewal task notices a lost lease, and the next update may get through).
//!
//! Notes are held back while the job is young ([`HOLD`]): most jobs of a busy queue end before that, and their
//! notes then travel in the call that completes the job ([`crate::queue::Queue::complete_and_take`]) instead of
//! one call each. Of the progress held back only the newest is kept (the events that matter are the stage
//! events, kept in order). Once the job is older than [`HOLD`], notes are written as they come; the renewal task
//! writes those that wait longer than that with no update behind them ([`QueueSink::flush_due`]). The job's final
//! state is never held back: the queue writes it in the call that ends the job.
//!
//! Stage checkpoints made while the job is young are held back the same way ([`QueueSink::hold_checkpoint`]):
//! a job that completes drops them (its checkpoints go anyway), so a short job writes none; a job that fails,
//! is cancelled or is handed back writes them first, so its retry resumes from them. A worker killed within
//! [`HOLD`] of a job's start loses them, and those stages (under half a second of work) run again. Checkpoints
//! of paid calls (transcribed chunks) are never held back: [`super::checkpoints::QueueCheckpoints`] writes them
//! at once.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::job::StageOutput;
use crate::job::progress::{ProgressSink, ProgressUpdate};
use crate::queue::{EventKind, LeaseToken, Notes, Progress, Queue};

/// How long notes of a new job are held back.
pub const HOLD: Duration = Duration::from_millis(500);

/// Notes of one held job, for the queue.
pub struct QueueSink {
    queue: Arc<dyn Queue>,
    job_id: String,
    token: LeaseToken,
    started: Instant,
    state: Mutex<State>,
    /// Serialises writes, so that notes reach the stream in the order they were made.
    writing: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    /// Stages whose `running` event was noted.
    announced: BTreeSet<String>,
    /// Stages whose end was noted.
    ended: BTreeSet<String>,
    pending: Notes,
    /// When the oldest pending note was made.
    since: Option<Instant>,
}

impl State {
    fn note(&mut self) {
        self.since.get_or_insert_with(Instant::now);
    }

    /// Notes that `stage` ended with `status`, once: a stage that ran (`succeeded`, `failed`, `cancelled`) but
    /// started and ended between two progress updates, so that no `running` event was noted for it, gets that
    /// event first; every stage that ran shows `running` before its end.
    fn end_stage(&mut self, stage: &str, status: &str) {
        if !self.ended.insert(stage.to_string()) {
            return;
        }
        let ran = matches!(status, "succeeded" | "failed" | "cancelled");
        if ran && self.announced.insert(stage.to_string()) {
            self.pending.events.push(EventKind::Stage { stage: stage.to_string(), status: "running".into() });
        }
        self.pending.events.push(EventKind::Stage { stage: stage.to_string(), status: status.to_string() });
        self.note();
    }
}

impl std::fmt::Debug for QueueSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueSink").field("job_id", &self.job_id).finish_non_exhaustive()
    }
}

impl QueueSink {
    /// Notes of `job_id`, written under `token`.
    pub fn new(queue: Arc<dyn Queue>, job_id: impl Into<String>, token: LeaseToken) -> Self {
        Self {
            queue,
            job_id: job_id.into(),
            token,
            started: Instant::now(),
            state: Mutex::new(State::default()),
            writing: tokio::sync::Mutex::new(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds a line for the job's log.
    pub fn log(&self, line: impl Into<String>) {
        let mut state = self.lock();
        state.pending.log.push(line.into());
        state.note();
    }

    /// Adds the event of a stage's end, unless a progress update told it already (see `State::end_stage`).
    pub fn stage(&self, stage: &str, status: &str) {
        self.lock().end_stage(stage, status);
    }

    /// Holds a stage checkpoint back with the notes while the job is young; `false` when it is past [`HOLD`] (the
    /// caller then writes it itself, and an older copy held back under the same key is dropped so that it cannot
    /// overwrite the newer one later).
    pub fn hold_checkpoint(&self, key: &str, output: &StageOutput) -> bool {
        let young = !self.past_hold();
        let mut state = self.lock();
        state.pending.checkpoints.retain(|(held, _)| held != key);
        if young {
            state.pending.checkpoints.push((key.to_string(), output.clone()));
            state.note();
        }
        young
    }

    /// Everything held back, for the call that ends the job; nothing is left to write.
    pub fn take(&self) -> Notes {
        let mut state = self.lock();
        state.since = None;
        std::mem::take(&mut state.pending)
    }

    /// Everything held back, once no write of it is under way: for the call that ends the job.
    pub async fn take_all(&self) -> Notes {
        let _writing = self.writing.lock().await;
        self.take()
    }

    /// Whether the job is past the hold, so notes go out as they come.
    fn past_hold(&self) -> bool {
        self.started.elapsed() >= HOLD
    }

    /// Writes what is held back now.
    pub async fn flush(&self) {
        let _writing = self.writing.lock().await;
        let notes = self.take();
        if notes.is_empty() {
            return;
        }
        if let Err(error) = self.queue.note(&self.job_id, &self.token, &notes).await {
            tracing::debug!(job = %self.job_id, %error, "notes not written");
        }
    }

    /// Whether notes have waited longer than [`HOLD`]; the renewal task then calls [`Self::flush`].
    pub fn flush_due(&self) -> bool {
        self.lock().since.is_some_and(|since| since.elapsed() >= HOLD || self.past_hold())
    }
}

#[async_trait::async_trait]
impl ProgressSink for QueueSink {
    async fn update(&self, update: ProgressUpdate) {
        {
            let mut state = self.lock();
            for (stage, status) in &update.ended {
                state.end_stage(stage, status);
            }
            for stage in &update.running {
                if state.announced.insert(stage.clone()) {
                    state.pending.events.push(EventKind::Stage { stage: stage.clone(), status: "running".into() });
                }
            }
            // Only the newest progress is worth writing.
            state.pending.events.retain(|event| !matches!(event, EventKind::Progress(_)));
            let stage = update.stage.filter(|stage| !stage.is_empty());
            let progress = Progress { percent: update.percent, stage, message: update.message };
            state.pending.events.push(EventKind::Progress(progress));
            state.note();
        }
        if self.past_hold() {
            self.flush().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::worker::checkpoints::tests::held_job;

    fn update(percent: u8, stage: Option<&str>, running: &[&str]) -> ProgressUpdate {
        ProgressUpdate {
            percent,
            stage: stage.map(str::to_string),
            message: format!("at {percent}"),
            running: running.iter().map(|stage| (*stage).to_string()).collect(),
            ..ProgressUpdate::default()
        }
    }

    fn running(stage: &str) -> EventKind {
        EventKind::Stage { stage: stage.into(), status: "running".into() }
    }

    /// The notes written about `id` so far: its stage and progress events, in order.
    async fn written(queue: &dyn Queue, id: &str) -> Vec<EventKind> {
        let events = queue.events(None, 1000, Duration::ZERO).await.unwrap();
        events
            .into_iter()
            .filter(|event| event.job_id == id && !matches!(event.kind, EventKind::State { .. }))
            .map(|event| event.kind)
            .collect()
    }

    #[tokio::test]
    async fn a_young_jobs_notes_wait_keeping_stage_events_in_order_and_only_the_newest_progress() {
        let (queue, id, token) = held_job().await;
        let sink = QueueSink::new(queue.clone(), &id, token);
        assert!(format!("{sink:?}").contains(&id));
        sink.update(update(10, Some("probe"), &["probe"])).await;
        sink.stage("probe", "succeeded");
        sink.update(update(40, Some(""), &["transcribe"])).await;
        sink.log("a line");
        assert!(written(queue.as_ref(), &id).await.is_empty(), "held back while the job is young");
        assert!(queue.logs(&id).await.unwrap().is_empty());

        sink.flush().await;
        let progress = Progress { percent: 40, stage: None, message: "at 40".into() };
        let expected = [
            running("probe"),
            EventKind::Stage { stage: "probe".into(), status: "succeeded".into() },
            running("transcribe"),
            EventKind::Progress(progress.clone()),
        ];
        assert_eq!(written(queue.as_ref(), &id).await, expected, "an empty stage name is no stage");
        assert_eq!(queue.get(&id).await.unwrap().unwrap().progress, Some(progress));
        let lines: Vec<String> = queue.logs(&id).await.unwrap().into_iter().map(|line| line.line).collect();
        assert_eq!(lines, ["a line"]);

        sink.update(update(60, Some("transcribe"), &["transcribe"])).await;
        sink.flush().await;
        let progress = Progress { percent: 60, stage: Some("transcribe".into()), message: "at 60".into() };
        let now = written(queue.as_ref(), &id).await;
        assert_eq!(
            now[expected.len()..],
            [EventKind::Progress(progress)],
            "a stage still running is not announced again"
        );
    }

    #[tokio::test]
    async fn every_stage_that_ran_is_shown_running_once_before_its_end_and_one_that_did_not_run_is_not() {
        let (queue, id, token) = held_job().await;
        let sink = QueueSink::new(queue.clone(), &id, token);
        sink.update(update(10, Some("probe"), &["probe"])).await;
        for (stage, status) in [
            ("probe", "succeeded"),
            ("fetch", "failed"),
            ("ask", "cancelled"),
            ("cached", "restored"),
            ("optional", "skipped"),
        ] {
            sink.stage(stage, status);
        }
        let stage = |stage: &str, status: &str| EventKind::Stage { stage: stage.into(), status: status.into() };
        let notes = sink.take_all().await;
        assert_eq!(
            notes.events,
            [
                running("probe"),
                EventKind::Progress(Progress { percent: 10, stage: Some("probe".into()), message: "at 10".into() }),
                stage("probe", "succeeded"),
                running("fetch"),
                stage("fetch", "failed"),
                running("ask"),
                stage("ask", "cancelled"),
                stage("cached", "restored"),
                stage("optional", "skipped"),
            ]
        );
    }

    #[tokio::test]
    async fn a_stage_that_ended_is_told_by_the_next_update_and_not_again_at_the_end() {
        let (queue, id, token) = held_job().await;
        let sink = QueueSink::new(queue.clone(), &id, token);
        sink.update(update(10, Some("probe"), &["probe"])).await;
        let ended = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs.iter().map(|(stage, how)| ((*stage).to_string(), (*how).to_string())).collect()
        };
        let next = ProgressUpdate { ended: ended(&[("probe", "succeeded")]), ..update(30, None, &["transcribe"]) };
        sink.update(next).await;
        let skipped = ProgressUpdate {
            ended: ended(&[("probe", "succeeded"), ("skip", "skipped"), ("fast", "succeeded")]),
            ..update(50, None, &["transcribe"])
        };
        sink.update(skipped).await;
        sink.flush().await;
        let stage = |stage: &str, status: &str| EventKind::Stage { stage: stage.into(), status: status.into() };
        let told = [
            running("probe"),
            stage("probe", "succeeded"),
            running("transcribe"),
            stage("skip", "skipped"),
            running("fast"),
            stage("fast", "succeeded"),
            EventKind::Progress(Progress { percent: 50, stage: None, message: "at 50".into() }),
        ];
        assert_eq!(written(queue.as_ref(), &id).await, told, "ends are told while the job runs, each once");
        // The ending call's statuses: only what no update told yet.
        for (name, status) in [("probe", "succeeded"), ("fast", "succeeded"), ("transcribe", "failed")] {
            sink.stage(name, status);
        }
        assert_eq!(sink.take_all().await.events, [stage("transcribe", "failed")]);
    }

    #[tokio::test]
    async fn notes_fall_due_after_the_hold_and_an_old_jobs_notes_are_due_at_once() {
        let (queue, id, token) = held_job().await;
        let sink = QueueSink::new(queue.clone(), &id, token);
        assert!(!sink.flush_due(), "nothing held, nothing due");
        sink.log("early");
        assert!(!sink.flush_due(), "a young job's note waits");
        tokio::time::sleep(HOLD + Duration::from_millis(20)).await;
        assert!(sink.flush_due(), "a note held for longer than the hold is due");
        sink.flush().await;
        assert!(!sink.flush_due(), "nothing is left once written");
        sink.log("late");
        assert!(sink.flush_due(), "past the hold a new note is due at once");
        sink.update(update(50, Some("probe"), &["probe"])).await;
        assert!(!sink.flush_due(), "past the hold a progress update writes the notes itself");
        let lines: Vec<String> = queue.logs(&id).await.unwrap().into_iter().map(|line| line.line).collect();
        assert_eq!(lines, ["early", "late"]);
        let progress = Progress { percent: 50, stage: Some("probe".into()), message: "at 50".into() };
        assert_eq!(written(queue.as_ref(), &id).await, [running("probe"), EventKind::Progress(progress)]);
    }

    #[tokio::test]
    async fn the_ending_call_takes_everything_held_back_with_the_newest_copy_of_each_checkpoint() {
        let (queue, id, token) = held_job().await;
        let sink = QueueSink::new(queue.clone(), &id, token);
        let (old, new, other) =
            (StageOutput::from(json!("old")), StageOutput::from(json!("new")), StageOutput::from(json!(2)));
        sink.log("a line");
        sink.stage("probe", "succeeded");
        assert!(sink.hold_checkpoint("summary", &old));
        assert!(sink.hold_checkpoint("probe", &other));
        assert!(sink.hold_checkpoint("summary", &new));
        let notes = sink.take_all().await;
        assert_eq!(notes.log, ["a line"]);
        assert_eq!(
            notes.events,
            [running("probe"), EventKind::Stage { stage: "probe".into(), status: "succeeded".into() }],
            "a stage that ran between two updates is shown running before its end"
        );
        assert_eq!(notes.checkpoints, [("probe".to_string(), other), ("summary".to_string(), new)]);
        assert!(sink.take().is_empty(), "nothing is left to write");
        assert!(!sink.flush_due());
        sink.flush().await;
        assert!(written(queue.as_ref(), &id).await.is_empty());
        assert!(queue.checkpoints(&id).await.unwrap().is_empty());
    }
}
