//! `download` (and `validate` on URLs) against a real HTTP server on loopback: streaming, resuming a dropped
//! connection with Range, error statuses, redirects to internal addresses, Supabase Storage, and paths that
//! try to leave the storage root.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use echo_worker::config::Secret;
use echo_worker::error::ErrorCode;
use echo_worker::source::{Fetcher, SourcePolicy};
use echo_worker::stage::builtin::download::DownloadStage;
use echo_worker::stage::builtin::validate::ValidateStage;
use echo_worker::units::ByteSize;
use serde_json::json;
use support::media::{job, run_stage, tone};

/// What the server serves and what it saw.
struct Server {
    body: Vec<u8>,
    audio: Vec<u8>,
    requests: Mutex<Vec<(String, Option<String>)>>,
    served: AtomicU64,
    flaky_failed: Mutex<bool>,
}

/// Deterministic bytes that are not any known file type.
fn noise(length: usize) -> Vec<u8> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..length)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

fn range_start(headers: &HeaderMap) -> Option<u64> {
    let value = headers.get(header::RANGE)?.to_str().ok()?;
    value.strip_prefix("bytes=")?.split('-').next()?.parse().ok()
}

fn range_end(headers: &HeaderMap) -> Option<u64> {
    let value = headers.get(header::RANGE)?.to_str().ok()?;
    value.strip_prefix("bytes=")?.split('-').nth(1)?.parse().ok()
}

/// Serves `body` honouring `Range: bytes=a-` and `bytes=a-b`.
fn serve_bytes(server: &Server, body: &[u8], headers: &HeaderMap) -> Response {
    let total = body.len() as u64;
    let start = range_start(headers).unwrap_or(0).min(total);
    let end = range_end(headers).map_or(total, |end| (end + 1).min(total));
    let part = body[start as usize..end as usize].to_vec();
    server.served.fetch_add(part.len() as u64, Ordering::SeqCst);
    let mut response = Response::new(Body::from(part.clone()));
    let headers_out = response.headers_mut();
    headers_out.insert(header::CONTENT_LENGTH, part.len().into());
    headers_out.insert(header::ACCEPT_RANGES, "bytes".parse().unwrap());
    if headers.contains_key(header::RANGE) {
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
        let range = format!("bytes {start}-{}/{total}", end.saturating_sub(1));
        response.headers_mut().insert(header::CONTENT_RANGE, range.parse().unwrap());
    }
    response
}

async fn route(
    State(server): State<Arc<Server>>,
    method: axum::http::Method,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok()).map(str::to_string);
    server.requests.lock().unwrap().push((name.clone(), range));
    match name.as_str() {
        "signed.mp3" if method == axum::http::Method::HEAD => StatusCode::FORBIDDEN.into_response(),
        "signed.mp3" => serve_bytes(&server, &server.audio, &headers),
        _ if method == axum::http::Method::HEAD && name.ends_with(".mp3") => {
            let length = if name == "tone.mp3" { server.audio.len() } else { 50 << 20 };
            ([(header::CONTENT_LENGTH, length)], ()).into_response()
        }
        "file.bin" => serve_bytes(&server, &server.body, &headers),
        "tone.mp3" => serve_bytes(&server, &server.audio, &headers),
        "junk.mp3" => {
            // Fifty megabytes of text, served lazily; validate must refuse it after a few bytes.
            let junk = "this is not audio ".repeat((50 << 20) / 18).into_bytes();
            serve_bytes(&server, &junk, &headers)
        }
        "flaky.bin" => {
            let mut failed = server.flaky_failed.lock().unwrap();
            if *failed || headers.contains_key(header::RANGE) {
                return serve_bytes(&server, &server.body, &headers);
            }
            *failed = true;
            // Announce the whole length, send half, then break the connection.
            let half = Bytes::from(server.body[..server.body.len() / 2].to_vec());
            let stream = futures_stream(half);
            let mut response = Response::new(Body::from_stream(stream));
            response.headers_mut().insert(header::CONTENT_LENGTH, server.body.len().into());
            response
        }
        "missing.bin" => StatusCode::NOT_FOUND.into_response(),
        "busy.bin" => (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "2")]).into_response(),
        "forever.bin" => {
            (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "18446744073709551615")]).into_response()
        }
        "to-private" => (StatusCode::FOUND, [(header::LOCATION, "http://10.255.255.1/secret")]).into_response(),
        "to-file" => (StatusCode::FOUND, [(header::LOCATION, "/files/file.bin")]).into_response(),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

/// A body stream that yields `first` and then fails, like a dropped connection.
fn futures_stream(first: Bytes) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    futures_util::stream::iter(vec![Ok(first), Err(std::io::Error::other("connection dropped on purpose"))])
}

async fn start(audio: Vec<u8>) -> (Arc<Server>, String) {
    let server = Arc::new(Server {
        body: noise(3 << 20),
        audio,
        requests: Mutex::new(Vec::new()),
        served: AtomicU64::new(0),
        flaky_failed: Mutex::new(false),
    });
    let app = axum::Router::new()
        .route("/files/{name}", get(route))
        .route("/storage/v1/object/sign/{bucket}/{*path}", post(sign).get(signed_object))
        .route("/storage/v1/object/{bucket}/{*path}", get(storage_object))
        .with_state(server.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (server, base)
}

const SERVICE_KEY: &str = "service-role-key-for-tests";

/// Supabase Storage's signed-URL endpoint, checking the service key.
async fn sign(UrlPath((bucket, path)): UrlPath<(String, String)>, headers: HeaderMap) -> Response {
    if headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) != Some(&format!("Bearer {SERVICE_KEY}")) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    axum::Json(json!({ "signedURL": format!("/object/sign/{bucket}/{path}?token=signed-token") })).into_response()
}

/// Supabase Storage's signed download: the token in the query is the only credential.
async fn signed_object(
    State(server): State<Arc<Server>>,
    query: axum::extract::RawQuery,
    headers: HeaderMap,
) -> Response {
    if query.0.as_deref() != Some("token=signed-token") {
        return StatusCode::BAD_REQUEST.into_response();
    }
    serve_bytes(&server, &server.audio, &headers)
}

/// Supabase Storage's object download (authenticated).
async fn storage_object(
    State(server): State<Arc<Server>>,
    UrlPath((bucket, path)): UrlPath<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let authorised =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {SERVICE_KEY}"));
    if !authorised || bucket != "recordings" {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let body = if path.ends_with(".mp3") { &server.audio } else { &server.body };
    serve_bytes(&server, body, &headers)
}

fn policy(base: &str, allow_loopback: bool) -> SourcePolicy {
    SourcePolicy {
        allow_private: if allow_loopback { vec!["127.0.0.1".parse().unwrap()] } else { Vec::new() },
        max_redirects: 5,
        supabase_url: Some(base.replace("127.0.0.1", "localhost")),
        supabase_key: Some(Secret::new(SERVICE_KEY)),
        ..SourcePolicy::default()
    }
}

fn downloader(base: &str, allow_loopback: bool) -> DownloadStage {
    DownloadStage::new(Fetcher::new(policy(base, allow_loopback)).unwrap(), ByteSize(100 << 20))
}

async fn download(
    base: &str,
    source: &str,
    params: serde_json::Value,
) -> (Result<serde_json::Value, echo_worker::job::StageError>, tempfile::TempDir) {
    let work = tempfile::tempdir().unwrap();
    let result = run_stage(&downloader(base, true), job(source, false), params, BTreeMap::new(), work.path()).await;
    (result.map(|output| output.value), work)
}

#[tokio::test]
async fn a_download_streams_to_the_work_directory() {
    let (server, base) = start(Vec::new()).await;
    let (output, work) = download(&base, &format!("{base}/files/file.bin?sig=abc"), json!({})).await;
    let output = output.unwrap();
    let path = output["path"].as_str().unwrap();
    assert!(path.starts_with(work.path().to_str().unwrap()), "{path}");
    assert!(path.ends_with("source-file.bin"), "{path}");
    assert_eq!(output["bytes"], 3 << 20);
    assert!(std::fs::read(path).unwrap() == server.body, "the bytes arrive intact");
}

#[tokio::test]
async fn a_dropped_connection_is_resumed_with_range() {
    let (server, base) = start(Vec::new()).await;
    let (output, _work) = download(&base, &format!("{base}/files/flaky.bin"), json!({})).await;
    let output = output.unwrap();
    assert!(std::fs::read(output["path"].as_str().unwrap()).unwrap() == server.body);
    let requests = server.requests.lock().unwrap().clone();
    let half = (3 << 20) / 2;
    assert_eq!(
        requests,
        [("flaky.bin".to_string(), None), ("flaky.bin".to_string(), Some(format!("bytes={half}-")))],
        "the second request asks only for what is missing"
    );
}

#[tokio::test]
async fn error_statuses_are_classified() {
    let (_, base) = start(Vec::new()).await;
    let (missing, _w) = download(&base, &format!("{base}/files/missing.bin"), json!({})).await;
    let missing = missing.unwrap_err();
    assert!(!missing.retryable, "404 is permanent");
    assert!(missing.message.ends_with("/files/missing.bin answered 404 Not Found"), "{}", missing.message);

    let (busy, _w) = download(&base, &format!("{base}/files/busy.bin"), json!({})).await;
    let busy = busy.unwrap_err();
    assert!(busy.retryable, "503 is worth a retry");
    assert_eq!(busy.retry_after, Some(std::time::Duration::from_secs(2)));
    let (forever, _w) = download(&base, &format!("{base}/files/forever.bin"), json!({})).await;
    assert_eq!(
        forever.unwrap_err().retry_after,
        Some(echo_worker::source::MAX_RETRY_AFTER),
        "a huge Retry-After is capped"
    );

    let (large, _w) = download(&base, &format!("{base}/files/file.bin"), json!({ "max_size": "1MB" })).await;
    let large = large.unwrap_err();
    assert_eq!(large.code, ErrorCode::TooLarge);
    assert!(!large.retryable);
}

#[tokio::test]
async fn internal_addresses_and_escaping_paths_are_refused() {
    let (server, base) = start(Vec::new()).await;
    let (redirected, _w) = download(&base, &format!("{base}/files/to-private"), json!({})).await;
    let redirected = redirected.unwrap_err();
    assert_eq!(redirected.code, ErrorCode::SourceRefused);
    assert!(redirected.message.contains("10.255.255.1 is an internal address"), "{}", redirected.message);

    let (followed, _w) = download(&base, &format!("{base}/files/to-file"), json!({})).await;
    assert_eq!(followed.unwrap()["bytes"], 3 << 20, "redirects to allowed hosts are followed");

    let work = tempfile::tempdir().unwrap();
    let strict = downloader(&base, false);
    let error =
        run_stage(&strict, job(&format!("{base}/files/file.bin"), false), json!({}), BTreeMap::new(), work.path())
            .await
            .unwrap_err();
    assert!(
        error.message.contains("127.0.0.1 is an internal address (127.0.0.1) and is not allow-listed"),
        "{}",
        error.message
    );

    let error = run_stage(&strict, job("file://../../etc/passwd", false), json!({}), BTreeMap::new(), work.path())
        .await
        .unwrap_err();
    assert_eq!(error.message, "source `file://../../etc/passwd` refused: `..` is not allowed in a path");
    assert!(!error.retryable);
    let before = server.requests.lock().unwrap().len();
    assert_eq!(before, 3, "the refused requests never reached the server");
}

#[tokio::test]
async fn supabase_objects_are_read_with_the_service_key() {
    let dir = tempfile::tempdir().unwrap();
    let audio = std::fs::read(tone(dir.path(), "tone.mp3", 3)).unwrap();
    let (server, base) = start(audio).await;
    let base = base.replace("127.0.0.1", "localhost");
    let (output, _w) = download(&base, "supabase://recordings/user-1/file.bin", json!({})).await;
    let output = output.unwrap();
    assert!(std::fs::read(output["path"].as_str().unwrap()).unwrap() == server.body);

    let public = format!("{base}/storage/v1/object/public/recordings/user-1/tone.mp3");
    let work = tempfile::tempdir().unwrap();
    let validator = ValidateStage::new(Fetcher::new(policy(&base, false)).unwrap(), ByteSize(100 << 20));
    let facts = run_stage(&validator, job(&public, false), json!({}), BTreeMap::new(), work.path()).await.unwrap();
    assert_eq!(facts.value["mime"], "audio/mpeg", "a public URL of the project is read through the Storage API");
}

#[tokio::test]
async fn validate_refuses_a_large_non_media_url_after_a_few_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let audio = std::fs::read(tone(dir.path(), "tone.mp3", 4)).unwrap();
    let (server, base) = start(audio).await;
    let work = tempfile::tempdir().unwrap();
    let validator = ValidateStage::new(Fetcher::new(policy(&base, true)).unwrap(), ByteSize(500_000_000));

    let error =
        run_stage(&validator, job(&format!("{base}/files/junk.mp3"), false), json!({}), BTreeMap::new(), work.path())
            .await
            .unwrap_err();
    assert_eq!(error.message, "the file is not audio or video: its bytes are text/plain");
    let served = server.served.load(Ordering::SeqCst);
    assert!(served < 1024, "only {served} bytes of 50 MB were read");

    let facts =
        run_stage(&validator, job(&format!("{base}/files/tone.mp3"), false), json!({}), BTreeMap::new(), work.path())
            .await
            .unwrap();
    assert_eq!(facts.value["mime"], "audio/mpeg");
    assert!((facts.value["duration"].as_f64().unwrap() - 4.0).abs() < 0.1);

    // A URL signed for GET only (S3-style) answers 403 to HEAD; the ranged read tells the size instead.
    let signed = format!("{base}/files/signed.mp3?X-Amz-Signature=abc");
    let facts = run_stage(&validator, job(&signed, false), json!({}), BTreeMap::new(), work.path()).await.unwrap();
    assert_eq!(facts.value["size"], server.audio.len() as u64, "the size comes from Content-Range");
}
