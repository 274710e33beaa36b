"""The soak's figures (bench/soak.py fills them in) and its markdown report: one row per period,
the RSS slope after the warm-up, and the targets."""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.harness.metrics import Samples
from bench.report.cells import md_table

RSS_SLOPE_MAX = 1.0  # MiB per 10 minutes, after the warm-up
P99_STEP_MAX = 2.0  # one period's p99 over the one before, either way
COLUMNS = [
    "period", "keys", "req/s", "p99 ms", "persisted lag p99 s", "oldest pending max s",
    "RSS MiB", "fds", "db restarts",
]  # fmt: skip


@dataclass
class Period:
    index: int
    keys: int
    rate: float  # requests/s achieved
    p99_ms: float
    acked_value: int
    unknown: int  # requests without an answer (socket errors, timeouts)
    lag_p99: float | None = None  # persisted lag of the batches committed in the period
    lag_max: float = 0.0
    rss: int = 0
    fds: int = 0
    restarts: int = 0


@dataclass
class Soak:
    duration: float
    period: float
    restart_every: float
    ceiling: float
    rate: float
    started: str
    idempotency_window: float = 0.0
    cycle: int = 0
    """Periods from one with some traffic to the next with the same: a climb of the key space
    from 10 to 1M and the way back down."""
    database_nice: int = 0
    """The PostgreSQL cluster's CPU niceness (0: the service's own priority)."""
    periods: list[Period] = field(default_factory=list)
    samples: list[tuple[float, int, int, float]] = field(default_factory=list)
    """(seconds since the start, RSS bytes, open fds, /readyz lag) every second."""
    restarts: list[float] = field(default_factory=list)
    rotated_at: float | None = None
    old_key_refused: bool | None = None
    idempotent_batches: int = 0
    idempotent_sends: int = 0
    idempotent_value: int = 0
    idempotent_unknown: int = 0
    expected: int = 0
    """Increments acknowledged to wrk (each a 202)."""
    unknown: int = 0
    scrape: Samples = field(default_factory=Samples)
    """The last /metrics scrape, for the next period's persisted lag."""
    total: int = 0
    settle_seconds: float = 0.0
    exact: bool = False


def warmup(duration: float) -> float:
    """Seconds left out of the RSS slope and the p99 steps, a third of the run: the key space's
    first climb to its largest, in which the buffer, the WAL and the pools reach their size."""
    return duration / 3


def rss_slope(samples: list[tuple[float, int, int, float]], after: float) -> float | None:
    """MiB per 10 minutes: the least-squares slope of RSS over the samples past `after`."""
    points = [(t, rss / 2**20) for t, rss, _, _ in samples if t >= after and rss]
    if len(points) < 2:
        return None
    mean_t = sum(t for t, _ in points) / len(points)
    mean_m = sum(m for _, m in points) / len(points)
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    if spread == 0:
        return None
    slope = sum((t - mean_t) * (m - mean_m) for t, m in points) / spread
    return slope * 600


def p99_step(periods: list[Period], after: int) -> float | None:
    """The largest ratio between the p99s of two consecutive periods past the first `after`
    (the larger over the smaller)."""
    return p99_drift(periods, after, 1)


def p99_drift(periods: list[Period], after: int, cycle: int) -> float | None:
    """The largest ratio between the p99s of two periods `cycle` apart (one key-space cycle:
    the same traffic), both past the first `after` (the larger over the smaller)."""
    if cycle < 1:
        return None
    periods = periods[after:]
    steps = [
        max(a.p99_ms, b.p99_ms) / min(a.p99_ms, b.p99_ms)
        for a, b in zip(periods, periods[cycle:], strict=False)
        if min(a.p99_ms, b.p99_ms) > 0
    ]
    return max(steps, default=None)


def render(soak: Soak) -> str:
    slope = rss_slope(soak.samples, warmup(soak.duration))
    warm = warmup(soak.duration)
    after = min(len(soak.periods) - 2, int(-(-warm // soak.period)))
    step = p99_step(soak.periods, after)
    drift = p99_drift(soak.periods, after, soak.cycle)
    fds = [s[2] for s in soak.samples]
    want = soak.expected + soak.idempotent_value
    rows = [
        [
            str(p.index + 1),
            f"{p.keys:,}",
            f"{p.rate:,.0f}",
            f"{p.p99_ms:.2f}",
            _fmt(p.lag_p99, ""),
            f"{p.lag_max:.2f}",
            f"{p.rss / 2**20:.1f}",
            str(p.fds),
            str(p.restarts or ""),
        ]
        for p in soak.periods
    ]
    verdicts = [
        ("RSS slope after warm-up", _fmt(slope, " MiB / 10 min"), f"< {RSS_SLOPE_MAX:g}",
         slope is not None and slope < RSS_SLOPE_MAX),
        ("p99, period to period", _fmt(step, "x"), f"<= {P99_STEP_MAX:g}x",
         step is not None and step <= P99_STEP_MAX),
        (f"p99, period to period at the same traffic ({soak.cycle} periods apart)",
         _fmt(drift, "x") if drift is not None else "no two that far apart after the warm-up",
         f"<= {P99_STEP_MAX:g}x", None if drift is None else drift <= P99_STEP_MAX),
        ("totals", f"{soak.total:,}: acknowledged {want:,}, unanswered "
         f"{soak.unknown + soak.idempotent_unknown:,}",
         "acknowledged <= total <= acknowledged + unanswered", soak.exact),
    ]  # fmt: skip
    nice_flag = f" --database-nice {soak.database_nice}" if soak.database_nice else ""
    nice_text = (
        f" (at nice {soak.database_nice}: it takes the CPU the service leaves idle)"
        if soak.database_nice
        else " (at the service's CPU priority)"
    )
    lines = [
        f"# Soak {soak.started} (UTC)",
        "",
        f"`python -m bench.soak --duration {soak.duration:g} --period {soak.period:g} "
        f"--restart-every {soak.restart_every:g}{nice_flag}`: incrementer (wal, --auth "
        f"required, --idempotency-window {soak.idempotency_window:g}) on its own "
        f"PostgreSQL cluster{nice_text}, wrk paced at {soak.rate:,.0f} requests/s (half the ceiling of "
        f"{soak.ceiling:,.0f} measured at the start), each period on new keys, the key space "
        f"climbing from 10 to 1M over the warm-up ({warm:g} s), then down and up again the same "
        f"way, one step a period.",
        "",
        "## Targets",
        "",
        md_table(
            ["target", "measured", "bound", "met"],
            [[name, got, bound, _met(met)] for name, got, bound, met in verdicts],
        ),
        "",
        "## Per period",
        "",
        md_table(
            COLUMNS,
            rows,
        ),
        "",
        "## Events",
        "",
        "- database restarts (`pg_ctl restart -m fast`) at: "
        + (", ".join(f"{t:.0f} s" for t in soak.restarts) or "none"),
        f"- API key rotated at {_fmt(soak.rotated_at, ' s')}; the old key refused at the end: "
        f"{_yes(soak.old_key_refused)}",
        f"- idempotent batches: {soak.idempotent_batches:,} ({soak.idempotent_sends:,} sends, "
        f"each batch 2 or 3 times), counted once: {soak.idempotent_value:,}; with no answer: "
        f"{soak.idempotent_unknown:,}",
        f"- open file descriptors: {min(fds, default=0)} to {max(fds, default=0)}",
        f"- requests without an answer: {soak.unknown:,}",
        f"- nothing left unflushed {soak.settle_seconds:.2f} s after the load",
        "",
    ]
    return "\n".join(lines)


def _met(met: bool | None) -> str:
    """yes, NO, or - when the run was too short to judge."""
    return "-" if met is None else ("yes" if met else "NO")


def _fmt(x: float | None, unit: str) -> str:
    return "-" if x is None else f"{x:.2f}{unit}"


def _yes(x: bool | None) -> str:
    return "-" if x is None else ("yes" if x else "no")
