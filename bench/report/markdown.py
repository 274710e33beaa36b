"""The markdown report: the command, the machine, the settings, the tables with how to read
them, the performance targets, every round, the notes and the plot's place."""

from __future__ import annotations

from pathlib import Path

from bench.harness.apply_batch import FlushResult
from bench.harness.measure import RunResult
from bench.report.cells import md_section, md_table
from bench.report.checks import Check
from bench.report.compare import totals_verified
from bench.report.tables import (
    AUTH_COLUMNS,
    COLUMNS,
    CPU_COLUMNS,
    auth_rows,
    cpu_rows,
    flush_lines,
    round_header,
    round_rows,
    rows,
)


def markdown(
    stamp: str,
    command: str,
    machine: dict[str, str],
    settings: dict[str, str],
    results: list[RunResult],
    every: list[RunResult],
    found: list[Check],
    plot: Path | None,
    flush: FlushResult | None = None,
    extra: list[str] | None = None,
) -> str:
    """`results`: one run per scenario and target (the median); `every`: all rounds;
    `extra`: more sections (markdown lines), before the targets."""
    verified, checked = totals_verified(every)
    parts = [
        f"# Benchmark {stamp}",
        "",
        "Command:",
        "",
        "```",
        command,
        "```",
        "",
        f"**Totals verified: {'yes' if verified == checked else 'NO'}** ({verified}/{checked} runs "
        "with a database: every acknowledged increment is in the database, nothing more than "
        "was sent).",
        "",
        "## Machine",
        "",
        md_table(["", ""], [[k, v] for k, v in machine.items()]),
        "",
        "## Settings",
        "",
        md_table(["", ""], [[k, v] for k, v in settings.items()]),
        "",
        "## Results",
        "",
        md_table(COLUMNS, rows(results, every)),
        "",
        "- req/s and p50/p99 latency: wrk, over the run. incr/s: req/s times the increments per "
        "request (1, or the batch size).",
        "- x nginx, x lean, x naive: req/s (with several rounds: the median of the per-round "
        "ratios) against nginx `return 202`, python-lean (the leanest uvloop + httptools + "
        "msgspec server coalescing into a dict, bench/servers/lean.py: what Python itself costs) "
        "and the naive one-upsert-per-request server (bench/servers/naive.py), measured in this "
        "same run.",
        "- lag p50/p99: `incrementer_persistence_lag_seconds` (age of the oldest increment of "
        "each batch at its commit), from the histogram's bucket deltas over the run, "
        "interpolated inside the bucket like PromQL `histogram_quantile`.",
        "- lag after load: from the end of the load until the database sum equalled the "
        "increments the service accepted (polled every 50 ms).",
        "- flush keys/s: dirty keys upserted per second spent in flushes "
        "(`incrementer_flush_keys_sum` / `incrementer_flush_duration_seconds_sum`).",
        "- totals verified: after SIGTERM, acknowledged <= database sum <= sent, and the sum "
        "equals the increments the service counted as accepted (wrk may stop before reading "
        "the answers to its last requests, so acknowledged can be a little below).",
        "",
        "### CPU per request",
        "",
        md_table(CPU_COLUMNS, cpu_rows(results)),
        "",
        "CPU seconds (user + kernel, from /proc) divided by the requests wrk completed: the "
        "server's process group over the load and the drain after it, the PostgreSQL backends "
        "connected to the run's database, and wrk itself. Server cores busy: server CPU seconds "
        "per second of load (1.00 = one core saturated; the event loop is one thread). "
        "Softirq: the kernel's network processing (loopback TCP for both ends); /proc/stat "
        "counts it apart, but it runs in the context of the processes and is mostly inside their "
        "kernel time already. Machine µs/req: every busy CPU second of the machine during the "
        "load (other tenants included) per request: the all-in cost that has to fit in the "
        "cores. Machine idle: share of all CPUs idle during the load. "
        "Increments per WAL write: WAL records / frames after the run, i.e. how many requests "
        "one event-loop tick's write() (and in wal-fsync one fdatasync) covered. Peak RSS: "
        "each server process's peak resident memory (VmHWM) at the end of the run, summed "
        "over its processes.",
        "",
        *_auth_section(results, every),
        *_flush_section(flush),
        *(extra or []),
        "## Performance targets",
        "",
        md_table(
            ["Target", "Goal", "Measured", "Result"],
            [[c.what, c.goal, c.measured, "pass" if c.passed else "**FAIL**"] for c in found],
        ),
        "",
    ]
    rounds = max((r.round_number for r in every), default=1)
    if rounds > 1:
        parts += ["## Every round", "", md_table(round_header(rounds), round_rows(every)), ""]
        parts += ["The tables above show each target's median round by req/s.", ""]
    notes = [(r, n) for r in every for n in ([r.error] if r.error else []) + r.notes]
    if notes:
        parts += ["## Notes", ""]
        parts += [
            f"- round {r.round_number}, {r.scenario} / {r.target.name}: {note.splitlines()[0]}"
            for r, note in notes
        ]
        parts.append("")
    if plot is not None:
        parts += ["## Over time", "", f"![throughput and lag over time]({plot.name})", ""]
    return "\n".join(parts)


def _auth_section(results: list[RunResult], every: list[RunResult]) -> list[str]:
    body = auth_rows(results, every)
    if not body:
        return []
    return md_section(
        "Auth on vs off",
        AUTH_COLUMNS,
        body,
        "incrementer-wal-auth is incrementer-wal with `--auth required`: every request sends "
        "`Authorization: Bearer <key>` of a key created with `incrementer keys create --rate "
        "10000000 --burst 10000000`, so each request pays the key lookup and a token-bucket take "
        "but is never refused. auth on / off: req/s ratio (median of the per-round ratios).",
    )


def _flush_section(flush: FlushResult | None) -> list[str]:
    if flush is None:
        return []
    return [
        "### Flush throughput in isolation",
        "",
        f"`bench/flush.py`: `PostgresStore.apply_batch` of {flush.keys:,} distinct keys on a "
        "fresh, migrated database, nothing else on the event loop; the first batch inserts "
        "every row, the next ones update them.",
        "",
        *flush_lines(flush),
        "",
    ]
