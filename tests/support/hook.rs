//! A callback receiver on loopback: records every request and answers from a script, and checks signatures the
//! way a receiver would (HMAC-SHA256 of `<timestamp>.<body>`, computed here with the `hmac` crate).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac};

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Call {
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

/// How the receiver answers one request: a status, an optional header, and a delay first.
#[derive(Debug, Clone, Copy)]
pub struct Answer {
    pub status: u16,
    pub header: Option<(&'static str, &'static str)>,
    pub delay: Duration,
}

pub const fn answer(status: u16) -> Answer {
    Answer { status, header: None, delay: Duration::ZERO }
}

/// An HTTP receiver on 127.0.0.1 that records every call and answers from a script (200 once it runs out).
#[derive(Debug, Clone, Default)]
pub struct Receiver {
    calls: Arc<Mutex<Vec<Call>>>,
    script: Arc<Mutex<VecDeque<Answer>>>,
    pub port: u16,
}

impl Receiver {
    pub async fn start(script: &[Answer]) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let receiver = Self {
            calls: Arc::default(),
            script: Arc::new(Mutex::new(script.iter().copied().collect())),
            port: listener.local_addr().unwrap().port(),
        };
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(hook))
            .route("/elsewhere", axum::routing::post(hook))
            .with_state(receiver.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        receiver
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook?token=receiver-query-token", self.port)
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    /// Waits (at most 10 s) until `count` calls arrived; returns them.
    pub async fn until_calls(&self, count: usize) -> Vec<Call> {
        for _ in 0..200 {
            if self.calls().len() >= count {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.calls()
    }
}

async fn hook(State(receiver): State<Receiver>, headers: HeaderMap, body: Bytes) -> Response {
    receiver.calls.lock().unwrap().push(Call { headers, body: body.to_vec() });
    let next = receiver.script.lock().unwrap().pop_front().unwrap_or(answer(200));
    tokio::time::sleep(next.delay).await;
    let status = StatusCode::from_u16(next.status).unwrap();
    match next.header {
        Some((name, value)) => (status, [(name, value)], "").into_response(),
        None => (status, "").into_response(),
    }
}

/// What a receiver would do: recompute the signature over the timestamp and the exact body, and check the
/// timestamp is recent.
pub fn verify(call: &Call, secret: &str) {
    let header = |name: &str| call.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let timestamp = header("x-echo-timestamp");
    let sent: u64 = timestamp.parse().expect("a Unix-seconds timestamp");
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    assert!(now.abs_diff(sent) < 300, "timestamp {sent} is not recent (now {now})");
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(&call.body);
    let hex: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(header("x-echo-signature"), format!("sha256={hex}"), "the signature checks out");
    assert_eq!(header("content-type"), "application/json");
}
