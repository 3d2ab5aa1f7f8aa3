//! Job progress: one number from 0 to 100, the weighted sum of every stage's fraction, with the current stage
//! and a message. Stages report through a [`ProgressReporter`]; an emitter task coalesces the reports and
//! sends at most one [`ProgressUpdate`] per interval (5 per second by default) to a [`ProgressSink`], so a
//! chatty stage never floods the queue, the store or the terminal. The number never goes backwards within a
//! run, even when a stage is retried and starts again from zero.
//!
//! Stages run side by side, so an update also lists the stages running now, and its `stage` and `message` are
//! always those of a running stage while one runs: when the stage that spoke last finishes, the update moves on
//! to another running stage instead of freezing on the finished one.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// What a sink receives.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ProgressUpdate {
    /// The job.
    pub job_id: String,
    /// 0 to 100, never decreasing within a run.
    pub percent: u8,
    /// The running stage that reported last (or the stage that ended last when none runs), if any.
    pub stage: Option<String>,
    /// A short human message (`"transcribing chunk 3 of 7"`).
    pub message: String,
    /// The stages running now, in pipeline order.
    pub running: Vec<String>,
    /// How many stages are done (finished, skipped, restored or failed).
    pub stages_done: usize,
    /// How many stages the pipeline has.
    pub stages_total: usize,
    /// The stages that have ended so far, with how (`succeeded`, `restored`, `skipped`, `failed`,
    /// `cancelled`), in pipeline order: a sink can say that a stage ended while the job still runs.
    pub ended: Vec<(String, String)>,
}

/// Anything that wants to follow a job's progress: the queue's event stream, the store, a terminal bar.
#[async_trait::async_trait]
pub trait ProgressSink: Send + Sync {
    /// Receives one coalesced update; the next one is not sent before this returns.
    async fn update(&self, update: ProgressUpdate);
}

/// A sink that drops every update.
#[derive(Debug, Clone, Copy, Default)]
pub struct NullSink;

#[async_trait::async_trait]
impl ProgressSink for NullSink {
    async fn update(&self, _update: ProgressUpdate) {}
}

/// Sends every update to several sinks in turn.
pub struct Tee(pub Vec<Arc<dyn ProgressSink>>);

#[async_trait::async_trait]
impl ProgressSink for Tee {
    async fn update(&self, update: ProgressUpdate) {
        for sink in &self.0 {
            sink.update(update.clone()).await;
        }
    }
}

/// How often updates may reach a sink: 5 per second feels live and costs little.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(200);

/// The shared progress state of one job run.
#[derive(Debug)]
pub(crate) struct Tracker {
    state: Mutex<TrackerState>,
    changed: Notify,
}

#[derive(Debug)]
struct TrackerState {
    ids: Vec<String>,
    weights: Vec<f64>,
    /// Per stage, the fraction of each `for_each` item (one slot when the stage does not fan out).
    fractions: Vec<Vec<f64>>,
    /// Per stage: running now, done, and the last thing it said.
    running: Vec<bool>,
    done: Vec<bool>,
    /// Per stage: how it ended, once it has.
    ended: Vec<Option<&'static str>>,
    said: Vec<Option<String>>,
    stage: Option<String>,
    message: String,
    emitted: u8,
}

impl TrackerState {
    fn index(&self, stage_id: &str) -> Option<usize> {
        self.ids.iter().position(|id| id == stage_id)
    }

    /// Shows what `index` said, remembering it as that stage's last word.
    fn speak(&mut self, index: Option<usize>, stage_id: &str, message: String) {
        if let Some(said) = index.and_then(|index| self.said.get_mut(index)) {
            *said = Some(message.clone());
        }
        self.stage = Some(stage_id.to_string());
        self.message = message;
    }

    /// Stage `index` stopped running: if it was the one shown, show another running stage instead.
    fn leave(&mut self, index: usize) {
        if let Some(running) = self.running.get_mut(index) {
            *running = false;
        }
        let Some(id) = self.ids.get(index) else { return };
        if self.stage.as_deref() != Some(id.as_str()) {
            return;
        }
        match (0..self.ids.len()).find(|&other| self.running[other]) {
            Some(other) => {
                self.stage = Some(self.ids[other].clone());
                self.message = self.said[other].clone().unwrap_or_else(|| format!("running {}", self.ids[other]));
            }
            None => self.message = format!("{id} ended"),
        }
    }
}

impl Tracker {
    /// A tracker for stages given as `(id, weight)`, in pipeline order.
    pub(crate) fn new(stages: impl IntoIterator<Item = (String, u32)>) -> Self {
        let (ids, weights): (Vec<String>, Vec<f64>) =
            stages.into_iter().map(|(id, weight)| (id, f64::from(weight))).unzip();
        let count = ids.len();
        let state = TrackerState {
            ids,
            weights,
            fractions: vec![vec![0.0]; count],
            running: vec![false; count],
            done: vec![false; count],
            ended: vec![None; count],
            said: vec![None; count],
            stage: None,
            message: "queued".into(),
            emitted: 0,
        };
        Self { state: Mutex::new(state), changed: Notify::new() }
    }

    fn lock(&self) -> MutexGuard<'_, TrackerState> {
        // A panic while holding this lock cannot leave the numbers inconsistent, so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn touch(&self) {
        self.changed.notify_one();
    }

    pub(crate) fn set_slots(&self, stage: usize, slots: usize) {
        if let Some(fractions) = self.lock().fractions.get_mut(stage) {
            *fractions = vec![0.0; slots.max(1)];
        }
        self.touch();
    }

    pub(crate) fn report(&self, stage: usize, slot: usize, stage_id: &str, fraction: f64, message: String) {
        {
            let mut state = self.lock();
            if let Some(value) = state.fractions.get_mut(stage).and_then(|slots| slots.get_mut(slot)) {
                *value = if fraction.is_finite() { fraction.clamp(0.0, 1.0) } else { 0.0 };
            }
            state.speak(Some(stage), stage_id, message);
        }
        self.touch();
    }

    /// Marks a stage as running (it got its turn and starts its first attempt).
    pub(crate) fn start_stage(&self, stage: usize) {
        {
            let mut state = self.lock();
            let Some(id) = state.ids.get(stage).cloned() else { return };
            state.running[stage] = true;
            state.speak(Some(stage), &id, format!("running {id}"));
        }
        self.touch();
    }

    /// Marks a stage as fully done (finished, skipped, restored or failed), ended with `status`.
    pub(crate) fn finish_stage(&self, stage: usize, status: &'static str) {
        {
            let mut state = self.lock();
            if let Some(ended) = state.ended.get_mut(stage) {
                *ended = Some(status);
            }
            if let Some(fractions) = state.fractions.get_mut(stage) {
                fractions.iter_mut().for_each(|fraction| *fraction = 1.0);
            }
            if let Some(done) = state.done.get_mut(stage) {
                *done = true;
            }
            state.leave(stage);
        }
        self.touch();
    }

    /// Marks a stage as no longer running without counting it done (it was cancelled), ended with `status`.
    pub(crate) fn stop_stage(&self, stage: usize, status: &'static str) {
        {
            let mut state = self.lock();
            if let Some(ended) = state.ended.get_mut(stage) {
                *ended = Some(status);
            }
            state.leave(stage);
        }
        self.touch();
    }

    /// Marks the whole job as done: 100 and a final message.
    pub(crate) fn complete(&self, message: &str) {
        {
            let mut state = self.lock();
            state.fractions.iter_mut().flatten().for_each(|fraction| *fraction = 1.0);
            state.done.iter_mut().for_each(|done| *done = true);
            state.running.iter_mut().for_each(|running| *running = false);
            state.stage = None;
            state.message = message.to_string();
        }
        self.touch();
    }

    /// Sets the message without changing any fraction.
    pub(crate) fn say(&self, stage_id: &str, message: String) {
        {
            let mut state = self.lock();
            let index = state.index(stage_id);
            state.speak(index, stage_id, message);
        }
        self.touch();
    }

    fn snapshot(&self, job_id: &str) -> ProgressUpdate {
        let mut state = self.lock();
        let total: f64 = state.weights.iter().sum();
        let done: f64 = state
            .weights
            .iter()
            .zip(&state.fractions)
            .map(|(weight, slots)| weight * slots.iter().sum::<f64>() / slots.len() as f64)
            .sum();
        let computed = if total > 0.0 { (100.0 * done / total).floor() as u8 } else { 0 };
        state.emitted = state.emitted.max(computed.min(100));
        let running = state.ids.iter().zip(&state.running).filter(|(_, running)| **running);
        ProgressUpdate {
            job_id: job_id.to_string(),
            percent: state.emitted,
            stage: state.stage.clone(),
            message: state.message.clone(),
            running: running.map(|(id, _)| id.clone()).collect(),
            stages_done: state.done.iter().filter(|done| **done).count(),
            stages_total: state.ids.len(),
            ended: state
                .ids
                .iter()
                .zip(&state.ended)
                .filter_map(|(id, ended)| Some((id.clone(), (*ended)?.to_string())))
                .collect(),
        }
    }
}

/// Sends coalesced updates until `done` fires, then one final update.
pub(crate) async fn emit(
    tracker: Arc<Tracker>,
    sink: Arc<dyn ProgressSink>,
    job_id: String,
    interval: Duration,
    done: CancellationToken,
) {
    let mut last: Option<ProgressUpdate> = None;
    loop {
        tokio::select! {
            () = tracker.changed.notified() => {}
            () = done.cancelled() => break,
        }
        let update = tracker.snapshot(&job_id);
        if last.as_ref() != Some(&update) {
            sink.update(update.clone()).await;
            last = Some(update);
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = done.cancelled() => break,
        }
    }
    let update = tracker.snapshot(&job_id);
    if last.as_ref() != Some(&update) {
        sink.update(update).await;
    }
}

/// Handed to a stage to report how far it is.
#[derive(Debug, Clone)]
pub struct ProgressReporter {
    tracker: Option<Arc<Tracker>>,
    stage: usize,
    slot: usize,
    stage_id: String,
}

impl ProgressReporter {
    pub(crate) fn new(tracker: Arc<Tracker>, stage: usize, slot: usize, stage_id: &str) -> Self {
        Self { tracker: Some(tracker), stage, slot, stage_id: stage_id.to_string() }
    }

    /// A reporter that goes nowhere, for running a stage on its own.
    pub fn detached() -> Self {
        Self { tracker: None, stage: 0, slot: 0, stage_id: String::new() }
    }

    /// Reports the fraction done (0.0 to 1.0) of this stage (or of this `for_each` item) and what it is doing.
    pub fn report(&self, fraction: f64, message: impl Into<String>) {
        if let Some(tracker) = &self.tracker {
            tracker.report(self.stage, self.slot, &self.stage_id, fraction, message.into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_is_weighted_and_never_decreases() {
        let tracker = Tracker::new([("a".into(), 1), ("b".into(), 3)]);
        tracker.report(1, 0, "b", 0.5, "half".into());
        assert_eq!(tracker.snapshot("j").percent, 37);
        tracker.report(1, 0, "b", 0.0, "retrying".into());
        assert_eq!(tracker.snapshot("j").percent, 37, "a retry does not move the bar back");
        tracker.set_slots(0, 4);
        tracker.report(0, 2, "a", 1.0, "item".into());
        tracker.finish_stage(1, "succeeded");
        assert_eq!(tracker.snapshot("j").percent, 81);
        tracker.complete("completed");
        let last = tracker.snapshot("j");
        assert_eq!((last.percent, last.stage, last.message.as_str()), (100, None, "completed"));
        assert_eq!((last.running.len(), last.stages_done, last.stages_total), (0, 2, 2));
    }

    #[test]
    fn progress_moves_on_from_a_finished_stage_to_one_still_running() {
        let tracker = Tracker::new([("fast".into(), 1), ("slow".into(), 1), ("last".into(), 1)]);
        tracker.start_stage(1);
        tracker.start_stage(0);
        tracker.report(0, 0, "fast", 0.5, "fast half way".into());
        tracker.report(1, 0, "slow", 0.2, "slow at a fifth".into());
        tracker.report(0, 0, "fast", 0.9, "fast nearly done".into());
        let both = tracker.snapshot("j");
        assert_eq!(both.running, ["fast", "slow"]);
        assert_eq!((both.stage.as_deref(), both.message.as_str()), (Some("fast"), "fast nearly done"));
        assert!(both.ended.is_empty());
        tracker.finish_stage(0, "succeeded");
        let after = tracker.snapshot("j");
        assert_eq!(after.running, ["slow"]);
        assert_eq!(after.ended, [("fast".to_string(), "succeeded".to_string())], "an ended stage says how");
        assert_eq!((after.stage.as_deref(), after.message.as_str()), (Some("slow"), "slow at a fifth"));
        assert_eq!((after.stages_done, after.stages_total), (1, 3));
        tracker.stop_stage(1, "cancelled");
        let stopped = tracker.snapshot("j");
        assert!(stopped.running.is_empty());
        let ended: Vec<(&str, &str)> = stopped.ended.iter().map(|(id, how)| (id.as_str(), how.as_str())).collect();
        assert_eq!(ended, [("fast", "succeeded"), ("slow", "cancelled")], "in pipeline order");
        assert_eq!((stopped.stage.as_deref(), stopped.message.as_str()), (Some("slow"), "slow ended"));
        assert_eq!(stopped.stages_done, 1, "a cancelled stage is not done");
    }
}
