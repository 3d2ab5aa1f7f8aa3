//! The store in the `supabase-legacy` profile against the live frontend's `recordings` table, built in a
//! PostgreSQL schema of the test's own from old-worker.md §4 (`tests/support/legacy_recordings.sql`, with the
//! original CHECK on status). The store must read and update that table without creating or altering it,
//! write only the status words its CHECK allows, and write named result columns in their real types.

mod support;

use echo_worker::store::{Layout, NewRecording, Profile, RecordingStatus, SqlStore, Store, StoreError};
use indexmap::IndexMap;
use serde_json::{Value, json};
use sqlx::Row;
use support::legacy::Legacy;
use support::postgres_url;

#[tokio::test]
async fn a_missing_table_or_missing_columns_are_named_and_nothing_is_created() {
    let legacy = Legacy::new().await;
    let error = legacy.store().await.unwrap_err().to_string();
    assert!(error.contains("does not exist") && error.contains("never creates it"), "{error}");
    assert!(legacy.columns().await.is_empty(), "the store created nothing");

    let sql = format!(
        "CREATE TABLE {} (id UUID PRIMARY KEY, status TEXT, transcript TEXT, updated_at TIMESTAMPTZ)",
        legacy.table
    );
    sqlx::query(&sql).execute(&legacy.pool).await.unwrap();
    let error = legacy.store().await.unwrap_err().to_string();
    for missing in
        ["processing_progress (for progress)", "error_message (for error)", "user_id (for owner_id)", "processed_at"]
    {
        assert!(error.contains(missing), "{missing} is named in: {error}");
    }
    assert!(error.contains("database.columns"), "{error}");
    assert_eq!(legacy.columns().await, ["id", "status", "transcript", "updated_at"], "the table is not altered");

    // Leaving the missing fields out (or mapping them elsewhere) makes the same table usable.
    let overrides: IndexMap<String, String> =
        ["file_url", "size_bytes", "duration_s", "progress", "error", "owner_id", "created_at", "completed_at"]
            .into_iter()
            .map(|field| (field.to_string(), String::new()))
            .collect();
    let layout = Layout::with_overrides(Profile::SupabaseLegacy, &overrides).unwrap();
    SqlStore::connect_with(&postgres_url(), &legacy.table, layout)
        .await
        .expect("a table with the mapped columns opens");
    legacy.drop().await;
}

#[tokio::test]
async fn a_row_only_ever_holds_the_words_the_check_allows_and_never_goes_back() {
    let legacy = Legacy::with_table().await;
    let store = legacy.store().await.unwrap();
    let id = legacy.insert_row(true).await;
    let stamp = async |legacy: &Legacy| legacy.column(&id, "updated_at").await;

    let row = store.get(&id).await.unwrap().unwrap();
    assert_eq!(
        (row.status, row.progress, row.duration_s, row.size_bytes),
        (RecordingStatus::Processing, 0, Some(61.0), Some(1234))
    );
    assert!(row.owner_id.is_some(), "the owner is read from user_id");

    let before = stamp(&legacy).await;
    assert!(store.set_status(&id, RecordingStatus::Queued, Some("queued"), None).await.unwrap());
    assert_eq!(legacy.column(&id, "status").await, json!("processing"), "queued shows as processing");
    assert!(store.set_status(&id, RecordingStatus::Processing, Some("attempt 1"), None).await.unwrap());
    assert_eq!(stamp(&legacy).await, before, "a write that would change nothing is not made (no Realtime event)");

    store.set_progress(&id, 40, Some("transcript"), "chunk 2 of 5").await.unwrap();
    assert_ne!(stamp(&legacy).await, before, "updated_at changes on every write");
    store.set_progress(&id, 30, Some("transcript"), "stale").await.unwrap();
    assert_eq!(legacy.column(&id, "processing_progress").await, json!(40), "progress never goes back");

    assert!(
        store
            .set_status(
                &id,
                RecordingStatus::Failed,
                Some("failed"),
                Some("stage `transcript`: the provider answered 500")
            )
            .await
            .unwrap()
    );
    assert_eq!(legacy.column(&id, "status").await, json!("failed"));
    assert_eq!(legacy.column(&id, "error_message").await, json!("stage `transcript`: the provider answered 500"));
    assert_eq!(legacy.column(&id, "processing_progress").await, json!(40), "a failure keeps its progress");

    // The retry succeeds: processing again, then completed with the error cleared and processed_at set.
    assert!(store.set_status(&id, RecordingStatus::Processing, Some("attempt 2"), None).await.unwrap());
    assert_eq!(legacy.column(&id, "processing_progress").await, json!(0));
    let columns: IndexMap<String, Value> = [
        ("summary", json!("A short call.")),
        ("ai_summary", json!("A short call.")),
        ("coaching_evaluation", json!({ "overallScore": 71, "criteria": { "rapport": 7 } })),
        ("duration", json!(61.6)),
        ("whisper_segments", json!([{ "start": 0.0, "end": 2.5, "text": "Hello" }])),
        ("ai_next_steps", json!(["Send the quote"])),
        ("processing_metadata", json!({ "transcription_success": true })),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    store.persist_columns(&id, Some("Hello"), &json!({}), &columns).await.unwrap();
    let done = store.get(&id).await.unwrap().unwrap();
    assert_eq!((done.status, done.progress, done.error.as_deref()), (RecordingStatus::Completed, 100, None));
    assert!(done.completed_at.is_some(), "processed_at is set");
    assert_eq!(legacy.column(&id, "duration").await, json!(62), "whole seconds in the INTEGER column");
    assert_eq!(legacy.column(&id, "coaching_evaluation").await["overallScore"], json!(71));
    assert_eq!(legacy.column(&id, "ai_next_steps").await, json!(["Send the quote"]));
    assert_eq!(legacy.column(&id, "transcript").await, json!("Hello"));

    // The same results again change nothing, not even updated_at; a null never erases a known value.
    let settled = stamp(&legacy).await;
    store.persist_columns(&id, Some("Hello"), &json!({}), &columns).await.unwrap();
    assert_eq!(stamp(&legacy).await, settled);
    let nulls: IndexMap<String, Value> =
        [("duration".to_string(), Value::Null), ("summary".to_string(), Value::Null)].into_iter().collect();
    store.persist_columns(&id, None, &json!({}), &nulls).await.unwrap();
    assert_eq!(legacy.column(&id, "duration").await, json!(62));
    assert_eq!(legacy.column(&id, "summary").await, json!("A short call."));

    // Completed never flips back, whatever asks.
    for status in
        [RecordingStatus::Queued, RecordingStatus::Processing, RecordingStatus::Failed, RecordingStatus::Cancelled]
    {
        assert!(!store.set_status(&id, status, Some("late"), Some("late")).await.unwrap(), "{status:?}");
    }
    store.set_progress(&id, 50, None, "late").await.unwrap();
    assert_eq!(legacy.column(&id, "status").await, json!("completed"));
    assert_eq!(legacy.column(&id, "processing_progress").await, json!(100));

    // Cancelled is failed with the message "cancelled".
    let other = legacy.insert_row(false).await;
    assert!(store.set_status(&other, RecordingStatus::Cancelled, Some("cancelled"), None).await.unwrap());
    assert_eq!(legacy.column(&other, "status").await, json!("failed"));
    assert_eq!(legacy.column(&other, "error_message").await, json!("cancelled"));
    assert_eq!(store.get(&other).await.unwrap().unwrap().status, RecordingStatus::Cancelled);
    legacy.drop().await;
}

#[tokio::test]
async fn rows_are_never_inserted_and_bad_columns_are_refused_by_name() {
    let legacy = Legacy::with_table().await;
    let store = legacy.store().await.unwrap();
    let unknown = uuid::Uuid::new_v4().to_string();
    let new = NewRecording {
        id: unknown.clone(),
        file_url: Some("https://x.example/a.mp3".into()),
        ..NewRecording::default()
    };
    assert!(matches!(store.register(&new).await, Err(StoreError::NotFound(id)) if id == unknown));
    assert!(store.get("not-a-uuid").await.unwrap().is_none(), "an id the uuid column cannot hold is not found");
    assert!(!store.set_status("not-a-uuid", RecordingStatus::Processing, None, None).await.unwrap());
    let count: i64 =
        sqlx::query(&format!("SELECT count(*) FROM {}", legacy.table)).fetch_one(&legacy.pool).await.unwrap().get(0);
    assert_eq!(count, 0, "the store inserted nothing");

    let id = legacy.insert_row(true).await;
    let one =
        |name: &str, value: Value| -> IndexMap<String, Value> { [(name.to_string(), value)].into_iter().collect() };
    let refused =
        async |columns: IndexMap<String, Value>| match store.persist_columns(&id, None, &json!({}), &columns).await {
            Err(StoreError::Refused(message)) => message,
            other => panic!("refused expected, got {other:?}"),
        };
    let message = refused(one("summry", json!("x"))).await;
    assert!(message.contains("has no column `summry`"), "{message}");
    let message = refused(one("status", json!("completed"))).await;
    assert!(message.contains("store's own `status`"), "{message}");
    let message = refused(one("processing_progress", json!(100))).await;
    assert!(message.contains("store's own `progress`"), "{message}");
    let message = refused(one("duration", json!("about a minute"))).await;
    assert!(
        message.contains("column `duration`") && message.contains("integer") && message.contains("not a number"),
        "{message}"
    );
    let message = refused(one("enable_coaching", json!(3))).await;
    assert!(message.contains("boolean"), "{message}");
    assert_eq!(legacy.column(&id, "status").await, json!("processing"), "a refused write changes nothing");
    legacy.drop().await;
}

/// Runs the shipped `soundscribe` pipeline on a row of the legacy table, through the real stages and the fake AI
/// server, and returns the report and how many coaching calls the fake saw.
async fn soundscribe(
    legacy: &Legacy,
    id: &str,
    params: serde_json::Map<String, Value>,
) -> (echo_worker::engine::JobReport, usize) {
    use echo_worker::ai::{ProviderSettings, ProviderStyle};
    use echo_worker::config::{Secret, SecretUrl, Settings};
    use echo_worker::job::checkpoint::{Checkpoints, MemoryCheckpoints};
    use std::sync::Arc;

    let fake = support::fake_ai::Fake::start().await;
    let temp = tempfile::tempdir().unwrap();
    let audio = support::media::tone(temp.path(), "call.mp3", 8);
    let mut settings = Settings::default();
    settings.paths.temp_dir = temp.path().to_path_buf();
    settings.database.url = SecretUrl::new(postgres_url());
    settings.database.table = legacy.table.clone();
    settings.database.profile = Profile::SupabaseLegacy;
    let mut provider =
        ProviderSettings::new(ProviderStyle::Azure, fake.base.clone(), Some(Secret::new(support::fake_ai::KEY)));
    provider.transcription_model = "whisper".into();
    settings.ai.providers.insert("fake".into(), provider);
    let catalog =
        echo_worker::catalog::Catalog::load(std::path::Path::new("pipelines"), std::path::Path::new("plugins"))
            .unwrap();
    let store: Arc<dyn Store> = echo_worker::app::store(&settings).await.unwrap();
    let registry = echo_worker::app::registry(&settings, catalog.plugins.values(), store.clone()).await.unwrap();
    let engine = echo_worker::engine::Engine::new(
        registry,
        Arc::new(MemoryCheckpoints::default()) as Arc<dyn Checkpoints>,
        settings.engine(),
    );
    store.set_status(id, RecordingStatus::Processing, None, None).await.unwrap();
    let job = echo_worker::job::JobSpec {
        id: format!("job-{id}"),
        recording_id: Some(id.to_string()),
        pipeline: "soundscribe".into(),
        params,
        source: Some(audio.display().to_string()),
        trusted_source: true,
    };
    let pipeline = &catalog.pipelines["soundscribe"];
    let run = engine.run(
        pipeline,
        job,
        Arc::new(echo_worker::job::progress::NullSink),
        tokio_util::sync::CancellationToken::new(),
    );
    let report = tokio::time::timeout(std::time::Duration::from_secs(120), run)
        .await
        .expect("ends within 2 minutes")
        .expect("starts");
    let coaching = fake
        .seen(support::fake_ai::Kind::Chat)
        .iter()
        .filter(|seen| seen.body["response_format"]["json_schema"]["name"] == "coaching")
        .count();
    (report, coaching)
}

#[tokio::test]
async fn the_soundscribe_pipeline_fills_what_the_frontend_reads_and_coaches_only_when_asked() {
    let legacy = Legacy::with_table().await;
    let coached = legacy.insert_row(true).await;
    let params = serde_json::Map::from_iter([("enable_coaching".to_string(), json!(true))]);
    let (report, calls) = soundscribe(&legacy, &coached, params).await;
    assert_eq!(report.status, echo_worker::engine::JobStatus::Succeeded, "{report:#?}");
    assert_eq!(calls, 1, "one coaching call");
    assert_eq!(legacy.column(&coached, "status").await, json!("completed"));
    assert_eq!(legacy.column(&coached, "processing_progress").await, json!(100));
    for column in ["transcript", "summary", "ai_summary"] {
        let value = legacy.column(&coached, column).await;
        assert!(value.as_str().is_some_and(|text| !text.is_empty()), "{column} is filled: {value}");
    }
    assert_eq!(legacy.column(&coached, "summary").await, legacy.column(&coached, "ai_summary").await);
    let coaching = legacy.column(&coached, "coaching_evaluation").await;
    let keys: std::collections::BTreeSet<&str> =
        coaching.as_object().expect("coaching is an object").keys().map(String::as_str).collect();
    let old = ["overallScore", "criteria", "strengths", "improvements", "actionItems", "summary"];
    assert_eq!(keys, old.into_iter().collect(), "the old schema, nothing more (no usage)");
    assert!(coaching["criteria"]["nextSteps"].is_boolean());
    let duration = legacy.column(&coached, "duration").await;
    assert!(
        duration.as_i64().is_some_and(|seconds| (7..=9).contains(&seconds)),
        "whole seconds of an 8 s file: {duration}"
    );
    assert!(legacy.column(&coached, "whisper_segments").await.as_array().is_some_and(|s| !s.is_empty()));
    assert!(legacy.column(&coached, "ai_insights").await["key_points"].is_array());
    assert!(legacy.column(&coached, "ai_next_steps").await.is_array());
    let metadata = legacy.column(&coached, "processing_metadata").await;
    assert_eq!(
        (
            &metadata["transcription_success"],
            &metadata["summary_success"],
            &metadata["coaching_success"],
            &metadata["partial_success"]
        ),
        (&json!(true), &json!(true), &json!(true), &json!(false)),
        "{metadata}"
    );

    let plain = legacy.insert_row(false).await;
    let params = serde_json::Map::from_iter([("enable_coaching".to_string(), json!(false))]);
    let (report, calls) = soundscribe(&legacy, &plain, params).await;
    assert_eq!(report.status, echo_worker::engine::JobStatus::Succeeded, "{report:#?}");
    assert_eq!(calls, 0, "enable_coaching = false: no coaching call");
    assert_eq!(legacy.column(&plain, "coaching_evaluation").await, Value::Null);
    assert_eq!(legacy.column(&plain, "status").await, json!("completed"));
    assert_eq!(legacy.column(&plain, "processing_metadata").await["coaching_requested"], json!(false));
    legacy.drop().await;
}
