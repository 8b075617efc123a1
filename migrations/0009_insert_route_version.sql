-- The counter row starts at version 0 (an empty table).
INSERT IGNORE INTO route_version (id, version) VALUES (1, 0)
