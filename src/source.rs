//! Where a job's media comes from, and the rules for reaching it.
//!
//! A source is an `http(s)://` URL (signed URLs included), `supabase://bucket/path` (Supabase Storage with the
//! service role key; public and signed Storage URLs of the configured project are treated the same way, since
//! the bucket may be private), or a local path (`file://` or plain). Local paths that arrive through the API
//! or the queue must stay under the storage root: `..` and symlinks out of it are refused. A path typed on
//! the `process` command line belongs to the user and is always allowed.
//!
//! HTTP requests go through the checked client of [`crate::net`]: redirects by hand, at most `max_redirects`
//! of them, and any host that resolves to a private, loopback, link-local or otherwise internal address is
//! refused unless it is allow-listed (optionally for one port), so a URL from the outside cannot make the
//! worker read internal services. Names are resolved once and the connection goes to the checked address.
//! The configured Supabase origin is trusted.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use reqwest::{Method, Response, StatusCode, Url};
use tokio_util::sync::CancellationToken;

use crate::error::ErrorCode;
use crate::job::StageError;
use crate::net::{AddressPolicy, HttpClient, NetError, Outgoing};
pub use crate::net::{AllowEntry, IpRange, is_internal};
use crate::secret::Secret;

/// Where media may come from.
#[derive(Debug, Clone, Default)]
pub struct SourcePolicy {
    /// Local paths from the API or queue must be under this folder.
    pub storage_root: PathBuf,
    /// Internal addresses (optionally with a port) that may be fetched anyway.
    pub allow_private: Vec<AllowEntry>,
    /// The Supabase project URL, for `supabase://` sources.
    pub supabase_url: Option<String>,
    /// The Supabase service role key.
    pub supabase_key: Option<Secret>,
    /// Redirects followed per request.
    pub max_redirects: usize,
}

/// A parsed source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// An HTTP or HTTPS URL.
    Http(Url),
    /// An object in Supabase Storage.
    Supabase {
        /// The bucket.
        bucket: String,
        /// The object path inside the bucket.
        path: String,
    },
    /// A local file.
    Local(PathBuf),
}

/// Why a source cannot be used or reached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// The source breaks a rule; retrying cannot help.
    #[error("source `{source_text}` refused: {reason}")]
    Refused {
        /// The source as given (query strings removed).
        source_text: String,
        /// Which rule.
        reason: String,
    },
    /// The server answered with an error status.
    #[error("{url} answered {status}")]
    Status {
        /// The URL (query removed).
        url: String,
        /// The status.
        status: StatusCode,
        /// `Retry-After`, when given.
        retry_after: Option<Duration>,
    },
    /// The server could not be reached or the connection broke.
    #[error("cannot reach {url}: {message}")]
    Network {
        /// The URL (query removed).
        url: String,
        /// What happened.
        message: String,
    },
    /// The job was cancelled.
    #[error("cancelled")]
    Cancelled,
}

impl From<SourceError> for StageError {
    fn from(error: SourceError) -> Self {
        match &error {
            SourceError::Refused { .. } => StageError::permanent(ErrorCode::SourceRefused, error.to_string()),
            SourceError::Status { status, retry_after, .. } => {
                let retry = status.is_server_error() || matches!(status.as_u16(), 408 | 425 | 429);
                if retry {
                    StageError::transient(ErrorCode::HttpStatus, error.to_string()).with_retry_after(*retry_after)
                } else {
                    StageError::permanent(ErrorCode::HttpStatus, error.to_string())
                }
            }
            SourceError::Network { .. } => StageError::transient(ErrorCode::Network, error.to_string()),
            SourceError::Cancelled => StageError::cancelled(),
        }
    }
}

fn printable(text: &str) -> String {
    crate::media::printable(text)
}

impl Source {
    /// Parses a job's source. `trusted` sources (typed by the user on the command line) skip the storage root.
    ///
    /// # Errors
    /// [`SourceError::Refused`] for unsupported schemes, paths outside the root and missing files.
    pub fn parse(text: &str, trusted: bool, policy: &SourcePolicy) -> Result<Self, SourceError> {
        let refuse = |reason: &str| SourceError::Refused { source_text: printable(text), reason: reason.to_string() };
        if let Some(rest) = text.strip_prefix("supabase://") {
            let (bucket, path) = rest
                .split_once('/')
                .filter(|(b, p)| !b.is_empty() && !p.is_empty())
                .ok_or_else(|| refuse("expected supabase://bucket/path/to/object"))?;
            return Ok(Self::Supabase { bucket: bucket.to_string(), path: path.to_string() });
        }
        if text.starts_with("http://") || text.starts_with("https://") {
            let url = Url::parse(text).map_err(|error| refuse(&format!("not a valid URL: {error}")))?;
            return Ok(Self::storage_object(&url, policy).unwrap_or(Self::Http(url)));
        }
        if text.contains("://") && !text.starts_with("file://") {
            return Err(refuse("only http(s)://, supabase:// and file paths are supported"));
        }
        let path = Path::new(text.strip_prefix("file://").unwrap_or(text));
        if trusted {
            return Ok(Self::Local(path.to_path_buf()));
        }
        if path.components().any(|component| matches!(component, Component::ParentDir)) {
            return Err(refuse("`..` is not allowed in a path"));
        }
        let root = policy
            .storage_root
            .canonicalize()
            .map_err(|_| refuse(&format!("the storage root {} does not exist", policy.storage_root.display())))?;
        let joined = if path.is_absolute() { path.to_path_buf() } else { root.join(path) };
        let real = joined.canonicalize().map_err(|_| refuse("no such file under the storage root"))?;
        if !real.starts_with(&root) {
            return Err(refuse("the path leads outside the storage root"));
        }
        Ok(Self::Local(real))
    }

    /// A public or signed Storage URL of the configured project, as the object it names.
    fn storage_object(url: &Url, policy: &SourcePolicy) -> Option<Self> {
        let base = Url::parse(policy.supabase_url.as_deref()?).ok()?;
        if url.origin() != base.origin() {
            return None;
        }
        let rest = url.path().strip_prefix("/storage/v1/object/")?;
        let rest = ["public/", "sign/", "authenticated/"].iter().find_map(|prefix| rest.strip_prefix(prefix))?;
        let (bucket, path) = rest.split_once('/')?;
        Some(Self::Supabase { bucket: bucket.to_string(), path: path.to_string() })
    }
}

/// Sends HTTP requests for sources under the [`SourcePolicy`], through the checked [`HttpClient`].
#[derive(Debug, Clone)]
pub struct Fetcher {
    http: HttpClient,
    policy: Arc<SourcePolicy>,
}

impl Fetcher {
    /// A fetcher for `policy`: its allow-list, its redirect limit, and the Supabase origin trusted.
    ///
    /// # Errors
    /// When the HTTP client cannot be built (TLS setup).
    pub fn new(policy: SourcePolicy) -> Result<Self, reqwest::Error> {
        let mut addresses = AddressPolicy { allow: policy.allow_private.clone(), trusted: Vec::new() };
        if let Some(base) = policy.supabase_url.as_deref().and_then(|base| Url::parse(base).ok()) {
            addresses.trust(&base);
        }
        let http = HttpClient::new(addresses, policy.max_redirects)?;
        Ok(Self { http, policy: Arc::new(policy) })
    }

    /// The policy in force.
    pub fn policy(&self) -> &SourcePolicy {
        &self.policy
    }

    /// The URL and headers that reach an HTTP or Supabase source.
    ///
    /// # Errors
    /// [`SourceError::Refused`] for Supabase sources when Supabase is not configured, or for local sources.
    pub fn locate(&self, source: &Source) -> Result<(Url, HeaderMap), SourceError> {
        match source {
            Source::Http(url) => Ok((url.clone(), HeaderMap::new())),
            Source::Supabase { bucket, path } => {
                let (base, key) = self.supabase(bucket, path)?;
                let url = Url::parse(&format!("{base}/storage/v1/object/{bucket}/{path}")).map_err(|error| {
                    SourceError::Refused {
                        source_text: format!("supabase://{bucket}/{path}"),
                        reason: error.to_string(),
                    }
                })?;
                Ok((url, supabase_headers(key)))
            }
            Source::Local(path) => Err(SourceError::Refused {
                source_text: path.display().to_string(),
                reason: "a local file is not fetched over HTTP".into(),
            }),
        }
    }

    fn supabase(&self, bucket: &str, path: &str) -> Result<(String, &Secret), SourceError> {
        match (&self.policy.supabase_url, &self.policy.supabase_key) {
            (Some(url), Some(key)) => Ok((url.trim_end_matches('/').to_string(), key)),
            _ => Err(SourceError::Refused {
                source_text: format!("supabase://{bucket}/{path}"),
                reason: "set SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY to read Supabase Storage".into(),
            }),
        }
    }

    /// Sends `method` to `url` through the checked client (see [`crate::net`]): redirects followed by hand,
    /// internal addresses refused unless allow-listed, headers dropped when a redirect leaves the origin.
    /// Returns the response and the final URL.
    ///
    /// # Errors
    /// [`SourceError`] for refused hosts, too many redirects, network failures and cancellation. Error
    /// statuses are returned as responses; use [`check_status`].
    pub async fn send(
        &self,
        method: Method,
        url: Url,
        headers: HeaderMap,
        cancel: &CancellationToken,
    ) -> Result<(Response, Url), SourceError> {
        Ok(self.http.send(Outgoing::new(method, url, headers), cancel).await?)
    }
}

impl From<NetError> for SourceError {
    fn from(error: NetError) -> Self {
        match error {
            NetError::Refused { url, reason } => SourceError::Refused { source_text: url, reason },
            NetError::Network { url, message } => SourceError::Network { url, message },
            NetError::Cancelled => SourceError::Cancelled,
        }
    }
}

fn supabase_headers(key: &Secret) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Ok(mut bearer) = HeaderValue::from_str(&format!("Bearer {}", key.expose())) {
        bearer.set_sensitive(true);
        headers.insert(AUTHORIZATION, bearer);
    }
    if let Ok(mut apikey) = HeaderValue::from_str(key.expose()) {
        apikey.set_sensitive(true);
        headers.insert("apikey", apikey);
    }
    headers
}

/// Longest wait a source's `Retry-After` can ask for.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// Turns an error status into a [`SourceError::Status`] (a `Retry-After` capped at [`MAX_RETRY_AFTER`]).
///
/// # Errors
/// When the status is not a success.
pub fn check_status(response: Response, url: &str) -> Result<Response, SourceError> {
    if response.status().is_success() {
        return Ok(response);
    }
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u64>().ok())
        // A server may ask for anything; no source is worth waiting more than this between attempts.
        .map(|seconds| Duration::from_secs(seconds.min(MAX_RETRY_AFTER.as_secs())));
    Err(SourceError::Status { url: printable(url), status: response.status(), retry_after })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse_and_local_paths_stay_under_the_root() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("a.mp3"), "x").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.path().join("escape.mp3")).unwrap();
        let policy = SourcePolicy { storage_root: root.path().to_path_buf(), ..SourcePolicy::default() };
        assert!(matches!(Source::parse("a.mp3", false, &policy), Ok(Source::Local(_))));
        for refused in
            ["file://../../etc/passwd", "../a.mp3", "escape.mp3", "/etc/passwd", "ftp://x/y", "supabase://bucket"]
        {
            assert!(
                matches!(Source::parse(refused, false, &policy), Err(SourceError::Refused { .. })),
                "{refused} is refused"
            );
        }
        assert_eq!(Source::parse("/etc/passwd", true, &policy), Ok(Source::Local("/etc/passwd".into())));
        assert_eq!(
            Source::parse("supabase://recordings/u1/a.webm", false, &policy),
            Ok(Source::Supabase { bucket: "recordings".into(), path: "u1/a.webm".into() })
        );
        let policy = SourcePolicy { supabase_url: Some("https://p.supabase.co".into()), ..policy };
        assert_eq!(
            Source::parse("https://p.supabase.co/storage/v1/object/public/recordings/u1/a.webm", false, &policy),
            Ok(Source::Supabase { bucket: "recordings".into(), path: "u1/a.webm".into() })
        );
    }
}
