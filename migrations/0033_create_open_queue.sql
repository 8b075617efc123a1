-- Opens waiting for room on a host, first come first served (issue 17).
-- A row is kept after it leaves the queue (outcome says how) so that its
-- owner's page can say what happened; `waiting_project_id` is set only
-- while it waits, which allows one waiting open per project.
CREATE TABLE IF NOT EXISTS open_queue (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    sid CHAR(26) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    project_id BIGINT UNSIGNED NOT NULL,
    user_id BIGINT UNSIGNED NOT NULL,
    waiting_project_id BIGINT UNSIGNED NULL,
    queued_at DATETIME(6) NOT NULL,
    -- When its owner last asked about it; one nobody asks about any more
    -- leaves the queue, so that nobody is charged for a session they left.
    last_seen_at DATETIME(6) NOT NULL,
    left_at DATETIME(6) NULL,
    outcome VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin NULL,
    UNIQUE KEY open_queue_sid (sid),
    UNIQUE KEY open_queue_waiting_project (waiting_project_id),
    KEY open_queue_order (queued_at, id),
    KEY open_queue_user (user_id, left_at),
    CONSTRAINT open_queue_project_fk FOREIGN KEY (project_id) REFERENCES projects (id),
    CONSTRAINT open_queue_user_fk FOREIGN KEY (user_id) REFERENCES users (id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci
