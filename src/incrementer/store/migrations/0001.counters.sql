-- Totals. Written only as deltas (value = value + delta), so any number of nodes may add to them.
CREATE TABLE counters (
    key TEXT PRIMARY KEY,
    value BIGINT NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
);

-- Exactly-once: the highest WAL batch seq each node has applied, written in the batch's transaction.
CREATE TABLE incrementer_nodes (
    node_id TEXT PRIMARY KEY,
    applied_seq BIGINT NOT NULL,
    updated_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
);

-- Deltas that would have pushed a counter outside signed 64-bit, kept exactly (decimal text)
-- instead of being dropped or blocking the other keys of their batch.
CREATE TABLE counter_overflows (
    node_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    key TEXT NOT NULL,
    delta TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (node_id, seq, key)
);
