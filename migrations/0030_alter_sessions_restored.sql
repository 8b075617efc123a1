-- Which snapshot version a session's files were restored from, and when
-- that version was taken ("restored from the autosave of 4 minutes ago").
ALTER TABLE sessions
    ADD COLUMN restored_version BIGINT UNSIGNED NULL,
    ADD COLUMN restored_from_at DATETIME(6) NULL
