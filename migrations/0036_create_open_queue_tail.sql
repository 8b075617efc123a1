-- One row whose lock hands out places in the queue one at a time, so that
-- opens joining at the same moment get distinct, gapless positions.
CREATE TABLE IF NOT EXISTS open_queue_tail (
    id TINYINT UNSIGNED NOT NULL PRIMARY KEY,
    joined BIGINT UNSIGNED NOT NULL DEFAULT 0
) ENGINE = InnoDB
