"""From an accepted increment to the database: `durability.AckGate` decides when a 202 may leave
(per --durability), `flush.Flusher` writes the coalesced buffer exactly once, and
`keyed_batches.KeyedBatches` answers batches sent with an Idempotency-Key, and
`retention.BucketSweeper` deletes time buckets past --bucket-retention. Nothing is imported here
on purpose."""
