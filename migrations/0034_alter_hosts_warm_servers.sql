-- Warm servers the host's agent reported ready in its last heartbeat, less
-- the ones placement has taken since; placement prefers hosts with one.
ALTER TABLE hosts
    ADD COLUMN IF NOT EXISTS warm_servers INT UNSIGNED NOT NULL DEFAULT 0
