"""How a comparison server ends: at SIGTERM (the harness stopping it) or SIGINT (Ctrl+C)."""

from __future__ import annotations

import asyncio
import signal


async def until_stopped() -> None:
    """Return at the first SIGTERM or SIGINT; install the handlers on the running loop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
