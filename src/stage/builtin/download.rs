//! `download`: streams the source into the job's work directory with memory that does not grow with the file.
//!
//! - `http(s)://` and `supabase://` sources go through the [`Fetcher`] (manual redirects, internal addresses
//!   refused unless allow-listed). A connection that drops is resumed with `Range` from the bytes already on
//!   disk, up to `resume_attempts` times; the final size is checked against what the server announced.
//! - A local file (under the storage root, or typed on the command line) is not copied: the output points at
//!   it, and the checkpoint is reused only while it exists.
//! - 404 and other 4xx are permanent; 5xx, 429 and network failures are retried by the engine.

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::Method;
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, HeaderMap, HeaderValue, RANGE};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::AsyncWriteExt;

use crate::error::ErrorCode;
use crate::job::{StageError, StageOutput};
use crate::source::{Fetcher, Source, check_status};
use crate::stage::{Stage, StageContext};
use crate::units::ByteSize;

/// `with` parameters of `download`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DownloadParams {
    /// Stop and fail when the body grows past this size (default: the `MAX_FILE_SIZE_MB` setting).
    pub max_size: Option<ByteSize>,
    /// How many times a dropped connection is resumed with `Range` before the attempt fails (default 5).
    pub resume_attempts: Option<u32>,
}

/// The `download` stage.
#[derive(Debug, Clone)]
pub struct DownloadStage {
    fetcher: Fetcher,
    default_max_size: ByteSize,
}

/// Pause before resuming a dropped connection: long enough for a blip to pass, short next to a download.
const RESUME_PAUSE: Duration = Duration::from_millis(500);
/// Resumes per attempt unless the pipeline says otherwise.
const DEFAULT_RESUMES: u32 = 5;

impl DownloadStage {
    /// A download stage reading sources through `fetcher`.
    pub fn new(fetcher: Fetcher, default_max_size: ByteSize) -> Self {
        Self { fetcher, default_max_size }
    }
}

/// A file name for the download: the URL's last path segment when it is a plain name, else `source`.
fn file_name(source: &Source) -> String {
    let last = match source {
        Source::Http(url) => {
            url.path_segments().and_then(|mut segments| segments.next_back()).unwrap_or_default().to_string()
        }
        Source::Supabase { path, .. } => path.rsplit('/').next().unwrap_or_default().to_string(),
        Source::Local(path) => path.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default(),
    };
    let safe = !last.is_empty()
        && last.len() <= 100
        && !last.starts_with('.')
        && last.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if safe { format!("source-{last}") } else { "source".to_string() }
}

/// The total size from `Content-Range: bytes a-b/total`.
fn range_total(headers: &HeaderMap) -> Option<u64> {
    headers.get(CONTENT_RANGE)?.to_str().ok()?.rsplit('/').next()?.parse().ok()
}

impl DownloadStage {
    async fn fetch(
        &self,
        source: &Source,
        target: &Path,
        params: &DownloadParams,
        ctx: &StageContext,
    ) -> Result<u64, StageError> {
        let max = params.max_size.unwrap_or(self.default_max_size);
        let resumes = params.resume_attempts.unwrap_or(DEFAULT_RESUMES);
        let (url, headers) = self.fetcher.locate(source)?;
        let printable = crate::media::printable(url.as_str());
        let io = |error: std::io::Error| {
            StageError::transient(ErrorCode::Io, format!("writing {}: {error}", target.display()))
        };
        let mut file = tokio::fs::File::create(target).await.map_err(io)?;
        let mut written: u64 = 0;
        let mut expected: Option<u64> = None;
        let mut resumed = 0;
        loop {
            let mut request = headers.clone();
            if written > 0 {
                let range = HeaderValue::from_str(&format!("bytes={written}-"))
                    .map_err(|e| StageError::permanent(ErrorCode::Range, e.to_string()))?;
                request.insert(RANGE, range);
            }
            let (response, final_url) = self.fetcher.send(Method::GET, url.clone(), request, &ctx.cancel).await?;
            let mut response = check_status(response, final_url.as_str())?;
            let partial = response.status() == reqwest::StatusCode::PARTIAL_CONTENT;
            if written > 0 && !partial {
                // The server ignored Range and sends everything again: start over.
                file.set_len(0).await.map_err(io)?;
                file = tokio::fs::File::create(target).await.map_err(io)?;
                written = 0;
            }
            let announced = if partial {
                range_total(response.headers())
            } else {
                response.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())
            };
            if let Some(total) = announced {
                if expected.is_some_and(|known| known != total) {
                    return Err(StageError::transient(
                        ErrorCode::Changed,
                        format!("{printable} changed size during the download"),
                    ));
                }
                if total > max.0 {
                    return Err(StageError::permanent(
                        ErrorCode::TooLarge,
                        format!("{printable} is {}, over the limit of {}", ByteSize(total).human(), max.human()),
                    ));
                }
                expected = Some(total);
            }
            let broke = loop {
                let chunk = tokio::select! {
                    chunk = response.chunk() => chunk,
                    () = ctx.cancel.cancelled() => return Err(StageError::cancelled()),
                };
                match chunk {
                    Ok(Some(bytes)) => {
                        written += bytes.len() as u64;
                        if written > max.0 {
                            return Err(StageError::permanent(
                                ErrorCode::TooLarge,
                                format!("{printable} is over the limit of {}", max.human()),
                            ));
                        }
                        file.write_all(&bytes).await.map_err(io)?;
                        if let Some(total) = expected.filter(|total| *total > 0) {
                            ctx.progress.report(
                                written as f64 / total as f64,
                                format!("{} of {}", ByteSize(written).human(), ByteSize(total).human()),
                            );
                        }
                    }
                    Ok(None) => break None,
                    Err(error) => break Some(error.to_string()),
                }
            };
            if broke.is_none() && expected.is_none_or(|total| written == total) {
                break;
            }
            if resumed >= resumes {
                let reason = broke.unwrap_or_else(|| "the connection closed early".into());
                return Err(StageError::transient(
                    ErrorCode::Incomplete,
                    format!(
                        "{printable}: got {written} of {} bytes after {resumed} resumes: {reason}",
                        expected.unwrap_or(0)
                    ),
                ));
            }
            resumed += 1;
            tracing::info!(url = %printable, written, resumed, "download interrupted; resuming with Range");
            tokio::select! {
                () = tokio::time::sleep(RESUME_PAUSE) => {}
                () = ctx.cancel.cancelled() => return Err(StageError::cancelled()),
            }
        }
        file.flush().await.map_err(io)?;
        file.sync_all().await.map_err(io)?;
        if let Some(total) = expected.filter(|total| *total != written) {
            return Err(StageError::transient(
                ErrorCode::SizeMismatch,
                format!("{printable}: expected {total} bytes, got {written}"),
            ));
        }
        Ok(written)
    }
}

#[async_trait::async_trait]
impl Stage for DownloadStage {
    async fn run(&self, ctx: StageContext) -> Result<StageOutput, StageError> {
        let params: DownloadParams = super::params(&ctx)?;
        let text = ctx
            .job
            .source
            .as_deref()
            .ok_or_else(|| StageError::permanent(ErrorCode::NoSource, "the job has no source"))?;
        let source = Source::parse(text, ctx.job.trusted_source, self.fetcher.policy())?;
        if let Source::Local(path) = &source {
            let metadata = tokio::fs::metadata(path).await.map_err(|error| {
                StageError::permanent(ErrorCode::Unreadable, format!("cannot read {}: {error}", path.display()))
            })?;
            ctx.progress.report(1.0, "local file, nothing to download");
            return Ok(StageOutput {
                value: json!({ "path": path, "bytes": metadata.len(), "downloaded": false }),
                files: vec![path.clone()],
            });
        }
        let work_dir =
            ctx.work_dir.ensure().map_err(|error| StageError::transient(ErrorCode::Io, error.to_string()))?;
        let target: PathBuf = work_dir.join(file_name(&source));
        let bytes = match self.fetch(&source, &target, &params, &ctx).await {
            Ok(bytes) => bytes,
            Err(error) => {
                let _ = tokio::fs::remove_file(&target).await;
                return Err(error);
            }
        };
        Ok(StageOutput { value: json!({ "path": target, "bytes": bytes, "downloaded": true }), files: vec![target] })
    }
}
