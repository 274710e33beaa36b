"""The `incrementer` command: `main` (the entry point: serve, migrate) and one module per
command family (`keys`, `wal`, `incr`, `top`); `options` turns Settings into flags, `errors`
into one-line failures. Nothing is imported here on purpose."""
