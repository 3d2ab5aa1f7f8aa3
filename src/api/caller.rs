//! Who is calling (ARCHITECTURE.md, "The API"). Every handler that reads or changes jobs takes a [`Caller`],
//! extracted from the request by [`Callers`], and asks it two things only: may it change anything
//! ([`Caller::can_write`]), and whose recordings may it see ([`Caller::owner`]: `None` for service callers,
//! who see all). Keeping the interface this small lets the checks behind it (service tokens, Supabase user
//! JWTs) change without touching a handler.
//!
//! With no credentials configured every caller is the open caller, and the API binds to 127.0.0.1 only (see
//! `Application::build`), so an unconfigured server is never open to the network.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::StatusCode;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;

use super::ApiState;
use super::error::ApiError;
use crate::auth::{AuthError, Authenticator, Principal};
use crate::config::Settings;

/// Why the caller checks could not be set up from the settings.
#[derive(Debug, thiserror::Error)]
#[error("auth settings: {0}")]
pub struct CallerError(pub String);

/// The caller of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    principal: Principal,
}

impl Caller {
    /// The caller of a server with no auth configured.
    pub const fn open() -> Self {
        Self { principal: Principal::Open }
    }

    /// Who it is, as the auth module sees it.
    pub fn principal(&self) -> &Principal {
        &self.principal
    }

    /// Whether the caller may change things (enqueue, cancel, retry, pause, clean).
    ///
    /// # Errors
    /// 403 `read_only_token` for a caller that may only look.
    pub fn can_write(&self) -> Result<(), ApiError> {
        self.principal.require_write().map_err(ApiError::from)
    }

    /// The user whose recordings alone this caller may see; `None` for callers that see every recording.
    pub fn owner(&self) -> Option<&str> {
        self.principal.owner()
    }

    /// Whether the caller may see a job or recording owned by `owner`. A user sees only their own; a
    /// recording with no owner is seen only by services (and by everyone on an open server).
    pub fn may_see(&self, owner: Option<&str>) -> bool {
        self.principal.may_see(owner)
    }
}

/// Checks credentials and names callers; built once from the settings.
#[derive(Debug, Clone)]
pub struct Callers {
    authenticator: Arc<Authenticator>,
}

impl Default for Callers {
    /// No auth: every caller is open.
    fn default() -> Self {
        Self { authenticator: Arc::new(Authenticator::new(crate::auth::AuthConfig::default())) }
    }
}

impl Callers {
    /// The checks the settings configure: service tokens (`auth.*`), and Supabase user tokens
    /// (`SUPABASE_JWT_SECRET`, the key set at `supabase.jwks_url` or under `SUPABASE_URL`).
    ///
    /// # Errors
    /// [`CallerError`] for unusable auth settings.
    pub fn from_settings(settings: &Settings) -> Result<Self, CallerError> {
        let config = settings.auth();
        if let Some(url) = &config.jwks_url
            && !reqwest::Url::parse(url).is_ok_and(|url| matches!(url.scheme(), "http" | "https"))
        {
            return Err(CallerError(format!(
                "the signing key set URL `{}` (supabase.jwks_url, or SUPABASE_URL + {}) is not an http(s) URL",
                crate::secret::redact_url(url),
                "/auth/v1/.well-known/jwks.json"
            )));
        }
        let authenticator = Authenticator::new(config);
        if !authenticator.is_open() {
            tracing::info!(accepted = %authenticator.describe(), "API auth");
        }
        Ok(Self { authenticator: Arc::new(authenticator) })
    }

    /// Whether any credentials are configured (without, the API binds to loopback only).
    pub fn is_configured(&self) -> bool {
        !self.authenticator.is_open()
    }

    /// The caller of a request, from its `Authorization` header.
    ///
    /// # Errors
    /// 401 without valid credentials when auth is configured (the code names the reason); 503 when a user token
    /// arrives before the project's signing keys could ever be fetched.
    pub async fn identify(&self, parts: &Parts) -> Result<Caller, ApiError> {
        let header = match parts.headers.get(AUTHORIZATION) {
            None => None,
            Some(value) => Some(value.to_str().map_err(|_| {
                ApiError::from(AuthError::MalformedHeader("holds characters that are not visible ASCII"))
            })?),
        };
        let principal = self.authenticator.authenticate(header).await?;
        Ok(Caller { principal })
    }
}

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> Self {
        match error.status() {
            403 => ApiError::new(StatusCode::FORBIDDEN, error.code(), error.to_string()),
            503 => {
                // The URL and the cause are for the log; the caller learns only to come back.
                let mut reply = ApiError::unavailable("project's signing key service", &error);
                reply.code = error.code();
                reply
            }
            _ => ApiError::new(StatusCode::UNAUTHORIZED, error.code(), error.to_string()),
        }
    }
}

impl FromRequestParts<ApiState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, Self::Rejection> {
        state.callers.identify(parts).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    #[test]
    fn callers_are_configured_by_tokens_or_supabase_and_refuse_a_bad_key_set_url() {
        let mut settings = Settings::default();
        assert!(!Callers::from_settings(&settings).unwrap().is_configured(), "nothing set: open");
        settings.auth.read_only_tokens = vec![Secret::new("look")];
        assert!(Callers::from_settings(&settings).unwrap().is_configured());
        let mut settings = Settings::default();
        settings.supabase.url = Some("https://proj.supabase.co".into());
        assert!(Callers::from_settings(&settings).unwrap().is_configured(), "SUPABASE_URL brings the key set");
        settings.supabase.jwks_url = Some("ftp://proj.supabase.co/keys".into());
        let error = Callers::from_settings(&settings).unwrap_err().to_string();
        assert!(error.contains("ftp://proj.supabase.co/keys") && error.contains("http(s)"), "{error}");
    }

    #[test]
    fn auth_errors_become_401_403_and_an_opaque_503() {
        let unauthorized = ApiError::from(AuthError::Expired);
        assert_eq!((unauthorized.status, unauthorized.code), (StatusCode::UNAUTHORIZED, "token_expired"));
        let forbidden = ApiError::from(AuthError::ReadOnly);
        assert_eq!((forbidden.status, forbidden.code), (StatusCode::FORBIDDEN, "read_only_token"));
        let unavailable = ApiError::from(AuthError::KeysUnavailable {
            url: "https://proj.supabase.co/auth/v1/.well-known/jwks.json".into(),
            reason: "connection refused".into(),
        });
        assert_eq!(
            (unavailable.status, unavailable.code),
            (StatusCode::SERVICE_UNAVAILABLE, "signing_keys_unavailable")
        );
        assert!(!unavailable.message.contains("proj.supabase.co") && !unavailable.message.contains("refused"));
        assert!(unavailable.retry_after().is_some());
    }

    #[tokio::test]
    async fn a_header_that_is_not_text_is_malformed() {
        let mut settings = Settings::default();
        settings.auth.tokens = vec![Secret::new("full")];
        let callers = Callers::from_settings(&settings).unwrap();
        let request = axum::http::Request::builder()
            .header(AUTHORIZATION, axum::http::HeaderValue::from_bytes(b"Bearer \xff\xfe").unwrap())
            .body(())
            .unwrap();
        let (parts, ()) = request.into_parts();
        let error = callers.identify(&parts).await.unwrap_err();
        assert_eq!((error.status, error.code), (StatusCode::UNAUTHORIZED, "malformed_authorization"));
        let request = axum::http::Request::builder().header(AUTHORIZATION, "Bearer full").body(()).unwrap();
        let (parts, ()) = request.into_parts();
        assert_eq!(callers.identify(&parts).await.unwrap().principal(), &Principal::Service { read_only: false });
    }
}
