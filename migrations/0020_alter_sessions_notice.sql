-- What the owner should know about a running session (e.g. a kernel the
-- OOM killer stopped), as a sentence; NULL when nothing.
ALTER TABLE sessions ADD COLUMN notice VARCHAR(300) NULL
