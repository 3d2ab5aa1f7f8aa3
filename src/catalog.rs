//! The catalog: every pipeline and plugin a deployment has, loaded and checked together, because a pipeline
//! can only be checked against the plugins that exist. A server refuses to start on an invalid catalog.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use indexmap::IndexMap;

use crate::document::{Document, LoadError, suggest, toml_files};
use crate::pipeline::Pipeline;
use crate::pipeline::compile::compile;
use crate::plugin::{Plugin, PluginSet};

/// A pipeline name that the catalog does not have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "no pipeline named `{name}`{} (known: {})",
    suggestion.as_ref().map(|s| format!("; did you mean `{s}`?")).unwrap_or_default(),
    known.join(", ")
)]
pub struct UnknownPipeline {
    /// The name asked for.
    pub name: String,
    /// The closest known name, when one is close enough to be a typo.
    pub suggestion: Option<String>,
    /// Every known name.
    pub known: Vec<String>,
}

/// The loaded pipelines and plugins.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    /// Pipelines by name, in file-name order.
    pub pipelines: IndexMap<String, Pipeline>,
    /// Plugins by name, in file-name order.
    pub plugins: IndexMap<String, Plugin>,
    /// The text of every loaded file, by path, as it was read and checked: what a job's definition carries.
    pub texts: BTreeMap<PathBuf, String>,
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

    /// The pipeline called `name`.
    ///
    /// # Errors
    /// [`UnknownPipeline`] with the closest known name and every known name.
    pub fn pipeline(&self, name: &str) -> Result<&Pipeline, UnknownPipeline> {
        self.pipelines.get(name).ok_or_else(|| {
            let known: Vec<String> = self.pipelines.keys().cloned().collect();
            let suggestion = suggest::closest(name, &known).map(str::to_string);
            UnknownPipeline { name: name.to_string(), suggestion, known }
        })
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
        let mut texts = plugins.texts.clone();
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
                    texts.insert(file.clone(), document.source.clone());
                    pipelines.insert(pipeline.name.clone(), pipeline);
                }
                Err(found) => diagnostics.extend(found),
            }
        }
        if diagnostics.is_empty() {
            Ok(Self { pipelines, plugins: plugins.plugins, texts })
        } else {
            Err(LoadError::Invalid(diagnostics))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_pipeline_suggests_the_closest_name() {
        let catalog = Catalog::load(Path::new("pipelines"), Path::new("plugins")).unwrap();
        let error = catalog.pipeline("audio_qa").unwrap_err();
        assert_eq!(error.suggestion.as_deref(), Some("audio-qa"));
        assert!(
            error.to_string().starts_with("no pipeline named `audio_qa`; did you mean `audio-qa`? (known: audio-qa, "),
            "{error}"
        );
        assert_eq!(catalog.pipeline("nothing-like-it").unwrap_err().suggestion, None);
        assert_eq!(catalog.pipeline("audio-qa").unwrap().name, "audio-qa");
    }
}
