-- Notebook sessions: one Jupyter server on one host for one project.
-- Ended sessions (lost, stopped) stay in the route table as tombstones for
-- an hour; `routes_removed_at` records when their RemoveSession was published.
CREATE TABLE IF NOT EXISTS sessions (
    sid CHAR(26) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
    project_id BIGINT UNSIGNED NOT NULL,
    user_id BIGINT UNSIGNED NOT NULL,
    host_id BIGINT UNSIGNED NOT NULL,
    port SMALLINT UNSIGNED NOT NULL,
    upstream_token VARCHAR(100) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    state ENUM('starting', 'running', 'lost', 'stopped') NOT NULL DEFAULT 'starting',
    created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    ended_at DATETIME(6) NULL,
    end_reason VARCHAR(64) NULL,
    last_activity_at DATETIME(6) NULL,
    bytes_in BIGINT UNSIGNED NOT NULL DEFAULT 0,
    bytes_out BIGINT UNSIGNED NOT NULL DEFAULT 0,
    routes_removed_at DATETIME(6) NULL,
    KEY sessions_user (user_id, created_at),
    KEY sessions_host (host_id, state),
    KEY sessions_project (project_id),
    KEY sessions_tombstones (routes_removed_at, ended_at),
    CONSTRAINT sessions_project_fk FOREIGN KEY (project_id) REFERENCES projects (id),
    CONSTRAINT sessions_user_fk FOREIGN KEY (user_id) REFERENCES users (id),
    CONSTRAINT sessions_host_fk FOREIGN KEY (host_id) REFERENCES hosts (id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci
