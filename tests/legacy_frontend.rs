//! The live SoundScribe frontend, played against the whole service: the `recordings` table of old-worker.md §4
//! (with its original CHECK on status) in a PostgreSQL schema of the test's own, the API and a worker on the
//! real Redis, the fake AI server, and the file either under the storage root or in a Supabase Storage stand-in
//! holding a private bucket. The test inserts the row as the frontend does, POSTs the frontend's exact body to
//! `/api/process-audio`, and follows the row through `LISTEN/NOTIFY` from a trigger it installs, as Supabase
//! Realtime would see it: status words the CHECK allows, never back from completed, progress that only rises,
//! at most one progress write a second, and the columns the frontend reads filled at the end.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use echo_worker::ai::{ProviderSettings, ProviderStyle};
use echo_worker::config::{Secret, SecretUrl};
use echo_worker::store::Profile;
use serde_json::{Value, json};
use support::app::TestApp;
use support::fake_ai::{Fake, Fault, Kind};
use support::legacy::Legacy;
use support::postgres_url;
use support::storage::{SERVICE_KEY, Storage};

/// One UPDATE of the row, as the trigger reported it.
#[derive(Debug, Clone)]
struct Change {
    status: String,
    old_status: String,
    progress: i64,
    old_progress: i64,
    error: Option<String>,
    updated_at: String,
    old_updated_at: String,
    /// Seconds (database clock) when the UPDATE ran.
    at: f64,
}

/// The frontend's world: its table, the service, the AI stand-in and (optionally) Storage.
struct World {
    legacy: Legacy,
    app: TestApp,
    fake: Arc<Fake>,
    storage: Option<Arc<Storage>>,
    listener: sqlx::postgres::PgListener,
}

impl World {
    async fn start(with_storage: bool) -> Self {
        let legacy = Legacy::with_table().await;
        // What Supabase Realtime needs (README "Replacing the Node worker"), then a trigger that reports every
        // UPDATE with the old and the new row, as Realtime does with REPLICA IDENTITY FULL.
        let schema = &legacy.schema;
        let table = &legacy.table;
        sqlx::query(&format!("ALTER TABLE {table} REPLICA IDENTITY FULL")).execute(&legacy.pool).await.unwrap();
        let function = format!(
            "CREATE FUNCTION {schema}.realtime() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
               PERFORM pg_notify('{schema}', json_build_object('id', NEW.id, 'status', NEW.status, 'old_status', OLD.status, \
                 'progress', NEW.processing_progress, 'old_progress', OLD.processing_progress, 'error', NEW.error_message, \
                 'updated_at', NEW.updated_at, 'old_updated_at', OLD.updated_at, \
                 'at', extract(epoch from clock_timestamp()))::text); \
               RETURN NEW; END $$"
        );
        sqlx::query(&function).execute(&legacy.pool).await.unwrap();
        let trigger = format!(
            "CREATE TRIGGER realtime AFTER UPDATE ON {table} FOR EACH ROW EXECUTE FUNCTION {schema}.realtime()"
        );
        sqlx::query(&trigger).execute(&legacy.pool).await.unwrap();
        let mut listener = sqlx::postgres::PgListener::connect(&postgres_url()).await.unwrap();
        listener.listen(schema).await.unwrap();

        let fake = Fake::start().await;
        let storage = if with_storage { Some(Storage::start().await) } else { None };
        let (table, endpoint) = (table.clone(), fake.base.clone());
        let supabase = storage.as_ref().map(|storage| storage.base.clone());
        let app = TestApp::builder()
            .redis()
            .with_worker()
            .settings(move |settings, _| {
                settings.database.url = SecretUrl::new(postgres_url());
                settings.database.table = table;
                settings.database.profile = Profile::SupabaseLegacy;
                let mut provider =
                    ProviderSettings::new(ProviderStyle::Azure, endpoint, Some(Secret::new(support::fake_ai::KEY)));
                provider.transcription_model = "whisper".into();
                settings.ai.providers.insert("azure".into(), provider);
                settings.supabase.url = supabase;
                settings.supabase.service_role_key = Some(Secret::new(SERVICE_KEY));
                // As render.yaml deploys it: the frontend sends no token.
                settings.legacy.open_process_audio = true;
            })
            .start()
            .await;
        Self { legacy, app, fake, storage, listener }
    }

    /// Uploads a recording (to Storage, or under the storage root) and returns its `file_url` and size.
    fn upload(&self, name: &str) -> (String, u64) {
        let dir = tempfile::tempdir().unwrap();
        let file = support::media::tone(dir.path(), name, 6);
        let bytes = std::fs::read(&file).unwrap();
        let size = bytes.len() as u64;
        // The frontend's path: `${user.id}/${Date.now()}_${name}`.
        let path = format!("0b5c1d2e-0000-4000-8000-000000000001/1732870000000_{name}");
        match &self.storage {
            Some(storage) => {
                storage.put(&path, bytes);
                (storage.public_url(&path), size)
            }
            None => {
                let target = self.app.storage().join(&path);
                std::fs::create_dir_all(target.parent().unwrap()).unwrap();
                std::fs::write(&target, bytes).unwrap();
                (path, size)
            }
        }
    }

    /// POSTs the frontend's exact body (`useFileOperations.ts:148-160`) and checks the reply as the frontend
    /// does: `response.ok` and no `error` key.
    async fn post(&self, id: &str, file_url: &str, size: u64) -> Value {
        let body = json!({ "recording_id": id, "file_url": file_url, "file_size": size, "is_large_file": true, "file_type": "audio" });
        let reply = self.app.post_json("/api/process-audio", &body).await;
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        assert_eq!(reply.body["success"], json!(true));
        assert!(reply.body.get("error").is_none(), "the frontend treats an `error` key as a failure: {:?}", reply.body);
        reply.body
    }

    /// The row's changes until it settles (completed or failed), within two minutes.
    async fn follow(&mut self, id: &str) -> Vec<Change> {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut changes = Vec::new();
        loop {
            let left = deadline.checked_duration_since(Instant::now()).expect("the row settles within 2 minutes");
            let notification =
                tokio::time::timeout(left, self.listener.recv()).await.expect("a change within 2 minutes").unwrap();
            let value: Value = serde_json::from_str(notification.payload()).unwrap();
            if value["id"] != json!(id) {
                continue;
            }
            let change = Change {
                status: value["status"].as_str().unwrap().to_string(),
                old_status: value["old_status"].as_str().unwrap().to_string(),
                progress: value["progress"].as_i64().unwrap_or(0),
                old_progress: value["old_progress"].as_i64().unwrap_or(0),
                error: value["error"].as_str().map(str::to_string),
                updated_at: value["updated_at"].to_string(),
                old_updated_at: value["old_updated_at"].to_string(),
                at: value["at"].as_f64().unwrap(),
            };
            let settled = change.status == "completed" || (change.status == "failed" && change.old_status != "failed");
            changes.push(change);
            if settled {
                return changes;
            }
        }
    }

    fn coaching_calls(&self) -> usize {
        self.fake
            .seen(Kind::Chat)
            .iter()
            .filter(|seen| seen.body["response_format"]["json_schema"]["name"] == "coaching")
            .count()
    }

    async fn stop(self) {
        self.app.stop().await;
        self.legacy.drop().await;
    }
}

/// What Realtime subscribers may rely on, for every change of one run.
fn check_changes(changes: &[Change]) {
    for change in changes {
        for status in [&change.status, &change.old_status] {
            assert!(["uploading", "processing", "completed", "failed"].contains(&status.as_str()), "{changes:#?}");
        }
        assert!(
            !(change.old_status == "completed" && change.status != "completed"),
            "completed never goes back: {changes:#?}"
        );
        assert!((0..=100).contains(&change.progress), "{changes:#?}");
        assert_ne!(change.updated_at, change.old_updated_at, "updated_at changes on every write: {change:?}");
        if change.status == "processing" && change.old_status == "processing" && change.progress != 0 {
            assert!(change.progress >= change.old_progress, "progress only rises within a run: {changes:#?}");
        }
    }
    let progress_writes: Vec<&Change> = changes
        .iter()
        .filter(|c| c.status == "processing" && c.old_status == "processing" && c.progress != c.old_progress)
        .collect();
    for pair in progress_writes.windows(2) {
        let gap = pair[1].at - pair[0].at;
        // The sink starts a write at least a second after the previous one finished.
        assert!(gap >= 1.0, "at most one progress write a second, got {gap:.3} s apart: {progress_writes:#?}");
    }
}

/// The whole frontend flow: a coached recording, one without coaching, and one that fails and is retried.
async fn play(with_storage: bool) {
    let mut world = World::start(with_storage).await;

    // 1. A recording with coaching on ends completed with every column the frontend reads.
    let (file_url, size) = world.upload("call.mp3");
    let id = world.legacy.insert_upload(true, &file_url, size).await;
    let reply = world.post(&id, &file_url, size).await;
    assert_eq!(
        (reply["status"].as_str(), reply["pipeline"].as_str()),
        (Some("processing_started"), Some("soundscribe"))
    );
    let changes = world.follow(&id).await;
    check_changes(&changes);
    assert_eq!(changes.last().unwrap().status, "completed", "{changes:#?}");
    let trail: Vec<String> = changes.iter().map(|c| format!("{} {}", c.status, c.progress)).collect();
    println!("{} row updates for one job (the old worker made about 16): {}", changes.len(), trail.join(" -> "));
    assert_eq!(world.legacy.column(&id, "processing_progress").await, json!(100));
    for column in ["transcript", "summary", "ai_summary"] {
        let value = world.legacy.column(&id, column).await;
        assert!(value.as_str().is_some_and(|text| !text.is_empty()), "{column}: {value}");
    }
    let coaching = world.legacy.column(&id, "coaching_evaluation").await;
    assert!(coaching["overallScore"].is_number() && coaching["criteria"].is_object(), "{coaching}");
    assert!(world.legacy.column(&id, "processed_at").await.is_string());
    assert_eq!(world.legacy.column(&id, "error_message").await, Value::Null);
    assert_eq!(world.coaching_calls(), 1);

    // A recording the frontend never inserted: the store never creates rows in its table.
    let unknown = json!({ "recording_id": uuid::Uuid::new_v4().to_string(), "file_url": file_url, "file_size": size, "is_large_file": true, "file_type": "audio" });
    let reply = world.app.post_json("/api/process-audio", &unknown).await;
    assert_eq!((reply.status, reply.code()), (404, "recording_not_found"), "{}", reply.text);

    // 2. enable_coaching = false: no coaching call at all.
    let (file_url, size) = world.upload("plain.mp3");
    let plain = world.legacy.insert_upload(false, &file_url, size).await;
    world.post(&plain, &file_url, size).await;
    let changes = world.follow(&plain).await;
    check_changes(&changes);
    assert_eq!(changes.last().unwrap().status, "completed");
    assert_eq!(world.coaching_calls(), 1, "the row without coaching made no coaching call");
    assert_eq!(world.legacy.column(&plain, "coaching_evaluation").await, Value::Null);
    assert!(world.legacy.column(&plain, "summary").await.is_string());

    // 3. A job that fails leaves `failed` with a readable error; posted again, it ends completed, error cleared.
    let (file_url, size) = world.upload("retried.mp3");
    let retried = world.legacy.insert_upload(true, &file_url, size).await;
    world.fake.fault(Kind::Transcription, Fault::Quota);
    world.post(&retried, &file_url, size).await;
    let changes = world.follow(&retried).await;
    check_changes(&changes);
    let failed = changes.last().unwrap();
    assert_eq!(failed.status, "failed", "{changes:#?}");
    let message = failed.error.clone().unwrap_or_default();
    assert!(message.contains("transcript") && message.contains("quota"), "a readable error: {message}");
    world.post(&retried, &file_url, size).await;
    let changes = world.follow(&retried).await;
    check_changes(&changes);
    assert_eq!(changes.last().unwrap().status, "completed", "{changes:#?}");
    assert_eq!(world.legacy.column(&retried, "error_message").await, Value::Null, "the retry cleared the error");
    assert!(world.legacy.column(&retried, "transcript").await.is_string());

    if let Some(storage) = &world.storage {
        assert!(storage.authorised() >= 6, "every file was read with the service key");
        assert_eq!(storage.refused(), 0, "nothing tried the public URL or went without the key");
    }
    world.stop().await;
}

#[tokio::test]
async fn the_frontend_flow_ends_completed_with_its_columns_filled() {
    play(false).await;
}

#[tokio::test]
async fn the_same_flow_with_the_file_in_supabase_storage() {
    play(true).await;
}

#[tokio::test]
async fn process_audio_refuses_bad_bodies_by_field_and_answers_the_connectivity_check() {
    let app = TestApp::builder()
        .settings(|settings, _| settings.server.allowed_origins = vec!["https://eci-sound-scribe.lovable.app".into()])
        .start()
        .await;
    let cases = [
        (json!({ "file_url": "a.mp3" }), 400, "missing_field", "recording_id"),
        (json!({ "recording_id": "r1" }), 400, "missing_field", "file_url"),
        (json!({ "recording_id": "r1", "file_url": "a.mp3", "file_size": "big" }), 400, "invalid_field", "file_size"),
        (
            json!({ "recording_id": "r1", "file_url": "a.mp3", "priority_please": true }),
            400,
            "unknown_field",
            "priority_please",
        ),
        (json!({ "recording_id": "", "file_url": "a.mp3" }), 400, "missing_field", "recording_id is required"),
        // An id no other route could reach (`/api/recording/{id}/status`) makes no row.
        (json!({ "recording_id": "a/b", "file_url": "a.mp3" }), 400, "invalid_id", "recording_id"),
        (json!({ "recording_id": "..", "file_url": "a.mp3" }), 400, "invalid_id", "recording_id"),
        // The fields are checked in test mode too.
        (json!({ "recording_id": "", "file_url": "x", "test_mode": true }), 400, "missing_field", "recording_id"),
        (json!({ "recording_id": "t1", "file_url": " ", "test_mode": true }), 400, "missing_field", "file_url"),
        (json!({ "recording_id": "r1", "file_url": "gopher://example.com/a" }), 400, "source_refused", "gopher"),
        (
            json!({ "recording_id": "r1", "file_url": "http://169.254.169.254/latest" }),
            400,
            "source_refused",
            "169.254.169.254",
        ),
        (json!({ "recording_id": "r1", "file_url": "missing.mp3" }), 400, "source_refused", "no such file"),
    ];
    for (body, status, code, names) in cases {
        let reply = app.post_json("/api/process-audio", &body).await;
        assert_eq!((reply.status, reply.code()), (status, code), "{body}: {}", reply.text);
        assert_eq!(reply.body["success"], json!(false));
        let error = reply.body["error"].as_str().unwrap_or_default();
        assert!(error.contains(names) || reply.text.contains(names), "{body}: the reply names {names}: {}", reply.text);
    }
    let malformed = app.post_raw("/api/process-audio", "application/json", "{\"recording_id\": ").await;
    assert_eq!((malformed.status, malformed.code()), (400, "malformed_json"));

    // The Edge Function's connectivity check (`test-azure-connectivity`) gets 200 and queues nothing.
    let check = json!({ "recording_id": "test-id", "file_url": "test-url", "test_mode": true });
    let reply = app.post_json("/api/process-audio", &check).await;
    assert_eq!((reply.status, reply.body["status"].as_str()), (200, Some("test_ok")), "{}", reply.text);
    assert!(reply.body.get("error").is_none());

    // A file under the storage root: queued once; posted again while the job is live, the same job.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(support::media::tone(dir.path(), "a.mp3", 2), app.storage().join("a.mp3")).unwrap();
    let body = json!({ "recording_id": "r-ok", "file_url": "a.mp3", "file_size": 52_428_800, "is_large_file": true, "file_type": "audio" });
    let first = app.post_json("/api/process-audio", &body).await;
    assert_eq!((first.status, first.body["status"].as_str()), (200, Some("processing_started")), "{}", first.text);
    assert_eq!((first.body["file_size_mb"].as_str(), first.body["pipeline"].as_str()), (Some("50.0"), Some("default")));
    let again = app.post_json("/api/process-audio", &body).await;
    assert_eq!((again.status, again.body["status"].as_str()), (200, Some("already_processing")));
    assert_eq!(again.body["jobId"], first.body["jobId"]);

    // The old streaming route is process-recording under another name.
    let streaming =
        app.post_json("/api/process-streaming", &json!({ "recordingId": "r-stream", "fileUrl": "a.mp3" })).await;
    assert_eq!(streaming.status, 202, "{}", streaming.text);
    assert_eq!(streaming.body["recordingId"], json!("r-stream"));
    let refused = app.post_json("/api/process-streaming", &json!({ "fileUrl": "a.mp3" })).await;
    assert_eq!((refused.status, refused.body["success"].clone()), (400, json!(false)), "{}", refused.text);

    // Real figures where the old worker answered zeros.
    let stats = app.get("/api/system/stats").await;
    assert_eq!(stats.status, 200, "{}", stats.text);
    assert_eq!(stats.body["queue"]["counts"]["waiting"], json!(2), "{}", stats.text);
    assert_eq!(stats.body["queue"]["total"], json!(2));
    assert!(stats.body["memory"]["rssBytes"].as_u64().is_some_and(|bytes| bytes > 1 << 20), "{}", stats.text);
    assert!(stats.body["uptime"].as_f64().is_some_and(|s| s > 0.0));
    assert_eq!(stats.body["environment"]["databaseProfile"], json!("echo"));

    // The browser's preflight for the headers one caller sends (`parallelProcessor.ts`).
    let preflight = app
        .send(
            app.client
                .request(reqwest::Method::OPTIONS, app.url("/api/process-audio"))
                .header("Origin", "https://eci-sound-scribe.lovable.app")
                .header("Access-Control-Request-Method", "POST")
                .header("Access-Control-Request-Headers", "content-type, x-priority, x-optimization-level"),
        )
        .await;
    assert!(preflight.status < 300, "{}: {}", preflight.status, preflight.text);
    let allowed = preflight.header("access-control-allow-headers").unwrap_or_default().to_ascii_lowercase();
    assert!(allowed.contains("x-priority") && allowed.contains("x-optimization-level"), "{allowed}");
    app.stop().await;
}

/// With auth configured, the frontend's token-less POST is let through only when `legacy.open_process_audio`
/// is on, only for a row that exists, and only with the `file_url` stored in that row: a body naming another
/// file (or an internal address) changes nothing, and every other route still needs the token.
#[tokio::test]
async fn a_token_less_process_audio_runs_only_an_existing_rows_own_file() {
    for open in [true, false] {
        let legacy = Legacy::with_table().await;
        let table = legacy.table.clone();
        let app = TestApp::builder()
            .settings(move |settings, _| {
                settings.database.url = SecretUrl::new(postgres_url());
                settings.database.table = table;
                settings.database.profile = Profile::SupabaseLegacy;
                settings.auth.tokens = vec![Secret::new("service-token-for-the-test")];
                settings.legacy.open_process_audio = open;
            })
            .start()
            .await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(support::media::tone(dir.path(), "own.mp3", 2), app.storage().join("own.mp3")).unwrap();
        let id = legacy.insert_upload(false, "own.mp3", 1234).await;
        let body = json!({ "recording_id": id, "file_url": "http://169.254.169.254/latest/meta-data", "file_size": 1234, "is_large_file": false, "file_type": "audio" });
        let reply = app.post_json("/api/process-audio", &body).await;
        if !open {
            assert_eq!((reply.status, reply.code()), (401, "missing_token"), "{}", reply.text);
            app.stop().await;
            legacy.drop().await;
            continue;
        }
        assert_eq!((reply.status, reply.body["status"].as_str()), (200, Some("processing_started")), "{}", reply.text);
        assert!(reply.body.get("error").is_none());
        // The job runs the row's file, not the body's address.
        let job = reply.body["jobId"].as_str().unwrap().to_string();
        let authorized = |request: reqwest::RequestBuilder| request.bearer_auth("service-token-for-the-test");
        let status = app.send(authorized(reqwest::Client::new().get(app.url(&format!("/api/job/{job}/status"))))).await;
        assert_eq!(status.status, 200, "{}", status.text);
        assert!(!status.text.contains("169.254.169.254"), "the body's URL must not reach the job: {}", status.text);

        // A row that does not exist cannot be created without a token.
        let unknown = json!({ "recording_id": "00000000-0000-4000-8000-00000000abcd", "file_url": "own.mp3" });
        let reply = app.post_json("/api/process-audio", &unknown).await;
        assert_eq!((reply.status, reply.code()), (404, "recording_not_found"), "{}", reply.text);
        // A wrong token is still refused, and the other routes still need one.
        let wrong =
            app.send(reqwest::Client::new().post(app.url("/api/process-audio")).bearer_auth("wrong").json(&body)).await;
        assert_eq!(wrong.status, 401, "{}", wrong.text);
        assert_eq!(app.get(&format!("/api/job/{job}/status")).await.status, 401);
        assert_eq!(app.queue_stats().await.status, 401);
        app.stop().await;
        legacy.drop().await;
    }
}
