"""The run directory of a `--workers` group (`<data-dir>/run`): what its processes share.

- `metrics/`: prometheus-client's multiprocess files, one set per process (metrics_files.py);
- `ready/worker-N.json`: each worker's readiness, as it last published it (member.py).

The supervisor empties it when the group starts and removes a worker's live gauges and readiness
when it reaps it; the counters of a dead worker stay, as their counts happened.
"""

from __future__ import annotations

import shutil
from pathlib import Path


def metrics_dir(run_dir: Path) -> Path:
    return run_dir / "metrics"


def ready_dir(run_dir: Path) -> Path:
    return run_dir / "ready"


def ready_file(run_dir: Path, index: int) -> Path:
    return ready_dir(run_dir) / f"worker-{index}.json"


def reset(run_dir: Path) -> None:
    """A new group starts with no figures: the files of an earlier group would be summed in."""
    shutil.rmtree(run_dir, ignore_errors=True)
    metrics_dir(run_dir).mkdir(parents=True)
    ready_dir(run_dir).mkdir()


def forget(run_dir: Path, ident: str, index: int) -> None:
    """A worker process has exited: drop its live gauges and its readiness; its counters stay."""
    for path in metrics_dir(run_dir).glob(f"gauge_live*_{ident}.db"):
        path.unlink(missing_ok=True)
    ready_file(run_dir, index).unlink(missing_ok=True)
