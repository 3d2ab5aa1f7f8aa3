//! A fake Azure OpenAI / OpenAI server on loopback that checks requests the way the real services do (auth
//! header, `api-version`, multipart fields, the 26,214,400-byte limit with the real 413 body, the file
//! extension allow-list, the `json_schema` shape) and answers realistically: transcriptions in `verbose_json`
//! whose segments span the uploaded audio's real duration (probed with ffprobe) and whose text names the file
//! it heard, chat answers that fit the requested schema. Tests script faults and read what it saw.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

/// The key the fake accepts.
pub const KEY: &str = "sk-fake-key-0123456789";
/// A second accepted key, for a separate transcription resource.
pub const WHISPER_KEY: &str = "sk-fake-whisper-key-9876543210";

/// Which endpoint a request hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Audio transcription.
    Transcription,
    /// Chat completion.
    Chat,
}

/// A scripted misbehaviour for the next request of a kind.
#[derive(Debug, Clone)]
pub enum Fault {
    /// 429 with `retry-after` seconds.
    TooMany(u64),
    /// 500.
    ServerError,
    /// No answer for a minute (the client must time out).
    Hang,
    /// A reply that is not JSON of the schema.
    BadJson,
    /// 429 `insufficient_quota`.
    Quota,
    /// 400 `content_filter`.
    ContentFilter,
}

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub kind: Kind,
    pub at: Instant,
    pub file_name: Option<String>,
    pub prompt: Option<String>,
    pub body: Value,
    pub status: u16,
    pub audio_seconds: f64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// SHA-256 of the uploaded file (transcriptions), lowercase hex: which chunk was sent.
    pub sha256: Option<String>,
}

/// The fake's state.
pub struct Fake {
    pub base: String,
    pub seen: Mutex<Vec<Seen>>,
    /// SHA-256 of every transcription upload as soon as its body arrived, whether or not the client stayed for the
    /// answer (a request whose client died is never in `seen`).
    pub uploads: Mutex<Vec<String>>,
    faults: Mutex<VecDeque<(Kind, Fault)>>,
    in_flight: AtomicUsize,
    pub max_in_flight: AtomicUsize,
    /// How long a transcription takes, so that concurrent requests overlap.
    pub delay: Mutex<Duration>,
    /// The server's own limit: at most N transcription requests per window, else 429.
    pub limit: Mutex<Option<(usize, Duration)>>,
}

impl Fake {
    /// Starts the fake on a loopback port.
    pub async fn start() -> Arc<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let fake = Arc::new(Self {
            base,
            seen: Mutex::new(Vec::new()),
            uploads: Mutex::new(Vec::new()),
            faults: Mutex::new(VecDeque::new()),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            delay: Mutex::new(Duration::from_millis(300)),
            limit: Mutex::new(None),
        });
        let app = axum::Router::new()
            .route("/openai/deployments/{deployment}/audio/transcriptions", post(azure_transcription))
            .route("/openai/deployments/{deployment}/chat/completions", post(azure_chat))
            .route("/v1/audio/transcriptions", post(openai_transcription))
            .route("/v1/chat/completions", post(openai_chat))
            .layer(DefaultBodyLimit::max(64 << 20))
            .with_state(fake.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        fake
    }

    /// Requests being answered now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Scripts a fault for the next request of `kind`.
    pub fn fault(&self, kind: Kind, fault: Fault) {
        self.faults.lock().unwrap().push_back((kind, fault));
    }

    /// What it saw, of one kind.
    pub fn seen(&self, kind: Kind) -> Vec<Seen> {
        self.seen.lock().unwrap().iter().filter(|seen| seen.kind == kind).cloned().collect()
    }

    fn next_fault(&self, kind: Kind) -> Option<Fault> {
        let mut faults = self.faults.lock().unwrap();
        let position = faults.iter().position(|(k, _)| *k == kind)?;
        faults.remove(position).map(|(_, fault)| fault)
    }

    fn record(&self, seen: Seen) {
        self.seen.lock().unwrap().push(seen);
    }
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(
            json!({ "error": { "message": message, "type": "invalid_request_error", "param": null, "code": code } }),
        ),
    )
        .into_response()
}

fn check_azure(headers: &HeaderMap, query: &std::collections::HashMap<String, String>) -> Option<Response> {
    if !matches!(headers.get("api-key").and_then(|v| v.to_str().ok()), Some(KEY | WHISPER_KEY)) {
        return Some(error(
            StatusCode::UNAUTHORIZED,
            "401",
            "Access denied due to invalid subscription key or wrong API endpoint.",
        ));
    }
    if !query.contains_key("api-version") {
        return Some(error(StatusCode::NOT_FOUND, "404", "Resource not found (api-version is required)"));
    }
    None
}

fn check_openai(headers: &HeaderMap) -> Option<Response> {
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(&format!("Bearer {KEY}")) {
        return Some(error(StatusCode::UNAUTHORIZED, "invalid_api_key", "Incorrect API key provided."));
    }
    None
}

async fn azure_transcription(
    State(fake): State<Arc<Fake>>,
    Path(_deployment): Path<String>,
    Query(query): Query<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
    form: Multipart,
) -> Response {
    if let Some(refused) = check_azure(&headers, &query) {
        return refused;
    }
    transcription(fake, form, false).await
}

async fn openai_transcription(State(fake): State<Arc<Fake>>, headers: HeaderMap, form: Multipart) -> Response {
    if let Some(refused) = check_openai(&headers) {
        return refused;
    }
    transcription(fake, form, true).await
}

const EXTENSIONS: [&str; 10] = ["flac", "m4a", "mp3", "mp4", "mpeg", "mpga", "oga", "ogg", "wav", "webm"];

struct InFlight(Arc<Fake>);

impl InFlight {
    fn enter(fake: &Arc<Fake>) -> Self {
        let now = fake.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        fake.max_in_flight.fetch_max(now, Ordering::SeqCst);
        Self(fake.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn transcription(fake: Arc<Fake>, mut form: Multipart, needs_model: bool) -> Response {
    let at = Instant::now();
    let _flight = InFlight::enter(&fake);
    let (mut file, mut file_name, mut format, mut prompt, mut model) = (None, None, None, None, None);
    while let Ok(Some(field)) = form.next_field().await {
        match field.name().unwrap_or_default().to_string().as_str() {
            "file" => {
                file_name = field.file_name().map(str::to_string);
                file = field.bytes().await.ok();
            }
            "response_format" => format = field.text().await.ok(),
            "prompt" => prompt = field.text().await.ok(),
            "model" => model = field.text().await.ok(),
            _ => {}
        }
    }
    let mut seen = Seen {
        kind: Kind::Transcription,
        at,
        file_name: file_name.clone(),
        prompt,
        body: Value::Null,
        status: 200,
        audio_seconds: 0.0,
        prompt_tokens: 0,
        completion_tokens: 0,
        sha256: file.as_ref().map(|bytes| {
            use sha2::Digest as _;
            sha2::Sha256::digest(bytes).iter().map(|byte| format!("{byte:02x}")).collect()
        }),
    };
    if let Some(sha256) = &seen.sha256 {
        fake.uploads.lock().unwrap().push(sha256.clone());
    }
    let window_full = {
        let limit = *fake.limit.lock().unwrap();
        limit.is_some_and(|(count, window)| {
            fake.seen(Kind::Transcription)
                .iter()
                .filter(|s| s.status == 200 && at.duration_since(s.at) < window)
                .count()
                >= count
        })
    };
    let refusal = if window_full {
        Some((
            StatusCode::TOO_MANY_REQUESTS,
            error(
                StatusCode::TOO_MANY_REQUESTS,
                "429",
                "Requests to the Audio_Transcriptions Operation have exceeded call rate limit. Please retry after 1 second.",
            ),
        ))
    } else if let Some(fault) = fake.next_fault(Kind::Transcription) {
        Some(fault_response(&fault))
    } else if needs_model && model.is_none() {
        Some((
            StatusCode::BAD_REQUEST,
            error(StatusCode::BAD_REQUEST, "missing_model", "you must provide a model parameter"),
        ))
    } else {
        let name = file_name.clone().unwrap_or_default();
        let extension = name.rsplit('.').next().unwrap_or_default().to_lowercase();
        match &file {
            None => Some((StatusCode::BAD_REQUEST, error(StatusCode::BAD_REQUEST, "missing_file", "file is required"))),
            Some(bytes) if bytes.len() > 26_214_400 => Some((
                StatusCode::PAYLOAD_TOO_LARGE,
                (StatusCode::PAYLOAD_TOO_LARGE, axum::Json(json!({ "error": { "message": format!("Maximum content size limit (26214400) exceeded ({} bytes read)", bytes.len()), "type": "server_error" } }))).into_response(),
            )),
            Some(_) if !EXTENSIONS.contains(&extension.as_str()) => Some((
                StatusCode::BAD_REQUEST,
                error(StatusCode::BAD_REQUEST, "invalid_value", &format!("Unsupported file format {extension}")),
            )),
            Some(_) if !matches!(format.as_deref(), Some("json" | "verbose_json" | "text" | "srt" | "vtt")) => {
                Some((StatusCode::BAD_REQUEST, error(StatusCode::BAD_REQUEST, "invalid_value", "bad response_format")))
            }
            Some(_) => None,
        }
    };
    if let Some((status, response)) = refusal {
        seen.status = status.as_u16();
        fake.record(seen);
        if status == StatusCode::GATEWAY_TIMEOUT {
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        return response;
    }
    let bytes = file.unwrap();
    let name = file_name.unwrap_or_default();
    let duration = probe_duration(&bytes, &name).await;
    let delay = *fake.delay.lock().unwrap();
    tokio::time::sleep(delay).await;
    let pieces = (duration / 30.0).ceil().max(1.0) as usize;
    let segments: Vec<Value> = (0..pieces)
        .map(|index| {
            let start = index as f64 * duration / pieces as f64;
            let end = (index + 1) as f64 * duration / pieces as f64;
            json!({ "id": index, "seek": 0, "start": start, "end": end, "text": format!(" {name} part {index}."), "tokens": [], "temperature": 0.0, "avg_logprob": -0.2, "compression_ratio": 1.3, "no_speech_prob": 0.01 })
        })
        .collect();
    let text: String = segments.iter().map(|s| s["text"].as_str().unwrap()).collect::<Vec<_>>().join("");
    seen.audio_seconds = duration;
    fake.record(seen);
    if format.as_deref() == Some("verbose_json") {
        axum::Json(json!({ "task": "transcribe", "language": "english", "duration": duration, "text": text, "segments": segments })).into_response()
    } else {
        axum::Json(json!({ "text": text })).into_response()
    }
}

fn fault_response(fault: &Fault) -> (StatusCode, Response) {
    match fault {
        Fault::TooMany(seconds) => {
            let mut response = error(
                StatusCode::TOO_MANY_REQUESTS,
                "429",
                &format!("Rate limit reached. Please retry after {seconds} seconds."),
            );
            response.headers_mut().insert("retry-after", seconds.to_string().parse().unwrap());
            (StatusCode::TOO_MANY_REQUESTS, response)
        }
        Fault::ServerError => (
            StatusCode::INTERNAL_SERVER_ERROR,
            error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "The server had an error"),
        ),
        Fault::Quota => (
            StatusCode::TOO_MANY_REQUESTS,
            error(
                StatusCode::TOO_MANY_REQUESTS,
                "insufficient_quota",
                "You exceeded your current quota, please check your plan and billing details.",
            ),
        ),
        Fault::ContentFilter => (
            StatusCode::BAD_REQUEST,
            error(
                StatusCode::BAD_REQUEST,
                "content_filter",
                "The response was filtered due to the prompt triggering Azure OpenAI's content management policy.",
            ),
        ),
        Fault::BadJson => (StatusCode::OK, StatusCode::OK.into_response()),
        Fault::Hang => (StatusCode::GATEWAY_TIMEOUT, error(StatusCode::GATEWAY_TIMEOUT, "timeout", "hung")),
    }
}

async fn probe_duration(bytes: &[u8], name: &str) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name.rsplit('/').next().unwrap_or("upload.bin"));
    std::fs::write(&path, bytes).unwrap();
    let output = tokio::process::Command::new("ffprobe")
        .args(["-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0"])
        .arg(&path)
        .output()
        .await
        .unwrap();
    String::from_utf8_lossy(&output.stdout).trim().parse().unwrap_or(0.0)
}

async fn azure_chat(
    State(fake): State<Arc<Fake>>,
    Path(_deployment): Path<String>,
    Query(query): Query<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
    body: axum::Json<Value>,
) -> Response {
    if let Some(refused) = check_azure(&headers, &query) {
        return refused;
    }
    chat(fake, body.0, false)
}

async fn openai_chat(State(fake): State<Arc<Fake>>, headers: HeaderMap, body: axum::Json<Value>) -> Response {
    if let Some(refused) = check_openai(&headers) {
        return refused;
    }
    chat(fake, body.0, true)
}

fn tokens(text: &str) -> u64 {
    text.chars().count().div_ceil(4) as u64
}

fn chat(fake: Arc<Fake>, body: Value, needs_model: bool) -> Response {
    let mut seen = Seen {
        kind: Kind::Chat,
        at: Instant::now(),
        file_name: None,
        prompt: None,
        body: body.clone(),
        status: 200,
        audio_seconds: 0.0,
        prompt_tokens: 0,
        completion_tokens: 0,
        sha256: None,
    };
    let format = &body["response_format"];
    let name_ok = format["json_schema"]["name"].as_str().is_some_and(|name| {
        !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    });
    let shape_ok = format.is_null()
        || (format["type"] == "json_schema"
            && name_ok
            && format["json_schema"]["schema"].is_object()
            && format["json_schema"]["strict"].is_boolean());
    let refusal = if let Some(fault) = fake.next_fault(Kind::Chat) {
        Some(fault_response(&fault))
    } else if needs_model && !body["model"].is_string() {
        Some((
            StatusCode::BAD_REQUEST,
            error(StatusCode::BAD_REQUEST, "missing_model", "you must provide a model parameter"),
        ))
    } else if !body["messages"].is_array() || !shape_ok {
        Some((
            StatusCode::BAD_REQUEST,
            error(StatusCode::BAD_REQUEST, "invalid_request", "bad messages or response_format"),
        ))
    } else {
        None
    };
    if let Some((status, response)) = refusal {
        seen.status = status.as_u16();
        let bad_json = status == StatusCode::OK;
        fake.record(seen);
        if bad_json {
            return axum::Json(json!({ "choices": [{ "index": 0, "finish_reason": "stop", "message": { "role": "assistant", "content": "{ not json", "refusal": null } }], "usage": { "prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2 } })).into_response();
        }
        return response;
    }
    let content = match format["json_schema"]["schema"].as_object() {
        Some(_) => example(&format["json_schema"]["schema"], "reply").to_string(),
        None => "plain answer".to_string(),
    };
    let prompt_text: String =
        body["messages"].as_array().unwrap().iter().filter_map(|m| m["content"].as_str()).collect();
    seen.prompt_tokens = tokens(&prompt_text);
    seen.completion_tokens = tokens(&content);
    let usage = json!({ "prompt_tokens": seen.prompt_tokens, "completion_tokens": seen.completion_tokens, "total_tokens": seen.prompt_tokens + seen.completion_tokens });
    fake.record(seen);
    axum::Json(json!({
        "id": "chatcmpl-fake", "object": "chat.completion",
        "choices": [{ "index": 0, "finish_reason": "stop", "message": { "role": "assistant", "content": content, "refusal": null } }],
        "usage": usage
    }))
    .into_response()
}

/// A value that fits `schema`.
pub fn example(schema: &Value, name: &str) -> Value {
    if let Some(options) = schema["enum"].as_array() {
        return options[0].clone();
    }
    let kind = match &schema["type"] {
        Value::String(kind) => kind.as_str(),
        Value::Array(kinds) => kinds.iter().filter_map(Value::as_str).find(|k| *k != "null").unwrap_or("null"),
        _ => "string",
    };
    match kind {
        "object" => Value::Object(
            schema["properties"]
                .as_object()
                .map(|properties| {
                    properties.iter().map(|(key, property)| (key.clone(), example(property, key))).collect()
                })
                .unwrap_or_default(),
        ),
        "array" => Value::Array(vec![example(&schema["items"], name)]),
        "number" => json!(0.5),
        "integer" => json!(1),
        "boolean" => json!(true),
        "null" => Value::Null,
        _ => json!(format!("example {name}")),
    }
}
