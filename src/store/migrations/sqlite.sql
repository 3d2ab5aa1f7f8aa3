-- echo-worker recordings table, SQLite dialect. {table} is the configured table name.
CREATE TABLE IF NOT EXISTS {table} (
    id           TEXT PRIMARY KEY,
    file_url     TEXT,
    file_name    TEXT,
    mime_type    TEXT,
    size_bytes   INTEGER,
    duration_s   REAL,
    status       TEXT NOT NULL DEFAULT 'pending'
                 CHECK (status IN ('pending', 'queued', 'processing', 'completed', 'failed', 'cancelled')),
    progress     INTEGER NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 100),
    stage        TEXT,
    message      TEXT,
    job_id       TEXT,
    pipeline     TEXT,
    transcript   TEXT,
    result       TEXT,
    error        TEXT,
    owner_id     TEXT,
    created_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    completed_at TEXT
);
CREATE INDEX IF NOT EXISTS {index}_status ON {table} (status, updated_at);
