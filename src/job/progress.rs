//! Job progress: one number from 0 to 100, the weighted sum of every stage's fraction, with the current stage
//! and a message. Stages report through a [`ProgressReporter`]; an emitter task coalesces the reports and
//! sends at most one [`ProgressUpdate`] per interval (5 per second by default) to a [`ProgressSink`], so a
//! chatty stage never floods the queue, the store or the terminal. The number never goes backwards within a
//! run, even when a stage is retried and starts again from zero.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// What a sink receives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProgressUpdate {
    /// The job.
    pub job_id: String,
    /// 0 to 100, never decreasing within a run.
    pub percent: u8,
    /// The stage that reported last, if any.
    pub stage: Option<String>,
    /// A short human message (`"transcribing chunk 3 of 7"`).
    pub message: String,
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
    weights: Vec<f64>,
    /// Per stage, the fraction of each `for_each` item (one slot when the stage does not fan out).
    fractions: Vec<Vec<f64>>,
    stage: Option<String>,
    message: String,
    emitted: u8,
}

impl Tracker {
    pub(crate) fn new(weights: impl IntoIterator<Item = u32>) -> Self {
        let weights: Vec<f64> = weights.into_iter().map(f64::from).collect();
        let fractions = vec![vec![0.0]; weights.len()];
        let state = TrackerState { weights, fractions, stage: None, message: "queued".into(), emitted: 0 };
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
            state.stage = Some(stage_id.to_string());
            state.message = message;
        }
        self.touch();
    }

    /// Marks a stage as fully done (finished, skipped, restored or failed-and-continued).
    pub(crate) fn finish_stage(&self, stage: usize) {
        if let Some(fractions) = self.lock().fractions.get_mut(stage) {
            fractions.iter_mut().for_each(|fraction| *fraction = 1.0);
        }
        self.touch();
    }

    /// Marks the whole job as done: 100 and a final message.
    pub(crate) fn complete(&self, message: &str) {
        {
            let mut state = self.lock();
            state.fractions.iter_mut().flatten().for_each(|fraction| *fraction = 1.0);
            state.stage = None;
            state.message = message.to_string();
        }
        self.touch();
    }

    /// Sets the message without changing any fraction.
    pub(crate) fn say(&self, stage_id: &str, message: String) {
        {
            let mut state = self.lock();
            state.stage = Some(stage_id.to_string());
            state.message = message;
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
        ProgressUpdate {
            job_id: job_id.to_string(),
            percent: state.emitted,
            stage: state.stage.clone(),
            message: state.message.clone(),
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
        let tracker = Tracker::new([1, 3]);
        tracker.report(1, 0, "b", 0.5, "half".into());
        assert_eq!(tracker.snapshot("j").percent, 37);
        tracker.report(1, 0, "b", 0.0, "retrying".into());
        assert_eq!(tracker.snapshot("j").percent, 37, "a retry does not move the bar back");
        tracker.set_slots(0, 4);
        tracker.report(0, 2, "a", 1.0, "item".into());
        tracker.finish_stage(1);
        assert_eq!(tracker.snapshot("j").percent, 81);
        tracker.complete("completed");
        let last = tracker.snapshot("j");
        assert_eq!((last.percent, last.stage, last.message.as_str()), (100, None, "completed"));
    }
}
