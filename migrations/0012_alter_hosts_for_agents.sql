-- Hosts run the agent: a HostKey (only its SHA-256 digest is kept), what the
-- host offers, and what its last heartbeat said. `state` is online/offline
-- by heartbeat; `draining` is the owner's wish for no new sessions.
ALTER TABLE hosts
    ADD COLUMN key_digest BINARY(32) NULL,
    ADD COLUMN key_revoked_at DATETIME(6) NULL,
    ADD COLUMN draining BOOLEAN NOT NULL DEFAULT FALSE,
    ADD COLUMN max_sessions INT UNSIGNED NOT NULL DEFAULT 0,
    ADD COLUMN cpu_cores DOUBLE NOT NULL DEFAULT 0,
    ADD COLUMN memory_mib BIGINT UNSIGNED NOT NULL DEFAULT 0,
    ADD COLUMN port_first SMALLINT UNSIGNED NOT NULL DEFAULT 0,
    ADD COLUMN port_last SMALLINT UNSIGNED NOT NULL DEFAULT 0,
    ADD COLUMN cgroup_limits BOOLEAN NOT NULL DEFAULT FALSE,
    ADD COLUMN agent_version VARCHAR(64) NOT NULL DEFAULT '',
    ADD COLUMN registered_at DATETIME(6) NULL,
    ADD COLUMN last_heartbeat_at DATETIME(6) NULL,
    ADD COLUMN cpu_percent DOUBLE NOT NULL DEFAULT 0,
    ADD COLUMN memory_used_mib BIGINT UNSIGNED NOT NULL DEFAULT 0,
    ADD COLUMN memory_total_mib BIGINT UNSIGNED NOT NULL DEFAULT 0,
    ADD COLUMN disk_free_mib BIGINT UNSIGNED NOT NULL DEFAULT 0,
    ADD UNIQUE KEY hosts_key_digest (key_digest),
    ADD KEY hosts_heartbeat (state, last_heartbeat_at)
