-- Revoked certificates of the federation's CA, by serial number (lowercase hex). Every call's
-- certificate is checked against this table, so a revocation takes effect on the next call,
-- without a restart. Serials are random 128-bit numbers, unique across federations.
-- The SQLite twin is sqlite/0003_revocations.sql.
CREATE TABLE revoked_certificates (
    serial     TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    reason     TEXT NOT NULL DEFAULT '',
    revoked_ms BIGINT NOT NULL
);
