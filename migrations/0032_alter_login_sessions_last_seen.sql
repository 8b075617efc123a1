-- When the login last made a request (updated at most once a minute), for
-- the number of users online on the admin overview and in /metrics.
ALTER TABLE login_sessions
    ADD COLUMN last_seen_at DATETIME(6) NULL,
    ADD KEY login_sessions_seen (last_seen_at)
