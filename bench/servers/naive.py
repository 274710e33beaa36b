"""The naive baseline: the counter service a user would write first, to compare the design against.

asyncio streams, `json.loads`, one asyncpg pool, and one `INSERT ... ON CONFLICT DO UPDATE` per
increment, awaited before the 202. Nothing is buffered, so nothing acknowledged can be lost; the
price is that every request waits for a database round trip and a commit, and hot keys serialise on
their row locks.

    .venv/bin/python -m bench.servers.naive --port 0 --database-url postgresql://root@127.0.0.1:5432/DB

Logs `naive: listening on http://HOST:PORT` on stderr; stops at SIGTERM or SIGINT. Routes:
POST /increment, POST /increments (one upsert per item, in one transaction), GET /metrics
(`naive_accepted_increments_total`). bench.run starts it as the naive target.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from typing import Any

import asyncpg

from bench.servers.signals import until_stopped

CREATE = "CREATE TABLE IF NOT EXISTS counters (key TEXT PRIMARY KEY, value BIGINT NOT NULL)"
UPSERT = (
    "INSERT INTO counters (key, value) VALUES ($1, $2)"
    " ON CONFLICT (key) DO UPDATE SET value = counters.value + excluded.value"
)


def response(status: str, body: bytes = b"", content_type: bytes = b"text/plain") -> bytes:
    return (
        b"HTTP/1.1 %s\r\nServer: naive\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
        % (status.encode(), content_type, len(body))
    ) + body


ACCEPTED = response("202 Accepted")
BAD_REQUEST = response("400 Bad Request", b"bad request\n")
NOT_FOUND = response("404 Not Found", b"not found\n")
UNAVAILABLE = response("503 Service Unavailable", b"database error\n")


class NaiveCounters:
    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.accepted = 0

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One keep-alive connection: read a request, answer it, repeat until the client leaves."""
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *lines = head.decode("latin-1").split("\r\n")
                method, path, _version = request_line.split(" ", 2)
                headers = {}
                for line in lines:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length") or 0))
                writer.write(await self.respond(method, path, body))
                if headers.get("connection", "").lower() == "close":
                    break
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
            ValueError,
        ):
            pass
        finally:
            writer.close()

    async def respond(self, method: str, path: str, body: bytes) -> bytes:
        if method == "POST" and path in ("/increment", "/increments"):
            try:
                payload = json.loads(body)
                items = payload if path == "/increments" else [payload]
                pairs = sorted((str(item["key"]), int(item["value"])) for item in items)
            except (ValueError, TypeError, KeyError):
                return BAD_REQUEST
            try:
                if len(pairs) == 1:
                    await self.pool.execute(UPSERT, *pairs[0])
                else:
                    # Sorted keys, so two batches never lock the same rows in opposite order.
                    await self.pool.executemany(UPSERT, pairs)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                return UNAVAILABLE
            self.accepted += len(pairs)
            return ACCEPTED
        if method == "GET" and path == "/metrics":
            text = f"naive_accepted_increments_total {self.accepted}\n".encode()
            return response("200 OK", text)
        return NOT_FOUND


async def serve(host: str, port: int, database_url: str, pool_size: int) -> None:
    pool = await asyncpg.create_pool(database_url, min_size=pool_size, max_size=pool_size)
    await pool.execute(CREATE)
    app = NaiveCounters(pool)
    server = await asyncio.start_server(app.connection, host, port, backlog=4096)
    bound = server.sockets[0].getsockname()
    print(f"naive: listening on http://{bound[0]}:{bound[1]}", file=sys.stderr, flush=True)
    await until_stopped()
    server.close()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(server.wait_closed(), 5)
    await pool.close()
    print(f"naive: stopped, {app.accepted} increments accepted", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.servers.naive", description=__doc__.split("\n", 1)[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3334)
    parser.add_argument("--database-url", required=True)
    parser.add_argument(
        "--pool-size",
        type=int,
        default=32,
        help="Database connections; 32 matches wrk -c32, so no request queues.",
    )
    args = parser.parse_args()
    try:
        import uvloop  # the same event loop as the service: compare designs, not loops
    except ImportError:
        asyncio.run(serve(args.host, args.port, args.database_url, args.pool_size))
    else:
        uvloop.run(serve(args.host, args.port, args.database_url, args.pool_size))


if __name__ == "__main__":
    main()
