-- What each gateway last saw when it health-checked a host. Placement only
-- uses hosts every gateway can reach.
CREATE TABLE IF NOT EXISTS host_reachability (
    host_id BIGINT UNSIGNED NOT NULL,
    gateway VARCHAR(100) NOT NULL,
    reachable BOOLEAN NOT NULL,
    checked_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    PRIMARY KEY (host_id, gateway),
    CONSTRAINT host_reachability_host_fk FOREIGN KEY (host_id) REFERENCES hosts (id) ON DELETE CASCADE
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci
