//! Callbacks: when a job ends (completed, failed or cancelled), a POST of its final status to the
//! `callbackUrl` it was enqueued with (ARCHITECTURE.md). Batch users learn that a job ended without polling.
//!
//! - **Signed.** Each call carries `X-Echo-Timestamp: <unix seconds>` and
//!   `X-Echo-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>" under callback.secret>`, the
//!   Stripe scheme: the receiver recomputes it over the exact bytes it received and refuses an old timestamp,
//!   so a recorded call cannot be replayed later. Without `callback.secret` nothing is sent (an unsigned call
//!   proves nothing), and the job's log says so.
//! - **Retried.** A network error, a timeout (`callback.timeout` per attempt), 408, 429 or a 5xx answer is
//!   retried with a jittered, doubling backoff (`callback.backoff` up to `callback.max_backoff`, a
//!   `Retry-After` in seconds taking its place) until `callback.attempts` are spent; another 4xx answer, an
//!   address the rules refuse, or a redirect stops at once. Every attempt of one ending carries the same
//!   `X-Echo-Delivery` id, so a receiver can drop a repeat (delivery is at least once).
//! - **Same address rules as downloads.** Calls go through [`crate::net::HttpClient`] with the
//!   `download.allow_private` list: an internal address is refused unless allow-listed. Redirects are not
//!   followed: the signed body goes only where the job asked.
//! - **Never in the job's way.** The worker hands the ending over and goes on; the call runs on a task of its
//!   own, and its outcome (and every failed attempt) goes to the job's log, never to the job's state.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER, USER_AGENT};
use reqwest::{Method, Url};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::net::{AddressPolicy, HttpClient, NetError, Outgoing, shown};
use crate::queue::{Job, JobState, Queue};
use crate::secret::Secret;
use crate::time::rfc3339;
use crate::units::HumanDuration;

/// The signature header: `sha256=<hex>`.
pub const SIGNATURE_HEADER: &str = "x-echo-signature";
/// The timestamp header: Unix seconds when the attempt was signed.
pub const TIMESTAMP_HEADER: &str = "x-echo-timestamp";
/// The event header: `job.completed`, `job.failed` or `job.cancelled`.
pub const EVENT_HEADER: &str = "x-echo-event";
/// The delivery header: the same for every attempt of one ending, different for each ending.
pub const DELIVERY_HEADER: &str = "x-echo-delivery";

/// Time allowed to resolve a callback host at the API (as for sources at intake): a name that does not resolve
/// in this long is let through, and the worker's client resolves and checks it again when it connects.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

/// `callback.*` settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CallbackSettings {
    /// The HMAC key the calls are signed with (`ECHO_CALLBACK__SECRET`). Without it no callback is sent, and
    /// the API refuses a `callbackUrl`.
    pub secret: Option<Secret>,
    /// Attempts in all, the first included.
    pub attempts: u32,
    /// Time allowed for one attempt, from connecting to the answer's status line.
    pub timeout: HumanDuration,
    /// Wait before the second attempt; doubled for each one after.
    pub backoff: HumanDuration,
    /// Longest wait between attempts.
    pub max_backoff: HumanDuration,
}

impl Default for CallbackSettings {
    /// Five attempts over about a minute, 10 s each: what transcription vendors give their webhooks.
    fn default() -> Self {
        Self {
            secret: None,
            attempts: 5,
            timeout: HumanDuration(Duration::from_secs(10)),
            backoff: HumanDuration(Duration::from_secs(2)),
            max_backoff: HumanDuration(Duration::from_secs(60)),
        }
    }
}

/// Why a callback URL was refused or a callback was not delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallbackError {
    /// The URL cannot be used: syntax, scheme, no host.
    #[error("callbackUrl `{url}` is not usable: {reason}")]
    Invalid {
        /// The URL as given (credentials, query and fragment left out when it parses).
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The address rules refuse the URL's host.
    #[error("callbackUrl `{url}` is refused: {reason}")]
    Refused {
        /// The URL (no credentials, query or fragment).
        url: String,
        /// Which rule.
        reason: String,
    },
    /// The receiver answered with a 4xx status other than 408 and 429: another attempt would get the same.
    #[error("the callback to {url} was answered {status}; a 4xx answer is not retried")]
    Rejected {
        /// The URL (no credentials, query or fragment).
        url: String,
        /// The status.
        status: u16,
    },
    /// Every attempt failed.
    #[error("the callback to {url} failed after {attempts} attempt(s); the last: {last}")]
    Exhausted {
        /// The URL (no credentials, query or fragment).
        url: String,
        /// Attempts made.
        attempts: u32,
        /// What the last attempt met.
        last: String,
    },
    /// The process is stopping.
    #[error("the callback to {url} was abandoned: the process is stopping")]
    Abandoned {
        /// The URL (no credentials, query or fragment).
        url: String,
    },
    /// The HTTP client could not be built (TLS setup).
    #[error("cannot set up HTTP for callbacks: {0}")]
    Client(String),
}

/// How a delivery went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    /// The 2xx status of the answer.
    pub status: u16,
    /// Attempts it took.
    pub attempts: u32,
}

/// `sha256=<hex>`: the HMAC-SHA256 of `<timestamp>.<body>` under `secret`, as [`SIGNATURE_HEADER`] carries it.
pub fn sign(secret: &Secret, timestamp: u64, body: &[u8]) -> String {
    // HMAC takes keys of any length, so `new_from_slice` cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.expose().as_bytes()).expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    format!("sha256={}", digest.iter().map(|byte| format!("{byte:02x}")).collect::<String>())
}

/// Checks a `callbackUrl` at the door with the download rules (as intake checks `fileUrl`): `http` or `https`,
/// a host, and no internal address unless `policy` allows it (a host name is resolved and every address
/// checked; one that does not resolve now is let through). The worker's client resolves and checks again when
/// it connects, so a name that changes its answer later, or resolves only later, is still refused then.
///
/// # Errors
/// [`CallbackError::Invalid`] or [`CallbackError::Refused`], naming the URL and the rule.
pub async fn check_url(text: &str, policy: &AddressPolicy) -> Result<Url, CallbackError> {
    let invalid = |url: String, reason: &str| CallbackError::Invalid { url, reason: reason.to_string() };
    let url = Url::parse(text.trim()).map_err(|error| {
        let given: String = text.chars().take(200).collect();
        invalid(given, &format!("not an absolute URL ({error})"))
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(shown(&url), &format!("scheme `{}` is not allowed (use http or https)", url.scheme())));
    }
    let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
        return Err(invalid(shown(&url), "it names no host"));
    };
    let refused = |reason: String| CallbackError::Refused { url: shown(&url), reason };
    let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
    let addresses = match host.parse::<std::net::IpAddr>() {
        Ok(address) => vec![address],
        Err(_) => {
            let lookup = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host.as_str(), port))).await;
            match lookup {
                Ok(Ok(found)) => found.map(|address| address.ip()).collect(),
                // Not resolvable now: the worker resolves it again when it calls, and logs why it could not.
                _ => Vec::new(),
            }
        }
    };
    for address in addresses {
        policy.check(&host, address, Some(port)).map_err(|error| refused(error.to_string()))?;
    }
    Ok(url)
}

/// The body of a job's callback: small, as vendors send it; the receiver fetches the results through the API
/// (`GET /api/recording/:id/status`, `/api/job/:id/status`, the subtitles).
pub fn payload(job: &Job) -> Value {
    let stages: serde_json::Map<String, Value> = job
        .result
        .as_ref()
        .and_then(|report| report.get("stages"))
        .and_then(Value::as_object)
        .map(|stages| {
            stages.iter().filter_map(|(id, stage)| Some((id.clone(), stage.get("status")?.clone()))).collect()
        })
        .unwrap_or_default();
    json!({
        "event": event(job.state),
        "jobId": job.id,
        "recordingId": job.spec.recording_id,
        "pipeline": job.spec.pipeline,
        "state": job.state.name(),
        "attempts": job.attempts,
        "error": if job.state == JobState::Completed { None } else { job.error.clone() },
        "stages": stages,
        "createdAt": rfc3339(job.created_at),
        "finishedAt": job.finished_at.map(rfc3339),
    })
}

fn event(state: JobState) -> String {
    format!("job.{}", state.name())
}

/// Sends callbacks. Cheap to clone; clones share the tasks in flight.
#[derive(Debug, Clone)]
pub struct Callbacks {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    http: HttpClient,
    settings: CallbackSettings,
    /// Calls in flight, so that a stopping process can let them end.
    tasks: TaskTracker,
    /// Fired when a stopping process gives up on the calls still in flight.
    stop: CancellationToken,
}

impl Callbacks {
    /// Callbacks under `settings`, reaching only addresses `policy` allows.
    ///
    /// # Errors
    /// [`CallbackError::Client`] when the HTTP client cannot be built.
    pub fn new(settings: CallbackSettings, policy: AddressPolicy) -> Result<Self, CallbackError> {
        // No redirects: the signed body goes only where the job asked.
        let http = HttpClient::new(policy, 0).map_err(|error| CallbackError::Client(error.to_string()))?;
        let inner = Inner { http, settings, tasks: TaskTracker::new(), stop: CancellationToken::new() };
        Ok(Self { inner: Arc::new(inner) })
    }

    /// Whether a secret is set (callbacks are sent at all).
    pub fn enabled(&self) -> bool {
        self.inner.settings.secret.is_some()
    }

    /// Called after `job` was settled: when the job asked for a callback and has ended for good, sends the
    /// callback on a task of its own and returns at once. The outcome goes to the job's log. `worker` names the
    /// worker that settled it, and the callback is sent only if the job ended under that worker (a job whose
    /// lease went to another worker is that worker's to report); `None` is for a job the queue ended without a
    /// worker (see `ending`).
    pub fn job_ended(&self, queue: Arc<dyn Queue>, job: &Job, worker: Option<&str>) {
        if job.spec.callback_url.is_none() {
            return;
        }
        let (this, id, worker) = (self.clone(), job.id.clone(), worker.map(str::to_string));
        self.inner.tasks.spawn(async move {
            let job = match queue.get(&id).await {
                Ok(Some(job)) => job,
                Ok(None) => return,
                Err(error) => {
                    tracing::warn!(job = %id, %error, "callback not sent: the job could not be read");
                    return;
                }
            };
            if !job.state.is_final() || worker.is_some_and(|worker| job.worker.as_deref() != Some(worker.as_str())) {
                return;
            }
            this.report(queue.as_ref(), &job).await;
        });
    }

    /// Sends `job`'s callback now and writes the outcome into its log.
    async fn report(&self, queue: &dyn Queue, job: &Job) {
        let Some(url) = job.spec.callback_url.as_deref() else { return };
        let line = if self.enabled() {
            let delivery = format!("{}.{}", job.id, job.finished_at.unwrap_or_default());
            let body = serde_json::to_vec(&payload(job)).unwrap_or_default();
            match self.deliver(url, &event(job.state), &delivery, &body, Some((queue, job.id.as_str()))).await {
                Ok(done) => {
                    let to = Url::parse(url).map(|url| shown(&url)).unwrap_or_default();
                    format!("callback delivered to {to}: answered {} after {} attempt(s)", done.status, done.attempts)
                }
                Err(error) => {
                    tracing::warn!(job = %job.id, %error, "callback not delivered");
                    format!("callback not delivered: {error}")
                }
            }
        } else {
            "callback not sent: callback.secret (ECHO_CALLBACK__SECRET) is not set on this worker, and an unsigned \
             callback proves nothing"
                .to_string()
        };
        if let Err(error) = queue.log(&job.id, &line).await {
            tracing::debug!(job = %job.id, %error, "callback log line not written");
        }
    }

    /// POSTs `body` to `url`, signed, retried as the module docs say. `log` names a job whose log gets a line
    /// per failed attempt.
    ///
    /// # Errors
    /// [`CallbackError`]: the URL refused, a 4xx answer, every attempt failed, or the process stopping.
    pub async fn deliver(
        &self,
        url: &str,
        event: &str,
        delivery: &str,
        body: &[u8],
        log: Option<(&dyn Queue, &str)>,
    ) -> Result<Delivered, CallbackError> {
        let settings = &self.inner.settings;
        let Some(secret) = &settings.secret else {
            return Err(CallbackError::Invalid { url: String::new(), reason: "callback.secret is not set".into() });
        };
        let target = Url::parse(url).map_err(|error| CallbackError::Invalid {
            url: url.chars().take(200).collect(),
            reason: format!("not an absolute URL ({error})"),
        })?;
        let shown_url = shown(&target);
        let attempts = settings.attempts.max(1);
        let mut wait = settings.backoff.0;
        let mut last = String::new();
        for attempt in 1..=attempts {
            let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_secs());
            let mut headers = HeaderMap::new();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            headers.insert(USER_AGENT, HeaderValue::from_static(concat!("echo-worker/", env!("CARGO_PKG_VERSION"))));
            let mut put = |name: &'static str, value: String| {
                if let Ok(value) = HeaderValue::from_str(&value) {
                    headers.insert(HeaderName::from_static(name), value);
                }
            };
            put(EVENT_HEADER, event.to_string());
            put(DELIVERY_HEADER, delivery.to_string());
            put(TIMESTAMP_HEADER, timestamp.to_string());
            put(SIGNATURE_HEADER, sign(secret, timestamp, body));
            let request =
                Outgoing { body: Some(body.to_vec()), ..Outgoing::new(Method::POST, target.clone(), headers) };
            let sent = tokio::time::timeout(settings.timeout.0, self.inner.http.send(request, &self.inner.stop)).await;
            let mut retry_after = None;
            match sent {
                Err(_) => last = format!("no answer within {}", settings.timeout),
                Ok(Err(NetError::Cancelled)) => return Err(CallbackError::Abandoned { url: shown_url }),
                Ok(Err(NetError::Refused { reason, .. })) => {
                    let reason = if reason.contains("redirects") {
                        "the receiver answered with a redirect, and callbacks do not follow redirects".to_string()
                    } else {
                        reason
                    };
                    return Err(CallbackError::Refused { url: shown_url, reason });
                }
                Ok(Err(error @ NetError::Network { .. })) => last = error.to_string(),
                Ok(Ok((response, _))) => {
                    let status = response.status();
                    if status.is_success() {
                        return Ok(Delivered { status: status.as_u16(), attempts: attempt });
                    }
                    if status.is_client_error() && !matches!(status.as_u16(), 408 | 429) {
                        return Err(CallbackError::Rejected { url: shown_url, status: status.as_u16() });
                    }
                    retry_after = response
                        .headers()
                        .get(RETRY_AFTER)
                        .and_then(|value| value.to_str().ok())
                        .and_then(|value| value.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    last = format!("answered {status}");
                }
            }
            if attempt == attempts {
                break;
            }
            let pause = retry_after
                .unwrap_or_else(|| wait.mul_f64(0.5 + crate::retry::random_unit() / 2.0))
                .min(settings.max_backoff.0);
            wait = (wait * 2).min(settings.max_backoff.0);
            if let Some((queue, id)) = log {
                let line = format!(
                    "callback to {shown_url}: attempt {attempt} of {attempts} {last}; next in {:.1} s",
                    pause.as_secs_f64()
                );
                if let Err(error) = queue.log(id, &line).await {
                    tracing::debug!(job = %id, %error, "callback log line not written");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = self.inner.stop.cancelled() => return Err(CallbackError::Abandoned { url: shown_url }),
            }
        }
        Err(CallbackError::Exhausted { url: shown_url, attempts, last })
    }

    /// For a stopping process: waits up to `within` for the calls in flight, then abandons the rest (each
    /// says so in its job's log).
    pub async fn finish(&self, within: Duration) {
        self.inner.tasks.close();
        if tokio::time::timeout(within, self.inner.tasks.wait()).await.is_err() {
            tracing::warn!(calls = self.inner.tasks.len(), "callbacks still being retried at shutdown are abandoned");
            self.inner.stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(2), self.inner.tasks.wait()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Computed independently: printf '%s' '1700000000.{"jobId":"j-1","state":"completed"}' |
        //   openssl dgst -sha256 -hmac whsec_test
        let body = br#"{"jobId":"j-1","state":"completed"}"#;
        assert_eq!(
            sign(&Secret::new("whsec_test"), 1_700_000_000, body),
            "sha256=9066c90190441a526bd33aeb491550aaea829cab04583315f6f4397c265350df"
        );
        assert_ne!(
            sign(&Secret::new("whsec_test"), 1_700_000_001, body),
            sign(&Secret::new("whsec_test"), 1_700_000_000, body)
        );
    }

    #[test]
    fn settings_default_to_five_attempts_and_print_no_secret() {
        let settings = CallbackSettings { secret: Some(Secret::new("whsec_marker")), ..CallbackSettings::default() };
        assert_eq!(settings.attempts, 5);
        assert!(!format!("{settings:?}").contains("whsec_marker"));
        assert!(!serde_json::to_string(&settings).unwrap().contains("whsec_marker"));
    }

    #[tokio::test]
    async fn urls_are_checked_with_the_download_rules() {
        let open = AddressPolicy::default();
        let reason = |result: Result<Url, CallbackError>| result.unwrap_err().to_string();
        assert_eq!(
            reason(check_url("gopher://example.com/x", &open).await),
            "callbackUrl `gopher://example.com/x` is not usable: scheme `gopher` is not allowed (use http or https)"
        );
        assert!(reason(check_url("not a url", &open).await).starts_with("callbackUrl `not a url` is not usable"));
        assert_eq!(
            reason(check_url("http://10.0.0.5/hook?token=abc", &open).await),
            "callbackUrl `http://10.0.0.5/hook` is refused: 10.0.0.5 is an internal address (10.0.0.5) and is not \
             allow-listed"
        );
        assert!(reason(check_url("http://localhost:9/hook", &open).await).contains("is not allow-listed"));
        assert!(reason(check_url("http://[::1]:9/hook", &open).await).contains("is not allow-listed"));
        let allowed = AddressPolicy::allowing(["127.0.0.1:9000"]).unwrap();
        assert!(check_url("http://127.0.0.1:9000/hook", &allowed).await.is_ok());
        assert!(check_url("http://127.0.0.1:9001/hook", &allowed).await.is_err(), "only the allowed port");
        assert!(check_url("https://93.184.216.34/hook", &open).await.is_ok(), "public addresses pass");
    }
}
