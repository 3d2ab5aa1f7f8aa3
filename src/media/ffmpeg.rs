//! Runs ffmpeg with `-progress pipe:1`, turning its `out_time_us` lines into a fraction of the known duration,
//! handing every stderr line to the caller (silencedetect reports there), and killing it on cancel.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use super::{MediaError, printable};
use crate::child;

/// How many stderr lines an error keeps.
const STDERR_LINES: usize = 8;
/// ffmpeg flushes its files on SIGTERM; give it this long before SIGKILL.
const TERM_GRACE: Duration = Duration::from_millis(300);

/// Runs `ffmpeg -hide_banner -nostdin -nostats -progress pipe:1 -y ARGS`.
///
/// `duration` (seconds of output expected) turns progress into a fraction for `on_progress`; `on_stderr` sees
/// every stderr line. `input` only names the input in errors. The input itself is among `args`, from a
/// [`super::input::MediaInput`].
///
/// # Errors
/// [`MediaError::Failed`] with the last stderr lines when ffmpeg exits non-zero; [`MediaError::Cancelled`].
pub async fn run(
    args: &[OsString],
    input: &str,
    duration: Option<f64>,
    mut on_progress: impl FnMut(f64),
    mut on_stderr: impl FnMut(&str),
    cancel: &CancellationToken,
) -> Result<(), MediaError> {
    let mut command = Command::new("ffmpeg");
    command
        .args(["-hide_banner", "-nostdin", "-nostats", "-progress", "pipe:1", "-y"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // A proxy named in the environment, or a `no_proxy` exception, would let ffmpeg around the relay.
    for name in super::PROXY_VARIABLES {
        command.env_remove(name);
    }
    let (mut process, _group) =
        child::spawn(&mut command).map_err(|source| MediaError::Spawn { program: "ffmpeg", source })?;
    let mut stdout = process.stdout.take().map(LossyLines::new);
    let mut stderr = process.stderr.take().map(LossyLines::new);
    let mut tail: VecDeque<String> = VecDeque::with_capacity(STDERR_LINES);
    loop {
        tokio::select! {
            line = next(&mut stdout), if stdout.is_some() => match line {
                Some(line) => {
                    if let (Some(total), Some(micros)) = (duration, line.strip_prefix("out_time_us=")) {
                        if let Ok(micros) = micros.trim().parse::<f64>() && total > 0.0 {
                            on_progress((micros / 1e6 / total).clamp(0.0, 1.0));
                        }
                    }
                }
                None => stdout = None,
            },
            line = next(&mut stderr), if stderr.is_some() => match line {
                Some(line) => {
                    on_stderr(&line);
                    if !line.trim().is_empty() {
                        if tail.len() == STDERR_LINES {
                            tail.pop_front();
                        }
                        tail.push_back(line);
                    }
                }
                None => stderr = None,
            },
            () = cancel.cancelled() => {
                child::terminate(&mut process, TERM_GRACE).await;
                return Err(MediaError::Cancelled);
            }
        }
        if stdout.is_none() && stderr.is_none() {
            break;
        }
    }
    let status = tokio::select! {
        status = process.wait() => status.map_err(|source| MediaError::Spawn { program: "ffmpeg", source })?,
        () = cancel.cancelled() => {
            child::terminate(&mut process, TERM_GRACE).await;
            return Err(MediaError::Cancelled);
        }
    };
    if status.success() {
        return Ok(());
    }
    let stderr = tail.into_iter().collect::<Vec<_>>().join(" | ");
    Err(MediaError::Failed {
        program: "ffmpeg",
        input: printable(input),
        stderr: stderr.replace(input, &printable(input)),
    })
}

async fn next<R: AsyncRead + Unpin>(lines: &mut Option<LossyLines<R>>) -> Option<String> {
    match lines {
        Some(lines) => lines.next_line().await,
        None => None,
    }
}

/// Lines of a pipe, with bytes that are not UTF-8 replaced: ffmpeg prints a file's metadata tags as they are,
/// and one odd byte must not end the reading of everything after it (silences are reported last).
struct LossyLines<R> {
    reader: BufReader<R>,
    /// The line read so far; kept here so that a `select!` that drops [`LossyLines::next_line`] loses nothing.
    line: Vec<u8>,
    /// The current line is longer than [`MAX_LINE`]; the rest of it is being skipped.
    skipping: bool,
}

/// Longest line kept from ffmpeg's output: its progress and silencedetect lines are under 200 bytes.
const MAX_LINE: usize = 64 << 10;

impl<R: AsyncRead + Unpin> LossyLines<R> {
    fn new(pipe: R) -> Self {
        Self { reader: BufReader::new(pipe), line: Vec::new(), skipping: false }
    }

    /// The next line without its line ending, cut at [`MAX_LINE`] bytes (the rest of a longer line is skipped,
    /// so a crafted tag cannot grow a line without end); `None` at the end or on a read error.
    async fn next_line(&mut self) -> Option<String> {
        loop {
            // `fill_buf` consumes nothing until `consume`, so a `select!` that drops this future loses nothing.
            let buffer = match self.reader.fill_buf().await {
                Ok(buffer) => buffer,
                Err(_) => return None,
            };
            if buffer.is_empty() {
                if self.line.is_empty() && !self.skipping {
                    return None;
                }
                return Some(self.take_line());
            }
            let (chunk, ends) = match buffer.iter().position(|&byte| byte == b'\n') {
                Some(at) => (&buffer[..at], at + 1),
                None => (buffer, buffer.len()),
            };
            let room = MAX_LINE.saturating_sub(self.line.len());
            self.line.extend_from_slice(&chunk[..chunk.len().min(room)]);
            self.skipping |= chunk.len() > room;
            let found = ends > chunk.len();
            self.reader.consume(ends);
            if found {
                return Some(self.take_line());
            }
        }
    }

    fn take_line(&mut self) -> String {
        let mut line = std::mem::take(&mut self.line);
        self.skipping = false;
        if line.ends_with(b"\r") {
            line.pop();
        }
        String::from_utf8_lossy(&line).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_endless_line_is_cut_and_the_next_lines_still_read() {
        let mut text = vec![b'x'; 3 * MAX_LINE];
        text.extend_from_slice(b"\r\nsilence_start: 1.5\nlast \xff tag");
        let mut lines = LossyLines::new(&text[..]);
        let first = lines.next_line().await.unwrap();
        assert_eq!(first.len(), MAX_LINE, "the long line is kept up to the cap");
        assert_eq!(lines.next_line().await.unwrap(), "silence_start: 1.5");
        assert_eq!(lines.next_line().await.unwrap(), "last \u{fffd} tag", "no line ending at the end, not UTF-8");
        assert_eq!(lines.next_line().await, None);
    }
}
