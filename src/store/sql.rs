//! [`Store`] on SQL: SQLite (`sqlite://echo.db`, created when missing) or PostgreSQL (`postgres://…`, Supabase
//! included), chosen by the URL. One set of statements serves both: the few differences (current time, JSON
//! columns, placeholders, timestamp text) are filled in per dialect. The table name is configurable so an
//! existing project can point it at its own table; on PostgreSQL it may carry a schema (`app.recordings`).
//! The schema is created at start by idempotent DDL, under an advisory lock on PostgreSQL so that workers
//! starting together do not race.

use std::sync::Once;

use serde_json::Value;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

use super::{NewRecording, Recording, RecordingStatus, Store, StoreError};

/// The two SQL dialects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// SQLite, the embedded default.
    Sqlite,
    /// PostgreSQL, Supabase's database.
    Postgres,
}

/// Recordings in a SQL database.
#[derive(Debug, Clone)]
pub struct SqlStore {
    pool: AnyPool,
    dialect: Dialect,
    table: String,
}

static DRIVERS: Once = Once::new();

/// Connections per process: enough for a few jobs writing progress while the API reads.
const MAX_CONNECTIONS: u32 = 5;

fn database(action: impl Into<String>) -> impl FnOnce(sqlx::Error) -> StoreError {
    let action = action.into();
    move |cause| StoreError::Database { action, cause }
}

/// Accepts `name` or, on PostgreSQL, `schema.name`, each `[A-Za-z_][A-Za-z0-9_]*`.
fn valid_table(table: &str, dialect: Dialect) -> bool {
    let parts: Vec<&str> = table.split('.').collect();
    let identifier = |part: &&str| {
        let mut chars = part.chars();
        chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
            && part.len() <= 63
    };
    let shape = match dialect {
        Dialect::Sqlite => parts.len() == 1,
        Dialect::Postgres => parts.len() <= 2,
    };
    shape && parts.iter().all(identifier)
}

impl SqlStore {
    /// Connects and creates the table when missing.
    ///
    /// # Errors
    /// [`StoreError::Config`] for an unknown URL scheme or a bad table name; [`StoreError::Database`] when the
    /// database cannot be reached or the schema cannot be created.
    pub async fn connect(url: &str, table: &str) -> Result<Self, StoreError> {
        DRIVERS.call_once(sqlx::any::install_default_drivers);
        let (dialect, url) = if url.starts_with("sqlite:") {
            let url = if url.contains("mode=") || url.contains(":memory:") {
                url.to_string()
            } else {
                format!("{url}{}mode=rwc", if url.contains('?') { '&' } else { '?' })
            };
            (Dialect::Sqlite, url)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (Dialect::Postgres, url.to_string())
        } else {
            // The value may be a keyword string (`host=… password=…`) or hold a password anywhere, so the message
            // names at most its URL scheme, never the value.
            let got = match reqwest::Url::parse(url) {
                Ok(parsed) if !parsed.cannot_be_a_base() => format!("a `{}://` URL", parsed.scheme()),
                _ if url.contains('=') => "a keyword string (`host=… password=…`), which is not supported".into(),
                _ => "a value that is not such a URL; it is not shown, since it may hold a password".into(),
            };
            return Err(StoreError::Config(format!(
                "DATABASE_URL must be a URL starting with sqlite: or postgres:// (got {got})"
            )));
        };
        if !valid_table(table, dialect) {
            return Err(StoreError::Config(format!("`{table}` is not a usable table name")));
        }
        let mut options = AnyPoolOptions::new().max_connections(MAX_CONNECTIONS);
        if url.contains(":memory:") {
            // Every connection to `sqlite::memory:` is a database of its own: keep exactly one, forever.
            options = options.max_connections(1).min_connections(1).idle_timeout(None).max_lifetime(None);
        }
        let pool = options.connect(&url).await.map_err(database("connecting to the database"))?;
        let store = Self { pool, dialect, table: table.to_string() };
        store.migrate().await?;
        Ok(store)
    }

    /// The pool, for health checks.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let ddl = match self.dialect {
            Dialect::Sqlite => include_str!("migrations/sqlite.sql"),
            Dialect::Postgres => include_str!("migrations/postgres.sql"),
        };
        let index = self.table.rsplit('.').next().unwrap_or(&self.table);
        let ddl = ddl.replace("{table}", &self.table).replace("{index}", index);
        let mut transaction = self.pool.begin().await.map_err(database("starting the migration"))?;
        if self.dialect == Dialect::Postgres {
            // One migrating process at a time; the others wait, then find the table in place.
            sqlx::query("SELECT pg_advisory_xact_lock(7213349)")
                .execute(&mut *transaction)
                .await
                .map_err(database("locking for the migration"))?;
            if let Some((schema, _)) = self.table.split_once('.') {
                sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
                    .execute(&mut *transaction)
                    .await
                    .map_err(database(format!("creating schema {schema}")))?;
            }
        }
        let statements = ddl.lines().filter(|line| !line.trim_start().starts_with("--")).collect::<Vec<_>>().join("\n");
        for statement in statements.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            sqlx::query(statement)
                .execute(&mut *transaction)
                .await
                .map_err(database(format!("creating table {}", self.table)))?;
        }
        transaction.commit().await.map_err(database("finishing the migration"))
    }

    /// Fills a statement written with `$n` placeholders, `{table}`, `{now}` and `{json}` for this dialect.
    fn sql(&self, template: &str) -> String {
        let (now, json) = match self.dialect {
            Dialect::Sqlite => ("strftime('%Y-%m-%dT%H:%M:%fZ', 'now')", ""),
            Dialect::Postgres => ("now()", "::jsonb"),
        };
        let text = template.replace("{table}", &self.table).replace("{now}", now).replace("{json}", json);
        match self.dialect {
            // `?NNN` binds by number in SQLite, exactly like `$NNN` in PostgreSQL.
            Dialect::Sqlite => text.replace('$', "?"),
            Dialect::Postgres => text,
        }
    }

    fn columns(&self) -> &'static str {
        match self.dialect {
            Dialect::Sqlite => {
                "id, file_url, file_name, mime_type, size_bytes, duration_s, status, progress, stage, message, job_id, \
                 pipeline, transcript, result, error, owner_id, created_at, updated_at, completed_at"
            }
            Dialect::Postgres => {
                "id, file_url, file_name, mime_type, size_bytes, duration_s, status, progress, stage, message, job_id, \
                 pipeline, transcript, result::text AS result, error, owner_id, \
                 to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS created_at, \
                 to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS updated_at, \
                 to_char(completed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS completed_at"
            }
        }
    }
}

fn decode(row: &AnyRow) -> Result<Recording, sqlx::Error> {
    let status: String = row.try_get("status")?;
    let result: Option<String> = row.try_get("result")?;
    Ok(Recording {
        id: row.try_get("id")?,
        file_url: row.try_get("file_url")?,
        file_name: row.try_get("file_name")?,
        mime_type: row.try_get("mime_type")?,
        size_bytes: row.try_get("size_bytes")?,
        duration_s: row.try_get("duration_s")?,
        status: RecordingStatus::parse(&status).unwrap_or(RecordingStatus::Pending),
        progress: row.try_get("progress")?,
        stage: row.try_get("stage")?,
        message: row.try_get("message")?,
        job_id: row.try_get("job_id")?,
        pipeline: row.try_get("pipeline")?,
        transcript: row.try_get("transcript")?,
        result: result.and_then(|text| serde_json::from_str(&text).ok()),
        error: row.try_get("error")?,
        owner_id: row.try_get("owner_id")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        completed_at: row.try_get("completed_at")?,
    })
}

fn quoted(states: &[&str]) -> String {
    states.iter().map(|state| format!("'{state}'")).collect::<Vec<_>>().join(", ")
}

#[async_trait::async_trait]
impl Store for SqlStore {
    async fn register(&self, new: &NewRecording) -> Result<Recording, StoreError> {
        let sql = self.sql(
            "INSERT INTO {table} AS r (id, file_url, file_name, mime_type, size_bytes, owner_id, pipeline, job_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (id) DO UPDATE SET \
               file_url = COALESCE(excluded.file_url, r.file_url), file_name = COALESCE(excluded.file_name, r.file_name), \
               mime_type = COALESCE(excluded.mime_type, r.mime_type), \
               size_bytes = COALESCE(excluded.size_bytes, r.size_bytes), \
               owner_id = COALESCE(excluded.owner_id, r.owner_id), pipeline = COALESCE(excluded.pipeline, r.pipeline), \
               job_id = COALESCE(excluded.job_id, r.job_id), updated_at = {now}",
        );
        sqlx::query(&sql)
            .bind(&new.id)
            .bind(&new.file_url)
            .bind(&new.file_name)
            .bind(&new.mime_type)
            .bind(new.size_bytes)
            .bind(&new.owner_id)
            .bind(&new.pipeline)
            .bind(&new.job_id)
            .execute(&self.pool)
            .await
            .map_err(database(format!("registering recording {}", new.id)))?;
        self.get(&new.id).await?.ok_or_else(|| StoreError::NotFound(new.id.clone()))
    }

    async fn get(&self, id: &str) -> Result<Option<Recording>, StoreError> {
        let sql = self.sql(&format!("SELECT {} FROM {{table}} WHERE id = $1", self.columns()));
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(database(format!("reading recording {id}")))?;
        row.as_ref().map(decode).transpose().map_err(database(format!("decoding recording {id}")))
    }

    async fn set_status(
        &self,
        id: &str,
        status: RecordingStatus,
        message: Option<&str>,
        error: Option<&str>,
    ) -> Result<bool, StoreError> {
        let sql = self.sql(&format!(
            "UPDATE {{table}} SET \
               progress = CASE WHEN $2 = 'completed' THEN 100 \
                               WHEN $2 = 'processing' AND status <> 'processing' THEN 0 \
                               WHEN $2 IN ('pending', 'queued') THEN 0 ELSE progress END, \
               completed_at = CASE WHEN $2 = 'completed' THEN COALESCE(completed_at, {{now}}) \
                                   WHEN $2 = 'processing' THEN NULL ELSE completed_at END, \
               status = $2, message = COALESCE($3, message), error = $4, updated_at = {{now}} \
             WHERE id = $1 AND status IN ({})",
            quoted(status.allowed_from())
        ));
        let done = sqlx::query(&sql)
            .bind(id)
            .bind(status.as_str())
            .bind(message)
            .bind(error)
            .execute(&self.pool)
            .await
            .map_err(database(format!("setting recording {id} to {}", status.as_str())))?;
        Ok(done.rows_affected() > 0)
    }

    async fn set_progress(&self, id: &str, progress: u8, stage: Option<&str>, message: &str) -> Result<(), StoreError> {
        let sql = self.sql(
            "UPDATE {table} SET progress = $2, stage = COALESCE($3, stage), message = $4, updated_at = {now} \
             WHERE id = $1 AND status = 'processing' AND progress <= $2",
        );
        sqlx::query(&sql)
            .bind(id)
            .bind(i64::from(progress.min(100)))
            .bind(stage)
            .bind(message)
            .execute(&self.pool)
            .await
            .map_err(database(format!("writing progress of recording {id}")))?;
        Ok(())
    }

    async fn set_media(
        &self,
        id: &str,
        mime_type: &str,
        size_bytes: Option<i64>,
        duration_s: Option<f64>,
    ) -> Result<(), StoreError> {
        let sql = self.sql(
            "UPDATE {table} SET mime_type = $2, size_bytes = COALESCE($3, size_bytes), \
             duration_s = COALESCE($4, duration_s), updated_at = {now} \
             WHERE id = $1 AND NOT (mime_type IS NOT DISTINCT FROM $2 \
               AND size_bytes IS NOT DISTINCT FROM COALESCE($3, size_bytes) \
               AND duration_s IS NOT DISTINCT FROM COALESCE($4, duration_s))",
        );
        sqlx::query(&sql)
            .bind(id)
            .bind(mime_type)
            .bind(size_bytes)
            .bind(duration_s)
            .execute(&self.pool)
            .await
            .map_err(database(format!("writing media facts of recording {id}")))?;
        Ok(())
    }

    async fn persist(&self, id: &str, transcript: Option<&str>, result: &Value) -> Result<(), StoreError> {
        let result_text = result.to_string();
        let sql = self.sql(
            "UPDATE {table} SET transcript = COALESCE($2, transcript), result = $3{json}, status = 'completed', \
               progress = 100, stage = NULL, message = 'completed', error = NULL, updated_at = {now}, \
               completed_at = COALESCE(completed_at, {now}) \
             WHERE id = $1 AND status IN ('pending', 'queued', 'processing', 'completed') \
               AND NOT (status = 'completed' AND result IS NOT DISTINCT FROM $3{json} \
                        AND transcript IS NOT DISTINCT FROM COALESCE($2, transcript))",
        );
        let done = sqlx::query(&sql)
            .bind(id)
            .bind(transcript)
            .bind(&result_text)
            .execute(&self.pool)
            .await
            .map_err(database(format!("storing results of recording {id}")))?;
        if done.rows_affected() > 0 {
            return Ok(());
        }
        match self.get(id).await? {
            None => Err(StoreError::NotFound(id.to_string())),
            Some(recording) if recording.status == RecordingStatus::Completed => Ok(()),
            Some(recording) => Err(StoreError::Refused(format!(
                "recording {id} is {} and cannot take results",
                recording.status.as_str()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_identifiers() {
        assert!(valid_table("recordings", Dialect::Sqlite));
        assert!(valid_table("app.recordings", Dialect::Postgres));
        assert!(!valid_table("app.recordings", Dialect::Sqlite));
        for bad in ["", "1abc", "rec;drop", "a.b.c", "rec ordings", "\"x\""] {
            assert!(!valid_table(bad, Dialect::Postgres), "{bad}");
        }
    }
}
