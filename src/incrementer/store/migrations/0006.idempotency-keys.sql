-- depends: 0004.counter-overflows-by-key
-- Idempotency keys of applied batches (POST /increments with an Idempotency-Key). The flush that
-- applies a batch inserts its key in the same transaction and adds the batch's deltas only if
-- that insert wins, so a batch is applied once however often, and wherever, it was sent.
-- digest: hex SHA-256 of the batch's increments, to tell a retry from a reuse of the key.
-- Rows older than --idempotency-window are swept (by created_at).
CREATE TABLE idempotency_keys (
    key TEXT PRIMARY KEY,
    digest TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);
