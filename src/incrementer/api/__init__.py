"""The application behind the HTTP server: which route answers, and how.

`handler.App` is what the connections call (the fast path, routing, API key and rate limit
checks); the routes answer from their own modules: `increments` (POST /increment, POST
/increments), `reads` (GET /counters/{key}), `series` (GET /counters/{key}/series, counts per
time bucket), `listing` (GET /counters: many keys by name, by prefix or by rank), `readiness`
(GET /readyz, for one process or a `--workers` group), `pages` (/status, /openapi.json,
/metrics, /healthz). `routes` holds the table and the answers they share, `query` what the read
routes share (the query string, time windows, consistent reads). Nothing is imported here on purpose: the service builds the
parts (service.py).
"""
