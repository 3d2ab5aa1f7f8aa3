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
            return self.0.split(',').map(|url| Self::new(url.trim()).redacted()).collect::<Vec<_>>().join(",");
        }
        let Some((scheme, rest)) = self.0.split_once("://") else { return REDACTED.to_string() };
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        match authority.rsplit_once('@') {
            Some((credentials, host)) => {
                let user = credentials.split(':').next().unwrap_or_default();
                format!("{scheme}://{user}:{REDACTED}@{host}{}", redact_query(tail))
            }
            None => format!("{scheme}://{authority}{}", redact_query(tail)),
        }
    }
}

/// Drops query strings, which may carry tokens (`?password=`), from a printed URL.
fn redact_query(tail: &str) -> String {
    match tail.split_once('?') {
        Some((path, _)) => format!("{path}?{REDACTED}"),
        None => tail.to_string(),
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
