"""One node's data directory: `datadir` (lock, node id, retired mark) and `retire` (apply a WAL
left behind, exactly once, without serving: `incrementer wal drain` and the start of a
`--workers` group). Nothing is imported here on purpose."""
