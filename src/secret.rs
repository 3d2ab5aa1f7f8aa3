//! Secrets: credentials and connection URLs that can be read where they are used but never printed, logged or
//! serialized. Settings hold them, and the AI client and the source fetcher read them, so they live below all
//! three.

use std::fmt;

use serde::{Deserialize, Serialize, Serializer};

/// What a redacted value prints as.
const REDACTED: &str = "[redacted]";

/// A credential. It can be read with [`Secret::expose`] but never printed, logged or serialized.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a credential.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The credential itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(REDACTED)
    }
}

/// A connection URL that may hold a password (`redis://user:password@host`). It prints with the password
/// redacted.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// Wraps a URL.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The URL with its password, for the one place that connects.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any password replaced by `[redacted]`; each of a comma-separated list (Redis Cluster nodes).
    pub fn redacted(&self) -> String {
        if self.0.contains(',') {
            // Several URLs (the nodes of a Redis Cluster): each one redacted.
            return self.0.split(',').map(|url| redact_url(url.trim())).collect::<Vec<_>>().join(",");
        }
        redact_url(&self.0)
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for SecretUrl {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.redacted())
    }
}

/// A URL as it may be printed: the password (or a lone user name, which may be a token) replaced by
/// `[redacted]`, the query string (which may carry tokens) replaced by `[redacted]`, the fragment dropped.
/// Text that does not parse as a URL with a host (or as a `sqlite:` file URL) prints as `[redacted]` whole,
/// since its parts cannot be told apart: `user:pa/ss@host` or `host=… password=…` are not printed at all.
pub fn redact_url(text: &str) -> String {
    const MARK: &str = "echo-worker-redacted-0b7c";
    let Ok(mut url) = reqwest::Url::parse(text.trim()) else { return REDACTED.to_string() };
    if url.cannot_be_a_base() && url.scheme() != "sqlite" {
        // `user:password@host` parses as scheme `user` with an opaque path.
        return REDACTED.to_string();
    }
    if url.username().is_empty() && url.password().is_none() && url.query().is_none() && url.fragment().is_none() {
        // Nothing to hide: print it as written.
        return text.trim().to_string();
    }
    let replaced = if url.password().is_some() {
        url.set_password(Some(MARK)).is_ok()
    } else if !url.username().is_empty() {
        url.set_username(MARK).is_ok()
    } else {
        true
    };
    if !replaced {
        return REDACTED.to_string();
    }
    if url.query().is_some() {
        url.set_query(Some(MARK));
    }
    url.set_fragment(None);
    url.to_string().replace(MARK, REDACTED)
}

/// Serializes an optional URL setting through [`redact_url`] (for `#[serde(serialize_with)]`).
///
/// # Errors
/// The serializer's.
pub fn redacted_url<S: Serializer>(value: &Option<String>, serializer: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(url) => serializer.serialize_some(&redact_url(url)),
        None => serializer.serialize_none(),
    }
}

/// Serializes a URL setting through [`redact_url`] (for `#[serde(serialize_with)]`).
///
/// # Errors
/// The serializer's.
pub fn redacted_url_text<S: Serializer>(value: &str, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&redact_url(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_print_without_passwords_or_queries() {
        assert_eq!(SecretUrl::new("redis://:pw@host:6379/0").redacted(), "redis://:[redacted]@host:6379/0");
        assert_eq!(SecretUrl::new("redis://u:pw@host").redacted(), "redis://u:[redacted]@host");
        assert_eq!(SecretUrl::new("redis://host:6379").redacted(), "redis://host:6379");
        assert_eq!(SecretUrl::new("postgres://h/db?password=x").redacted(), "postgres://h/db?[redacted]");
        assert_eq!(SecretUrl::new("nonsense").redacted(), "[redacted]");
        assert_eq!(
            SecretUrl::new("redis://:pw1@a:7000,redis://:pw2@b:7001").redacted(),
            "redis://:[redacted]@a:7000,redis://:[redacted]@b:7001"
        );
        assert_eq!(format!("{:?}", Secret::new("sk-1")), "[redacted]");
    }
}
