"""The Python floor: the leanest uvloop + httptools + msgspec server that does the ingest job.

It decodes each increment and adds it to a dict, then answers 202; no validation beyond the types,
no WAL, no flush, no limits, no timeouts. No real service should ship this, but it measures what
Python's event loop and parser cost on this machine, so the benchmark can say how much of the gap
to nginx is the service's own code and how much is the runtime. bench.hotpath --lean and
bench.spread drive LeanProtocol in-process; bench.run starts this module as the python-lean target.

    .venv/bin/python -m bench.servers.lean [--host 127.0.0.1] [--port 3335]

Logs `lean: listening on http://HOST:PORT` on stderr, and stops at SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import httptools
import msgspec
import uvloop

from bench.servers.signals import until_stopped


class Increment(msgspec.Struct):
    key: str
    value: int


ACCEPTED = b"HTTP/1.1 202 Accepted\r\nServer: lean\r\nContent-Length: 0\r\n\r\n"
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nServer: lean\r\nContent-Length: 0\r\n\r\n"
decode_one = msgspec.json.Decoder(Increment).decode
decode_many = msgspec.json.Decoder(list[Increment]).decode
counters: dict[str, int] = {}


class LeanProtocol(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body = b""

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        body, self.body = self.body, b""
        try:
            items = decode_many(body) if self.url == b"/increments" else [decode_one(body)]
        except msgspec.DecodeError:
            self.transport.write(BAD_REQUEST)
            return
        for item in items:
            counters[item.key] = counters.get(item.key, 0) + item.value
        self.transport.write(ACCEPTED)


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(LeanProtocol, host, port, backlog=4096)
    print(f"lean: listening on http://{host}:{port}", file=sys.stderr, flush=True)
    await until_stopped()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.servers.lean", description=__doc__.split("\n", 1)[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3335)
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
