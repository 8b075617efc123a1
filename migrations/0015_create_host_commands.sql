-- Start and stop commands for agents, read by their long poll in id order.
-- What to start (token, limits) is read from the session row when the
-- command is fetched; commands whose session moved on are skipped.
CREATE TABLE IF NOT EXISTS host_commands (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    host_id BIGINT UNSIGNED NOT NULL,
    sid CHAR(26) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    action ENUM('start', 'stop') NOT NULL,
    created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    KEY host_commands_host (host_id, id),
    KEY host_commands_created (created_at),
    CONSTRAINT host_commands_host_fk FOREIGN KEY (host_id) REFERENCES hosts (id) ON DELETE CASCADE
) ENGINE = InnoDB
