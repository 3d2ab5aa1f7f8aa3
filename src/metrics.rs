//! Prometheus metrics of this process (ARCHITECTURE.md, "Metrics"): one process-wide registry that the engine
//! and the AI client count into where they already know the numbers (a stage's duration, a provider's reply,
//! the audio seconds and tokens it bills), and that `GET /metrics` renders in the OpenMetrics text format
//! together with the queue's figures read at scrape time.
//!
//! The counters are per process: a `serve` process counts the jobs its own worker runs, an `api` process counts
//! none (its queue figures come from the shared queue, so they are the same from every API process). Labels carry
//! only bounded values: pipeline and stage ids from the deployment's files, provider names from the settings,
//! HTTP status codes, job states; never job or recording ids.

use std::sync::OnceLock;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// The media type of [`Metrics::render`]'s text, as Prometheus asks for it.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Stage duration buckets, in seconds: from a validate that takes a few milliseconds to a whisper stage of a
/// long recording (30 minutes is the default stage timeout).
const STAGE_BUCKETS: [f64; 14] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0];

/// A stage of a pipeline, and how it ended.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    pipeline: String,
    stage: String,
    outcome: &'static str,
}

/// A stage of a pipeline.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageIdLabels {
    pipeline: String,
    stage: String,
}

/// One provider request and its answer.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AiRequestLabels {
    provider: String,
    kind: &'static str,
    status: String,
}

/// A provider and the kind of request.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AiLabels {
    provider: String,
    kind: &'static str,
}

/// A provider.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabels {
    provider: String,
}

/// Tokens billed, by provider and direction.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    provider: String,
    kind: &'static str,
}

/// A job state.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Clone)]
struct StageHistogram;

impl MetricConstructor<Histogram> for StageHistogram {
    fn new_metric(&self) -> Histogram {
        Histogram::new(STAGE_BUCKETS)
    }
}

/// What an AI request was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AiKind {
    /// `audio/transcriptions`.
    Transcription,
    /// `chat/completions`.
    Chat,
}

impl AiKind {
    const fn name(self) -> &'static str {
        match self {
            Self::Transcription => "transcription",
            Self::Chat => "chat",
        }
    }
}

/// The queue's figures at scrape time, read by the caller (the metrics do not know the queue).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueFigures {
    /// Jobs per state name.
    pub counts: Vec<(&'static str, u64)>,
    /// Whether workers may take jobs.
    pub paused: bool,
    /// Workers with a recent heartbeat.
    pub workers: u64,
}

/// The process's metrics. Get it with [`global`].
pub struct Metrics {
    registry: Registry,
    stage_duration: Family<StageLabels, Histogram, StageHistogram>,
    stage_retries: Family<StageIdLabels, Counter>,
    ai_requests: Family<AiRequestLabels, Counter>,
    ai_retries: Family<AiLabels, Counter>,
    ai_rate_limited: Family<AiLabels, Counter>,
    ai_audio: Family<ProviderLabels, Counter<f64, AtomicU64>>,
    ai_tokens: Family<TokenLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// The process-wide metrics.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("echo");
        let stage_duration = Family::new_with_constructor(StageHistogram);
        registry.register_with_unit(
            "stage_duration",
            "Time a stage took, from its first attempt's start to its end, retries included",
            Unit::Seconds,
            stage_duration.clone(),
        );
        let stage_retries = Family::default();
        registry.register("stage_retries", "Stage attempts that failed and were tried again", stage_retries.clone());
        let ai_requests = Family::default();
        registry.register(
            "ai_requests",
            "Requests sent to AI providers, by HTTP status (`error` when no answer came)",
            ai_requests.clone(),
        );
        let ai_retries = Family::default();
        registry.register("ai_retries", "AI provider requests that failed and were sent again", ai_retries.clone());
        let ai_rate_limited = Family::default();
        registry.register("ai_rate_limited", "AI provider answers of 429 Too Many Requests", ai_rate_limited.clone());
        let ai_audio = Family::default();
        registry.register_with_unit(
            "ai_audio",
            "Seconds of audio the providers transcribed (what transcription is billed by)",
            Unit::Seconds,
            ai_audio.clone(),
        );
        let ai_tokens = Family::default();
        registry.register("ai_tokens", "Tokens the providers billed, by kind (prompt, completion)", ai_tokens.clone());
        Self { registry, stage_duration, stage_retries, ai_requests, ai_retries, ai_rate_limited, ai_audio, ai_tokens }
    }

    /// A stage that ran (at least one attempt) ended after `elapsed`; `succeeded` says how.
    pub fn stage_finished(&self, pipeline: &str, stage: &str, succeeded: bool, elapsed: Duration) {
        let outcome = if succeeded { "succeeded" } else { "failed" };
        let labels = StageLabels { pipeline: pipeline.to_string(), stage: stage.to_string(), outcome };
        self.stage_duration.get_or_create(&labels).observe(elapsed.as_secs_f64());
    }

    /// An attempt of a stage failed and will be tried again.
    pub fn stage_retried(&self, pipeline: &str, stage: &str) {
        let labels = StageIdLabels { pipeline: pipeline.to_string(), stage: stage.to_string() };
        self.stage_retries.get_or_create(&labels).inc();
    }

    /// A provider answered with `status` (`None`: no answer, a network error); `retrying` when it is sent again.
    pub fn ai_request(&self, provider: &str, kind: AiKind, status: Option<u16>, retrying: bool) {
        let status_text = status.map_or_else(|| "error".to_string(), |code| code.to_string());
        let labels = AiRequestLabels { provider: provider.to_string(), kind: kind.name(), status: status_text };
        self.ai_requests.get_or_create(&labels).inc();
        let labels = AiLabels { provider: provider.to_string(), kind: kind.name() };
        if status == Some(429) {
            self.ai_rate_limited.get_or_create(&labels).inc();
        }
        if retrying {
            self.ai_retries.get_or_create(&labels).inc();
        }
    }

    /// A provider transcribed `seconds` of audio.
    pub fn ai_audio_seconds(&self, provider: &str, seconds: f64) {
        if seconds.is_finite() && seconds > 0.0 {
            self.ai_audio.get_or_create(&ProviderLabels { provider: provider.to_string() }).inc_by(seconds);
        }
    }

    /// A provider billed tokens for a chat completion.
    pub fn ai_tokens(&self, provider: &str, prompt: u64, completion: u64) {
        for (kind, count) in [("prompt", prompt), ("completion", completion)] {
            if count > 0 {
                self.ai_tokens.get_or_create(&TokenLabels { provider: provider.to_string(), kind }).inc_by(count);
            }
        }
    }

    /// The exposition: this process's counters, then the queue's figures (`echo_queue_up 0` and no figures when
    /// the queue could not be read), then `# EOF`.
    pub fn render(&self, queue: Option<&QueueFigures>) -> String {
        let mut scrape = Registry::with_prefix("echo");
        let up = Gauge::<i64>::default();
        up.set(i64::from(queue.is_some()));
        scrape.register("queue_up", "Whether the queue answered this scrape", up);
        if let Some(figures) = queue {
            let jobs = Family::<StateLabels, Gauge>::default();
            for (state, count) in &figures.counts {
                jobs.get_or_create(&StateLabels { state }).set(i64::try_from(*count).unwrap_or(i64::MAX));
            }
            scrape.register("jobs", "Jobs the queue holds, by state", jobs);
            let depth = Gauge::<i64>::default();
            let waiting: u64 = figures
                .counts
                .iter()
                .filter(|(state, _)| matches!(*state, "waiting" | "delayed"))
                .map(|(_, count)| count)
                .sum();
            depth.set(i64::try_from(waiting).unwrap_or(i64::MAX));
            scrape.register("queue_depth", "Jobs not started yet (waiting and delayed)", depth);
            let paused = Gauge::<i64>::default();
            paused.set(i64::from(figures.paused));
            scrape.register("queue_paused", "Whether the queue is paused (1) or hands out jobs (0)", paused);
            let workers = Gauge::<i64>::default();
            workers.set(i64::try_from(figures.workers).unwrap_or(i64::MAX));
            scrape.register("workers", "Workers with a recent heartbeat", workers);
        }
        let mut text = String::new();
        // Writing into a String cannot fail; the encoder's errors are only the writer's.
        let _ = encode_registry(&mut text, &self.registry);
        let _ = encode_registry(&mut text, &scrape);
        let _ = encode_eof(&mut text);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_show_in_the_exposition_with_their_units_and_labels() {
        let metrics = Metrics::new();
        metrics.stage_finished("meeting", "transcript", true, Duration::from_millis(1500));
        metrics.stage_retried("meeting", "transcript");
        metrics.ai_request("azure", AiKind::Transcription, Some(429), true);
        metrics.ai_request("azure", AiKind::Transcription, Some(200), false);
        metrics.ai_audio_seconds("azure", 12.5);
        metrics.ai_tokens("azure", 100, 20);
        let figures =
            QueueFigures { counts: vec![("waiting", 3), ("delayed", 1), ("active", 2)], paused: false, workers: 1 };
        let text = metrics.render(Some(&figures));
        for line in [
            "echo_stage_duration_seconds_bucket{le=\"2.5\",pipeline=\"meeting\",stage=\"transcript\",outcome=\"succeeded\"} 1",
            "echo_stage_duration_seconds_count{pipeline=\"meeting\",stage=\"transcript\",outcome=\"succeeded\"} 1",
            "echo_stage_retries_total{pipeline=\"meeting\",stage=\"transcript\"} 1",
            "echo_ai_requests_total{provider=\"azure\",kind=\"transcription\",status=\"429\"} 1",
            "echo_ai_rate_limited_total{provider=\"azure\",kind=\"transcription\"} 1",
            "echo_ai_retries_total{provider=\"azure\",kind=\"transcription\"} 1",
            "echo_ai_audio_seconds_total{provider=\"azure\"} 12.5",
            "echo_ai_tokens_total{provider=\"azure\",kind=\"completion\"} 20",
            "echo_jobs{state=\"active\"} 2",
            "echo_queue_depth 4",
            "echo_queue_up 1",
            "# TYPE echo_stage_duration_seconds histogram",
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
        let down = metrics.render(None);
        assert!(down.contains("echo_queue_up 0") && !down.contains("echo_queue_depth"), "{down}");
    }
}
