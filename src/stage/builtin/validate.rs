//! `validate`: checks the source where it lies (size, sniffed type, duration, streams) so that junk is refused
//! before it is downloaded. Parameters only for now; the behaviour arrives with the media stages.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::units::{ByteSize, HumanDuration};

/// `with` parameters of `validate`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ValidateParams {
    /// Largest accepted source (default: the `MAX_FILE_SIZE_MB` setting, 500 MB).
    pub max_size: Option<ByteSize>,
    /// Longest accepted recording (default: no limit).
    pub max_duration: Option<HumanDuration>,
    /// Accepted MIME types, sniffed from the bytes; `*` matches any subtype (default `["audio/*", "video/*"]`).
    pub accept: Option<Vec<String>>,
}
