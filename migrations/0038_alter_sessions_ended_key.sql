-- The queue's wait estimate reads the latest session ends.
ALTER TABLE sessions ADD KEY IF NOT EXISTS sessions_ended (ended_at)
