"""Fault injection for the durability tests: crash at a precise point of the flush.

Read once at import; when the variable is unset (always, in production) each point is one
comparison on the flush path, never on the request path.
"""

from __future__ import annotations

import os

_CRASH_AFTER_COMMITS = int(os.environ.get("INCREMENTER_FAULT_CRASH_AFTER_COMMITS", "0"))


def after_commit(commits: int) -> None:
    """Simulate a crash after the database committed a batch, before the WAL was recycled."""
    if _CRASH_AFTER_COMMITS and commits >= _CRASH_AFTER_COMMITS:
        os._exit(137)
