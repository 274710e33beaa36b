-- API keys, shared by every instance on this database. Only a SHA-256 of each key is kept;
-- key_id is the key's public prefix, used to find the row before the constant-time compare.
CREATE TABLE api_keys (
    name TEXT PRIMARY KEY,
    key_id TEXT NOT NULL UNIQUE,
    key_hash TEXT NOT NULL,
    rate DOUBLE PRECISION,
    burst BIGINT,
    created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    revoked_at TIMESTAMP
);
