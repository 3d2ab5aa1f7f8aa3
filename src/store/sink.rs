//! A [`ProgressSink`] that writes a job's progress into its recording row, at most once a second, so a
//! chatty job costs the database (and Supabase Realtime subscribers) little. State changes are written
//! directly by whoever runs the job, not through here, so they are never delayed or dropped.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::Store;
use crate::job::progress::{ProgressSink, ProgressUpdate};

/// At most one progress write per recording per this interval.
pub const WRITE_INTERVAL: Duration = Duration::from_secs(1);

/// Writes progress to the store.
pub struct StoreSink {
    store: Arc<dyn Store>,
    recording_id: String,
    last: Mutex<Option<Instant>>,
}

impl StoreSink {
    /// Progress of the job working on `recording_id`.
    pub fn new(store: Arc<dyn Store>, recording_id: impl Into<String>) -> Self {
        Self { store, recording_id: recording_id.into(), last: Mutex::new(None) }
    }
}

#[async_trait::async_trait]
impl ProgressSink for StoreSink {
    async fn update(&self, update: ProgressUpdate) {
        {
            let mut last = self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let final_update = update.percent == 100;
            if !final_update && last.is_some_and(|at| at.elapsed() < WRITE_INTERVAL) {
                return;
            }
            *last = Some(Instant::now());
        }
        let stage = update.stage.as_deref().filter(|stage| !stage.is_empty());
        if let Err(error) = self.store.set_progress(&self.recording_id, update.percent, stage, &update.message).await {
            // Progress is advisory; the job goes on and the next update may get through.
            tracing::warn!(recording = %self.recording_id, %error, "could not write progress");
        }
    }
}
