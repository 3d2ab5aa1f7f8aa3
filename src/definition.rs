//! A job's definition: the pipeline file and the plugin files it uses, as text with their SHA-256, taken from the
//! loaded catalog when the job is enqueued ([`of`]) and compiled back into a runnable pipeline by whichever
//! worker takes the job ([`compile`]), without reading `pipelines/` or `plugins/` from that worker's disk. So an
//! edit made while a job waits or runs, or a worker with other files, never changes what the job runs, and a
//! retry runs what the first attempt ran.
//!
//! One thing stays on the worker: a `command` plugin's program (a script beside the plugin file) is resolved in
//! the worker's own plugins folder, as if the carried plugin file lay there.

use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use sha2::{Digest as _, Sha256};

use crate::catalog::{Catalog, UnknownPipeline};
use crate::document::{Diagnostic, Document};
use crate::pipeline::Pipeline;
use crate::plugin::{Plugin, PluginSet};
use crate::queue::{Definition, DefinitionFile};
use crate::stage::StageKind;

/// Why a definition could not be made or compiled.
#[derive(Debug, thiserror::Error)]
pub enum DefinitionError {
    /// The catalog has no pipeline of that name.
    #[error(transparent)]
    UnknownPipeline(#[from] UnknownPipeline),
    /// The catalog does not hold the text of a file it loaded (a catalog built in code, not read from files).
    #[error("the text of {} was not kept when it was loaded", .0.display())]
    MissingText(PathBuf),
    /// A carried file name is not a bare `NAME.toml`, or does not match the plugin it is filed under.
    #[error("the job's definition names a file `{file}`: expected {expected}")]
    BadFileName {
        /// The name as carried.
        file: String,
        /// What it should look like.
        expected: String,
    },
    /// A carried text does not have the hash it was stored with.
    #[error("the job's definition file `{file}` does not match its SHA-256 (stored {stored}, computed {computed})")]
    HashMismatch {
        /// The file.
        file: String,
        /// The hash stored with it.
        stored: String,
        /// The hash of the text.
        computed: String,
    },
    /// The carried files do not compile here; every problem, at `file:line:column`.
    #[error("the job's definition does not compile: {}", render(.0))]
    Invalid(Vec<Diagnostic>),
}

fn render(diagnostics: &[Diagnostic]) -> String {
    diagnostics.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// A definition compiled on a worker.
#[derive(Debug, Clone)]
pub struct Compiled {
    /// The pipeline.
    pub pipeline: Pipeline,
    /// The plugins it uses, by name.
    pub plugins: IndexMap<String, Plugin>,
}

/// SHA-256 of a text, lowercase hex.
pub fn sha256_hex(text: &str) -> String {
    hex(&Sha256::digest(text.as_bytes()))
}

/// Lowercase hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    out
}

/// One number for a whole definition: every file's name, stored hash and the hash of its text as carried, so that
/// jobs with the same definition can share one compiled pipeline, and a damaged text never matches the digest of
/// the intact one (it is compiled, and refused, on its own).
pub fn digest(definition: &Definition) -> String {
    let mut hasher = Sha256::new();
    for file in std::iter::once(&definition.pipeline).chain(definition.plugins.values()) {
        for part in [file.file.as_str(), file.sha256.as_str(), &sha256_hex(&file.text)] {
            hasher.update(part.as_bytes());
            hasher.update([0]);
        }
    }
    hex(&hasher.finalize())
}

fn carried(catalog: &Catalog, path: &Path) -> Result<DefinitionFile, DefinitionError> {
    let text = catalog.texts.get(path).ok_or_else(|| DefinitionError::MissingText(path.to_path_buf()))?;
    let file = path.file_name().map_or_else(|| path.display().to_string(), |name| name.to_string_lossy().into_owned());
    Ok(DefinitionFile { file, sha256: sha256_hex(text), text: text.clone() })
}

/// The definition of pipeline `name` as the catalog loaded it: its file and the files of the plugins its stages
/// use.
///
/// # Errors
/// [`DefinitionError::UnknownPipeline`] (with a did-you-mean); [`DefinitionError::MissingText`].
pub fn of(catalog: &Catalog, name: &str) -> Result<Definition, DefinitionError> {
    let pipeline = catalog.pipeline(name)?;
    let mut plugins = std::collections::BTreeMap::new();
    for stage in &pipeline.stages {
        if let StageKind::Plugin(plugin) = &stage.uses
            && let Some(loaded) = catalog.plugins.get(plugin)
            && !plugins.contains_key(plugin)
        {
            plugins.insert(plugin.clone(), carried(catalog, &loaded.file)?);
        }
    }
    Ok(Definition { pipeline: carried(catalog, &pipeline.file)?, plugins })
}

/// Checks that `file` is a bare `stem.toml` and that its text has its hash.
fn check_file(file: &DefinitionFile, stem: Option<&str>) -> Result<(), DefinitionError> {
    let expected = stem.map_or_else(|| "a bare file name ending in .toml".to_string(), |stem| format!("`{stem}.toml`"));
    let bare = Path::new(&file.file).file_name().is_some_and(|name| name == file.file.as_str())
        && file.file.ends_with(".toml")
        && !file.file.starts_with('.');
    if !bare || stem.is_some_and(|stem| file.file != format!("{stem}.toml")) {
        return Err(DefinitionError::BadFileName { file: file.file.clone(), expected });
    }
    let computed = sha256_hex(&file.text);
    if !computed.eq_ignore_ascii_case(&file.sha256) {
        return Err(DefinitionError::HashMismatch { file: file.file.clone(), stored: file.sha256.clone(), computed });
    }
    Ok(())
}

/// Compiles a carried definition, as if its pipeline file lay in `pipelines_dir` and its plugin files in
/// `plugins_dir` (where `command` plugins find their programs). Nothing is read from disk.
///
/// # Errors
/// [`DefinitionError::BadFileName`] and [`DefinitionError::HashMismatch`] for a damaged definition;
/// [`DefinitionError::Invalid`] with every problem when the files do not compile.
pub fn compile(definition: &Definition, pipelines_dir: &Path, plugins_dir: &Path) -> Result<Compiled, DefinitionError> {
    check_file(&definition.pipeline, None)?;
    for (name, file) in &definition.plugins {
        check_file(file, Some(name))?;
    }
    let mut set = PluginSet::default();
    for file in definition.plugins.values() {
        let document = Document::new(plugins_dir.join(&file.file), file.text.clone());
        match Plugin::load(&document) {
            Ok(plugin) => {
                set.plugins.insert(plugin.name.clone(), plugin);
            }
            Err(found) => {
                set.broken.insert(document.stem());
                set.diagnostics.extend(found);
            }
        }
    }
    let document = Document::new(pipelines_dir.join(&definition.pipeline.file), definition.pipeline.text.clone());
    let mut diagnostics = set.diagnostics.clone();
    match crate::pipeline::compile::compile(&document, &set, &[]) {
        Ok(pipeline) if diagnostics.is_empty() => Ok(Compiled { pipeline, plugins: set.plugins }),
        Ok(_) => Err(DefinitionError::Invalid(diagnostics)),
        Err(found) => {
            diagnostics.extend(found);
            Err(DefinitionError::Invalid(diagnostics))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped() -> Catalog {
        Catalog::load(Path::new("pipelines"), Path::new("plugins")).unwrap()
    }

    #[test]
    fn hashes_are_sha256_in_lowercase_hex() {
        // FIPS 180-2's test vectors.
        assert_eq!(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(sha256_hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
    }

    #[test]
    fn a_definition_carries_the_pipeline_and_only_the_plugins_it_uses() {
        let catalog = shipped();
        let definition = of(&catalog, "meeting").unwrap();
        assert_eq!(definition.pipeline.file, "meeting.toml");
        assert_eq!(definition.pipeline.text, std::fs::read_to_string("pipelines/meeting.toml").unwrap());
        assert_eq!(definition.pipeline.sha256, sha256_hex(&definition.pipeline.text));
        assert_eq!(definition.plugins.keys().collect::<Vec<_>>(), ["action-items", "summary"]);
        let compiled =
            compile(&definition, Path::new("/elsewhere/pipelines"), Path::new("/elsewhere/plugins")).unwrap();
        assert_eq!(compiled.pipeline.name, "meeting");
        assert_eq!(compiled.pipeline.stages.len(), catalog.pipelines["meeting"].stages.len());
        assert_eq!(compiled.plugins["summary"].file, Path::new("/elsewhere/plugins/summary.toml"));
        assert!(matches!(of(&catalog, "meting"), Err(DefinitionError::UnknownPipeline(_))));
    }

    #[test]
    fn a_damaged_or_invalid_definition_is_refused_with_every_problem() {
        let catalog = shipped();
        let mut definition = of(&catalog, "meeting").unwrap();
        let good = definition.clone();
        definition.pipeline.text.push_str("\n# edited after hashing\n");
        assert!(matches!(
            compile(&definition, Path::new("p"), Path::new("q")),
            Err(DefinitionError::HashMismatch { .. })
        ));

        let mut definition = good.clone();
        definition.pipeline.file = "../meeting.toml".into();
        assert!(matches!(
            compile(&definition, Path::new("p"), Path::new("q")),
            Err(DefinitionError::BadFileName { .. })
        ));

        let mut definition = good.clone();
        let text = definition.pipeline.text.replace("uses = \"summary\"", "uses = \"sumary\"") + "\n[oops]\n";
        definition.pipeline = DefinitionFile { sha256: sha256_hex(&text), text, file: "meeting.toml".into() };
        let Err(DefinitionError::Invalid(problems)) = compile(&definition, Path::new("p"), Path::new("q")) else {
            panic!("an invalid pipeline compiled");
        };
        let codes: Vec<&str> = problems.iter().map(|problem| problem.code).collect();
        assert!(codes.contains(&"unknown_kind") && codes.contains(&"unknown_key"), "{problems:?}");
        assert!(problems.iter().all(|problem| problem.file == Path::new("p/meeting.toml") && problem.line > 0));

        assert_ne!(digest(&good), digest(&definition), "the digest follows the texts");
        let mut damaged = good.clone();
        damaged.pipeline.text.push(' ');
        assert_ne!(digest(&good), digest(&damaged), "a text changed after hashing has another digest");
        assert_eq!(digest(&good), digest(&good.clone()));
    }
}
