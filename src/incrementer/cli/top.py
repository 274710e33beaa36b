"""`incrementer top URL`: the status page's figures, live in a terminal, from a server's /metrics.

It reads what any Prometheus would (GET /metrics, with an API key when the server requires one)
plus GET /readyz, once a --interval, and shows rates and means over the last interval with a
sparkline of the last minute. It needs rich, an extra (`pip install 'incrementer[top]'`): a server
host runs without it.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import click
from prometheus_client.parser import text_string_to_metric_families

from incrementer.cli.options import settings_options
from incrementer.config import ENV_PREFIX, Settings

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

HISTORY = 60
SPARKS = "▁▂▃▄▅▆▇█"
TIMEOUT = 5.0

Samples = dict[str, list[tuple[dict[str, str], float]]]
"""Sample name -> (labels, value) of each of its series."""
Figures = dict[str, float | None]


class TopError(Exception):
    """The server cannot be read: the message is the one line to show."""


@dataclass(frozen=True)
class Scrape:
    at: float  # time.monotonic() when read
    samples: Samples
    ready: dict[str, Any]  # the /readyz body

    @property
    def server_at(self) -> float | None:
        """The server's clock at the scrape (incrementer_clock_seconds), if it says."""
        return total(self.samples, "incrementer_clock_seconds")


def elapsed(prev: Scrape, cur: Scrape) -> float:
    """Seconds between two scrapes by the server's clock (what its counters moved in), else
    by this process's."""
    before, now = prev.server_at, cur.server_at
    seconds = now - before if before is not None and now is not None else cur.at - prev.at
    return max(seconds, 1e-9)


def normalize(url: str) -> str:
    url = url.strip().rstrip("/")
    return url if "://" in url else "http://" + url


def fetch(url: str, api_key: str | None, timeout: float = TIMEOUT) -> Scrape:
    """GET /metrics and /readyz of the server at url (which may end in a proxy's path prefix)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    metrics = _get(url + "/metrics", headers, timeout)
    samples: Samples = {}
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    ready: dict[str, Any] = json.loads(_get(url + "/readyz", headers, timeout, ok=(200, 503)))
    return Scrape(time.monotonic(), samples, ready)


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of a URL, the port spelt out when it is the scheme's default."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    return (
        scheme,
        (parts.hostname or "").lower(),
        parts.port or {"http": 80, "https": 443}.get(scheme),
    )


class SameOriginCredentials(urllib.request.HTTPRedirectHandler):
    """Follows redirects as urllib does, but never carries the API key to another origin
    (scheme, host and port), as browsers, curl and httpx do not: urllib's own handler copies
    every header, Authorization included, to wherever the server points."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and origin(newurl) != origin(req.full_url):
            new.remove_header("Authorization")
        return new


_OPENER = urllib.request.build_opener(SameOriginCredentials)


def _get(url: str, headers: dict[str, str], timeout: float, ok: tuple[int, ...] = (200,)) -> str:
    request = urllib.request.Request(url, headers=headers)
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return str(response.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        if exc.code in ok:
            return str(exc.read().decode("utf-8"))
        if exc.code == 401:
            raise TopError(
                f"{url} answered 401: the server requires an API key "
                "(--api-key or INCREMENTER_API_KEY)"
            ) from None
        raise TopError(f"{url} answered {exc.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TopError(f"cannot read {url}: {reason}") from None


def total(
    samples: Samples, name: str, keep: Callable[[dict[str, str]], bool] | None = None
) -> float | None:
    """The sum of a metric's series (per label set, or per worker of a group); None if absent."""
    series = [value for labels, value in samples.get(name, []) if keep is None or keep(labels)]
    return sum(series) if series else None


def figures(prev: Scrape, cur: Scrape, last: Figures) -> Figures:
    """Rates and means over the interval between two scrapes, as the status page computes them.
    A counter that went down belongs to a restarted process: all of it is new."""
    seconds = elapsed(prev, cur)

    def grew(name: str) -> float | None:
        now, before = total(cur.samples, name), total(prev.samples, name)
        if now is None:
            return None
        return now if before is None or now < before else now - before

    def rate(name: str) -> float | None:
        delta = grew(name)
        return None if delta is None else delta / seconds

    def mean(name: str, scale: float, key: str) -> float | None:
        count, summed = grew(name + "_count"), grew(name + "_sum")
        if not count or summed is None:
            return last.get(key)  # nothing in this interval: the last one stands
        return summed / count * scale

    def wal_failures(operation: str) -> float | None:
        return total(
            cur.samples,
            "incrementer_wal_failures_total",
            lambda labels: labels.get("operation") == operation,
        )

    # A group's workers each have a lag: the worst one is the group's.
    lag = [value for _, value in cur.samples.get("incrementer_oldest_pending_seconds", [])]
    return {
        "requests_per_s": rate("incrementer_http_requests_total"),
        "accepted_per_s": rate("incrementer_accepted_increments_total"),
        "rejected_per_s": rate("incrementer_rejected_increments_total") or 0.0,
        "accepted_total": total(cur.samples, "incrementer_accepted_increments_total"),
        "lag_seconds": max(lag) if lag else None,
        "pending_keys": total(cur.samples, "incrementer_pending_keys"),
        "flushes_per_s": rate("incrementer_flushes_total"),
        "flush_ms": mean("incrementer_flush_duration_seconds", 1000, "flush_ms"),
        "flush_keys": mean("incrementer_flush_keys", 1, "flush_keys"),
        "fsync_ms": mean("incrementer_wal_fsync_duration_seconds", 1000, "fsync_ms"),
        "wal_bytes": total(cur.samples, "incrementer_wal_bytes"),
        "wal_write_failures": wal_failures("write"),
        "wal_fsync_failures": wal_failures("fsync"),
        "connections": total(cur.samples, "incrementer_open_connections"),
    }


def number(value: float | None) -> str:
    if value is None:
        return "-"
    size = abs(value)
    if size >= 1e9:
        return f"{value / 1e9:.2f}G"
    if size >= 1e6:
        return f"{value / 1e6:.2f}M"
    if size >= 1e4:
        return f"{value / 1e3:.1f}k"
    if size >= 100 or float(value).is_integer():
        return f"{value:.0f}"
    return f"{value:.2f}"


def duration_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def size(value: float | None) -> str:
    if value is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


ROWS: list[tuple[str, str, Callable[[float | None], str]]] = [
    ("requests_per_s", "requests/s", number),
    ("accepted_per_s", "increments accepted/s", number),
    ("rejected_per_s", "increments rejected/s", number),
    ("accepted_total", "accepted in all", number),
    ("lag_seconds", "persistence lag", seconds),
    ("pending_keys", "pending keys", number),
    ("flushes_per_s", "flushes/s", number),
    ("flush_ms", "flush duration (mean)", duration_ms),
    ("flush_keys", "keys per flush (mean)", number),
    ("wal_bytes", "WAL on disk", size),
    ("fsync_ms", "WAL fsync (mean)", duration_ms),
    ("wal_write_failures", "WAL failed writes", number),
    ("wal_fsync_failures", "WAL failed fsyncs", number),
    ("connections", "open connections", number),
]


def sparkline(values: deque[float]) -> str:
    top = max(values, default=0.0)
    if top <= 0:
        return SPARKS[0] * len(values)
    return "".join(SPARKS[min(len(SPARKS) - 1, int(v / top * (len(SPARKS) - 1)))] for v in values)


@dataclass
class View:
    url: str
    history: dict[str, deque[float]] = field(default_factory=dict)
    last: Figures = field(default_factory=dict)

    def add(self, current: Figures) -> None:
        self.last = current
        for key, _, _ in ROWS:
            self.history.setdefault(key, deque(maxlen=HISTORY)).append(current.get(key) or 0.0)

    def render(self, ready: dict[str, Any] | None, problem: str = "") -> RenderableType:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        head = Text(f"incrementer at {self.url}  ")
        if problem:
            head.append(f"unreachable: {problem}", style="bold red")
        elif ready is not None:
            is_ready = ready.get("status") == "ready"
            head.append(
                "ready" if is_ready else "NOT READY", style="bold green" if is_ready else "bold red"
            )
            reasons = ", ".join(
                f"{r['code']} for {seconds(r.get('for_seconds'))}" for r in ready.get("reasons", [])
            )
            if reasons:
                head.append(f"  {reasons}", style="red")
        head.append(f"  {time.strftime('%H:%M:%S')}", style="dim")
        table = Table(box=None, pad_edge=False)
        table.add_column("figure")
        table.add_column("now", justify="right")
        table.add_column(f"last {HISTORY} readings")
        for key, label, show in ROWS:
            table.add_row(
                label, show(self.last.get(key)), sparkline(self.history.get(key, deque()))
            )
        return Group(head, table)


def run(
    url: str, api_key: str | None, interval: float, once: bool, console: Console | None = None
) -> None:
    """Read the server every `interval` seconds and redraw, until Ctrl+C; with `once`, print the
    figures of one interval and return. A server unreachable at the start is a TopError; one lost
    later is shown, and read again."""
    try:
        from rich.console import Console
        from rich.live import Live
    except ImportError:
        raise TopError(
            "needs rich, the top extra: pip install '.[top]' in a checkout of incrementer "
            "(pip install 'incrementer[top]' where it is a package in your index)"
        ) from None
    console = console or Console()
    url = normalize(url)
    view = View(url)
    previous = fetch(url, api_key)
    if once:
        time.sleep(interval)
        current = fetch(url, api_key)
        view.add(figures(previous, current, view.last))
        console.print(view.render(current.ready))
        return
    try:
        with Live(view.render(previous.ready), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(max(0.0, previous.at + interval - time.monotonic()))
                try:
                    current = fetch(url, api_key)
                except TopError as exc:
                    live.update(view.render(None, str(exc)), refresh=True)
                    previous = Scrape(time.monotonic(), {}, {})
                    continue
                if previous.samples:
                    view.add(figures(previous, current, view.last))
                live.update(view.render(current.ready), refresh=True)
                previous = current
    except KeyboardInterrupt:
        return


@click.command()
@click.argument("url", required=False)
@click.option(
    "--api-key",
    envvar=ENV_PREFIX + "API_KEY",
    help="Key for /metrics when the server requires one. [env: INCREMENTER_API_KEY]",
)
@click.option(
    "--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True, help="Seconds."
)
@click.option("--once", is_flag=True, help="Print one interval's figures and exit.")
@settings_options("host", "port", connect=True)
def top(
    url: str | None, api_key: str | None, interval: float, once: bool, settings: Settings
) -> None:
    """Live figures of a running server, read from URL/metrics: by default the server that
    --host and --port (or their variables, or --config) describe. Needs `incrementer[top]`."""
    try:
        run(url or settings.local_url, api_key, interval, once)
    except TopError as exc:
        raise click.ClickException(f"top: {exc}") from None
