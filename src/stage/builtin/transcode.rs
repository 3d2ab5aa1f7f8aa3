//! `transcode`: one ffmpeg pass turns the first audio stream into mono speech audio (16 kHz MP3 at 32 kbps by
//! default; Ogg/Opus and FLAC on request) while `silencedetect` listens, then the result is cut into chunks
//! that each fit `max_chunk_bytes` and `max_chunk_duration`, by stream copy (no second encode).
//!
//! - Cut points are in the middle of the latest silence before each limit when `split_at_silence` is set, and
//!   evenly spaced otherwise. A one-second margin under `max_chunk_duration` absorbs frame padding.
//! - Each chunk's start and end are the real ones from ffmpeg's segment list, never index × length.
//! - With `overlap`, each chunk after the first also carries that much audio from before its cut.
//! - With `passthrough`, a file that already fits and is in a format the APIs accept is used as it is.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::ErrorCode;
use crate::job::{StageError, StageOutput};
use crate::media::input::{FileOrigin, MediaInput, Relay};
use crate::media::silence::{NoiseLevel, SilenceLog, cut_points};
use crate::media::{MediaError, ffmpeg, probe};
use crate::stage::{Stage, StageContext};
use crate::units::{Bitrate, ByteSize, HumanDuration};

/// `with` parameters of `transcode`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TranscodeParams {
    /// The media file (default: the `path` output of the one ancestor that has one, i.e. `download`).
    pub input: Option<String>,
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
    /// Level under which audio counts as silence: decibels or an amplitude ratio (default `"-30dB"`).
    pub silence_threshold: Option<NoiseLevel>,
    /// Shortest pause that counts as a silence (default `"500ms"`).
    pub min_silence: Option<HumanDuration>,
    /// Audio repeated at the start of each chunk from the end of the previous one (default `"0s"`).
    pub overlap: Option<HumanDuration>,
    /// Keep a file that already fits and is in an accepted format as it is (default false).
    pub passthrough: Option<bool>,
}

/// Audio codecs the transcription APIs accept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AudioCodec {
    /// MP3 (`.mp3`).
    #[default]
    Mp3,
    /// Opus in an Ogg container (`.ogg`; the APIs refuse the `.opus` extension).
    Opus,
    /// FLAC (`.flac`), lossless and large.
    Flac,
}

impl AudioCodec {
    fn extension(self) -> &'static str {
        match self {
            Self::Mp3 => "mp3",
            Self::Opus => "ogg",
            Self::Flac => "flac",
        }
    }

    fn encoder_args(self, bitrate: Bitrate) -> Vec<String> {
        let bitrate = bitrate.to_string();
        match self {
            Self::Mp3 => vec!["-c:a".into(), "libmp3lame".into(), "-b:a".into(), bitrate],
            Self::Opus => {
                vec!["-c:a".into(), "libopus".into(), "-b:a".into(), bitrate, "-application".into(), "voip".into()]
            }
            Self::Flac => vec!["-c:a".into(), "flac".into(), "-sample_fmt".into(), "s16".into()],
        }
    }

    /// How the second pass writes chunks: a stream copy, except for FLAC, whose copied header would still
    /// announce the whole recording's length, so it is re-encoded (losslessly and quickly).
    fn cut_args(self, bitrate: Bitrate) -> Vec<String> {
        match self {
            Self::Mp3 | Self::Opus => vec!["-c".into(), "copy".into()],
            Self::Flac => self.encoder_args(bitrate),
        }
    }

    /// Bytes per second of output, erring high so that chunks sized by it never exceed the byte limit.
    fn bytes_per_second(self, bitrate: Bitrate, sample_rate: u32) -> f64 {
        match self {
            // Constant bitrate plus container overhead.
            Self::Mp3 => f64::from(bitrate.0) / 8.0 * 1.02,
            // Opus is VBR; allow for peaks well over the nominal rate.
            Self::Opus => f64::from(bitrate.0) / 8.0 * 1.5,
            // FLAC never exceeds raw 16-bit PCM by much.
            Self::Flac => f64::from(sample_rate) * 2.0 * 1.02,
        }
    }
}

/// Room left under `max_chunk_duration` for frame padding and encoder delay.
const DURATION_MARGIN: f64 = 1.0;
/// Formats that can go to the transcription APIs as they are, by ffprobe format name.
const PASSTHROUGH_FORMATS: [&str; 6] = ["mp3", "wav", "flac", "ogg", "mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm"];

/// The `transcode` stage.
#[derive(Debug, Clone, Copy, Default)]
pub struct TranscodeStage;

fn media_error(error: MediaError) -> StageError {
    match error {
        MediaError::Cancelled => StageError::cancelled(),
        MediaError::Spawn { .. } => StageError::transient(ErrorCode::Ffmpeg, error.to_string()),
        other => StageError::permanent(ErrorCode::Transcode, other.to_string()),
    }
}

/// Fails when ffmpeg asked the relay for anything but the input (the input points at other resources, as an
/// HLS playlist or a concat list does; they are never fetched), or when the input could not be read.
fn points_elsewhere(relay: &Relay) -> Result<(), StageError> {
    if let Some(first) = relay.refused().first() {
        return Err(StageError::permanent(
            ErrorCode::NotMedia,
            format!(
                "the input is not a recording: it points at other resources (such as {first}), as a playlist does, \
                 and those are never fetched"
            ),
        ));
    }
    relay.failure().map_or(Ok(()), |failure| Err(StageError::permanent(ErrorCode::Unreadable, failure)))
}

/// The input file: `with.input`, or the `path` of the single ancestor output that has one.
fn input_path(params: &TranscodeParams, ctx: &StageContext) -> Result<PathBuf, StageError> {
    if let Some(input) = &params.input {
        return Ok(PathBuf::from(input));
    }
    let paths: Vec<&str> = ctx.inputs.values().filter_map(|output| output.get("path")?.as_str()).collect();
    match paths.as_slice() {
        [one] => Ok(PathBuf::from(one)),
        [] => Err(StageError::permanent(
            ErrorCode::NoInput,
            format!("stage `{}` has no input: no ancestor outputs a `path`; set `with.input`", ctx.stage_id),
        )),
        _ => Err(StageError::permanent(
            ErrorCode::NoInput,
            format!("stage `{}` has several ancestors with a `path`; set `with.input`", ctx.stage_id),
        )),
    }
}

/// Reads ffmpeg's CSV segment list: `name,start,end` per line.
fn read_segment_list(list: &Path, dir: &Path) -> Result<Vec<(PathBuf, f64, f64)>, StageError> {
    let text = std::fs::read_to_string(list)
        .map_err(|error| StageError::transient(ErrorCode::Io, format!("reading {}: {error}", list.display())))?;
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let mut fields = line.rsplitn(3, ',');
            let end = fields.next().and_then(|f| f.trim().parse::<f64>().ok());
            let start = fields.next().and_then(|f| f.trim().parse::<f64>().ok());
            let name = fields.next().map(|name| name.trim_matches('"'));
            match (name, start, end) {
                (Some(name), Some(start), Some(end)) => Ok((dir.join(name), start, end)),
                _ => Err(StageError::permanent(ErrorCode::Transcode, format!("unreadable segment list line `{line}`"))),
            }
        })
        .collect()
}

fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

#[async_trait::async_trait]
impl Stage for TranscodeStage {
    async fn run(&self, ctx: StageContext) -> Result<StageOutput, StageError> {
        let params: TranscodeParams = super::params(&ctx)?;
        let input = input_path(&params, &ctx)?;
        let input_text = input.display().to_string();
        let codec = params.codec.unwrap_or_default();
        let sample_rate = params.sample_rate.unwrap_or(16_000);
        let bitrate = params.bitrate.unwrap_or(Bitrate(32_000));
        let max_duration = params.max_chunk_duration.map_or(20.0 * 60.0, |d| d.0.as_secs_f64());
        let max_bytes = params.max_chunk_bytes.unwrap_or(ByteSize(24 << 20));
        let overlap = params.overlap.map_or(0.0, |d| d.0.as_secs_f64());

        // ffmpeg reads the input (which came from outside) through a relay, so that nothing it points at is
        // opened; its own output below it reads directly.
        let relay = Relay::start(Arc::new(FileOrigin(input.clone())), &input_text, None).await.map_err(|error| {
            StageError::transient(ErrorCode::Relay, format!("cannot start the loopback relay: {error}"))
        })?;
        let source_input = relay.input();
        let source = probe::probe(&source_input, &ctx.cancel).await;
        points_elsewhere(&relay)?;
        let source = source.map_err(|error| media_error(source_input.clean_error(error)))?;
        if source.audio().is_none() {
            return Err(StageError::permanent(ErrorCode::NoAudio, format!("{input_text} has no audio stream")));
        }
        let source_duration = source.duration.unwrap_or(0.0);
        let size = std::fs::metadata(&input).map(|m| m.len()).unwrap_or(u64::MAX);
        if params.passthrough.unwrap_or(false)
            && size <= max_bytes.0
            && source_duration <= max_duration - DURATION_MARGIN
            && PASSTHROUGH_FORMATS.contains(&source.format.as_str())
            && !source.has_video()
        {
            ctx.progress.report(1.0, "already fits; used as it is");
            let chunk = json!({ "path": input, "start": 0.0, "end": source_duration, "bytes": size });
            let format = source.format.split(',').next().unwrap_or_default().to_string();
            return Ok(StageOutput {
                value: json!({ "chunks": [chunk], "duration": source_duration, "format": format, "passthrough": true }),
                files: vec![input],
            });
        }

        let work_dir =
            ctx.work_dir.ensure().map_err(|error| StageError::transient(ErrorCode::Io, error.to_string()))?;
        let dir = work_dir.join(format!("{}-chunks", ctx.stage_id));
        std::fs::create_dir_all(&dir)
            .map_err(|error| StageError::transient(ErrorCode::Io, format!("creating {}: {error}", dir.display())))?;
        let extension = codec.extension();
        let full = dir.join(format!("full.{extension}"));
        let mut args = source_input.args();
        args.extend(os(&["-map", "0:a:0", "-vn", "-ac", "1", "-ar", &sample_rate.to_string()]));
        let split = params.split_at_silence.unwrap_or(false);
        if split {
            let threshold = params.silence_threshold.as_ref().map_or_else(|| "-30dB".into(), ToString::to_string);
            let minimum = params.min_silence.map_or(0.5, |d| d.0.as_secs_f64());
            // Convert first, so silencedetect listens to 16 kHz mono rather than to the source's full rate.
            let filter = format!(
                "aformat=sample_rates={sample_rate}:channel_layouts=mono,silencedetect=noise={threshold}:d={minimum}"
            );
            args.extend(os(&["-af", &filter]));
        }
        args.extend(codec.encoder_args(bitrate).iter().map(OsString::from));
        args.push(full.clone().into());
        let mut silences = SilenceLog::default();
        let progress = ctx.progress.clone();
        ctx.progress.report(0.0, "transcoding");
        let transcoded = ffmpeg::run(
            &args,
            &input_text,
            Some(source_duration),
            |fraction| progress.report(fraction * 0.9, "transcoding"),
            |line| silences.feed(line),
            &ctx.cancel,
        )
        .await;
        points_elsewhere(&relay)?;
        transcoded.map_err(|error| media_error(source_input.clean_error(error)))?;
        drop(relay);

        let full_text = full.display().to_string();
        let full_input = MediaInput::own_file(&full);
        let duration =
            probe::probe(&full_input, &ctx.cancel).await.map_err(media_error)?.duration.unwrap_or(source_duration);
        let silences = silences.finish(duration);
        // An overlapped chunk also carries `overlap` seconds from before its cut, within the same limit.
        let limit = (max_duration - DURATION_MARGIN - overlap)
            .min(max_bytes.0 as f64 * 0.95 / codec.bytes_per_second(bitrate, sample_rate));
        if limit <= 1.0 {
            return Err(StageError::permanent(
                ErrorCode::ChunkLimits,
                "max_chunk_bytes and max_chunk_duration leave less than a second per chunk",
            ));
        }
        let cuts = cut_points(duration, limit, split.then_some(silences.as_slice()));
        ctx.progress.report(0.92, format!("cutting {} chunks", cuts.len() + 1));
        let chunks: Vec<(PathBuf, f64, f64)> = if cuts.is_empty() {
            let only = dir.join(format!("chunk_000.{extension}"));
            std::fs::rename(&full, &only).map_err(|error| StageError::transient(ErrorCode::Io, error.to_string()))?;
            vec![(only, 0.0, duration)]
        } else if codec == AudioCodec::Flac || overlap > 0.0 {
            // One extraction per chunk: FLAC needs its own header per file, and overlapping chunks cannot come
            // from the segment muxer. Starts are measured from each chunk's real length.
            let mut bounds = vec![0.0];
            bounds.extend(&cuts);
            bounds.push(duration);
            let mut chunks = Vec::with_capacity(bounds.len() - 1);
            for (index, pair) in bounds.windows(2).enumerate() {
                let from = if index == 0 { 0.0 } else { (pair[0] - overlap).max(0.0) };
                let target = dir.join(format!("chunk_{index:03}.{extension}"));
                let mut args = os(&["-ss", &format!("{from:.3}"), "-to", &format!("{:.3}", pair[1])]);
                args.extend(full_input.args());
                args.extend(os(&["-map", "0:a"]));
                args.extend(codec.cut_args(bitrate).iter().map(OsString::from));
                args.push(target.clone().into());
                ffmpeg::run(&args, &full_text, None, |_| {}, |_| {}, &ctx.cancel).await.map_err(media_error)?;
                let probed = probe::probe(&MediaInput::own_file(&target), &ctx.cancel).await.map_err(media_error)?;
                let length = probed.duration.unwrap_or(pair[1] - from);
                let end = if index + 2 == bounds.len() { duration } else { pair[1] };
                chunks.push((target, (end - length).max(0.0), end));
            }
            chunks
        } else {
            let times: Vec<String> = cuts.iter().map(|cut| format!("{cut:.3}")).collect();
            let list = dir.join("chunks.csv");
            let pattern = dir.join(format!("chunk_%03d.{extension}"));
            let mut args = full_input.args();
            args.extend(os(&["-map", "0:a"]));
            args.extend(codec.cut_args(bitrate).iter().map(OsString::from));
            args.extend(os(&["-f", "segment", "-segment_times", &times.join(",")]));
            args.extend(os(&["-reset_timestamps", "1", "-segment_list_type", "csv", "-segment_list"]));
            args.push(list.clone().into());
            args.push(pattern.into());
            ffmpeg::run(&args, &full_text, None, |_| {}, |_| {}, &ctx.cancel).await.map_err(media_error)?;
            read_segment_list(&list, &dir)?
        };
        let _ = std::fs::remove_file(&full);

        let mut listed = Vec::with_capacity(chunks.len());
        for (index, (path, start, end)) in chunks.iter().enumerate() {
            let bytes = std::fs::metadata(path)
                .map_err(|error| StageError::transient(ErrorCode::Io, format!("{}: {error}", path.display())))?
                .len();
            if bytes > max_bytes.0 {
                return Err(StageError::permanent(
                    ErrorCode::ChunkTooLarge,
                    format!(
                        "chunk {index} is {}, over max_chunk_bytes {}; lower the bitrate or max_chunk_duration",
                        ByteSize(bytes).human(),
                        max_bytes.human()
                    ),
                ));
            }
            listed.push(json!({ "path": path, "start": start, "end": end, "bytes": bytes }));
        }
        ctx.progress.report(1.0, format!("{} chunks", listed.len()));
        let files = chunks.into_iter().map(|(path, _, _)| path).collect();
        Ok(StageOutput {
            value: json!({
                "chunks": Value::Array(listed),
                "duration": duration,
                "format": extension,
                "silences": silences.len(),
            }),
            files,
        })
    }
}
