"""Before a script measures anything: the tools it drives and PostgreSQL, or one message saying
what is missing and how to get it (exit status 2)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from bench.harness import database, machine


def check(prog: str, tools: Sequence[str] = machine.TOOLS) -> str | None:
    """PostgreSQL's version when `tools` and the database are there; otherwise None, having said
    on stderr what is missing."""
    return asyncio.run(check_async(prog, tools))


async def check_async(prog: str, tools: Sequence[str] = machine.TOOLS) -> str | None:
    """check() for a caller already on the event loop."""
    missing = [tool for tool in tools if machine.which(tool) is None]
    if missing:
        print(f"{prog}: missing {', '.join(missing)}.\n\n{machine.INSTALL_HINT}", file=sys.stderr)
        return None
    try:
        return await database.server_version()
    except (OSError, TimeoutError, *database.ERRORS) as exc:
        print(
            f"{prog}: PostgreSQL unreachable at {database.ADMIN_URL}: {exc}\n"
            "Start it, or point BENCH_PG_ADMIN_URL at a database the benchmark may use to "
            "create and drop databases.",
            file=sys.stderr,
        )
        return None
