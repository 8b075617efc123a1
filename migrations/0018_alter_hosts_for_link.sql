-- The host link: a host is reached through one link port, proved with a
-- link key control issues per host (NULL until its agent first registers,
-- and again after its HostKey is rotated). The per-session port range goes.
ALTER TABLE hosts
    DROP COLUMN port_first,
    DROP COLUMN port_last,
    ADD COLUMN link_port SMALLINT UNSIGNED NOT NULL DEFAULT 0,
    ADD COLUMN link_key CHAR(64) NULL
