//! A Supabase Storage stand-in on loopback holding a private `recordings` bucket: objects are served only on the
//! authenticated route `/storage/v1/object/{bucket}/{path}` with the service key as both `Authorization: Bearer`
//! and `apikey`, as Storage checks them; the public and signed URLs the frontend stores answer as they do for a
//! private bucket without a valid token (400), so a worker that fetched them directly fails. HEAD and `Range`
//! are answered like Storage does. Every request is recorded.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// The service role key the stand-in accepts.
pub const SERVICE_KEY: &str = "service-role-key-0123456789";

/// One request as the stand-in saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    /// Whether both headers carried the service key.
    pub authorised: bool,
}

/// The stand-in's state.
pub struct Storage {
    /// `http://localhost:PORT`: the Supabase URL to configure.
    pub base: String,
    objects: Mutex<HashMap<String, Vec<u8>>>,
    pub seen: Mutex<Vec<Seen>>,
}

impl Storage {
    /// Starts the stand-in on a loopback port.
    pub async fn start() -> Arc<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://localhost:{}", listener.local_addr().unwrap().port());
        let storage = Arc::new(Self { base, objects: Mutex::new(HashMap::new()), seen: Mutex::new(Vec::new()) });
        let app = axum::Router::new()
            .route("/storage/v1/object/{*rest}", axum::routing::any(object))
            .with_state(storage.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        storage
    }

    /// Stores `bytes` at `path` in the `recordings` bucket.
    pub fn put(&self, path: &str, bytes: Vec<u8>) {
        self.objects.lock().unwrap().insert(format!("recordings/{path}"), bytes);
    }

    /// The public URL the frontend stores in `file_url` (`getPublicUrl`).
    pub fn public_url(&self, path: &str) -> String {
        format!("{}/storage/v1/object/public/recordings/{path}", self.base)
    }

    /// A signed URL (`createSignedUrl`), whose token this private stand-in does not honour.
    pub fn signed_url(&self, path: &str) -> String {
        format!("{}/storage/v1/object/sign/recordings/{path}?token=eyJhbGciOiJIUzI1NiJ9.expired.x", self.base)
    }

    /// Requests that reached an object with the service key.
    pub fn authorised(&self) -> usize {
        self.seen.lock().unwrap().iter().filter(|seen| seen.authorised).count()
    }

    /// Requests refused.
    pub fn refused(&self) -> usize {
        self.seen.lock().unwrap().iter().filter(|seen| !seen.authorised).count()
    }
}

fn storage_error(status: &str, error: &str, message: &str) -> Response {
    // Storage answers 400 with the real status inside the body.
    (StatusCode::BAD_REQUEST, axum::Json(json!({ "statusCode": status, "error": error, "message": message })))
        .into_response()
}

async fn object(
    State(storage): State<Arc<Storage>>,
    method: Method,
    Path(rest): Path<String>,
    headers: HeaderMap,
) -> Response {
    let bearer =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {SERVICE_KEY}"));
    let apikey = headers.get("apikey").and_then(|v| v.to_str().ok()) == Some(SERVICE_KEY);
    let private_route = !rest.starts_with("public/") && !rest.starts_with("sign/");
    let authorised = bearer && apikey && private_route;
    storage.seen.lock().unwrap().push(Seen { method: method.clone(), path: rest.clone(), authorised });
    if !private_route {
        return storage_error("404", "Bucket not found", "Bucket not found");
    }
    if !authorised {
        return storage_error("403", "Unauthorized", "invalid signature");
    }
    let Some(bytes) = storage.objects.lock().unwrap().get(&rest).cloned() else {
        return storage_error("404", "not_found", "Object not found");
    };
    let total = bytes.len();
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.split_once('-'))
        .and_then(|(start, end)| {
            let start: usize = start.parse().ok()?;
            let end: usize = if end.is_empty() { total - 1 } else { end.parse::<usize>().ok()?.min(total - 1) };
            (start <= end && start < total).then_some((start, end))
        });
    let (status, slice, content_range) = match range {
        Some((start, end)) => {
            (StatusCode::PARTIAL_CONTENT, bytes[start..=end].to_vec(), Some(format!("bytes {start}-{end}/{total}")))
        }
        None => (StatusCode::OK, bytes, None),
    };
    let mut response = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "audio/mpeg")
        .header(header::CONTENT_LENGTH, slice.len())
        .header(header::ACCEPT_RANGES, "bytes");
    if let Some(value) = content_range {
        response = response.header(header::CONTENT_RANGE, value);
    }
    let body = if method == Method::HEAD { Body::empty() } else { Body::from(slice) };
    response.body(body).unwrap()
}
