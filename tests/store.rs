//! The SQL store against both real databases: SQLite in a temporary file and the PostgreSQL at
//! 127.0.0.1:5432 (database `test`, a schema of its own per test, dropped afterwards). Status transitions,
//! coalesced progress, and `persist` idempotence.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use echo_worker::job::progress::{ProgressSink, ProgressUpdate};
use echo_worker::stage::builtin::persist::PersistStage;
use echo_worker::store::{NewRecording, Recording, RecordingStatus, SqlStore, Store, StoreError, StoreSink};
use serde_json::{Value, json};
use support::media::{job, run_stage};
use support::{postgres_url, printable};

/// A store on its own database: a temporary SQLite file, or a fresh PostgreSQL schema.
struct Backend {
    store: Arc<SqlStore>,
    _dir: Option<tempfile::TempDir>,
    schema: Option<String>,
}

impl Backend {
    async fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("echo.db").display());
        let store = SqlStore::connect(&url, "recordings").await.expect("SQLite opens");
        Self { store: Arc::new(store), _dir: Some(dir), schema: None }
    }

    async fn postgres() -> Self {
        Self::postgres_at(&postgres_url()).await.unwrap_or_else(|message| panic!("{message}"))
    }

    /// A fresh schema in the PostgreSQL at `url`; the error names the address tried.
    async fn postgres_at(url: &str) -> Result<Self, String> {
        let schema = format!("echo_test_{}", uuid::Uuid::new_v4().simple());
        let table = format!("{schema}.recordings");
        let connect = SqlStore::connect(url, &table);
        let store = match tokio::time::timeout(std::time::Duration::from_secs(10), connect).await {
            Ok(Ok(store)) => store,
            Ok(Err(error)) => return Err(format!("{}: {error}", not_answering(url))),
            Err(_) => return Err(format!("{}: no answer within 10 s", not_answering(url))),
        };
        Ok(Self { store: Arc::new(store), _dir: None, schema: Some(schema) })
    }

    async fn drop_schema(self) {
        if let Some(schema) = &self.schema {
            sqlx::query(&format!("DROP SCHEMA {schema} CASCADE")).execute(self.store.pool()).await.unwrap();
        }
    }
}

fn not_answering(url: &str) -> String {
    format!("PostgreSQL at {} (set ECHO_TEST_POSTGRES_URL to use another) does not answer", printable(url))
}

#[tokio::test]
async fn a_database_that_does_not_answer_is_named_in_the_failure() {
    let Err(message) = Backend::postgres_at("postgres://postgres:pw-0001@127.0.0.1:1/test").await else {
        panic!("nothing listens on port 1")
    };
    assert!(message.starts_with("PostgreSQL at postgres://postgres:[redacted]@127.0.0.1:1/test "), "{message}");
    assert!(message.contains("ECHO_TEST_POSTGRES_URL"), "{message}");
    assert!(!message.contains("pw-0001"), "{message}");
    let message = support::redis_answers("redis://127.0.0.1:1").await.unwrap_err();
    assert!(message.starts_with("Redis at redis://127.0.0.1:1 "), "{message}");
    assert!(message.contains("ECHO_TEST_REDIS_URL"), "{message}");
}

async fn both(test: impl AsyncFn(Arc<SqlStore>)) {
    let sqlite = Backend::sqlite().await;
    test(sqlite.store.clone()).await;
    let postgres = Backend::postgres().await;
    test(postgres.store.clone()).await;
    postgres.drop_schema().await;
}

fn new(id: &str) -> NewRecording {
    NewRecording {
        id: id.into(),
        file_url: Some("supabase://recordings/u1/a.webm".into()),
        file_name: Some("a.webm".into()),
        size_bytes: Some(1234),
        owner_id: Some("u1".into()),
        pipeline: Some("meeting".into()),
        job_id: Some("job-1".into()),
        ..NewRecording::default()
    }
}

async fn row(store: &SqlStore, id: &str) -> Recording {
    store.get(id).await.unwrap().expect("the row exists")
}

#[tokio::test]
async fn registering_twice_keeps_one_row_and_fills_gaps() {
    both(async |store| {
        let first = store.register(&new("r1")).await.unwrap();
        assert_eq!((first.status, first.progress), (RecordingStatus::Pending, 0));
        assert_eq!(first.size_bytes, Some(1234));
        assert!(first.created_at.ends_with('Z'), "{}", first.created_at);
        let again = store
            .register(&NewRecording { id: "r1".into(), job_id: Some("job-2".into()), ..NewRecording::default() })
            .await
            .unwrap();
        assert_eq!(again.job_id.as_deref(), Some("job-2"));
        assert_eq!(again.file_name.as_deref(), Some("a.webm"), "missing fields keep their values");
        assert!(store.get("nope").await.unwrap().is_none());
    })
    .await;
}

#[tokio::test]
async fn status_transitions_follow_the_rules() {
    both(async |store| {
        store.register(&new("r2")).await.unwrap();
        assert!(store.set_status("r2", RecordingStatus::Queued, Some("queued"), None).await.unwrap());
        assert!(store.set_status("r2", RecordingStatus::Processing, Some("started"), None).await.unwrap());
        store.set_progress("r2", 40, Some("transcript"), "chunk 2 of 5").await.unwrap();
        let failed =
            store.set_status("r2", RecordingStatus::Failed, Some("failed"), Some("stage `x`: boom")).await.unwrap();
        assert!(failed);
        let row2 = row(&store, "r2").await;
        assert_eq!((row2.status, row2.error.as_deref()), (RecordingStatus::Failed, Some("stage `x`: boom")));
        assert_eq!(row2.progress, 40, "a failure keeps the progress it reached");

        // A retry runs again from 0 and clears the old error.
        assert!(store.set_status("r2", RecordingStatus::Processing, Some("retrying"), None).await.unwrap());
        let retried = row(&store, "r2").await;
        assert_eq!((retried.progress, retried.error), (0, None));

        store.persist("r2", Some("hello"), &json!({ "summary": "s" })).await.unwrap();
        let done = row(&store, "r2").await;
        assert_eq!((done.status, done.progress), (RecordingStatus::Completed, 100));
        assert!(done.completed_at.is_some());

        // Completed never flips back.
        for status in [RecordingStatus::Processing, RecordingStatus::Failed, RecordingStatus::Cancelled] {
            assert!(!store.set_status("r2", status, Some("late"), Some("late")).await.unwrap(), "{status:?}");
        }
        store.set_progress("r2", 50, Some("late"), "late").await.unwrap();
        let still = row(&store, "r2").await;
        assert_eq!((still.status, still.progress, still.error), (RecordingStatus::Completed, 100, None));
        assert_eq!(still.message.as_deref(), Some("completed"));
        assert!(!store.set_status("missing", RecordingStatus::Processing, None, None).await.unwrap());
    })
    .await;
}

#[tokio::test]
async fn progress_is_only_written_while_processing_and_never_goes_back() {
    both(async |store| {
        store.register(&new("r3")).await.unwrap();
        store.set_progress("r3", 30, Some("x"), "early").await.unwrap();
        assert_eq!(row(&store, "r3").await.progress, 0, "not processing yet");
        store.set_status("r3", RecordingStatus::Processing, None, None).await.unwrap();
        store.set_progress("r3", 30, Some("download"), "10 MB of 30 MB").await.unwrap();
        store.set_progress("r3", 20, Some("download"), "stale").await.unwrap();
        let current = row(&store, "r3").await;
        assert_eq!(
            (current.progress, current.stage.as_deref(), current.message.as_deref()),
            (30, Some("download"), Some("10 MB of 30 MB"))
        );
    })
    .await;
}

/// Counts the progress writes that reach the store.
struct Counting {
    inner: Arc<SqlStore>,
    writes: AtomicU32,
}

#[async_trait::async_trait]
impl Store for Counting {
    async fn register(&self, recording: &NewRecording) -> Result<Recording, StoreError> {
        self.inner.register(recording).await
    }
    async fn get(&self, id: &str) -> Result<Option<Recording>, StoreError> {
        self.inner.get(id).await
    }
    async fn set_status(
        &self,
        id: &str,
        status: RecordingStatus,
        message: Option<&str>,
        error: Option<&str>,
    ) -> Result<bool, StoreError> {
        self.inner.set_status(id, status, message, error).await
    }
    async fn set_progress(&self, id: &str, progress: u8, stage: Option<&str>, message: &str) -> Result<(), StoreError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.set_progress(id, progress, stage, message).await
    }
    async fn set_media(
        &self,
        id: &str,
        mime: &str,
        size: Option<i64>,
        duration: Option<f64>,
    ) -> Result<(), StoreError> {
        self.inner.set_media(id, mime, size, duration).await
    }
    async fn persist(&self, id: &str, transcript: Option<&str>, result: &Value) -> Result<(), StoreError> {
        self.inner.persist(id, transcript, result).await
    }
}

#[tokio::test]
async fn the_store_sink_writes_at_most_once_a_second() {
    both(async |store| {
        store.register(&new("r4")).await.unwrap();
        store.set_status("r4", RecordingStatus::Processing, None, None).await.unwrap();
        let counting = Arc::new(Counting { inner: store.clone(), writes: AtomicU32::new(0) });
        let sink = StoreSink::new(counting.clone(), "r4");
        for percent in 1..=60u8 {
            let update = ProgressUpdate {
                job_id: "j".into(),
                percent,
                stage: Some("transcript".into()),
                message: format!("{percent}"),
                ..ProgressUpdate::default()
            };
            sink.update(update).await;
        }
        assert_eq!(counting.writes.load(Ordering::SeqCst), 1, "60 updates within a second make one write");
        assert_eq!(row(&store, "r4").await.progress, 1);
        let last = ProgressUpdate {
            job_id: "j".into(),
            percent: 100,
            stage: None,
            message: "completed".into(),
            ..ProgressUpdate::default()
        };
        sink.update(last).await;
        assert_eq!(counting.writes.load(Ordering::SeqCst), 2, "the final update always goes through");
        assert_eq!(row(&store, "r4").await.progress, 100);
    })
    .await;
}

#[tokio::test]
async fn persist_is_idempotent() {
    both(async |store| {
        store.register(&new("r5")).await.unwrap();
        store.set_status("r5", RecordingStatus::Processing, None, None).await.unwrap();
        let stage = PersistStage::new(store.clone());
        let mut job = (*job("unused", false)).clone();
        job.recording_id = Some("r5".into());
        let job = Arc::new(job);
        let params =
            json!({ "transcript": "hello world", "fields": { "summary": "short", "items": [{ "task": "t" }] } });
        let work = tempfile::tempdir().unwrap();
        let facts = json!({ "mime": "audio/webm", "size": 1234, "duration": 61.5, "video": false });
        let inputs = BTreeMap::from([("validate".to_string(), facts)]);
        run_stage(&stage, job.clone(), params.clone(), inputs.clone(), work.path()).await.unwrap();
        let first = row(&store, "r5").await;
        assert_eq!(first.status, RecordingStatus::Completed);
        assert_eq!(first.transcript.as_deref(), Some("hello world"));
        assert_eq!(first.result, Some(json!({ "summary": "short", "items": [{ "task": "t" }] })));
        assert_eq!((first.mime_type.as_deref(), first.duration_s), (Some("audio/webm"), Some(61.5)));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        run_stage(&stage, job.clone(), params, inputs, work.path()).await.unwrap();
        assert_eq!(row(&store, "r5").await, first, "the second run leaves the row exactly as it was");

        let mut orphan = (*job).clone();
        orphan.recording_id = Some("missing".into());
        let error = run_stage(&stage, Arc::new(orphan), json!({}), BTreeMap::new(), work.path()).await.unwrap_err();
        assert_eq!(error.message, "no recording with id missing");
        assert!(!error.retryable);
    })
    .await;
}

#[tokio::test]
async fn bad_urls_and_table_names_are_refused() {
    let error = SqlStore::connect("mysql://x", "recordings").await.unwrap_err();
    assert_eq!(
        error.to_string(),
        "store configuration: DATABASE_URL must be a URL starting with sqlite: or postgres:// (got a `mysql://` URL)"
    );
    let error = SqlStore::connect("sqlite::memory:", "recordings; drop table x").await.unwrap_err();
    assert!(error.to_string().contains("is not a usable table name"), "{error}");
}
