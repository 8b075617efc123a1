-- Every host a session was placed on, in order: the first placement and
-- each re-placement after a host refused or failed the start (issue 17).
CREATE TABLE IF NOT EXISTS session_placements (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    sid CHAR(26) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    attempt TINYINT UNSIGNED NOT NULL,
    host_id BIGINT UNSIGNED NOT NULL,
    warm BOOLEAN NOT NULL,
    placed_at DATETIME(6) NOT NULL,
    failed_at DATETIME(6) NULL,
    failure VARCHAR(200) NULL,
    UNIQUE KEY session_placements_attempt (sid, attempt),
    CONSTRAINT session_placements_host_fk FOREIGN KEY (host_id) REFERENCES hosts (id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci
