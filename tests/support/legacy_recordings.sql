-- The live frontend's Supabase `recordings` table, from the column list in old-worker.md §4 (the data dump's
-- INSERT column list and scripts/database/*.sql): real names and types, and the original CHECK on status
-- (complete-database-fix.sql:46). `{table}` is replaced by the test's schema-qualified name.
CREATE TABLE {table} (
    id                   UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id              UUID,
    title                TEXT NOT NULL DEFAULT 'Untitled',
    description          TEXT,
    file_url             TEXT,
    file_type            TEXT CHECK (file_type IN ('audio', 'video')),
    file_size            BIGINT,
    duration             INTEGER,
    status               TEXT NOT NULL DEFAULT 'uploading'
                         CHECK (status IN ('uploading', 'processing', 'completed', 'failed')),
    transcript           TEXT,
    summary              TEXT,
    ai_summary           TEXT,
    ai_next_steps        JSONB,
    ai_insights          JSONB,
    ai_generated_at      TIMESTAMPTZ,
    ai_moments           JSONB,
    coaching_evaluation  JSONB,
    processed_at         TIMESTAMPTZ,
    content_type         TEXT,
    enable_coaching      BOOLEAN DEFAULT true,
    error_message        TEXT,
    processing_progress  INTEGER DEFAULT 0,
    processing_metadata  JSONB,
    whisper_segments     JSONB,
    whisper_metadata     JSONB,
    updated_at           TIMESTAMPTZ DEFAULT now(),
    created_at           TIMESTAMPTZ DEFAULT now()
)
