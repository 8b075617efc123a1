-- Sessions started by agents: stopping and failed states, the project a
-- live session holds (unique, so one project has at most one live
-- session), readiness, failure details, and Jupyter's own activity for the
-- idle culler. Keys for the Session data page's paging and filters.
ALTER TABLE sessions
    MODIFY COLUMN state ENUM('starting', 'running', 'lost', 'stopped', 'stopping', 'failed') NOT NULL DEFAULT 'starting',
    ADD COLUMN live_project_id BIGINT UNSIGNED NULL,
    ADD COLUMN ready_at DATETIME(6) NULL,
    ADD COLUMN spawn_ms INT UNSIGNED NULL,
    ADD COLUMN failure_detail TEXT NULL,
    ADD COLUMN kernel_activity_at DATETIME(6) NULL,
    ADD COLUMN busy_kernels INT UNSIGNED NOT NULL DEFAULT 0,
    ADD COLUMN stop_requested_at DATETIME(6) NULL,
    ADD UNIQUE KEY sessions_live_project (live_project_id),
    ADD KEY sessions_created (created_at, sid),
    ADD KEY sessions_state_created (state, created_at)
