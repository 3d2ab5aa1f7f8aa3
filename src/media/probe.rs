//! ffprobe: duration and streams of a file or relayed source, from its JSON output.

use std::process::Stdio;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use super::input::MediaInput;
use super::{MediaError, printable};
use crate::bounded;
use crate::child;
use crate::units::ByteSize;

/// Largest ffprobe JSON read: a real file's is a few kilobytes.
pub const MAX_OUTPUT: usize = 4 << 20;
/// Bytes of ffprobe's stderr kept for the error message.
const MAX_STDERR: usize = 64 << 10;

/// What ffprobe found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Probe {
    /// Container names, e.g. `mov,mp4,m4a,3gp,3g2,mj2`.
    pub format: String,
    /// Duration in seconds, when known.
    pub duration: Option<f64>,
    /// Every stream.
    pub streams: Vec<Stream>,
}

/// One stream.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stream {
    /// `audio`, `video`, `subtitle`, `data`...
    pub kind: String,
    /// Codec name, e.g. `aac`.
    pub codec: String,
    /// Audio sample rate.
    pub sample_rate: Option<u32>,
    /// Audio channels.
    pub channels: Option<u32>,
    /// Video streams that are only an attached cover picture.
    pub attached_picture: bool,
}

impl Probe {
    /// The first audio stream.
    pub fn audio(&self) -> Option<&Stream> {
        self.streams.iter().find(|stream| stream.kind == "audio")
    }

    /// Whether there is a real video stream (not just cover art).
    pub fn has_video(&self) -> bool {
        self.streams.iter().any(|stream| stream.kind == "video" && !stream.attached_picture)
    }
}

#[derive(Deserialize)]
struct RawProbe {
    #[serde(default)]
    format: RawFormat,
    #[serde(default)]
    streams: Vec<RawStream>,
}

#[derive(Deserialize, Default)]
struct RawFormat {
    #[serde(default)]
    format_name: String,
    duration: Option<String>,
}

#[derive(Deserialize)]
struct RawStream {
    #[serde(default)]
    codec_type: String,
    #[serde(default)]
    codec_name: String,
    sample_rate: Option<String>,
    channels: Option<u32>,
    #[serde(default)]
    disposition: RawDisposition,
}

#[derive(Deserialize, Default)]
struct RawDisposition {
    #[serde(default)]
    attached_pic: u8,
}

/// Parses ffprobe's `-show_format -show_streams -of json` output.
///
/// # Errors
/// [`MediaError::Output`] when it is not that JSON.
pub fn parse(json: &[u8], input: &str) -> Result<Probe, MediaError> {
    let raw: RawProbe = serde_json::from_slice(json).map_err(|error| MediaError::Output {
        program: "ffprobe",
        input: printable(input),
        reason: error.to_string(),
    })?;
    Ok(Probe {
        format: raw.format.format_name,
        duration: raw.format.duration.and_then(|d| d.parse().ok()).filter(|d: &f64| d.is_finite() && *d >= 0.0),
        streams: raw
            .streams
            .into_iter()
            .map(|stream| Stream {
                kind: stream.codec_type,
                codec: stream.codec_name,
                sample_rate: stream.sample_rate.and_then(|rate| rate.parse().ok()),
                channels: stream.channels,
                attached_picture: stream.disposition.attached_pic == 1,
            })
            .collect(),
    })
}

/// Runs ffprobe on `input` (see [`MediaInput`]: a relay or a file this process wrote).
///
/// # Errors
/// [`MediaError::Failed`] with ffprobe's reason when it cannot read the input (not media, truncated, refused),
/// [`MediaError::Cancelled`] when `cancel` fires.
pub async fn probe(input: &MediaInput, cancel: &CancellationToken) -> Result<Probe, MediaError> {
    let mut command = Command::new("ffprobe");
    command.args(["-v", "error", "-show_format", "-show_streams", "-of", "json"]).args(input.args());
    // A proxy named in the environment, or a `no_proxy` exception, would let ffprobe around the relay.
    for name in super::PROXY_VARIABLES {
        command.env_remove(name);
    }
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    // Its own process group, like every child: a cancel or the worker's death stops it and all it started.
    let (mut child, _group) =
        child::spawn(&mut command).map_err(|source| MediaError::Spawn { program: "ffprobe", source })?;
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let pid = child.id().and_then(|pid| i32::try_from(pid).ok()).map(nix::unistd::Pid::from_raw);
    // A crafted file (thousands of streams or chapters) can make the JSON huge: read at most MAX_OUTPUT bytes,
    // and stop ffprobe when it writes more.
    let read_stdout = async {
        let mut json = Vec::new();
        if let Some(stdout) = stdout {
            let _ = stdout.take(MAX_OUTPUT as u64 + 1).read_to_end(&mut json).await;
        }
        if json.len() > MAX_OUTPUT
            && let Some(pid) = pid
        {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        json
    };
    let read_stderr = async {
        match stderr {
            Some(stderr) => bounded::read_pipe(stderr, MAX_STDERR).await.0,
            None => Vec::new(),
        }
    };
    let run = async {
        let (stdout, stderr) = tokio::join!(read_stdout, read_stderr);
        (child.wait().await, stdout, stderr)
    };
    let (status, stdout, stderr) = tokio::select! {
        output = run => output,
        () = cancel.cancelled() => return Err(MediaError::Cancelled),
    };
    let status = status.map_err(|source| MediaError::Spawn { program: "ffprobe", source })?;
    if stdout.len() > MAX_OUTPUT {
        return Err(MediaError::Output {
            program: "ffprobe",
            input: input.shown().to_string(),
            reason: format!(
                "it printed more than {} of JSON, where a real file's is a few kilobytes (huge tags, or too many streams)",
                ByteSize(MAX_OUTPUT as u64)
            ),
        });
    }
    let output = std::process::Output { status, stdout, stderr };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        // The last line is the reason, unless ffprobe was refused another resource the input points at.
        let mut lines = stderr.lines().filter(|line| !line.trim().is_empty());
        let refused = lines.clone().find(|line| line.contains("not on whitelist"));
        let stderr = refused.or_else(|| lines.next_back()).unwrap_or("no reason given");
        return Err(MediaError::Failed {
            program: "ffprobe",
            input: input.shown().to_string(),
            stderr: input.clean(stderr),
        });
    }
    parse(&output.stdout, input.shown())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ffprobe_json() {
        let json = br#"{"streams":[
            {"codec_type":"video","codec_name":"mjpeg","disposition":{"attached_pic":1}},
            {"codec_type":"audio","codec_name":"mp3","sample_rate":"44100","channels":2}],
            "format":{"format_name":"mp3","duration":"64.000000","size":"1024"}}"#;
        let probe = parse(json, "x.mp3").unwrap();
        assert_eq!(probe.duration, Some(64.0));
        assert_eq!(probe.audio().unwrap().sample_rate, Some(44100));
        assert!(!probe.has_video(), "cover art is not video");
        assert!(parse(b"not json", "x").is_err());
    }
}
