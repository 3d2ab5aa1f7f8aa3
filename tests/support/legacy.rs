//! The live frontend's Supabase `recordings` table in a PostgreSQL schema of the test's own (built from
//! `legacy_recordings.sql`, old-worker.md §4), rows inserted the way the frontend inserts them, and columns
//! read back as JSON.

use echo_worker::store::{Layout, Profile, SqlStore, StoreError};
use serde_json::Value;
use sqlx::Row;

use super::postgres_url;

/// A schema of its own holding the frontend's table; dropped by [`Legacy::drop`].
pub struct Legacy {
    pub pool: sqlx::PgPool,
    pub schema: String,
    pub table: String,
}

impl Legacy {
    pub async fn new() -> Self {
        let pool = sqlx::PgPool::connect(&postgres_url()).await.expect("PostgreSQL at 127.0.0.1:5432 answers");
        let schema = format!("legacy_test_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(&format!("CREATE SCHEMA {schema}")).execute(&pool).await.unwrap();
        Self { pool, table: format!("{schema}.recordings"), schema }
    }

    pub async fn with_table() -> Self {
        let legacy = Self::new().await;
        let ddl = include_str!("legacy_recordings.sql").replace("{table}", &legacy.table);
        let ddl: String = ddl.lines().filter(|line| !line.starts_with("--")).collect::<Vec<_>>().join("\n");
        sqlx::query(&ddl).execute(&legacy.pool).await.unwrap();
        legacy
    }

    pub async fn store(&self) -> Result<SqlStore, StoreError> {
        SqlStore::connect_with(&postgres_url(), &self.table, Layout::profile(Profile::SupabaseLegacy)).await
    }

    /// Inserts a row the way the frontend does (`useFileOperations.ts:115-128`) and returns its id.
    pub async fn insert_row(&self, enable_coaching: bool) -> String {
        self.insert_upload(
            enable_coaching,
            "https://p.supabase.co/storage/v1/object/public/recordings/u/1_call.mp3",
            1234,
        )
        .await
    }

    /// [`Legacy::insert_row`] for an upload at `file_url` of `file_size` bytes.
    pub async fn insert_upload(&self, enable_coaching: bool, file_url: &str, file_size: u64) -> String {
        let sql = format!(
            "INSERT INTO {} (user_id, title, description, file_url, file_type, file_size, duration, status, \
             content_type, enable_coaching) VALUES (gen_random_uuid(), 'Call', '', \
             $2, 'audio', $3, 61, 'processing', 'audio/mpeg', $1) RETURNING CAST(id AS TEXT)",
            self.table
        );
        sqlx::query(&sql)
            .bind(enable_coaching)
            .bind(file_url)
            .bind(i64::try_from(file_size).unwrap())
            .fetch_one(&self.pool)
            .await
            .unwrap()
            .get(0)
    }

    pub async fn column(&self, id: &str, expression: &str) -> Value {
        let sql = format!("SELECT to_jsonb({expression}) FROM {} WHERE id = CAST($1 AS uuid)", self.table);
        sqlx::query(&sql)
            .bind(id)
            .fetch_one(&self.pool)
            .await
            .unwrap()
            .get::<Option<Value>, _>(0)
            .unwrap_or(Value::Null)
    }

    pub async fn columns(&self) -> Vec<String> {
        let sql = "SELECT CAST(column_name AS TEXT) FROM information_schema.columns \
                   WHERE table_schema = $1 AND table_name = 'recordings' ORDER BY ordinal_position";
        sqlx::query(sql).bind(&self.schema).fetch_all(&self.pool).await.unwrap().iter().map(|r| r.get(0)).collect()
    }

    pub async fn drop(self) {
        sqlx::query(&format!("DROP SCHEMA {} CASCADE", self.schema)).execute(&self.pool).await.unwrap();
    }
}
