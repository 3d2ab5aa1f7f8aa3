//! Retries: the policy a pipeline declares for a stage (and the AI client uses for requests), and its timing:
//! exponential backoff with jitter, capped, unless the provider said how long to wait.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::job::StageError;
use crate::units::HumanDuration;

/// Jitter takes up to this share off each wait, so that workers that failed together do not retry together,
/// while every wait stays longer than the one before it for coefficients of 1.25 and up.
const JITTER: f64 = 0.2;

/// How failed attempts of a stage are retried: exponential backoff, capped.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RetryPolicy {
    /// Attempts in all, including the first.
    pub max_attempts: u32,
    /// Wait before the first retry.
    pub initial_interval: Duration,
    /// Growth factor of the wait.
    pub backoff_coefficient: f64,
    /// Longest wait.
    pub max_interval: Duration,
}

impl Default for RetryPolicy {
    /// Three attempts, 2 s then 4 s apart: enough to ride out a provider hiccup without hiding a real outage.
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_interval: Duration::from_secs(2),
            backoff_coefficient: 2.0,
            max_interval: Duration::from_secs(60),
        }
    }
}

/// A retry policy; every field falls back to the pipeline default, then to the built-in default.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    /// Attempts in all, including the first (default 3; 1 means no retry; at most 100).
    #[schemars(range(min = 1, max = 100))]
    pub max_attempts: Option<u32>,
    /// Wait before the first retry (default `"2s"`).
    pub initial_interval: Option<HumanDuration>,
    /// Each wait is the previous one times this (default 2.0, at least 1.0).
    #[schemars(range(min = 1.0))]
    pub backoff_coefficient: Option<f64>,
    /// Longest wait between attempts (default `"1m"`).
    pub max_interval: Option<HumanDuration>,
}

/// Most attempts a retry policy may ask for: a stage that fails quickly with `initial_interval = "0s"` would
/// otherwise spin through billions of attempts.
pub const MAX_ATTEMPTS: u32 = 100;

impl RawRetry {
    /// What is wrong with the values, as `(field, message)` pairs; `dotted` is the policy's path in the file.
    pub fn problems(&self, dotted: &str) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        match self.max_attempts {
            Some(0) => problems.push(("max_attempts", format!("`{dotted}.max_attempts` must be at least 1"))),
            Some(attempts) if attempts > MAX_ATTEMPTS => problems.push((
                "max_attempts",
                format!("`{dotted}.max_attempts` is {attempts}; at most {MAX_ATTEMPTS} attempts are allowed"),
            )),
            _ => {}
        }
        if self.backoff_coefficient.is_some_and(|c| !(c >= 1.0 && c.is_finite())) {
            problems.push(("backoff_coefficient", format!("`{dotted}.backoff_coefficient` must be at least 1.0")));
        }
        problems
    }
}

/// The wait before the attempt after `failed_attempt` (1-based): the error's `retry_after` when it has one,
/// otherwise `initial × coefficient^(failed_attempt − 1)`, capped at `max_interval`, minus up to 20% jitter.
pub fn delay(policy: &RetryPolicy, failed_attempt: u32, error: &StageError) -> Duration {
    error.retry_after.unwrap_or_else(|| backoff(policy, failed_attempt, random_unit()))
}

/// The backoff for `failed_attempt` with a jitter draw `unit` in `[0, 1)`.
pub fn backoff(policy: &RetryPolicy, failed_attempt: u32, unit: f64) -> Duration {
    let exponent = i32::try_from(failed_attempt.saturating_sub(1)).unwrap_or(i32::MAX);
    let base = policy.initial_interval.as_secs_f64() * policy.backoff_coefficient.powi(exponent);
    let capped = base.min(policy.max_interval.as_secs_f64());
    Duration::from_secs_f64((capped * (1.0 - JITTER * unit.clamp(0.0, 1.0))).max(0.0))
}

/// A number in `[0, 1)` from the standard library's randomly seeded hasher; good enough for jitter.
pub fn random_unit() -> f64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(0);
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            initial_interval: Duration::from_secs(2),
            backoff_coefficient: 2.0,
            max_interval: Duration::from_secs(5),
        }
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(&policy(), 1, 0.0), Duration::from_secs(2));
        assert_eq!(backoff(&policy(), 2, 0.0), Duration::from_secs(4));
        assert_eq!(backoff(&policy(), 3, 0.0), Duration::from_secs(5));
        assert_eq!(backoff(&policy(), 1, 1.0), Duration::from_secs_f64(1.6));
        assert!(backoff(&policy(), 2, 1.0) > backoff(&policy(), 1, 0.0));
    }

    #[test]
    fn retry_after_wins() {
        let error =
            StageError::transient(ErrorCode::HttpStatus, "429").with_retry_after(Some(Duration::from_millis(30)));
        assert_eq!(delay(&policy(), 1, &error), Duration::from_millis(30));
        let unit = random_unit();
        assert!((0.0..1.0).contains(&unit));
    }

    #[test]
    fn jitter_draws_stay_in_range_and_vary() {
        let draws: Vec<f64> = (0..64).map(|_| random_unit()).collect();
        assert!(draws.iter().all(|unit| (0.0..1.0).contains(unit)), "{draws:?}");
        // A constant draw would let workers that failed together retry together.
        assert!(draws.iter().any(|unit| *unit != draws[0]), "{draws:?}");
    }

    #[test]
    fn without_retry_after_the_delay_is_the_backoff_less_at_most_a_fifth() {
        let error = StageError::transient(ErrorCode::Io, "connection reset");
        for attempt in 1..=4 {
            let wait = delay(&policy(), attempt, &error);
            let (least, most) = (backoff(&policy(), attempt, 1.0), backoff(&policy(), attempt, 0.0));
            assert!(least <= wait && wait <= most, "attempt {attempt}: {wait:?} not in {least:?}..={most:?}");
        }
    }

    #[test]
    fn backoff_jitter_and_cap_hold_at_the_extremes() {
        assert_eq!(backoff(&policy(), 1, 0.5), Duration::from_secs_f64(1.8));
        // The cap applies before the jitter, so capped waits still spread out.
        assert_eq!(backoff(&policy(), 10, 1.0), Duration::from_secs(4));
        assert_eq!(backoff(&policy(), u32::MAX, 0.0), Duration::from_secs(5));
        // Attempt 0 is treated as the first; draws outside [0, 1] are clamped.
        assert_eq!(backoff(&policy(), 0, 0.0), Duration::from_secs(2));
        assert_eq!(backoff(&policy(), 1, 7.0), backoff(&policy(), 1, 1.0));
        assert_eq!(backoff(&policy(), 1, -7.0), backoff(&policy(), 1, 0.0));
    }
}
