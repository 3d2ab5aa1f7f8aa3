//! The registry maps what `uses` names to the [`Stage`] that runs it: builtins, the plugins of the catalog,
//! and kinds registered in code. A job only starts when every stage of its pipeline resolves, so a missing
//! kind is reported before any work is done.

use std::collections::HashMap;
use std::sync::Arc;

use crate::pipeline::Pipeline;
use crate::plugin::{Plugin, PluginAction};
use crate::stage::{Stage, StageKind};

/// Stage implementations by kind name.
#[derive(Clone, Default)]
pub struct StageRegistry {
    kinds: HashMap<String, Arc<dyn Stage>>,
}

impl std::fmt::Debug for StageRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<&String> = self.kinds.keys().collect();
        names.sort();
        f.debug_struct("StageRegistry").field("kinds", &names).finish()
    }
}

impl StageRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry holding the runnable plugins: `command` and `http` plugins always, `prompt` plugins when
    /// an AI provider is configured. `http` plugins read at most `max_response` bytes of an answer.
    pub fn with_plugins<'a>(
        plugins: impl IntoIterator<Item = &'a Plugin>,
        http: crate::net::HttpClient,
        providers: Option<Arc<crate::ai::Providers>>,
        max_response: crate::units::ByteSize,
    ) -> Self {
        let mut registry = Self::new();
        registry.add_plugins(plugins, &http, providers.as_ref(), max_response);
        registry
    }

    /// Adds the runnable plugins, as [`StageRegistry::with_plugins`] describes.
    pub fn add_plugins<'a>(
        &mut self,
        plugins: impl IntoIterator<Item = &'a Plugin>,
        http: &crate::net::HttpClient,
        providers: Option<&Arc<crate::ai::Providers>>,
        max_response: crate::units::ByteSize,
    ) {
        for plugin in plugins {
            let plugin = Arc::new(plugin.clone());
            let stage: Arc<dyn Stage> = match (&plugin.action, providers) {
                (PluginAction::Command(_), _) => Arc::new(crate::plugin::command::CommandStage::new(plugin.clone())),
                (PluginAction::Http(_), _) => Arc::new(
                    crate::plugin::http::HttpStage::new(plugin.clone(), http.clone()).with_max_response(max_response),
                ),
                (PluginAction::Prompt(_), Some(providers)) => {
                    Arc::new(crate::plugin::prompt::PromptStage::new(plugin.clone(), providers.clone()))
                }
                (PluginAction::Prompt(_), None) => continue,
            };
            self.register(&plugin.name, stage);
        }
    }

    /// Registers (or replaces) the implementation of `name`.
    pub fn register(&mut self, name: &str, stage: Arc<dyn Stage>) {
        self.kinds.insert(name.to_string(), stage);
    }

    /// The implementation of `kind`, if there is one.
    pub fn get(&self, kind: &StageKind) -> Option<Arc<dyn Stage>> {
        self.kinds.get(kind.name()).cloned()
    }

    /// Stages of `pipeline` whose kind has no implementation here, as `(stage id, kind)`.
    pub fn missing(&self, pipeline: &Pipeline) -> Vec<(String, StageKind)> {
        pipeline
            .stages
            .iter()
            .filter(|stage| self.get(&stage.uses).is_none())
            .map(|stage| (stage.id.clone(), stage.uses.clone()))
            .collect()
    }
}

/// The stage kinds of one process, from which a registry is made for any set of plugins: a worker runs each job
/// with the plugin files the job carries, so each job (or each distinct definition) gets its own registry.
#[derive(Clone)]
pub struct Kinds {
    builtins: StageRegistry,
    http: crate::net::HttpClient,
    providers: Option<Arc<crate::ai::Providers>>,
    max_response: crate::units::ByteSize,
}

impl std::fmt::Debug for Kinds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kinds").field("builtins", &self.builtins).finish_non_exhaustive()
    }
}

impl Kinds {
    /// The builtin (and in-code) kinds in `builtins`, and what plugins need to run: the HTTP client of `http`
    /// plugins, the AI providers of `prompt` plugins (none: prompt plugins cannot run here), and the largest
    /// answer an `http` plugin reads.
    pub fn new(
        builtins: StageRegistry,
        http: crate::net::HttpClient,
        providers: Option<Arc<crate::ai::Providers>>,
        max_response: crate::units::ByteSize,
    ) -> Self {
        Self { builtins, http, providers, max_response }
    }

    /// The builtins plus `plugins`.
    pub fn registry<'a>(&self, plugins: impl IntoIterator<Item = &'a Plugin>) -> StageRegistry {
        let mut registry = self.builtins.clone();
        registry.add_plugins(plugins, &self.http, self.providers.as_ref(), self.max_response);
        registry
    }
}
