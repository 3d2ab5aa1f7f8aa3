//! Supabase-style access tokens for auth tests: HS256 tokens signed with a test secret, ES256 keys made at test
//! time with `ring`, the RSA test key of `tests/fixtures/jwt`, and a loopback JWKS server whose key set a test
//! can change and whose requests it can count.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};

/// The path Supabase publishes its signing keys at, under the project URL.
pub const JWKS_PATH: &str = "/auth/v1/.well-known/jwks.json";

/// Seconds since the epoch.
pub fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// The claims of a signed-in user's access token, valid for an hour.
pub fn user_claims(sub: &str) -> Value {
    json!({ "sub": sub, "aud": "authenticated", "role": "authenticated", "exp": now() + 3600, "iat": now(),
            "email": format!("{sub}@example.com"), "session_id": "5b3c5f0e-0000-4000-8000-000000000000" })
}

/// The same claims, expired an hour ago.
pub fn expired_claims(sub: &str) -> Value {
    let mut claims = user_claims(sub);
    claims["exp"] = (now() - 3600).into();
    claims
}

/// An HS256 token signed with `secret`.
pub fn hs256(claims: &Value, secret: &str) -> String {
    sign(Algorithm::HS256, None, &EncodingKey::from_secret(secret.as_bytes()), claims)
}

/// A token with `alg: none` and no signature.
pub fn unsigned(claims: &Value) -> String {
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    format!("{}.{}.", b64(br#"{"alg":"none","typ":"JWT"}"#), b64(&serde_json::to_vec(claims).unwrap()))
}

/// A token signed with `key` under `alg`, naming `kid`.
pub fn sign(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

/// A signing key and its public JWK.
pub struct SigningKey {
    /// The `kid`.
    pub kid: String,
    /// `ES256` or `RS256`.
    pub alg: Algorithm,
    /// The private half.
    pub key: EncodingKey,
    /// The public half as the JWKS lists it.
    pub jwk: Value,
}

impl SigningKey {
    /// A new P-256 key.
    pub fn es256(kid: &str) -> Self {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
        let point = pair.public_key().as_ref();
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let jwk = json!({ "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
                          "x": b64(&point[1..33]), "y": b64(&point[33..65]) });
        Self { kid: kid.into(), alg: Algorithm::ES256, key: EncodingKey::from_ec_der(pkcs8.as_ref()), jwk }
    }

    /// The RSA test key of `tests/fixtures/jwt`, under `kid`.
    pub fn rs256(kid: &str) -> Self {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jwt");
        let der = std::fs::read(dir.join("rsa-test-private.der")).unwrap();
        let mut jwk: Value =
            serde_json::from_slice(&std::fs::read(dir.join("rsa-test-public.jwk.json")).unwrap()).unwrap();
        jwk["kid"] = kid.into();
        Self { kid: kid.into(), alg: Algorithm::RS256, key: EncodingKey::from_rsa_der(&der), jwk }
    }

    /// A token for `claims` signed with this key.
    pub fn sign(&self, claims: &Value) -> String {
        sign(self.alg, Some(&self.kid), &self.key, claims)
    }
}

/// A loopback Supabase Auth stand-in that serves `JWKS_PATH`.
pub struct JwksServer {
    /// `http://127.0.0.1:PORT`, the "project URL".
    pub base: String,
    keys: Arc<Mutex<Vec<Value>>>,
    hits: Arc<AtomicUsize>,
}

impl JwksServer {
    /// Serves these public keys.
    pub async fn start(keys: &[&SigningKey]) -> Self {
        let keys = Arc::new(Mutex::new(keys.iter().map(|key| key.jwk.clone()).collect::<Vec<_>>()));
        let hits = Arc::new(AtomicUsize::new(0));
        let (served, counted) = (keys.clone(), hits.clone());
        let app = axum::Router::new().route(
            JWKS_PATH,
            axum::routing::get(move || {
                let (served, counted) = (served.clone(), counted.clone());
                async move {
                    counted.fetch_add(1, Ordering::SeqCst);
                    axum::Json(json!({ "keys": served.lock().unwrap().clone() }))
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { base, keys, hits }
    }

    /// The full JWKS URL.
    pub fn url(&self) -> String {
        format!("{}{JWKS_PATH}", self.base)
    }

    /// Replaces the published keys (a key rotation).
    pub fn publish(&self, keys: &[&SigningKey]) {
        *self.keys.lock().unwrap() = keys.iter().map(|key| key.jwk.clone()).collect();
    }

    /// Requests answered so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}
