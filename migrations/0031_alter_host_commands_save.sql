-- The owner's "save now": a command for the running session's agent to
-- push its files.
ALTER TABLE host_commands
    MODIFY COLUMN action ENUM('start', 'stop', 'save') NOT NULL
