"""HTTP/1.1 on a connection of its own, with nothing between the harness and the target: /metrics
scrapes and the requests that fill a server before a measurement."""

from __future__ import annotations

import asyncio
import contextlib

TIMEOUT = 5.0


def address(url: str) -> tuple[str, int]:
    """(host, port) of `http://HOST:PORT`."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host.strip("[]"), int(port)


async def accepts(url: str) -> bool:
    """Whether something listens at `url` (the connection is closed at once)."""
    try:
        _, writer = await asyncio.open_connection(*address(url))
    except OSError:
        return False
    await _close(writer)
    return True


async def request(
    url: str,
    method: str,
    path: str,
    body: bytes = b"",
    api_key: str = "",
    timeout: float = TIMEOUT,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    """One request with `Connection: close`: status and body. A body goes as JSON; with
    `api_key`, `Authorization: Bearer` it (/metrics needs a key when the service runs with auth);
    `headers` are added as they are."""
    auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
    auth += "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    content = f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n" if body else ""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(*address(url))
        try:
            writer.write(
                f"{method} {path} HTTP/1.1\r\nHost: bench\r\n{auth}{content}"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            raw = await reader.read(-1)
        finally:
            await _close(writer)
    head, _, answer = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, answer


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
