"""The report's scale-out sections: workers, latency at a paced load, and 10,000,000 keys.

- Workers: `--workers 2` beside one process and nginx with 2 workers, same round. The figure that
  transfers to a bigger machine is the server CPU per request (user + sys of the whole process
  group, supervisor included, / requests): with N workers within 10% of one worker's, nothing is
  spent on coordination and throughput grows with the cores. Two cores shared with wrk and
  PostgreSQL cannot show the growth itself.
- Paced: p50/p99 at a fixed offered rate (bench/wrk/paced.lua), a fraction of nginx's closed-loop
  req/s in the same round and scenario, incrementer-wal beside nginx at that same rate. What users
  see in production, where load arrives at its own pace; closed-loop p99 is latency at saturation.
- 10mkeys: keys drawn from 10,000,000, so almost every request adds a row: throughput, lag and the
  service's peak RSS.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

from rich.table import Table

from bench.harness.measure import RunResult
from bench.report.cells import Row, md_section, mib, ms, num, rich_table, secs, times, us
from bench.report.checks import Check
from bench.report.compare import (
    NGINX,
    NGINX_2W,
    WAL,
    WAL_2W,
    find,
    paired,
    server_us,
    side_by_side,
)

PACED_TARGETS = (NGINX, WAL)
PACED_SCENARIOS = ("10keys", "100kkeys")
CPU_SHARE_LIMIT = 1.10  # N workers' CPU per request, against one worker's
PACED_P99_LIMIT = 2.0  # incrementer's p99 against nginx's at the same paced rate (50%)


def _cpu_ratio(every: list[RunResult], scenario: str, many: str, one: str) -> float | None:
    """Median over rounds of server µs/request with N workers / with one, same round."""

    def per_request(r: RunResult) -> float:
        return server_us(r) or 0.0

    return paired(every, many, scenario, one, per_request)


# workers

WORKERS_COLUMNS = (
    "Scenario",
    "nginx req/s",
    "nginx-2w req/s",
    "wal req/s",
    "wal-2w req/s",
    "wal-2w / wal",
    "server µs/req wal / wal-2w",
    "CPU/req 2w / 1w",
    "nginx µs/req 1w / 2w",
)


def workers_rows(results: list[RunResult], every: list[RunResult]) -> list[Row]:
    out = []
    for scenario, one, two in side_by_side(results, WAL, WAL_2W):
        n1, n2 = find(results, NGINX, scenario), find(results, NGINX_2W, scenario)
        us1, us2 = server_us(one), server_us(two)
        nus1 = server_us(n1) if n1 else None
        nus2 = server_us(n2) if n2 else None
        out.append(
            [
                scenario,
                num(n1.rps if n1 else None),
                num(n2.rps if n2 else None),
                num(one.rps),
                num(two.rps),
                times(paired(every, WAL_2W, scenario, WAL)),
                f"{us(us1)} / {us(us2)}",
                times(_cpu_ratio(every, scenario, WAL_2W, WAL)),
                f"{us(nus1)} / {us(nus2)}",
            ]
        )
    return out


# paced

PACED_COLUMNS = (
    "Scenario",
    "offered",
    "req/s offered",
    "req/s nginx / wal",
    "nginx p50 / p99 ms",
    "wal p50 / p99 ms",
    "wal p99 / nginx p99",
)


def _paced(every: list[RunResult], target: str, scenario: str, fraction: float) -> list[RunResult]:
    return [
        r
        for r in every
        if r.target.name == target
        and r.scenario == scenario
        and r.rate is not None
        and r.load is not None
        and _fraction_of(r, every) == fraction
    ]


def _fraction_of(paced: RunResult, every: list[RunResult]) -> float | None:
    """The fraction of the same round's nginx ceiling a paced run offered (0.5, 0.8)."""
    ceiling = next(
        (
            r
            for r in every
            if r.target.name == NGINX
            and r.scenario == paced.scenario
            and r.round_number == paced.round_number
            and r.rate is None
            and r.load is not None
        ),
        None,
    )
    if ceiling is None or paced.rate is None or not ceiling.rps:
        return None
    return round(paced.rate / ceiling.rps, 2)


def _fractions(every: list[RunResult]) -> list[float]:
    found = {_fraction_of(r, every) for r in every if r.rate is not None}
    return sorted(f for f in found if f is not None)


def _median(runs: list[RunResult], measure: Callable[[RunResult], float]) -> float | None:
    return statistics.median(measure(r) for r in runs) if runs else None


def paced_p99_ratio(every: list[RunResult], scenario: str, fraction: float) -> float | None:
    """Median over rounds of wal p99 / nginx p99 at the same offered rate, same round."""
    ratios = []
    for n in sorted({r.round_number for r in every}):
        wal = [r for r in _paced(every, WAL, scenario, fraction) if r.round_number == n]
        base = [r for r in _paced(every, NGINX, scenario, fraction) if r.round_number == n]
        if wal and base and base[0].load and wal[0].load and base[0].load.latency_ms["p99"]:
            ratios.append(wal[0].load.latency_ms["p99"] / base[0].load.latency_ms["p99"])
    return statistics.median(ratios) if ratios else None


def paced_rows(every: list[RunResult]) -> list[Row]:
    out = []
    for scenario in PACED_SCENARIOS:
        for fraction in _fractions(every):
            nginx = _paced(every, NGINX, scenario, fraction)
            wal = _paced(every, WAL, scenario, fraction)
            if not nginx or not wal:
                continue

            def lat(runs: list[RunResult], q: str) -> str:
                return ms(_median(runs, lambda r: r.load.latency_ms[q] if r.load else 0.0))

            offered = _median(wal, lambda r: r.rate or 0.0)
            out.append(
                [
                    scenario,
                    f"{fraction:.0%} of nginx",
                    num(offered),
                    f"{num(_median(nginx, lambda r: r.rps))} / {num(_median(wal, lambda r: r.rps))}",
                    f"{lat(nginx, 'p50')} / {lat(nginx, 'p99')}",
                    f"{lat(wal, 'p50')} / {lat(wal, 'p99')}",
                    times(paced_p99_ratio(every, scenario, fraction)),
                ]
            )
    return out


# 10,000,000 keys

TENM_COLUMNS = ("Target", "req/s", "x nginx", "lag p50", "lag p99", "lag after load", "peak RSS")


def tenm_rows(results: list[RunResult], every: list[RunResult]) -> list[Row]:
    out = []
    for r in results:
        if r.scenario != "10mkeys" or r.load is None:
            continue
        out.append(
            [
                r.target.name,
                num(r.rps),
                times(paired(every, r.target.name, "10mkeys", NGINX)),
                secs(r.lag_p50),
                secs(r.lag_p99),
                secs(r.lag_after_load),
                mib(r.peak_rss),
            ]
        )
    return out


# targets, sections, tables


def checks(results: list[RunResult], every: list[RunResult]) -> list[Check]:
    found = []
    for scenario in dict.fromkeys(r.scenario for r in results):
        ratio = _cpu_ratio(every, scenario, WAL_2W, WAL)
        if ratio is not None:
            found.append(
                Check(
                    f"{scenario}: server CPU per request, 2 workers vs 1",
                    f"<= {CPU_SHARE_LIMIT:.2f}x",
                    times(ratio),
                    ratio <= CPU_SHARE_LIMIT,
                )
            )
    for scenario in PACED_SCENARIOS:
        ratio = paced_p99_ratio(every, scenario, 0.5)
        if ratio is not None:
            found.append(
                Check(
                    f"{scenario}: wal p99 vs nginx at 50% of nginx's ceiling (paced)",
                    f"<= {PACED_P99_LIMIT:g}x",
                    times(ratio),
                    ratio <= PACED_P99_LIMIT,
                )
            )
    return found


WORKERS_TEXT = (
    "incrementer-wal-2w is incrementer-wal with `--workers 2` (a supervisor and two "
    "workers on the port with SO_REUSEPORT); nginx-2w is nginx with "
    "`worker_processes 2` and `listen ... reuseport`. Server µs/req: user + system CPU of "
    "the whole process group (the supervisor too) per request, over the load and the "
    "drain. CPU/req 2w / 1w: the median of the per-round ratios; within 1.10x means no "
    "cost for coordination, so on a machine with spare cores throughput grows with the "
    "workers. This machine cannot show that growth: wrk, PostgreSQL and the workers "
    "share its two cores, so a second worker only takes turns with the first."
)
PACED_TEXT = (
    "wrk offers a fixed rate (bench/wrk/paced.lua: every request takes the next slot on "
    "one schedule), a fraction of nginx's closed-loop req/s measured in the same round "
    "and scenario, to nginx and to incrementer-wal alike; latencies are medians over "
    "rounds, the ratio the median of the per-round ratios. This is the latency users "
    "see at a load the server carries; the closed-loop p99 above is latency at "
    "saturation."
)
TENM_TEXT = (
    "Keys drawn at random from 10,000,000, so almost every request adds a row (a run of "
    "10 s at 80k req/s touches about 770,000 keys, 96% of them new): per-user counters. "
    "Peak RSS is the server's processes' peak resident memory, summed."
)


def _measured(
    results: list[RunResult], every: list[RunResult]
) -> list[tuple[str, str, tuple[str, ...], list[Row], str]]:
    """(report title, terminal title, columns, rows, how to read them) of each section that
    has rows: only what was measured."""
    found = [
        (
            "Workers: `--workers 2` beside one process",
            "workers",
            WORKERS_COLUMNS,
            workers_rows(results, every),
            WORKERS_TEXT,
        ),
        (
            "Latency at a paced load",
            "latency at a paced load",
            PACED_COLUMNS,
            paced_rows(every),
            PACED_TEXT,
        ),
        ("10,000,000 keys", "10,000,000 keys", TENM_COLUMNS, tenm_rows(results, every), TENM_TEXT),
    ]
    return [section for section in found if section[3]]


def sections(results: list[RunResult], every: list[RunResult]) -> list[str]:
    """Markdown lines for the report."""
    parts: list[str] = []
    for title, _, columns, rows, text in _measured(results, every):
        parts += md_section(title, columns, rows, text)
    return parts


def rich_tables(results: list[RunResult], every: list[RunResult]) -> list[Table]:
    return [
        rich_table(title, columns, rows) for _, title, columns, rows, _ in _measured(results, every)
    ]
