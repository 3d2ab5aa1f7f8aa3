//! `download`: streams the source (signed URL, `supabase://bucket/path` or a file under the storage root) into
//! the job's work directory. Parameters only for now; the behaviour arrives with the media stages.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::units::ByteSize;

/// `with` parameters of `download`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DownloadParams {
    /// Stop and fail when the body grows past this size (default: the `validate` limit).
    pub max_size: Option<ByteSize>,
    /// How many times a dropped connection is resumed with `Range` before the attempt fails (default 5).
    pub resume_attempts: Option<u32>,
}
