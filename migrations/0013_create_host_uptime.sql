-- Seconds each host was online per UTC day, added up from heartbeats, for
-- the 30-day uptime on My hosts.
CREATE TABLE IF NOT EXISTS host_uptime (
    host_id BIGINT UNSIGNED NOT NULL,
    day DATE NOT NULL,
    online_seconds DOUBLE NOT NULL DEFAULT 0,
    PRIMARY KEY (host_id, day),
    CONSTRAINT host_uptime_host_fk FOREIGN KEY (host_id) REFERENCES hosts (id) ON DELETE CASCADE
) ENGINE = InnoDB
