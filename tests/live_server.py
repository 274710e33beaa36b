"""A server as an operator runs it (a subprocess, API keys required) and a load to watch it by."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from support import Spawned, add_api_key, sqlite_server


@contextlib.contextmanager
def keyed_server(tmp_path: Path, *args: str) -> Iterator[tuple[Spawned, str]]:
    """`incrementer serve --auth required` on SQLite in tmp_path, and a key it accepts."""
    database_url = f"sqlite:///{tmp_path / 'counters.db'}"
    # On a loop of its own, in a thread: the async tests that use this run theirs already.
    with ThreadPoolExecutor(1) as seeding:
        key = seeding.submit(asyncio.run, add_api_key(database_url, "operator")).result()
    with sqlite_server(tmp_path, "--auth", "required", *args) as (server, _):
        yield server, key


async def load_while(url: str, key: str, stop: asyncio.Event, clients: int = 4) -> int:
    """POST increments with the key, from `clients` connections, until `stop`; how many got 202
    (any other answer fails the test)."""
    accepted = 0

    async def client(index: int) -> None:
        nonlocal accepted
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=url, headers=headers) as http:
            i = 0
            while not stop.is_set():
                batch = [{"key": f"load-{index}-{(i + n) % 50}", "value": 1} for n in range(20)]
                response = await http.post("/increments", json=batch)
                assert response.status_code == 202, response.text
                accepted += len(batch)
                i += 1
                await asyncio.sleep(0.01)

    await asyncio.gather(*(client(i) for i in range(clients)))
    return accepted
