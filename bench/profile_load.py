"""Profile the service's event loop under wrk load with py-spy, and rank where its time goes.

    .venv/bin/python -m bench.profile_load [--scenario 100kkeys] [--durability wal] [--seconds 10]
    .venv/bin/python -m bench.profile_load --summarize stacks.txt   # an existing py-spy raw file

Starts incrementer on a fresh database, drives it with the benchmark's wrk script, attaches
`py-spy record --native --idle --format raw` to it for --seconds once the load is warm, and prints
two rankings of the event-loop thread's samples: by "self" (the deepest Python frame of a sample,
which includes the C it called: a transport write counts for the function that wrote) and by
"inclusive" (samples a function was anywhere on the stack). Samples spent waiting in epoll are
reported as idle. Needs py-spy (`.venv/bin/pip install py-spy`) and permission to ptrace.

py-spy pauses the process for each sample: throughput under the profiler is lower than in a
benchmark run. Read the shares, not the rates.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

from bench.harness import database
from bench.harness.load import Load, run_wrk
from bench.harness.paths import WORK
from bench.harness.targets import Target, running

LOOP_MARKER = "Runner.run (asyncio/runners.py"  # frames of the event-loop thread
IDLE_LEAVES = ("epoll_wait", "epoll_pwait")
WARMUP = 3.0


def frame_name(frame: str) -> str:
    """`func (pkg/file.py:123)` -> `pkg/file.py:func`; native frames stay as they are."""
    func, _, where = frame.rpartition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    return f"{path}:{func}" if path.endswith(".py") else frame


def is_python(frame: str) -> bool:
    return ".py:" in frame and not frame.startswith("<module>")


def summarize(raw: str, top: int = 25) -> str:
    loop_samples = idle = 0
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    native_leaf: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if LOOP_MARKER not in stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        loop_samples += count
        leaf = frames[-1].split(" (")[0]
        if leaf in IDLE_LEAVES:
            idle += count
            continue
        # Below Runner.run: what the loop does. Above it: click and the CLI, the same in every sample.
        start = next(i for i, f in enumerate(frames) if f.startswith(LOOP_MARKER)) + 1
        loop_frames = frames[start:] or ["(the loop itself)"]
        python = [frame_name(f) for f in loop_frames if is_python(f)]
        owner = python[-1] if python else "(uvloop/libuv internals, no Python frame)"
        self_time[owner] += count
        for name in set(python):
            inclusive[name] += count
        if not is_python(loop_frames[-1]):
            native_leaf[leaf] += count
    if not loop_samples:
        return "no samples of the event-loop thread found"
    busy = loop_samples - idle

    def table(counter: Counter[str], title: str) -> list[str]:
        rows = [f"{title}", "", "| share of busy | samples | function |", "|---:|---:|---|"]
        for name, count in counter.most_common(top):
            rows.append(f"| {100 * count / busy:5.1f}% | {count} | `{name}` |")
        return [*rows, ""]

    lines = [
        f"Event-loop thread: {loop_samples} samples, {idle} idle in epoll "
        f"({100 * idle / loop_samples:.1f}%), {busy} busy.",
        "",
        *table(self_time, "By self (deepest Python frame, with the C it called):"),
        *table(inclusive, "Inclusive (anywhere on the stack):"),
        *table(native_leaf, "Native leaf (C function or syscall at the top of the stack):"),
    ]
    return "\n".join(lines)


async def profile(args: argparse.Namespace, out: Path) -> str:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    target = Target(f"incrementer-{args.durability}", "incrementer", args.durability)
    run_id = "p" + uuid.uuid4().hex[:6]
    with tempfile.TemporaryDirectory(prefix="incrementer-profile-") as tmp:
        async with (
            database.fresh_database(target.name) as url,
            running(target, Path(tmp), url) as server,
        ):
            spec = Load(
                server.url,
                args.scenario,
                f"{run_id}-",
                42,
                args.seconds + 2 * WARMUP,
                args.connections,
            )
            load = asyncio.create_task(run_wrk(spec))
            await asyncio.sleep(WARMUP)
            started = time.monotonic()
            spy = await asyncio.create_subprocess_exec(
                py_spy, "record", "--pid", str(server.pid), "--duration", str(int(args.seconds)),
                "--rate", str(args.rate), "--native", "--idle", "--format", "raw",
                "--output", str(out), stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            spy_out, _ = await asyncio.wait_for(spy.communicate(), args.seconds + 60)
            result = await load
            if spy.returncode != 0:
                raise SystemExit(f"py-spy failed ({spy.returncode}):\n{spy_out.decode()}")
            return (
                f"{args.scenario}, durability {args.durability}, wrk -t1 -c{args.connections}: "
                f"{result.rps:,.0f} req/s under the profiler (p99 {result.latency_ms['p99']:.2f} "
                f"ms); py-spy {args.rate} Hz for {time.monotonic() - started:.0f} s.\n"
            )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile_load", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--scenario", default="100kkeys", choices=("10keys", "100kkeys", "batch"))
    parser.add_argument("--durability", default="wal", choices=("memory", "wal", "wal-fsync"))
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--output", type=Path, help="where to keep the raw stacks")
    parser.add_argument("--summarize", type=Path, help="only summarize this py-spy raw file")
    args = parser.parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize.read_text(), args.top))
        return 0
    out = args.output or WORK / f"profile-{args.scenario}-{args.durability}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    header = asyncio.run(profile(args, out))
    print(header)
    print(summarize(out.read_text(), args.top))
    print(f"\nraw stacks: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
