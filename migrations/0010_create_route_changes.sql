-- One row per route table version: the JSON list of changes (protocol
-- `Change`) that takes the table from version - 1 to version. Pruned after
-- an hour, always keeping the latest 10 000.
CREATE TABLE IF NOT EXISTS route_changes (
    version BIGINT UNSIGNED NOT NULL PRIMARY KEY,
    changes MEDIUMTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    KEY route_changes_created (created_at)
) ENGINE = InnoDB
