-- What customers buy. Prices are integers in the currency's minor unit.
-- Retired packages stay for the ledger but are no longer sold.
CREATE TABLE IF NOT EXISTS packages (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    name VARCHAR(100) NOT NULL,
    description VARCHAR(1000) NOT NULL DEFAULT '',
    price_minor BIGINT UNSIGNED NOT NULL,
    currency CHAR(3) CHARACTER SET ascii NOT NULL,
    compute_minutes INT UNSIGNED NOT NULL,
    max_concurrent_sessions INT UNSIGNED NOT NULL,
    cpu_cores DECIMAL(5, 2) NOT NULL,
    memory_mib INT UNSIGNED NOT NULL,
    storage_quota_mib INT UNSIGNED NOT NULL,
    validity_days INT UNSIGNED NOT NULL,
    retired BOOLEAN NOT NULL DEFAULT FALSE,
    created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    updated_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    UNIQUE KEY packages_name (name)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci
