"""The report's tables of runs: results, CPU per request, auth on against off, every round, and
the isolated flush's lines. Rows are lists of cells, shown in markdown and in the terminal alike."""

from __future__ import annotations

from rich.table import Table

from bench.harness.apply_batch import FlushResult
from bench.harness.load import items_per_request
from bench.harness.measure import RunResult
from bench.report.cells import Row, mib, ms, num, rich_table, secs, times, us
from bench.report.compare import (
    LEAN,
    NAIVE,
    NGINX,
    WAL,
    WAL_AUTH,
    p99,
    paired,
    server_us,
    side_by_side,
)

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


def verified(r: RunResult) -> str:
    if r.error is not None:
        return "NO (error)" if r.target.needs_database else "error"
    if r.verified is None:
        return "n/a"
    return "yes" if r.verified else "NO"


def rows(results: list[RunResult], every: list[RunResult]) -> list[Row]:
    out = []
    for r in results:
        load = r.load
        lag_after = secs(r.lag_after_load)
        if r.drained is False:
            lag_after = f"> {lag_after}"
        out.append(
            [
                r.scenario,
                r.target.name,
                num(r.rps if load else None),
                num(r.rps * items_per_request(r.scenario) if load else None),
                times(paired(every, r.target.name, r.scenario, NGINX)),
                times(paired(every, r.target.name, r.scenario, LEAN)),
                times(paired(every, r.target.name, r.scenario, NAIVE)),
                ms(load.latency_ms["p50"] if load else None),
                ms(load.latency_ms["p99"] if load else None),
                secs(r.lag_p50),
                secs(r.lag_p99),
                lag_after,
                num(r.flush_keys_per_second),
                verified(r),
            ]
        )
    return out


def results_table(results: list[RunResult], every: list[RunResult]) -> Table:
    body = rows(results, every)
    failed = ["red" if row[-1].startswith("NO") or row[-1] == "error" else None for row in body]
    return rich_table("incrementer benchmark", COLUMNS, body, styles=failed)


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


def cpu_rows(results: list[RunResult]) -> list[Row]:
    """CPU per completed request: what a request costs whatever else shares the cores."""
    out = []
    for r in results:
        if r.load is None or not r.load.requests:
            continue
        per = 1e6 / r.load.requests
        server, box = r.cpu_server, r.cpu_machine
        out.append(
            [
                r.scenario,
                r.target.name,
                us(server_us(r)),
                "-" if server is None else f"{server.system * per:.1f}",
                "-" if server is None else f"{server.total / r.load.seconds:.2f}",
                us(r.us_per_request(r.cpu_database)),
                us(r.us_per_request(r.cpu_wrk)),
                "-" if box is None else f"{box.softirq * per:.1f}",
                "-" if box is None else f"{box.busy * per:.1f}",
                "-" if box is None else f"{100 * box.idle / (box.busy + box.idle):.0f}%",
                "-" if r.increments_per_wal_frame is None else f"{r.increments_per_wal_frame:.1f}",
                mib(r.peak_rss),
            ]
        )
    return out


def cpu_table(results: list[RunResult]) -> Table:
    return rich_table("CPU per request", CPU_COLUMNS, cpu_rows(results))


AUTH_COLUMNS = (
    "Scenario",
    "wal req/s",
    "wal-auth req/s",
    "auth on / off",
    "p99 ms off / on",
    "server µs/req off / on",
)


def auth_rows(results: list[RunResult], every: list[RunResult]) -> list[Row]:
    """incrementer-wal-auth against incrementer-wal per scenario: what the guard rails cost."""
    out = []
    for scenario, on, off in side_by_side(results, WAL_AUTH, WAL):
        per_on, per_off = server_us(on), server_us(off)
        out.append(
            [
                scenario,
                num(off.rps),
                num(on.rps),
                times(paired(every, WAL_AUTH, scenario, WAL)),
                f"{p99(off):.2f} / {p99(on):.2f}",
                "-" if per_on is None or per_off is None else f"{per_off:.1f} / {per_on:.1f}",
            ]
        )
    return out


def round_header(rounds: int) -> list[str]:
    return [
        "Scenario",
        "Target",
        *(f"round {n} req/s (load avg)" for n in range(1, rounds + 1)),
        "verified",
    ]


def round_rows(every: list[RunResult]) -> list[Row]:
    """Every closed-loop run's req/s, a column per round, and the verdicts on its totals."""
    rounds = max(r.round_number for r in every)
    table: dict[tuple[str, str], list[str]] = {}
    verdicts: dict[tuple[str, str], list[str]] = {}
    for r in every:
        if r.rate is not None:
            continue
        key = (r.scenario, r.target.name)
        table.setdefault(key, ["-"] * rounds)[r.round_number - 1] = (
            f"{num(r.rps)} ({r.load_average:.1f})" if r.load else "failed"
        )
        verdicts.setdefault(key, []).append(verified(r))
    return [[*key, *cells, ", ".join(dict.fromkeys(verdicts[key]))] for key, cells in table.items()]


def flush_lines(flush: FlushResult) -> list[str]:
    lines = [f"- insert batch: {num(flush.insert_rate)} keys/s ({flush.insert_seconds:.3f} s)"]
    lines += [
        f"- update batch {n}: {num(rate)} keys/s ({seconds:.3f} s)"
        for n, (rate, seconds) in enumerate(
            zip(flush.update_rates, flush.update_seconds, strict=True), 1
        )
    ]
    lines.append(f"- median of the update batches: {num(flush.median_update_rate)} keys/s")
    return lines
