//! Wiring: turns [`Settings`] into the parts a process runs with (the store, the source fetcher, the stage
//! registry). Errors here are start-up errors for a person to fix, so this module speaks `anyhow`.

use std::sync::Arc;

use anyhow::Context as _;

use crate::config::Settings;
use crate::plugin::Plugin;
use crate::source::Fetcher;
use crate::stage::StageRegistry;
use crate::stage::builtin::{
    BuiltinKind, download::DownloadStage, persist::PersistStage, transcode::TranscodeStage, validate::ValidateStage,
};
use crate::store::{SqlStore, Store};

/// Connects to `DATABASE_URL` and creates the recordings table when missing.
///
/// # Errors
/// When the URL is unusable or the database cannot be reached.
pub async fn store(settings: &Settings) -> anyhow::Result<Arc<SqlStore>> {
    let url = &settings.database.url;
    let store = SqlStore::connect(url.expose(), &settings.database.table)
        .await
        .with_context(|| format!("opening the store at {}", url.redacted()))?;
    Ok(Arc::new(store))
}

/// Every stage kind this process can run: the builtins available so far and the catalog's runnable plugins.
///
/// # Errors
/// When the download allow-list has an entry that is not an address or range, or HTTP cannot be set up.
pub fn registry<'a>(
    settings: &Settings,
    plugins: impl IntoIterator<Item = &'a Plugin>,
    store: Arc<dyn Store>,
) -> anyhow::Result<StageRegistry> {
    let policy = settings.source_policy().map_err(anyhow::Error::msg).context("reading download.allow_private")?;
    let fetcher = Fetcher::new(policy).context("building the HTTP client for sources")?;
    let http = reqwest::Client::builder().build().context("building the HTTP client for plugins")?;
    let mut registry = StageRegistry::with_plugins(plugins, http);
    let max = settings.max_file_size();
    registry.register(BuiltinKind::Validate.name(), Arc::new(ValidateStage::new(fetcher.clone(), max)));
    registry.register(BuiltinKind::Download.name(), Arc::new(DownloadStage::new(fetcher, max)));
    registry.register(BuiltinKind::Transcode.name(), Arc::new(TranscodeStage));
    registry.register(BuiltinKind::Persist.name(), Arc::new(PersistStage::new(store)));
    Ok(registry)
}
