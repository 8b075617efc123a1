-- Failed logins, for slowing down guessing per account+client and per
-- client. Kept in the database so every control replica sees the same count.
CREATE TABLE IF NOT EXISTS login_failures (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    email VARCHAR(254) NOT NULL,
    client_ip VARCHAR(45) CHARACTER SET ascii NOT NULL,
    failed_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    KEY login_failures_pair (email, client_ip, failed_at),
    KEY login_failures_client (client_ip, failed_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci
