-- Compute time a user holds: one lot per purchase or grant, with the
-- package's limits and validity. `seconds_left` caches the sum of the lot's
-- ledger entries (the drift check compares them). Money is in millionths
-- of the currency's minor unit ("micro"), so per-second use is exact.
CREATE TABLE IF NOT EXISTS lots (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    user_id BIGINT UNSIGNED NOT NULL,
    source ENUM('purchase', 'grant') NOT NULL,
    order_id BIGINT UNSIGNED NULL,
    package_id BIGINT UNSIGNED NULL,
    seconds_total BIGINT UNSIGNED NOT NULL,
    seconds_left BIGINT UNSIGNED NOT NULL,
    amount_micro BIGINT UNSIGNED NOT NULL DEFAULT 0,
    currency CHAR(3) CHARACTER SET ascii NULL,
    sessions_at_once INT UNSIGNED NOT NULL,
    cpu_cores DECIMAL(5, 2) NOT NULL,
    memory_mib INT UNSIGNED NOT NULL,
    expires_at DATETIME(6) NOT NULL,
    expired_at DATETIME(6) NULL,
    created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    UNIQUE KEY lots_order (order_id),
    KEY lots_user (user_id, expires_at),
    KEY lots_expiring (expired_at, expires_at),
    CONSTRAINT lots_user_fk FOREIGN KEY (user_id) REFERENCES users (id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci
