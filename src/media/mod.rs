//! ffprobe and ffmpeg as child processes: probing media ([`probe`]), confining what they read ([`input`]),
//! recognising a file type from its first bytes ([`sniff`]), running ffmpeg with live progress and prompt cancellation ([`ffmpeg`]), and choosing
//! chunk cut points in silences ([`silence`]).
//!
//! Every process runs in its own process group and is killed (with anything it started) when the caller's
//! token fires or the future is dropped; nothing is left running and nothing is written outside the
//! directories the caller names.

pub mod ffmpeg;
pub mod input;
pub mod probe;
pub mod silence;
pub mod sniff;

/// Why a media tool failed.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    /// The program could not be started (not installed?).
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// `ffmpeg` or `ffprobe`.
        program: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },
    /// It ran and failed; the message carries the end of its stderr.
    #[error("{program} failed on {input}: {stderr}")]
    Failed {
        /// `ffmpeg` or `ffprobe`.
        program: &'static str,
        /// The input it was given (a URL's query string is removed).
        input: String,
        /// The last lines of its stderr.
        stderr: String,
    },
    /// Its output could not be understood.
    #[error("{program} gave output that cannot be read for {input}: {reason}")]
    Output {
        /// `ffmpeg` or `ffprobe`.
        program: &'static str,
        /// The input.
        input: String,
        /// What was wrong.
        reason: String,
    },
    /// The caller cancelled.
    #[error("cancelled")]
    Cancelled,
}

/// Environment variables through which ffmpeg and ffprobe would pick a proxy or skip one; removed from their
/// environment so that only the relay named on their command line is used (see [`input`]).
pub const PROXY_VARIABLES: [&str; 4] = ["http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY"];

/// A URL without its query string and fragment, safe to print (signed URLs carry tokens there).
pub fn printable(input: &str) -> String {
    input.split(['?', '#']).next().unwrap_or(input).to_string()
}
