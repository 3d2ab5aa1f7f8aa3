//! Where a job's media comes from, and the rules for reaching it.
//!
//! A source is an `http(s)://` URL (signed URLs included), `supabase://bucket/path` (Supabase Storage with the
//! service role key; public and signed Storage URLs of the configured project are treated the same way, since
//! the bucket may be private), or a local path (`file://` or plain). Local paths that arrive through the API
//! or the queue must stay under the storage root: `..` and symlinks out of it are refused. A path typed on
//! the `process` command line belongs to the user and is always allowed.
//!
//! HTTP requests follow redirects by hand, at most `max_redirects` of them, and refuse any host that resolves
//! to a private, loopback, link-local or otherwise internal address unless it is allow-listed, so a URL from
//! the outside cannot make the worker read internal services. The configured Supabase origin is trusted.
//! (The address is checked when resolved; a DNS answer that changes between the check and the connection is
//! not caught.)

use std::net::IpAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue, LOCATION};
use reqwest::{Method, Response, StatusCode, Url};
use tokio_util::sync::CancellationToken;

use crate::error::ErrorCode;
use crate::job::StageError;
use crate::secret::Secret;

/// Where media may come from.
#[derive(Debug, Clone, Default)]
pub struct SourcePolicy {
    /// Local paths from the API or queue must be under this folder.
    pub storage_root: PathBuf,
    /// Internal addresses that may be fetched anyway.
    pub allow_private: Vec<IpRange>,
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

/// An inclusive range of addresses, written `10.0.0.0/8`, `127.0.0.1` or `fd00::/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpRange {
    network: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for IpRange {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (address, prefix) = text.trim().split_once('/').map_or((text.trim(), None), |(a, p)| (a, Some(p)));
        let network: IpAddr = address.parse().map_err(|_| format!("`{text}` is not an IP address or CIDR range"))?;
        let bits = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(prefix) => {
                prefix.parse().ok().filter(|p| *p <= bits).ok_or_else(|| format!("bad prefix in `{text}`"))?
            }
            None => bits,
        };
        Ok(Self { network, prefix })
    }
}

impl IpRange {
    /// Whether `address` is inside the range.
    pub fn contains(&self, address: IpAddr) -> bool {
        let (network, address, bits) = match (self.network, canonical(address)) {
            (IpAddr::V4(n), IpAddr::V4(a)) => (u128::from(n.to_bits()), u128::from(a.to_bits()), 32),
            (IpAddr::V6(n), IpAddr::V6(a)) => (n.to_bits(), a.to_bits(), 128),
            _ => return false,
        };
        let shift = bits - u32::from(self.prefix);
        shift >= bits || (network >> shift) == (address >> shift)
    }
}

/// IPv4-mapped IPv6 addresses are judged as the IPv4 address they carry.
fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
        v4 => v4,
    }
}

/// Addresses that belong to this machine or an internal network.
pub fn is_internal(address: IpAddr) -> bool {
    match canonical(address) {
        IpAddr::V4(v4) => {
            v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.octets()[0] == 0
                || (v4.octets()[0] == 100 && v4.octets()[1] & 0xC0 == 64)
        }
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (v6.segments()[0] & 0xFE00) == 0xFC00
                || (v6.segments()[0] & 0xFFC0) == 0xFE80
        }
    }
}

/// Sends HTTP requests for sources under the [`SourcePolicy`].
#[derive(Debug, Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    policy: Arc<SourcePolicy>,
}

/// Time allowed to connect; a source that does not answer in this long is treated as down and retried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

impl Fetcher {
    /// A fetcher that never follows redirects on its own.
    ///
    /// # Errors
    /// When the HTTP client cannot be built (TLS setup).
    pub fn new(policy: SourcePolicy) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_TIMEOUT)
            .build()?;
        Ok(Self { client, policy: Arc::new(policy) })
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

    /// A short-lived signed URL for a Supabase object, for tools (ffprobe) that cannot send our headers.
    ///
    /// # Errors
    /// [`SourceError`] when Storage refuses or cannot be reached.
    pub async fn signed_url(&self, bucket: &str, path: &str, cancel: &CancellationToken) -> Result<Url, SourceError> {
        let (base, key) = self.supabase(bucket, path)?;
        let sign = format!("{base}/storage/v1/object/sign/{bucket}/{path}");
        let request =
            self.client.post(&sign).headers(supabase_headers(key)).json(&serde_json::json!({ "expiresIn": 300 }));
        let response = tokio::select! {
            response = request.send() => response.map_err(|error| network(&sign, error))?,
            () = cancel.cancelled() => return Err(SourceError::Cancelled),
        };
        let response = check_status(response, &sign)?;
        let body: serde_json::Value = response.json().await.map_err(|error| network(&sign, error))?;
        let signed = body.get("signedURL").or_else(|| body.get("signedUrl")).and_then(|v| v.as_str());
        let signed = signed.ok_or_else(|| SourceError::Network {
            url: printable(&sign),
            message: "the sign answer has no signedURL".into(),
        })?;
        Url::parse(&format!("{base}/storage/v1{signed}"))
            .map_err(|error| SourceError::Network { url: printable(&sign), message: error.to_string() })
    }

    /// Sends `method` to `url`, following redirects by hand and refusing internal addresses. Headers are
    /// dropped when a redirect leaves the original origin. Returns the response and the final URL.
    ///
    /// # Errors
    /// [`SourceError`] for refused hosts, too many redirects, network failures and cancellation. Error
    /// statuses are returned as responses; use [`check_status`].
    pub async fn send(
        &self,
        method: Method,
        url: Url,
        mut headers: HeaderMap,
        cancel: &CancellationToken,
    ) -> Result<(Response, Url), SourceError> {
        let origin = url.origin();
        let mut url = url;
        let mut method = method;
        for _ in 0..=self.policy.max_redirects {
            self.check_host(&url).await?;
            let request = self.client.request(method.clone(), url.clone()).headers(headers.clone());
            let response = tokio::select! {
                response = request.send() => response.map_err(|error| network(url.as_str(), error))?,
                () = cancel.cancelled() => return Err(SourceError::Cancelled),
            };
            if !response.status().is_redirection() {
                return Ok((response, url));
            }
            let location = response.headers().get(LOCATION).and_then(|value| value.to_str().ok()).ok_or_else(|| {
                SourceError::Network { url: printable(url.as_str()), message: "a redirect without Location".into() }
            })?;
            url = url.join(location).map_err(|error| SourceError::Network {
                url: printable(url.as_str()),
                message: format!("bad redirect: {error}"),
            })?;
            if response.status() == StatusCode::SEE_OTHER && method != Method::HEAD {
                method = Method::GET;
            }
            if url.origin() != origin {
                headers.remove(AUTHORIZATION);
                headers.remove("apikey");
            }
        }
        Err(SourceError::Refused {
            source_text: printable(url.as_str()),
            reason: format!("more than {} redirects", self.policy.max_redirects),
        })
    }

    async fn check_host(&self, url: &Url) -> Result<(), SourceError> {
        let refuse = |reason: String| SourceError::Refused { source_text: printable(url.as_str()), reason };
        if !matches!(url.scheme(), "http" | "https") {
            return Err(refuse(format!("scheme `{}` is not allowed", url.scheme())));
        }
        let trusted = self.policy.supabase_url.as_deref().and_then(|base| Url::parse(base).ok());
        if trusted.is_some_and(|base| base.origin() == url.origin()) {
            return Ok(());
        }
        let host = url.host_str().ok_or_else(|| refuse("no host".into()))?;
        let port = url.port_or_known_default().unwrap_or(443);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let addresses: Vec<IpAddr> = match host.parse::<IpAddr>() {
            Ok(address) => vec![address],
            Err(_) => tokio::net::lookup_host((host, port))
                .await
                .map_err(|error| SourceError::Network {
                    url: printable(url.as_str()),
                    message: format!("cannot resolve {host}: {error}"),
                })?
                .map(|socket| socket.ip())
                .collect(),
        };
        for address in addresses {
            if is_internal(address) && !self.policy.allow_private.iter().any(|range| range.contains(address)) {
                return Err(refuse(format!("{host} is an internal address ({address}) and is not allow-listed")));
            }
        }
        Ok(())
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

/// A network failure, named by the URL without its query; the error's own copy of the URL (which may hold a
/// token) is dropped.
fn network(url: &str, error: reqwest::Error) -> SourceError {
    SourceError::Network { url: printable(url), message: error.without_url().to_string() }
}

/// Turns an error status into a [`SourceError::Status`].
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
        .map(Duration::from_secs);
    Err(SourceError::Status { url: printable(url), status: response.status(), retry_after })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_recognised() {
        for internal in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "0.0.0.0",
        ] {
            assert!(is_internal(internal.parse().unwrap()), "{internal}");
        }
        for public in ["8.8.8.8", "1.1.1.1", "2606:4700::1111"] {
            assert!(!is_internal(public.parse().unwrap()), "{public}");
        }
    }

    #[test]
    fn ranges_contain_what_they_should() {
        let range: IpRange = "10.0.0.0/8".parse().unwrap();
        assert!(range.contains("10.255.0.1".parse().unwrap()));
        assert!(!range.contains("11.0.0.1".parse().unwrap()));
        let single: IpRange = "127.0.0.1".parse().unwrap();
        assert!(single.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!single.contains("127.0.0.2".parse().unwrap()));
        assert!("10.0.0.0/40".parse::<IpRange>().is_err());
        assert!("example.com".parse::<IpRange>().is_err());
    }

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
