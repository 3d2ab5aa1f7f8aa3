//! `whisper`: transcribes every chunk of `transcode`'s output through the provider (concurrently, within its
//! limits), shifts each chunk's segments by the chunk's real start, drops text duplicated in overlaps, and
//! stitches one timeline with SRT and VTT.
//!
//! Money is not spent twice: each chunk's transcript is checkpointed as soon as it arrives, keyed by the SHA-256
//! of the chunk's bytes, so a retried or recovered job (which re-creates identical chunks) sends no chunk again,
//! whichever build of the worker runs it.
//!
//! Prompt continuity: a chunk is sent with the tail of the previous chunk's text as `prompt` when that chunk
//! has already been transcribed and looks sane (mean log probability ≥ −1, compression ratio ≤ 2.4, not a
//! repetition loop). With several chunks in flight at once the first few are sent without it; concurrency wins
//! over continuity, and with `max_concurrent = 1` every chunk gets its predecessor's tail.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio::sync::Semaphore;

use crate::ai::client::{Segment, Transcription, TranscriptionRequest};
use crate::ai::{Providers, Usage};
use crate::error::ErrorCode;
use crate::job::{StageError, StageOutput};
use crate::stage::{Stage, StageContext};

/// `with` parameters of `whisper`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WhisperParams {
    /// Named AI provider from the settings (default: the default provider).
    pub provider: Option<String>,
    /// Deployment (Azure) or model (OpenAI-style) to use instead of the provider's transcription default.
    pub model: Option<String>,
    /// ISO-639-1 language of the audio; empty or absent means detect it.
    pub language: Option<String>,
    /// Words the model should expect (names, jargon), sent as the first chunk's prompt.
    pub prompt: Option<String>,
    /// Sampling temperature between 0 and 1.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub temperature: Option<f64>,
    /// Subtitle formats to produce besides the text and segments.
    pub formats: Option<Vec<SubtitleFormat>>,
    /// The chunks (default: the `chunks` output of the one ancestor that has them, i.e. `transcode`).
    pub chunks: Option<Vec<ChunkRef>>,
}

/// Subtitle formats generated from the stitched segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SubtitleFormat {
    /// SubRip.
    Srt,
    /// WebVTT.
    Vtt,
}

/// One chunk to transcribe, as `transcode` describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ChunkRef {
    /// The audio file.
    pub path: PathBuf,
    /// Its real start in the recording, seconds.
    pub start: f64,
    /// Its real end, seconds.
    pub end: f64,
}

/// The `whisper` stage.
#[derive(Debug, Clone)]
pub struct WhisperStage {
    providers: Arc<Providers>,
}

impl WhisperStage {
    /// Transcribes through `providers`.
    pub fn new(providers: Arc<Providers>) -> Self {
        Self { providers }
    }
}

/// Words of the previous chunk passed as prompt: about the ~224 tokens Whisper actually uses.
const PROMPT_WORDS: usize = 150;

fn chunks_of(params: &WhisperParams, ctx: &StageContext) -> Result<Vec<ChunkRef>, StageError> {
    if let Some(chunks) = &params.chunks {
        return Ok(chunks.clone());
    }
    let found: Vec<&Value> = ctx.inputs.values().filter_map(|output| output.get("chunks")).collect();
    match found.as_slice() {
        [chunks] => serde_json::from_value((*chunks).clone()).map_err(|error| {
            StageError::permanent(
                ErrorCode::InvalidParams,
                format!("stage `{}`: unreadable chunks: {error}", ctx.stage_id),
            )
        }),
        _ => Err(StageError::permanent(
            ErrorCode::NoInput,
            format!(
                "stage `{}` needs exactly one ancestor with `chunks` (a transcode stage), or `with.chunks`",
                ctx.stage_id
            ),
        )),
    }
}

/// The SHA-256 of the file's bytes in hex, naming its checkpoint. The file is streamed, never held whole, and the
/// hash is the same in every build (std's `DefaultHasher` may change between Rust releases, which would make a
/// worker built by another toolchain pay for every chunk again).
async fn content_key(path: &std::path::Path) -> Result<String, StageError> {
    let io =
        |error: std::io::Error| StageError::transient(ErrorCode::Io, format!("reading {}: {error}", path.display()));
    let mut file = tokio::fs::File::open(path).await.map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        let read = file.read(&mut buffer).await.map_err(io)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hasher.finalize().iter().map(|byte| format!("{byte:02x}")).collect())
}

/// Whether a transcript is fit to be fed back as the next chunk's prompt.
fn looks_sane(transcription: &Transcription) -> bool {
    if transcription.text.trim().is_empty() {
        return false;
    }
    let segments = &transcription.segments;
    if !segments.is_empty() {
        let bad = segments
            .iter()
            .filter(|s| s.avg_logprob.is_some_and(|p| p < -1.0) || s.compression_ratio.is_some_and(|r| r > 2.4))
            .count();
        if bad * 10 > segments.len() {
            return false;
        }
    }
    let words: Vec<&str> = transcription.text.split_whitespace().collect();
    if words.len() >= 20 {
        let distinct: std::collections::HashSet<&str> = words.iter().copied().collect();
        if distinct.len() * 10 < words.len() * 3 {
            return false;
        }
    }
    true
}

fn tail(text: &str) -> String {
    let words: Vec<&str> = text.split_whitespace().collect();
    words[words.len().saturating_sub(PROMPT_WORDS)..].join(" ")
}

/// Global segments from chunk transcripts: shifted by each chunk's start; in an overlap, chunk k keeps what
/// ends before the overlap's middle and chunk k+1 what starts after it.
pub fn stitch(chunks: &[ChunkRef], transcripts: &[Transcription]) -> Vec<Segment> {
    let mut stitched = Vec::new();
    for (index, (chunk, transcript)) in chunks.iter().zip(transcripts).enumerate() {
        let from = match index.checked_sub(1).map(|previous| &chunks[previous]) {
            Some(previous) if chunk.start < previous.end => (chunk.start + previous.end) / 2.0,
            _ => f64::NEG_INFINITY,
        };
        let until = match chunks.get(index + 1) {
            Some(next) if next.start < chunk.end => (next.start + chunk.end) / 2.0,
            _ => f64::INFINITY,
        };
        let local: Vec<Segment> = if transcript.segments.is_empty() {
            vec![Segment {
                start: 0.0,
                end: chunk.end - chunk.start,
                text: transcript.text.clone(),
                avg_logprob: None,
                compression_ratio: None,
            }]
        } else {
            transcript.segments.clone()
        };
        for segment in local {
            let start = (chunk.start + segment.start).max(chunk.start);
            let end = (chunk.start + segment.end).min(chunk.end.max(start));
            let middle = (start + end) / 2.0;
            if middle >= from && middle < until && !segment.text.is_empty() {
                stitched.push(Segment { start, end, text: segment.text, avg_logprob: None, compression_ratio: None });
            }
        }
    }
    stitched
}

/// The stitched segments as subtitle cues.
fn cues(segments: &[Segment]) -> Vec<crate::subtitle::Cue> {
    segments.iter().map(|s| crate::subtitle::Cue { start: s.start, end: s.end, text: s.text.clone() }).collect()
}

/// SubRip subtitles (see [`crate::subtitle`] for the rules).
pub fn srt(segments: &[Segment]) -> String {
    crate::subtitle::srt(&cues(segments))
}

/// WebVTT subtitles (see [`crate::subtitle`] for the rules).
pub fn vtt(segments: &[Segment]) -> String {
    crate::subtitle::vtt(&cues(segments))
}

#[async_trait::async_trait]
impl Stage for WhisperStage {
    async fn run(&self, ctx: StageContext) -> Result<StageOutput, StageError> {
        let params: WhisperParams = super::params(&ctx)?;
        let provider = self.providers.get(params.provider.as_deref())?;
        let chunks = chunks_of(&params, &ctx)?;
        if chunks.is_empty() {
            return Err(StageError::permanent(
                ErrorCode::NoInput,
                format!("stage `{}`: there are no chunks to transcribe", ctx.stage_id),
            ));
        }
        let saved = ctx
            .checkpoints
            .load(&ctx.job.id)
            .await
            .map_err(|e| StageError::transient(ErrorCode::Checkpoint, e.to_string()))?;
        let mut keys = Vec::with_capacity(chunks.len());
        for chunk in &chunks {
            keys.push(format!("{}/chunk/{}", ctx.stage_id, content_key(&chunk.path).await?));
        }
        let results: Arc<Mutex<Vec<Option<Transcription>>>> = Arc::new(Mutex::new(
            keys.iter()
                .map(|key| saved.get(key).and_then(|output| serde_json::from_value(output.value.clone()).ok()))
                .collect(),
        ));
        let cached = results.lock().map(|r| r.iter().flatten().count()).unwrap_or(0);
        let total = chunks.len();
        let language = params.language.clone().filter(|l| !l.is_empty());
        let slots = Arc::new(Semaphore::new(provider.settings().max_concurrent.max(1)));
        let stop = ctx.cancel.child_token();
        let usage = Arc::new(Mutex::new(Usage::default()));
        let done = Arc::new(std::sync::atomic::AtomicUsize::new(cached));
        let mut running = tokio::task::JoinSet::new();
        for (index, chunk) in chunks.iter().enumerate() {
            if results.lock().map(|r| r[index].is_some()).unwrap_or(false) {
                continue;
            }
            // Dispatch in order, one free slot at a time, so that a chunk whose predecessor is done gets its tail.
            let slot = tokio::select! {
                slot = slots.clone().acquire_owned() => slot.map_err(|_| StageError::cancelled())?,
                () = stop.cancelled() => break,
            };
            let prompt = {
                let results = results.lock().map_err(|_| StageError::permanent(ErrorCode::Panic, "poisoned"))?;
                match index.checked_sub(1).and_then(|previous| results[previous].as_ref()) {
                    Some(previous) if looks_sane(previous) => Some(tail(&previous.text)),
                    Some(_) => None,
                    None if index == 0 => params.prompt.clone(),
                    None => None,
                }
            };
            let request = TranscriptionRequest {
                file: chunk.path.clone(),
                prompt,
                language: language.clone(),
                temperature: params.temperature,
                model: params.model.clone(),
            };
            let (provider, results, usage, done, stop, key) =
                (provider.clone(), results.clone(), usage.clone(), done.clone(), stop.clone(), keys[index].clone());
            let (checkpoints, job_id, progress) = (ctx.checkpoints.clone(), ctx.job.id.clone(), ctx.progress.clone());
            running.spawn(async move {
                let _slot = slot;
                let (transcription, spent) = match provider.transcribe(&request, &stop).await {
                    Ok(answer) => answer,
                    Err(error) => {
                        stop.cancel();
                        return Err(StageError::from(error));
                    }
                };
                let value = serde_json::to_value(&transcription).unwrap_or_default();
                checkpoints
                    .save(&job_id, &key, &StageOutput::from(value))
                    .await
                    .map_err(|e| StageError::transient(ErrorCode::Checkpoint, e.to_string()))?;
                if let Ok(mut usage) = usage.lock() {
                    *usage += spent;
                }
                if let Ok(mut results) = results.lock() {
                    results[index] = Some(transcription);
                }
                let finished = done.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                progress.report(finished as f64 / total as f64, format!("transcribed chunk {finished} of {total}"));
                Ok(())
            });
        }
        let mut first_error: Option<StageError> = None;
        while let Some(joined) = running.join_next().await {
            let outcome =
                joined.unwrap_or_else(|error| Err(StageError::permanent(ErrorCode::Panic, error.to_string())));
            if let Err(error) = outcome
                && first_error.as_ref().is_none_or(StageError::is_cancelled)
            {
                first_error = Some(error);
            }
        }
        if ctx.cancel.is_cancelled() {
            return Err(StageError::cancelled());
        }
        if let Some(error) = first_error {
            return Err(error);
        }
        let transcripts: Vec<Transcription> = results
            .lock()
            .map_err(|_| StageError::permanent(ErrorCode::Panic, "poisoned"))?
            .iter()
            .map(|result| {
                result
                    .clone()
                    .ok_or_else(|| StageError::transient(ErrorCode::Incomplete, "a chunk was not transcribed"))
            })
            .collect::<Result<_, _>>()?;
        let segments = stitch(&chunks, &transcripts);
        let text = segments.iter().map(|s| s.text.as_str()).collect::<Vec<_>>().join(" ");
        let detected = transcripts.iter().find_map(|t| t.language.clone());
        let duration = chunks.iter().map(|c| c.end).fold(0.0, f64::max);
        let formats = params.formats.unwrap_or_default();
        let usage = *usage.lock().map_err(|_| StageError::permanent(ErrorCode::Panic, "poisoned"))?;
        let mut output = json!({
            "text": text,
            "language": language.or(detected),
            "duration": duration,
            "segments": segments.iter().map(|s| json!({ "start": s.start, "end": s.end, "text": s.text })).collect::<Vec<_>>(),
            "usage": { "requests": usage.requests, "audio_seconds": usage.audio_seconds, "chunks": total, "cached_chunks": cached },
        });
        if formats.contains(&SubtitleFormat::Srt) {
            output["srt"] = json!(srt(&segments));
        }
        if formats.contains(&SubtitleFormat::Vtt) {
            output["vtt"] = json!(vtt(&segments));
        }
        Ok(StageOutput::from(output))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(start: f64, end: f64, text: &str) -> Segment {
        Segment { start, end, text: text.into(), avg_logprob: None, compression_ratio: None }
    }

    #[test]
    fn stitching_shifts_and_drops_overlap_duplicates() {
        let chunks = [
            ChunkRef { path: "a".into(), start: 0.0, end: 12.0 },
            ChunkRef { path: "b".into(), start: 10.0, end: 20.0 },
        ];
        let first = Transcription {
            text: String::new(),
            language: None,
            duration: None,
            segments: vec![segment(0.0, 6.0, "one"), segment(6.0, 10.5, "two"), segment(10.5, 12.0, "three")],
        };
        let second = Transcription {
            text: String::new(),
            language: None,
            duration: None,
            segments: vec![segment(0.0, 2.0, "three"), segment(2.0, 10.0, "four")],
        };
        let stitched = stitch(&chunks, &[first, second]);
        let texts: Vec<&str> = stitched.iter().map(|s| s.text.as_str()).collect();
        assert_eq!(texts, ["one", "two", "three", "four"]);
        assert_eq!((stitched[3].start, stitched[3].end), (12.0, 20.0));
    }

    #[test]
    fn subtitles_have_the_standard_shapes() {
        let segments = [segment(0.0, 1.5, "hello"), segment(3661.25, 3662.0, "later")];
        assert_eq!(
            srt(&segments),
            "1\n00:00:00,000 --> 00:00:01,500\nhello\n\n2\n01:01:01,250 --> 01:01:02,000\nlater\n\n"
        );
        assert!(vtt(&segments).starts_with("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nhello\n\n"));
    }

    #[tokio::test]
    async fn chunk_keys_are_sha256_and_do_not_depend_on_the_toolchain() {
        // 200,000 bytes (several read buffers); the digest was computed independently with `sha256sum`.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chunk_000.mp3");
        let bytes: Vec<u8> = (0..200_000u32).map(|i| ((i * 7 + i / 251) % 256) as u8).collect();
        std::fs::write(&path, bytes).unwrap();
        assert_eq!(
            content_key(&path).await.unwrap(),
            "e870fec3223bac8f6147b08b31e6e6e4bb9abd783820bcd212b7737af6a02174"
        );
    }

    #[test]
    fn loops_and_doubtful_chunks_are_not_fed_back() {
        let good = Transcription {
            text: "we agreed to ship the release on friday after the review".into(),
            language: None,
            duration: None,
            segments: vec![],
        };
        assert!(looks_sane(&good));
        let looping = Transcription { text: "thank you ".repeat(30), language: None, duration: None, segments: vec![] };
        assert!(!looks_sane(&looping));
        let mut doubtful = good.clone();
        doubtful.segments = vec![Segment { avg_logprob: Some(-1.6), ..segment(0.0, 1.0, "x") }];
        assert!(!looks_sane(&doubtful));
        assert_eq!(tail(&"w ".repeat(400)).split_whitespace().count(), PROMPT_WORDS);
    }
}
