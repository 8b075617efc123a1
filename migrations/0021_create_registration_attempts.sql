-- Registrations tried per client address (every attempt with well-formed
-- input, taken email or not), for registration throttling. Kept in the
-- database so every control replica sees the same count.
CREATE TABLE IF NOT EXISTS registration_attempts (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    client_ip VARCHAR(45) CHARACTER SET ascii NOT NULL,
    attempted_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    KEY registration_attempts_client (client_ip, attempted_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci
