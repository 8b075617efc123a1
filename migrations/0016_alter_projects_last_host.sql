-- Where the project last ran: its files are there until the project store
-- exists, so placement prefers that host.
ALTER TABLE projects
    ADD COLUMN last_host_id BIGINT UNSIGNED NULL
