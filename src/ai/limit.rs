//! Client-side limits of one provider and request kind: at most N request starts in any window (a sliding
//! log, so the provider's own sliding window never sees more) and at most M requests in flight.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// Requests that start within this much of the window's edge still count in it: the provider stamps a request
/// when it arrives, a little after we send it.
const EDGE_MARGIN: Duration = Duration::from_millis(50);

/// Paces and bounds requests.
#[derive(Debug)]
pub struct Limiter {
    in_flight: Arc<Semaphore>,
    per_window: Option<u32>,
    window: Duration,
    starts: Mutex<VecDeque<Instant>>,
}

impl Limiter {
    /// At most `per_window` starts per `window` (none: unlimited) and `concurrent` at once.
    pub fn new(per_window: Option<u32>, window: Duration, concurrent: usize) -> Self {
        Self {
            in_flight: Arc::new(Semaphore::new(concurrent.max(1))),
            per_window: per_window.filter(|n| *n > 0),
            window,
            starts: Mutex::new(VecDeque::new()),
        }
    }

    /// Waits for a slot; the returned permit holds the in-flight place until dropped. `None` when cancelled.
    pub async fn acquire(&self, cancel: &CancellationToken) -> Option<OwnedSemaphorePermit> {
        let permit = tokio::select! {
            permit = self.in_flight.clone().acquire_owned() => permit.ok()?,
            () = cancel.cancelled() => return None,
        };
        let Some(limit) = self.per_window else { return Some(permit) };
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
