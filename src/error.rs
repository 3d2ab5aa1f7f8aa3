//! The one list of error classes (`code`) that stage errors, AI provider errors and job failures share, so that
//! a class such as cancellation is recognised by its type, never by comparing strings, and reports keep the
//! same stable snake_case names (`"timeout"`, `"insufficient_quota"`) for tools.

use std::fmt;

use serde::{Serialize, Serializer};

macro_rules! error_codes {
    ($($(#[doc = $doc:literal])* $variant:ident = $name:literal,)*) => {
        /// A stable class of failure. Reports, the store and logs show it as its snake_case name
        /// ([`ErrorCode::as_str`]).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum ErrorCode {
            $($(#[doc = $doc])* $variant,)*
        }

        impl ErrorCode {
            /// Every code, in declaration order.
            pub const ALL: &[Self] = &[$(Self::$variant,)*];

            /// The stable name shown in reports (`"timeout"`).
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $name,)*
                }
            }
        }
    };
}

error_codes! {
    /// The job was cancelled, or the stage stopped because another stage failed.
    Cancelled = "cancelled",
    /// An attempt ran past the stage's timeout.
    Timeout = "timeout",
    /// The job ran past its deadline.
    Deadline = "deadline",
    /// A stage panicked or its task ended unexpectedly.
    Panic = "panic",
    /// The checkpoint store could not be read or written.
    Checkpoint = "checkpoint",
    /// A template failed to render.
    Template = "template",
    /// `for_each` did not give a list.
    ForEach = "for_each",
    /// The stage kind is not available in this process.
    UnknownKind = "unknown_kind",
    /// A stage's rendered `with` values are missing or of the wrong type.
    InvalidParams = "invalid_params",
    /// A stage found no input to work on (no ancestor output, no chunks).
    NoInput = "no_input",
    /// A local file could not be read or written.
    Io = "io",
    /// A connection failed or dropped.
    Network = "network",
    /// A server answered with an error status.
    HttpStatus = "http_status",
    /// The source is not allowed by the source policy.
    SourceRefused = "source_refused",
    /// The job names no source.
    NoSource = "no_source",
    /// The source could not be read.
    Unreadable = "unreadable",
    /// The source is not a regular file.
    NotAFile = "not_a_file",
    /// The source is empty.
    Empty = "empty",
    /// The source is over the size limit.
    TooLarge = "too_large",
    /// The recording is over the duration limit.
    TooLong = "too_long",
    /// The source is not a media file.
    NotMedia = "not_media",
    /// The media type is not accepted.
    UnsupportedType = "unsupported_type",
    /// The media has no audio stream.
    NoAudio = "no_audio",
    /// The media cannot be decoded.
    Undecodable = "undecodable",
    /// The media, or a reply, ends early.
    Truncated = "truncated",
    /// The source changed size during a download.
    Changed = "changed",
    /// A download ended before its declared length.
    Incomplete = "incomplete",
    /// A download's length differs from the declared one.
    SizeMismatch = "size_mismatch",
    /// A server ignored or refused a range request.
    Range = "range",
    /// ffmpeg could not be started.
    Ffmpeg = "ffmpeg",
    /// ffprobe failed.
    Ffprobe = "ffprobe",
    /// Transcoding failed.
    Transcode = "transcode",
    /// The chunk limits leave no room for a chunk.
    ChunkLimits = "chunk_limits",
    /// A chunk came out over the size limit.
    ChunkTooLarge = "chunk_too_large",
    /// The job has no recording row to write to.
    NoRecording = "no_recording",
    /// The store refused a write.
    Store = "store",
    /// A plugin is not of the kind its stage expects.
    Plugin = "plugin",
    /// A command plugin could not be started.
    Spawn = "spawn",
    /// Waiting for a command plugin failed.
    Wait = "wait",
    /// A command plugin exited with a failure status.
    ExitStatus = "exit_status",
    /// A command plugin wrote more output than allowed.
    OutputTooLarge = "output_too_large",
    /// An `http` plugin's request could not be built.
    InvalidRequest = "invalid_request",
    /// An `http` plugin could not connect.
    HttpConnect = "http_connect",
    /// An `http` plugin's response body could not be read.
    HttpBody = "http_body",
    /// No AI provider is configured under that name.
    NoProvider = "no_provider",
    /// The provider's HTTP client could not be built.
    Client = "client",
    /// A provider's reply body could not be read.
    Body = "body",
    /// The provider account's quota is used up.
    InsufficientQuota = "insufficient_quota",
    /// The provider's content filter refused the request or stopped the reply.
    ContentFilter = "content_filter",
    /// The input is longer than the model's context.
    ContextLengthExceeded = "context_length_exceeded",
    /// The model refused to answer.
    Refused = "refused",
    /// The model's reply, or a plugin's output, does not fit the output schema.
    InvalidOutput = "invalid_output",
    /// The loopback relay that media tools read through could not be started.
    Relay = "relay",
    /// The address of a URL (or a redirect's) is internal and not allowed.
    AddressRefused = "address_refused",
    /// A reply or answer from outside is larger than `limits.max_response_size`.
    ResponseTooLarge = "response_too_large",
    /// A plugin that declares a JSON output printed nothing.
    EmptyOutput = "empty_output",
    /// A failure a stage kind registered in code reports in its own words.
    Custom = "custom",
}

impl ErrorCode {
    /// Whether this is [`ErrorCode::Cancelled`].
    pub const fn is_cancelled(self) -> bool {
        matches!(self, Self::Cancelled)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_snake_case_and_serialized_as_such() {
        let mut names: Vec<&str> = ErrorCode::ALL.iter().map(|code| code.as_str()).collect();
        for name in &names {
            assert!(name.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{name}");
        }
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ErrorCode::ALL.len(), "no two codes share a name");
        assert_eq!(serde_json::to_value(ErrorCode::InsufficientQuota).unwrap(), "insufficient_quota");
        assert_eq!(ErrorCode::Timeout.to_string(), "timeout");
    }
}
