//! The builtin stage kinds and their `with` parameters (ARCHITECTURE.md). Each file holds one kind; its parameter
//! struct is the single source for checking pipelines and for the generated JSON Schema.

pub mod analyze;
pub mod download;
pub mod persist;
pub mod transcode;
pub mod validate;
pub mod whisper;

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::de::DeserializeOwned;

use crate::document::{Diagnostic, Document, SpannedValue};
use crate::error::ErrorCode;

/// A stage kind implemented in this crate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BuiltinKind {
    /// Checks the source before anything is downloaded.
    Validate,
    /// Streams the source into the job's work directory.
    Download,
    /// Turns the media into speech audio chunks.
    Transcode,
    /// Transcribes every chunk and stitches the timeline.
    Whisper,
    /// The built-in LLM analysis.
    Analyze,
    /// Writes results where the frontend reads them.
    Persist,
}

impl BuiltinKind {
    /// Every builtin, in pipeline order.
    pub const ALL: [Self; 6] =
        [Self::Validate, Self::Download, Self::Transcode, Self::Whisper, Self::Analyze, Self::Persist];

    /// The name used in `uses`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Validate => "validate",
            Self::Download => "download",
            Self::Transcode => "transcode",
            Self::Whisper => "whisper",
            Self::Analyze => "analyze",
            Self::Persist => "persist",
        }
    }

    /// The builtin called `name`, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.name() == name)
    }

    /// Default share of the job's progress bar: roughly how long the kind takes on a typical recording.
    pub const fn default_weight(self) -> u32 {
        match self {
            Self::Validate => 2,
            Self::Download => 10,
            Self::Transcode => 15,
            Self::Whisper => 50,
            Self::Analyze => 15,
            Self::Persist => 2,
        }
    }

    /// The JSON Schema of the kind's `with` table.
    pub fn params_schema(self, generator: &mut SchemaGenerator) -> Schema {
        match self {
            Self::Validate => generator.subschema_for::<validate::ValidateParams>(),
            Self::Download => generator.subschema_for::<download::DownloadParams>(),
            Self::Transcode => generator.subschema_for::<transcode::TranscodeParams>(),
            Self::Whisper => generator.subschema_for::<whisper::WhisperParams>(),
            Self::Analyze => generator.subschema_for::<analyze::AnalyzeParams>(),
            Self::Persist => generator.subschema_for::<persist::PersistParams>(),
        }
    }

    /// Checks a stage's `with` table against the kind's parameters.
    ///
    /// `base` is the table's dotted path (`stages.x.with`); keys in `templated` hold a whole-value template
    /// whose type is only known at run time, so they are not type-checked here.
    pub fn check_params(
        self,
        document: &Document,
        with: &SpannedValue<'_>,
        base: &str,
        templated: &[String],
    ) -> Vec<Diagnostic> {
        match self {
            Self::Validate => check::<validate::ValidateParams>(document, with, base, templated),
            Self::Download => check::<download::DownloadParams>(document, with, base, templated),
            Self::Transcode => check::<transcode::TranscodeParams>(document, with, base, templated),
            Self::Whisper => check::<whisper::WhisperParams>(document, with, base, templated),
            Self::Analyze => check::<analyze::AnalyzeParams>(document, with, base, templated),
            Self::Persist => check::<persist::PersistParams>(document, with, base, templated),
        }
    }
}

/// The stage's rendered `with` as the kind's parameter struct.
///
/// # Errors
/// A permanent `invalid_params` error naming the stage and what serde refused (a whole-value template can
/// produce a value of the wrong type at run time).
pub fn params<T: DeserializeOwned>(ctx: &crate::stage::StageContext) -> Result<T, crate::job::StageError> {
    let value = if ctx.params.is_null() { serde_json::json!({}) } else { ctx.params.clone() };
    serde_json::from_value(value).map_err(|error| {
        crate::job::StageError::permanent(ErrorCode::InvalidParams, format!("stage `{}`: {error}", ctx.stage_id))
    })
}

fn check<T: DeserializeOwned + JsonSchema>(
    document: &Document,
    with: &SpannedValue<'_>,
    base: &str,
    templated: &[String],
) -> Vec<Diagnostic> {
    let typed = crate::document::without_keys(with, templated);
    let optional: Vec<String> = templated.iter().map(|key| format!("{base}.{key}")).collect();
    document.deserialize::<T>(&typed, base, &optional).diagnostics
}
