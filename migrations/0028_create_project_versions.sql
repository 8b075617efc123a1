-- Project snapshots (issue 15): one row per stored version of a project's
-- files. The object under `object_key` is in the project store; the row is
-- written only after the whole object arrived and its hash matched, so a
-- row always names a complete object. `damaged_at` marks a version an agent
-- found not matching its hash; it is never restored again.
CREATE TABLE IF NOT EXISTS project_versions (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    project_id BIGINT UNSIGNED NOT NULL,
    version BIGINT UNSIGNED NOT NULL,
    object_key VARCHAR(200) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    size_bytes BIGINT UNSIGNED NOT NULL,
    sha256 CHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    reason ENUM('autosave', 'save', 'stop', 'upload', 'restore') NOT NULL,
    sid CHAR(26) CHARACTER SET ascii COLLATE ascii_bin NULL,
    host_id BIGINT UNSIGNED NULL,
    created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    damaged_at DATETIME(6) NULL,
    UNIQUE KEY project_versions_version (project_id, version),
    UNIQUE KEY project_versions_object (object_key),
    CONSTRAINT project_versions_project_fk FOREIGN KEY (project_id) REFERENCES projects (id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci
