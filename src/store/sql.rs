//! [`Store`] on SQL: SQLite (`sqlite://echo.db`, created when missing) or PostgreSQL (`postgres://…`, Supabase
//! included), chosen by the URL. One set of statements serves both: the few differences (current time,
//! placeholders, casts, timestamp text) are filled in per dialect. The table name is configurable so an
//! existing project can point it at its own table; on PostgreSQL it may carry a schema (`app.recordings`).
//!
//! Statements are built from the [`Layout`]: each logical field goes to its mapped column, and a field with no
//! column is neither written nor read (it reads as empty). At start the store reads the table's columns and
//! their types from the database: every mapped column must exist (the error lists the missing ones), and each
//! written value is cast to its column's real type (a `uuid` id, an `integer` duration, a `jsonb` result).
//! In the `echo` profile the table is created first by idempotent DDL, under an advisory lock on PostgreSQL so
//! that workers starting together do not race; in `supabase-legacy` the table is the customer's and is never
//! created or altered.

use std::collections::HashMap;
use std::sync::{Arc, Once};

use indexmap::IndexMap;
use serde_json::Value;
use sqlx::any::{AnyArguments, AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyPool, Row};

use super::layout::{Field, Layout, is_identifier};
use super::{NewRecording, Recording, RecordingStatus, Store, StoreError};

/// The two SQL dialects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// SQLite, the embedded default.
    Sqlite,
    /// PostgreSQL, Supabase's database.
    Postgres,
}

/// What a column can take, judged from its declared type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Text,
    Integer,
    Float,
    Bool,
    Json,
    Array,
    /// Timestamps, dates, uuids and anything else that PostgreSQL parses from text.
    Parsed,
}

/// A column of the table as the database describes it.
#[derive(Debug, Clone)]
struct Column {
    /// The type as the database names it (`uuid`, `integer`, `timestamp with time zone`, `TEXT`).
    sql_type: String,
    class: Class,
}

impl Column {
    fn new(sql_type: &str) -> Self {
        let lower = sql_type.to_ascii_lowercase();
        let class = if lower.ends_with("[]") {
            Class::Array
        } else if lower.contains("json") {
            Class::Json
        } else if lower.contains("integer")
            || ["int", "int2", "int4", "int8", "bigint", "smallint", "tinyint", "mediumint"].contains(&lower.as_str())
        {
            Class::Integer
        } else if ["real", "double", "numeric", "decimal", "float"].iter().any(|word| lower.contains(word)) {
            Class::Float
        } else if lower.starts_with("bool") {
            Class::Bool
        } else if lower.is_empty() || ["text", "char", "clob"].iter().any(|word| lower.contains(word)) {
            Class::Text
        } else {
            Class::Parsed
        };
        Self { sql_type: sql_type.to_string(), class }
    }

    fn is_time(&self) -> bool {
        let lower = self.sql_type.to_ascii_lowercase();
        lower.starts_with("timestamp") || lower == "date"
    }
}

/// Recordings in a SQL database.
#[derive(Debug, Clone)]
pub struct SqlStore {
    pool: AnyPool,
    dialect: Dialect,
    table: String,
    layout: Arc<Layout>,
    /// The table's columns by lower-case name.
    columns: Arc<HashMap<String, Column>>,
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
    let shape = match dialect {
        Dialect::Sqlite => parts.len() == 1,
        Dialect::Postgres => parts.len() <= 2,
    };
    shape && parts.iter().all(|part| is_identifier(part))
}

/// One value bound to a statement.
#[derive(Debug, Clone)]
enum Arg {
    Text(Option<String>),
    Int(Option<i64>),
    Float(Option<f64>),
    Bool(Option<bool>),
}

/// A statement and its arguments, numbered as they are added.
struct Statement {
    dialect: Dialect,
    sql: String,
    args: Vec<Arg>,
}

impl Statement {
    fn new(dialect: Dialect) -> Self {
        Self { dialect, sql: String::new(), args: Vec::new() }
    }

    /// Adds an argument and returns its placeholder.
    fn arg(&mut self, arg: Arg) -> String {
        self.args.push(arg);
        match self.dialect {
            // `?NNN` binds by number in SQLite, exactly like `$NNN` in PostgreSQL.
            Dialect::Sqlite => format!("?{}", self.args.len()),
            Dialect::Postgres => format!("${}", self.args.len()),
        }
    }

    fn text(&mut self, value: Option<&str>) -> String {
        self.arg(Arg::Text(value.map(str::to_string)))
    }

    fn query(&self) -> sqlx::query::Query<'_, Any, AnyArguments<'_>> {
        let mut query = sqlx::query(&self.sql);
        for arg in &self.args {
            query = match arg.clone() {
                Arg::Text(value) => query.bind(value),
                Arg::Int(value) => query.bind(value),
                Arg::Float(value) => query.bind(value),
                Arg::Bool(value) => query.bind(value),
            };
        }
        query
    }
}

impl SqlStore {
    /// Connects with the `echo` layout and creates the table when missing.
    ///
    /// # Errors
    /// As [`SqlStore::connect_with`].
    pub async fn connect(url: &str, table: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, table, Layout::default()).await
    }

    /// Connects, creates the table when the layout owns it, and checks that every mapped column exists.
    ///
    /// # Errors
    /// [`StoreError::Config`] for an unknown URL scheme, a bad table name, a missing table (in a layout that
    /// does not own it) or missing columns (all named); [`StoreError::Database`] when the database cannot be
    /// reached or the schema cannot be created.
    pub async fn connect_with(url: &str, table: &str, layout: Layout) -> Result<Self, StoreError> {
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
        let mut store = Self {
            pool,
            dialect,
            table: table.to_string(),
            layout: Arc::new(layout),
            columns: Arc::new(HashMap::new()),
        };
        if store.layout.owns_table() {
            store.migrate().await?;
        }
        store.columns = Arc::new(store.describe().await?);
        store.check_columns()?;
        Ok(store)
    }

    /// The pool, for health checks.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// The layout in force.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The table's name as configured.
    pub fn table(&self) -> &str {
        &self.table
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

    /// The table's columns and their types, as the database describes them.
    async fn describe(&self) -> Result<HashMap<String, Column>, StoreError> {
        let (sql, bound) = match self.dialect {
            Dialect::Sqlite => (format!("SELECT name, type FROM pragma_table_info('{}')", self.table), false),
            Dialect::Postgres => (
                "SELECT CAST(a.attname AS TEXT), format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
                 WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped"
                    .to_string(),
                true,
            ),
        };
        let mut query = sqlx::query(&sql);
        if bound {
            query = query.bind(&self.table);
        }
        let rows =
            query.fetch_all(&self.pool).await.map_err(database(format!("reading the columns of {}", self.table)))?;
        let mut columns = HashMap::new();
        for row in rows {
            let name: String = row.try_get(0).map_err(database("reading a column name"))?;
            let sql_type: String = row.try_get(1).map_err(database("reading a column type"))?;
            columns.insert(name.to_ascii_lowercase(), Column::new(&sql_type));
        }
        Ok(columns)
    }

    /// Every mapped column must exist; the error names the profile and all the missing ones.
    fn check_columns(&self) -> Result<(), StoreError> {
        let profile = self.layout.profile_kind().name();
        if self.columns.is_empty() {
            return Err(StoreError::Config(format!(
                "table {} does not exist; the `{profile}` profile never creates it (it belongs to the frontend's \
                 project): create it, or point database.table at the right one",
                self.table
            )));
        }
        let missing: Vec<String> = self
            .layout
            .mapped()
            .filter(|(_, column)| !self.columns.contains_key(&column.to_ascii_lowercase()))
            .map(|(field, column)| format!("{column} (for {})", field.name()))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        Err(StoreError::Config(format!(
            "table {} lacks the column(s) the `{profile}` profile maps: {}; add them, or map those fields to other \
             columns (or to \"\") with database.columns",
            self.table,
            missing.join(", ")
        )))
    }

    fn col(&self, field: Field) -> Option<&str> {
        self.layout.column(field)
    }

    fn column(&self, name: &str) -> Option<&Column> {
        self.columns.get(&name.to_ascii_lowercase())
    }

    /// `placeholder` cast to the type of `column` (PostgreSQL types every argument; SQLite needs no cast).
    fn typed(&self, placeholder: &str, column: &str) -> String {
        match (self.dialect, self.column(column)) {
            (Dialect::Postgres, Some(column)) => format!("CAST({placeholder} AS {})", column.sql_type),
            _ => placeholder.to_string(),
        }
    }

    fn now(&self) -> &'static str {
        match self.dialect {
            Dialect::Sqlite => "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
            Dialect::Postgres => "now()",
        }
    }

    /// Whether `id` can be an id of this table at all (a `uuid` id column cannot hold `r1`): ids that cannot
    /// are simply not found, instead of failing the statement.
    fn id_fits(&self, id: &str) -> bool {
        let id_type = self.col(Field::Id).and_then(|c| self.column(c)).map(|c| c.sql_type.to_ascii_lowercase());
        match id_type.as_deref() {
            Some("uuid") => uuid::Uuid::parse_str(id).is_ok(),
            Some(kind) if kind.contains("int") => id.parse::<i64>().is_ok(),
            _ => true,
        }
    }

    /// `WHERE <id column> = <id>`.
    fn where_id(&self, statement: &mut Statement, id: &str) -> String {
        let column = self.col(Field::Id).unwrap_or("id");
        let placeholder = statement.text(Some(id));
        format!("{column} = {}", self.typed(&placeholder, column))
    }

    fn status_column(&self) -> &str {
        self.col(Field::Status).unwrap_or("status")
    }

    /// The select list: every field under its own name, cast to what [`decode`] reads.
    fn select_list(&self) -> String {
        let text = |expression: &str| format!("CAST({expression} AS TEXT)");
        Field::ALL
            .into_iter()
            .map(|field| {
                let name = field.name();
                let column = self.col(field);
                let expression = match (field, column) {
                    (Field::SizeBytes, Some(c)) => format!("CAST({c} AS BIGINT)"),
                    (Field::SizeBytes, None) => "CAST(NULL AS BIGINT)".into(),
                    (Field::Progress, Some(c)) => format!("COALESCE(CAST({c} AS BIGINT), 0)"),
                    (Field::Progress, None) => "CAST(0 AS BIGINT)".into(),
                    (Field::DurationS, Some(c)) => match self.dialect {
                        Dialect::Sqlite => format!("CAST({c} AS REAL)"),
                        Dialect::Postgres => format!("CAST({c} AS DOUBLE PRECISION)"),
                    },
                    (Field::DurationS, None) => match self.dialect {
                        Dialect::Sqlite => "CAST(NULL AS REAL)".into(),
                        Dialect::Postgres => "CAST(NULL AS DOUBLE PRECISION)".into(),
                    },
                    (Field::CreatedAt | Field::UpdatedAt | Field::CompletedAt, Some(c)) => self.time_text(c),
                    (Field::CreatedAt | Field::UpdatedAt, None) => "''".into(),
                    (_, Some(c)) => text(c),
                    (_, None) => text("NULL"),
                };
                format!("{expression} AS {name}")
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// A timestamp column as RFC 3339 text in UTC.
    fn time_text(&self, column: &str) -> String {
        let Some(described) = self.column(column).filter(|_| self.dialect == Dialect::Postgres) else {
            return format!("CAST({column} AS TEXT)");
        };
        const FORMAT: &str = "'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'";
        if described.sql_type.contains("with time zone") {
            format!("to_char({column} AT TIME ZONE 'UTC', {FORMAT})")
        } else if described.is_time() {
            format!("to_char({column}, {FORMAT})")
        } else {
            format!("CAST({column} AS TEXT)")
        }
    }

    fn decode(&self, row: &AnyRow) -> Result<Recording, sqlx::Error> {
        let status: Option<String> = row.try_get("status")?;
        let result: Option<String> = row.try_get("result")?;
        let error: Option<String> = row.try_get("error")?;
        Ok(Recording {
            id: row.try_get("id")?,
            file_url: row.try_get("file_url")?,
            file_name: row.try_get("file_name")?,
            mime_type: row.try_get("mime_type")?,
            size_bytes: row.try_get("size_bytes")?,
            duration_s: row.try_get("duration_s")?,
            status: self.layout.decode(status.as_deref().unwrap_or_default(), error.as_deref()),
            progress: row.try_get("progress")?,
            stage: row.try_get("stage")?,
            message: row.try_get("message")?,
            job_id: row.try_get("job_id")?,
            pipeline: row.try_get("pipeline")?,
            transcript: row.try_get("transcript")?,
            result: result.and_then(|text| serde_json::from_str(&text).ok()),
            error,
            owner_id: row.try_get("owner_id")?,
            created_at: row.try_get::<Option<String>, _>("created_at")?.unwrap_or_default(),
            updated_at: row.try_get::<Option<String>, _>("updated_at")?.unwrap_or_default(),
            completed_at: row.try_get("completed_at")?,
        })
    }

    /// `column = value` for each pair, plus `updated_at = now`.
    fn assignments(&self, pairs: &[(String, String)]) -> Vec<String> {
        let mut sets: Vec<String> = pairs.iter().map(|(column, value)| format!("{column} = {value}")).collect();
        self.touch(&mut sets);
        sets
    }

    /// `updated_at = now` when the table has such a column.
    fn touch(&self, sets: &mut Vec<String>) {
        if let Some(column) = self.col(Field::UpdatedAt) {
            sets.push(format!("{column} = {}", self.now()));
        }
    }

    async fn execute(&self, statement: &Statement, action: String) -> Result<u64, StoreError> {
        let done = statement.query().execute(&self.pool).await.map_err(database(action))?;
        Ok(done.rows_affected())
    }

    /// Registers a new row (only in a table the store owns).
    async fn insert(&self, new: &NewRecording) -> Result<(), StoreError> {
        let mut statement = Statement::new(self.dialect);
        let values: [(Field, Arg); 8] = [
            (Field::Id, Arg::Text(Some(new.id.clone()))),
            (Field::FileUrl, Arg::Text(new.file_url.clone())),
            (Field::FileName, Arg::Text(new.file_name.clone())),
            (Field::MimeType, Arg::Text(new.mime_type.clone())),
            (Field::SizeBytes, Arg::Int(new.size_bytes)),
            (Field::OwnerId, Arg::Text(new.owner_id.clone())),
            (Field::Pipeline, Arg::Text(new.pipeline.clone())),
            (Field::JobId, Arg::Text(new.job_id.clone())),
        ];
        let (mut names, mut placeholders, mut updates) = (Vec::new(), Vec::new(), Vec::new());
        for (field, arg) in values {
            let Some(column) = self.col(field) else { continue };
            let placeholder = statement.arg(arg);
            names.push(column.to_string());
            placeholders.push(self.typed(&placeholder, column));
            if field != Field::Id {
                updates.push(format!("{column} = COALESCE(excluded.{column}, r.{column})"));
            }
        }
        self.touch(&mut updates);
        let id_column = self.col(Field::Id).unwrap_or("id");
        statement.sql = format!(
            "INSERT INTO {} AS r ({}) VALUES ({}) ON CONFLICT ({id_column}) DO UPDATE SET {}",
            self.table,
            names.join(", "),
            placeholders.join(", "),
            updates.join(", ")
        );
        self.execute(&statement, format!("registering recording {}", new.id)).await.map(drop)
    }

    /// Refreshes an existing row's file, owner and job fields (a table the store does not own: never inserts).
    async fn refresh(&self, new: &NewRecording) -> Result<(), StoreError> {
        if !self.id_fits(&new.id) {
            return Err(StoreError::NotFound(new.id.clone()));
        }
        let mut statement = Statement::new(self.dialect);
        let values: [(Field, Arg); 7] = [
            (Field::FileUrl, Arg::Text(new.file_url.clone())),
            (Field::FileName, Arg::Text(new.file_name.clone())),
            (Field::MimeType, Arg::Text(new.mime_type.clone())),
            (Field::SizeBytes, Arg::Int(new.size_bytes)),
            (Field::OwnerId, Arg::Text(new.owner_id.clone())),
            (Field::Pipeline, Arg::Text(new.pipeline.clone())),
            (Field::JobId, Arg::Text(new.job_id.clone())),
        ];
        let mut pairs: Vec<(String, String)> = Vec::new();
        for (field, arg) in values {
            let Some(column) = self.col(field) else { continue };
            if matches!(&arg, Arg::Text(None) | Arg::Int(None)) {
                continue;
            }
            let placeholder = statement.arg(arg);
            pairs.push((column.to_string(), self.typed(&placeholder, column)));
        }
        let exists = async || match self.get(&new.id).await? {
            Some(_) => Ok(()),
            None => Err(StoreError::NotFound(new.id.clone())),
        };
        if pairs.is_empty() {
            // Nothing this table holds changes (a job id, say): no write, so no Realtime event either.
            return exists().await;
        }
        let filter = self.where_id(&mut statement, &new.id);
        statement.sql = format!(
            "UPDATE {} SET {} WHERE {filter} AND {}",
            self.table,
            self.assignments(&pairs).join(", "),
            changes(&pairs)
        );
        let changed = self.execute(&statement, format!("registering recording {}", new.id)).await?;
        if changed == 0 {
            // Already as given, or no such row: the frontend creates the rows of its table, never the store.
            return exists().await;
        }
        Ok(())
    }

    /// A named column's value as an argument of the column's type.
    fn column_arg(&self, name: &str, column: &Column, value: &Value) -> Result<Arg, StoreError> {
        let refuse = |what: &str| {
            let mut shown = value.to_string();
            if shown.len() > 80 {
                let cut = (0..=80).rev().find(|i| shown.is_char_boundary(*i)).unwrap_or(0);
                shown.truncate(cut);
                shown.push('…');
            }
            StoreError::Refused(format!(
                "column `{name}` of table {} is {} and cannot take {shown} ({what})",
                self.table, column.sql_type
            ))
        };
        let number = || match value {
            Value::Number(number) => number.as_f64(),
            Value::String(text) => text.trim().parse::<f64>().ok(),
            _ => None,
        };
        Ok(match column.class {
            Class::Text => Arg::Text(Some(match value {
                Value::String(text) => text.clone(),
                other => other.to_string(),
            })),
            Class::Json | Class::Array => Arg::Text(Some(value.to_string())),
            #[allow(clippy::cast_possible_truncation)] // rounded and range-checked first
            Class::Integer => {
                let number = number().ok_or_else(|| refuse("not a number"))?.round();
                if !(-9.0e18..=9.0e18).contains(&number) {
                    return Err(refuse("out of range"));
                }
                Arg::Int(Some(number as i64))
            }
            Class::Float => Arg::Float(Some(number().ok_or_else(|| refuse("not a number"))?)),
            Class::Bool => Arg::Bool(Some(match value {
                Value::Bool(flag) => *flag,
                Value::String(text) if text == "true" || text == "false" => text == "true",
                _ => return Err(refuse("not true or false")),
            })),
            Class::Parsed => match value {
                Value::String(text) => Arg::Text(Some(text.clone())),
                _ => return Err(refuse("not text")),
            },
        })
    }

    /// The value expression for a named column: arrays are built from the JSON list.
    fn column_value(&self, placeholder: &str, name: &str, column: &Column) -> String {
        match (self.dialect, column.class) {
            (Dialect::Postgres, Class::Array) => format!(
                "CAST(ARRAY(SELECT jsonb_array_elements_text(CAST({placeholder} AS jsonb))) AS {})",
                column.sql_type
            ),
            _ => self.typed(placeholder, name),
        }
    }
}

/// A guard that is true when at least one `column = value` assignment changes the row, so that a write that
/// would change nothing is not made (no `updated_at` bump, no Realtime event).
fn changes(pairs: &[(String, String)]) -> String {
    let same: Vec<String> =
        pairs.iter().map(|(column, value)| format!("{column} IS NOT DISTINCT FROM {value}")).collect();
    format!("NOT ({})", same.join(" AND "))
}

fn quoted(states: &[&str]) -> String {
    states.iter().map(|state| format!("'{state}'")).collect::<Vec<_>>().join(", ")
}

#[async_trait::async_trait]
impl Store for SqlStore {
    async fn register(&self, new: &NewRecording) -> Result<Recording, StoreError> {
        if self.layout.owns_table() {
            self.insert(new).await?;
        } else {
            self.refresh(new).await?;
        }
        self.get(&new.id).await?.ok_or_else(|| StoreError::NotFound(new.id.clone()))
    }

    async fn get(&self, id: &str) -> Result<Option<Recording>, StoreError> {
        if !self.id_fits(id) {
            return Ok(None);
        }
        let mut statement = Statement::new(self.dialect);
        let filter = self.where_id(&mut statement, id);
        statement.sql = format!("SELECT {} FROM {} WHERE {filter}", self.select_list(), self.table);
        let row =
            statement.query().fetch_optional(&self.pool).await.map_err(database(format!("reading recording {id}")))?;
        row.as_ref().map(|row| self.decode(row)).transpose().map_err(database(format!("decoding recording {id}")))
    }

    async fn set_status(
        &self,
        id: &str,
        status: RecordingStatus,
        message: Option<&str>,
        error: Option<&str>,
    ) -> Result<bool, StoreError> {
        if !self.id_fits(id) {
            return Ok(false);
        }
        let mut statement = Statement::new(self.dialect);
        let logical = statement.text(Some(status.as_str()));
        let stored = statement.text(Some(self.layout.stored(status)));
        let status_column = self.status_column().to_string();
        let processing = self.layout.stored(RecordingStatus::Processing);
        let now = self.now();
        let mut pairs: Vec<(String, String)> = Vec::new();
        if let Some(c) = self.col(Field::Progress) {
            let value = format!(
                "CASE WHEN {logical} = 'completed' THEN 100 \
                      WHEN {logical} = 'processing' AND {status_column} <> '{processing}' THEN 0 \
                      WHEN {logical} IN ('pending', 'queued') THEN 0 ELSE {c} END"
            );
            pairs.push((c.to_string(), value));
        }
        if let Some(c) = self.col(Field::CompletedAt) {
            let value = format!(
                "CASE WHEN {logical} = 'completed' THEN COALESCE({c}, {now}) \
                      WHEN {logical} = 'processing' THEN NULL ELSE {c} END"
            );
            pairs.push((c.to_string(), value));
        }
        pairs.push((status_column.clone(), stored));
        if let Some(c) = self.col(Field::Message) {
            let message = statement.text(message);
            pairs.push((c.to_string(), format!("COALESCE({message}, {c})")));
        }
        if let Some(c) = self.col(Field::Error) {
            let error = statement.text(error.or(self.layout.implied_error(status)));
            pairs.push((c.to_string(), error));
        }
        let allowed = self.layout.allowed_from(status);
        let filter = self.where_id(&mut statement, id);
        statement.sql = format!(
            "UPDATE {} SET {} WHERE {filter} AND {status_column} IN ({}) AND {}",
            self.table,
            self.assignments(&pairs).join(", "),
            quoted(&allowed),
            changes(&pairs)
        );
        let changed = self.execute(&statement, format!("setting recording {id} to {}", status.as_str())).await?;
        if changed > 0 {
            return Ok(true);
        }
        // Nothing written: either the move is not allowed, or the row already says exactly this.
        let stored = self.read_column(id, &status_column).await?;
        Ok(stored.is_some_and(|stored| allowed.contains(&stored.as_str())))
    }

    async fn set_progress(&self, id: &str, progress: u8, stage: Option<&str>, message: &str) -> Result<(), StoreError> {
        if !self.id_fits(id) {
            return Ok(());
        }
        let mut statement = Statement::new(self.dialect);
        let mut pairs: Vec<(String, String)> = Vec::new();
        let mut guard = String::new();
        if let Some(c) = self.col(Field::Progress) {
            let value = statement.arg(Arg::Int(Some(i64::from(progress.min(100)))));
            let value = self.typed(&value, c);
            guard = format!(" AND COALESCE({c}, 0) <= {value}");
            pairs.push((c.to_string(), value));
        }
        if let Some(c) = self.col(Field::Stage) {
            let stage = statement.text(stage);
            pairs.push((c.to_string(), format!("COALESCE({stage}, {c})")));
        }
        if let Some(c) = self.col(Field::Message) {
            pairs.push((c.to_string(), statement.text(Some(message))));
        }
        if pairs.is_empty() {
            return Ok(());
        }
        let filter = self.where_id(&mut statement, id);
        statement.sql = format!(
            "UPDATE {} SET {} WHERE {filter} AND {} = '{}'{guard} AND {}",
            self.table,
            self.assignments(&pairs).join(", "),
            self.status_column(),
            self.layout.stored(RecordingStatus::Processing),
            changes(&pairs)
        );
        self.execute(&statement, format!("writing progress of recording {id}")).await.map(drop)
    }

    async fn set_media(
        &self,
        id: &str,
        mime_type: &str,
        size_bytes: Option<i64>,
        duration_s: Option<f64>,
    ) -> Result<(), StoreError> {
        if !self.id_fits(id) {
            return Ok(());
        }
        let mut statement = Statement::new(self.dialect);
        let (mut sets, mut same) = (Vec::new(), Vec::new());
        if let Some(c) = self.col(Field::MimeType) {
            let value = statement.text(Some(mime_type));
            sets.push(format!("{c} = {value}"));
            same.push(format!("{c} IS NOT DISTINCT FROM {value}"));
        }
        if let Some(c) = self.col(Field::SizeBytes) {
            let value = statement.arg(Arg::Int(size_bytes));
            let value = format!("COALESCE({}, {c})", self.typed(&value, c));
            sets.push(format!("{c} = {value}"));
            same.push(format!("{c} IS NOT DISTINCT FROM {value}"));
        }
        if let Some(c) = self.col(Field::DurationS) {
            // An integer column holds whole seconds; a missing duration never overwrites a known one.
            let arg = match self.column(c).map(|column| column.class) {
                #[allow(clippy::cast_possible_truncation)] // seconds of a recording fit easily
                Some(Class::Integer) => Arg::Int(duration_s.map(|seconds| seconds.round() as i64)),
                _ => Arg::Float(duration_s),
            };
            let value = statement.arg(arg);
            let value = format!("COALESCE({}, {c})", self.typed(&value, c));
            sets.push(format!("{c} = {value}"));
            same.push(format!("{c} IS NOT DISTINCT FROM {value}"));
        }
        if sets.is_empty() {
            return Ok(());
        }
        self.touch(&mut sets);
        let filter = self.where_id(&mut statement, id);
        statement.sql =
            format!("UPDATE {} SET {} WHERE {filter} AND NOT ({})", self.table, sets.join(", "), same.join(" AND "));
        self.execute(&statement, format!("writing media facts of recording {id}")).await.map(drop)
    }

    async fn read_column(&self, id: &str, column: &str) -> Result<Option<String>, StoreError> {
        if !is_identifier(column) || self.column(column).is_none() || !self.id_fits(id) {
            return Ok(None);
        }
        let mut statement = Statement::new(self.dialect);
        let filter = self.where_id(&mut statement, id);
        statement.sql = format!("SELECT CAST({column} AS TEXT) FROM {} WHERE {filter}", self.table);
        let row = statement
            .query()
            .fetch_optional(&self.pool)
            .await
            .map_err(database(format!("reading {column} of recording {id}")))?;
        row.map(|row| row.try_get::<Option<String>, _>(0))
            .transpose()
            .map(Option::flatten)
            .map_err(database(format!("decoding {column} of recording {id}")))
    }

    async fn persist(&self, id: &str, transcript: Option<&str>, result: &Value) -> Result<(), StoreError> {
        self.persist_columns(id, transcript, result, &IndexMap::new()).await
    }

    async fn persist_columns(
        &self,
        id: &str,
        transcript: Option<&str>,
        result: &Value,
        columns: &IndexMap<String, Value>,
    ) -> Result<(), StoreError> {
        let mut statement = Statement::new(self.dialect);
        let (mut sets, mut same) = (Vec::new(), Vec::new());
        let status_column = self.status_column().to_string();
        let completed = self.layout.stored(RecordingStatus::Completed);
        let compare =
            |column: &str, value: &str| format!("CAST({column} AS TEXT) IS NOT DISTINCT FROM CAST({value} AS TEXT)");
        for (name, value) in columns.iter().filter(|(_, value)| !value.is_null()) {
            let column = self.column(name).filter(|_| is_identifier(name)).ok_or_else(|| {
                StoreError::Refused(format!("table {} has no column `{name}` (named in persist `columns`)", self.table))
            })?;
            if let Some(field) = self.layout.field_of(name).filter(|field| field.is_bookkeeping()) {
                return Err(StoreError::Refused(format!(
                    "column `{name}` holds the store's own `{}` field; persist `columns` cannot write it",
                    field.name()
                )));
            }
            let arg = self.column_arg(name, column, value)?;
            let placeholder = statement.arg(arg);
            let value = self.column_value(&placeholder, name, column);
            sets.push(format!("{name} = {value}"));
            same.push(compare(name, &value));
        }
        if let Some(c) = self.col(Field::Transcript) {
            let value = statement.text(transcript);
            let value = format!("COALESCE({value}, {c})");
            sets.push(format!("{c} = {value}"));
            same.push(compare(c, &value));
        }
        if let Some(c) = self.col(Field::Result) {
            let value = statement.text(Some(&result.to_string()));
            let value = self.typed(&value, c);
            sets.push(format!("{c} = {value}"));
            same.push(compare(c, &value));
        }
        sets.push(format!("{status_column} = '{completed}'"));
        if let Some(c) = self.col(Field::Progress) {
            sets.push(format!("{c} = 100"));
        }
        if let Some(c) = self.col(Field::Stage) {
            sets.push(format!("{c} = NULL"));
        }
        if let Some(c) = self.col(Field::Message) {
            sets.push(format!("{c} = 'completed'"));
        }
        if let Some(c) = self.col(Field::Error) {
            // A retry that succeeds clears the failure it followed.
            sets.push(format!("{c} = NULL"));
        }
        self.touch(&mut sets);
        if let Some(c) = self.col(Field::CompletedAt) {
            sets.push(format!("{c} = COALESCE({c}, {})", self.now()));
        }
        if !self.id_fits(id) {
            return Err(StoreError::NotFound(id.to_string()));
        }
        let filter = self.where_id(&mut statement, id);
        same.insert(0, format!("{status_column} = '{completed}'"));
        statement.sql = format!(
            "UPDATE {} SET {} WHERE {filter} AND {status_column} IN ({}) AND NOT ({})",
            self.table,
            sets.join(", "),
            quoted(&self.layout.allowed_from(RecordingStatus::Completed)),
            same.join(" AND ")
        );
        if self.execute(&statement, format!("storing results of recording {id}")).await? > 0 {
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

    #[test]
    fn column_types_are_classified() {
        let class = |sql: &str| Column::new(sql).class;
        assert_eq!(class("uuid"), Class::Parsed);
        assert_eq!(class("integer"), Class::Integer);
        assert_eq!(class("INTEGER"), Class::Integer);
        assert_eq!(class("bigint"), Class::Integer);
        assert_eq!(class("numeric(10,2)"), Class::Float);
        assert_eq!(class("double precision"), Class::Float);
        assert_eq!(class("jsonb"), Class::Json);
        assert_eq!(class("text[]"), Class::Array);
        assert_eq!(class("character varying(255)"), Class::Text);
        assert_eq!(class("boolean"), Class::Bool);
        assert_eq!(class("timestamp with time zone"), Class::Parsed);
        assert_eq!(class(""), Class::Text);
        assert_eq!(class("interval"), Class::Parsed);
        assert_eq!(class("point"), Class::Parsed);
    }
}
