//! `transcode`: one ffmpeg pass to mono speech audio, cut into chunks that fit the transcription API.
//! Parameters only for now; the behaviour arrives with the media stages.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::units::{Bitrate, ByteSize, HumanDuration};

/// `with` parameters of `transcode`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TranscodeParams {
    /// Output codec (default `mp3`).
    pub codec: Option<AudioCodec>,
    /// Output sample rate in Hz (default 16000).
    #[schemars(range(min = 8000, max = 48000))]
    pub sample_rate: Option<u32>,
    /// Output bitrate for lossy codecs (default `"32k"`).
    pub bitrate: Option<Bitrate>,
    /// Longest chunk (default `"20m"`).
    pub max_chunk_duration: Option<HumanDuration>,
    /// Largest chunk (default `"24MiB"`, under the API's 25 MiB limit).
    pub max_chunk_bytes: Option<ByteSize>,
    /// Cut in the middle of the silence nearest each target point instead of at fixed times (default false).
    pub split_at_silence: Option<bool>,
    /// Audio repeated at the start of each chunk from the end of the previous one (default `"0s"`).
    pub overlap: Option<HumanDuration>,
    /// Keep a file that already fits and is in an accepted format as it is (default false).
    pub passthrough: Option<bool>,
}

/// Audio codecs the transcription APIs accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AudioCodec {
    /// MP3 (`.mp3`).
    Mp3,
    /// Opus in an Ogg container (`.ogg`).
    Opus,
    /// FLAC (`.flac`), lossless and large.
    Flac,
}
