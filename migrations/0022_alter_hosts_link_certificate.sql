-- The host link is mutual TLS under control's host CA: the route table pins
-- each host's current certificate by its SHA-256 (NULL until its agent
-- registers, and again after its HostKey is rotated or revoked). The HMAC
-- link key it replaces goes.
ALTER TABLE hosts
    ADD COLUMN link_cert_sha256 CHAR(64) NULL,
    DROP COLUMN link_key
