//! Wiring: turns [`Settings`] into the parts a process runs with (the store, the source fetcher, the stage
//! registry). Errors here are start-up errors for a person to fix, so this module speaks `anyhow`.

use std::sync::Arc;

use anyhow::Context as _;

use crate::ai::Providers;
use crate::config::Settings;
use crate::engine::{Kinds, StageRegistry};
use crate::net::{AddressPolicy, HttpClient};
use crate::plugin::Plugin;
use crate::source::Fetcher;
use crate::stage::builtin::{
    BuiltinKind, analyze::AnalyzeStage, download::DownloadStage, persist::PersistStage, transcode::TranscodeStage,
    validate::ValidateStage, whisper::WhisperStage,
};
use crate::store::{SqlStore, Store};

/// Connects to `DATABASE_URL` with the configured layout, creating the recordings table when the layout owns it.
///
/// # Errors
/// When the URL is unusable or the database cannot be reached.
pub async fn store(settings: &Settings) -> anyhow::Result<Arc<SqlStore>> {
    let url = &settings.database.url;
    let layout = settings.database.layout().context("reading database.profile and database.columns")?;
    let store = SqlStore::connect_with(url.expose(), &settings.database.table, layout)
        .await
        .with_context(|| format!("opening the store at {}", url.redacted()))?;
    Ok(Arc::new(store))
}

/// Time allowed to reach Redis at start-up.
const REDIS_CONNECT: std::time::Duration = std::time::Duration::from_secs(10);

/// A reconnecting Redis connection.
///
/// # Errors
/// When the URL is invalid or Redis does not answer within 10 s.
pub async fn redis_connection(url: &crate::secret::SecretUrl) -> anyhow::Result<redis::aio::ConnectionManager> {
    let client = redis::Client::open(url.expose()).with_context(|| format!("reading REDIS_URL {}", url.redacted()))?;
    tokio::time::timeout(REDIS_CONNECT, client.get_connection_manager())
        .await
        .map_err(|_| anyhow::anyhow!("Redis at {} did not answer within {REDIS_CONNECT:?}", url.redacted()))?
        .with_context(|| format!("connecting to Redis at {}", url.redacted()))
}

/// Every stage kind this process can run: the builtins available so far and the catalog's runnable plugins.
///
/// # Errors
/// When the download allow-list has an entry that is not an address or range, or HTTP cannot be set up.
pub async fn registry<'a>(
    settings: &Settings,
    plugins: impl IntoIterator<Item = &'a Plugin>,
    store: Arc<dyn Store>,
) -> anyhow::Result<StageRegistry> {
    Ok(kinds(settings, store).await?.registry(plugins))
}

/// The builtin stage kinds and what plugins need to run, for registries made per job (a worker runs the plugin
/// files each job carries).
///
/// # Errors
/// As [`registry`].
pub async fn kinds(settings: &Settings, store: Arc<dyn Store>) -> anyhow::Result<Kinds> {
    let policy = settings.source_policy().map_err(anyhow::Error::msg).context("reading download.allow_private")?;
    // Plugins get the same allow-list (and redirect limit) as sources, without the Supabase trust.
    let plugin_addresses = AddressPolicy { allow: policy.allow_private.clone(), trusted: Vec::new() };
    let http =
        HttpClient::new(plugin_addresses, policy.max_redirects).context("building the HTTP client for plugins")?;
    let fetcher = Fetcher::new(policy).context("building the HTTP client for sources")?;
    let (providers, default) = settings.providers();
    let redis = match &settings.redis.url {
        // The windows' keys share the `{ratelimit}` hash tag, so on a cluster one node holds them all.
        Some(url) if settings.redis.cluster || url.expose().contains(',') => {
            let options = crate::queue::redis::RedisOptions::new(url, true, &settings.redis.prefix, "ratelimit");
            let key = format!("{}{{ratelimit}}:", settings.redis.prefix);
            let connection =
                tokio::time::timeout(REDIS_CONNECT, crate::queue::redis::connection_for_key(&options, &key))
                    .await
                    .map_err(|_| anyhow::anyhow!("Redis Cluster did not answer within {REDIS_CONNECT:?}"))??;
            Some((connection, settings.redis.prefix.clone()))
        }
        Some(url) => Some((redis_connection(url).await?, settings.redis.prefix.clone())),
        None => None,
    };
    let providers = Arc::new(Providers::new(providers, default, redis).map_err(anyhow::Error::msg)?);
    let ai = (!providers.is_empty()).then(|| providers.clone());
    let mut registry = StageRegistry::new();
    let max = settings.max_file_size();
    let validate = ValidateStage::new(fetcher.clone(), max).with_max_duration(settings.limits.max_duration);
    registry.register(BuiltinKind::Validate.name(), Arc::new(validate));
    registry.register(BuiltinKind::Download.name(), Arc::new(DownloadStage::new(fetcher, max)));
    registry.register(BuiltinKind::Transcode.name(), Arc::new(TranscodeStage));
    registry.register(BuiltinKind::Persist.name(), Arc::new(PersistStage::new(store)));
    if let Some(providers) = &ai {
        registry.register(BuiltinKind::Whisper.name(), Arc::new(WhisperStage::new(providers.clone())));
        registry.register(BuiltinKind::Analyze.name(), Arc::new(AnalyzeStage::new(providers.clone())));
    }
    Ok(Kinds::new(registry, http, ai, settings.limits.max_response_size))
}

/// Settings a pipeline needs before it can run: an AI provider for `whisper`, `analyze` and `prompt` plugins.
///
/// # Errors
/// A message naming the stages and the variables to set.
pub fn check_requirements(
    settings: &Settings,
    pipeline: &crate::pipeline::Pipeline,
    plugins: &indexmap::IndexMap<String, Plugin>,
) -> anyhow::Result<()> {
    let needs_ai: Vec<String> = pipeline
        .stages
        .iter()
        .filter(|stage| match &stage.uses {
            crate::stage::StageKind::Builtin(kind) => matches!(kind, BuiltinKind::Whisper | BuiltinKind::Analyze),
            crate::stage::StageKind::Plugin(name) => {
                plugins.get(name).is_some_and(|plugin| matches!(plugin.action, crate::plugin::PluginAction::Prompt(_)))
            }
            crate::stage::StageKind::Custom(_) => false,
        })
        .map(|stage| format!("`{}` ({})", stage.id, stage.uses))
        .collect();
    if !needs_ai.is_empty() && settings.providers().0.is_empty() {
        anyhow::bail!(
            "pipeline `{}` needs an AI provider for {}: set AZURE_OPENAI_ENDPOINT and AZURE_OPENAI_API_KEY, or configure \
             [ai.providers.NAME] (ECHO_AI__PROVIDERS__NAME__STYLE, __ENDPOINT, __API_KEY)",
            pipeline.name,
            needs_ai.join(", ")
        );
    }
    Ok(())
}

/// The sender of job callbacks: `callback.*` settings, the download allow-list (without the Supabase trust).
///
/// # Errors
/// When an `allow_private` entry is not an address or range, or HTTP cannot be set up.
pub fn callbacks(settings: &Settings) -> anyhow::Result<crate::callback::Callbacks> {
    let allow = settings.source_policy().map_err(anyhow::Error::msg).context("reading download.allow_private")?;
    let policy = AddressPolicy { allow: allow.allow_private, trusted: Vec::new() };
    if settings.callback.secret.is_none() {
        tracing::info!("callback.secret is not set: jobs' callbackUrl calls are not sent (set ECHO_CALLBACK__SECRET)");
    }
    Ok(crate::callback::Callbacks::new(settings.callback.clone(), policy)?)
}

/// Where the Redis queue lives, from `REDIS_URL`, `redis.cluster`, `redis.prefix` and `queue.name`; `None`
/// without `REDIS_URL`.
pub fn queue_options(settings: &Settings) -> Option<crate::queue::redis::RedisOptions> {
    let url = settings.redis.url.as_ref()?;
    Some(crate::queue::redis::RedisOptions::new(
        url,
        settings.redis.cluster,
        &settings.redis.prefix,
        &settings.queue.name,
    ))
}

/// The Redis queue that workers read, for the commands that enqueue and inspect jobs.
///
/// # Errors
/// Without `REDIS_URL` (the in-process queue of another process cannot be reached), or when Redis does not
/// answer.
pub async fn queue(settings: &Settings) -> anyhow::Result<Arc<crate::queue::redis::RedisQueue>> {
    let Some(options) = queue_options(settings) else {
        anyhow::bail!(
            "no REDIS_URL: this command works on the Redis queue that workers read; set REDIS_URL (e.g. \
             redis://127.0.0.1:6379) to the same Redis as the workers"
        );
    };
    let queue =
        crate::queue::redis::RedisQueue::connect(&options, settings.queue.settings()).await.with_context(|| {
            format!(
                "connecting to the queue at {}",
                settings.redis.url.as_ref().map(|u| u.redacted()).unwrap_or_default()
            )
        })?;
    Ok(Arc::new(queue))
}
