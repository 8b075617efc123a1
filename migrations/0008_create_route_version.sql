-- The route table's version counter: one row, locked (FOR UPDATE) by every
-- transaction that publishes a change, so commit order is version order.
CREATE TABLE IF NOT EXISTS route_version (
    id TINYINT UNSIGNED NOT NULL PRIMARY KEY,
    version BIGINT UNSIGNED NOT NULL
) ENGINE = InnoDB
