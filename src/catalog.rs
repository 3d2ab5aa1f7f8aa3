//! The catalog: every pipeline and plugin a deployment has, loaded and checked together, because a pipeline
//! can only be checked against the plugins that exist. A server refuses to start on an invalid catalog.

use std::path::Path;

use indexmap::IndexMap;

use crate::pipeline::compile::compile;
use crate::pipeline::document::Document;
use crate::pipeline::{LoadError, Pipeline, toml_files};
use crate::plugin::{Plugin, PluginSet};

/// The loaded pipelines and plugins.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    /// Pipelines by name, in file-name order.
    pub pipelines: IndexMap<String, Pipeline>,
    /// Plugins by name, in file-name order.
    pub plugins: IndexMap<String, Plugin>,
}

impl Catalog {
    /// Loads `plugins_dir/*.toml`, then compiles `pipelines_dir/*.toml` against them.
    ///
    /// # Errors
    /// [`LoadError::Read`] when a folder or file cannot be read; [`LoadError::Invalid`] with every problem of
    /// every file otherwise.
    pub fn load(pipelines_dir: &Path, plugins_dir: &Path) -> Result<Self, LoadError> {
        Self::load_with_kinds(pipelines_dir, plugins_dir, &[])
    }

    /// Like [`Catalog::load`], also accepting the stage kinds an embedding program registers in code.
    ///
    /// # Errors
    /// As [`Catalog::load`].
    pub fn load_with_kinds(
        pipelines_dir: &Path,
        plugins_dir: &Path,
        custom_kinds: &[String],
    ) -> Result<Self, LoadError> {
        let read_error = |path: &Path| {
            let path = path.to_path_buf();
            move |source| LoadError::Read { path, source }
        };
        let plugins = PluginSet::load_dir(plugins_dir).map_err(read_error(plugins_dir))?;
        let mut diagnostics = plugins.diagnostics.clone();
        let mut pipelines = IndexMap::new();
        for file in toml_files(pipelines_dir).map_err(read_error(pipelines_dir))? {
            let document = match Document::open(&file).map_err(read_error(&file))? {
                Ok(document) => document,
                Err(diagnostic) => {
                    diagnostics.push(diagnostic);
                    continue;
                }
            };
            match compile(&document, &plugins, custom_kinds) {
                Ok(pipeline) => {
                    pipelines.insert(pipeline.name.clone(), pipeline);
                }
                Err(found) => diagnostics.extend(found),
            }
        }
        if diagnostics.is_empty() {
            Ok(Self { pipelines, plugins: plugins.plugins })
        } else {
            Err(LoadError::Invalid(diagnostics))
        }
    }
}
