"""Fault injection for the tests: crash at a precise point of the flush, hang a worker's loop.

Read once at import; when the variable is unset (always, in production) each point is one
comparison on the flush path or the worker's publish, never on the request path.
"""

from __future__ import annotations

import os

_CRASH_AFTER_COMMITS = int(os.environ.get("INCREMENTER_FAULT_CRASH_AFTER_COMMITS", "0"))


def after_commit(commits: int) -> None:
    """Simulate a crash after the database committed a batch, before the WAL was recycled."""
    if _CRASH_AFTER_COMMITS and commits >= _CRASH_AFTER_COMMITS:
        os._exit(137)


_HANG_FILE = os.environ.get("INCREMENTER_FAULT_HANG_FILE", "")


def hang_if_asked() -> None:
    """Simulate a worker whose event loop is stuck (the supervisor's watchdog must replace it):
    with INCREMENTER_FAULT_HANG_FILE=PATH, a worker for which `PATH.<its pid>` exists blocks its
    loop for good. Checked by the worker's periodic publish, never on the request path."""
    if _HANG_FILE and os.path.exists(f"{_HANG_FILE}.{os.getpid()}"):
        import time

        while True:
            time.sleep(3600)
