"""The servers incrementer is compared with, each run as `python -m bench.servers.NAME`: lean (the
Python floor) and naive (one upsert per request)."""
