"""The container image's size and cold start: from `podman run` to the first 200 from /readyz.

    .venv/bin/python -m bench.container [--runs 5] [--results-dir bench/results]

Builds the Dockerfile with podman on the Debian 12 base (bench/harness/containers.py; a cached
build is quick), then, `--runs` times: a container on a new, empty volume (the first start of
an instance: SQLite database created and migrated, node id made) and, after a clean stop, a
second container on the same volume (a restart: nothing to migrate, an empty WAL to replay).
Each start is timed from just before `podman run` until /readyz answers 200, polled every 10 ms
on the host network. The report, with the image's size and its base's, goes to
<results-dir>/container-<YYYY-MM-DD-HHMM>.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
import urllib.error
import urllib.request
import uuid
from datetime import datetime
from pathlib import Path

from bench.harness.containers import BASE_IMAGE, IMAGE, Podman
from bench.harness.paths import RESULTS, WORK
from bench.harness.targets import free_port


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=1) as answer:
            return bool(answer.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def cold_start(podman: Podman, volume: str, timeout: float = 60) -> float:
    """Seconds from `podman run` to /readyz 200 for one container on `volume`; stopped after."""
    name, port = f"incrementer-bench-{uuid.uuid4().hex[:8]}", free_port()
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    podman.start(IMAGE, name, volume, {"INCREMENTER_PORT": str(port)})
    try:
        while not ready(url):
            if time.monotonic() - started > timeout:
                raise TimeoutError(podman.run("logs", name, check=False).stderr)
            time.sleep(0.01)
        seconds = time.monotonic() - started
        podman.run("stop", "--time=30", name, timeout=60)
        return seconds
    finally:
        podman.run("rm", "--force", "--time=0", name, check=False)


def measure(podman: Podman, runs: int) -> dict[str, list[float]]:
    seconds: dict[str, list[float]] = {"first start (empty volume)": [], "restart": []}
    for _ in range(runs):
        volume = f"incrementer-bench-{uuid.uuid4().hex[:8]}"
        podman.run("volume", "create", volume)
        try:
            seconds["first start (empty volume)"].append(cold_start(podman, volume))
            seconds["restart"].append(cold_start(podman, volume))
        finally:
            podman.run("volume", "rm", "--force", volume, check=False)
    return seconds


def report(podman: Podman, build_seconds: float, seconds: dict[str, list[float]]) -> str:
    size = podman.image_bytes(IMAGE) / 1e6
    base = podman.image_bytes(BASE_IMAGE) / 1e6
    lines = [
        f"# Container image {datetime.now():%Y-%m-%d %H:%M}",
        "",
        f"Command: `.venv/bin/python -m bench.container --runs {len(seconds['restart'])}`",
        "",
        f"Image `{IMAGE}` on `{BASE_IMAGE}` (Debian 12 minbase + python3, made by "
        "scripts/container-base), podman "
        f"{podman.run('version', '--format={{.Client.Version}}').stdout.strip()} with runc.",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| image size (uncompressed, as `podman images` shows it) | {size:.0f} MB |",
        f"| of which the base image | {base:.0f} MB |",
        f"| build time of this run (podman's layer cache may have served parts) | "
        f"{build_seconds:.0f} s |",
        "",
        "Cold start, `podman run` to the first `/readyz` 200 (SQLite default, host network, "
        "read-only root file system):",
        "",
        "| start | median | min | max | runs |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind, values in seconds.items():
        lines.append(
            f"| {kind} | {statistics.median(values):.2f} s | {min(values):.2f} s | "
            f"{max(values):.2f} s | {len(values)} |"
        )
    lines += [
        "",
        "The machine is shared (2 cores, other test suites running): the figures are upper "
        "bounds; the image size is exact.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    podman = Podman(WORK / "containers.conf")
    build_seconds = podman.build(IMAGE)
    text = report(podman, build_seconds, measure(podman, args.runs))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"container-{datetime.now():%Y-%m-%d-%H%M}.md"
    path.write_text(text)
    print(text)
    print(f"report: {path}")


if __name__ == "__main__":
    main()
