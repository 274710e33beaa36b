"""The report's time-bucket section: incrementer-wal-buckets (`--buckets minute,hour,day`)
beside incrementer-wal, same round, and the targets counting per period must meet: req/s at
least 0.95x of buckets off at 10 and 100,000 keys, flush keys/s at least 0.5x, and the
persistence lag p99 at most 1 s at 100,000 keys. What a read costs is bench/reads.py's.
"""

from __future__ import annotations

from rich.table import Table

from bench.harness.measure import RunResult
from bench.report.cells import Row, md_section, num, rich_table, secs, times
from bench.report.checks import Check
from bench.report.compare import WAL, WAL_BUCKETS, paired, server_us, side_by_side

SCENARIOS = ("10keys", "100kkeys")
RPS_LIMIT = 0.95
FLUSH_LIMIT = 0.5
LAG_LIMIT = 1.0

COLUMNS = (
    "Scenario",
    "wal req/s",
    "wal-buckets req/s",
    "buckets on / off",
    "flush keys/s off / on",
    "flush on / off",
    "lag p99 off / on",
    "server µs/req off / on",
)
TEXT = (
    "incrementer-wal-buckets is incrementer-wal with `--buckets minute,hour,day`: every "
    "increment also counted in its minute, hour and day, in the same flush transaction as the "
    "totals. Ratios are the median of the per-round ratios (both ran minutes apart at most). "
    "Flush keys/s counts keys (totals) written per second of flush time: each also carries its "
    "three buckets."
)


def _flush_rate(r: RunResult) -> float:
    return r.flush_keys_per_second or 0.0


def rows(results: list[RunResult], every: list[RunResult]) -> list[Row]:
    out = []
    for scenario, on, off in side_by_side(results, WAL_BUCKETS, WAL):
        per_on, per_off = server_us(on), server_us(off)
        out.append(
            [
                scenario,
                num(off.rps),
                num(on.rps),
                times(paired(every, WAL_BUCKETS, scenario, WAL)),
                f"{num(_flush_rate(off))} / {num(_flush_rate(on))}",
                times(paired(every, WAL_BUCKETS, scenario, WAL, _flush_rate)),
                f"{secs(off.lag_p99)} / {secs(on.lag_p99)}",
                "-" if per_on is None or per_off is None else f"{per_off:.1f} / {per_on:.1f}",
            ]
        )
    return out


def checks(results: list[RunResult], every: list[RunResult]) -> list[Check]:
    found = []
    for scenario in SCENARIOS:
        ratio = paired(every, WAL_BUCKETS, scenario, WAL)
        if ratio is not None:
            found.append(
                Check(
                    f"{scenario}: buckets on vs off, req/s",
                    f">= {RPS_LIMIT}x",
                    times(ratio),
                    ratio >= RPS_LIMIT,
                )
            )
    flush = paired(every, WAL_BUCKETS, "100kkeys", WAL, _flush_rate)
    if flush is not None:
        found.append(
            Check(
                "100kkeys: buckets on vs off, flush keys/s",
                f">= {FLUSH_LIMIT}x",
                times(flush),
                flush >= FLUSH_LIMIT,
            )
        )
    on = next((r for s, r, _ in side_by_side(results, WAL_BUCKETS, WAL) if s == "100kkeys"), None)
    if on is not None and on.lag_p99 is not None:
        found.append(
            Check(
                "100kkeys: buckets on, persistence lag p99",
                f"<= {secs(LAG_LIMIT)}",
                secs(on.lag_p99),
                on.lag_p99 <= LAG_LIMIT,
            )
        )
    return found


def sections(results: list[RunResult], every: list[RunResult]) -> list[str]:
    body = rows(results, every)
    return md_section("Time buckets on vs off", COLUMNS, body, TEXT) if body else []


def rich_tables(results: list[RunResult], every: list[RunResult]) -> list[Table]:
    body = rows(results, every)
    return [rich_table("time buckets on vs off", COLUMNS, body, 1)] if body else []
