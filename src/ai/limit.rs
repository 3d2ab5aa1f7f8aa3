//! Client-side limits of one provider and request kind: at most N request starts in any window (a sliding
//! log, so the provider's own sliding window never sees more) and at most M requests in flight.
//!
//! With Redis configured, the window is shared by every worker process through one Lua script
//! (`window.lua`) on a sorted set, so that ten workers together still send Azure's 3 requests a minute. The
//! in-flight bound stays per process. If Redis cannot be reached the process falls back to its own window
//! and says so in the log, rather than failing the job.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// Requests that start within this much of the window's edge still count in it: the provider stamps a request
/// when it arrives, after we have built and sent it, and on a loaded machine that can be a few hundred
/// milliseconds later than the start was counted (0.4 % of a one-minute window).
const EDGE_MARGIN: Duration = Duration::from_millis(250);

/// Paces and bounds requests.
pub struct Limiter {
    in_flight: Arc<Semaphore>,
    per_window: Option<u32>,
    window: Duration,
    starts: Mutex<VecDeque<Instant>>,
    shared: Option<SharedWindow>,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("per_window", &self.per_window)
            .field("window", &self.window)
            .field("shared", &self.shared.as_ref().map(|shared| &shared.key))
            .finish_non_exhaustive()
    }
}

/// The window kept in Redis.
#[derive(Clone)]
pub struct SharedWindow {
    connection: redis::aio::ConnectionManager,
    key: String,
}

impl SharedWindow {
    /// A window under `key` on the Redis behind `connection`.
    pub fn new(connection: redis::aio::ConnectionManager, key: String) -> Self {
        Self { connection, key }
    }
}

impl Limiter {
    /// At most `per_window` starts per `window` (none: unlimited) and `concurrent` at once.
    pub fn new(per_window: Option<u32>, window: Duration, concurrent: usize) -> Self {
        Self {
            in_flight: Arc::new(Semaphore::new(concurrent.max(1))),
            per_window: per_window.filter(|n| *n > 0),
            window,
            starts: Mutex::new(VecDeque::new()),
            shared: None,
        }
    }

    /// Counts the window in Redis, shared with every process using the same key.
    #[must_use]
    pub fn shared(mut self, window: Option<SharedWindow>) -> Self {
        self.shared = window;
        self
    }

    /// Asks Redis for a start; `Some(wait)` when the window is full, `None` when Redis failed.
    async fn shared_start(&self, shared: &SharedWindow, limit: u32) -> Option<Duration> {
        static SCRIPT: std::sync::LazyLock<redis::Script> =
            std::sync::LazyLock::new(|| redis::Script::new(include_str!("window.lua")));
        let member = uuid::Uuid::new_v4().to_string();
        let window_ms = u64::try_from((self.window + EDGE_MARGIN).as_millis()).unwrap_or(u64::MAX);
        let mut connection = shared.connection.clone();
        let answer: redis::RedisResult<u64> =
            SCRIPT.key(&shared.key).arg(window_ms).arg(limit).arg(member).invoke_async(&mut connection).await;
        match answer {
            Ok(wait) => Some(Duration::from_millis(wait)),
            Err(error) => {
                tracing::warn!(key = %shared.key, %error, "shared rate limit unavailable; pacing in this process only");
                None
            }
        }
    }

    /// Waits for a slot; the returned permit holds the in-flight place until dropped. `None` when cancelled.
    pub async fn acquire(&self, cancel: &CancellationToken) -> Option<OwnedSemaphorePermit> {
        let permit = tokio::select! {
            permit = self.in_flight.clone().acquire_owned() => permit.ok()?,
            () = cancel.cancelled() => return None,
        };
        let Some(limit) = self.per_window else { return Some(permit) };
        if let Some(shared) = &self.shared {
            loop {
                match self.shared_start(shared, limit).await {
                    Some(wait) if wait.is_zero() => return Some(permit),
                    Some(wait) => tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = cancel.cancelled() => return None,
                    },
                    None => break,
                }
            }
        }
        loop {
            let wait = {
                let mut starts = self.starts.lock().await;
                let now = Instant::now();
                while starts.front().is_some_and(|start| now.duration_since(*start) >= self.window + EDGE_MARGIN) {
                    starts.pop_front();
                }
                if starts.len() < limit as usize {
                    starts.push_back(now);
                    return Some(permit);
                }
                let oldest = *starts.front().expect("the log is full, so not empty");
                (oldest + self.window + EDGE_MARGIN).saturating_duration_since(now)
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = cancel.cancelled() => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn starts_are_paced_per_window() {
        let limiter = Limiter::new(Some(2), Duration::from_millis(200), 10);
        let cancel = CancellationToken::new();
        let begun = Instant::now();
        let mut times = Vec::new();
        for _ in 0..5 {
            let _permit = limiter.acquire(&cancel).await.unwrap();
            times.push(begun.elapsed());
        }
        for index in 2..5 {
            assert!(times[index] - times[index - 2] >= Duration::from_millis(200), "{times:?}");
        }
    }
}
