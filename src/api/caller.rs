//! Who is calling (ARCHITECTURE.md, "The API"). Every handler that reads or changes jobs takes a [`Caller`],
//! extracted from the request by [`Callers`], and asks it two things only: may it change anything
//! ([`Caller::can_write`]), and whose recordings may it see ([`Caller::owner`]: `None` for service callers,
//! who see all). Keeping the interface this small lets the checks behind it (service tokens, Supabase user
//! JWTs) change without touching a handler.
//!
//! With no credentials configured every caller is the open caller, and the API binds to 127.0.0.1 only (see
//! `Application::build`), so an unconfigured server is never open to the network.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use super::ApiState;
use super::error::ApiError;
use crate::config::Settings;

/// Why the caller checks could not be set up from the settings.
#[derive(Debug, thiserror::Error)]
#[error("auth settings: {0}")]
pub struct CallerError(pub String);

/// Who a request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Identity {
    /// No auth is configured: a local caller with every right.
    Open,
}

/// The caller of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    identity: Identity,
}

impl Caller {
    /// The caller of a server with no auth configured.
    pub const fn open() -> Self {
        Self { identity: Identity::Open }
    }

    /// Whether the caller may change things (enqueue, cancel, retry, pause, clean).
    ///
    /// # Errors
    /// 403 `read_only` for a caller that may only look.
    pub fn can_write(&self) -> Result<(), ApiError> {
        match self.identity {
            Identity::Open => Ok(()),
        }
    }

    /// The user whose recordings alone this caller may see; `None` for callers that see every recording.
    pub fn owner(&self) -> Option<&str> {
        match self.identity {
            Identity::Open => None,
        }
    }

    /// Whether the caller may see a job or recording owned by `owner`.
    pub fn may_see(&self, owner: Option<&str>) -> bool {
        self.owner().is_none_or(|me| owner == Some(me))
    }
}

/// Checks credentials and names callers; built once from the settings.
#[derive(Debug, Clone, Default)]
pub struct Callers {}

impl Callers {
    /// The checks the settings configure.
    ///
    /// # Errors
    /// [`CallerError`] for unusable auth settings.
    pub fn from_settings(_settings: &Settings) -> Result<Self, CallerError> {
        Ok(Self {})
    }

    /// Whether any credentials are configured (without, the API binds to loopback only).
    pub fn is_configured(&self) -> bool {
        false
    }

    /// The caller of a request.
    ///
    /// # Errors
    /// 401 without valid credentials when auth is configured.
    pub async fn identify(&self, _parts: &Parts) -> Result<Caller, ApiError> {
        Ok(Caller::open())
    }
}

impl FromRequestParts<ApiState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, Self::Rejection> {
        state.callers.identify(parts).await
    }
}
