//! Settings: built-in defaults, then `echo.toml` (or the file given by `--config`), then the environment
//! (ARCHITECTURE.md), merged with figment.
//!
//! The old deployment's variable names (`PORT`, `REDIS_URL`, `AZURE_OPENAI_API_KEY`, ...) work unchanged;
//! everything else is `ECHO_<SECTION>__<KEY>`, e.g. `ECHO_PATHS__PIPELINES`. Credentials are [`Secret`]s and
//! connection URLs are [`SecretUrl`]s: neither `Debug` nor serialization ever shows them, so
//! `echo-worker config` and the logs are safe to share.

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized};
use figment::value::{Uncased, UncasedStr};
use serde::{Deserialize, Deserializer, Serialize};

pub use crate::secret::{Secret, SecretUrl, redact_url, redacted_url, redacted_url_text};

/// The file read when `--config` is not given, if it exists.
pub const DEFAULT_CONFIG_FILE: &str = "echo.toml";

/// Environment names of the old deployment and the setting each one sets.
const LEGACY_ENV: [(&str, &str); 20] = [
    ("DATABASE_URL", "database.url"),
    ("PORT", "server.port"),
    ("ALLOWED_ORIGINS", "server.allowed_origins"),
    ("NODE_ENV", "environment"),
    ("LOG_LEVEL", "log_level"),
    ("REDIS_URL", "redis.url"),
    ("SUPABASE_URL", "supabase.url"),
    ("SUPABASE_SERVICE_ROLE_KEY", "supabase.service_role_key"),
    ("SUPABASE_JWT_SECRET", "supabase.jwt_secret"),
    ("AZURE_OPENAI_ENDPOINT", "azure_openai.endpoint"),
    ("AZURE_OPENAI_API_KEY", "azure_openai.api_key"),
    ("AZURE_OPENAI_API_VERSION", "azure_openai.api_version"),
    ("AZURE_OPENAI_WHISPER_ENDPOINT", "azure_openai.whisper_endpoint"),
    ("AZURE_OPENAI_WHISPER_API_KEY", "azure_openai.whisper_api_key"),
    ("AZURE_OPENAI_WHISPER_DEPLOYMENT", "azure_openai.whisper_deployment"),
    ("AZURE_OPENAI_GPT4O_MINI_DEPLOYMENT", "azure_openai.chat_deployment"),
    ("WORKER_CONCURRENCY", "worker.concurrency"),
    ("PROCESSING_TIMEOUT_MS", "worker.processing_timeout_ms"),
    ("MAX_FILE_SIZE_MB", "limits.max_file_size_mb"),
    ("TEMP_DIR", "paths.temp_dir"),
];

/// Why the settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `--config` named a file that does not exist.
    #[error("config file {} does not exist", .0.display())]
    MissingFile(PathBuf),
    /// Values have the wrong type or format; each line names the key and where it came from.
    #[error("invalid settings: {}", .0.join("; "))]
    Invalid(Vec<String>),
}

/// Every setting of the service.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    /// `NODE_ENV`: `development` or `production`.
    pub environment: String,
    /// `LOG_LEVEL`: a tracing filter such as `info` or `echo_worker=debug`.
    pub log_level: String,
    /// The HTTP API.
    pub server: ServerSettings,
    /// Where files live.
    pub paths: PathSettings,
    /// The Redis queue.
    pub redis: RedisSettings,
    /// Supabase storage and database.
    pub supabase: SupabaseSettings,
    /// Azure OpenAI.
    pub azure_openai: AzureOpenAiSettings,
    /// Job processing.
    pub worker: WorkerSettings,
    /// The job queue: leases, stalls, retries and retention.
    pub queue: QueueConfig,
    /// Input limits.
    pub limits: LimitSettings,
    /// Where recordings and results are stored.
    pub database: DatabaseSettings,
    /// Rules for fetching sources.
    pub download: DownloadSettings,
    /// AI providers beyond the seed's Azure variables.
    pub ai: AiSettings,
    /// Who may call the API: service tokens (Supabase user tokens are checked with `supabase.*`).
    #[serde(default)]
    pub auth: crate::auth::AuthSettings,
    /// Calls to a job's `callbackUrl` when it ends.
    #[serde(default)]
    pub callback: crate::callback::CallbackSettings,
    /// The old Node worker's routes (`/api/process-audio`).
    #[serde(default)]
    pub legacy: LegacySettings,
    /// Adjustments made while loading, to be logged once logging is up.
    #[serde(skip)]
    pub warnings: Vec<String>,
}

/// The HTTP API.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerSettings {
    /// Address to listen on.
    pub host: String,
    /// `PORT`.
    pub port: u16,
    /// `ALLOWED_ORIGINS`: CORS origins, comma-separated in the environment.
    #[serde(deserialize_with = "comma_list")]
    pub allowed_origins: Vec<String>,
    /// Largest request body the API reads; a larger one is answered 413.
    #[serde(default = "default_max_body_size")]
    pub max_body_size: crate::units::ByteSize,
    /// Requests one client (by IP address) may make per minute, in bursts up to the same number; 0 turns the
    /// limit off. Over it, the API answers 429 with `Retry-After`. `/health` is not counted.
    #[serde(default = "default_rate_limit")]
    pub rate_limit_per_minute: u32,
    /// Proxies in front of the API (addresses or CIDR ranges, comma-separated in the environment). A request that
    /// comes from one of them counts, for the rate limit, against the client its `X-Forwarded-For` names: the
    /// nearest address in it that is not itself a trusted proxy. Empty: the header is ignored (anyone can write
    /// it), and every client behind a proxy shares the proxy's address.
    #[serde(default, deserialize_with = "comma_list")]
    pub trusted_proxies: Vec<String>,
    /// Largest source `POST /api/process-direct` runs in the API process; a larger one is answered 413.
    #[serde(default = "default_direct_max_size")]
    pub direct_max_size: crate::units::ByteSize,
    /// Longest a `process-direct` run may take before it is stopped (answered 422).
    #[serde(default = "default_direct_timeout")]
    pub direct_timeout: crate::units::HumanDuration,
}

impl ServerSettings {
    /// `trusted_proxies` parsed.
    ///
    /// # Errors
    /// The first entry that is not an address or CIDR range, named.
    pub fn trusted_proxy_ranges(&self) -> Result<Vec<crate::net::IpRange>, String> {
        self.trusted_proxies.iter().map(|entry| entry.parse()).collect()
    }
}

/// 25 MB: what the transcription API takes in one request, so a direct run is one chunk, a minute or two.
fn default_direct_max_size() -> crate::units::ByteSize {
    crate::units::ByteSize(25_000_000)
}

/// Five minutes: longer than a 25 MB recording needs, shorter than the timeouts of most HTTP clients and
/// proxies in front of the API.
fn default_direct_timeout() -> crate::units::HumanDuration {
    crate::units::HumanDuration(std::time::Duration::from_secs(300))
}

/// One mebibyte: a job request is a few hundred bytes, a batch of a thousand ids about 40 KB, a pipeline file a
/// few KB.
fn default_max_body_size() -> crate::units::ByteSize {
    crate::units::ByteSize(1024 * 1024)
}

/// Ten requests a second on average, with room for a page that polls several jobs at once.
const fn default_rate_limit() -> u32 {
    600
}

/// Where files live.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PathSettings {
    /// Folder of pipeline files.
    pub pipelines: PathBuf,
    /// Folder of plugin files.
    pub plugins: PathBuf,
    /// `TEMP_DIR`: where jobs get their work directories.
    pub temp_dir: PathBuf,
    /// Local paths that arrive through the API or the queue must be under this folder.
    pub storage_root: PathBuf,
}

/// Where recordings and results are stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatabaseSettings {
    /// `DATABASE_URL`: `sqlite://FILE` or `postgres://…`.
    pub url: SecretUrl,
    /// The recordings table (`schema.table` on PostgreSQL).
    pub table: String,
    /// `echo` (the store's own table, created at start) or `supabase-legacy` (the live frontend's
    /// `recordings` table: never created or altered; see README "Replacing the Node worker").
    #[serde(default)]
    pub profile: crate::store::Profile,
    /// Field → column overrides laid over the profile's mapping (`""` leaves a field out), e.g.
    /// `ECHO_DATABASE__COLUMNS__PROGRESS=pct`.
    #[serde(default)]
    pub columns: indexmap::IndexMap<String, String>,
}

impl DatabaseSettings {
    /// The store layout these settings describe.
    ///
    /// # Errors
    /// A message naming an unknown field or a bad column name.
    pub fn layout(&self) -> Result<crate::store::Layout, crate::store::layout::LayoutError> {
        crate::store::Layout::with_overrides(self.profile, &self.columns)
    }
}

/// AI providers.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AiSettings {
    /// The provider stages use when they name none (default: `azure` when configured, else the first).
    pub default_provider: Option<String>,
    /// Named providers, e.g. `[ai.providers.local]` or `ECHO_AI__PROVIDERS__LOCAL__ENDPOINT`.
    #[serde(default)]
    pub providers: indexmap::IndexMap<String, crate::ai::ProviderSettings>,
}

/// The old Node worker's routes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LegacySettings {
    /// The pipeline `POST /api/process-audio` runs (default: `soundscribe` with `database.profile =
    /// "supabase-legacy"`, else `default`).
    pub pipeline: Option<String>,
    /// Let `POST /api/process-audio` through without a token even when auth is configured, as the old worker
    /// did: the live frontend sends none. Such a call can only start the processing of a row that already
    /// exists, from the `file_url` stored in that row (never one from the body); every other route still needs
    /// a token. Off by default; `render.yaml` turns it on for the frontend.
    #[serde(default)]
    pub open_process_audio: bool,
}

impl LegacySettings {
    /// The pipeline `/api/process-audio` runs under `profile`.
    pub fn pipeline(&self, profile: crate::store::Profile) -> &str {
        match (&self.pipeline, profile) {
            (Some(name), _) => name,
            (None, crate::store::Profile::SupabaseLegacy) => "soundscribe",
            (None, crate::store::Profile::Echo) => "default",
        }
    }
}

/// Rules for fetching sources.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DownloadSettings {
    /// Internal addresses or CIDR ranges, optionally with a port (`127.0.0.1:9000`), that sources and http
    /// plugins may reach (comma-separated in the environment).
    #[serde(deserialize_with = "comma_list")]
    pub allow_private: Vec<String>,
    /// Redirects followed per request.
    pub max_redirects: usize,
}

/// Redis: the queue, and request limits shared by every worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RedisSettings {
    /// `REDIS_URL`; without it the queue and the AI request limits stay in-process.
    pub url: Option<SecretUrl>,
    /// Prefix of every key this deployment writes, so several deployments can share one Redis.
    pub prefix: String,
    /// `url` names nodes of a Redis Cluster (implied when it lists several, separated by commas).
    #[serde(default)]
    pub cluster: bool,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self { url: None, prefix: "echo:".into(), cluster: false }
    }
}

/// Supabase storage and database.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SupabaseSettings {
    /// `SUPABASE_URL`: the project URL.
    #[serde(serialize_with = "redacted_url")]
    pub url: Option<String>,
    /// `SUPABASE_SERVICE_ROLE_KEY`.
    pub service_role_key: Option<Secret>,
    /// `SUPABASE_JWT_SECRET`: the project's JWT secret; with it the API accepts users' HS256 access tokens.
    #[serde(default)]
    pub jwt_secret: Option<Secret>,
    /// Where the project publishes its asymmetric signing keys (default: `<url>/auth/v1/.well-known/jwks.json`
    /// when `url` is set); with it the API accepts users' RS256 / ES256 access tokens.
    #[serde(default, serialize_with = "redacted_url")]
    pub jwks_url: Option<String>,
}

/// Azure OpenAI, as the old deployment configured it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AzureOpenAiSettings {
    /// `AZURE_OPENAI_ENDPOINT`: the resource origin, e.g. `https://name.openai.azure.com`.
    #[serde(serialize_with = "redacted_url")]
    pub endpoint: Option<String>,
    /// `AZURE_OPENAI_API_KEY`.
    pub api_key: Option<Secret>,
    /// `AZURE_OPENAI_API_VERSION`.
    pub api_version: String,
    /// `AZURE_OPENAI_WHISPER_ENDPOINT`: a separate resource for transcription (default: `endpoint`).
    #[serde(serialize_with = "redacted_url")]
    pub whisper_endpoint: Option<String>,
    /// `AZURE_OPENAI_WHISPER_API_KEY` (default: `api_key`).
    pub whisper_api_key: Option<Secret>,
    /// `AZURE_OPENAI_WHISPER_DEPLOYMENT`.
    pub whisper_deployment: String,
    /// `AZURE_OPENAI_GPT4O_MINI_DEPLOYMENT`: the chat deployment.
    pub chat_deployment: String,
}

/// Job processing.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSettings {
    /// `WORKER_CONCURRENCY`: jobs one process runs at once.
    pub concurrency: u32,
    /// `PROCESSING_TIMEOUT_MS`: deadline for a whole job, in milliseconds.
    pub processing_timeout_ms: u64,
    /// Stages of one job that may run at once.
    pub max_parallel_stages: usize,
    /// After SIGTERM or SIGINT, how long running jobs may go on before they are stopped and handed back to the
    /// queue for another worker.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace: crate::units::HumanDuration,
}

/// Thirty seconds: most stages finish or reach a checkpoint within it, and orchestrators (Kubernetes, systemd)
/// wait about that long between SIGTERM and SIGKILL.
fn default_shutdown_grace() -> crate::units::HumanDuration {
    crate::units::HumanDuration(std::time::Duration::from_secs(30))
}

/// The job queue (`queue.*`); defaults from [`crate::queue::QueueSettings::default`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueueConfig {
    /// The queue's name: its Redis keys are `<redis.prefix>{<name>}:…`, so it is also their hash tag.
    pub name: String,
    /// A lease lasts this long unless renewed; a dead worker's job is taken again within about this long.
    pub lease: crate::units::HumanDuration,
    /// Times a job's lease may expire before the job fails.
    pub max_stalls: u32,
    /// Attempts of a job in all (`enqueue`), the first included.
    pub max_attempts: u32,
    /// First retry backoff, doubled per attempt.
    pub backoff: crate::units::HumanDuration,
    /// Longest retry backoff.
    pub max_backoff: crate::units::HumanDuration,
    /// Completed jobs are kept this long…
    pub keep_completed_for: crate::units::HumanDuration,
    /// …and at most this many.
    pub keep_completed: u64,
    /// Failed and cancelled jobs are kept this long…
    pub keep_failed_for: crate::units::HumanDuration,
    /// …and at most this many.
    pub keep_failed: u64,
    /// Events kept in the stream (approximately).
    pub max_events: u64,
    /// Log lines kept per job.
    pub max_log_lines: u64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        let queue = crate::queue::QueueSettings::default();
        let human = crate::units::HumanDuration;
        Self {
            name: "jobs".into(),
            lease: human(queue.lease),
            max_stalls: queue.max_stalls,
            max_attempts: 3,
            backoff: human(queue.backoff),
            max_backoff: human(queue.max_backoff),
            keep_completed_for: human(queue.keep_completed_for),
            keep_completed: queue.keep_completed,
            keep_failed_for: human(queue.keep_failed_for),
            keep_failed: queue.keep_failed,
            max_events: queue.max_events,
            max_log_lines: queue.max_log_lines,
        }
    }
}

impl QueueConfig {
    /// The settings the queue backends take.
    pub fn settings(&self) -> crate::queue::QueueSettings {
        crate::queue::QueueSettings {
            lease: self.lease.0.max(std::time::Duration::from_millis(100)),
            max_stalls: self.max_stalls,
            backoff: self.backoff.0,
            max_backoff: self.max_backoff.0,
            keep_completed_for: self.keep_completed_for.0,
            keep_completed: self.keep_completed,
            keep_failed_for: self.keep_failed_for.0,
            keep_failed: self.keep_failed,
            max_events: self.max_events,
            max_log_lines: self.max_log_lines,
        }
    }
}

/// Input limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LimitSettings {
    /// `MAX_FILE_SIZE_MB`: largest accepted upload, in mebibytes (MiB, as the old worker counted).
    pub max_file_size_mb: u64,
    /// Largest body read from an `http` plugin's server or an AI provider's reply; a larger one fails the stage.
    pub max_response_size: crate::units::ByteSize,
    /// Longest recording `validate` accepts (unless a stage sets its own `max_duration`), judged by the
    /// duration the file declares, before anything is downloaded or paid for.
    pub max_duration: crate::units::HumanDuration,
}

pub use crate::bounded::DEFAULT_MAX_RESPONSE_SIZE;
pub use crate::stage::builtin::validate::DEFAULT_MAX_DURATION;

impl Default for Settings {
    fn default() -> Self {
        Self {
            environment: "development".into(),
            log_level: "info".into(),
            server: ServerSettings {
                host: "0.0.0.0".into(),
                port: 3001,
                allowed_origins: Vec::new(),
                max_body_size: default_max_body_size(),
                rate_limit_per_minute: default_rate_limit(),
                trusted_proxies: Vec::new(),
                direct_max_size: default_direct_max_size(),
                direct_timeout: default_direct_timeout(),
            },
            paths: PathSettings {
                pipelines: "pipelines".into(),
                plugins: "plugins".into(),
                temp_dir: std::env::temp_dir(),
                storage_root: "storage".into(),
            },
            redis: RedisSettings::default(),
            supabase: SupabaseSettings::default(),
            azure_openai: AzureOpenAiSettings {
                endpoint: None,
                api_key: None,
                // The version the old worker used, known to serve both transcription and chat.
                api_version: "2024-10-01-preview".into(),
                whisper_endpoint: None,
                whisper_api_key: None,
                whisper_deployment: "whisper".into(),
                chat_deployment: "gpt-4o-mini".into(),
            },
            // Three jobs at once keeps a 2-core machine busy without starving ffmpeg.
            worker: WorkerSettings {
                concurrency: 3,
                processing_timeout_ms: 3_600_000,
                max_parallel_stages: 4,
                shutdown_grace: default_shutdown_grace(),
            },
            queue: QueueConfig::default(),
            limits: LimitSettings {
                max_file_size_mb: 500,
                max_response_size: DEFAULT_MAX_RESPONSE_SIZE,
                max_duration: DEFAULT_MAX_DURATION,
            },
            database: DatabaseSettings {
                url: SecretUrl::new("sqlite://echo.db"),
                table: "recordings".into(),
                profile: crate::store::Profile::Echo,
                columns: indexmap::IndexMap::new(),
            },
            download: DownloadSettings { allow_private: Vec::new(), max_redirects: 5 },
            ai: AiSettings::default(),
            auth: crate::auth::AuthSettings::default(),
            callback: crate::callback::CallbackSettings::default(),
            legacy: LegacySettings::default(),
            warnings: Vec::new(),
        }
    }
}

impl Settings {
    /// Loads defaults, then the config file, then the environment.
    ///
    /// `config` is the `--config` path; without it `echo.toml` is read if it exists.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file or variable with a bad value.
    pub fn load(config: Option<&Path>) -> Result<Self, ConfigError> {
        Self::from_figment(Self::figment(config)?)
    }

    /// The merged sources, before extraction.
    ///
    /// # Errors
    /// [`ConfigError::MissingFile`] when `config` does not exist.
    pub fn figment(config: Option<&Path>) -> Result<Figment, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Self::default()));
        match config {
            Some(path) if !path.is_file() => return Err(ConfigError::MissingFile(path.to_path_buf())),
            Some(path) => figment = figment.merge(TomlFile::file_exact(path)),
            None if Path::new(DEFAULT_CONFIG_FILE).is_file() => {
                figment = figment.merge(TomlFile::file_exact(DEFAULT_CONFIG_FILE));
            }
            None => {}
        }
        let names: Vec<&str> = LEGACY_ENV.iter().map(|(name, _)| *name).collect();
        Ok(figment.merge(Env::raw().only(&names).map(legacy_key)).merge(Env::prefixed("ECHO_").split("__")))
    }

    /// Extracts settings from a figment and normalises them.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the key and its source.
    pub fn from_figment(figment: Figment) -> Result<Self, ConfigError> {
        let mut settings: Self = with_azure_seed(figment).extract().map_err(describe)?;
        for endpoint in [&mut settings.azure_openai.endpoint, &mut settings.azure_openai.whisper_endpoint] {
            if let Some(url) = endpoint
                && let Some((origin, whole)) = origin_of(url)
                && whole
            {
                settings.warnings.push(format!(
                    "an Azure OpenAI endpoint held a whole URL (path, query or credentials); using its origin \
                     {origin} (set only the origin)"
                ));
                *url = origin;
            }
        }
        Ok(settings)
    }

    /// The engine's limits from these settings.
    pub fn engine(&self) -> crate::engine::EngineSettings {
        crate::engine::EngineSettings {
            work_root: self.paths.temp_dir.clone(),
            max_parallel_stages: self.worker.max_parallel_stages.max(1),
            job_timeout: std::time::Duration::from_millis(self.worker.processing_timeout_ms),
            ..crate::engine::EngineSettings::default()
        }
    }

    /// The rules for reaching sources.
    ///
    /// # Errors
    /// A message naming an `allow_private` entry that is not an address or CIDR range (with an optional port).
    pub fn source_policy(&self) -> Result<crate::source::SourcePolicy, String> {
        Ok(crate::source::SourcePolicy {
            storage_root: self.paths.storage_root.clone(),
            allow_private: self.download.allow_private.iter().map(|range| range.parse()).collect::<Result<_, _>>()?,
            supabase_url: self.supabase.url.clone(),
            supabase_key: self.supabase.service_role_key.clone(),
            max_redirects: self.download.max_redirects,
        })
    }

    /// Every AI provider: the ones under `[ai.providers]`, plus `azure` from the seed's `AZURE_OPENAI_*`
    /// variables when the endpoint and key are set (unless `[ai.providers.azure]` exists). Returns the
    /// providers and the default one's name.
    pub fn providers(&self) -> (indexmap::IndexMap<String, crate::ai::ProviderSettings>, Option<String>) {
        let mut providers = self.ai.providers.clone();
        let azure = &self.azure_openai;
        if let (Some(endpoint), Some(key)) = (&azure.endpoint, &azure.api_key)
            && !providers.contains_key("azure")
        {
            let mut seed =
                crate::ai::ProviderSettings::new(crate::ai::ProviderStyle::Azure, endpoint.clone(), Some(key.clone()));
            seed.api_version = azure.api_version.clone();
            seed.transcription_endpoint = azure.whisper_endpoint.clone();
            seed.transcription_api_key = azure.whisper_api_key.clone();
            seed.transcription_model = azure.whisper_deployment.clone();
            seed.chat_model = azure.chat_deployment.clone();
            // Azure's default Whisper quota is 3 requests a minute.
            seed.transcription_rpm = Some(3);
            providers.insert("azure".into(), seed);
        }
        for provider in providers.values_mut() {
            provider.max_response_size = self.limits.max_response_size;
        }
        let default = self
            .ai
            .default_provider
            .clone()
            .or_else(|| providers.contains_key("azure").then(|| "azure".to_string()))
            .or_else(|| providers.keys().next().cloned());
        (providers, default)
    }

    /// Who may call the API: the service tokens of `auth`, and Supabase user tokens checked with
    /// `SUPABASE_JWT_SECRET` and with the key set at `supabase.jwks_url` (derived from `SUPABASE_URL` unless
    /// set).
    pub fn auth(&self) -> crate::auth::AuthConfig {
        let derived = self
            .supabase
            .url
            .as_deref()
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(|url| format!("{}/auth/v1/.well-known/jwks.json", url.trim_end_matches('/')));
        let explicit = self.supabase.jwks_url.as_deref().map(str::trim).filter(|url| !url.is_empty());
        crate::auth::AuthConfig {
            tokens: self.auth.tokens.clone(),
            read_only_tokens: self.auth.read_only_tokens.clone(),
            jwt_secret: self.supabase.jwt_secret.clone().filter(|secret| !secret.expose().is_empty()),
            jwks_url: explicit.map(str::to_string).or(derived),
            jwks_refresh_interval: self.auth.jwks_refresh_interval.0,
        }
    }

    /// The largest accepted source: `MAX_FILE_SIZE_MB` counts mebibytes (× 1024 × 1024), as the old worker's
    /// `fileHandler.js` did, so every upload it accepted is accepted here too.
    pub fn max_file_size(&self) -> crate::units::ByteSize {
        crate::units::ByteSize(self.limits.max_file_size_mb.saturating_mul(1024 * 1024))
    }

    /// The settings as TOML, with every secret redacted.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|error| format!("# settings could not be printed: {error}\n"))
    }
}

/// Lays whatever is set under `ai.providers.azure` over the provider built from the seed's `AZURE_OPENAI_*`
/// variables, so that `ECHO_AI__PROVIDERS__AZURE__TRANSCRIPTION_RPM=50` alone raises the seed's limit of 3 Whisper
/// requests a minute instead of failing for want of the other fields. Without the seed's endpoint and key the
/// figment is returned as it is.
fn with_azure_seed(figment: Figment) -> Figment {
    // A bad value in `azure_openai` is reported by the extraction that follows, with its source.
    let Ok(azure) = figment.extract_inner::<AzureOpenAiSettings>("azure_openai") else { return figment };
    let (Some(endpoint), Some(key)) = (&azure.endpoint, &azure.api_key) else { return figment };
    let origin = |url: &String| origin_of(url).map_or_else(|| url.clone(), |(origin, _)| origin);
    let mut seed = serde_json::json!({
        "style": "azure",
        "endpoint": origin(endpoint),
        "api_key": key.expose(),
        "api_version": azure.api_version,
        "transcription_model": azure.whisper_deployment,
        "chat_model": azure.chat_deployment,
        // Azure's default Whisper quota is 3 requests a minute.
        "transcription_rpm": 3,
    });
    if let Some(url) = &azure.whisper_endpoint {
        seed["transcription_endpoint"] = origin(url).into();
    }
    if let Some(key) = &azure.whisper_api_key {
        seed["transcription_api_key"] = key.expose().into();
    }
    // `join`: values already in the figment (the operator's) win, field by field.
    figment.join(Serialized::default("ai.providers.azure", seed))
}

/// One line per figment error: the setting, what is wrong, and the variable or file it came from.
fn describe(error: figment::Error) -> ConfigError {
    ConfigError::Invalid(
        error
            .into_iter()
            .map(|error| {
                let key = error.path.join(".");
                let from_env = error.metadata.as_ref().is_some_and(|m| m.name.contains("environment"));
                let nested = format!("ECHO_{}", key.to_uppercase().replace('.', "__"));
                let source = match LEGACY_ENV.iter().find(|(_, setting)| *setting == key) {
                    Some((variable, _)) if from_env => format!("environment variable {variable} or {nested}"),
                    None if from_env => format!("environment variable {nested}"),
                    _ => error.metadata.as_ref().map_or_else(
                        || "defaults".to_string(),
                        |m| {
                            m.source
                                .as_ref()
                                .map_or_else(|| m.name.to_string(), |source| format!("{} {source}", m.name))
                        },
                    ),
                };
                format!("`{key}`: {} (from {source})", error.kind)
            })
            .collect(),
    )
}

fn legacy_key(name: &UncasedStr) -> Uncased<'_> {
    LEGACY_ENV
        .iter()
        .find(|(legacy, _)| UncasedStr::new(legacy) == name)
        .map_or_else(|| name.into(), |(_, key)| Uncased::from_borrowed(key))
}

/// `scheme://host[:port]` of a URL, dropping any credentials, path, query and fragment, and whether there was
/// any of those to drop.
fn origin_of(text: &str) -> Option<(String, bool)> {
    let url = reqwest::Url::parse(text.trim()).ok()?;
    let host = url.host_str().filter(|host| !host.is_empty())?;
    let port = url.port().map(|port| format!(":{port}")).unwrap_or_default();
    let origin = format!("{}://{host}{port}", url.scheme());
    let whole = !url.username().is_empty()
        || url.password().is_some()
        || !matches!(url.path(), "" | "/")
        || url.query().is_some()
        || url.fragment().is_some();
    Some((origin, whole))
}

/// Accepts a list, or a comma-separated string as environment variables give.
fn comma_list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrString {
        List(Vec<String>),
        Text(String),
    }
    Ok(match ListOrString::deserialize(deserializer)? {
        ListOrString::List(items) => items,
        ListOrString::Text(text) => {
            text.split(',').map(str::trim).filter(|item| !item.is_empty()).map(str::to_string).collect()
        }
    })
}

/// TOML files for figment, parsed with the same `toml` crate as the rest of the crate.
struct TomlFile;

impl Format for TomlFile {
    type Error = toml::de::Error;
    const NAME: &'static str = "TOML";

    fn from_str<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, Self::Error> {
        toml::from_str(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_settings_take_comma_lists_and_derive_the_key_set_url() {
        // Values as the environment gives them: strings.
        let figment = Figment::from(Serialized::defaults(Settings::default()))
            .merge(Serialized::default("auth.tokens", "tok-a, tok-b"))
            .merge(Serialized::default("auth.read_only_tokens", "tok-c"))
            .merge(Serialized::default("supabase.jwt_secret", "jwt-secret-value"))
            .merge(Serialized::default("supabase.url", "https://proj.supabase.co/"));
        let settings = Settings::from_figment(figment.clone()).unwrap();
        let auth = settings.auth();
        let tokens: Vec<_> = auth.tokens.iter().map(Secret::expose).collect();
        assert_eq!(tokens, ["tok-a", "tok-b"]);
        assert_eq!(auth.read_only_tokens.len(), 1);
        assert_eq!(auth.jwt_secret.as_ref().map(Secret::expose), Some("jwt-secret-value"));
        assert_eq!(auth.jwks_url.as_deref(), Some("https://proj.supabase.co/auth/v1/.well-known/jwks.json"));
        let printed = settings.to_toml();
        for secret in ["tok-a", "tok-b", "tok-c", "jwt-secret-value"] {
            assert!(!printed.contains(secret), "{secret} printed:\n{printed}");
        }
        let settings = Settings::from_figment(
            figment.merge(Serialized::default("supabase.jwks_url", "http://127.0.0.1:9999/keys.json")),
        )
        .unwrap();
        assert_eq!(settings.auth().jwks_url.as_deref(), Some("http://127.0.0.1:9999/keys.json"));
        assert!(crate::auth::Authenticator::new(Settings::default().auth()).is_open(), "no settings: open");
    }

    #[test]
    fn endpoints_are_reduced_to_origins() {
        assert_eq!(
            origin_of("https://x.openai.azure.com/openai/deployments/w/audio?api-version=1"),
            Some(("https://x.openai.azure.com".to_string(), true))
        );
        assert_eq!(origin_of("https://x.openai.azure.com/"), Some(("https://x.openai.azure.com".to_string(), false)));
        assert_eq!(origin_of("http://127.0.0.1:8080"), Some(("http://127.0.0.1:8080".to_string(), false)));
        assert_eq!(origin_of("not a url"), None);
    }

    #[test]
    fn a_password_with_a_slash_or_a_user_name_token_never_prints() {
        const MARKER: &str = "marker-secret-5a";
        for url in [
            format!("redis://user:pa/ss-{MARKER}@cache:6379/0"),
            format!("postgres://app:x{MARKER}/y@db/app"),
            format!("https://{MARKER}@x.openai.azure.com/"),
            format!("https://user:{MARKER}@x.openai.azure.com/path?key={MARKER}#{MARKER}"),
            format!("redis://:p@ss{MARKER}@cache"),
        ] {
            let printed = SecretUrl::new(url.clone()).redacted();
            assert!(!printed.contains(MARKER), "{url} printed as {printed}");
        }
        assert_eq!(
            redact_url(&format!("https://user:{MARKER}@h.example/v1?k={MARKER}")),
            "https://user:[redacted]@h.example/v1?[redacted]"
        );
        assert_eq!(redact_url(&format!("https://{MARKER}@h.example/v1")), "https://[redacted]@h.example/v1");
        assert_eq!(SecretUrl::new("sqlite::memory:").redacted(), "sqlite::memory:");
        assert_eq!(SecretUrl::new(format!("app:{MARKER}@db/app")).redacted(), "[redacted]", "no scheme: not shown");
        assert_eq!(SecretUrl::new("sqlite://echo.db").redacted(), "sqlite://echo.db", "the default prints as is");
        let (origin, whole) = origin_of(&format!("https://user:{MARKER}@x.openai.azure.com")).unwrap();
        assert_eq!((origin.as_str(), whole), ("https://x.openai.azure.com", true), "credentials are dropped");
    }
}
