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
}

impl<R: AsyncRead + Unpin> LossyLines<R> {
    fn new(pipe: R) -> Self {
        Self { reader: BufReader::new(pipe), line: Vec::new() }
    }

    /// The next line without its line ending; `None` at the end or on a read error.
    async fn next_line(&mut self) -> Option<String> {
        match self.reader.read_until(b'\n', &mut self.line).await {
            Ok(0) if self.line.is_empty() => None,
            Err(_) => None,
            Ok(_) => {
                let mut line = std::mem::take(&mut self.line);
                if line.ends_with(b"\n") {
                    line.pop();
                }
                if line.ends_with(b"\r") {
                    line.pop();
                }
                Some(String::from_utf8_lossy(&line).into_owned())
            }
        }
    }
}
