"""Reading raw answers with h11 as the client: a second, independent HTTP/1.1 implementation."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field

import h11
from support import host_port


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    interim: list[int] = field(default_factory=list)
    """Status codes of the 1xx responses that came before this one (100 Continue)."""


def parse_answers(methods: Iterable[str], received: bytes) -> tuple[list[Answer], bytes]:
    """The answers in `received` (everything the server sent until it closed), one per request
    method in `methods` (HEAD answers have no body), and the bytes left after the answer that
    closed the connection. Stops at the close, or when `methods` runs out."""
    client = h11.Connection(h11.CLIENT)
    client.receive_data(received)
    client.receive_data(b"")
    answers: list[Answer] = []
    for method in methods:
        client.send(h11.Request(method=method, target="/", headers=[("Host", "t")]))
        client.send(h11.EndOfMessage())
        answer = Answer(0, {}, b"")
        while True:
            event = client.next_event()
            if isinstance(event, h11.InformationalResponse):
                answer.interim.append(event.status_code)
            elif isinstance(event, h11.Response):
                answer.status = event.status_code
                answer.headers = {
                    name.decode().lower(): value.decode("latin-1") for name, value in event.headers
                }
            elif isinstance(event, h11.Data):
                answer.body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:  # ConnectionClosed: the server closed without answering this request
                return answers, b""
        answers.append(answer)
        if client.their_state is h11.MUST_CLOSE:
            break
        client.start_next_cycle()
    leftover, _ = client.trailing_data
    return answers, leftover


async def read_until_closed(url: str, data: bytes, timeout: float = 10) -> bytes:
    """Send `data` on a fresh connection and read everything until the server closes it."""
    reader, writer = await asyncio.open_connection(*host_port(url))
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
