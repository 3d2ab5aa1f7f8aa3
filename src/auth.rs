//! Who may call the API (ARCHITECTURE.md): service bearer tokens from the settings, some of them read-only, and
//! Supabase user JWTs, signed either with the project's shared secret (HS256) or with its asymmetric signing keys
//! (RS256 / ES256) published as a JWKS. The answer is a [`Principal`]: a service, a user (by `sub`, the owner of
//! their recordings), or `Open` when no auth is configured at all (the API then listens on loopback only).
//!
//! This module knows nothing of HTTP frameworks: the API hands it the `Authorization` header and maps
//! [`AuthError::status`] and [`AuthError::code`] to its reply. Tokens are never printed: settings hold them as
//! [`Secret`]s, the authenticator keeps only their SHA-256 digests, and no error message quotes a token.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Deserializer, Serialize};
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

use crate::secret::Secret;
use crate::units::{ByteSize, HumanDuration};

/// Clock skew accepted on `exp` and `nbf`: small, since Supabase access tokens live an hour and a token that
/// expired half a minute ago is still expired.
const LEEWAY_SECONDS: u64 = 30;

/// A key set older than this is fetched again before it is trusted, so a key the project revoked stops being
/// accepted within ten minutes (the time Supabase itself lets edges cache its JWKS).
const JWKS_MAX_AGE: Duration = Duration::from_secs(600);

/// One JWKS request may take this long; a slow Auth server must not hold API requests for longer.
const JWKS_TIMEOUT: Duration = Duration::from_secs(5);

/// A real key set is a few kilobytes; a larger answer is refused instead of read into memory.
const JWKS_MAX_SIZE: ByteSize = ByteSize(256 << 10);

/// The audience and role Supabase gives a signed-in user's access token.
const AUTHENTICATED: &str = "authenticated";

/// Default of `auth.jwks_refresh_interval`.
const DEFAULT_JWKS_REFRESH: Duration = Duration::from_secs(30);

/// The `auth` section of the settings: service tokens. (Supabase's secret and key set URL sit under `supabase`.)
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuthSettings {
    /// `ECHO_AUTH__TOKENS`: bearer tokens that may do everything (comma-separated in the environment).
    #[serde(default, deserialize_with = "secret_list")]
    pub tokens: Vec<Secret>,
    /// `ECHO_AUTH__READ_ONLY_TOKENS`: bearer tokens that may look but not enqueue, cancel, retry, pause or clean.
    #[serde(default, deserialize_with = "secret_list")]
    pub read_only_tokens: Vec<Secret>,
    /// A token naming a signing key that is not in the cached key set fetches the set again, but at most once
    /// per this interval, so tokens with made-up `kid`s cannot turn the API into a flood against Supabase.
    #[serde(default = "default_jwks_refresh")]
    pub jwks_refresh_interval: HumanDuration,
}

fn default_jwks_refresh() -> HumanDuration {
    HumanDuration(DEFAULT_JWKS_REFRESH)
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self { tokens: Vec::new(), read_only_tokens: Vec::new(), jwks_refresh_interval: default_jwks_refresh() }
    }
}

/// Accepts a list of secrets, or one comma-separated string as an environment variable gives.
fn secret_list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<Secret>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrString {
        List(Vec<String>),
        Text(String),
    }
    let items = match ListOrString::deserialize(deserializer)? {
        ListOrString::List(items) => items,
        ListOrString::Text(text) => text.split(',').map(str::to_string).collect(),
    };
    Ok(items.iter().map(|item| item.trim()).filter(|item| !item.is_empty()).map(Secret::new).collect())
}

/// Everything the [`Authenticator`] needs, gathered from the settings (`config::Settings::auth`).
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// Service tokens with full rights.
    pub tokens: Vec<Secret>,
    /// Service tokens that may only read.
    pub read_only_tokens: Vec<Secret>,
    /// `SUPABASE_JWT_SECRET`: the project's shared secret; HS256 user tokens are accepted when set.
    pub jwt_secret: Option<Secret>,
    /// Where the project's asymmetric signing keys are published; RS256 / ES256 user tokens are accepted when
    /// set.
    pub jwks_url: Option<String>,
    /// Least time between two fetches of the key set prompted by an unknown `kid`.
    pub jwks_refresh_interval: Duration,
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// No auth is configured: everyone may do everything (the API then listens on loopback only).
    Open,
    /// A service token from the settings.
    Service {
        /// The token may look but not change anything.
        read_only: bool,
    },
    /// A Supabase user, who sees and changes only their own recordings.
    User {
        /// The token's `sub`: the user id, compared with a recording's owner.
        sub: String,
    },
}

impl Principal {
    /// Whether the caller may enqueue, cancel, retry, pause or clean.
    pub fn can_write(&self) -> bool {
        !matches!(self, Self::Service { read_only: true })
    }

    /// The owner whose recordings alone this caller may see; `None` for callers who may see every recording.
    pub fn owner(&self) -> Option<&str> {
        match self {
            Self::User { sub } => Some(sub),
            Self::Open | Self::Service { .. } => None,
        }
    }

    /// Whether this caller may see a recording owned by `owner` (`None`: a recording without an owner, which
    /// only services see).
    pub fn may_see(&self, owner: Option<&str>) -> bool {
        match self.owner() {
            None => true,
            Some(sub) => owner == Some(sub),
        }
    }

    /// `Ok` when the caller may change things.
    ///
    /// # Errors
    /// [`AuthError::ReadOnly`] for a read-only token.
    pub fn require_write(&self) -> Result<(), AuthError> {
        if self.can_write() { Ok(()) } else { Err(AuthError::ReadOnly) }
    }
}

/// Why a request is refused. Messages name what was wrong and never quote the token.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization` header.
    #[error("this API needs a bearer token: send `Authorization: Bearer <token>`")]
    Missing,
    /// The header is not `Bearer <token>`.
    #[error("the Authorization header must be `Bearer <token>`; it {0}")]
    MalformedHeader(&'static str),
    /// The token is neither a configured service token nor a JWT this service can check.
    #[error("the bearer token is not valid for this service")]
    WrongToken,
    /// The JWT cannot be decoded.
    #[error("the bearer token is not a well-formed JWT: {0}")]
    MalformedJwt(String),
    /// The JWT's algorithm is not one this service accepts for it.
    #[error("the JWT is signed with `{alg}`, which this service does not accept{why}")]
    UnsupportedAlgorithm {
        /// The header's `alg`.
        alg: String,
        /// Why, starting with a separator (`: …`), or empty.
        why: String,
    },
    /// An asymmetric JWT without a `kid`.
    #[error("the JWT names no signing key (`kid`), so it cannot be checked against the project's keys")]
    MissingKeyId,
    /// The `kid` is not among the project's signing keys, even after fetching them again.
    #[error("the JWT is signed with key `{kid}`, which is not one of the project's signing keys")]
    UnknownKey {
        /// The header's `kid`.
        kid: String,
    },
    /// The signature does not match.
    #[error("the JWT's signature is not valid")]
    BadSignature,
    /// `exp` has passed.
    #[error("the JWT has expired; sign in again")]
    Expired,
    /// `nbf` is in the future.
    #[error("the JWT is not valid yet (its `nbf` is in the future)")]
    NotYetValid,
    /// A valid token that is not a signed-in user's (the project's `anon` or `service_role` key, another
    /// audience, no `sub`).
    #[error("the JWT is not a signed-in user's access token: {0}")]
    NotAUser(String),
    /// The project's signing keys could not be fetched and none are cached.
    #[error("the signing keys at {url} could not be fetched: {reason}")]
    KeysUnavailable {
        /// The JWKS URL.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// A read-only token tried to change something.
    #[error("this token is read-only: it may look but not enqueue, cancel, retry, pause or clean")]
    ReadOnly,
}

impl AuthError {
    /// The HTTP status: 401 for no or bad credentials, 403 for a read-only token on a write, 503 when the
    /// signing keys cannot be fetched (the caller may be fine; this service cannot tell yet).
    pub fn status(&self) -> u16 {
        match self {
            Self::ReadOnly => 403,
            Self::KeysUnavailable { .. } => 503,
            _ => 401,
        }
    }

    /// The machine-readable code of the API's error body.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Missing => "missing_token",
            Self::MalformedHeader(_) => "malformed_authorization",
            Self::WrongToken => "invalid_token",
            Self::MalformedJwt(_) => "malformed_token",
            Self::UnsupportedAlgorithm { .. } => "unsupported_algorithm",
            Self::MissingKeyId | Self::UnknownKey { .. } => "unknown_signing_key",
            Self::BadSignature => "invalid_signature",
            Self::Expired => "token_expired",
            Self::NotYetValid => "token_not_yet_valid",
            Self::NotAUser(_) => "not_a_user_token",
            Self::KeysUnavailable { .. } => "signing_keys_unavailable",
            Self::ReadOnly => "read_only_token",
        }
    }
}

/// Checks `Authorization` headers. Cheap to share (`Arc`), safe to call from many requests at once.
pub struct Authenticator {
    /// SHA-256 of each service token and whether it is read-only. Digests have one length, so comparing them
    /// in constant time leaks neither the tokens nor their lengths.
    tokens: Vec<([u8; 32], bool)>,
    /// The HS256 key made from `SUPABASE_JWT_SECRET`.
    shared_secret: Option<DecodingKey>,
    /// The project's published signing keys.
    jwks: Option<Jwks>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Authenticator {
    /// An authenticator for these settings.
    pub fn new(config: AuthConfig) -> Self {
        let digest = |token: &Secret| -> [u8; 32] { Sha256::digest(token.expose().as_bytes()).into() };
        let tokens = config
            .tokens
            .iter()
            .map(|token| (digest(token), false))
            .chain(config.read_only_tokens.iter().map(|token| (digest(token), true)))
            .collect();
        let shared_secret = config.jwt_secret.map(|secret| DecodingKey::from_secret(secret.expose().as_bytes()));
        let jwks = config.jwks_url.map(|url| Jwks::new(url, config.jwks_refresh_interval));
        Self { tokens, shared_secret, jwks }
    }

    /// No way to authenticate is configured: every caller is [`Principal::Open`].
    pub fn is_open(&self) -> bool {
        self.tokens.is_empty() && self.shared_secret.is_none() && self.jwks.is_none()
    }

    /// What is accepted, for the start-up log (no secrets).
    pub fn describe(&self) -> String {
        if self.is_open() {
            return "no auth configured: every caller may do everything".into();
        }
        let read_only = self.tokens.iter().filter(|(_, read_only)| *read_only).count();
        let mut parts = vec![format!("{} service token(s), {read_only} of them read-only", self.tokens.len())];
        if self.shared_secret.is_some() {
            parts.push("Supabase user JWTs signed with SUPABASE_JWT_SECRET (HS256)".into());
        }
        if let Some(jwks) = &self.jwks {
            parts.push(format!("Supabase user JWTs signed with the keys at {}", crate::secret::redact_url(&jwks.url)));
        }
        parts.join("; ")
    }

    /// Who sends this `Authorization` header.
    ///
    /// # Errors
    /// An [`AuthError`] saying what is missing or wrong; [`AuthError::KeysUnavailable`] when a user token
    /// cannot be checked because the project's keys cannot be fetched.
    pub async fn authenticate(&self, authorization_header: Option<&str>) -> Result<Principal, AuthError> {
        if self.is_open() {
            return Ok(Principal::Open);
        }
        let token = bearer_token(authorization_header.ok_or(AuthError::Missing)?)?;
        if let Some(read_only) = self.service_token(token) {
            return Ok(Principal::Service { read_only });
        }
        let accepts_jwts = self.shared_secret.is_some() || self.jwks.is_some();
        if accepts_jwts && token.split('.').count() == 3 {
            return self.user(token).await;
        }
        Err(AuthError::WrongToken)
    }

    /// Whether `token` is a service token, and if so whether it is read-only. Every configured token is compared,
    /// each in constant time, so the time taken says nothing about which one matched or how close a guess was.
    fn service_token(&self, token: &str) -> Option<bool> {
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let (mut found, mut read_only) = (Choice::from(0), Choice::from(0));
        for (digest, is_read_only) in &self.tokens {
            let equal = digest.ct_eq(&presented);
            found |= equal;
            read_only |= equal & Choice::from(u8::from(*is_read_only));
        }
        bool::from(found).then(|| bool::from(read_only))
    }

    /// Checks a Supabase access token: the algorithm pinned by the key that checks it, the signature, `exp`,
    /// `nbf`, `aud` and that it names a signed-in user.
    async fn user(&self, token: &str) -> Result<Principal, AuthError> {
        let header = JwtHeader::parse(token)?;
        let unsupported = |why: &str| AuthError::UnsupportedAlgorithm { alg: header.alg.clone(), why: why.into() };
        let (algorithm, key) = match header.alg.as_str() {
            "HS256" => {
                let key = self.shared_secret.clone().ok_or_else(|| unsupported(": SUPABASE_JWT_SECRET is not set"))?;
                (Algorithm::HS256, key)
            }
            "RS256" | "RS384" | "RS512" | "ES256" | "ES384" => {
                let jwks = self.jwks.as_ref().ok_or_else(|| {
                    unsupported(": no signing key set is configured (SUPABASE_URL or `supabase.jwks_url`)")
                })?;
                let kid = header.kid.as_deref().ok_or(AuthError::MissingKeyId)?;
                let key = jwks.key(kid).await?;
                if key.algorithm_name != header.alg {
                    return Err(unsupported(&format!(": key `{kid}` signs with `{}`", key.algorithm_name)));
                }
                (key.algorithm, key.key.clone())
            }
            "none" => return Err(unsupported(": unsigned tokens are never accepted")),
            _ => return Err(unsupported(": accepted are HS256, RS256 and ES256")),
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = LEEWAY_SECONDS;
        validation.validate_nbf = true;
        // The audience is checked below, where a missing `aud` is allowed and a wrong one gets a clear message.
        validation.validate_aud = false;
        let claims = jsonwebtoken::decode::<Claims>(token, &key, &validation).map_err(from_jwt_error)?.claims;
        claims.into_principal()
    }
}

/// The token of a `Bearer <token>` header.
fn bearer_token(header: &str) -> Result<&str, AuthError> {
    let header = header.trim();
    let (scheme, token) = header.split_once(' ').unwrap_or((header, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::MalformedHeader("does not start with `Bearer `"));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(AuthError::MalformedHeader("has no token after `Bearer `"));
    }
    if token.contains(char::is_whitespace) {
        return Err(AuthError::MalformedHeader("has spaces inside the token"));
    }
    Ok(token)
}

/// What a JWT's header says, read before anything is trusted, to choose the key.
struct JwtHeader {
    alg: String,
    kid: Option<String>,
}

impl JwtHeader {
    fn parse(token: &str) -> Result<Self, AuthError> {
        #[derive(Deserialize)]
        struct Raw {
            alg: Option<String>,
            kid: Option<String>,
        }
        let encoded = token.split('.').next().unwrap_or_default();
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(encoded.trim_end_matches('='))
            .map_err(|_| AuthError::MalformedJwt("its header is not base64url".into()))?;
        let raw: Raw = serde_json::from_slice(&bytes)
            .map_err(|error| AuthError::MalformedJwt(format!("its header is not a JSON object ({error})")))?;
        let alg = raw.alg.ok_or_else(|| AuthError::MalformedJwt("its header has no `alg`".into()))?;
        Ok(Self { alg, kid: raw.kid })
    }
}

/// The claims this service reads; `exp` and `nbf` are checked by `jsonwebtoken`.
#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    role: Option<String>,
    aud: Option<Audience>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Claims {
    fn into_principal(self) -> Result<Principal, AuthError> {
        match &self.aud {
            Some(Audience::One(aud)) if aud != AUTHENTICATED => {
                return Err(AuthError::NotAUser(format!("its audience is `{aud}`, not `{AUTHENTICATED}`")));
            }
            Some(Audience::Many(auds)) if !auds.iter().any(|aud| aud == AUTHENTICATED) => {
                return Err(AuthError::NotAUser(format!("its audiences do not include `{AUTHENTICATED}`")));
            }
            _ => {}
        }
        if let Some(role) = &self.role
            && role != AUTHENTICATED
        {
            // The project's `anon` and `service_role` API keys are JWTs too; neither is a user.
            return Err(AuthError::NotAUser(format!("its role is `{role}`, not `{AUTHENTICATED}`")));
        }
        match self.sub {
            Some(sub) if !sub.trim().is_empty() => Ok(Principal::User { sub }),
            _ => Err(AuthError::NotAUser("it has no `sub` (user id)".into())),
        }
    }
}

fn from_jwt_error(error: jsonwebtoken::errors::Error) -> AuthError {
    use jsonwebtoken::errors::ErrorKind;
    match error.kind() {
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::MissingRequiredClaim(claim) => AuthError::MalformedJwt(format!("it has no `{claim}` claim")),
        ErrorKind::InvalidAlgorithm => {
            AuthError::UnsupportedAlgorithm { alg: "?".into(), why: ": it does not fit the signing key".into() }
        }
        // ring refuses a malformed ECDSA or RSA signature with an error rather than `false`.
        ErrorKind::Crypto(_) | ErrorKind::InvalidEcdsaKey | ErrorKind::InvalidRsaKey(_) => AuthError::BadSignature,
        ErrorKind::Base64(_) => AuthError::MalformedJwt("a part is not base64url".into()),
        ErrorKind::Json(error) => AuthError::MalformedJwt(format!("its claims are not valid JSON ({error})")),
        ErrorKind::Utf8(_) => AuthError::MalformedJwt("its claims are not UTF-8".into()),
        _ => AuthError::MalformedJwt(error.to_string()),
    }
}

/// One verification key from the key set, with the one algorithm it may check.
struct KeyEntry {
    algorithm: Algorithm,
    algorithm_name: String,
    key: DecodingKey,
}

/// The keys by `kid`, when they were last fetched, and when and why the last attempt failed.
#[derive(Default)]
struct KeySet {
    keys: HashMap<String, Arc<KeyEntry>>,
    /// The last successful fetch.
    fetched_at: Option<Instant>,
    /// The last attempt, successful or not: attempts are spaced by the refresh interval, so that while
    /// Supabase is down requests answer at once instead of each waiting for a timeout.
    attempted_at: Option<Instant>,
    /// Why the last attempt failed, if it did.
    last_error: Option<String>,
}

impl KeySet {
    fn is_fresh(&self) -> bool {
        self.fetched_at.is_some_and(|at| at.elapsed() < JWKS_MAX_AGE)
    }
}

/// The project's published signing keys, fetched on demand and cached.
struct Jwks {
    url: String,
    client: reqwest::Client,
    refresh_interval: Duration,
    /// Read on every user request, replaced after a fetch: a std lock, since no `.await` happens while it is
    /// held.
    keys: RwLock<Arc<KeySet>>,
    /// Held while fetching, so that a burst of requests with a new `kid` makes one request, not one each.
    fetching: tokio::sync::Mutex<()>,
}

impl Jwks {
    fn new(url: String, refresh_interval: Duration) -> Self {
        let client = reqwest::Client::builder()
            .timeout(JWKS_TIMEOUT)
            .redirect(reqwest::redirect::Policy::limited(3))
            .build()
            .unwrap_or_default();
        Self { url, client, refresh_interval, keys: RwLock::new(Arc::default()), fetching: tokio::sync::Mutex::new(()) }
    }

    fn current(&self) -> Arc<KeySet> {
        self.keys.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// The key named `kid`: from the cache while it is fresh, else after fetching the set again (at most once
    /// per refresh interval for an unknown `kid`).
    async fn key(&self, kid: &str) -> Result<Arc<KeyEntry>, AuthError> {
        let set = self.current();
        if let Some(key) = set.keys.get(kid)
            && set.is_fresh()
        {
            return Ok(key.clone());
        }
        let _fetching = self.fetching.lock().await;
        // Another request may have fetched while this one waited.
        let set = self.current();
        let wanted = !set.keys.contains_key(kid) || !set.is_fresh();
        let allowed = set.attempted_at.is_none_or(|at| at.elapsed() >= self.refresh_interval);
        if wanted && allowed {
            let url = crate::secret::redact_url(&self.url);
            let now = Some(Instant::now());
            let next = match self.fetch().await {
                Ok(keys) => {
                    tracing::info!(%url, keys = keys.len(), "fetched the Supabase signing keys");
                    KeySet { keys, fetched_at: now, attempted_at: now, last_error: None }
                }
                Err(reason) => {
                    // Cached keys are still the project's best known keys: they keep serving rather than
                    // every user being refused while Supabase is unreachable.
                    tracing::warn!(%url, %reason, cached = set.keys.len(), "could not fetch the Supabase signing keys");
                    KeySet {
                        keys: set.keys.clone(),
                        fetched_at: set.fetched_at,
                        attempted_at: now,
                        last_error: Some(reason),
                    }
                }
            };
            *self.keys.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(next);
        }
        let set = self.current();
        if let Some(key) = set.keys.get(kid) {
            return Ok(key.clone());
        }
        if set.fetched_at.is_none() {
            let reason = set.last_error.clone().unwrap_or_else(|| "not fetched yet".into());
            return Err(AuthError::KeysUnavailable { url: crate::secret::redact_url(&self.url), reason });
        }
        Err(AuthError::UnknownKey { kid: kid.to_string() })
    }

    /// Fetches and parses the key set. Keys that cannot verify signatures here (encryption keys, symmetric
    /// keys, unknown curves) are skipped: a JWKS key is only ever used for its own asymmetric algorithm.
    async fn fetch(&self) -> Result<HashMap<String, Arc<KeyEntry>>, String> {
        let response = self.client.get(&self.url).send().await.map_err(|error| error.without_url().to_string())?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("the server answered {status}"));
        }
        let body = crate::bounded::read_body(response, JWKS_MAX_SIZE, "the JWKS size limit")
            .await
            .map_err(|error| error.to_string())?;
        parse_jwks(&body)
    }
}

/// The usable signing keys of a JWKS document, by `kid`.
fn parse_jwks(body: &[u8]) -> Result<HashMap<String, Arc<KeyEntry>>, String> {
    #[derive(Deserialize)]
    struct Document {
        keys: Vec<serde_json::Value>,
    }
    #[derive(Deserialize)]
    struct Jwk {
        kty: String,
        kid: Option<String>,
        alg: Option<String>,
        #[serde(rename = "use")]
        usage: Option<String>,
        crv: Option<String>,
        n: Option<String>,
        e: Option<String>,
        x: Option<String>,
        y: Option<String>,
    }
    let document: Document =
        serde_json::from_slice(body).map_err(|error| format!("the answer is not a JWKS document ({error})"))?;
    let mut keys = HashMap::new();
    for value in document.keys {
        let Ok(jwk) = serde_json::from_value::<Jwk>(value) else { continue };
        let Some(kid) = jwk.kid else { continue };
        if jwk.usage.as_deref().is_some_and(|usage| usage != "sig") {
            continue;
        }
        let (name, key) = match (jwk.kty.as_str(), jwk.crv.as_deref(), &jwk.n, &jwk.e, &jwk.x, &jwk.y) {
            ("RSA", _, Some(n), Some(e), _, _) => {
                let name = match jwk.alg.as_deref() {
                    None => "RS256",
                    Some(alg @ ("RS256" | "RS384" | "RS512")) => alg,
                    Some(_) => continue,
                };
                (name, DecodingKey::from_rsa_components(n, e))
            }
            ("EC", Some(crv @ ("P-256" | "P-384")), _, _, Some(x), Some(y)) => {
                let name = if crv == "P-256" { "ES256" } else { "ES384" };
                if jwk.alg.as_deref().is_some_and(|alg| alg != name) {
                    continue;
                }
                (name, DecodingKey::from_ec_components(x, y))
            }
            _ => continue,
        };
        let Ok(key) = key else { continue };
        let Ok(algorithm) = name.parse::<Algorithm>() else { continue };
        keys.insert(kid, Arc::new(KeyEntry { algorithm, algorithm_name: name.to_string(), key }));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};

    const SECRET: &str = "super-secret-jwt-token-with-at-least-32-characters";

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn user_claims(sub: &str) -> serde_json::Value {
        serde_json::json!({ "sub": sub, "aud": "authenticated", "role": "authenticated", "exp": now() + 3600 })
    }

    fn hs256(claims: &serde_json::Value, secret: &str) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(secret.as_bytes()))
            .unwrap()
    }

    fn with_secret() -> Authenticator {
        Authenticator::new(AuthConfig { jwt_secret: Some(Secret::new(SECRET)), ..AuthConfig::default() })
    }

    fn with_tokens() -> Authenticator {
        Authenticator::new(AuthConfig {
            tokens: vec![Secret::new("full-token-1"), Secret::new("full-token-2")],
            read_only_tokens: vec![Secret::new("look-token")],
            ..AuthConfig::default()
        })
    }

    async fn check(auth: &Authenticator, token: &str) -> Result<Principal, AuthError> {
        auth.authenticate(Some(&format!("Bearer {token}"))).await
    }

    #[tokio::test]
    async fn no_configuration_is_open() {
        let auth = Authenticator::new(AuthConfig::default());
        assert!(auth.is_open());
        assert_eq!(auth.authenticate(None).await.unwrap(), Principal::Open);
        assert_eq!(auth.authenticate(Some("Bearer anything")).await.unwrap(), Principal::Open);
        assert!(Principal::Open.can_write());
    }

    #[tokio::test]
    async fn service_tokens_full_and_read_only() {
        let auth = with_tokens();
        assert_eq!(check(&auth, "full-token-2").await.unwrap(), Principal::Service { read_only: false });
        let look = check(&auth, "look-token").await.unwrap();
        assert_eq!(look, Principal::Service { read_only: true });
        assert!(!look.can_write());
        assert_eq!(look.require_write().unwrap_err().status(), 403);
        assert!(look.may_see(Some("anyone")));
        assert_eq!(
            auth.authenticate(Some("bearer   full-token-1  ")).await.unwrap(),
            Principal::Service { read_only: false }
        );
    }

    #[tokio::test]
    async fn a_token_in_both_lists_is_read_only() {
        let auth = Authenticator::new(AuthConfig {
            tokens: vec![Secret::new("both")],
            read_only_tokens: vec![Secret::new("both")],
            ..AuthConfig::default()
        });
        assert_eq!(check(&auth, "both").await.unwrap(), Principal::Service { read_only: true });
    }

    #[tokio::test]
    async fn missing_malformed_and_wrong_tokens_are_401() {
        let auth = with_tokens();
        for (header, code) in [
            (None, "missing_token"),
            (Some("full-token-1"), "malformed_authorization"),
            (Some("Basic dXNlcjpwdw=="), "malformed_authorization"),
            (Some("Bearer"), "malformed_authorization"),
            (Some("Bearer "), "malformed_authorization"),
            (Some("Bearer full-token-1 extra"), "malformed_authorization"),
            (Some("Bearer full-token-"), "invalid_token"),
            (Some("Bearer full-token-1x"), "invalid_token"),
            (Some("Bearer a.b.c"), "invalid_token"),
        ] {
            let error = auth.authenticate(header).await.unwrap_err();
            assert_eq!((error.status(), error.code()), (401, code), "{header:?}: {error}");
            assert!(!error.to_string().contains("full-token-1"), "{error}");
        }
    }

    #[tokio::test]
    async fn hs256_user_tokens() {
        let auth = with_secret();
        let principal = check(&auth, &hs256(&user_claims("user-1"), SECRET)).await.unwrap();
        assert_eq!(principal, Principal::User { sub: "user-1".into() });
        assert_eq!(principal.owner(), Some("user-1"));
        assert!(principal.can_write());
        assert!(principal.may_see(Some("user-1")));
        assert!(!principal.may_see(Some("user-2")));
        assert!(!principal.may_see(None));
        // No `aud` at all is accepted; Supabase always sends one, other issuers may not.
        let mut claims = user_claims("user-1");
        claims.as_object_mut().unwrap().remove("aud");
        assert!(check(&auth, &hs256(&claims, SECRET)).await.is_ok());
        claims["aud"] = serde_json::json!(["other", "authenticated"]);
        assert!(check(&auth, &hs256(&claims, SECRET)).await.is_ok());
    }

    #[tokio::test]
    async fn bad_user_tokens_are_refused_with_their_reason() {
        let auth = with_secret();
        let expired = {
            let mut claims = user_claims("u");
            claims["exp"] = (now() - LEEWAY_SECONDS - 60).into();
            hs256(&claims, SECRET)
        };
        let within_leeway = {
            let mut claims = user_claims("u");
            claims["exp"] = (now() - 5).into();
            hs256(&claims, SECRET)
        };
        assert!(check(&auth, &within_leeway).await.is_ok(), "a few seconds of clock skew are accepted");
        let claims_with = |key: &str, value: serde_json::Value| {
            let mut claims = user_claims("u");
            claims[key] = value;
            hs256(&claims, SECRET)
        };
        let without = |key: &str| {
            let mut claims = user_claims("u");
            claims.as_object_mut().unwrap().remove(key);
            hs256(&claims, SECRET)
        };
        let valid = hs256(&user_claims("u"), SECRET);
        let (head, rest) = valid.split_once('.').unwrap();
        let (payload, _) = rest.split_once('.').unwrap();
        let none_header = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &user_claims("u"),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        let tampered = {
            let other = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(serde_json::to_vec(&user_claims("someone-else")).unwrap());
            format!("{head}.{other}.{}", valid.rsplit('.').next().unwrap())
        };
        for (name, token, code) in [
            ("wrong secret", hs256(&user_claims("u"), "another-secret-another-secret-xx"), "invalid_signature"),
            ("tampered payload", tampered, "invalid_signature"),
            ("expired", expired, "token_expired"),
            ("not yet valid", claims_with("nbf", (now() + 3600).into()), "token_not_yet_valid"),
            ("no exp", without("exp"), "malformed_token"),
            ("alg none", format!("{none_header}.{payload}."), "unsupported_algorithm"),
            ("HS512", hs512, "unsupported_algorithm"),
            ("anon key", claims_with("role", "anon".into()), "not_a_user_token"),
            ("service_role key", claims_with("role", "service_role".into()), "not_a_user_token"),
            ("other audience", claims_with("aud", "somebody".into()), "not_a_user_token"),
            ("no sub", without("sub"), "not_a_user_token"),
            ("empty sub", claims_with("sub", "".into()), "not_a_user_token"),
            ("header not base64", format!("!!!.{payload}.sig"), "malformed_token"),
            ("header not json", format!("bm90IGpzb24.{payload}.sig"), "malformed_token"),
            (
                "RS256 without a key set",
                format!("{}.{payload}.sig", b64(r#"{"alg":"RS256","kid":"k"}"#)),
                "unsupported_algorithm",
            ),
        ] {
            let error = check(&auth, &token).await.unwrap_err();
            assert_eq!((error.status(), error.code()), (401, code), "{name}: {error}");
            assert!(!error.to_string().contains(SECRET), "{name}: {error}");
        }
    }

    fn b64(text: &str) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
    }

    #[tokio::test]
    async fn hs256_is_refused_without_the_secret_even_with_a_key_set() {
        // A JWKS-only deployment: an HS256 token signed with anything must not get through (no HS/RS confusion).
        let auth = Authenticator::new(AuthConfig {
            jwks_url: Some("http://127.0.0.1:9/never-fetched".into()),
            ..AuthConfig::default()
        });
        let error = check(&auth, &hs256(&user_claims("u"), SECRET)).await.unwrap_err();
        assert_eq!(error.code(), "unsupported_algorithm", "{error}");
    }

    #[test]
    fn jwks_documents_keep_only_usable_signing_keys() {
        let document = serde_json::json!({ "keys": [
            { "kty": "EC", "kid": "ec", "crv": "P-256", "alg": "ES256", "use": "sig",
              "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU", "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0" },
            { "kty": "EC", "kid": "enc", "crv": "P-256", "use": "enc",
              "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU", "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0" },
            { "kty": "oct", "kid": "sym", "k": "c2VjcmV0" },
            { "kty": "RSA", "kid": "rsa", "n": "sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw", "e": "AQAB" },
            { "kty": "RSA", "kid": "rsa-ps", "alg": "PS256", "n": "sXch", "e": "AQAB" },
            { "kty": "EC", "kid": "no-y", "crv": "P-256", "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU" },
            { "kty": "OKP", "kid": "ed", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo" },
            { "no": "kty" },
        ]});
        let keys = parse_jwks(&serde_json::to_vec(&document).unwrap()).unwrap();
        let mut names: Vec<_> = keys.iter().map(|(kid, key)| format!("{kid}:{}", key.algorithm_name)).collect();
        names.sort();
        assert_eq!(names, ["ec:ES256", "rsa:RS256"]);
        assert!(parse_jwks(b"<html>").is_err_and(|error| error.contains("not a JWKS document")));
    }

    #[test]
    fn settings_take_comma_lists() {
        let settings: AuthSettings =
            serde_json::from_value(serde_json::json!({ "tokens": " a , b,,", "read_only_tokens": ["c"] })).unwrap();
        let exposed: Vec<_> = settings.tokens.iter().map(Secret::expose).collect();
        assert_eq!(exposed, ["a", "b"]);
        assert_eq!(settings.read_only_tokens.len(), 1);
        assert_eq!(settings.jwks_refresh_interval.0, DEFAULT_JWKS_REFRESH);
        let printed = format!("{settings:?} {}", serde_json::to_string(&settings).unwrap());
        assert!(!printed.contains("\"a\"") && printed.contains("[redacted]"), "{printed}");
    }

    /// Test signing keys: ES256 pairs made here, and the RSA pair of `tests/fixtures/jwt`.
    mod keys {
        use super::*;
        use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};

        pub fn es256(kid: &str) -> (EncodingKey, serde_json::Value) {
            let rng = ring::rand::SystemRandom::new();
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
            let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
            let point = pair.public_key().as_ref();
            let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
            let jwk = serde_json::json!({ "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
                "x": b64(&point[1..33]), "y": b64(&point[33..65]) });
            (EncodingKey::from_ec_der(pkcs8.as_ref()), jwk)
        }

        pub fn rs256(kid: &str) -> (EncodingKey, serde_json::Value) {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jwt");
            let der = std::fs::read(dir.join("rsa-test-private.der")).unwrap();
            let mut jwk: serde_json::Value =
                serde_json::from_slice(&std::fs::read(dir.join("rsa-test-public.jwk.json")).unwrap()).unwrap();
            jwk["kid"] = kid.into();
            (EncodingKey::from_rsa_der(&der), jwk)
        }

        pub fn sign(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &serde_json::Value) -> String {
            let mut header = Header::new(alg);
            header.kid = kid.map(str::to_string);
            jsonwebtoken::encode(&header, claims, key).unwrap()
        }
    }

    /// A loopback JWKS server whose key set the test changes, counting the requests it answers.
    struct JwksServer {
        url: String,
        keys: Arc<std::sync::Mutex<serde_json::Value>>,
        hits: Arc<std::sync::atomic::AtomicUsize>,
        status: Arc<std::sync::atomic::AtomicU16>,
    }

    impl JwksServer {
        async fn start(keys: Vec<serde_json::Value>) -> Self {
            use std::sync::atomic::Ordering;
            let state = Arc::new(std::sync::Mutex::new(serde_json::json!({ "keys": keys })));
            let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let status = Arc::new(std::sync::atomic::AtomicU16::new(200));
            let (served, counted, answered) = (state.clone(), hits.clone(), status.clone());
            let app = axum::Router::new().route(
                "/auth/v1/.well-known/jwks.json",
                axum::routing::get(move || {
                    let (served, counted, answered) = (served.clone(), counted.clone(), answered.clone());
                    async move {
                        counted.fetch_add(1, Ordering::SeqCst);
                        let status = axum::http::StatusCode::from_u16(answered.load(Ordering::SeqCst)).unwrap();
                        (status, axum::Json(served.lock().unwrap().clone()))
                    }
                }),
            );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}/auth/v1/.well-known/jwks.json", listener.local_addr().unwrap());
            tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
            Self { url, keys: state, hits, status }
        }

        fn publish(&self, keys: Vec<serde_json::Value>) {
            *self.keys.lock().unwrap() = serde_json::json!({ "keys": keys });
        }

        fn hits(&self) -> usize {
            self.hits.load(std::sync::atomic::Ordering::SeqCst)
        }

        fn authenticator(&self, refresh: Duration) -> Authenticator {
            Authenticator::new(AuthConfig {
                jwks_url: Some(self.url.clone()),
                jwks_refresh_interval: refresh,
                ..AuthConfig::default()
            })
        }
    }

    #[tokio::test]
    async fn jwks_keys_are_fetched_cached_and_refreshed_for_a_new_kid() {
        let (ec_key, ec_jwk) = keys::es256("ec-1");
        let (rsa_key, rsa_jwk) = keys::rs256("rsa-2");
        let server = JwksServer::start(vec![ec_jwk.clone()]).await;
        let auth = server.authenticator(Duration::ZERO);
        let claims = user_claims("user-ec");

        let token = keys::sign(Algorithm::ES256, Some("ec-1"), &ec_key, &claims);
        assert_eq!(check(&auth, &token).await.unwrap(), Principal::User { sub: "user-ec".into() });
        assert_eq!(check(&auth, &token).await.unwrap(), Principal::User { sub: "user-ec".into() });
        assert_eq!(server.hits(), 1, "a known kid is served from the cache");

        // The project rotates in an RSA key: a token naming it makes the set be fetched again.
        server.publish(vec![ec_jwk, rsa_jwk]);
        let token = keys::sign(Algorithm::RS256, Some("rsa-2"), &rsa_key, &user_claims("user-rsa"));
        assert_eq!(check(&auth, &token).await.unwrap(), Principal::User { sub: "user-rsa".into() });
        assert_eq!(server.hits(), 2);

        // A kid the project never published: fetched once more (the interval is zero here), then refused.
        let (other_key, _) = keys::es256("ghost");
        let ghost = keys::sign(Algorithm::ES256, Some("ghost"), &other_key, &claims);
        let error = check(&auth, &ghost).await.unwrap_err();
        assert_eq!((error.status(), error.code()), (401, "unknown_signing_key"), "{error}");
        assert!(error.to_string().contains("ghost"), "{error}");
        assert_eq!(server.hits(), 3);
    }

    #[tokio::test]
    async fn unknown_kids_refetch_at_most_once_per_interval() {
        let (ec_key, ec_jwk) = keys::es256("ec-1");
        let server = JwksServer::start(vec![ec_jwk]).await;
        let auth = Arc::new(server.authenticator(Duration::from_secs(3600)));
        let claims = user_claims("u");
        // A burst of made-up kids: one fetch (the first ever), every token refused.
        let attempts: Vec<_> = (0..20)
            .map(|i| {
                let auth = auth.clone();
                let token = keys::sign(Algorithm::ES256, Some(&format!("made-up-{i}")), &ec_key, &claims);
                tokio::spawn(async move { check(&auth, &token).await })
            })
            .collect();
        for attempt in attempts {
            assert_eq!(attempt.await.unwrap().unwrap_err().code(), "unknown_signing_key");
        }
        assert_eq!(server.hits(), 1, "concurrent unknown kids share one fetch, later ones wait for the interval");
        let token = keys::sign(Algorithm::ES256, Some("ec-1"), &ec_key, &claims);
        assert!(check(&auth, &token).await.is_ok());
        assert_eq!(server.hits(), 1);
    }

    #[tokio::test]
    async fn jwks_tokens_are_pinned_to_their_key_and_signature() {
        let (ec_key, ec_jwk) = keys::es256("ec-1");
        let (rsa_key, mut rsa_jwk) = keys::rs256("rsa-2");
        let server = JwksServer::start(vec![ec_jwk.clone(), rsa_jwk.clone()]).await;
        let auth = server.authenticator(Duration::ZERO);
        let claims = user_claims("u");
        let (stranger, _) = keys::es256("ec-1");
        // The RSA key's public modulus as an HMAC secret: the classic RS/HS confusion.
        rsa_jwk["kid"] = "rsa-2".into();
        let public_as_secret = EncodingKey::from_secret(rsa_jwk["n"].as_str().unwrap().as_bytes());
        let expired = {
            let mut claims = claims.clone();
            claims["exp"] = (now() - 3600).into();
            claims
        };
        for (name, token, code) in [
            (
                "another key with a known kid",
                keys::sign(Algorithm::ES256, Some("ec-1"), &stranger, &claims),
                "invalid_signature",
            ),
            (
                "RS256 naming the EC key",
                keys::sign(Algorithm::RS256, Some("ec-1"), &rsa_key, &claims),
                "unsupported_algorithm",
            ),
            (
                "HS256 with the public key as secret",
                keys::sign(Algorithm::HS256, Some("rsa-2"), &public_as_secret, &claims),
                "unsupported_algorithm",
            ),
            ("no kid", keys::sign(Algorithm::ES256, None, &ec_key, &claims), "unknown_signing_key"),
            ("expired", keys::sign(Algorithm::ES256, Some("ec-1"), &ec_key, &expired), "token_expired"),
            (
                "anon key",
                keys::sign(
                    Algorithm::ES256,
                    Some("ec-1"),
                    &ec_key,
                    &serde_json::json!({ "role": "anon", "exp": now() + 60 }),
                ),
                "not_a_user_token",
            ),
        ] {
            let error = check(&auth, &token).await.unwrap_err();
            assert_eq!((error.status(), error.code()), (401, code), "{name}: {error}");
        }
    }

    #[tokio::test]
    async fn unreachable_keys_are_503_until_fetched_then_cached_keys_serve() {
        use std::sync::atomic::Ordering;
        let (ec_key, ec_jwk) = keys::es256("ec-1");
        let server = JwksServer::start(vec![ec_jwk]).await;
        let auth = server.authenticator(Duration::ZERO);
        let token = keys::sign(Algorithm::ES256, Some("ec-1"), &ec_key, &user_claims("u"));
        server.status.store(500, Ordering::SeqCst);
        let error = check(&auth, &token).await.unwrap_err();
        assert_eq!((error.status(), error.code()), (503, "signing_keys_unavailable"), "{error}");
        assert!(error.to_string().contains("500"), "{error}");
        server.status.store(200, Ordering::SeqCst);
        assert!(check(&auth, &token).await.is_ok());
        // Supabase goes away: a token with a new kid is refused as unknown, the cached key still works.
        server.status.store(503, Ordering::SeqCst);
        let (other, _) = keys::es256("ec-2");
        let new_kid = keys::sign(Algorithm::ES256, Some("ec-2"), &other, &user_claims("u"));
        assert_eq!(check(&auth, &new_kid).await.unwrap_err().code(), "unknown_signing_key");
        assert!(check(&auth, &token).await.is_ok());

        let closed = Authenticator::new(AuthConfig {
            jwks_url: Some("http://127.0.0.1:9/auth/v1/.well-known/jwks.json".into()),
            ..AuthConfig::default()
        });
        assert_eq!(check(&closed, &token).await.unwrap_err().status(), 503);

        // With a long interval, a failed first fetch is not repeated by every request: they answer 503 at once.
        server.status.store(500, Ordering::SeqCst);
        let patient = server.authenticator(Duration::from_secs(3600));
        let hits = server.hits();
        for _ in 0..3 {
            assert_eq!(check(&patient, &token).await.unwrap_err().code(), "signing_keys_unavailable");
        }
        assert_eq!(server.hits(), hits + 1);
    }
}
