-- Provider events already applied: the unique key makes each one count
-- once, however often and late it is delivered.
CREATE TABLE IF NOT EXISTS payment_events (
    provider VARCHAR(16) CHARACTER SET ascii NOT NULL,
    event_id VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    order_id BIGINT UNSIGNED NOT NULL,
    event_type VARCHAR(100) CHARACTER SET ascii NOT NULL,
    received_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    PRIMARY KEY (provider, event_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci
