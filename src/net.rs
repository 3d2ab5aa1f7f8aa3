//! The one way out of the process over HTTP. Sources, `http` plugins and (later) callbacks all send through
//! [`HttpClient`], so the address rules hold for every request a job can cause:
//!
//! - Every host name is resolved once, by [`CheckedResolver`] inside the connection, and the connection goes
//!   to the addresses that were checked; a DNS answer that changes between a check and the connection cannot
//!   slip through. Literal addresses are checked before the request.
//! - Internal addresses ([`is_internal`]: private, loopback, link-local, CGNAT, unique- and site-local, and
//!   IPv6 forms that carry an internal IPv4 address: mapped, compatible, NAT64, 6to4, Teredo) are refused
//!   unless an [`AllowEntry`] names them, optionally with a port (`127.0.0.1:9000`).
//! - Redirects are followed by hand, each hop checked again; on a hop to another origin only harmless headers
//!   (`Range`, `Accept`, …) go on, so `Authorization`, API keys and any header a plugin declared stay behind.
//!   No `Referer` is ever sent, and system proxies are not used (a proxy would resolve names itself).

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{
    ACCEPT, ACCEPT_LANGUAGE, CONTENT_LENGTH, CONTENT_TYPE, HeaderMap, IF_RANGE, LOCATION, RANGE, REFERER, USER_AGENT,
};
use reqwest::{Method, Response, StatusCode, Url};
use tokio_util::sync::CancellationToken;

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
    /// Whether `address` is inside the range. An IPv4-mapped IPv6 address counts as the IPv4 address.
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

/// IPv4-mapped IPv6 addresses are the IPv4 address they carry (the kernel connects to that address).
fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
        v4 => v4,
    }
}

/// An `allow_private` entry: an address or CIDR range, optionally limited to one port. Written `127.0.0.1`,
/// `10.0.0.0/8`, `127.0.0.1:9000`, `10.0.0.0/8:9000`, `::1`, `fd00::/8`, `[::1]:9000` or `[fd00::/8]:9000`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllowEntry {
    range: IpRange,
    port: Option<u16>,
}

impl std::str::FromStr for AllowEntry {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let trimmed = text.trim();
        let bad_port = || format!("bad port in `{text}` (expected 1 to 65535)");
        let port = |digits: &str| digits.parse::<u16>().ok().filter(|port| *port > 0).ok_or_else(bad_port);
        let (range, port) = if let Some(rest) = trimmed.strip_prefix('[') {
            let (inside, after) =
                rest.split_once(']').ok_or_else(|| format!("`{text}` opens `[` without closing it"))?;
            let port = match after {
                "" => None,
                _ => Some(port(after.strip_prefix(':').ok_or_else(bad_port)?)?),
            };
            (inside, port)
        } else {
            match trimmed.split_once(':') {
                // One colon: an IPv4 address or range with a port. More: an IPv6 address without a port.
                Some((range, digits)) if !digits.contains(':') => (range, Some(port(digits)?)),
                _ => (trimmed, None),
            }
        };
        let range: IpRange = range.parse().map_err(|_| format!("`{text}` is not an IP address or CIDR range"))?;
        Ok(Self { range, port })
    }
}

impl AllowEntry {
    /// Whether the entry allows connecting to `address` on `port` (`None`: a port not known to be allowed).
    pub fn allows(&self, address: IpAddr, port: Option<u16>) -> bool {
        self.range.contains(address) && self.port.is_none_or(|allowed| Some(allowed) == port)
    }
}

/// Addresses that belong to this machine or an internal network, in every IPv6 spelling that reaches one.
pub fn is_internal(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(v4) => internal_v4(v4),
        IpAddr::V6(v6) => internal_v6(v6),
    }
}

fn internal_v4(v4: Ipv4Addr) -> bool {
    let [a, b, c, _] = v4.octets();
    v4.is_private()
        || v4.is_loopback()
        || v4.is_link_local()
        || v4.is_unspecified()
        || v4.is_broadcast()
        || v4.is_multicast()
        || a == 0
        || (a == 100 && b & 0xC0 == 64) // 100.64.0.0/10, carrier-grade NAT
        || (a == 192 && b == 0 && c == 0) // 192.0.0.0/24, IETF protocol assignments
        || (a == 198 && b & 0xFE == 18) // 198.18.0.0/15, benchmarking
        || a >= 240 // 240.0.0.0/4, reserved
}

fn internal_v6(v6: Ipv6Addr) -> bool {
    let s = v6.segments();
    let v4 = |high: u16, low: u16| Ipv4Addr::from((u32::from(high) << 16) | u32::from(low));
    // Forms that carry an IPv4 address in their last 32 bits are judged by it: IPv4-mapped (::ffff:a.b.c.d),
    // IPv4-compatible (::a.b.c.d, which takes in :: and ::1 as 0.0.0.0 and 0.0.0.1), IPv4-translated
    // (::ffff:0:a.b.c.d) and NAT64 (64:ff9b::a.b.c.d). 6to4 (2002:aabb:ccdd::/48) carries it in bits 16-48.
    let in_low_bits = (s[..5] == [0; 5] && s[5] == 0xFFFF)
        || s[..6] == [0; 6]
        || (s[..4] == [0; 4] && s[4] == 0xFFFF && s[5] == 0)
        || (s[0] == 0x64 && s[1] == 0xFF9B && s[2..6] == [0; 4]);
    let embedded = if in_low_bits {
        Some(v4(s[6], s[7]))
    } else if s[0] == 0x2002 {
        Some(v4(s[1], s[2]))
    } else {
        None
    };
    if let Some(v4) = embedded {
        return internal_v4(v4);
    }
    if s[0] == 0x2001 && s[1] == 0 {
        // Teredo: the server's address, and the client's (stored inverted).
        return internal_v4(v4(s[2], s[3])) || internal_v4(v4(!s[6], !s[7]));
    }
    v6.is_multicast()
        || (s[0] & 0xFE00) == 0xFC00 // fc00::/7, unique local
        || (s[0] & 0xFFC0) == 0xFE80 // fe80::/10, link-local
        || (s[0] & 0xFFC0) == 0xFEC0 // fec0::/10, site-local (deprecated, still routed internally)
        || (s[0] == 0x64 && s[1] == 0xFF9B && s[2] == 1) // 64:ff9b:1::/48, local-use NAT64
        || (s[0] == 0x100 && s[1..4] == [0; 3]) // 100::/64, discard
}

/// A connection the address rules refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{host} is an internal address ({address}) and is not allow-listed{port_note}")]
pub struct AddressRefused {
    /// The host as written in the URL.
    pub host: String,
    /// The address it is or resolved to.
    pub address: IpAddr,
    port_note: String,
}

/// Which addresses may be reached.
#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    /// Internal addresses that may be reached anyway.
    pub allow: Vec<AllowEntry>,
    /// Origins reached whatever they resolve to, as (host, port): the configured Supabase project.
    pub trusted: Vec<(String, u16)>,
}

impl AddressPolicy {
    /// A policy allowing `entries` (parsed as `allow_private` entries).
    ///
    /// # Errors
    /// The first entry that does not parse.
    pub fn allowing<'a>(entries: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        let allow = entries.into_iter().map(str::parse).collect::<Result<_, _>>()?;
        Ok(Self { allow, trusted: Vec::new() })
    }

    /// Trusts the origin of `url` (scheme default port when it names none).
    pub fn trust(&mut self, url: &Url) {
        if let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) {
            self.trusted.push((host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase(), port));
        }
    }

    fn trusts(&self, host: &str, port: Option<u16>) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        self.trusted
            .iter()
            .any(|(trusted, trusted_port)| Some(*trusted_port) == port && trusted.eq_ignore_ascii_case(host))
    }

    /// Checks that `host`, at `address`, may be reached on `port`.
    ///
    /// # Errors
    /// [`AddressRefused`] for an internal address no entry allows.
    pub fn check(&self, host: &str, address: IpAddr, port: Option<u16>) -> Result<(), AddressRefused> {
        if !is_internal(address) || self.allow.iter().any(|entry| entry.allows(address, port)) {
            return Ok(());
        }
        let port_note = match port {
            Some(port) if self.allow.iter().any(|entry| entry.range.contains(address)) => format!(" on port {port}"),
            _ => String::new(),
        };
        Err(AddressRefused { host: host.to_string(), address, port_note })
    }

    /// Ports that some entry or trusted origin names: each gets its own connection pool and resolver.
    fn ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self.allow.iter().filter_map(|entry| entry.port).collect();
        ports.extend(self.trusted.iter().map(|(_, port)| *port));
        ports.sort_unstable();
        ports.dedup();
        ports
    }
}

/// A name lookup, the part of [`CheckedResolver`] that asks DNS (tests substitute their own).
pub trait Lookup: Send + Sync + std::fmt::Debug {
    /// The addresses of `host`.
    fn lookup(&self, host: &str) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send>>;
}

/// The system's resolver (`getaddrinfo`).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemLookup;

impl Lookup for SystemLookup {
    fn lookup(&self, host: &str) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send>> {
        let host = host.to_string();
        Box::pin(async move { Ok(tokio::net::lookup_host((host.as_str(), 0)).await?.map(|a| a.ip()).collect()) })
    }
}

/// Resolves names for the HTTP client and refuses internal answers, so the connection goes to exactly the
/// addresses that were checked. `port` is the one port its client connects to (`None`: any port that no
/// allow entry names).
#[derive(Debug, Clone)]
pub struct CheckedResolver {
    lookup: Arc<dyn Lookup>,
    policy: Arc<AddressPolicy>,
    port: Option<u16>,
}

impl CheckedResolver {
    /// A resolver asking `lookup` and applying `policy` for connections to `port`.
    pub fn new(lookup: Arc<dyn Lookup>, policy: Arc<AddressPolicy>, port: Option<u16>) -> Self {
        Self { lookup, policy, port }
    }
}

impl Resolve for CheckedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let (lookup, policy, port) = (self.lookup.clone(), self.policy.clone(), self.port);
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addresses = match host.parse::<IpAddr>() {
                Ok(address) => vec![address],
                Err(_) => lookup.lookup(&host).await?,
            };
            if addresses.is_empty() {
                return Err(format!("{host} has no addresses").into());
            }
            if !policy.trusts(&host, port) {
                for address in &addresses {
                    policy.check(&host, *address, port)?;
                }
            }
            let addrs: Addrs = Box::new(addresses.into_iter().map(|address| SocketAddr::new(address, 0)));
            Ok(addrs)
        })
    }
}

/// Why a request could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetError {
    /// The URL or a redirect breaks a rule; retrying cannot help.
    #[error("`{url}` refused: {reason}")]
    Refused {
        /// The URL (no credentials, query or fragment).
        url: String,
        /// Which rule.
        reason: String,
    },
    /// The server could not be reached or the connection broke.
    #[error("cannot reach {url}: {message}")]
    Network {
        /// The URL (no credentials, query or fragment).
        url: String,
        /// What happened.
        message: String,
    },
    /// The caller cancelled.
    #[error("cancelled")]
    Cancelled,
}

/// A URL safe to print: no user, password, query or fragment (signed URLs carry tokens there).
pub fn shown(url: &Url) -> String {
    let mut url = url.clone();
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.set_query(None);
    url.set_fragment(None);
    url.to_string()
}

/// One request to send.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The method.
    pub method: Method,
    /// Where to.
    pub url: Url,
    /// Headers; all but [`KEPT_ACROSS_ORIGINS`] are dropped when a redirect leaves the URL's origin.
    pub headers: HeaderMap,
    /// The body, resent on 307 and 308 redirects.
    pub body: Option<Vec<u8>>,
}

impl Outgoing {
    /// A request without a body.
    pub fn new(method: Method, url: Url, headers: HeaderMap) -> Self {
        Self { method, url, headers, body: None }
    }
}

/// Headers that go on to another origin after a redirect; everything else (credentials, API keys, custom
/// headers) stays with the origin it was written for.
pub const KEPT_ACROSS_ORIGINS: [reqwest::header::HeaderName; 6] =
    [RANGE, IF_RANGE, ACCEPT, ACCEPT_LANGUAGE, USER_AGENT, CONTENT_TYPE];

/// Time allowed to connect; a server that does not answer in this long is treated as down.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// The checked HTTP client (see the module docs). Cheap to clone.
#[derive(Debug, Clone)]
pub struct HttpClient {
    /// For ports no entry names.
    general: reqwest::Client,
    /// For each port an entry or trusted origin names.
    by_port: Arc<Vec<(u16, reqwest::Client)>>,
    policy: Arc<AddressPolicy>,
    max_redirects: usize,
}

impl HttpClient {
    /// A client applying `policy`, following at most `max_redirects` redirects per request.
    ///
    /// # Errors
    /// When the HTTP client cannot be built (TLS setup).
    pub fn new(policy: AddressPolicy, max_redirects: usize) -> Result<Self, reqwest::Error> {
        Self::with_lookup(policy, max_redirects, Arc::new(SystemLookup))
    }

    /// Like [`HttpClient::new`], resolving names with `lookup`.
    ///
    /// # Errors
    /// When the HTTP client cannot be built (TLS setup).
    pub fn with_lookup(
        policy: AddressPolicy,
        max_redirects: usize,
        lookup: Arc<dyn Lookup>,
    ) -> Result<Self, reqwest::Error> {
        let policy = Arc::new(policy);
        let build = |port: Option<u16>| {
            reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .referer(false)
                .no_proxy()
                .connect_timeout(CONNECT_TIMEOUT)
                .dns_resolver(Arc::new(CheckedResolver::new(lookup.clone(), policy.clone(), port)))
                .build()
        };
        let general = build(None)?;
        let by_port =
            policy.ports().into_iter().map(|port| Ok((port, build(Some(port))?))).collect::<Result<_, _>>()?;
        Ok(Self { general, by_port: Arc::new(by_port), policy, max_redirects })
    }

    /// The rules in force.
    pub fn policy(&self) -> &AddressPolicy {
        &self.policy
    }

    fn client_for(&self, port: u16) -> &reqwest::Client {
        self.by_port.iter().find(|(named, _)| *named == port).map_or(&self.general, |(_, client)| client)
    }

    /// Checks what can be checked before connecting: the scheme, and a host that is a literal address.
    fn check_url(&self, url: &Url) -> Result<u16, NetError> {
        let refuse = |reason: String| NetError::Refused { url: shown(url), reason };
        if !matches!(url.scheme(), "http" | "https") {
            return Err(refuse(format!("scheme `{}` is not allowed", url.scheme())));
        }
        let port = url.port_or_known_default().ok_or_else(|| refuse("no port".into()))?;
        let host = url.host_str().ok_or_else(|| refuse("no host".into()))?;
        // The URL parser has already turned decimal, octal and hex IPv4 spellings into dotted form.
        let Ok(literal) = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() else {
            return Ok(port);
        };
        let host = literal.to_string();
        if !self.policy.trusts(&host, Some(port)) {
            self.policy.check(&host, literal, Some(port)).map_err(|refused| refuse(refused.to_string()))?;
        }
        Ok(port)
    }

    /// Sends `request`, following redirects by hand (each hop checked, headers other than
    /// [`KEPT_ACROSS_ORIGINS`] dropped once a hop leaves the first origin, never a `Referer`). Returns the
    /// response and the URL that answered.
    ///
    /// # Errors
    /// [`NetError::Refused`] for a refused scheme or address and too many redirects, [`NetError::Network`]
    /// when the server cannot be reached, [`NetError::Cancelled`]. Error statuses are returned as responses.
    pub async fn send(&self, request: Outgoing, cancel: &CancellationToken) -> Result<(Response, Url), NetError> {
        let Outgoing { mut method, mut url, mut headers, mut body } = request;
        headers.remove(REFERER);
        let origin = url.origin();
        for _ in 0..=self.max_redirects {
            let port = self.check_url(&url)?;
            let mut builder = self.client_for(port).request(method.clone(), url.clone()).headers(headers.clone());
            if let Some(body) = &body {
                builder = builder.body(body.clone());
            }
            let response = tokio::select! {
                response = builder.send() => response.map_err(|error| failure(&url, error))?,
                () = cancel.cancelled() => return Err(NetError::Cancelled),
            };
            let status = response.status();
            if !matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308) {
                return Ok((response, url));
            }
            let location = response.headers().get(LOCATION).and_then(|value| value.to_str().ok());
            let location = location.ok_or_else(|| NetError::Network {
                url: shown(&url),
                message: format!("a redirect ({status}) without Location"),
            })?;
            url = url
                .join(location)
                .map_err(|error| NetError::Network { url: shown(&url), message: format!("bad redirect: {error}") })?;
            // As browsers do: 303 (and 301/302 after a POST) turn into a GET without a body.
            let to_get = status == StatusCode::SEE_OTHER && method != Method::HEAD
                || matches!(status.as_u16(), 301 | 302) && method == Method::POST;
            if to_get {
                method = Method::GET;
                body = None;
                headers.remove(CONTENT_TYPE);
                headers.remove(CONTENT_LENGTH);
            }
            if url.origin() != origin {
                headers = headers
                    .iter()
                    .filter(|(name, _)| KEPT_ACROSS_ORIGINS.contains(name))
                    .map(|(name, value)| (name.clone(), value.clone()))
                    .collect();
            }
        }
        Err(NetError::Refused { url: shown(&url), reason: format!("more than {} redirects", self.max_redirects) })
    }
}

/// A send failure: an address refused by the resolver (found in the error's causes), else a network error
/// without the URL (which may hold a token).
fn failure(url: &Url, error: reqwest::Error) -> NetError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&error);
    while let Some(current) = cause {
        if let Some(refused) = current.downcast_ref::<AddressRefused>() {
            return NetError::Refused { url: shown(url), reason: refused.to_string() };
        }
        cause = current.source();
    }
    let error = error.without_url();
    let mut message = error.to_string();
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&error);
    while let Some(current) = cause {
        message = format!("{message}: {current}");
        cause = current.source();
    }
    NetError::Network { url: shown(url), message: message.replace(url.as_str(), &shown(url)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn internal_addresses_are_recognised_in_every_form() {
        for internal in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "240.0.0.1",
            "224.0.0.1",
            "192.0.0.8",
            "198.18.0.1",
            "::1",
            "::",
            "fd00::1",
            "fc00::1",
            "fe80::1",
            "ff02::1",
            // Site-local (fec0::/10).
            "fec0::1",
            "feff:ffff::1",
            // IPv4-mapped, IPv4-compatible and IPv4-translated forms of internal IPv4 addresses.
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "::10.0.0.1",
            "::169.254.169.254",
            "::ffff:0:192.168.0.1",
            // NAT64 (64:ff9b::/96) of internal IPv4, and local-use NAT64.
            "64:ff9b::127.0.0.1",
            "64:ff9b::a00:1",
            "64:ff9b::169.254.169.254",
            "64:ff9b:1::8.8.8.8",
            // 6to4 (2002::/16) with an internal IPv4 inside.
            "2002:7f00:1::1",
            "2002:a00:1::",
            "2002:a9fe:a9fe::1",
            // Teredo with an internal server or client.
            "2001:0:a00:1::1",
            "2001:0:808:808::80ff:fffe",
            "100::1",
        ] {
            assert!(is_internal(ip(internal)), "{internal} is internal");
        }
        for public in [
            "8.8.8.8",
            "1.1.1.1",
            "100.128.0.1",
            "172.32.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "::8.8.8.8",
            "64:ff9b::8.8.8.8",
            "2002:808:808::1",
            "2001:0:808:808::f7f7:f7f7",
            "2a00:1450::1",
        ] {
            assert!(!is_internal(ip(public)), "{public} is public");
        }
    }

    #[test]
    fn ranges_contain_what_they_should() {
        let range: IpRange = "10.0.0.0/8".parse().unwrap();
        assert!(range.contains(ip("10.255.0.1")));
        assert!(!range.contains(ip("11.0.0.1")));
        let single: IpRange = "127.0.0.1".parse().unwrap();
        assert!(single.contains(ip("::ffff:127.0.0.1")));
        assert!(!single.contains(ip("127.0.0.2")));
        assert!(!single.contains(ip("::127.0.0.1")), "only the mapped form is the same address");
        assert!("10.0.0.0/40".parse::<IpRange>().is_err());
        assert!("example.com".parse::<IpRange>().is_err());
    }

    #[test]
    fn allow_entries_may_name_a_port() {
        let entry = |text: &str| text.parse::<AllowEntry>().unwrap_or_else(|e| panic!("{text}: {e}"));
        let local = entry("127.0.0.1:9000");
        assert!(local.allows(ip("127.0.0.1"), Some(9000)));
        assert!(!local.allows(ip("127.0.0.1"), Some(6379)), "Redis stays closed");
        assert!(!local.allows(ip("127.0.0.1"), None));
        assert!(local.allows(ip("::ffff:127.0.0.1"), Some(9000)));
        let any_port = entry("127.0.0.1");
        assert!(any_port.allows(ip("127.0.0.1"), Some(5432)) && any_port.allows(ip("127.0.0.1"), None));
        let v6 = entry("[::1]:9000");
        assert!(v6.allows(ip("::1"), Some(9000)) && !v6.allows(ip("::1"), Some(9001)));
        assert!(entry("::1").allows(ip("::1"), Some(1)));
        let range = entry("10.0.0.0/8:443");
        assert!(range.allows(ip("10.9.8.7"), Some(443)) && !range.allows(ip("10.9.8.7"), Some(80)));
        let v6_range = entry("[fd00::/8]:8080");
        assert!(v6_range.allows(ip("fd12::1"), Some(8080)) && !v6_range.allows(ip("fd12::1"), Some(80)));
        assert!(entry("fd00::/8").allows(ip("fd00::5"), Some(22)));
        assert_eq!(entry(" 10.0.0.1 ").port, None);
        for bad in ["127.0.0.1:0", "127.0.0.1:70000", "127.0.0.1:", "[::1", "[::1]9000", "localhost:80", "::1:x"] {
            assert!(bad.parse::<AllowEntry>().is_err(), "{bad} is refused");
        }
        let error = "127.0.0.1:99999".parse::<AllowEntry>().unwrap_err();
        assert_eq!(error, "bad port in `127.0.0.1:99999` (expected 1 to 65535)");
    }

    #[test]
    fn the_policy_names_the_port_it_refused() {
        let policy = AddressPolicy::allowing(["127.0.0.1:9000"]).unwrap();
        assert!(policy.check("localhost", ip("127.0.0.1"), Some(9000)).is_ok());
        let refused = policy.check("localhost", ip("127.0.0.1"), Some(6379)).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "localhost is an internal address (127.0.0.1) and is not allow-listed on port 6379"
        );
        let refused = policy.check("db", ip("10.0.0.1"), Some(5432)).unwrap_err();
        assert_eq!(refused.to_string(), "db is an internal address (10.0.0.1) and is not allow-listed");
        assert!(policy.check("example.com", ip("93.184.216.34"), Some(6379)).is_ok(), "public addresses pass");
        assert_eq!(policy.ports(), [9000]);
    }

    /// A DNS that answers every name with fixed addresses, and counts the questions.
    #[derive(Debug)]
    struct FakeLookup(Vec<IpAddr>, std::sync::atomic::AtomicUsize);

    impl Lookup for FakeLookup {
        fn lookup(&self, _host: &str) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send>> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let answer = self.0.clone();
            Box::pin(async move { Ok(answer) })
        }
    }

    async fn resolve(answer: &[&str], allow: &[&str], port: Option<u16>) -> Result<Vec<SocketAddr>, String> {
        let lookup = Arc::new(FakeLookup(answer.iter().map(|a| ip(a)).collect(), Default::default()));
        let policy = Arc::new(AddressPolicy::allowing(allow.iter().copied()).unwrap());
        let resolver = CheckedResolver::new(lookup, policy, port);
        let name: Name = "media.example".parse().unwrap();
        resolver.resolve(name).await.map(Iterator::collect).map_err(|error| error.to_string())
    }

    #[tokio::test]
    async fn the_resolver_refuses_internal_answers_and_hands_over_what_it_checked() {
        let public = resolve(&["93.184.216.34"], &[], None).await.unwrap();
        assert_eq!(public, [SocketAddr::new(ip("93.184.216.34"), 0)], "the checked address is the one connected");
        for rebound in [&["10.0.0.1"][..], &["93.184.216.34", "127.0.0.1"], &["64:ff9b::a9fe:a9fe"], &["fec0::1"]] {
            let error = resolve(rebound, &[], None).await.unwrap_err();
            assert!(error.starts_with("media.example is an internal address ("), "{rebound:?}: {error}");
        }
        assert!(resolve(&["127.0.0.1"], &["127.0.0.1:9000"], Some(9000)).await.is_ok());
        let error = resolve(&["127.0.0.1"], &["127.0.0.1:9000"], Some(6379)).await.unwrap_err();
        assert!(error.ends_with("not allow-listed on port 6379"), "{error}");
        assert!(resolve(&["127.0.0.1"], &["127.0.0.1:9000"], None).await.is_err(), "other ports stay closed");
        assert!(resolve(&[], &[], None).await.is_err(), "no answer is an error, not an empty list");
    }

    #[test]
    fn shown_urls_carry_no_credentials_or_tokens() {
        let url = Url::parse("https://user:p%2Fss@example.com:8443/a/b.mp3?sig=secret#frag").unwrap();
        assert_eq!(shown(&url), "https://example.com:8443/a/b.mp3");
    }
}
