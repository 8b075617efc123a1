-- Machines that serve sessions. The agent issue adds the HostKey columns;
-- until then rows are made by sessions::register_external (tests, dev).
CREATE TABLE IF NOT EXISTS hosts (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    owner_id BIGINT UNSIGNED NOT NULL,
    name VARCHAR(100) NOT NULL,
    address VARCHAR(255) NOT NULL,
    health_url VARCHAR(500) NOT NULL,
    state ENUM('online', 'draining', 'offline') NOT NULL DEFAULT 'offline',
    created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    updated_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    KEY hosts_owner (owner_id, address),
    CONSTRAINT hosts_owner_fk FOREIGN KEY (owner_id) REFERENCES users (id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci
