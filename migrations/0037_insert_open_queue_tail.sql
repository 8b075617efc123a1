INSERT IGNORE INTO open_queue_tail (id, joined) VALUES (1, 0)
