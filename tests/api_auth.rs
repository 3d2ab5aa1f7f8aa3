//! Who may call the API, tested through the whole app on port 0 (`support::app::TestApp`): service tokens
//! (full and read-only), Supabase user JWTs signed with the project secret (HS256) or with keys from a loopback
//! JWKS (ES256, RS256; a new `kid` fetches the set again), a user seeing only their own recordings and jobs
//! (others' answer 404), `/health` open, and — through the real binary — that no secret reaches a reply or a
//! log line, and that an unconfigured API listens on loopback only and says so.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use echo_worker::store::Store as _;
use serde_json::{Value, json};
use support::app::{Reply, TestApp};
use support::jwt::{self, JwksServer, SigningKey};

const FULL: &str = "svc-token-full-8c1f4e2a9b";
const LOOK: &str = "svc-token-look-3d7a0c5e11";
const SECRET: &str = "jwt-secret-for-tests-6e0b2f9d4c7a1e3b5d8f";

/// An app with one full and one read-only service token and the HS256 project secret.
async fn app() -> TestApp {
    TestApp::builder()
        .settings(|settings, _| {
            settings.auth.tokens = vec![echo_worker::config::Secret::new(FULL)];
            settings.auth.read_only_tokens = vec![echo_worker::config::Secret::new(LOOK)];
            settings.supabase.jwt_secret = Some(echo_worker::config::Secret::new(SECRET));
        })
        .start()
        .await
}

/// Requests with a bearer token.
trait AsCaller {
    async fn get_as(&self, token: &str, path: &str) -> Reply;
    async fn post_as(&self, token: &str, path: &str, body: &Value) -> Reply;
}

impl AsCaller for TestApp {
    async fn get_as(&self, token: &str, path: &str) -> Reply {
        self.send(self.client.get(self.url(path)).bearer_auth(token)).await
    }

    async fn post_as(&self, token: &str, path: &str, body: &Value) -> Reply {
        self.send(self.client.post(self.url(path)).bearer_auth(token).json(body)).await
    }
}

/// Queues recording `id` from a file in the app's storage as `token`; returns the reply.
async fn queue_recording(app: &TestApp, token: &str, id: &str) -> Reply {
    let file = app.storage().join(format!("{id}.wav"));
    std::fs::write(&file, b"RIFF....WAVE").unwrap();
    app.post_as(token, "/api/process-recording", &json!({ "recordingId": id, "fileUrl": file.to_str().unwrap() })).await
}

fn assert_refused(reply: &Reply, status: u16, code: &str, what: &str) {
    assert_eq!((reply.status, reply.code()), (status, code), "{what}: {}", reply.text);
    assert_eq!(reply.body["success"], false, "{what}");
    assert!(reply.body["error"].as_str().is_some_and(|e| !e.is_empty()), "{what}: a sentence says why");
    if status == 401 {
        assert_eq!(reply.header("www-authenticate"), Some("Bearer"), "{what}");
    }
}

#[tokio::test]
async fn health_is_open_and_every_other_route_needs_a_valid_token() {
    let app = app().await;
    assert_eq!(app.health().await.status, 200, "/health needs no token");

    let reply = app.recording_status("rec-1").await;
    assert_refused(&reply, 401, "missing_token", "no token");
    let reply = app.process_recording(&json!({ "recordingId": "rec-1" })).await;
    assert_refused(&reply, 401, "missing_token", "no token on a write");
    let reply = app.queue_stats().await;
    assert_refused(&reply, 401, "missing_token", "no token on the queue");

    let reply = app.get_as(&format!("{FULL}x"), "/api/recording/rec-1/status").await;
    assert_refused(&reply, 401, "invalid_token", "a near miss of a real token");
    let reply = app.get_as("not-a-token", "/api/queue/stats").await;
    assert_refused(&reply, 401, "invalid_token", "a wrong token");
    let basic =
        app.send(app.client.get(app.url("/api/queue/stats")).header("authorization", format!("Basic {FULL}"))).await;
    assert_refused(&basic, 401, "malformed_authorization", "not a bearer header");

    let reply = app.get_as(FULL, "/api/recording/rec-1/status").await;
    assert_refused(&reply, 404, "recording_not_found", "a valid token gets through to the route");
    app.stop().await;
}

#[tokio::test]
async fn a_read_only_token_reads_but_every_write_is_403() {
    let app = app().await;
    let queued = queue_recording(&app, FULL, "rec-ro").await;
    assert_eq!(queued.status, 202, "{}", queued.text);
    let job = queued.body["jobId"].as_str().unwrap().to_string();

    for path in
        ["/api/recording/rec-ro/status".to_string(), format!("/api/job/{job}/status"), "/api/queue/stats".into()]
    {
        let reply = app.get_as(LOOK, &path).await;
        assert_eq!(reply.status, 200, "a read-only token reads {path}: {}", reply.text);
    }
    let writes = [
        ("/api/process-recording", json!({ "recordingId": "rec-ro-2", "fileUrl": "https://example.com/a.mp3" })),
        (&*format!("/api/job/{job}/cancel"), json!({})),
        (&*format!("/api/job/{job}/retry"), json!({})),
        ("/api/queue/pause", json!({})),
        ("/api/queue/resume", json!({})),
        ("/api/queue/clean", json!({ "state": "completed" })),
        ("/api/queue/retry-failed", json!({})),
        ("/api/batch-process", json!({ "recordingIds": ["rec-ro"], "pipeline": "default" })),
    ]
    .map(|(path, body)| (path.to_string(), body));
    for (path, body) in &writes {
        let reply = app.post_as(LOOK, path, body).await;
        assert_refused(&reply, 403, "read_only_token", path);
    }
    let status = app.get_as(FULL, &format!("/api/job/{job}/status")).await;
    assert_eq!(status.body["job"]["state"], "waiting", "nothing was cancelled: {}", status.text);
    app.stop().await;
}

#[tokio::test]
async fn a_user_sees_queues_cancels_and_retries_only_their_own_recordings() {
    let app = app().await;
    let alice = jwt::hs256(&jwt::user_claims("user-alice"), SECRET);
    let bob = jwt::hs256(&jwt::user_claims("user-bob"), SECRET);

    let queued = queue_recording(&app, &alice, "rec-alice").await;
    assert_eq!(queued.status, 202, "{}", queued.text);
    let job = queued.body["jobId"].as_str().unwrap().to_string();
    let row = app.store.get("rec-alice").await.unwrap().unwrap();
    assert_eq!(row.owner_id.as_deref(), Some("user-alice"), "the recording belongs to the token's sub");

    let mine = app.get_as(&alice, "/api/recording/rec-alice/status").await;
    assert_eq!(mine.status, 200, "{}", mine.text);
    assert_eq!(app.get_as(&alice, &format!("/api/job/{job}/status")).await.status, 200);

    // Bob learns nothing, not even that the ids exist: the same 404 as for ids nobody has.
    let theirs = [
        app.get_as(&bob, "/api/recording/rec-alice/status").await,
        app.get_as(&bob, &format!("/api/job/{job}/status")).await,
        app.post_as(&bob, &format!("/api/job/{job}/cancel"), &json!({})).await,
        app.post_as(&bob, &format!("/api/job/{job}/retry"), &json!({})).await,
        app.post_as(&bob, "/api/process-recording", &json!({ "recordingId": "rec-alice" })).await,
    ];
    for reply in &theirs {
        assert_eq!(reply.status, 404, "{}", reply.text);
        assert!(reply.code().ends_with("not_found"), "{}", reply.text);
        assert!(!reply.text.contains("user-alice"), "{}", reply.text);
    }
    let logs = app.get_as(&bob, &format!("/api/job/{job}/logs")).await;
    assert_eq!(logs.status, 404, "{}", logs.text);
    assert_eq!(app.get_as(&alice, &format!("/api/job/{job}/logs")).await.status, 200);

    // Job lists hold only the caller's own jobs; the queue as a whole is for services.
    let listed = |reply: &Reply| -> Vec<String> {
        reply.body["jobs"].as_array().unwrap().iter().map(|job| job["jobId"].as_str().unwrap().to_string()).collect()
    };
    let other = queue_recording(&app, FULL, "rec-service").await;
    assert_eq!(other.status, 202, "{}", other.text);
    assert_eq!(listed(&app.get_as(&alice, "/api/jobs").await), vec![job.clone()]);
    assert!(listed(&app.get_as(&bob, "/api/jobs").await).is_empty());
    assert_eq!(listed(&app.get_as(FULL, "/api/jobs").await).len(), 2);
    assert_eq!(app.get_as(&bob, "/api/queue/stats").await.status, 403);

    let unknown = app.get_as(&bob, "/api/recording/rec-nobody/status").await;
    assert_eq!((unknown.status, unknown.code()), (theirs[0].status, theirs[0].code()));

    // Services see every recording; Alice may cancel her own job.
    assert_eq!(app.get_as(LOOK, "/api/recording/rec-alice/status").await.status, 200);
    let cancelled = app.post_as(&alice, &format!("/api/job/{job}/cancel"), &json!({})).await;
    assert_eq!(cancelled.status, 200, "{}", cancelled.text);
    let status = app.get_as(FULL, &format!("/api/job/{job}/status")).await;
    assert_eq!(status.body["job"]["state"], "cancelled", "{}", status.text);
    app.stop().await;
}

#[tokio::test]
async fn expired_forged_unsigned_and_non_user_jwts_are_401() {
    let app = app().await;
    let cases = [
        ("expired", jwt::hs256(&jwt::expired_claims("user-alice"), SECRET), "token_expired"),
        (
            "wrong signature",
            jwt::hs256(&jwt::user_claims("user-alice"), "a-different-secret-of-enough-length"),
            "invalid_signature",
        ),
        ("alg none", jwt::unsigned(&jwt::user_claims("user-alice")), "unsupported_algorithm"),
        (
            "the anon key",
            jwt::hs256(&json!({ "role": "anon", "iss": "supabase", "exp": jwt::now() + 60 }), SECRET),
            "not_a_user_token",
        ),
        (
            "the service_role key",
            jwt::hs256(&json!({ "role": "service_role", "exp": jwt::now() + 60 }), SECRET),
            "not_a_user_token",
        ),
        (
            "an ES256 token with no key set configured",
            SigningKey::es256("k1").sign(&jwt::user_claims("u")),
            "unsupported_algorithm",
        ),
    ];
    for (what, token, code) in cases {
        let reply = app.get_as(&token, "/api/recording/rec-1/status").await;
        assert_refused(&reply, 401, code, what);
        assert!(!reply.text.contains(&token) && !reply.text.contains(SECRET), "{what}: {}", reply.text);
    }
    app.stop().await;
}

#[tokio::test]
async fn jwks_signed_tokens_are_accepted_and_a_new_kid_refreshes_the_key_set() {
    let first = SigningKey::es256("ec-2026-01");
    let rotated = SigningKey::rs256("rsa-2026-02");
    let supabase = JwksServer::start(&[&first]).await;
    let project = supabase.base.clone();
    let app = TestApp::builder()
        .settings(move |settings, _| {
            // The key set URL is derived from SUPABASE_URL, as in production.
            settings.supabase.url = Some(project);
            settings.auth.jwks_refresh_interval = echo_worker::units::HumanDuration(Duration::ZERO);
        })
        .start()
        .await;

    let carol = first.sign(&jwt::user_claims("user-carol"));
    let queued = queue_recording(&app, &carol, "rec-carol").await;
    assert_eq!(queued.status, 202, "{}", queued.text);
    assert_eq!(app.get_as(&carol, "/api/recording/rec-carol/status").await.status, 200);
    assert_eq!(supabase.hits(), 1, "the key set is fetched once and cached");

    // A token naming a key the project has not published (yet): the set is fetched again, the token refused.
    let dave = rotated.sign(&jwt::user_claims("user-dave"));
    let reply = app.get_as(&dave, "/api/recording/rec-carol/status").await;
    assert_refused(&reply, 401, "unknown_signing_key", "an unpublished kid");
    assert_eq!(supabase.hits(), 2, "an unknown kid fetches the set again");
    // The project rotates the key in: the next token naming it fetches the set and gets through.
    supabase.publish(&[&first, &rotated]);
    let reply = app.get_as(&dave, "/api/recording/rec-carol/status").await;
    assert_eq!(
        (reply.status, reply.code()),
        (404, "recording_not_found"),
        "Dave is in, but it is not his: {}",
        reply.text
    );
    assert_eq!(supabase.hits(), 3);
    assert_eq!(app.get_as(&carol, "/api/recording/rec-carol/status").await.status, 200, "the first key still works");
    assert_eq!(supabase.hits(), 3, "known kids are served from the cache");

    let stranger = SigningKey::es256("ec-2026-01").sign(&jwt::user_claims("user-carol"));
    assert_refused(
        &app.get_as(&stranger, "/api/recording/rec-carol/status").await,
        401,
        "invalid_signature",
        "a forged key with a known kid",
    );
    let expired = first.sign(&jwt::expired_claims("user-carol"));
    assert_refused(&app.get_as(&expired, "/api/recording/rec-carol/status").await, 401, "token_expired", "expired");
    app.stop().await;
}

/// `echo-worker api` run as a child process with its log on a pipe; the lines are collected as they come.
struct Server {
    child: Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    address: String,
    prefix: String,
}

impl Server {
    fn start(env: &[(&str, &str)]) -> Self {
        let dir = std::env::temp_dir();
        let prefix = format!("echo-test-auth-{}:", uuid::Uuid::new_v4().simple());
        let mut command = Command::new(env!("CARGO_BIN_EXE_echo-worker"));
        command
            .arg("api")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("PORT", "0")
            .env("REDIS_URL", support::redis_url())
            .env("ECHO_REDIS__PREFIX", &prefix)
            .env(
                "DATABASE_URL",
                format!("sqlite://{}", dir.join(format!("{}.db", prefix.trim_end_matches(':'))).display()),
            )
            .env("RUST_LOG", "trace")
            .env("NO_COLOR", "1")
            .env_remove("SUPABASE_URL")
            .env_remove("SUPABASE_JWT_SECRET")
            .env_remove("ECHO_AUTH__TOKENS")
            .env_remove("ECHO_AUTH__READ_ONLY_TOKENS")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (sink, stderr) = (lines.clone(), child.stderr.take().unwrap());
        let (found, listening) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("API listening")
                    && let Some(address) = line.split("address=").nth(1)
                {
                    let _ = found.send(address.split_whitespace().next().unwrap_or("").to_string());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let address = listening
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("the API did not start within 60 s:\n{}", lines.lock().unwrap().join("\n")));
        Self { child, lines, address, prefix }
    }

    fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    async fn stop(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let client = redis::Client::open(support::redis_url()).unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        let keys: Vec<String> =
            redis::cmd("KEYS").arg(format!("{}*", self.prefix)).query_async(&mut connection).await.unwrap();
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL").arg(keys).query_async(&mut connection).await.unwrap();
        }
        let _ = std::fs::remove_file(std::env::temp_dir().join(format!("{}.db", self.prefix.trim_end_matches(':'))));
        self.log()
    }
}

#[tokio::test]
async fn no_token_or_secret_appears_in_a_reply_or_a_log_line() {
    let server = Server::start(&[
        ("ECHO_AUTH__TOKENS", FULL),
        ("ECHO_AUTH__READ_ONLY_TOKENS", LOOK),
        ("SUPABASE_JWT_SECRET", SECRET),
        ("ECHO_SERVER__HOST", "127.0.0.1"),
    ]);
    let base = format!("http://{}", server.address);
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let valid = jwt::hs256(&jwt::user_claims("user-erin"), SECRET);
    let expired = jwt::hs256(&jwt::expired_claims("user-erin"), SECRET);
    let forged = jwt::hs256(&jwt::user_claims("user-erin"), "another-secret-of-sufficient-length");
    let near_miss = format!("{FULL}0");
    let mut sent = vec![FULL.to_string(), LOOK.to_string(), SECRET.to_string(), near_miss.clone()];
    for token in [&valid, &expired, &forged] {
        sent.push(token.clone());
        sent.push(token.rsplit('.').next().unwrap().to_string());
    }
    let mut replies = Vec::new();
    for token in [FULL, LOOK, &near_miss, &valid, &expired, &forged] {
        for request in [
            client.get(format!("{base}/api/recording/rec-x/status")),
            client.post(format!("{base}/api/process-recording")).json(&json!({ "recordingId": "rec-x" })),
            client.get(format!("{base}/api/queue/stats")),
        ] {
            let response = request.bearer_auth(token).send().await.unwrap();
            let status = response.status().as_u16();
            let headers = format!("{:?}", response.headers());
            replies.push(format!("{status} {headers} {}", response.text().await.unwrap()));
        }
    }
    let text = client
        .get(format!("{base}/api/recording/rec-x/status"))
        .header("authorization", format!("Token {FULL}"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    replies.push(text);
    assert!(replies.iter().any(|reply| reply.starts_with("401")), "the refusals were made: {replies:#?}");
    assert!(replies.iter().any(|reply| reply.starts_with("403")), "{replies:#?}");
    let log = server.stop().await;
    assert!(log.contains("API auth"), "the start-up log says what is accepted:\n{log}");
    for secret in &sent {
        for reply in &replies {
            assert!(!reply.contains(secret.as_str()), "a reply carries a secret ({} chars): {reply}", secret.len());
        }
        let leaked: Vec<_> = log.lines().filter(|line| line.contains(secret.as_str())).collect();
        assert!(leaked.is_empty(), "log lines carry a secret ({} chars):\n{}", secret.len(), leaked.join("\n"));
    }
}

#[tokio::test]
async fn without_auth_the_api_listens_on_loopback_only_and_says_so() {
    let server = Server::start(&[("ECHO_SERVER__HOST", "0.0.0.0")]);
    assert!(server.address.starts_with("127.0.0.1:"), "bound to {}", server.address);
    let reply = reqwest::get(format!("http://{}/api/queue/stats", server.address)).await.unwrap();
    assert_eq!(reply.status(), 200, "an open server needs no token");
    let log = server.stop().await;
    assert!(log.contains("listening on 127.0.0.1 only"), "the log says so:\n{log}");
}
