-- Sessions are reached by sid through their host's link: no port of their
-- own, and no upstream token (the Jupyter server trusts its link).
ALTER TABLE sessions
    DROP COLUMN port,
    DROP COLUMN upstream_token
