-- Session data filtered by host, newest first, without scanning every
-- session (InnoDB appends the primary key, sid, for the tie-break).
ALTER TABLE sessions ADD KEY sessions_host_created (host_id, created_at)
