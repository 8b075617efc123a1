-- Metering: seconds accounted so far (paid or written off when the balance
-- ran out), the host owner's share and the package limits in force when
-- the session was opened.
ALTER TABLE sessions
    ADD COLUMN metered_seconds BIGINT UNSIGNED NOT NULL DEFAULT 0,
    ADD COLUMN unpaid_seconds BIGINT UNSIGNED NOT NULL DEFAULT 0,
    ADD COLUMN host_share_percent TINYINT UNSIGNED NOT NULL DEFAULT 0,
    ADD COLUMN cpu_limit_cores DECIMAL(5, 2) NULL,
    ADD COLUMN memory_limit_mib INT UNSIGNED NULL,
    ADD KEY sessions_metering (state, ready_at)
