"""The run directory of a `--workers` group (`<data-dir>/run`): what its processes share.

- `metrics/`: prometheus-client's multiprocess files, one set per process (metrics_files.py);
- `ready/worker-N.json`: each worker's readiness, as it last published it (member.py).

The supervisor empties it when the group starts and removes a worker's live gauges and readiness
when it reaps it (prometheus-client's mark_process_dead, given the ident the files are named
by), so /metrics keeps no stale gauge of a dead worker; the counters of a dead worker stay, as
their counts happened, and are counted once: the restarted worker writes files of a new ident.
The readiness file doubles as the worker's heartbeat: its event loop rewrites it four times a
second, so its age says how long the loop has been stuck (the supervisor's watchdog reads it).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from prometheus_client.multiprocess import mark_process_dead


def metrics_dir(run_dir: Path) -> Path:
    return run_dir / "metrics"


def ready_dir(run_dir: Path) -> Path:
    return run_dir / "ready"


def ready_file(run_dir: Path, index: int) -> Path:
    return ready_dir(run_dir) / f"worker-{index}.json"


def reset(run_dir: Path) -> None:
    """A new group starts with no figures: the files of an earlier group would be summed in."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(mode=0o700, parents=True)  # owner only, like the data dir it sits in
    metrics_dir(run_dir).mkdir(mode=0o700)
    ready_dir(run_dir).mkdir(mode=0o700)


def forget(run_dir: Path, ident: str, index: int) -> None:
    """A worker process has exited: drop its live gauges and its readiness; its counters stay."""
    mark_process_dead(ident, str(metrics_dir(run_dir)))  # type: ignore[no-untyped-call]
    ready_file(run_dir, index).unlink(missing_ok=True)


def heartbeat(run_dir: Path, index: int) -> float | None:
    """When worker `index` last published (wall clock), None if it has not."""
    try:
        return os.stat(ready_file(run_dir, index)).st_mtime
    except FileNotFoundError:
        return None
