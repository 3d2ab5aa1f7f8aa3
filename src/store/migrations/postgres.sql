-- echo-worker recordings table, PostgreSQL dialect (Supabase included). {table} is the configured table name.
CREATE TABLE IF NOT EXISTS {table} (
    id           TEXT PRIMARY KEY,
    file_url     TEXT,
    file_name    TEXT,
    mime_type    TEXT,
    size_bytes   BIGINT,
    duration_s   DOUBLE PRECISION,
    status       TEXT NOT NULL DEFAULT 'pending'
                 CHECK (status IN ('pending', 'queued', 'processing', 'completed', 'failed', 'cancelled')),
    progress     BIGINT NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 100),
    stage        TEXT,
    message      TEXT,
    job_id       TEXT,
    pipeline     TEXT,
    transcript   TEXT,
    result       JSONB,
    error        TEXT,
    owner_id     TEXT,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    completed_at TIMESTAMPTZ
);
CREATE INDEX IF NOT EXISTS {index}_status ON {table} (status, updated_at);
