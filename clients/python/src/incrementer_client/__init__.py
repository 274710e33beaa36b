"""incrementer_client: send counts to an incrementer server, each applied exactly once.

    from incrementer_client import Client

    counts = Client("http://counters.internal:3333", api_key="ik_...")
    counts.incr("page:home")          # returns at once; sent within flush_interval
    counts.incr("api:calls:acme", 3)
    counts.read_many(["api:calls:acme"], "day")   # {"api:calls:acme": today's count}

Client sends from a background thread; AsyncClient from a task on the caller's event loop.
Both coalesce increments in memory and send them in batches to POST /increments, each batch
under its own Idempotency-Key and retried with it until acknowledged, so a timeout or a broken
connection never loses or doubles a count. `series()` and `read_many()` read back, one request
each (a server run with --buckets counts per minute, hour or day too).
"""

from incrementer_client._async import AsyncClient
from incrementer_client._batching import ClientStats, Full, Refused
from incrementer_client._reading import ReadError, Series
from incrementer_client._sync import Client

__all__ = ["AsyncClient", "Client", "ClientStats", "Full", "ReadError", "Refused", "Series"]
__version__ = "0.1.0"
