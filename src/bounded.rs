//! Reading what comes from outside the process within bounds: HTTP bodies up to a size cap (so a hostile or
//! broken server cannot make the worker hold gigabytes), pipes up to a cap, and error texts from other
//! services cut short and scrubbed of the secrets that were sent to them (a server that echoes request
//! headers must not put a key into a report, a log line or the recording's `error` column).

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::units::ByteSize;

/// Default of `limits.max_response_size`: far above any real webhook answer or AI reply (a 20-minute
/// transcription in `verbose_json` is about 100 KB), far below what hurts a worker.
pub const DEFAULT_MAX_RESPONSE_SIZE: crate::units::ByteSize = crate::units::ByteSize(8 << 20);

/// What replaces a scrubbed secret.
const REDACTED: &str = "[redacted]";

/// Why a body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The body is larger than the cap; reading stopped at the cap.
    #[error("the response is larger than {cap}, the `{setting}` limit{}", declared.map(|size| format!(" (it announced {})", ByteSize(size))).unwrap_or_default())]
    TooLarge {
        /// The cap.
        cap: ByteSize,
        /// The setting that sets the cap, for the message.
        setting: &'static str,
        /// The size the server announced in `Content-Length`, when it did.
        declared: Option<u64>,
    },
    /// The connection failed while reading.
    #[error("reading the response: {0}")]
    Read(#[source] reqwest::Error),
}

/// Reads a whole response body, failing as soon as it passes `cap` bytes (at once when `Content-Length`
/// already says so). Memory stays within `cap` plus one chunk.
///
/// # Errors
/// [`BodyError::TooLarge`] naming `setting`; [`BodyError::Read`] when the connection fails (the error has no
/// URL).
pub async fn read_body(
    mut response: reqwest::Response,
    cap: ByteSize,
    setting: &'static str,
) -> Result<Vec<u8>, BodyError> {
    let declared = response.content_length();
    let too_large = |declared| BodyError::TooLarge { cap, setting, declared };
    if declared.is_some_and(|length| length > cap.0) {
        return Err(too_large(declared));
    }
    let capacity = declared.unwrap_or(0).min(cap.0).min(1 << 20);
    let mut body = Vec::with_capacity(usize::try_from(capacity).unwrap_or(0));
    while let Some(chunk) = response.chunk().await.map_err(|error| BodyError::Read(error.without_url()))? {
        if body.len() as u64 + chunk.len() as u64 > cap.0 {
            return Err(too_large(declared));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Reads at most the first `limit` bytes of a body and drops the rest (for error answers, of which only the
/// start is ever shown). A connection that fails midway gives what arrived.
pub async fn read_prefix(mut response: reqwest::Response, limit: usize) -> Vec<u8> {
    let mut body = Vec::new();
    while body.len() < limit {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk[..chunk.len().min(limit - body.len())]),
            Ok(None) | Err(_) => break,
        }
    }
    body
}

/// Reads a pipe to its end, keeping at most `limit` bytes; the flag says whether more came (and was dropped).
/// Reading goes on to the end so the writer is never blocked on a full pipe.
pub async fn read_pipe(mut pipe: impl AsyncRead + Unpin, limit: usize) -> (Vec<u8>, bool) {
    let mut kept = Vec::new();
    let mut buffer = [0u8; 8192];
    let mut overflow = false;
    loop {
        match pipe.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read) => {
                let room = limit.saturating_sub(kept.len());
                kept.extend_from_slice(&buffer[..read.min(room)]);
                overflow |= read > room;
            }
        }
    }
    (kept, overflow)
}

/// Text from another service made fit for a message: every occurrence of each secret replaced by
/// `[redacted]`, control characters replaced by spaces, and the result cut to `max_chars` characters (with
/// `…` when cut). Secrets shorter than 4 characters are not searched for, since they would match ordinary
/// text.
pub fn scrub<'a>(text: &str, secrets: impl IntoIterator<Item = &'a str>, max_chars: usize) -> String {
    let mut text = text.to_string();
    for secret in secrets {
        if secret.chars().count() >= 4 {
            text = text.replace(secret, REDACTED);
        }
    }
    let mut cut: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(max_chars)
        .collect::<String>()
        .trim()
        .to_string();
    if text.chars().count() > max_chars {
        cut.push('…');
    }
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_removes_secrets_and_cuts() {
        let text = "bad request; headers: api-key: sk-secret-1, authorization: Bearer sk-secret-1\n";
        assert_eq!(
            scrub(text, ["sk-secret-1", "ab"], 1000),
            "bad request; headers: api-key: [redacted], authorization: Bearer [redacted]"
        );
        assert_eq!(scrub("0123456789", [], 4), "0123…");
        assert_eq!(scrub("a\u{1b}[31mb", [], 100), "a [31mb", "escape sequences do not reach a terminal");
    }
}
