//! `validate`: checks the source where it lies, before anything is downloaded, so that a 500 MB upload that is
//! not media is refused at the cost of a few kilobytes. For a URL: a HEAD (size), a ranged read of the first
//! bytes (type, sniffed from the bytes, never the name) and ffprobe reading the source (streams, duration);
//! for a local file: the file itself. Then a short decode near the announced end catches truncated files.
//!
//! ffprobe and ffmpeg read through a loopback relay ([`crate::media::input`]) that fetches byte ranges of the
//! source through the checked [`Fetcher`], at most `max_size` bytes in all; they never see the URL, and a
//! file that points at other resources (an HLS playlist named `.mp3`) is refused without fetching them.
//!
//! Every refusal is a permanent error naming the reason: empty, over `max_size`, not media (and what it is),
//! no audio stream, over `max_duration`, truncated, or a type outside `accept`.

use std::ffi::OsString;
use std::sync::Arc;

use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, HeaderMap, HeaderValue, RANGE};
use reqwest::{Method, Url};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use crate::error::ErrorCode;
use crate::job::{StageError, StageOutput};
use crate::media::input::{Body, FileOrigin, MediaInput, Opened, Origin, Relay};
use crate::media::sniff::{SNIFF_LEN, matches, sniff};
use crate::media::{MediaError, ffmpeg, probe};
use crate::source::{Fetcher, Source, check_status};
use crate::stage::{Stage, StageContext};
use crate::units::{ByteSize, HumanDuration};

/// Default of `limits.max_duration`: a working day of recording.
pub const DEFAULT_MAX_DURATION: crate::units::HumanDuration =
    crate::units::HumanDuration(std::time::Duration::from_secs(8 * 3600));

/// `with` parameters of `validate`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ValidateParams {
    /// Largest accepted source (default: the `MAX_FILE_SIZE_MB` setting, 500 MB).
    pub max_size: Option<ByteSize>,
    /// Longest accepted recording, by the duration the file declares (default: the `limits.max_duration`
    /// setting, 8h).
    pub max_duration: Option<HumanDuration>,
    /// Accepted MIME types, sniffed from the bytes; `*` matches any subtype (default `["audio/*", "video/*"]`).
    pub accept: Option<Vec<String>>,
}

/// The `validate` stage.
#[derive(Debug, Clone)]
pub struct ValidateStage {
    fetcher: Fetcher,
    default_max_size: ByteSize,
    default_max_duration: HumanDuration,
}

/// Seconds decoded near the announced end to prove the file is whole.
const TAIL_CHECK: f64 = 1.0;

impl ValidateStage {
    /// A validate stage reading sources through `fetcher`, refusing files over `default_max_size` unless a
    /// pipeline sets its own `max_size`.
    /// Recordings declaring more than the `limits.max_duration` default (8h) are refused.
    pub fn new(fetcher: Fetcher, default_max_size: ByteSize) -> Self {
        Self { fetcher, default_max_size, default_max_duration: DEFAULT_MAX_DURATION }
    }

    /// Refuses recordings declaring more than `max_duration` unless a pipeline sets its own `max_duration`.
    #[must_use]
    pub fn with_max_duration(mut self, max_duration: HumanDuration) -> Self {
        self.default_max_duration = max_duration;
        self
    }
}

fn refuse(code: ErrorCode, message: impl Into<String>) -> StageError {
    StageError::permanent(code, message)
}

/// What can be learnt without reading the whole source: its size and first bytes.
struct Glance {
    size: Option<u64>,
    head: Vec<u8>,
}

impl ValidateStage {
    async fn glance(&self, source: &Source, ctx: &StageContext) -> Result<Glance, StageError> {
        if let Source::Local(path) = source {
            let unreadable = |error: std::io::Error| {
                refuse(ErrorCode::Unreadable, format!("cannot read {}: {error}", path.display()))
            };
            let metadata = tokio::fs::metadata(path).await.map_err(unreadable)?;
            if !metadata.is_file() {
                return Err(refuse(ErrorCode::NotAFile, format!("{} is not a file", path.display())));
            }
            let mut file = tokio::fs::File::open(path).await.map_err(unreadable)?;
            let mut head = vec![0; SNIFF_LEN];
            let mut read = 0;
            while read < SNIFF_LEN {
                match file.read(&mut head[read..]).await.map_err(unreadable)? {
                    0 => break,
                    n => read += n,
                }
            }
            head.truncate(read);
            return Ok(Glance { size: Some(metadata.len()), head });
        }
        let (url, headers) = self.fetcher.locate(source)?;
        let (response, head_url) = self.fetcher.send(Method::HEAD, url.clone(), headers.clone(), &ctx.cancel).await?;
        // A URL signed for GET (S3-style) answers 403 to HEAD, and some servers refuse HEAD; the ranged read
        // below then tells the size instead.
        let head_refused = matches!(response.status().as_u16(), 403 | 405 | 501);
        let mut size: Option<u64> = None;
        if !head_refused {
            let response = check_status(response, head_url.as_str())?;
            size = response.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
        }
        let mut ranged = headers;
        ranged.insert(RANGE, HeaderValue::from_static("bytes=0-63"));
        let (mut response, url) = self.fetcher.send(Method::GET, url, ranged, &ctx.cancel).await?;
        response = check_status(response, url.as_str())?;
        if size.is_none() {
            let header =
                |name| response.headers().get(name).and_then(|v: &HeaderValue| v.to_str().ok()).map(str::to_string);
            size = match response.status() {
                reqwest::StatusCode::PARTIAL_CONTENT => {
                    header(CONTENT_RANGE).and_then(|range| range.rsplit('/').next()?.parse().ok())
                }
                _ => header(CONTENT_LENGTH).and_then(|length| length.parse().ok()),
            };
        }
        let mut head = Vec::with_capacity(SNIFF_LEN);
        // A server that ignores Range sends the whole body; read only the first chunks and drop the rest.
        while head.len() < SNIFF_LEN {
            let chunk = tokio::select! {
                chunk = response.chunk() => chunk.map_err(|e| StageError::transient(ErrorCode::Network, format!("reading {}: {e}", crate::media::printable(url.as_str()))))?,
                () = ctx.cancel.cancelled() => return Err(StageError::cancelled()),
            };
            let Some(chunk) = chunk else { break };
            head.extend_from_slice(&chunk[..chunk.len().min(SNIFF_LEN - head.len())]);
        }
        drop(response);
        Ok(Glance { size, head })
    }

    /// A relay serving the source to ffprobe and ffmpeg: the local file, or byte ranges fetched through the
    /// checked fetcher, at most `budget` bytes of them.
    async fn relay(&self, source: &Source, budget: u64, ctx: &StageContext) -> Result<Relay, StageError> {
        let (origin, shown, budget): (Arc<dyn Origin>, String, Option<u64>) = match source {
            Source::Local(path) => (Arc::new(FileOrigin(path.clone())), path.display().to_string(), None),
            Source::Http(_) | Source::Supabase { .. } => {
                let (url, headers) = self.fetcher.locate(source)?;
                let shown = match source {
                    Source::Supabase { bucket, path } => format!("supabase://{bucket}/{path}"),
                    _ => crate::net::shown(&url),
                };
                let fetcher = self.fetcher.clone();
                (Arc::new(HttpOrigin { fetcher, url, headers, cancel: ctx.cancel.clone() }), shown, Some(budget))
            }
        };
        Relay::start(origin, &shown, budget).await.map_err(|error| {
            StageError::transient(ErrorCode::Relay, format!("cannot start the loopback relay: {error}"))
        })
    }
}

/// Bytes the relay reads and drops to reach a position when the server ignores `Range`.
const MAX_SKIP: u64 = 16 << 20;

/// A source read in byte ranges through the fetcher, for the relay.
struct HttpOrigin {
    fetcher: Fetcher,
    url: Url,
    headers: HeaderMap,
    cancel: CancellationToken,
}

/// A response body for the relay; the first `skip` bytes are dropped (a server that ignored `Range`).
struct ResponseBody {
    response: reqwest::Response,
    skip: u64,
}

#[async_trait::async_trait]
impl Body for ResponseBody {
    async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, String> {
        loop {
            let Some(chunk) = self.response.chunk().await.map_err(|error| error.without_url().to_string())? else {
                return Ok(None);
            };
            let dropped = self.skip.min(chunk.len() as u64);
            self.skip -= dropped;
            if dropped < chunk.len() as u64 {
                return Ok(Some(chunk[dropped as usize..].to_vec()));
            }
        }
    }
}

#[async_trait::async_trait]
impl Origin for HttpOrigin {
    async fn open(&self, start: u64, end: Option<u64>) -> Result<Opened, String> {
        let mut headers = self.headers.clone();
        let range = end.map_or_else(|| format!("bytes={start}-"), |end| format!("bytes={start}-{end}"));
        headers.insert(RANGE, HeaderValue::from_str(&range).map_err(|error| error.to_string())?);
        let (response, url) = self
            .fetcher
            .send(Method::GET, self.url.clone(), headers, &self.cancel)
            .await
            .map_err(|error| error.to_string())?;
        let response = check_status(response, url.as_str()).map_err(|error| error.to_string())?;
        let header = |name| response.headers().get(name).and_then(|v: &HeaderValue| v.to_str().ok());
        let (first, total) = if response.status() == reqwest::StatusCode::PARTIAL_CONTENT {
            // `bytes first-last/total`
            let range = header(CONTENT_RANGE).and_then(|range| range.strip_prefix("bytes "));
            let first = range.and_then(|range| range.split('-').next()?.parse::<u64>().ok());
            let total = range.and_then(|range| range.rsplit('/').next()?.parse::<u64>().ok());
            (first.unwrap_or(start), total)
        } else {
            (0, header(CONTENT_LENGTH).and_then(|length| length.parse().ok()))
        };
        if first > start {
            return Err(format!("{} answered a range starting at {first} for one starting at {start}", url.path()));
        }
        if start - first > MAX_SKIP {
            return Err(format!("{} ignores Range requests, so it cannot be read from the middle", url.path()));
        }
        Ok(Opened { total, body: Box::new(ResponseBody { response, skip: start - first }) })
    }
}

/// Why the tools' reading went wrong, when the relay knows better than their exit status: a resource other
/// than the source was asked for (the file points elsewhere), the byte budget ran out, or the source failed.
fn relay_trouble(relay: &Relay, max_size: ByteSize) -> Option<StageError> {
    if let Some(first) = relay.refused().first() {
        return Some(refuse(
            ErrorCode::NotMedia,
            format!(
                "the file is not a recording: it points at other resources (such as {first}), as a playlist does, \
                 and those are never fetched"
            ),
        ));
    }
    if relay.served() > max_size.0 {
        return Some(refuse(ErrorCode::TooLarge, format!("the file is over the limit of {max_size}")));
    }
    relay.failure().map(|failure| StageError::transient(ErrorCode::Network, format!("reading the source: {failure}")))
}

/// Decodes about a second just before the announced end; `false` when nothing decodes there.
async fn decodes_near_end(input: &MediaInput, duration: f64, ctx: &StageContext) -> Result<bool, StageError> {
    let start = (duration - 2.0 * TAIL_CHECK).max(0.0);
    let mut args: Vec<OsString> = vec!["-v".into(), "error".into(), "-ss".into(), format!("{start:.3}").into()];
    args.extend(input.args());
    args.extend(["-t", &TAIL_CHECK.to_string(), "-map", "0:a:0", "-f", "null", "-"].iter().map(OsString::from));
    let mut decoded: f64 = 0.0;
    let shown = input.shown();
    let result =
        ffmpeg::run(&args, shown, Some(TAIL_CHECK), |fraction| decoded = decoded.max(fraction), |_| {}, &ctx.cancel)
            .await
            .map_err(|error| input.clean_error(error));
    match result {
        Ok(()) => Ok(decoded > 0.0),
        Err(MediaError::Cancelled) => Err(StageError::cancelled()),
        Err(error @ MediaError::Spawn { .. }) => Err(StageError::transient(ErrorCode::Ffmpeg, error.to_string())),
        Err(MediaError::Failed { .. }) => Ok(false),
        Err(other) => Err(StageError::permanent(ErrorCode::Undecodable, other.to_string())),
    }
}

#[async_trait::async_trait]
impl Stage for ValidateStage {
    async fn run(&self, ctx: StageContext) -> Result<StageOutput, StageError> {
        let params: ValidateParams = super::params(&ctx)?;
        let text = ctx
            .job
            .source
            .as_deref()
            .ok_or_else(|| refuse(ErrorCode::NoSource, "the job has no source to validate"))?;
        let source = Source::parse(text, ctx.job.trusted_source, self.fetcher.policy())?;
        let max_size = params.max_size.unwrap_or(self.default_max_size);
        ctx.progress.report(0.05, "checking the source");

        let glance = self.glance(&source, &ctx).await?;
        if glance.size == Some(0) || glance.head.is_empty() {
            return Err(refuse(ErrorCode::Empty, "the file is empty (0 bytes)"));
        }
        if let Some(size) = glance.size.filter(|size| *size > max_size.0) {
            return Err(refuse(
                ErrorCode::TooLarge,
                format!("the file is {}, over the limit of {}", ByteSize(size).human(), max_size.human()),
            ));
        }
        let sniffed = sniff(&glance.head);
        if let (false, Some(mime)) = (sniffed.media, sniffed.mime) {
            return Err(refuse(ErrorCode::NotMedia, format!("the file is not audio or video: its bytes are {mime}")));
        }
        ctx.progress.report(0.3, "probing streams");
        let relay = self.relay(&source, max_size.0, &ctx).await?;
        let input = relay.input();
        let probed = probe::probe(&input, &ctx.cancel).await;
        if let Some(trouble) = relay_trouble(&relay, max_size) {
            return Err(trouble);
        }
        let probed = match probed {
            Ok(probed) => probed,
            Err(MediaError::Cancelled) => return Err(StageError::cancelled()),
            Err(error @ MediaError::Spawn { .. }) => {
                return Err(StageError::transient(ErrorCode::Ffprobe, error.to_string()));
            }
            Err(MediaError::Failed { stderr, .. }) => {
                return Err(refuse(ErrorCode::NotMedia, format!("the file is not readable audio or video: {stderr}")));
            }
            Err(error) => return Err(refuse(ErrorCode::NotMedia, error.to_string())),
        };
        let video = probed.has_video();
        let Some(audio) = probed.audio().cloned() else {
            let what = if video { "a video without sound" } else { "no audio stream" };
            return Err(refuse(ErrorCode::NoAudio, format!("the file has no audio to transcribe: {what}")));
        };
        let duration = probed.duration.unwrap_or(0.0);
        // Judged by what the header declares, before anything is downloaded, decoded or sent to be transcribed
        // (a 94 KB file can declare 100 hours).
        let limit = params.max_duration.unwrap_or(self.default_max_duration);
        if duration > limit.0.as_secs_f64() {
            // A crafted header can declare more seconds than a `Duration` holds.
            let length = std::time::Duration::try_from_secs_f64(duration.round()).unwrap_or(std::time::Duration::MAX);
            let length = HumanDuration(length);
            return Err(refuse(ErrorCode::TooLong, format!("the recording lasts {length}, over the limit of {limit}")));
        }
        ctx.progress.report(0.6, "checking that the audio decodes to the end");
        let whole = duration <= 0.0 || decodes_near_end(&input, duration, &ctx).await?;
        if let Some(trouble) = relay_trouble(&relay, max_size) {
            return Err(trouble);
        }
        drop(relay);
        if !whole {
            return Err(refuse(
                ErrorCode::Truncated,
                format!(
                    "the file is truncated or damaged: its header announces {duration:.1} s, but no audio decodes near the end"
                ),
            ));
        }
        let mime = sniffed.mime.map_or_else(
            || {
                format!(
                    "{}/x-{}",
                    if video { "video" } else { "audio" },
                    probed.format.split(',').next().unwrap_or("unknown")
                )
            },
            str::to_string,
        );
        let accept = params.accept.unwrap_or_else(|| vec!["audio/*".into(), "video/*".into()]);
        if !accept.iter().any(|pattern| matches(&mime, pattern)) {
            return Err(refuse(
                ErrorCode::UnsupportedType,
                format!("{mime} is not accepted here (accepted: {})", accept.join(", ")),
            ));
        }
        Ok(StageOutput::from(json!({
            "size": glance.size,
            "mime": mime,
            "duration": duration,
            "audio": { "codec": audio.codec, "sample_rate": audio.sample_rate, "channels": audio.channels },
            "video": video,
        })))
    }
}
