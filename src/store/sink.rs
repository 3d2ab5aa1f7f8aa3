//! A [`ProgressSink`] that writes a job's progress into its recording row, at most once a second, so a
//! chatty job costs the database (and Supabase Realtime subscribers) little. State changes are written
//! directly by whoever runs the job, not through here, so they are never delayed or dropped.
//!
//! The second is counted from the end of the previous write, and writes never overlap (an update that arrives
//! while one is in flight is dropped), so two progress writes reach the table at least a second apart even when
//! the database is slow to answer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Store;
use crate::job::progress::{ProgressSink, ProgressUpdate};

/// At most one progress write per recording per this interval.
pub const WRITE_INTERVAL: Duration = Duration::from_secs(1);

/// Writes progress to the store.
pub struct StoreSink {
    store: Arc<dyn Store>,
    recording_id: String,
    /// When the previous write finished; held across the write, so writes are one at a time.
    last: tokio::sync::Mutex<Option<Instant>>,
}

impl StoreSink {
    /// Progress of the job working on `recording_id`.
    pub fn new(store: Arc<dyn Store>, recording_id: impl Into<String>) -> Self {
        Self { store, recording_id: recording_id.into(), last: tokio::sync::Mutex::new(None) }
    }
}

#[async_trait::async_trait]
impl ProgressSink for StoreSink {
    async fn update(&self, update: ProgressUpdate) {
        let final_update = update.percent == 100;
        let mut last = if final_update {
            self.last.lock().await
        } else {
            match self.last.try_lock() {
                Ok(last) => last,
                // A write is in flight: this update would land right after it.
                Err(_) => return,
            }
        };
        if !final_update && last.is_some_and(|at| at.elapsed() < WRITE_INTERVAL) {
            return;
        }
        let stage = update.stage.as_deref().filter(|stage| !stage.is_empty());
        if let Err(error) = self.store.set_progress(&self.recording_id, update.percent, stage, &update.message).await {
            // Progress is advisory; the job goes on and the next update may get through.
            tracing::warn!(recording = %self.recording_id, %error, "could not write progress");
        }
        *last = Some(Instant::now());
    }
}
