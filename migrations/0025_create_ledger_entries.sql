-- The ledger: append-only, one row per credit or debit with its cause.
-- Book `compute` is a customer's compute time (seconds, and the money
-- value those seconds carry); book `earnings` is what a host owner is owed.
-- Money in micro units (millionths of the minor unit), signed.
CREATE TABLE IF NOT EXISTS ledger_entries (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    user_id BIGINT UNSIGNED NOT NULL,
    book ENUM('compute', 'earnings') NOT NULL,
    kind ENUM('purchase', 'grant', 'usage', 'refund', 'expiry', 'revoke', 'earning', 'payout') NOT NULL,
    seconds BIGINT NOT NULL DEFAULT 0,
    amount_micro BIGINT NOT NULL DEFAULT 0,
    currency CHAR(3) CHARACTER SET ascii NULL,
    lot_id BIGINT UNSIGNED NULL,
    order_id BIGINT UNSIGNED NULL,
    sid CHAR(26) CHARACTER SET ascii COLLATE ascii_bin NULL,
    host_id BIGINT UNSIGNED NULL,
    actor_id BIGINT UNSIGNED NULL,
    reason VARCHAR(500) NULL,
    created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    KEY ledger_user (user_id, book, created_at),
    KEY ledger_lot (lot_id),
    KEY ledger_sid (sid),
    KEY ledger_host (host_id, created_at),
    KEY ledger_kind (kind, created_at),
    CONSTRAINT ledger_user_fk FOREIGN KEY (user_id) REFERENCES users (id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci
