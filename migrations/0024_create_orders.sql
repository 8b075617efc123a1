-- A purchase: the package's price, currency and contents copied from the
-- database when ordered (never from the client), the provider's checkout
-- and payment references, and its state.
CREATE TABLE IF NOT EXISTS orders (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    user_id BIGINT UNSIGNED NOT NULL,
    package_id BIGINT UNSIGNED NOT NULL,
    package_name VARCHAR(100) NOT NULL,
    provider VARCHAR(16) CHARACTER SET ascii NOT NULL,
    checkout_ref VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NULL,
    payment_ref VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NULL,
    amount_minor BIGINT UNSIGNED NOT NULL,
    currency CHAR(3) CHARACTER SET ascii NOT NULL,
    compute_seconds BIGINT UNSIGNED NOT NULL,
    validity_days INT UNSIGNED NOT NULL,
    status ENUM('pending', 'paid', 'refunded') NOT NULL DEFAULT 'pending',
    last_failure VARCHAR(200) NULL,
    created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    paid_at DATETIME(6) NULL,
    refunded_at DATETIME(6) NULL,
    refund_ref VARCHAR(255) CHARACTER SET ascii NULL,
    UNIQUE KEY orders_checkout (provider, checkout_ref),
    KEY orders_user (user_id, created_at),
    KEY orders_status (status, paid_at),
    CONSTRAINT orders_user_fk FOREIGN KEY (user_id) REFERENCES users (id),
    CONSTRAINT orders_package_fk FOREIGN KEY (package_id) REFERENCES packages (id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci
