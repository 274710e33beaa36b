"""One worker of a `--workers` group: the service a lone process runs, started by supervisor.py.

    python -m incrementer.process.worker < spec.json

The supervisor writes the spec on stdin (stdin rather than arguments or the environment: the
settings hold the database URL, perhaps with a password, and arguments are visible to every user):
the worker's index and ident, the supervisor's pid, the run directory, the fd of the pipe that
says "ready", the fd of its end of the rate-limit budget channel (-1 when the limits are shared
through Redis instead) and the group's size, and the settings, already resolved, with this
worker's own data dir.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

PR_SET_PDEATHSIG = 1  # linux/prctl.h

log = logging.getLogger("incrementer")


def die_with_parent(supervisor: int) -> None:
    """SIGTERM this process when the supervisor dies, even by SIGKILL, so that no worker serves
    on alone: it then drains like any stopped worker. The check after it covers a supervisor
    that died before the request was made."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: member.Member notices within a second instead
    if os.getppid() != supervisor:
        sys.exit(0)


def main() -> None:
    spec: dict[str, Any] = json.loads(sys.stdin.read())
    die_with_parent(spec["supervisor"])
    # Imported after the parent-death request: these imports take most of a worker's start.
    import uvloop

    from incrementer import logs
    from incrementer.config import Settings
    from incrementer.ingest.wal import WalCorruptError
    from incrementer.node.datadir import DataDirError
    from incrementer.process.member import Member
    from incrementer.service import Service
    from incrementer.store.base import BackendError

    index = int(spec["index"])
    settings = Settings.build(spec["settings"])
    logs.configure(settings.log_level, settings.log_format, worker=index)
    member = Member(
        index,
        spec["ident"],
        Path(spec["run_dir"]),
        spec["supervisor"],
        spec["notify_fd"],
        spec["budget_fd"],
        spec["workers"],
    )
    service = Service(settings, member)
    try:
        uvloop.run(service.serve())
    except (DataDirError, WalCorruptError, BackendError, OSError) as exc:
        log.error("cannot start: %s", exc)
        sys.exit(2)  # the supervisor reads 2 as "cannot start", as the CLI's exit status says
    sys.exit(0 if service.clean else 1)


if __name__ == "__main__":
    main()
