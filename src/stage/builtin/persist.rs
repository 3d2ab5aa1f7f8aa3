//! `persist`: writes the mapped `fields` into the recording's `result`, the mapped `transcript` into its
//! column, the mapped `columns` into named columns of the row (the live frontend's `summary`,
//! `coaching_evaluation`, …), and marks the recording completed. A null column value leaves the column as it
//! was. Running it twice with the same values leaves the row exactly as it was, so a retried or recovered job
//! can always run it again.

use std::sync::Arc;

use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::ErrorCode;
use crate::job::{StageError, StageOutput};
use crate::stage::{Stage, StageContext};
use crate::store::{Store, StoreError};

/// `with` parameters of `persist`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PersistParams {
    /// Result fields to write, each usually one `{{ stages.<id>... }}` template; stored in `result`.
    #[serde(default)]
    pub fields: IndexMap<String, serde_json::Value>,
    /// The transcript text to store in the `transcript` column.
    pub transcript: Option<String>,
    /// Named columns of the recording's row to write, each value converted to the column's type (text, integer,
    /// number, boolean, JSON, array); a null value leaves its column unchanged. The store refuses a column the
    /// table lacks or one it keeps itself (status, progress, error, owner, times).
    #[serde(default)]
    pub columns: IndexMap<String, serde_json::Value>,
}

/// The `persist` stage.
#[derive(Clone)]
pub struct PersistStage {
    store: Arc<dyn Store>,
}

impl std::fmt::Debug for PersistStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PersistStage").finish_non_exhaustive()
    }
}

impl PersistStage {
    /// Writes into `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }
}

#[async_trait::async_trait]
impl Stage for PersistStage {
    async fn run(&self, ctx: StageContext) -> Result<StageOutput, StageError> {
        let params: PersistParams = super::params(&ctx)?;
        let id = ctx.job.recording_id.as_deref().ok_or_else(|| {
            StageError::permanent(
                ErrorCode::NoRecording,
                format!("stage `{}`: the job has no recording to write to", ctx.stage_id),
            )
        })?;
        let result = Value::Object(params.fields.clone().into_iter().collect());
        let classify = |error: StoreError| match error {
            StoreError::Database { .. } => StageError::transient(ErrorCode::Store, error.to_string()),
            other => StageError::permanent(ErrorCode::Store, other.to_string()),
        };
        // The media facts `validate` found fill the row's mime_type, size_bytes and duration_s columns.
        if let Some(facts) = ctx.inputs.values().find(|output| output.get("mime").is_some_and(Value::is_string)) {
            let mime = facts["mime"].as_str().unwrap_or_default();
            let size = facts.get("size").and_then(Value::as_i64);
            let duration = facts.get("duration").and_then(Value::as_f64);
            self.store.set_media(id, mime, size, duration).await.map_err(classify)?;
        }
        self.store
            .persist_columns(id, params.transcript.as_deref(), &result, &params.columns)
            .await
            .map_err(classify)?;
        ctx.progress.report(1.0, "results stored");
        Ok(StageOutput::from(json!({
            "recording_id": id,
            "fields": params.fields.keys().collect::<Vec<_>>(),
            "transcript": params.transcript.is_some(),
            "columns": params.columns.iter().filter(|(_, value)| !value.is_null()).map(|(name, _)| name).collect::<Vec<_>>(),
        })))
    }
}
