"""The results as a rich table, a markdown report with the performance targets, and a PNG plot."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flush import TARGET_KEYS_PER_SECOND, FlushResult
from load import items_per_request
from measure import RunResult
from rich.table import Table

NGINX, LEAN, NAIVE = "nginx", "python-lean", "naive"
WAL, MEMORY = "incrementer-wal", "incrementer-memory"
WAL_AUTH = "incrementer-wal-auth"
COLUMNS = (
    "Scenario",
    "Target",
    "req/s",
    "incr/s",
    "x nginx",
    "x lean",
    "x naive",
    "p50 ms",
    "p99 ms",
    "lag p50",
    "lag p99",
    "lag after load",
    "flush keys/s",
    "totals verified",
)


@dataclass(frozen=True)
class Check:
    what: str
    goal: str
    measured: str
    passed: bool


def representatives(every: list[RunResult]) -> list[RunResult]:
    """Per scenario and target, the run with the median req/s (the lower one of an even count).
    Closed-loop runs only: the paced ones have their own section (bench/scaleout.py)."""
    groups: dict[tuple[str, str], list[RunResult]] = {}
    for r in every:
        if r.rate is not None:
            continue
        groups.setdefault((r.scenario, r.target.name), []).append(r)
    shown = []
    for runs in groups.values():
        loaded = sorted((r for r in runs if r.load is not None), key=lambda r: r.rps)
        shown.append(loaded[(len(loaded) - 1) // 2] if loaded else runs[0])
    return shown


def _find(results: list[RunResult], target: str, scenario: str) -> RunResult | None:
    for r in results:
        if (
            r.target.name == target
            and r.scenario == scenario
            and r.load is not None
            and r.rate is None
        ):
            return r
    return None


def _paired(
    every: list[RunResult],
    target: str,
    scenario: str,
    against: str,
    measure: Callable[[RunResult], float] = lambda r: r.rps,
) -> float | None:
    """Median over rounds of measure(target) / measure(against), each pair from one round: the
    machine drifts between rounds, so only runs minutes apart are compared."""
    ratios = []
    for n in sorted({r.round_number for r in every}):
        one_round = [r for r in every if r.round_number == n]
        mine, base = _find(one_round, target, scenario), _find(one_round, against, scenario)
        if mine is not None and base is not None and measure(base):
            ratios.append(measure(mine) / measure(base))
    return statistics.median(ratios) if ratios else None


def _p99(r: RunResult) -> float:
    return r.load.latency_ms["p99"] if r.load else 0.0


# formatting


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _times(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _secs(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def _verified(r: RunResult) -> str:
    if r.error is not None:
        return "NO (error)" if r.target.needs_database else "error"
    if r.verified is None:
        return "n/a"
    return "yes" if r.verified else "NO"


def rows(results: list[RunResult], every: list[RunResult]) -> list[list[str]]:
    out = []
    for r in results:
        load = r.load
        lag_after = _secs(r.lag_after_load)
        if r.drained is False:
            lag_after = f"> {lag_after}"
        out.append(
            [
                r.scenario,
                r.target.name,
                _num(r.rps if load else None),
                _num(r.rps * items_per_request(r.scenario) if load else None),
                _times(_paired(every, r.target.name, r.scenario, NGINX)),
                _times(_paired(every, r.target.name, r.scenario, LEAN)),
                _times(_paired(every, r.target.name, r.scenario, NAIVE)),
                _ms(load.latency_ms["p50"] if load else None),
                _ms(load.latency_ms["p99"] if load else None),
                _secs(r.lag_p50),
                _secs(r.lag_p99),
                lag_after,
                _num(r.flush_keys_per_second),
                _verified(r),
            ]
        )
    return out


CPU_COLUMNS = (
    "Scenario",
    "Target",
    "server µs/req",
    "of which kernel",
    "server cores busy",
    "PostgreSQL µs/req",
    "wrk µs/req",
    "softirq µs/req",
    "machine µs/req",
    "machine idle",
    "increments per WAL write",
    "peak RSS",
)


def cpu_rows(results: list[RunResult]) -> list[list[str]]:
    """CPU per completed request: what a request costs whatever else shares the cores."""
    out = []
    for r in results:
        if r.load is None or not r.load.requests:
            continue
        per = 1e6 / r.load.requests
        server, db, wrk, box = r.cpu_server, r.cpu_database, r.cpu_wrk, r.cpu_machine
        out.append(
            [
                r.scenario,
                r.target.name,
                "-" if server is None else f"{(server.user + server.system) * per:.1f}",
                "-" if server is None else f"{server.system * per:.1f}",
                "-" if server is None else f"{(server.user + server.system) / r.load.seconds:.2f}",
                "-" if db is None else f"{(db.user + db.system) * per:.1f}",
                "-" if wrk is None else f"{(wrk.user + wrk.system) * per:.1f}",
                "-" if box is None else f"{box.softirq * per:.1f}",
                "-" if box is None else f"{box.busy * per:.1f}",
                "-" if box is None else f"{100 * box.idle / (box.busy + box.idle):.0f}%",
                "-" if r.increments_per_wal_frame is None else f"{r.increments_per_wal_frame:.1f}",
                "-" if r.peak_rss is None else f"{r.peak_rss / 2**20:,.0f} MiB",
            ]
        )
    return out


def rich_table(results: list[RunResult], every: list[RunResult]) -> Table:
    table = Table(title="incrementer benchmark", header_style="bold")
    for i, name in enumerate(COLUMNS):
        table.add_column(name, justify="left" if i < 2 else "right")
    for row in rows(results, every):
        style = "red" if row[-1].startswith("NO") or row[-1] == "error" else None
        table.add_row(*row, style=style)
    return table


# performance targets


def checks(
    results: list[RunResult], every: list[RunResult], flush: FlushResult | None = None
) -> list[Check]:
    """The performance targets: ratios as medians of same-round pairs, other figures from the
    median runs, totals on every run of every round. The throughput, latency and lag targets
    hold with auth on as well, so they are checked for incrementer-wal-auth too."""
    found: list[Check] = []

    def add(
        what: str, goal: str, value: float | None, limit: float, at_least: bool, shown: str
    ) -> None:
        if value is not None:
            passed = value >= limit if at_least else value <= limit
            found.append(Check(what, goal, shown, passed))

    for scenario, share, lag_limit, name in (
        (scenario, share, lag_limit, name)
        for scenario, share, lag_limit in (("10keys", 0.9, 0.25), ("100kkeys", 0.75, 1.0))
        for name in (WAL, WAL_AUTH)
    ):
        wal = _find(results, name, scenario)
        if wal is None:
            continue
        label = name.removeprefix("incrementer-")
        ratio = _paired(every, name, scenario, NGINX)
        add(
            f"{scenario}: {label} throughput vs nginx",
            f">= {share}x",
            ratio,
            share,
            True,
            _times(ratio),
        )
        slower = _paired(every, name, scenario, NGINX, _p99)
        add(
            f"{scenario}: {label} p99 latency vs nginx",
            "<= 2x",
            slower,
            2.0,
            False,
            f"{_times(slower)} ({_p99(wal):.2f} ms in the median run)",
        )
        add(
            f"{scenario}: {label} persistence lag p99",
            f"<= {_secs(lag_limit)}",
            wal.lag_p99,
            lag_limit,
            False,
            _secs(wal.lag_p99),
        )
        naive = _paired(every, name, scenario, NAIVE)
        add(f"{scenario}: {label} vs naive", ">= 10x", naive, 10.0, True, _times(naive))
    for scenario in ("10keys", "100kkeys", "batch"):
        versus_memory = _paired(every, WAL, scenario, MEMORY)
        add(
            f"{scenario}: wal vs memory",
            ">= 0.85x",
            versus_memory,
            0.85,
            True,
            _times(versus_memory),
        )
    for scenario in ("100kkeys", "batch"):
        wal = _find(results, WAL, scenario)
        if wal is not None:
            add(
                f"{scenario}: wal flush throughput",
                ">= 150,000 keys/s",
                wal.flush_keys_per_second,
                150_000,
                True,
                f"{_num(wal.flush_keys_per_second)} keys/s",
            )
    if flush is not None:
        add(
            "isolated flush throughput (bench/flush.py, median of the update batches)",
            f">= {TARGET_KEYS_PER_SECOND:,} keys/s",
            flush.median_update_rate,
            TARGET_KEYS_PER_SECOND,
            True,
            f"{_num(flush.median_update_rate)} keys/s",
        )
    checked = [r for r in every if r.target.needs_database]
    good = sum(1 for r in checked if r.ok and r.verified)
    if checked:
        found.append(
            Check(
                "totals verified (no acknowledged increment lost)",
                "all runs",
                f"{good}/{len(checked)} runs",
                good == len(checked),
            )
        )
    return found


def auth_rows(results: list[RunResult], every: list[RunResult]) -> list[list[str]]:
    """incrementer-wal-auth against incrementer-wal per scenario: what the guard rails cost."""
    out = []
    for scenario in dict.fromkeys(r.scenario for r in results):
        on, off = _find(results, WAL_AUTH, scenario), _find(results, WAL, scenario)
        if on is None or off is None:
            continue
        per_on, per_off = _server_us(on), _server_us(off)
        out.append(
            [
                scenario,
                _num(off.rps),
                _num(on.rps),
                _times(_paired(every, WAL_AUTH, scenario, WAL)),
                f"{_p99(off):.2f} / {_p99(on):.2f}",
                "-" if per_on is None or per_off is None else f"{per_off:.1f} / {per_on:.1f}",
            ]
        )
    return out


AUTH_COLUMNS = (
    "Scenario",
    "wal req/s",
    "wal-auth req/s",
    "auth on / off",
    "p99 ms off / on",
    "server µs/req off / on",
)


def _server_us(r: RunResult) -> float | None:
    if r.cpu_server is None or r.load is None or not r.load.requests:
        return None
    return (r.cpu_server.user + r.cpu_server.system) * 1e6 / r.load.requests


def flush_lines(flush: FlushResult) -> list[str]:
    lines = [f"- insert batch: {_num(flush.insert_rate)} keys/s ({flush.insert_seconds:.3f} s)"]
    lines += [
        f"- update batch {n}: {_num(rate)} keys/s ({secs:.3f} s)"
        for n, (rate, secs) in enumerate(
            zip(flush.update_rates, flush.update_seconds, strict=True), 1
        )
    ]
    lines.append(f"- median of the update batches: {_num(flush.median_update_rate)} keys/s")
    return lines


def cpu_table(results: list[RunResult]) -> Table:
    table = Table(title="CPU per request", header_style="bold")
    for i, name in enumerate(CPU_COLUMNS):
        table.add_column(name, justify="left" if i < 2 else "right")
    for row in cpu_rows(results):
        table.add_row(*row)
    return table


def checks_table(found: list[Check]) -> Table:
    table = Table(title="performance targets", header_style="bold")
    for name in ("Target", "Goal", "Measured", "Result"):
        table.add_column(name)
    for c in found:
        table.add_row(
            c.what, c.goal, c.measured, "[green]pass[/green]" if c.passed else "[red]FAIL[/red]"
        )
    return table


# markdown and plot


def _md_table(header: list[str] | tuple[str, ...], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in body]
    return "\n".join(lines)


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
    checked = [r for r in every if r.target.needs_database]
    verified = sum(1 for r in checked if r.ok and r.verified)
    all_ok = verified == len(checked)
    parts = [
        f"# Benchmark {stamp}",
        "",
        "Command:",
        "",
        "```",
        command,
        "```",
        "",
        f"**Totals verified: {'yes' if all_ok else 'NO'}** ({verified}/{len(checked)} runs "
        "with a database: every acknowledged increment is in the database, nothing more than "
        "was sent).",
        "",
        "## Machine",
        "",
        _md_table(["", ""], [[k, v] for k, v in machine.items()]),
        "",
        "## Settings",
        "",
        _md_table(["", ""], [[k, v] for k, v in settings.items()]),
        "",
        "## Results",
        "",
        _md_table(COLUMNS, rows(results, every)),
        "",
        "- req/s and p50/p99 latency: wrk, over the run. incr/s: req/s times the increments per "
        "request (1, or the batch size).",
        "- x nginx, x lean, x naive: req/s (with several rounds: the median of the per-round "
        "ratios) against nginx `return 202`, python-lean (the "
        "leanest uvloop + httptools + msgspec server coalescing into a dict, bench/lean.py: what "
        "Python itself costs) and the naive one-upsert-per-request server (bench/naive.py), "
        "measured in this same run.",
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
        _md_table(CPU_COLUMNS, cpu_rows(results)),
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
        _md_table(
            ["Target", "Goal", "Measured", "Result"],
            [[c.what, c.goal, c.measured, "pass" if c.passed else "**FAIL**"] for c in found],
        ),
        "",
    ]
    rounds = max((r.round_number for r in every), default=1)
    if rounds > 1:
        parts += ["## Every round", "", _md_table(_round_header(rounds), _round_rows(every)), ""]
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
    return [
        "### Auth on vs off",
        "",
        _md_table(AUTH_COLUMNS, body),
        "",
        "incrementer-wal-auth is incrementer-wal with `--auth required`: every request sends "
        "`Authorization: Bearer <key>` of a key created with `incrementer keys create --rate "
        "10000000 --burst 10000000`, so each request pays the key lookup and a token-bucket take "
        "but is never refused. auth on / off: req/s ratio (median of the per-round ratios).",
        "",
    ]


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


def _round_header(rounds: int) -> list[str]:
    return [
        "Scenario",
        "Target",
        *(f"round {n} req/s (load avg)" for n in range(1, rounds + 1)),
        "verified",
    ]


def _round_rows(every: list[RunResult]) -> list[list[str]]:
    rounds = max(r.round_number for r in every)
    table: dict[tuple[str, str], list[str]] = {}
    verdicts: dict[tuple[str, str], list[str]] = {}
    for r in every:
        if r.rate is not None:
            continue
        key = (r.scenario, r.target.name)
        table.setdefault(key, ["-"] * rounds)[r.round_number - 1] = (
            f"{_num(r.rps)} ({r.load_average:.1f})" if r.load else "failed"
        )
        verdicts.setdefault(key, []).append(_verified(r))
    return [[*key, *cells, ", ".join(dict.fromkeys(verdicts[key]))] for key, cells in table.items()]


def plot(results: list[RunResult], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(dict.fromkeys(r.scenario for r in results))
    fig, axes = plt.subplots(len(scenarios), 2, figsize=(13, 3.6 * len(scenarios)), squeeze=False)
    for row, scenario in enumerate(scenarios):
        rate_ax, lag_ax = axes[row]
        for r in results:
            if r.scenario != scenario or r.load is None:
                continue
            if r.target.name == NGINX:
                rate_ax.axhline(
                    r.rps * items_per_request(scenario),
                    linestyle="--",
                    color="grey",
                    label="nginx (mean)",
                )
                continue
            t = r.timeline
            if t.seconds:
                (line,) = rate_ax.plot(t.seconds, t.rate, marker=".", label=r.target.name)
                if r.target.kind == "incrementer" and not r.target.lagging:
                    mean = [float("nan") if v is None else v for v in t.lag_mean]
                    lag_ax.plot(
                        t.seconds,
                        mean,
                        marker=".",
                        color=line.get_color(),
                        label=f"{r.target.name}: mean lag of the batches committed that second",
                    )
                    lag_ax.plot(
                        t.seconds,
                        t.lag,
                        linestyle=":",
                        color=line.get_color(),
                        label=f"{r.target.name}: oldest pending at the sample",
                    )
        rate_ax.set_title(f"{scenario}: increments acknowledged per second")
        rate_ax.set_xlabel("seconds into the load")
        rate_ax.set_ylim(bottom=0)
        rate_ax.legend(fontsize="x-small")
        lag_ax.set_title(f"{scenario}: persistence lag (s)")
        lag_ax.set_xlabel("seconds into the load")
        lag_ax.set_ylim(bottom=0)
        if lag_ax.get_legend_handles_labels()[0]:
            lag_ax.legend(fontsize="x-small")
        for ax in (rate_ax, lag_ax):
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
