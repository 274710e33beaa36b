-- depends: 0003.counters-hot-updates
-- Reads of a counter add the deltas isolated for overflow: find them by key, not by a scan.
CREATE INDEX counter_overflows_key ON counter_overflows (key);
