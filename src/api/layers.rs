//! The layers every request passes through, outermost first (ARCHITECTURE.md, "The API"):
//!
//! 1. [`request_id`]: takes the caller's `X-Request-Id` (when it is a sane token) or makes one, puts it on the
//!    reply, and logs the hidden cause of a 5xx once with it.
//! 2. [`cors`]: `ALLOWED_ORIGINS` only. A preflight from an allowed origin gets 204 with the methods and headers
//!    the frontend uses; a request from any other origin gets 403 `origin_not_allowed` (the origin of the
//!    server itself, as the browser names it, counts as allowed, so a page the API serves can call it).
//!    Requests without `Origin` (servers, curl) are not browser requests and pass.
//! 3. [`rate_limit`]: a token bucket per client address, `server.rate_limit_per_minute` tokens that refill over
//!    a minute; over it, 429 with `Retry-After`. The client address is the peer's, or, when the peer is one of
//!    `server.trusted_proxies`, the nearest address of `X-Forwarded-For` that is not a trusted proxy. Every counted reply says where the caller stands with
//!    `RateLimit-Limit` and `RateLimit-Remaining` (the IETF draft's names). `/health` is not counted, so a
//!    probe never locks itself out.
//! 4. The body limit (`server.max_body_size`), which the JSON extractor turns into 413.
//!
//! With no auth configured, [`loopback_host`] sits just inside [`request_id`]: the API is open and listens on
//! 127.0.0.1, so a request must also name a loopback host (`localhost`, `127.x.x.x`, `[::1]`). A web page
//! whose own name is made to resolve to 127.0.0.1 (DNS rebinding) is same-origin for the browser and passes
//! CORS; its `Host` header still names its own domain, and is refused with 403 `host_not_allowed`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::{ApiError, InternalCause};
use crate::net::IpRange;

/// The request id header.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The id of the request being handled, in the request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub String);

/// A caller's id is kept when it is 1 to 128 characters of letters, digits and `-_.:`; anything else could
/// smuggle text into the logs, so a fresh one replaces it.
fn sane(id: &str) -> bool {
    (1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// Gives every request an id, returns it as `X-Request-Id`, and logs a 5xx's cause with it.
pub async fn request_id(mut request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get(&REQUEST_ID)
        .and_then(|value| value.to_str().ok())
        .filter(|id| sane(id))
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_string);
    request.extensions_mut().insert(RequestId(id.clone()));
    let (method, path) = (request.method().clone(), request.uri().path().to_string());
    let mut response = next.run(request).await;
    if let Some(InternalCause(cause)) = response.extensions_mut().remove::<InternalCause>() {
        tracing::error!(request_id = %id, %method, path, status = response.status().as_u16(), cause, "request failed");
    }
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    response
}

/// Whether a `Host` header value names this machine's loopback interface.
fn is_loopback_host(host: &str) -> bool {
    let host = host.trim().to_ascii_lowercase();
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split_once(']').map_or("", |(inside, _)| inside).to_string(),
        None => host.rsplit_once(':').map_or(host.as_str(), |(name, _)| name).to_string(),
    };
    let name = name.trim_end_matches('.');
    name == "localhost" || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Refuses requests that name a host other than loopback (see the module docs); for an open API only.
pub async fn loopback_host(request: Request, next: Next) -> Response {
    let host = match request.headers().get(header::HOST) {
        Some(value) => Some(value.to_str().unwrap_or("?").to_string()),
        None => request.uri().authority().map(|authority| authority.as_str().to_string()),
    };
    match host {
        Some(host) if !is_loopback_host(&host) => {
            let shown: String = host.chars().filter(|c| !c.is_control()).take(200).collect();
            ApiError::new(
                StatusCode::FORBIDDEN,
                "host_not_allowed",
                format!(
                    "host `{shown}` is not allowed: with no auth configured this API answers only requests to \
                     localhost or 127.0.0.1 (configure auth to serve other host names)"
                ),
            )
            .into_response()
        }
        _ => next.run(request).await,
    }
}

/// The allowed origins.
#[derive(Debug, Clone, Default)]
pub struct Cors {
    origins: Vec<String>,
}

/// Headers a browser may send: the ones the frontend and its callers use (`X-Priority` and
/// `X-Optimization-Level` come from one of them).
const ALLOW_HEADERS: &str = "authorization, content-type, accept, origin, x-requested-with, x-request-id, last-event-id, x-priority, \
     x-optimization-level";
/// How long a browser may cache a preflight answer: a day, as the old worker said.
const PREFLIGHT_MAX_AGE: &str = "86400";

impl Cors {
    /// Allows `origins` (`https://app.example.com`; a trailing `/` is ignored, `*` allows any origin).
    pub fn new(origins: &[String]) -> Self {
        Self {
            origins: origins.iter().map(|origin| origin.trim().trim_end_matches('/').to_ascii_lowercase()).collect(),
        }
    }

    fn allows(&self, origin: &str, headers: &HeaderMap) -> bool {
        let origin = origin.trim_end_matches('/').to_ascii_lowercase();
        if self.origins.iter().any(|allowed| allowed == "*" || *allowed == origin) {
            return true;
        }
        // The server's own origin: the page and the API share scheme, host and port.
        let host = headers.get(header::HOST).and_then(|value| value.to_str().ok()).map(str::to_ascii_lowercase);
        let bare = origin.split_once("://").map(|(_, rest)| rest);
        host.is_some() && bare == host.as_deref()
    }
}

fn refused(origin: &str) -> Response {
    let shown: String = origin.chars().filter(|c| !c.is_control()).take(200).collect();
    ApiError::new(
        StatusCode::FORBIDDEN,
        "origin_not_allowed",
        format!(
            "origin `{shown}` is not allowed: add it to ALLOWED_ORIGINS (comma-separated) to call this API from it"
        ),
    )
    .into_response()
}

/// Answers preflights and refuses browsers on origins that are not allowed.
pub async fn cors(State(cors): State<Arc<Cors>>, request: Request, next: Next) -> Response {
    let Some(origin) = request.headers().get(header::ORIGIN).cloned() else {
        return next.run(request).await;
    };
    let text = origin.to_str().unwrap_or("");
    let allowed = cors.allows(text, request.headers());
    let preflight =
        request.method() == Method::OPTIONS && request.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    if !allowed {
        return refused(text);
    }
    let mut response = if preflight {
        let mut response = StatusCode::NO_CONTENT.into_response();
        let headers = response.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST, OPTIONS"));
        headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static(ALLOW_HEADERS));
        headers.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static(PREFLIGHT_MAX_AGE));
        response
    } else {
        next.run(request).await
    };
    let headers = response.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("x-request-id, retry-after, ratelimit-limit, ratelimit-remaining"),
    );
    headers.append(header::VARY, HeaderValue::from_static("origin"));
    response
}

/// Per-client token buckets.
#[derive(Debug)]
pub struct RateLimiter {
    per_minute: u32,
    /// Proxies whose `X-Forwarded-For` is believed.
    trusted: Vec<IpRange>,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Buckets kept before full ones (clients quiet for a minute) are dropped, so the map stays bounded.
const MAX_CLIENTS: usize = 10_000;

impl RateLimiter {
    /// `per_minute` requests a minute per client, in bursts up to the same number; 0 turns the limit off.
    pub fn new(per_minute: u32) -> Self {
        Self { per_minute, trusted: Vec::new(), buckets: Mutex::new(HashMap::new()) }
    }

    /// Believes the `X-Forwarded-For` of requests from these proxies.
    #[must_use]
    pub fn trusting(mut self, proxies: Vec<IpRange>) -> Self {
        self.trusted = proxies;
        self
    }

    fn trusts(&self, address: IpAddr) -> bool {
        self.trusted.iter().any(|range| range.contains(address))
    }

    /// Whom a request from `peer` counts against: `peer` itself, unless it is a trusted proxy; then the
    /// addresses of `X-Forwarded-For` (every such header, in order) are read from the nearest hop outwards, and
    /// the first that is not a trusted proxy is the client. An entry that is not an address stops the walk at
    /// the hop that wrote it; a list of trusted proxies only gives its farthest one.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.trusts(peer) {
            return peer;
        }
        let hops: Vec<&str> = headers
            .get_all(FORWARDED_FOR)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .map(str::trim)
            .collect();
        let mut client = peer;
        for hop in hops.iter().rev() {
            let Some(address) = forwarded_address(hop) else { return client };
            client = address;
            if !self.trusts(address) {
                break;
            }
        }
        client
    }

    /// Takes a token for `client` and says how many whole ones are left, or how many seconds until one is free.
    pub fn take(&self, client: IpAddr) -> Result<u32, u64> {
        if self.per_minute == 0 {
            return Ok(u32::MAX);
        }
        let capacity = f64::from(self.per_minute);
        let per_second = capacity / 60.0;
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() >= MAX_CLIENTS {
            buckets.retain(|_, bucket| {
                bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * per_second < capacity
            });
        }
        let bucket = buckets.entry(client).or_insert(Bucket { tokens: capacity, at: now });
        bucket.tokens = (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * per_second).min(capacity);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(bucket.tokens.floor() as u32)
        } else {
            Err(((1.0 - bucket.tokens) / per_second).ceil().max(1.0) as u64)
        }
    }
}

/// Refuses a client over its rate with 429 and `Retry-After`.
pub async fn rate_limit(State(limiter): State<Arc<RateLimiter>>, request: Request, next: Next) -> Response {
    if request.uri().path() == "/health" {
        return next.run(request).await;
    }
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |info| info.0.ip());
    let client = limiter.client(peer, request.headers());
    let limit = HeaderValue::from(limiter.per_minute);
    let (mut response, remaining) = match limiter.take(client) {
        Ok(remaining) => (next.run(request).await, remaining),
        Err(seconds) => (
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "too many requests from {client}: at most {} a minute (server.rate_limit_per_minute); try again in \
                 {seconds} s",
                    limiter.per_minute
                ),
            )
            .with_retry_after(seconds)
            .into_response(),
            0,
        ),
    };
    if limiter.per_minute > 0 {
        let headers = response.headers_mut();
        headers.insert(RATE_LIMIT_LIMIT, limit);
        headers.insert(RATE_LIMIT_REMAINING, HeaderValue::from(remaining));
    }
    response
}

/// The header a proxy appends the address it got a request from to.
const FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// One `X-Forwarded-For` entry as an address: `203.0.113.7`, `2001:db8::1`, or with a port
/// (`203.0.113.7:4711`, `[2001:db8::1]:4711`), as some proxies write it.
fn forwarded_address(entry: &str) -> Option<IpAddr> {
    entry.parse().ok().or_else(|| entry.parse::<SocketAddr>().ok().map(|address| address.ip()))
}

/// The requests a client may make a minute.
pub const RATE_LIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
/// The requests a client may still make now.
pub const RATE_LIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_names_the_wait() {
        let limiter = RateLimiter::new(3);
        let client = IpAddr::V4(Ipv4Addr::LOCALHOST);
        for left in [2, 1, 0] {
            assert_eq!(limiter.take(client), Ok(left));
        }
        let wait = limiter.take(client).expect_err("the fourth is over the limit");
        assert!((1..=20).contains(&wait), "one token refills in 20 s: {wait}");
        assert_eq!(limiter.take(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2))), Ok(2), "another client has its own bucket");
        assert!(RateLimiter::new(0).take(client).is_ok(), "0 turns the limit off");
    }

    #[test]
    fn the_client_behind_a_trusted_proxy_is_the_nearest_untrusted_forwarded_address() {
        let limiter = RateLimiter::new(3).trusting(vec!["10.0.0.0/8".parse().unwrap(), "::1".parse().unwrap()]);
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        let forwarded = |values: &[&str]| {
            let mut headers = HeaderMap::new();
            for value in values {
                headers.append(FORWARDED_FOR, HeaderValue::from_str(value).unwrap());
            }
            headers
        };
        let proxy = ip("10.0.0.5");
        // A peer that is not a trusted proxy is the client, whatever it writes.
        assert_eq!(limiter.client(ip("198.51.100.9"), &forwarded(&["203.0.113.7"])), ip("198.51.100.9"));
        assert_eq!(limiter.client(proxy, &HeaderMap::new()), proxy, "no header: the proxy itself");
        assert_eq!(limiter.client(proxy, &forwarded(&["203.0.113.7"])), ip("203.0.113.7"));
        // A client that wrote a false entry first cannot hide behind it: the nearest untrusted hop counts.
        assert_eq!(limiter.client(proxy, &forwarded(&["1.1.1.1, 203.0.113.7, 10.0.0.9"])), ip("203.0.113.7"));
        assert_eq!(limiter.client(proxy, &forwarded(&["1.1.1.1", "203.0.113.7:4711"])), ip("203.0.113.7"));
        assert_eq!(limiter.client(ip("::1"), &forwarded(&["[2001:db8::1]:80"])), ip("2001:db8::1"));
        // Garbage stops the walk at the hop that wrote it.
        assert_eq!(limiter.client(proxy, &forwarded(&["203.0.113.7, not-an-ip"])), proxy);
        assert_eq!(limiter.client(proxy, &forwarded(&["not-an-ip, 10.0.0.7"])), ip("10.0.0.7"));
        // Only trusted proxies in the list: the farthest of them.
        assert_eq!(limiter.client(proxy, &forwarded(&["10.1.1.1, 10.0.0.7"])), ip("10.1.1.1"));
        assert_eq!(RateLimiter::new(3).client(proxy, &forwarded(&["203.0.113.7"])), proxy, "nobody trusted");
    }

    #[test]
    fn loopback_hosts_are_told_from_other_names() {
        for host in ["localhost", "localhost:3001", "LOCALHOST.", "127.0.0.1:80", "127.1.2.3", "[::1]:3001", "[::1]"] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in ["evil.example", "evil.example:3001", "127.0.0.1.nip.io", "10.0.0.1:3001", "[::2]:1", "?", ""] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }

    #[test]
    fn only_sane_request_ids_are_kept() {
        assert!(sane("abc-123_x.y:z"));
        assert!(!sane(""));
        assert!(!sane("with space"));
        assert!(!sane("line\nbreak"));
        assert!(!sane(&"x".repeat(129)));
    }
}
